"""The shared generation loop: prefill, decode one token, sample, stop. Runtimes only run stages.

```
 pixel_values ─► runtime.encode_images ─► image_features ─┐
 input_ids ───────────────────────────► runtime.embed ◄───┘
                                             │ inputs_embeds [B,T,D]
                     prefill: runtime.decode(all T tokens, slots 0..T-1) ─► logits[:, -1] ─► sample
                     decode:  runtime.decode(1 token, slot T+i) ─► logits ─► sample ─► ... until stop
```

Batches are left-padded: row b's real tokens end at slot T-1 for every row, so all rows decode in
lock step; a row that stops keeps receiving the pad token (its output is ignored) until every row
has stopped or `max_new_tokens` is reached. Position ids count real tokens only, so a padded row
sees the same positions it would see alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from vlmrt.config import GenerationConfig

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


class RowText:
    """Decodes one row's tokens, finds stops, and yields only text that is final (for streaming).

    Text is held back while it ends in an incomplete UTF-8 character or in what could be the start
    of a stop string, so a streamed answer never shows a stop string and never has to take text back.
    """

    def __init__(self, tokenizer, cfg: GenerationConfig):
        self.tokenizer = tokenizer
        self.stop_strings = [s for s in cfg.stop_strings if s]
        self.stop_ids = [tuple(s) for s in cfg.stop_token_ids if s]
        self.tokens: list[int] = []
        self.text = ""
        self.emitted = 0
        self.finished: str | None = None  # finish reason once stopped

    def push(self, token: int) -> str:
        """Add a token; return the newly final text (empty while held back)."""
        self.tokens.append(token)
        body = self.tokens
        for seq in self.stop_ids:
            if tuple(self.tokens[-len(seq):]) == seq:
                body, self.finished = self.tokens[: -len(seq)], "stop"
                break
        self.text = self.tokenizer.decode(body, skip_special_tokens=True)
        cut = min((i for i in (self.text.find(s) for s in self.stop_strings) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.finished = self.text[:cut], "stop"
        return self._release(final=self.finished is not None)

    def finish(self, reason: str) -> str:
        if self.finished is None:
            self.finished = reason
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        safe = len(self.text)
        if not final:
            safe = len(self.text.rstrip("\ufffd"))
            for s in self.stop_strings:  # hold back a suffix that may grow into a stop string
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if self.text[:safe].endswith(s[:k]):
                        safe = min(safe, len(self.text[:safe]) - k)
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


def decode_one_token(runtime: StageRunner, tokens, position, attention_mask_full, slot: int) -> torch.Tensor:
    """Feed tokens [B] at cache slot `slot` with positions `position` [...,B]; return logits [B,V]."""
    embeds, _ = split_embedded(runtime.embed(tokens[:, None], None))  # [B,1,D]
    cache_position = torch.tensor([slot], device=tokens.device)
    return runtime.decode(embeds, position[..., None], attention_mask_full, cache_position)[:, -1]


def vision_inputs(batch: dict) -> dict:
    """Batch entries other than the standard ones go to the vision stage by name (e.g. image_grid_thw)."""
    return {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "pixel_values", "position_ids")}


def prompt_positions(batch: dict) -> torch.Tensor:
    """Prefill position ids: the processor's own (e.g. M-RoPE [3,B,T]) or a count of real tokens."""
    if batch.get("position_ids") is not None:
        return batch["position_ids"]
    return (batch["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)  # [B,T]


def generate(
    runtime: StageRunner,
    batch: dict,
    cfg: GenerationConfig,
    tokenizer,
    on_text: StreamCallback | None = None,
) -> GenerationOutput:
    """Generate answers for a left-padded batch.

    Args:
        runtime: executes the stages (eager, compiled, onnx ...).
        batch: `input_ids` [B,T] with image placeholders, left-padded; `attention_mask` [B,T];
            `pixel_values` (None for text only); optional `position_ids` [...,B,T]; any other
            entries are passed to the vision stage by name.
        cfg: sampling and stopping.
        tokenizer: decodes ids (stop strings and streaming need text).
        on_text: called as on_text(row, text) with each newly final piece of a row's answer.
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    b, t = input_ids.shape
    device = input_ids.device
    rows = [RowText(tokenizer, cfg) for _ in range(b)]
    generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.do_sample else None
    runtime.start(b, t + cfg.max_new_tokens)
    mask = torch.zeros(b, t + cfg.max_new_tokens, dtype=torch.long, device=device)
    mask[:, :t] = attention_mask
    history = torch.zeros(b, 0, dtype=torch.long, device=device)
    positions = prompt_positions(batch)
    position = positions.amax(dim=tuple(range(positions.dim() - 2))) if positions.dim() > 2 else positions
    position = position[:, -1].expand(positions.shape[:-1])  # [...,B]: last prompt position per row

    start = time.perf_counter()
    pixels = batch.get("pixel_values")
    features = runtime.encode_images(pixels, **vision_inputs(batch)) if pixels is not None else None
    runtime.synchronize()
    t_vision = time.perf_counter()
    logits = prefill(runtime, runtime.embed(input_ids, features), mask, positions)
    token = sample_next_token(logits.to(device), history, cfg, generator)  # onnx answers on the CPU
    runtime.synchronize()
    t_first = time.perf_counter()
    steps = 0
    while True:
        history = torch.cat([history, token[:, None]], dim=1)
        _stream_step(rows, token.tolist(), on_text)
        if all(r.finished for r in rows) or history.shape[1] >= cfg.max_new_tokens:
            break
        fed = torch.where(_finished_mask(rows, device), torch.full_like(token, cfg.pad_token_id), token)
        slot = t + history.shape[1] - 1
        mask[:, slot] = 1
        position = position + 1
        logits = decode_one_token(runtime, fed, position, mask, slot)
        token = sample_next_token(logits.to(device), history, cfg, generator)
        steps += 1
    runtime.synchronize()
    t_end = time.perf_counter()
    for i, r in enumerate(rows):
        piece = r.finish("length")
        if piece and on_text:
            on_text(i, piece)
    timings = {
        "vision_ms": (t_vision - start) * 1e3,
        "prefill_ms": (t_first - t_vision) * 1e3,
        "ttft_ms": (t_first - start) * 1e3,
        "decode_ms": (t_end - t_first) * 1e3,
        "decode_steps": steps,
        "ms_per_token": (t_end - t_first) * 1e3 / steps if steps else 0.0,
    }
    return GenerationOutput(
        token_ids=[r.tokens for r in rows],
        texts=[r.text for r in rows],
        finish_reasons=[r.finished or "length" for r in rows],
        timings=timings,
    )


def _finished_mask(rows: list[RowText], device) -> torch.Tensor:
    return torch.tensor([r.finished is not None for r in rows], device=device)


def _stream_step(rows: list[RowText], tokens: list[int], on_text: StreamCallback | None) -> None:
    for i, (row, tok) in enumerate(zip(rows, tokens)):
        if row.finished:
            continue
        piece = row.push(tok)
        if piece and on_text:
            on_text(i, piece)
