"""The shared generation loop: prefill, decode one token, sample, stop. Runtimes only run stages.

```
 pixel_values ─► runtime.encode_images ─► image_features ─┐
 input_ids ───────────────────────────► runtime.embed ◄───┘
                                             │ inputs_embeds [B,T,D]
                     prefill: runtime.decode(all T tokens, slots 0..T-1) ─► logits[:, -1] ─► sample
                     decode:  runtime.decode(1 token, slot T+i) ─► logits ─► sample ─► ... until stop

 one decode step n on the device (inputs allocated once per request, no per-step host tensors):
   token n-1 [B] ─masked_fill(done, pad)─► embed ─► decode(slots[n-1:n], positions[n-1], mask) ─►
   sample(history[:, :n]) ─► token n ─► history[:, n] ─► host copy n (CUDA: pinned, non_blocking + event n)

 the host, with lookahead 1 (CUDA): step n+1 is launched before token n is read
   device  ...│ step n │ step n+1 │ step n+2 │...
   host     launch n+1 ─► wait event n ─► token n: stop ids, text, stream ─► launch n+2 ─► wait event n+1
```

Batches are left-padded: row b's real tokens end at slot T-1 for every row, so all rows decode in
lock step; a row that stops keeps receiving the pad token (its output is ignored) until every row
has stopped or `max_new_tokens` is reached. Position ids count real tokens only, so a padded row
sees the same positions it would see alone. With lookahead the host sees a stop one step late: the
row is fed its last token once more instead of the pad, and one step may run after every row has
stopped. Both outputs are dropped and rows never mix (attention and matmuls are per row; the
sampler draws the same random numbers whatever a row holds), so ids, texts and reasons are unchanged.
Text is decoded per token only for streaming or stop strings, then incrementally (see `RowText`).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from vlmrt.config import GenerationConfig
from vlmrt.errors import VlmrtError

StreamCallback = Callable[[int, str], None]  # (row, new text)


class StageRunner(Protocol):
    """What the loop needs from a runtime (see vlmrt/runtimes/)."""

    def encode_images(self, pixel_values, **vision_inputs): ...  # -> image_features, or a dict of named outputs
    def embed(self, input_ids: torch.Tensor, image_features): ...  # -> inputs_embeds, or a dict (see split_embedded)
    def start(self, batch_size: int, max_seq_len: int) -> None: ...
    def decode(self, inputs_embeds, position_ids, attention_mask, cache_position, **extras) -> torch.Tensor: ...
    def synchronize(self) -> None: ...


@dataclass
class GenerationOutput:
    token_ids: list[list[int]]  # generated ids per row, stop tokens included
    texts: list[str]  # decoded answers, cut before any stop string or stop token sequence
    finish_reasons: list[str]  # "stop" or "length"
    timings: dict = field(default_factory=dict)  # vision_ms, prefill_ms, ttft_ms, decode_ms, ms_per_token


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [B,V] fp32, history [B,n] ids already generated."""
    if penalty == 1.0 or history.shape[1] == 0:
        return logits
    scores = torch.gather(logits, 1, history)
    scores = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits.scatter(1, history, scores)


