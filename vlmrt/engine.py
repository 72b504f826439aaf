"""The engine: continuous batching on a slot-mapped KV cache. Requests join and leave a running
batch at any step; each carries its own images, prompt, sampling settings and stops.

Based on the scheduling of vLLM / TGI (a loop of steps over whatever requests are running, not a
batch run from start to end) and on gpt-fast's explicit static cache, here one cache row ("slot")
per running request (vlmrt/kv_cache.py `SlotKVCache`).

```
 add(request) ─► processor (tokens, pixels) ─► length check ─► waiting (FIFO) ─┐
 abort(id) ─► free its slot now; an "abort" event at the next step             │
                                                                               ▼
 step():  1. admit: pop waiting requests into free slots (max_prefills per step at most), together:
              vision over all their images ─► embed each ─► one prefill [n,T] over their run of
              rows, right-padded to the longest (vlmrt/engine_batch.py) ─► sample token 0 of each
          2. decode every running row in one call over pool rows [0, n):
              token [n] ─► embed ─► decode(positions [n,1], cache_position [n,1], mask [n,S+1],
                                            window: the longest row + 1; see attention_window)
              ─► logits [n,V] ─► sample per row (own config, own generator) ─► stop per row
          3. a row that stopped frees its slot at once; events (new tokens, text, finish) out

 KV pool (SlotKVCache): row r = the request in slot r        mask [N_slots, S+1] (on the device)
   row 0 │ req 7: 0..L7+k7 valid ........ │ scratch │        1 = a valid key position of that row
   row 1 │ req 9: 0..L9+k9 valid ...      │ scratch │        a row that finishes is refilled by the
   row 2 │ free  (all zero)               │ scratch │        highest running row (compaction)
```

Decisions:
- A fixed slot of `max_seq` positions per request, the lowest free slot first; when a request
  finishes, the highest running row moves into its slot (its written positions only). So the running
  rows are always the slots [0, n) and a decode call covers them as one view of the pool: writes
  are in place, nothing is gathered, no padding row is computed (a compiled runtime pads n up to
  its bucket; those rows write only to their scratch position).
- The requests admitted in one step share the vision call (images of one shape as one batch) and
  the prefill call (their slots are consecutive: rows [n, n+k) of the pool), as the lock-step loop
  batches them; a runtime says how many images and rows it takes a call (`vision_batch`,
  `prefill_rows`; absent: one, each request alone). Prefill rows never mix (attention is per row,
  padding is masked or overwritten before it is valid), nor do decode rows, and the sampler of a
  row uses that row's logits, history and generator only. Hence the invariant the tests check: a
  request's tokens are the same alone, admitted with others, or joining a running batch at any step
  (a padded row takes the float-mask path instead of SDPA's is_causal: logits equal to rounding).
- Errors stay per request: should a batched stage call fail, the batch's requests are prefilled
  again one by one; the first whose own call fails gets an "error" event and its slot back, the
  exception leaves step() (its events come with the next step), those after it wait in the queue.
  If each runs alone, the batch's error is a RuntimeWarning (a batching fault, seen, not hidden).
- The pool's size comes from a memory budget (`kv_cache_gib`), not max_batch x context.
- Beam search stays beside the engine (vlmrt/beam.py on the lock-step loop).
"""

from __future__ import annotations

import itertools
import time
import warnings
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from vlmrt.config import GenerationConfig
from vlmrt.errors import VlmrtError
from vlmrt.engine_batch import capability, encode_requests, pad_prompts, runs
from vlmrt.generate import RowText, byte_piece_ids, prompt_positions, sample_next_token, split_embedded
from vlmrt.kv_cache import default_kv_budget, slot_bytes, slots_for_budget


WARMUP_PROMPT = "Describe this image."  # the warm-up probe's question (about the bundled photo, 2 tokens)


@dataclass(frozen=True)
class EngineOptions:
    """Size of the engine's KV pool."""

    kv_cache_gib: float | None = None  # the pool's budget (None: kv_cache.default_kv_budget)
    max_slots: int = 32  # requests decoded together at most; more wait in the queue
    max_seq: int | None = None  # positions per slot (None: the model's context)
    max_prefills: int = 4  # requests admitted (prefilled) per step at most: a burst of arrivals waits a
    # step or two instead of stalling every running row for all its prefills at once


