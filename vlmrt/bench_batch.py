"""`vlmrt bench`'s batch table: every runtime at each batch size, B identical rows of N new tokens.

```
 Workload (B identical rows: no padding) ─► preprocess (timed) ─► batch [B,T]
   VlmrtRunner: one engine request per row (vlmrt.pipeline.run_on_engine, as Pipeline runs them),
                every row admitted in the first step; a runtime without engine steps: generate()
   HFRunner (vlmrt/bench_hf.py): transformers' generate on the same weights
 Timed: warm-up x W ─► timed x R ─► medians; teacher-forced agreement against the reference tokens
```
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING
from pathlib import Path

import torch

from vlmrt.bench_weights import bytes_per_token, max_logit_error
from vlmrt.config import GenerationConfig
from vlmrt.engine import EngineOptions, Request
from vlmrt.errors import VlmrtError
from vlmrt.generate import forced_logits, generate
from vlmrt.runtimes import build_runtime, runtime_class

if TYPE_CHECKING:
    from vlmrt.bench import BenchConfig

IMAGE = Path(__file__).resolve().parent / "assets" / "astronaut.jpg"
TIMED = ("preprocess_ms", "vision_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token", "tokens_per_s", "e2e_ms")
COLUMNS = ("runtime", "weights", "batch", "prompt_tokens", "new_tokens", *TIMED, "peak_mem_mib", "warmup_s", "compile_s",
           "speedup_vs_hf", "speedup_vs_eager", "bytes_per_token", "effective_gb_s", "floor_fraction", "agreement",
           "max_logit_error", "first_divergence", "error")


# ----------------------------------------------------------------------------- inputs
@dataclass
class Workload:
    """One batch of identical (image, question) rows; identical rows mean no padding, for every runtime."""

    images: list
    prompts: list[str]
    text_tokens: int | None  # --prompt-tokens: the processed prompt is cut to this many text tokens
    prompt_tokens: int  # per row as processed: text tokens plus the image tokens this image really takes


def build_prompt(processor, text_tokens: int | None) -> str:
    """A question long enough that the rendered prompt has at least `text_tokens` text tokens
    (`trim_text` then cuts it to exactly that many); the default question without --prompt-tokens."""
    question = "Describe this image in detail."
    if text_tokens is None:
        return question
    if text_tokens < 2:
        raise VlmrtError(f"--prompt-tokens must be at least 2, got {text_tokens}")
    image_id = processor.spec.image_token_id
    while sum(i != image_id for i in processor.prompt_ids(question)) < text_tokens:  # hooks only add markup
        question += " image"
    return question


def trim_text(batch: dict, image_id: int, text_tokens: int) -> dict:
    """Cut a processed batch of identical, unpadded rows to `text_tokens` text tokens, for timing at
    chosen shapes (the synthetic tokenizer makes templates longer than Llama's): the oldest text goes
    first, the first token (BOS), every image token and the end of the question stay. Position ids
    (M-RoPE's too) of the kept tokens move down by the number of tokens cut before them, as if the
    cut text had never been there; everything else (pixels, grids, slices) is untouched."""
    ids = batch["input_ids"][0]  # [T]
    text = (ids != image_id).nonzero().flatten()
    extra = len(text) - text_tokens
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[text[text > 0][:max(extra, 0)]] = False
    out = {**batch, "input_ids": batch["input_ids"][:, keep], "attention_mask": batch["attention_mask"][:, keep]}
    if batch.get("position_ids") is not None:  # [...,B,T]
        shift = (~keep).long().cumsum(0)  # tokens cut up to each index
        out["position_ids"] = batch["position_ids"][..., keep] - shift[keep]
    return out


def make_workload(processor, batch: int, question: str, text_tokens: int | None = None) -> Workload:
    row, _ = preprocess(processor, Workload([str(IMAGE)], [question], text_tokens, 0), torch.device("cpu"))
    return Workload([str(IMAGE)] * batch, [question] * batch, text_tokens, row["input_ids"].shape[1])


def preprocess(processor, work: Workload, device: torch.device) -> tuple[dict, float]:
    """Images and questions -> a batch on the device; returns (batch, ms)."""
    t0 = time.perf_counter()
    batch = processor(work.images, work.prompts)
    if work.text_tokens is not None:  # a prompt of the chosen length
        batch = trim_text(batch, processor.spec.image_token_id, work.text_tokens)
    batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batch, (time.perf_counter() - t0) * 1e3


# ----------------------------------------------------------------------------- runners
class VlmrtRunner:
    """A vlmrt runtime driven exactly as Pipeline drives it: one engine request per row
    (`vlmrt.pipeline.run_on_engine`); a runtime without engine steps runs the lock-step loop.

    Args:
        name: the runtime's name.
        loaded: the model.
        options: the runtime's constructor options.
        engine: the engine's options (None: `engine_options(32)`); the engine is made on the first
            `generate`, so a compiled runtime's warm-up counts as warm-up, not as a timed run.
        parallel: False: a single-device runtime even in a tensor-parallel group (the tp=1
            reference the agreement columns compare with).
    """

    def __init__(self, name: str, loaded, options: dict, engine: EngineOptions | None = None, parallel: bool = True):
        self.name, self.loaded = name, loaded
        self.runtime = build_runtime(name, loaded, **options) if parallel else runtime_class(name)(loaded, **options)
        self.engine_options = engine or engine_options(EngineOptions.max_slots)
        self._engine = None

    @property
    def on_engine(self) -> bool:
        return hasattr(self.runtime, "run_step")

    @property
    def engine(self):
        if self._engine is None:
            from vlmrt.engine import Engine

            self._engine = Engine(self.runtime, self.processor, GenerationConfig(), self.engine_options)
        return self._engine

    @property
    def processor(self):
        from vlmrt.processor import Processor

        return Processor(self.loaded.spec, self.loaded.tokenizer)

    def generate(self, batch: dict, new_tokens: int) -> tuple[dict, torch.Tensor]:
        """Batch [B,T] of identical rows -> (timings in ms, tokens [B,N])."""
        cfg = GenerationConfig(max_new_tokens=new_tokens)  # no stop tokens or strings: N tokens per row
        if not self.on_engine:
            out = generate(self.runtime, batch, cfg, self.loaded.tokenizer)
            return out.timings, torch.tensor(out.token_ids)
        from vlmrt.pipeline import run_on_engine

        b, engine = batch["input_ids"].shape[0], self.engine
        if b > engine.num_slots:  # its rows would queue: not a batch of b
            raise VlmrtError(f"batch of {b} is above the {self.name} runtime's cache maximum of {engine.num_slots} "
                             "rows decoded together (the engine's KV slots); lower --batch, or size the runtime "
                             "for it (vlmrt bench sizes it to the largest --batch)")
        out = run_on_engine(engine, [Request("", None, cfg, inputs=first_row(batch)) for _ in range(b)])
        return out.timings, torch.tensor(out.token_ids)

    def predict(self, batch: dict, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced greedy picks [B,N]: feed the reference tokens, take each step's argmax."""
        return teacher_forced(self.runtime, batch, tokens)

    def forced_logits(self, batch: dict, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [B,N,V] (fp32, CPU)."""
        with torch.inference_mode():
            return torch.stack([x.float().cpu() for x in forced_logits(self.runtime, batch, tokens)], dim=1)

    @property
    def compile_s(self):
        return getattr(self.runtime, "compile_s", None)


def engine_options(rows: int, max_seq: int | None = None) -> EngineOptions:
    """An engine that runs a batch of `rows` as the lock-step loop does: a slot per row and every row
    admitted (prefilled) in the first step, then decoded together."""
    return EngineOptions(max_slots=rows, max_seq=max_seq, max_prefills=rows)


def probe_positions(processor) -> int:
    """Cache positions the engine's warm-up probe (vlmrt.engine.Engine._warm_up: the bundled photo,
    its question, 2 tokens) needs, so that a runtime sized to short prompts can still warm up."""
    from vlmrt.engine import WARMUP_PROMPT

    return make_workload(processor, 1, WARMUP_PROMPT).prompt_tokens + 2


def first_row(batch: dict) -> dict:
    """The first row of a processor batch of identical rows, as the processor makes one row: tensors
    [B,...] -> [1,...], M-RoPE position_ids [3,B,T] -> [3,1,T], patch rows [N,P] with image_grid_thw
    [B,3] -> the first image's rows."""
    b, grid, out = batch["input_ids"].shape[0], batch.get("image_grid_thw"), {}
    for k, v in batch.items():
        if not torch.is_tensor(v):
            out[k] = v
        elif k == "position_ids" and v.dim() == 3:
            out[k] = v[:, :1]
        elif k == "pixel_values" and v.dim() == 2 and grid is not None:
            out[k] = v[:int(grid[0].prod())]
        elif v.dim() and v.shape[0] == b:
            out[k] = v[:1]
        else:
            raise VlmrtError(f"cannot take one row of the batch entry {k!r} of shape {tuple(v.shape)}")
    return out


def teacher_forced(runtime, batch: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Run the stages over prompt + `tokens` [B,N]; return the argmax after each prefix [B,N]."""
    with torch.inference_mode():
        picks = [logits.argmax(-1) for logits in forced_logits(runtime, batch, tokens)]
    return torch.stack(picks, dim=1).cpu()  # [B,N]


# ----------------------------------------------------------------------------- measuring
def reset_peak_memory(device: torch.device) -> None:
    """Start a peak-memory span: CUDA's max-allocated counter, or on CPU the process's peak RSS
    (VmHWM, which Linux resets when "5" is written to /proc/self/clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not allowed: the peak is then the process's lifetime peak
        pass


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 1024  # kB -> MiB
    except (OSError, IndexError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


class Timed:
    """One runtime at one batch size: its warm-up, its timed runs, its peak memory."""

    def __init__(self, runner, work: Workload):
        self.runner, self.work = runner, work
        self.runs: list[dict] = []
        self.peak_mib = 0.0
        self.warmup_s = self.compile_s = None
        self.tokens = self.batch = None

    def run(self, processor, cfg: BenchConfig, device: torch.device, timed: bool) -> None:
        reset_peak_memory(device)
        batch, pre_ms = preprocess(processor, self.work, device)
        timings, tokens = self.runner.generate(batch, cfg.new_tokens)
        self.peak_mib = max(self.peak_mib, peak_memory_mib(device))
        if timed:
            self.runs.append(_row_timings(timings, pre_ms, len(self.work.prompts), cfg.new_tokens))
            self.tokens, self.batch = tokens, batch

    def warm_up(self, processor, cfg: BenchConfig, device: torch.device) -> None:
        before, start = self.runner.compile_s, time.perf_counter()
        for _ in range(cfg.warmup):
            self.run(processor, cfg, device, timed=False)
        self.warmup_s = time.perf_counter() - start if cfg.warmup else None
        self.compile_s = None if before is None else self.runner.compile_s - before  # this batch's new shapes

    def row(self) -> dict:
        row = {k: statistics.median(r[k] for r in self.runs) for k in TIMED}
        return {**row, "peak_mem_mib": self.peak_mib, "warmup_s": self.warmup_s, "compile_s": self.compile_s}


def _row_timings(t: dict, preprocess_ms: float, batch: int, new_tokens: int) -> dict:
    generation_ms = t["ttft_ms"] + t["decode_ms"]  # tokens/s counts generation only; e2e adds preprocess
    return {"preprocess_ms": preprocess_ms, "vision_ms": t["vision_ms"], "prefill_ms": t["prefill_ms"],
            "ttft_ms": t["ttft_ms"], "decode_ms_per_token": t["ms_per_token"],
            "tokens_per_s": batch * new_tokens / (generation_ms / 1e3), "e2e_ms": preprocess_ms + generation_ms}


def agreement(picks: torch.Tensor, reference: torch.Tensor) -> float:
    """Fraction of steps whose teacher-forced greedy pick [B,N] equals the reference token [B,N]."""
    return float((picks == reference).float().mean())


def first_divergence(tokens: torch.Tensor, reference: torch.Tensor) -> int | None:
    """First step where free-running generation [B,N] leaves the reference [B,N] in any row (None: never)."""
    diff = (tokens != reference).any(dim=0).nonzero()
    return int(diff[0]) if len(diff) else None


def sweep_batch(runners: dict, work: Workload, cfg: BenchConfig, processor, device, ref, log,
                tick=lambda runs: None) -> list[dict]:
    """All runtimes at one batch size. Timed runs go round-robin over the runtimes, so a machine
    that gets busier or quieter meanwhile biases no runtime; each runtime warms up first.
    `tick(n)` is told of every n runs done (or skipped: a runtime that cannot run here)."""
    b, live, rows = len(work.prompts), {}, {}
    for name, runner in runners.items():
        if isinstance(runner, VlmrtError):
            rows[name] = _error_row(name, work, cfg, runner)
            tick(cfg.warmup + cfg.repeats)
            continue
        log(f"{name} batch {b}: warm-up x{cfg.warmup}")
        live[name] = Timed(runner, work)
        rows[name] = _attempt(lambda: live[name].warm_up(processor, cfg, device), name, work, cfg, log)
        tick(cfg.warmup if rows[name] is None else cfg.warmup + cfg.repeats)
    for i in range(cfg.repeats):
        log(f"batch {b}: run {i + 1}/{cfg.repeats} of {', '.join(n for n in live if rows[n] is None)}")
        for name, entry in live.items():
            if rows[name] is None:
                rows[name] = _attempt(lambda: entry.run(processor, cfg, device, timed=True), name, work, cfg, log)
                tick(1 if rows[name] is None else cfg.repeats - i)
    for name, entry in live.items():
        if rows[name] is None:
            rows[name] = _result_row(name, entry, cfg, ref)
            log(f"{name} batch {b}: {rows[name]['decode_ms_per_token']:.2f} ms/token, "
                f"{rows[name]['tokens_per_s']:.1f} tokens/s")
            if cfg.profile:
                rows[name]["profile"] = _profile(name, entry, cfg, device, log)
    return [rows[name] for name in runners]


def _profile(name: str, entry: Timed, cfg: BenchConfig, device, log) -> dict:
    from vlmrt.profiling import profile_generation

    b = len(entry.work.prompts)
    log(f"{name} batch {b}: profiling")
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    trace = Path(cfg.out) / f"trace-{name}-b{b}.json"
    return profile_generation(entry.runner, entry.batch, cfg.new_tokens, device, trace)


def _attempt(fn, name: str, work: Workload, cfg: BenchConfig, log) -> dict | None:
    """None when fn ran; an error row when the runtime cannot run this batch here (VlmrtError) or
    failed in its framework (any other exception: the row says which, the sweep goes on)."""
    try:
        fn()
        return None
    except VlmrtError as e:
        log(f"{name} batch {len(work.prompts)}: cannot run: {e}")
        return _error_row(name, work, cfg, e)
    except Exception as e:  # noqa: BLE001 (a framework's own error must not end the other runtimes' sweep)
        log(f"{name} batch {len(work.prompts)}: failed: {type(e).__name__}: {e}")
        return _error_row(name, work, cfg, VlmrtError(f"failed: {failure_line(e)}"))


def failure_line(e: BaseException) -> str:
    """An exception in one line for a table cell: its type and the last line of its message that
    says something (frameworks put their own error type and reason last, after a traceback)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip() and not line.strip().startswith("[")]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"[:300]


def _result_row(name: str, timed: Timed, cfg: BenchConfig, ref) -> dict:
    row = {"runtime": name, "batch": len(timed.work.prompts), "prompt_tokens": timed.work.prompt_tokens,
           "new_tokens": cfg.new_tokens, **timed.row(), "agreement": None, "first_divergence": None, "error": None}
    row["weights"] = getattr(timed.runner, "weights", "fp")
    row["bytes_per_token"] = bytes_per_token(timed.runner)
    if ref is not None:
        tokens, ref_logits = ref
        if hasattr(timed.runner, "forced_logits"):
            logits = timed.runner.forced_logits(timed.batch, tokens)  # [B,N,V]
            picks, row["max_logit_error"] = logits.argmax(-1), max_logit_error(logits, ref_logits)
        else:
            picks = timed.runner.predict(timed.batch, tokens)
        row["agreement"] = agreement(picks, tokens)
        row["first_divergence"] = first_divergence(timed.tokens, tokens)
    return row


def _error_row(name: str, work: Workload, cfg: BenchConfig, e: Exception) -> dict:
    return {**{c: None for c in COLUMNS}, "runtime": name, "batch": len(work.prompts),
            "prompt_tokens": work.prompt_tokens, "new_tokens": cfg.new_tokens, "error": str(e)}


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_X = end-to-end time of X / this runtime's, at the same batch size (same work)."""
    base = {(r["runtime"], r["batch"]): r["e2e_ms"] for r in rows if r["error"] is None}
    for r in rows:
        for other in ("hf", "eager"):
            theirs = base.get((other, r["batch"]))
            ok = r["error"] is None and theirs is not None
            r[f"speedup_vs_{other}"] = theirs / r["e2e_ms"] if ok else None
