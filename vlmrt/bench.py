"""`vlmrt bench`: every runtime, every batch size, side by side with Hugging Face generate.

Follows gpt-fast's `generate.py::main` discipline: discarded warm-up runs (compile and graph
capture happen there, and are timed as warm-up), a device sync before every clock read, medians
of the timed runs, peak memory. Adds per-stage timings (preprocess, vision, prefill, time to first
token, decode) and machine-readable output.

```
 for batch in batches:  reference tokens: eager fp32 greedy (once per batch, untimed)
 for runtime in runtimes:                         for batch in batches:
     eager / compiled / onnx ... ─► vlmrt.generate.generate (the loop users run)
     hf / hf-compiled            ─► our vision + embedding ─► transformers LlamaForCausalLM.generate
                                    on the same weights (shared tensors, no copy)
     warm-up x W ─► timed x R ─► medians ─► teacher-forced agreement vs the reference
 ─► speed-ups vs hf and eager ─► results.json, results.csv, results.png, a table
```

Every run generates exactly `new_tokens` tokens per row (stop tokens and strings off; HF gets
`min_new_tokens = max_new_tokens` and no EOS), so runtimes do the same work.
"""

from __future__ import annotations

import csv
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from vlmrt.bench_weights import add_bandwidth_columns, bandwidth_probe, bytes_per_token, max_logit_error, split_label
from vlmrt.config import DTYPES, GenerationConfig, resolve_device
from vlmrt.errors import VlmrtError
from vlmrt.generate import forced_logits, generate
from vlmrt.models import load_model
from vlmrt.processor import Processor
from vlmrt.runtimes import RUNTIMES, build_runtime, runtime_class

HF_RUNTIMES = ("hf", "hf-compiled")  # transformers' own generate, dynamic cache / static cache (+ its auto-compile on CUDA)
IMAGE = Path(__file__).resolve().parent / "assets" / "astronaut.jpg"
TIMED = ("preprocess_ms", "vision_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token", "tokens_per_s", "e2e_ms")
COLUMNS = ("runtime", "weights", "batch", "prompt_tokens", "new_tokens", *TIMED, "peak_mem_mib", "warmup_s", "compile_s",
           "speedup_vs_hf", "speedup_vs_eager", "bytes_per_token", "effective_gb_s", "floor_fraction", "agreement",
           "max_logit_error", "first_divergence", "error")


@dataclass(frozen=True)
class BenchConfig:
    """What `vlmrt bench` measures (the CLI fills it; `run_bench` takes it)."""

    model: str
    out: str
    runtimes: tuple[str, ...] = ("eager", "compiled", "hf")
    batches: tuple[int, ...] = (1, 2, 4, 8, 10)
    new_tokens: int = 256
    prompt_tokens: int | None = None  # text tokens per prompt (image tokens on top); None: template + short question
    dtype: str = "fp32"
    device: str = "cpu"
    repeats: int = 3  # timed runs per (runtime, batch); medians are reported
    warmup: int = 1  # discarded runs before timing (compile and graph capture happen here)
    seed: int = 0
    agreement: bool = True  # compare tokens with eager fp32 greedy (skipped if an fp32 copy does not fit)
    runtime_options: dict = field(default_factory=dict, hash=False)  # runtime name -> constructor options
    profile: bool = False  # one more profiled pass per (runtime, batch): vlmrt/profiling.py
    quantize: str | None = None  # weight format of runtimes named without one (`eager:int8` names its own)
    quantize_vision: bool = False  # formats also cover the vision stage
    tp: int = 1  # tensor-parallel ranks of this run (vlmrt/tp; the eager runtime only)


