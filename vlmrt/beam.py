"""Beam search over the same stages and helpers as the greedy loop (vlmrt/generate.py).

The rules are Hugging Face transformers' `generate(num_beams=K, do_sample=False)` (read in its
`generation/utils.py` `_beam_search`, for the facts only): the same candidates, scores, finished
hypotheses and stopping, so the same token ids on the same logits.

```
 prefill B prompts (B cache rows) ─► logits [B,V] ─┐      step n (every beam of prompt b has n tokens)
                                                   ▼
   log_softmax (fp32) ─► repetition penalty (each beam's own tokens) ─► + beam score ─► [B, k*V]
   ─► top C candidates per prompt (C = (1 + stop sequences) * K, at least 2K), each = parent beam + token
        ├─ candidate ends a hypothesis (a stop token sequence, a stop string, or token N): if it is
        │  among the top K, it joins the prompt's K best finished hypotheses, scored
        │  sum log-p / (n+1) ** length_penalty
        └─ the K best candidates that did not end become the running beams
   ─► runtime.reorder(rows [B*K]: each new beam's parent cache row) ─► decode their tokens ─► step n+1
```

- One prefill per prompt, not per beam: the first step's parents are the B prefilled rows, so the
  first reorder fans each prompt out to its K cache rows (a copy; a VLM's prompt, image tokens and
  all, is long, and prefilling it K times would cost K times the compute).
- Hugging Face applies the repetition penalty to the log-softmax output (a processor on the scores
  of beam search), not to the logits as greedy decoding does; so does this loop.
- A prompt's search closes when it holds K finished hypotheses and the best running beam, scored at
  its current length, is no better than the worst of them (`early_stopping=False`, Hugging Face's
  default heuristic), or as soon as it holds K (`early_stopping=True`). A closed prompt's beams keep
  decoding (rows run in lock step) but change nothing; the loop ends when every prompt is closed or
  after N tokens, when the top K candidates all finish.
- Stop token sequences are checked on the device; stop strings on the host, in the text of each
  candidate's last few tokens (the parent beam's text held none). The answer is the best finished
  hypothesis, stop tokens included in its ids, its text cut by `RowText` as in the greedy loop.
- Beams cannot stream: a beam's text may be dropped later. With `on_text`, each row's final text is
  passed once, at the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from vlmrt.config import GenerationConfig
from vlmrt.errors import VlmrtError
from vlmrt.generate import (GenerationOutput, RowText, StageRunner, StreamCallback, _Steps, _timings,
                            apply_repetition_penalty, prefill, prompt_positions, vision_inputs)


@dataclass
class _Search:
    """The search state of B prompts, on the device (k: running beams per prompt, 1 before the
    first step, then K)."""

    tokens: torch.Tensor  # [B,k,N] running beams' tokens (the first n valid)
    scores: torch.Tensor  # [B,k] running beams' summed log-probabilities
    done_tokens: torch.Tensor  # [B,K,N] finished hypotheses, best first
    done_len: torch.Tensor  # [B,K] their lengths
    done_scores: torch.Tensor  # [B,K] their length-penalised scores (-inf: an empty slot)
    done_full: torch.Tensor  # [B,K] bool: the slot holds a hypothesis
    open: torch.Tensor  # [B] bool: the prompt's finished hypotheses may still change

    @classmethod
    def empty(cls, b: int, beams: int, n: int, device) -> "_Search":
        """Before the first step: one running beam per prompt (its prefilled cache row), no tokens."""
        return cls(tokens=torch.zeros(b, 1, n, dtype=torch.long, device=device),
                   scores=torch.zeros(b, 1, device=device),
                   done_tokens=torch.zeros(b, beams, n, dtype=torch.long, device=device),
                   done_len=torch.zeros(b, beams, dtype=torch.long, device=device),
                   done_scores=torch.full((b, beams), float("-inf"), device=device),
                   done_full=torch.zeros(b, beams, dtype=torch.bool, device=device),
                   open=torch.ones(b, dtype=torch.bool, device=device))


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t [B,k,...] at beams index [B,c] -> [B,c,...]."""
    return torch.take_along_dim(t, index.view(*index.shape, *[1] * (t.dim() - 2)), dim=1)