@dataclass
class Request:
    """One request: a prompt about an image, with its own settings.

    Args:
        prompt: the question (the family's template is applied), or a `Conversation`.
        image: a path or PIL image, or a list of them: several images in one prompt (up to the
            family's `ProcessorSpec.max_images`), in the turns the Conversation's `image_turns` name.
        config: sampling, stops and max tokens (None: the engine's default, the model's stops).
        inputs: the processor's batch of this one request, already made (input_ids [1,L], pixels,
            ...: what `Processor([image], [prompt])` gives, or a cut of it); `prompt` and `image`
            are then not processed again (None: they are).
    """

    prompt: str
    image: object = None
    config: GenerationConfig | None = None
    inputs: dict | None = None


@dataclass
class Event:
    """What one step did for one request."""

    request_id: int
    token_ids: list[int]  # tokens sampled in this step
    text: str  # newly final text of the answer
    finished: str | None = None  # "stop", "length" or "abort" on the request's last event
    time: float = 0.0  # perf_counter when the event was made
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the request's config asks (`logprobs`)


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability under the distribution the model produced (log_softmax of
    the raw logits: before repetition penalty, temperature, top-k and top-p, as vLLM's default
    "raw_logprobs"), and the `GenerationConfig.logprobs` most likely tokens of that distribution."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), the most likely first


@dataclass
class _State:
    """A request inside the engine."""

    id: int
    config: GenerationConfig
    batch: dict  # the processor's one-row batch (on the device)
    length: int  # prompt tokens
    row: RowText
    generator: torch.Generator | None
    history: torch.Tensor  # [1,N] sampled ids
    notes: list[str] = field(default_factory=list)
    slot: int = -1
    used: int = 0  # cache positions written (prompt + fed tokens)
    position: int = 0  # next position id to feed
    added: float = 0.0
    first_token: float | None = None
    finished_at: float = 0.0  # time of its latest event (Pipeline's clock)