def check_config(cfg: BenchConfig) -> None:
    """Raise VlmrtError for anything wrong before any work starts."""
    known = (*RUNTIMES, *HF_RUNTIMES)
    for label in cfg.runtimes:
        name, weights = split_label(label, default_weights(cfg))
        if name not in known:
            raise VlmrtError(f"unknown runtime {name!r} in --runtime; available: {', '.join(known)} "
                             "(each may name a weight format: eager:int8, onnx:int4)")
        if name in HF_RUNTIMES and not weights.is_fp:
            raise VlmrtError(f"{label}: the hf baselines run the model's own weights; drop the format (or --quantize)")
    if not cfg.runtimes or not cfg.batches:
        raise VlmrtError("give at least one runtime (--runtime) and one batch size (--batch)")
    if min(cfg.batches) < 1 or cfg.new_tokens < 2 or cfg.repeats < 1 or cfg.warmup < 0:
        raise VlmrtError("batch sizes and --repeats must be >= 1, --max-new-tokens >= 2, --warmup >= 0")
    if cfg.profile and cfg.new_tokens < 3:
        raise VlmrtError(f"--profile needs --max-new-tokens of at least 3 (2 are the baseline pass), got {cfg.new_tokens}")
    if cfg.dtype not in DTYPES:
        raise VlmrtError(f"unknown dtype {cfg.dtype!r}; choose one of {', '.join(DTYPES)}")
    resolve_device(cfg.device)  # a clear error for --device cuda without a GPU, before loading anything


def default_weights(cfg: BenchConfig):
    from vlmrt.quantize import parse_weights

    return parse_weights(cfg.quantize, cfg.quantize_vision)


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
    """A vlmrt runtime driven by the shared generation loop, exactly as Pipeline drives it."""

    def __init__(self, name: str, loaded, options: dict, parallel: bool = True):
        """Args: parallel: False: a single-device runtime even in a tensor-parallel group (the tp=1
        reference the agreement columns compare with)."""
        self.name, self.loaded = name, loaded
        self.runtime = build_runtime(name, loaded, **options) if parallel else runtime_class(name)(loaded, **options)

    def generate(self, batch: dict, new_tokens: int) -> tuple[dict, torch.Tensor]:
        """-> (timings in ms, tokens [B,N])."""
        cfg = GenerationConfig(max_new_tokens=new_tokens)  # no stop tokens or strings: N tokens per row
        out = generate(self.runtime, batch, cfg, self.loaded.tokenizer)
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


def fits_in_memory(model, device: torch.device, factor: float) -> bool:
    """Whether `factor` x this model's parameter bytes fit in the free memory of `device`."""
    need = factor * sum(p.numel() for p in model.parameters()) * 4  # as fp32
    if device.type == "cuda":
        return need < torch.cuda.mem_get_info(device)[0]
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return need < int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return True


# ----------------------------------------------------------------------------- the sweep
def _sized_options(name: str, batches: tuple[int, ...], max_seq: int) -> dict:
    """Constructor options that size a runtime to the sweep (graphs per measured batch size)."""
    if name == "compiled":
        return {"max_batch": max(batches), "max_seq": max_seq, "batch_buckets": tuple(sorted(batches))}
    return {}


def make_runner(label: str, cfg: BenchConfig, loaded, max_seq: int, pool: dict | None = None):
    """The runner of one --runtime label (a runtime name, optionally with a weight format)."""
    from vlmrt.quantize import loaded_for

    name, weights = split_label(label, default_weights(cfg))
    if name in HF_RUNTIMES:
        from vlmrt.bench_hf import HFRunner

        return HFRunner(name, loaded)
    options = {**_sized_options(name, cfg.batches, max_seq), **cfg.runtime_options.get(name, {})}
    runner = VlmrtRunner(name, loaded_for(loaded, name, weights, {} if pool is None else pool), options)
    runner.weights = weights.tag
    return runner


def _make_or_error(name: str, cfg: BenchConfig, loaded, max_seq: int, log, pool: dict):
    """The runner, or the VlmrtError that says why this runtime cannot run here (the sweep goes on)."""
    try:
        return make_runner(name, cfg, loaded, max_seq, pool)
    except VlmrtError as e:
        log(f"{name}: cannot run: {e}")
        return e


