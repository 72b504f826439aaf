"""Tensor-level runtime parity: a runtime against a reference (eager fp32), stage by stage and step
by step, on the same inputs. Every runtime test and `vlmrt eval parity` use this one helper.

```
 batch (rows of different lengths, left-padded)
   reference: vision ─► features ─► embedding ─► embeds ─► prefill ─► logits[0], KV ─► step 1..N-1 ─► logits[i]
                │            │                      │                     (its own greedy tokens fed back)
   runtime:   vision         embedding(ids, ref features)   prefill(ref embeds)       steps fed the ref's tokens
                ▼            ▼                      ▼          ▼       ▼               ▼
             "vision"     "embedding"        "prefill_logits" "kv_prefill"  "decode_step_i" (i = 1..N-1)
   both:      generate() free-running, greedy, no stops ─► "tokens" (identical ids)
```

Each stage is fed the reference's inputs, so a check measures that stage's own error and the first
failing check names the stage at fault; decode steps run on the runtime's own cache (written by its
own prefill) and are fed the reference's tokens, so both answer the same question at every step.
The KV cache is compared at the valid slots only (attention_mask 1): what a runtime writes for left
padding is never read. Errors are `rel` = max |a - b| / max |reference| (fp32 default: 1e-4).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmrt.config import GenerationConfig
from vlmrt.errors import VlmrtError
from vlmrt.generate import _Steps, generate, prefill, prompt_positions, vision_inputs

RTOL = 1e-4  # fp32 relative error


def tensor_error(ref, other) -> dict:
    """max_abs, mean_abs and rel (max_abs over the reference's max magnitude) between two tensors,
    or between two dicts of named tensors (the worst entry counts)."""
    if isinstance(ref, dict):
        errs = [tensor_error(ref[k], other[k]) for k in ref if torch.is_tensor(ref[k])]
        return max(errs, key=lambda e: e["rel"])
    a, b = ref.detach().float().cpu(), torch.as_tensor(other).detach().float().cpu()
    if a.dim() == 3 and b.dim() == 3 and a.shape[1] != b.shape[1]:  # a decoder may return only the last position
        k = min(a.shape[1], b.shape[1])
        a, b = a[:, -k:], b[:, -k:]
    if a.shape != b.shape:
        raise VlmrtError(f"output shapes differ: reference {tuple(a.shape)}, other {tuple(b.shape)}")
    d = (a - b).abs()
    scale = a.abs().max().item() or 1.0
    return {"max_abs": d.max().item(), "mean_abs": d.mean().item(), "rel": d.max().item() / scale}


def first_mismatch(names, got, expected, rtol: float = RTOL) -> str | None:
    """The first named output of `got` whose error against `expected` (tensor_error's `rel`)
    exceeds rtol, as "name: rel 3.1e-03, max |diff| 2.0e-02" (or its two shapes); None if all match.

    The lowerings and compilers check their graphs against eager with it, by the parity checks' own
    measure: an elementwise tolerance (atol 1e-5) fails at 0.5B widths on fp32 sums taken in
    another order (|diff| ~1.6e-5 in a KV cache of values ~1), where a wrong op moves `rel` by
    orders of magnitude. NaN fails.
    """
    for name, a, b in zip(names, got, expected):
        if tuple(a.shape) != tuple(b.shape):
            return f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        e = tensor_error(b, a)
        if not e["rel"] <= rtol:
            return f"{name}: rel {e['rel']:.1e}, max |diff| {e['max_abs']:.1e}"
    return None


@dataclass(frozen=True)
class Check:
    name: str  # vision, embedding, prefill_logits, kv_prefill, decode_step_i, tokens
    max_abs: float
    mean_abs: float
    rel: float
    ok: bool


@dataclass
class ParityResult:
    checks: list[Check]
    ref_tokens: list[list[int]]  # free-running greedy ids per row
    tokens: list[list[int]]
    rtol: float = RTOL
    by_name: dict = field(init=False, repr=False)

    def __post_init__(self):
        self.by_name = {c.name: c for c in self.checks}

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[str]:
        return [c.name for c in self.checks if not c.ok]

    def stage_errors(self) -> dict:
        """Per stage: the worst error (decode steps pooled as `decode_logits`)."""
        out = {}
        for c in self.checks:
            if c.name == "tokens":
                continue
            key = "decode_logits" if c.name.startswith("decode_step_") else c.name
            prev = out.get(key)
            if prev is None or c.rel > prev["rel"]:
                out[key] = {"max_abs": c.max_abs, "mean_abs": c.mean_abs, "rel": c.rel}
        return out

    def summary(self) -> str:
        lines = [f"{'check':<16} {'max_abs':>10} {'rel':>10}  (rel <= {self.rtol:g})"]
        for c in self.checks:
            lines.append(f"{c.name:<16} {c.max_abs:>10.3e} {c.rel:>10.3e}  {'ok' if c.ok else 'FAIL'}")
        return "\n".join(lines)

    def assert_ok(self, what: str = "runtime") -> None:
        if not self.ok:
            raise AssertionError(f"{what} differs from the reference at {', '.join(self.failures)}\n{self.summary()}")


@dataclass
class _Trace:
    features: object  # image_features (or the family's dict of them); None for text only
    embedded: object  # inputs_embeds (or a dict with extras)
    logits: list[torch.Tensor]  # N x [B,V]: prefill's last position, then each decode step
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, valid slots only: [n_valid,H_kv,hd]
    tokens: torch.Tensor  # [B,N] the ids fed back (the reference's greedy picks)


def _valid_kv(runtime, layers: int, mask: torch.Tensor) -> list:
    """The cache after prefill at the prompt's valid slots: per layer (keys, values) [n_valid,H_kv,hd]."""
    b, t = mask.shape
    valid = mask.bool().cpu()
    out = []
    for layer in range(layers):
        k, v = (x.detach().float().cpu()[:b, :, :t].transpose(1, 2)[valid] for x in runtime.kv(layer))
        out.append((k, v))
    return out


def _trace(runtime, batch: dict, n: int, layers: int, feed: _Trace | None = None) -> _Trace:
    """Run every stage of `runtime`; with `feed` (the reference's trace) each stage takes the
    reference's inputs and the decode steps take its tokens."""
    pixels = batch.get("pixel_values")
    features = runtime.encode_images(pixels, **vision_inputs(batch)) if pixels is not None else None
    embedded = runtime.embed(batch["input_ids"], feed.features if feed else features)
    b, t = batch["input_ids"].shape
    runtime.start(b, t + n)
    steps = _Steps(batch, n)
    logits = [prefill(runtime, feed.embedded if feed else embedded, steps.mask, prompt_positions(batch)).float().cpu()]
    kv = _valid_kv(runtime, layers, batch["attention_mask"])
    tokens = feed.tokens if feed else torch.zeros(b, n, dtype=torch.long)
    for i in range(1, n):
        if feed is None:
            tokens[:, i - 1] = logits[-1].argmax(-1)
        logits.append(steps.feed(runtime, tokens[:, i - 1].to(batch["input_ids"].device), i).float().cpu())
    runtime.synchronize()
    return _Trace(features, embedded, logits, kv, tokens)


def _check(name: str, ref, other, rtol: float) -> Check:
    e = tensor_error(ref, other)
    return Check(name, e["max_abs"], e["mean_abs"], e["rel"], e["rel"] <= rtol)


def _kv_check(ref: list, other: list, rtol: float) -> Check:
    errs = [tensor_error(a, b) for (ka, va), (kb, vb) in zip(ref, other) for a, b in ((ka, kb), (va, vb))]
    worst = max(errs, key=lambda e: e["rel"])
    return Check("kv_prefill", worst["max_abs"], worst["mean_abs"], worst["rel"], worst["rel"] <= rtol)


class Reference:
    """The reference's trace on one batch, computed once and compared with any number of runtimes.

    Args:
        runtime: the reference StageRunner (vlmrt/runtimes; eager fp32 as a rule); it needs `kv(layer)`.
        batch: a processor batch (several rows of different lengths, left-padded, is the useful case).
        tokenizer: for the free-running token check.
        steps: N, the logits compared: the prefill's last position plus N-1 decode steps.
        token_steps: new tokens of the free-running check (default: 2 x steps).
        num_layers: decoder layers (default: from the runtime's model or manifest).
        run_tokens: how the free-running tokens are made, run_tokens(runtime, batch, config) -> ids
            per row (default: the lock-step loop, `vlmrt.generate.generate`; `vlmrt eval parity`
            runs them on the engine).
    """

    def __init__(self, runtime, batch: dict, tokenizer, steps: int = 4, token_steps: int | None = None,
                 num_layers: int | None = None, run_tokens=None):
        if steps < 1:
            raise VlmrtError(f"steps must be at least 1, got {steps}")
        self.batch, self.tokenizer, self.steps = batch, tokenizer, steps
        self.layers = num_layers or _num_layers(runtime)
        self.cfg = GenerationConfig(max_new_tokens=token_steps or 2 * steps)  # greedy, no stops: every row runs N
        self.run_tokens = run_tokens  # None: the lock-step loop (a Reference stays picklable)
        self.trace = _trace(runtime, batch, steps, self.layers)
        self.token_ids = self._tokens(runtime)

    def _tokens(self, runtime) -> list:
        """The free-running greedy tokens of `runtime` on the batch."""
        if self.run_tokens is not None:
            return self.run_tokens(runtime, self.batch, self.cfg)
        return generate(runtime, self.batch, self.cfg, self.tokenizer).token_ids

    def compare(self, runtime, rtol: float = RTOL) -> ParityResult:
        """Run `runtime` on the same batch, each stage fed the reference's inputs; every check."""
        ref, out = self.trace, _trace(runtime, self.batch, self.steps, self.layers, feed=self.trace)
        checks = []
        if ref.features is not None:
            checks.append(_check("vision", ref.features, out.features, rtol))
        checks.append(_check("embedding", ref.embedded, out.embedded, rtol))
        checks.append(_check("prefill_logits", ref.logits[0], out.logits[0], rtol))
        checks.append(_kv_check(ref.kv, out.kv, rtol))
        for i in range(1, self.steps):
            checks.append(_check(f"decode_step_{i}", ref.logits[i], out.logits[i], rtol))
        ids = self._tokens(runtime)
        same = float(ids != self.token_ids)
        checks.append(Check("tokens", same, same, same, not same))
        return ParityResult(checks, self.token_ids, ids, rtol)


def runtime_parity(reference, runtime, batch: dict, tokenizer, steps: int = 4, rtol: float = RTOL,
                   token_steps: int | None = None) -> ParityResult:
    """`runtime` against `reference` on `batch`: `Reference(...).compare(runtime)` (see both)."""
    return Reference(reference, batch, tokenizer, steps, token_steps).compare(runtime, rtol)


def _num_layers(runtime) -> int:
    model = getattr(runtime, "model", None)
    if model is not None:
        return model.num_layers
    return runtime.manifest.num_layers