class Engine:
    """Continuous batching over a runtime that executes engine steps (see `StepInputs`).

    Example:
        >>> engine = Engine(pipe.runtime, pipe.processor, pipe.generation_config())
        >>> rid = engine.add(Request("Describe this image.", "photo.jpg"))
        >>> while engine.has_work():
        ...     for ev in engine.step():
        ...         print(ev.request_id, ev.text, ev.finished)
    """

    def __init__(self, runtime, processor, default_config: GenerationConfig, options: EngineOptions | None = None):
        """Args:
            runtime: a runtime with `allocate_slots` and `run_step` (vlmrt/runtimes/eager.py).
            processor: the model's `Processor`.
            default_config: settings of a request that brings none (with the model's stops).
            options: the KV pool's size.
        """
        if not hasattr(runtime, "run_step"):
            raise VlmrtError(f"the {runtime.name} runtime does not run engine steps yet; use --runtime eager")
        self.runtime, self.processor, self.default_config = runtime, processor, default_config
        self.options = o = options or EngineOptions()
        m = runtime.model
        self.max_seq = min(o.max_seq or m.max_context, m.max_context)
        per_slot = slot_bytes(m.num_layers, m.num_kv_heads, self.max_seq, m.head_dim, runtime.dtype)
        budget = default_kv_budget(runtime.device) if o.kv_cache_gib is None else int(o.kv_cache_gib * (1 << 30))
        slots = slots_for_budget(budget, per_slot, o.max_slots)
        if o.kv_cache_gib is None:
            slots = max(slots, 1)  # the default budget never refuses a model outright: one request at a time
        if slots < 1:
            raise VlmrtError(f"a KV cache budget of {budget / (1 << 30):.3g} GiB holds no request of {self.max_seq} "
                             f"positions ({per_slot / (1 << 30):.3g} GiB each); raise --kv-cache-gib or lower max_seq")
        with torch.inference_mode():  # every tensor of a step is an inference tensor (compiled guards see one kind)
            self.pool = runtime.allocate_slots(slots, self.max_seq)  # a runtime may hold fewer, or shorter, slots
            self.num_slots, self.max_seq = self.pool.num_slots, self.pool.max_seq
            self.mask = torch.zeros(self.num_slots, self.max_seq + 1, dtype=torch.long, device=runtime.device)  # [N,S+1]
        self.byte_ids = byte_piece_ids(processor.tokenizer)
        self.waiting: deque[_State] = deque()
        self.running: dict[int, _State] = {}  # slot -> state
        self.pending: list[Event] = []  # abort events for the next step
        self._live: dict[int, _State] = {}  # id -> state, until it finishes
        self.timers = {"vision_s": 0.0, "prefill_s": 0.0, "decode_s": 0.0, "decode_steps": 0}
        self._ids = itertools.count()
        if hasattr(runtime, "warmup"):
            self._warm_up()

    # ------------------------------------------------------------------ the public verbs
    def add(self, request: Request) -> int:
        """Queue a request; return its id. A prompt that does not fit the context is refused here
        (VlmrtError); an answer that would not fit is cut, with a note (`notes(id)`)."""
        cfg = request.config or self.default_config
        if cfg.num_beams > 1:
            raise VlmrtError("the engine does not run beam search; use generate() (vlmrt.beam) for num_beams > 1")
        batch = request.inputs if request.inputs is not None else self.processor([request.image], [request.prompt])
        if batch["input_ids"].shape[0] != 1:
            raise VlmrtError(f"a request's inputs hold one row; got {batch['input_ids'].shape[0]} (one Request per row)")
        device = self.runtime.device
        batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
        length = batch["input_ids"].shape[1]
        notes = self._fit(batch, length, cfg)
        if notes:
            cfg = replace(cfg, max_new_tokens=self.max_seq - length)
        rid = next(self._ids)
        gen = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.do_sample else None
        row = RowText(self.processor.tokenizer, cfg, True, self.byte_ids)  # events carry text
        s = _State(rid, cfg, batch, length, row, gen, torch.zeros(1, cfg.max_new_tokens, dtype=torch.long, device=device),
                   notes, added=time.perf_counter())
        self.waiting.append(s)
        self._live[rid] = s
        return rid

    def step(self) -> list[Event]:
        """Admit waiting requests (prefill), decode every running one by a token; return the events."""
        events, self.pending = self.pending, []
        try:
            self._admit(events)
        except Exception:  # a request's stage failed (it alone: see _admit): this step's events come next step
            self.pending = events + self.pending
            raise
        if self.running:
            self._decode(events)
        return events

    def abort(self, request_id: int) -> bool:
        """Stop a request and free its slot now (its "abort" event comes with the next step). An
        unknown or finished id is a no-op (False)."""
        s = self._live.get(request_id)
        if s is None:
            return False
        if s.slot < 0:
            self.waiting.remove(s)
        self._finish(s, "abort", self.pending)
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.pending)

    def notes(self, request_id: int) -> list[str]:
        s = self._live.get(request_id)
        return list(s.notes) if s else []

    def prompt_tokens(self, request_id: int) -> int:
        """The prompt length of a live request, image tokens included (0 once it finished)."""
        s = self._live.get(request_id)
        return s.length if s else 0

    def run(self, requests: list[Request], on_event=None) -> list[_State]:
        """Add `requests` and step until they are all finished; return their states in order (tokens
        in `.row.tokens`, answer in `.row.text`, reason in `.row.finished`). For batch callers:
        requests already in the engine keep running alongside."""
        states = [self._live[self.add(r)] for r in requests]
        mine = {s.id for s in states}
        while any(s.row.finished is None for s in states):
            for ev in self.step():
                if on_event is not None and ev.request_id in mine:
                    on_event(ev)
        return states

    def _warm_up(self) -> None:
        """A compiled runtime builds every graph at start-up, none while serving: a probe request
        (the bundled photo) compiles vision and prefill with the family's real input kinds, then
        the runtime's warmup() the decode graph of every bucket."""
        probe = Path(__file__).parent / "assets" / "astronaut.jpg"
        self.run([Request(WARMUP_PROMPT, probe, replace(self.default_config, max_new_tokens=2))])
        with torch.inference_mode():
            self.runtime.warmup()
        self.timers = dict.fromkeys(self.timers, 0)

    # ------------------------------------------------------------------ admission and prefill
    def _fit(self, batch: dict, length: int, cfg: GenerationConfig) -> list[str]:
        ctx = self.max_seq
        if length >= ctx:
            images = int((batch["input_ids"] == self.processor.spec.image_token_id).sum())  # slices included
            raise VlmrtError(f"the prompt is {length} tokens ({images} of them image tokens) and the model's context "
                             f"is {ctx}; shorten the prompt")
        if length + cfg.max_new_tokens > ctx:
            return [f"max_new_tokens cut from {cfg.max_new_tokens} to {ctx - length} to fit the context of {ctx}"]
        return []

    def _admit(self, events: list[Event]) -> None:
        """Pop waiting requests into free slots (the lowest first: a contiguous run, since running
        rows are [0, n)) and prefill them together (`_prefill`). Should a stage fail for the batch,
        each of its requests is prefilled again alone (`_prefill_alone`), so that only a request
        whose own stage fails fails."""
        free = [r for r in range(self.num_slots) if r not in self.running][:max(self.options.max_prefills, 1)]
        group: list[_State] = []
        while self.waiting and len(group) < len(free):
            s = self.waiting.popleft()
            s.slot = free[len(group)]
            self.running[s.slot] = s
            group.append(s)
        if len(group) == 1:
            self._prefill_alone(group, events)
        elif group:
            try:
                picks = self._prefill(group)
            except Exception as e:  # the batch's calls failed: find the request that fails alone
                self._prefill_alone(group, events)
                warnings.warn(f"engine: {len(group)} requests admitted together failed as a batch ({type(e).__name__}: "
                              f"{e}) but each ran alone; they were prefilled one by one", RuntimeWarning, stacklevel=2)
                return
            self._accept_first(group, picks, events)

    def _prefill_alone(self, group: list[_State], events: list[Event]) -> None:
        """Prefill the requests of `group` one by one. The first whose stage fails fails alone: an
        "error" event, its slot freed, the exception raised (out of step(); this step's events
        come with the next one); the requests after it go back to the front of the queue."""
        for i, s in enumerate(group):
            try:
                picks = self._prefill([s])
            except Exception:
                for later in reversed(group[i + 1:]):  # not prefilled: back to the queue, before a compaction
                    del self.running[later.slot]
                    later.slot = -1
                    self.waiting.appendleft(later)
                self._finish(s, "error", events)
                raise
            self._accept_first([s], picks, events)

    @torch.inference_mode()
    def _prefill(self, group: list[_State]) -> list[tuple[int, TokenLogprob | None]]:
        """The vision stage over every image of `group` (vlmrt/engine_batch.py), then one prefill
        call per contiguous run of their slots (at most the runtime's `prefill_rows` rows); returns
        each request's first token (and its logprob when asked), accepted by the caller."""
        rt = self.runtime
        t0 = time.perf_counter()
        features = encode_requests(rt, [s.batch for s in group])
        rt.synchronize()
        t1 = time.perf_counter()
        logits: list[torch.Tensor] = [None] * len(group)  # [1,V] per request
        for run in runs([s.slot for s in group], capability(rt, "prefill_rows")):
            out = rt.run_step(self._prefill_inputs([group[i] for i in run], [features[i] for i in run]))  # [n,V]
            for j, i in enumerate(run):
                logits[i] = out[j:j + 1].to(self.mask.device)
        picks = []
        for s, x in zip(group, logits):
            s.used = s.length
            token = sample_next_token(x, s.history[:, :0], s.config, s.generator)
            asked = s.config.logprobs
            picks.append((int(token[0]), None if asked is None else token_logprobs(x, token, [asked])[0]))
        rt.synchronize()
        t2 = time.perf_counter()
        self.timers["vision_s"] += t1 - t0
        self.timers["prefill_s"] += t2 - t1
        for s in group:
            s.first_token = t2
        return picks

    def _accept_first(self, group: list[_State], picks: list, events: list[Event]) -> None:
        """Every request's state is set (used, position) before any is accepted: a finish compacts rows."""
        for s, (token, logprob) in zip(group, picks):
            self._accept(s, [token], events, logprob)

    def _prefill_inputs(self, run: list[_State], features: list) -> StepInputs:
        """One prefill call over the consecutive slots of `run`: prompts right-padded to the longest,
        at positions 0..T-1 of their empty rows (see vlmrt/engine_batch.py)."""
        rt, device = self.runtime, self.mask.device
        embedded, positions = [], []
        for s, f in zip(run, features):
            embedded.append(split_embedded(rt.embed(s.batch["input_ids"], f)))  # [1,L,D], extras [...,1,L,D]
            p = prompt_positions(s.batch).to(device)  # [1,L] or [3,1,L]
            positions.append(p)
            s.position = int(p[..., -1].max()) + 1
            self.mask[s.slot].zero_()
            self.mask[s.slot, :s.length] = 1
        embeds, extras, positions = pad_prompts(embedded, positions)  # [n,T,D], {[...,n,T,D]}, [n,T] / [3,n,T]
        (n, t), lengths = embeds.shape[:2], [s.length for s in run]
        a = run[0].slot
        return StepInputs(a, a + n, embeds, positions, torch.arange(t, device=device).repeat(n, 1), self.mask[a:a + n],
                          torch.tensor(lengths, device=device) - 1, extras, t,
                          causal_prefill=min(lengths) == t)  # no row padded: plain causal attention

    # ------------------------------------------------------------------ decode
    @torch.inference_mode()
    def _decode(self, events: list[Event]) -> None:
        t0 = time.perf_counter()
        rt, device = self.runtime, self.mask.device
        n = max(self.running) + 1  # rows [0, n) of the pool; free ones among them are padding
        tokens = torch.full((n,), self.processor.pad_token_id, dtype=torch.long)
        positions = torch.zeros(n, 1, dtype=torch.long)
        slots = torch.full((n, 1), self.max_seq, dtype=torch.long)  # padding rows: the scratch position
        for r, s in self.running.items():
            tokens[r], positions[r, 0], slots[r, 0] = s.row.tokens[-1], s.position, s.used
        slots, positions = slots.to(device), positions.to(device)
        rows = torch.tensor(sorted(self.running), device=device)
        self.mask[rows, slots[rows, 0]] = 1  # open each running row's new position
        embeds, _ = split_embedded(rt.embed(tokens[:, None].to(device), None))  # [n,1,D]
        window = max(s.used for s in self.running.values()) + 1  # key positions any row can see this step
        logits = rt.run_step(StepInputs(0, n, embeds, positions, slots, self.mask[:n], None, {}, window))  # [n,V]
        picks = self._sample(logits.to(device))
        asked = self._logprobs(logits.to(device), picks)
        rt.synchronize()
        self.timers["decode_s"] += time.perf_counter() - t0
        self.timers["decode_steps"] += 1
        rows = list(self.running.items())
        for _, s in rows:  # every row first: a finish below may move a row (compaction copies [:used])
            s.used += 1
            s.position += 1
        for r, s in rows:
            self._accept(s, [picks[r]], events, asked.get(r))

    def _sample(self, logits: torch.Tensor) -> dict[int, int]:
        """logits [n,V] -> slot -> token. Greedy rows without a penalty share one argmax; every other
        row samples alone with its own settings, history and generator."""
        plain = sorted(r for r, s in self.running.items() if not s.config.do_sample and s.config.repetition_penalty == 1.0)
        picks = {}
        if plain == list(range(logits.shape[0])):  # every row greedy (the common case): no copy of the logits
            picks = dict(enumerate(logits.argmax(-1).tolist()))
        elif plain:
            idx = torch.tensor(plain, device=logits.device)
            picks = dict(zip(plain, logits.index_select(0, idx).argmax(-1).tolist()))
        for r, s in self.running.items():
            if r not in picks:
                k = len(s.row.tokens)
                picks[r] = int(sample_next_token(logits[r:r + 1], s.history[:, :k], s.config, s.generator)[0])
        return picks

    def _logprobs(self, logits: torch.Tensor, picks: dict[int, int]) -> dict[int, TokenLogprob]:
        """logits [n,V] -> slot -> TokenLogprob, for the rows whose config asks only (none: no work)."""
        rows = [r for r, s in self.running.items() if s.config.logprobs is not None]
        if not rows:
            return {}
        tokens = torch.tensor([picks[r] for r in rows], device=logits.device)
        tops = [self.running[r].config.logprobs for r in rows]
        if rows != list(range(logits.shape[0])):  # some rows did not ask: theirs are left out, not computed
            logits = logits.index_select(0, torch.tensor(rows, device=logits.device))
        return dict(zip(rows, token_logprobs(logits, tokens, tops)))

    def _accept(self, s: _State, tokens: list[int], events: list[Event], logprob: TokenLogprob | None = None) -> None:
        """Push a sampled token: history, stops, max tokens; an event; free the slot on a finish."""
        k = len(s.row.tokens)
        s.history[0, k] = tokens[0]
        text = s.row.push(tokens[0])
        if s.row.finished is None and len(s.row.tokens) >= s.config.max_new_tokens:
            text += s.row.finish("length")
        events.append(Event(s.id, tokens, text, s.row.finished, time.perf_counter(),
                            None if logprob is None else [logprob]))
        if s.row.finished is not None:
            self._free(s)

    def _finish(self, s: _State, reason: str, events: list[Event]) -> None:
        text = s.row.finish(reason)
        events.append(Event(s.id, [], text, reason, time.perf_counter()))
        self._free(s)

    @torch.inference_mode()  # abort() comes from outside a step
    def _free(self, s: _State) -> None:
        if s.slot >= 0 and self.running.get(s.slot) is s:
            del self.running[s.slot]
            self.mask[s.slot].zero_()
            self._compact(s.slot)
        self._live.pop(s.id, None)

    @torch.inference_mode()
    def _compact(self, free: int) -> None:
        """Keep the running rows at slots [0, n): the highest running row moves into the freed slot
        (its written positions only, every layer), so a decode call never computes padding rows
        left behind by requests that finished early."""
        top = max(self.running, default=-1)
        if top <= free:
            return
        s = self.running.pop(top)
        used = s.used
        self.pool.move(top, free, used)  # [H_kv,used,hd] of every layer
        self.mask[free].copy_(self.mask[top])
        self.mask[top].zero_()
        s.slot = free
        self.running[free] = s


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, tops: list[int]) -> list[TokenLogprob]:
    """Log-probabilities of sampled tokens and of each row's most likely ones.

    Args:
        logits: [m,V] the raw logits of m rows (any float dtype; computed in fp32).
        tokens: [m] the token sampled in each row.
        tops: per row, how many of the most likely tokens to list (0: none).
    """
    x = logits.float()  # [m,V]
    lse = torch.logsumexp(x, dim=-1, keepdim=True)  # [m,1]: log_softmax(x) = x - lse, never built whole
    chosen = (x.gather(1, tokens.view(-1, 1).to(x.device)) - lse)[:, 0].tolist()  # [m]
    k = min(max(tops), x.shape[-1])
    values, ids = x.topk(k, dim=-1) if k else (x[:, :0], x[:, :0].long())  # [m,k]
    values, ids = (values - lse).tolist(), ids.tolist()
    return [TokenLogprob(int(t), c, tuple(zip(i[:n], v[:n])))
            for t, c, i, v, n in zip(tokens.tolist(), chosen, ids, values, tops)]