def reference_tokens(cfg: BenchConfig, loaded, processor, works: dict, log) -> tuple[dict | None, list[str]]:
    """Eager fp32 greedy tokens per batch size [B,N], the yardstick of `agreement`."""
    if not cfg.agreement:
        return None, ["agreement not measured (turned off)"]
    if loaded.model is None:
        return None, ["agreement not measured: an ONNX export has no eager model to compare with"]
    ref = loaded
    if loaded.dtype != torch.float32:
        if not fits_in_memory(loaded.model, loaded.device, 1.3):
            return None, ["agreement not measured: an fp32 copy of the model does not fit beside it"]
        log("loading an fp32 copy of the model for the reference tokens")
        ref = load_model(cfg.model, device=cfg.device, dtype="fp32", seed=cfg.seed)
    runner, refs = VlmrtRunner("eager", ref, {}, parallel=False), {}  # before any runner shards the model
    for b, work in works.items():
        log(f"reference: eager fp32 greedy, batch {b}")
        batch = preprocess(processor, work, loaded.device)[0]
        tokens = runner.generate(batch, cfg.new_tokens)[1]
        refs[b] = (tokens, runner.forced_logits(batch, tokens))  # [B,N], [B,N,V]
    del runner, ref
    _free_memory(loaded.device)
    return refs, []


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
    """None when fn ran; an error row when the runtime cannot run this batch here (VlmrtError)."""
    try:
        fn()
        return None
    except VlmrtError as e:
        log(f"{name} batch {len(work.prompts)}: cannot run: {e}")
        return _error_row(name, work, cfg, e)


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


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_bench(cfg: BenchConfig, log=None, progress: bool = False) -> dict:
    """Measure every runtime at every batch size; write results.json, results.csv and results.png
    into `cfg.out`; return {"meta": ..., "rows": [...]}.

    Args:
        cfg: what to measure (see BenchConfig).
        log: progress callback taking one line (default: stderr).
        progress: a progress bar over the sweep's runs on stderr (on a terminal).
    """
    from vlmrt.progress import StepBar

    check_config(cfg)
    runs = len(set(cfg.batches)) * len(dict.fromkeys(cfg.runtimes)) * (cfg.warmup + cfg.repeats)
    with StepBar(runs, "bench", "bench", show=progress) as bar:
        return _run_bench(cfg, log or bar.write, lambda n: bar.bar.update(n))


def _run_bench(cfg: BenchConfig, log, tick) -> dict:
    log(f"loading {cfg.model} ({cfg.dtype}, {cfg.device})")
    loaded = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed)
    processor = Processor(loaded.spec, loaded.tokenizer)
    question = build_prompt(processor, cfg.prompt_tokens)
    works = {b: make_workload(processor, b, question, cfg.prompt_tokens) for b in sorted(set(cfg.batches))}
    need = next(iter(works.values())).prompt_tokens + cfg.new_tokens
    if need > loaded.max_context:
        raise VlmrtError(f"prompt + --max-new-tokens is {need} tokens, above the model's context of "
                         f"{loaded.max_context}; lower --max-new-tokens or --prompt-tokens")
    refs, notes = reference_tokens(cfg, loaded, processor, works, log)
    max_seq = max(w.prompt_tokens for w in works.values()) + cfg.new_tokens
    pool: dict = {}  # quantized copies of the model, one per format (vlmrt.quantize.loaded_for)
    runners = {name: _make_or_error(name, cfg, loaded, max_seq, log, pool) for name in dict.fromkeys(cfg.runtimes)}
    rows = [r for b, w in works.items() for r in sweep_batch(runners, w, cfg, processor, loaded.device,
                                                             refs and refs[b], log, tick)]
    rows.sort(key=lambda r: list(runners).index(r["runtime"]))  # by runtime, then batch (stable)
    add_speedups(rows)
    gb_s = bandwidth_probe() if loaded.device.type == "cpu" else None  # after the sweep, in this process
    add_bandwidth_columns(rows, gb_s)
    result = {"meta": {**metadata(cfg, loaded, notes), "bandwidth_gb_s": gb_s}, "rows": rows}
    write_outputs(result, Path(cfg.out), log)
    return result


# ----------------------------------------------------------------------------- output
def metadata(cfg: BenchConfig, loaded, notes: list[str]) -> dict:
    import transformers

    if loaded.device.type == "cuda":
        machine = torch.cuda.get_device_name(loaded.device)
    else:
        machine = f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    if loaded.synthetic:
        notes = [*notes, f"{loaded.name} runs on synthetic weights: timings and agreement are real, the text is meaningless"]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine, "torch": torch.__version__, "transformers": transformers.__version__,
        "vlmrt_commit": commit, "model": loaded.name, "family": loaded.family, "synthetic_weights": loaded.synthetic,
        "config": {**asdict(cfg), "runtime_options": {k: dict(v) for k, v in cfg.runtime_options.items()}},
        "command": _command(), "notes": notes,
    }