class _Stops:
    """Which candidates end a hypothesis: stop token sequences (device), stop strings (host)."""

    def __init__(self, cfg: GenerationConfig, tokenizer, device):
        self.sequences = [torch.tensor(s, device=device) for s in cfg.stop_token_ids if s]
        self.strings = [s for s in cfg.stop_strings if s]
        self.tokenizer = tokenizer
        # a match ending in the newest token lies in the last 4 tokens per character (byte-fallback
        # pieces), plus one token whose dropped leading space cannot matter
        self.window = 4 * max(map(len, self.strings), default=0) + 1

    def hits(self, cand: torch.Tensor, n: int) -> torch.Tensor:
        """cand [B,C,N] candidates with n+1 tokens -> [B,C] bool."""
        if n + 1 == cand.shape[2]:
            return torch.ones(cand.shape[:2], dtype=torch.bool, device=cand.device)  # the last token: all end
        hit = torch.zeros(cand.shape[:2], dtype=torch.bool, device=cand.device)
        for seq in self.sequences:
            if len(seq) <= n + 1:
                hit |= (cand[:, :, n + 1 - len(seq):n + 1] == seq).all(-1)
        if self.strings:
            tails = cand[:, :, max(0, n + 1 - self.window):n + 1].tolist()
            text = [[self.tokenizer.decode(t, skip_special_tokens=True) for t in row] for row in tails]
            found = [[any(s in x for s in self.strings) for x in row] for row in text]
            hit |= torch.tensor(found, device=cand.device)
        return hit


def _select(s: _Search, log_probs: torch.Tensor, n: int, cfg: GenerationConfig, stops: _Stops):
    """One step: log_probs [B,k,V] of the running beams (n tokens each) -> the K new running beams'
    parent cache rows [B*K] (into the current B*k rows) and newest tokens [B*K]; updates `s`."""
    b, k, v = log_probs.shape
    beams = cfg.num_beams
    total = (log_probs + s.scores[..., None]).view(b, k * v)  # [B,k*V]
    width = min(max(2, 1 + len(stops.sequences)) * beams, k * v)  # enough to keep K running beams
    values, index = total.topk(width, dim=1)  # [B,C], best first
    parent, token = index // v, index % v
    cand = _gather(s.tokens, parent)  # [B,C,N]
    cand[:, :, n] = token
    hits = stops.hits(cand, n)
    _keep_finished(s, cand, values, hits, n, cfg)
    running, keep = values.masked_fill(hits, float("-inf")).topk(beams, dim=1)  # [B,K]
    s.tokens, s.scores = _gather(cand, keep), running
    rows = (parent.gather(1, keep) + torch.arange(b, device=parent.device)[:, None] * k).flatten()
    best = running[:, 0] / (n + 1) ** cfg.length_penalty  # what the best running beam scores if it ends now
    full = s.done_full.all(dim=1)
    s.open &= ~(full & (best <= s.done_scores.min(dim=1).values))
    if cfg.early_stopping:
        s.open &= ~full
    return rows, token.gather(1, keep).flatten()


def _keep_finished(s: _Search, cand, values, hits, n: int, cfg: GenerationConfig) -> None:
    """Candidates among the top K that end join the K best finished hypotheses of open prompts."""
    beams = cfg.num_beams
    top = torch.arange(values.shape[1], device=values.device) < beams  # [C]
    ends = hits & top & s.open[:, None]  # [B,C]
    scores = (values / (n + 1) ** cfg.length_penalty).masked_fill(~ends, float("-inf"))
    merged = torch.cat([s.done_scores, scores], dim=1)  # [B,K+C]
    s.done_scores, pick = merged.topk(beams, dim=1)
    s.done_tokens = _gather(torch.cat([s.done_tokens, cand], dim=1), pick)
    s.done_len = torch.cat([s.done_len, torch.full_like(hits, n + 1, dtype=torch.long)], dim=1).gather(1, pick)
    s.done_full = torch.cat([s.done_full, ends], dim=1).gather(1, pick)