@dataclass
class StepInputs:
    """One decoder call of the engine, for a runtime's `run_step` (the per-row convention shared
    with exported graphs: every row its own write positions and position ids).

    ```
     rows          pool rows [start, stop) this call covers (n = stop - start)
     inputs_embeds [n,T,D]
     position_ids  [n,T] or [3,n,T] (M-RoPE)
     cache_position [n,T]   slot index of each token within its row's cache row
     attention_mask [n,S+1] valid key positions per row (the scratch position S never valid)
     logits_at     [n] or [1]: the position whose logits come back (None: T == 1)
     extras        named prefill inputs (SliMM's deepstack_embeds [K,n,T,D])
     window        key positions [0, window) hold every valid key of the call's rows (None:
                   unknown). A runtime may attend over a window of the pool that holds them (see
                   `attention_window`) instead of all S+1 positions; rows fed the scratch position
                   then write inside that window, at its last position (rows that are padding own
                   no valid key, so any position of theirs is scratch)
     causal_prefill the T tokens are each row's first, at positions 0..T-1, all valid: attention
                   is plain causal (SDPA's is_causal, vlmrt.models.layers.attention_bias)
    ```
    """

    start: int
    stop: int
    inputs_embeds: torch.Tensor
    position_ids: torch.Tensor
    cache_position: torch.Tensor
    attention_mask: torch.Tensor
    logits_at: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)
    window: int | None = None
    causal_prefill: bool = False


WINDOW_MULTIPLE = 64  # attention windows are multiples of this: few distinct shapes (compiled graphs)


def attention_window(step: StepInputs, scratch: int, multiple: int = WINDOW_MULTIPLE) -> tuple[int, torch.Tensor]:
    """The key positions a decode call attends over, and its write positions: `step.window` rounded up
    to `multiple` (the whole slot, scratch included, when that is not shorter or the window unknown).

    Returns (w, cache_position [n,T]): a padding row's scratch position moved to w - 1, so that every
    query still sees its own slot inside the window (a fully masked query would give NaN, and a NaN
    written to a key position poisons whoever later attends over it, even with weight 0).
    """
    w = scratch + 1 if step.window is None else min(-(-step.window // multiple) * multiple, scratch + 1)
    if w > scratch:
        return scratch + 1, step.cache_position
    cp = step.cache_position
    return w, torch.where(cp >= w, torch.full_like(cp, w - 1), cp)