def sample_next_token(
    logits: torch.Tensor, history: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """logits [B,V] -> next token ids [B]. Greedy unless cfg.do_sample."""
    logits = apply_repetition_penalty(logits.float(), history, cfg.repetition_penalty)
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    logits = logits / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass strictly before each token
        sorted_logits = sorted_logits.masked_fill(before >= cfg.top_p, float("-inf"))  # keeps the top token
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def byte_piece_ids(tokenizer) -> frozenset[int]:
    """Ids after which decoded text may still change: SentencePiece byte-fallback pieces
    `<0x00>`..`<0xFF>` and, when there are any, the special tokens (skipped when decoding, so byte
    pieces on both sides join one run). Empty for other tokenizers."""
    if not hasattr(tokenizer, "convert_tokens_to_ids"):
        return frozenset()
    ids = set(tokenizer.convert_tokens_to_ids([f"<0x{b:02X}>" for b in range(256)]))
    ids -= {None, getattr(tokenizer, "unk_token_id", None)}  # pieces not in the vocabulary map to unk
    return frozenset(ids | set(getattr(tokenizer, "all_special_ids", ()))) if ids else frozenset()


class RowText:
    """One row's tokens, stops and text; yields only text that is final (for streaming).

    Incremental decoding (prefix / read offsets): tokens[:_read] are committed, their text is `text`.
    A push decodes the window tokens[_prefix:] and keeps what follows the window's decode of
    tokens[_prefix:_read]; both start at the same token, so what a decoder does at a sequence start
    (SentencePiece drops a leading space) cancels out. The window is committed only when its end is
    final: not an incomplete UTF-8 character (U+FFFD), not a byte-fallback piece (an invalid run of
    those decodes to U+FFFD as a whole), not a proper prefix of a stop token sequence. Work per token
    stays a few short decodes (for a local decoder: SentencePiece, byte-level BPE); the answer is one
    full decode. A suffix that may grow into a stop string is held back too, so a stream never shows
    a stop string nor takes text back. track=False: a push only checks stop token sequences.
    """

    def __init__(self, tokenizer, cfg: GenerationConfig, track: bool = True, byte_ids: frozenset | None = None):
        self.decode = functools.partial(tokenizer.decode, skip_special_tokens=True)
        self.stop_strings = [s for s in cfg.stop_strings if s]
        self.stop_ids = [tuple(s) for s in cfg.stop_token_ids if s]
        self.track = track or bool(self.stop_strings)
        if byte_ids is None:
            byte_ids = byte_piece_ids(tokenizer) if self.track else frozenset()
        self.byte_ids = byte_ids
        self.tokens: list[int] = []
        self.text = ""  # committed text while running; the answer once finished
        self.emitted = 0  # characters of `text` streamed so far
        self.finished: str | None = None  # finish reason once stopped
        self._prefix = self._read = 0  # window start; end of the committed tokens
        self._prefix_text = ""  # decode(tokens[_prefix:_read]) on its own
        self._tail = ""  # text of tokens[_read:] as the window decodes it (may still change)
        self._longest = max(map(len, self.stop_strings), default=0)

    def push(self, token: int) -> str:
        """Add a token; return the newly final text (empty while held back)."""
        self.tokens.append(token)
        held = self._check_stop_ids()
        if self.finished is None and self.track and self._advance(commit=held == 0):
            self._close("stop", len(self.tokens))
        return self._release(final=self.finished is not None)

    def finish(self, reason: str) -> str:
        if self.finished is None:
            self._close(reason, len(self.tokens))
        return self._release(final=True)

    def _check_stop_ids(self) -> int:
        """Close the row on a stop token sequence (the first listed wins); else return how many
        trailing tokens may still grow into one (their text is not committed yet)."""
        held = 0
        for seq in self.stop_ids:
            if tuple(self.tokens[-len(seq):]) == seq:
                self._close("stop", len(self.tokens) - len(seq))
                return 0
            for k in range(min(len(seq) - 1, len(self.tokens)), held, -1):
                if tuple(self.tokens[-k:]) == seq[:k]:
                    held = k
                    break
        return held

    def _advance(self, commit: bool) -> bool:
        """Decode the window, commit it if allowed and final; True when a stop string appeared (the
        text committed before this push was searched already: a new match ends after it)."""
        seen = len(self.text)
        self._tail = self.decode(self.tokens[self._prefix:])[len(self._prefix_text):]
        if commit and self._tail and not self._tail.endswith("\ufffd") and self.tokens[-1] not in self.byte_ids:
            self.text += self._tail
            self._prefix, self._read, self._tail = self._read, len(self.tokens), ""
            self._prefix_text = self.decode(self.tokens[self._prefix:self._read])
        recent = self.text[max(0, seen - self._longest + 1):] + self._tail
        return any(s in recent for s in self.stop_strings)

    def _close(self, reason: str, body: int) -> None:
        """Finish: the answer is one full decode of the first `body` tokens, cut before the first
        stop string (so it never depends on what the window saw)."""
        self.finished = reason
        text = self.decode(self.tokens[:body])
        cut = min((i for i in (text.find(s) for s in self.stop_strings) if i >= 0), default=-1)
        self.text = text[:cut] if cut >= 0 else text

    def _release(self, final: bool) -> str:
        safe = len(self.text)
        if not final:
            for s in self.stop_strings:  # hold back a suffix that may grow into a stop string
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if self.text.endswith(s[:k], 0, safe):
                        safe -= k
                        break
        if safe <= self.emitted:
            return ""
        piece, self.emitted = self.text[self.emitted:safe], safe
        return piece


def split_embedded(embedded) -> tuple[torch.Tensor, dict]:
    """The embedding stage returns inputs_embeds, or a dict with inputs_embeds plus named extras
    (e.g. SliMM's `deepstack_embeds`) that the decoder takes at prefill."""
    if isinstance(embedded, dict):
        extras = dict(embedded)
        return extras.pop("inputs_embeds"), extras
    return embedded, {}


def prefill(runtime: StageRunner, embedded, attention_mask_full, position_ids) -> torch.Tensor:
    """Run the prompt through the decoder; return the last token's logits [B,V]."""
    inputs_embeds, extras = split_embedded(embedded)
    cache_position = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
    logits = runtime.decode(inputs_embeds, position_ids, attention_mask_full, cache_position, **extras)
    return logits[:, -1]


def decode_one_token(runtime: StageRunner, tokens, position, attention_mask_full, slot) -> torch.Tensor:
    """Feed tokens [B] at cache slot `slot` (an int, or a [1] tensor on the device) with positions
    `position` [...,B]; return logits [B,V]."""
    embeds, _ = split_embedded(runtime.embed(tokens[:, None], None))  # [B,1,D]
    if not isinstance(slot, torch.Tensor):
        slot = torch.tensor([slot], device=tokens.device)
    return runtime.decode(embeds, position[..., None], attention_mask_full, slot)[:, -1]


def vision_inputs(batch: dict) -> dict:
    """Batch entries other than the standard ones go to the vision stage by name (e.g. image_grid_thw);
    `image_tokens` (several images of one prompt: the real features of each) is the engine's."""
    return {k: v for k, v in batch.items()
            if k not in ("input_ids", "attention_mask", "pixel_values", "position_ids", "image_tokens")}


def prompt_positions(batch: dict) -> torch.Tensor:
    """Prefill position ids: the processor's own (e.g. M-RoPE [3,B,T]) or a count of real tokens."""
    if batch.get("position_ids") is not None:
        return batch["position_ids"]
    return (batch["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)  # [B,T]


class _Steps:
    """One request's decode steps: device tensors allocated once (no per-step host tensors), and
    each step's tokens on their way to the host. CUDA: a non_blocking copy into pinned memory and an
    event, so reading token i waits for step i only; elsewhere the step has already run."""

    def __init__(self, batch: dict, n: int):
        (b, t), device = batch["input_ids"].shape, batch["input_ids"].device
        self.mask = torch.zeros(b, t + n, dtype=torch.long, device=device)  # [B,T+N]; step i opens slot T+i-1
        self.mask[:, :t] = batch["attention_mask"]
        self.history = torch.zeros(b, n, dtype=torch.long, device=device)  # [B,N] sampled ids
        self.slots = torch.arange(t, t + n, device=device)  # [N]: step i feeds slot T+i-1, a view of it
        positions = prompt_positions(batch)
        last = positions.amax(dim=tuple(range(positions.dim() - 2))) if positions.dim() > 2 else positions
        last = last[:, -1].expand(positions.shape[:-1])  # [...,B]: last prompt position per row
        ahead = torch.arange(1, n + 1, dtype=last.dtype, device=last.device).view(n, *[1] * last.dim())
        self.positions = last + ahead  # [N,...,B]: step i feeds positions[i-1]
        self.done = torch.zeros(b, dtype=torch.bool, device=device)  # rows seen to stop: fed the pad token
        self.host = torch.empty(n, b, dtype=torch.long, pin_memory=True) if device.type == "cuda" else None
        self.pending: dict[int, tuple] = {}

    def feed(self, runtime: StageRunner, tokens: torch.Tensor, i: int) -> torch.Tensor:
        """Step i (1..N-1): open slot T+i-1 and feed tokens [B] there at positions[i-1]; logits [B,V]."""
        self.mask[:, self.mask.shape[1] - self.history.shape[1] + i - 1] = 1
        return decode_one_token(runtime, tokens, self.positions[i - 1], self.mask, self.slots[i - 1:i])

    def run(self, runtime: StageRunner, token: torch.Tensor, i: int, cfg, generator) -> torch.Tensor:
        """Step i: feed token i-1 [B] (the pad token to rows seen to stop), sample token i [B]."""
        logits = self.feed(runtime, token.masked_fill(self.done, cfg.pad_token_id), i)
        token = sample_next_token(logits.to(token.device), self.history[:, :i], cfg, generator)
        self.history[:, i] = token
        return token

    def send(self, i: int, token: torch.Tensor) -> None:
        event = None
        if self.host is not None:
            event = torch.cuda.Event()
            token = self.host[i].copy_(token, non_blocking=True)
            event.record(torch.cuda.current_stream(self.history.device))
        self.pending[i] = (token, event)

    def receive(self, i: int) -> list[int]:
        token, event = self.pending.pop(i)
        if event is not None:
            event.synchronize()
        return token.tolist()


def forced_logits(runtime: StageRunner, batch: dict, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Teacher forcing with `generate`'s bookkeeping: logits [B,V] after the prompt, then after each
    prefix tokens[:, :i] (i = 1..N-1), feeding `tokens` [B,N] instead of the runtime's own picks.
    For comparing runtimes on the same history (bench agreement, eval parity)."""
    input_ids, n = batch["input_ids"], tokens.shape[1]
    runtime.start(input_ids.shape[0], input_ids.shape[1] + n)
    steps = _Steps(batch, n)
    pixels = batch.get("pixel_values")
    features = runtime.encode_images(pixels, **vision_inputs(batch)) if pixels is not None else None
    out = [prefill(runtime, runtime.embed(input_ids, features), steps.mask, prompt_positions(batch))]
    tokens = tokens.to(input_ids.device)
    for i in range(1, n):
        out.append(steps.feed(runtime, tokens[:, i - 1], i))
    return out


def generate(runtime: StageRunner, batch: dict, cfg: GenerationConfig, tokenizer,
             on_text: StreamCallback | None = None, lookahead: int | None = None) -> GenerationOutput:
    """Generate answers for a left-padded batch.

    Args:
        runtime: executes the stages (eager, compiled, onnx ...).
        batch: `input_ids` [B,T] with image placeholders, left-padded; `attention_mask` [B,T];
            `pixel_values` (None for text only); optional `position_ids` [...,B,T]; any other
            entries are passed to the vision stage by name.
        cfg: sampling and stopping.
        tokenizer: decodes ids (stop strings and streaming need text).
        on_text: called as on_text(row, text) with each newly final piece of a row's answer.
        lookahead: decode steps launched before the host reads a token. None: 1 on CUDA (the host
            handles token n while the device computes n+1), else 0 (nothing to overlap). Outputs
            never depend on it.

    With cfg.num_beams > 1 this is beam search (vlmrt/beam.py): no lookahead, and `on_text` gets each
    row's answer once, at the end.
    """
    if cfg.logprobs is not None:
        raise VlmrtError("generate() returns no token log-probabilities; run the request on the engine "
                         "(vlmrt.engine.Engine: its events carry them)")
    if cfg.num_beams > 1:
        from vlmrt.beam import beam_search  # it imports this module's helpers

        return beam_search(runtime, batch, cfg, tokenizer, on_text)
    input_ids, device = batch["input_ids"], batch["input_ids"].device
    b, t = input_ids.shape
    track = on_text is not None or any(cfg.stop_strings)
    byte_ids = byte_piece_ids(tokenizer) if track else frozenset()
    rows = [RowText(tokenizer, cfg, track, byte_ids) for _ in range(b)]
    generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.do_sample else None
    runtime.start(b, t + cfg.max_new_tokens)
    steps = _Steps(batch, cfg.max_new_tokens)

    start = time.perf_counter()
    pixels = batch.get("pixel_values")
    features = runtime.encode_images(pixels, **vision_inputs(batch)) if pixels is not None else None
    runtime.synchronize()
    t_vision = time.perf_counter()
    logits = prefill(runtime, runtime.embed(input_ids, features), steps.mask, prompt_positions(batch))
    token = sample_next_token(logits.to(device), steps.history[:, :0], cfg, generator)  # onnx answers on the CPU
    steps.history[:, 0] = token
    runtime.synchronize()
    t_first = time.perf_counter()
    ahead = (1 if device.type == "cuda" else 0) if lookahead is None else lookahead
    t_end = _decode_loop(runtime, steps, token, rows, cfg, generator, on_text, ahead)
    runtime.synchronize()
    for i, r in enumerate(rows):
        piece = r.finish("length")
        if piece and on_text:
            on_text(i, piece)
    token_ids = [r.tokens for r in rows]
    return GenerationOutput(token_ids=token_ids, texts=[r.text for r in rows],
                            finish_reasons=[r.finished or "length" for r in rows],
                            timings=_timings(start, t_vision, t_first, t_end, max(map(len, token_ids)) - 1))


def _timings(start: float, vision: float, first: float, end: float, steps: int) -> dict:
    """`decode_steps`: steps whose tokens are returned; `decode_ms` ends when the host read the last
    of them (a step lookahead launched after every row stopped runs behind that read on CUDA)."""
    decode_ms = (end - first) * 1e3
    return {"vision_ms": (vision - start) * 1e3, "prefill_ms": (first - vision) * 1e3, "ttft_ms": (first - start) * 1e3,
            "decode_ms": decode_ms, "decode_steps": steps, "ms_per_token": decode_ms / steps if steps else 0.0}


def _decode_loop(runtime, steps: _Steps, token, rows, cfg, generator, on_text, lookahead: int) -> float:
    """Launch steps and read tokens until every row has stopped or N tokens exist; return the clock
    when the host had read the last token it returns. Up to `lookahead` steps run ahead of the host,
    so a stop is seen late; tokens sampled after a row stopped are read and ignored."""
    if lookahead < 0:
        raise ValueError(f"lookahead must be >= 0, got {lookahead}")
    limit = steps.history.shape[1]
    steps.send(0, token)
    launched, read, t_end = 1, 0, None
    while True:
        if launched - read <= lookahead and launched < limit and not all(r.finished for r in rows):
            token = steps.run(runtime, token, launched, cfg, generator)
            steps.send(launched, token)
            launched += 1
        elif read < launched:
            _push_tokens(rows, steps.receive(read), on_text, steps.done)
            read += 1
            if t_end is None and (read == limit or all(r.finished for r in rows)):
                t_end = time.perf_counter()  # later reads are tokens nobody uses
        else:
            return t_end


def _push_tokens(rows: list[RowText], tokens: list[int], on_text: StreamCallback | None, done) -> None:
    for i, (row, tok) in enumerate(zip(rows, tokens)):
        if row.finished:
            continue
        piece = row.push(tok)
        if piece and on_text:
            on_text(i, piece)
        if row.finished:
            done[i] = True  # on the device: steps launched from now on feed this row the pad token