def _beam_steps(batch: dict, beams: int, n: int) -> _Steps:
    """The greedy loop's per-request buffers (mask, slots, positions) for every beam of every row."""
    rows = {"input_ids": batch["input_ids"].repeat_interleave(beams, dim=0),
            "attention_mask": batch["attention_mask"].repeat_interleave(beams, dim=0)}
    if batch.get("position_ids") is not None:  # [...,B,T]
        rows["position_ids"] = batch["position_ids"].repeat_interleave(beams, dim=-2)
    return _Steps(rows, n)


def _log_probs(logits: torch.Tensor, s: _Search, n: int, cfg: GenerationConfig, device) -> torch.Tensor:
    """logits [B*k,V] -> penalised log-probabilities [B,k,V] (fp32)."""
    b, k = s.scores.shape
    log_probs = torch.log_softmax(logits.to(device, torch.float32), dim=-1)
    log_probs = apply_repetition_penalty(log_probs, s.tokens.reshape(b * k, -1)[:, :n], cfg.repetition_penalty)
    return log_probs.view(b, k, -1)


def beam_search(runtime: StageRunner, batch: dict, cfg: GenerationConfig, tokenizer,
                on_text: StreamCallback | None = None) -> GenerationOutput:
    """Beam search for a left-padded batch; the arguments are `generate`'s (which calls this when
    cfg.num_beams > 1). The runtime needs `reorder(rows)`; each row's answer is its best finished
    hypothesis, passed to `on_text` once, at the end."""
    if not callable(getattr(runtime, "reorder", None)):
        raise VlmrtError(f"the {getattr(runtime, 'name', type(runtime).__name__)} runtime cannot reorder its KV "
                         "cache, which beam search needs; use num_beams=1 or the eager runtime")
    input_ids, device = batch["input_ids"], batch["input_ids"].device
    (b, t), beams, n_max = input_ids.shape, cfg.num_beams, cfg.max_new_tokens
    try:
        runtime.start(b * beams, t + n_max)
    except VlmrtError as e:  # the cache holds every beam: say so, or "batch of 9" puzzles a 3-image request
        raise VlmrtError(f"{e} (beam search keeps {b} prompt(s) x {beams} beams = {b * beams} cache rows)") from None
    steps, search = _beam_steps(batch, beams, n_max), _Search.empty(b, beams, n_max, device)
    stops = _Stops(cfg, tokenizer, device)

    start = time.perf_counter()
    pixels = batch.get("pixel_values")
    features = runtime.encode_images(pixels, **vision_inputs(batch)) if pixels is not None else None
    runtime.synchronize()
    t_vision = time.perf_counter()
    logits = prefill(runtime, runtime.embed(input_ids, features), steps.mask[::beams], prompt_positions(batch))
    rows, tokens = _select(search, _log_probs(logits, search, 0, cfg, device), 0, cfg, stops)
    runtime.synchronize()
    t_first = time.perf_counter()
    n = 1
    while n < n_max and bool(search.open.any()):
        runtime.reorder(rows)  # each new beam takes its parent's cache row
        logits = steps.feed(runtime, tokens, n)
        rows, tokens = _select(search, _log_probs(logits, search, n, cfg, device), n, cfg, stops)
        n += 1
    runtime.synchronize()
    t_end = time.perf_counter()
    return _answers(search, cfg, tokenizer, on_text, _timings(start, t_vision, t_first, t_end, n - 1))


def _answers(s: _Search, cfg: GenerationConfig, tokenizer, on_text, timings: dict) -> GenerationOutput:
    """Each row's best finished hypothesis (slot 0), its text and finish reason by `RowText`."""
    ids, texts, reasons = [], [], []
    for i, (tokens, length) in enumerate(zip(s.done_tokens[:, 0].tolist(), s.done_len[:, 0].tolist())):
        row = RowText(tokenizer, cfg, track=False)
        for token in tokens[:length]:
            row.push(token)
            if row.finished:
                break
        row.finish("length")
        ids.append(row.tokens)
        texts.append(row.text)
        reasons.append(row.finished)
        if on_text and row.text:
            on_text(i, row.text)
    return GenerationOutput(token_ids=ids, texts=texts, finish_reasons=reasons, timings=timings)