def _command() -> str | None:
    """The command line, when this process is the `vlmrt` CLI."""
    prog = Path(sys.argv[0]).name if sys.argv else ""
    return "vlmrt " + " ".join(sys.argv[1:]) if prog in ("vlmrt", "__main__.py", "cli.py") else None


def write_outputs(result: dict, out: Path, log) -> None:
    """results.json, results.csv and (with matplotlib) results.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({c: r.get(c) for c in COLUMNS} for r in result["rows"])
    try:
        import matplotlib
    except ImportError:
        log("note: matplotlib is not installed, no results.png (pip install 'vlmrt[bench]')")
        return
    matplotlib.use("Agg")
    plot(result, out / "results.png")
    log(f"wrote {out / 'results.json'}, results.csv and results.png")


def plot(result: dict, path: Path) -> None:
    """Left: tokens/s vs batch size per runtime. Right: latency breakdown at the smallest batch."""
    import matplotlib.pyplot as plt

    fig = figure(result)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure(result: dict):
    """The results.png figure (a matplotlib Figure)."""
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["error"] is None]
    names = list(dict.fromkeys(r["runtime"] for r in rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in names:
        mine = sorted((r for r in rows if r["runtime"] == name), key=lambda r: r["batch"])
        left.plot([r["batch"] for r in mine], [r["tokens_per_s"] for r in mine], marker="o", label=name)
    left.set(xlabel="batch size", ylabel="tokens/s (generated)", title="throughput")
    left.set_xticks(sorted({r["batch"] for r in rows}))  # batch sizes are integers: ticks at the measured ones
    left.legend()
    b = min((r["batch"] for r in rows), default=1)
    at_b = [r for r in rows if r["batch"] == b]
    bottom = [0.0] * len(at_b)
    parts = (("preprocess", lambda r: r["preprocess_ms"]), ("vision", lambda r: r["vision_ms"]),
             ("prefill", lambda r: r["prefill_ms"]), ("decode", lambda r: r["e2e_ms"] - r["preprocess_ms"] - r["ttft_ms"]))
    for label, get in parts:
        values = [get(r) for r in at_b]
        right.bar([r["runtime"] for r in at_b], values, bottom=bottom, label=label)
        bottom = [x + y for x, y in zip(bottom, values)]
    right.set(ylabel="ms", title=f"end-to-end latency at batch {b}, {result['meta']['config']['new_tokens']} new tokens")
    right.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    meta = result["meta"]
    fig.suptitle(f"{meta['model']} {meta['config']['dtype']} on {meta['machine']}", fontsize=10)
    fig.tight_layout()
    return fig


def format_table(rows: list[dict]) -> str:
    """The results as a Markdown table (pastes into bench/RESULTS.md)."""
    head = ("runtime", "batch", "preproc ms", "vision ms", "prefill ms", "TTFT ms", "decode ms/tok", "tok/s",
            "e2e ms", "peak MiB", "warm-up s", "compile s", "x hf", "x eager", "GB/s", "of floor", "agree",
            "max logit err")
    keys = ("runtime", "batch", "preprocess_ms", "vision_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token",
            "tokens_per_s", "e2e_ms", "peak_mem_mib", "warmup_s", "compile_s", "speedup_vs_hf", "speedup_vs_eager",
            "effective_gb_s", "floor_fraction", "agreement", "max_logit_error")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["error"] is not None:
            lines.append(f"| {r['runtime']} | {r['batch']} | error: {r['error']} |")
            continue
        lines.append("| " + " | ".join(_cell(k, r.get(k)) for k in keys) + " |")
    return "\n".join(lines)


def _cell(key: str, v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str) or key == "batch":
        return str(v)
    if key.startswith("speedup"):
        return f"{v:.2f}x"
    if key in ("agreement", "floor_fraction"):
        return f"{100 * v:.1f}%"
    if key == "max_logit_error":
        return f"{v:.3g}"
    return f"{v:.2f}" if key == "decode_ms_per_token" else f"{v:.1f}"
