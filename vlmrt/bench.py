"""`vlmrt bench`: every runtime, every batch size, side by side with Hugging Face generate.

Follows gpt-fast's `generate.py::main` discipline: discarded warm-up runs (compile and graph
capture happen there, and are timed as warm-up), a device sync before every clock read, medians
of the timed runs, peak memory. Adds per-stage timings (preprocess, vision, prefill, time to first
token, decode) and machine-readable output.

```
 for batch in batches:  reference tokens: eager fp32 greedy (once per batch, untimed)
 for runtime in runtimes:                         for batch in batches:
     eager / compiled / onnx ... ─► one engine request per row, as Pipeline runs them
                                    (vlmrt/bench_batch.py; no engine steps: vlmrt.generate.generate)
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
import ctypes
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from vlmrt.bench_batch import (COLUMNS, TIMED, VlmrtRunner, add_speedups, agreement,  # noqa: F401 (the batch table's API)
                               build_prompt, engine_options, failure_line, first_divergence, make_workload, preprocess,
                               probe_positions, sweep_batch)
from vlmrt.bench_weights import add_bandwidth_columns, bandwidth_probe, split_label
from vlmrt.config import DTYPES, resolve_device
from vlmrt.errors import VlmrtError
from vlmrt.models import load_model
from vlmrt.processor import Processor
from vlmrt.runtimes import RUNTIMES, load_frameworks

HF_RUNTIMES = ("hf", "hf-compiled")  # transformers' own generate, dynamic cache / static cache (+ its auto-compile on CUDA)


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
    one_at_a_time: bool = False  # build, measure and free each runtime in turn: one runtime's memory, not interleaved


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
    runner = VlmrtRunner(name, loaded_for(loaded, name, weights, {} if pool is None else pool), options,
                         engine_options(max(cfg.batches), max_seq))
    runner.weights = weights.tag
    return runner


def _make_or_error(name: str, cfg: BenchConfig, loaded, max_seq: int, log, pool: dict):
    """The runner, or the VlmrtError that says why this runtime cannot run here (the sweep goes on)."""
    try:
        return make_runner(name, cfg, loaded, max_seq, pool)
    except VlmrtError as e:
        log(f"{name}: cannot run: {e}")
        return VlmrtError(str(e))  # the message only: the traceback's frames hold what the runtime had built
    except Exception as e:  # noqa: BLE001 (a framework failing to build its graphs: a row, not the end of the sweep)
        log(f"{name}: failed to build: {type(e).__name__}: {e}")
        return VlmrtError(f"failed to build: {failure_line(e)}")


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
    runner, refs = VlmrtRunner("eager", ref, {}, engine_options(max(works)), parallel=False), {}  # before any runner shards the model
    for b, work in works.items():
        log(f"reference: eager fp32 greedy, batch {b}")
        batch = preprocess(processor, work, loaded.device)[0]
        tokens = runner.generate(batch, cfg.new_tokens)[1]
        refs[b] = (tokens, runner.forced_logits(batch, tokens))  # [B,N], [B,N,V]
    del runner, ref
    _free_memory(loaded.device)
    return refs, []


def _free_memory(device: torch.device) -> None:
    """Collect what was dropped and hand the freed heap back to the OS (glibc keeps it otherwise)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _rss_mib() -> float | None:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return None


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
    max_seq = max(max_seq, probe_positions(processor))  # a compiled engine's warm-up probe fits too
    names = list(dict.fromkeys(cfg.runtimes))
    load_frameworks([split_label(n, default_weights(cfg))[0] for n in names])
    pool: dict = {}  # quantized copies of the model, one per format (vlmrt.quantize.loaded_for)

    def sweep(runners: dict) -> list[dict]:
        return [r for b, w in works.items() for r in sweep_batch(runners, w, cfg, processor, loaded.device,
                                                                  refs and refs[b], log, tick)]

    if cfg.one_at_a_time:
        notes = [*notes, "runtimes measured one after another (--one-at-a-time), not interleaved"]
        rows = []
        for name in names:
            rows += sweep({name: _make_or_error(name, cfg, loaded, max_seq, log, pool)})
            _free_memory(loaded.device)  # this runtime's weights and graphs, before the next is built
            rss = _rss_mib()
            log(f"{name}: done and freed" + (f"; the process holds {rss:.0f} MiB" if rss else ""))
            _write_so_far(cfg, loaded, notes, rows, names)
    else:
        rows = sweep({name: _make_or_error(name, cfg, loaded, max_seq, log, pool) for name in names})
    rows.sort(key=lambda r: names.index(r["runtime"]))  # by runtime, then batch (stable)
    add_speedups(rows)
    gb_s = bandwidth_probe() if loaded.device.type == "cpu" else None  # after the sweep, in this process
    add_bandwidth_columns(rows, gb_s)
    result = {"meta": {**metadata(cfg, loaded, notes), "bandwidth_gb_s": gb_s, "complete": True}, "rows": rows}
    write_outputs(result, Path(cfg.out), log)
    return result


# ----------------------------------------------------------------------------- output
def _write_so_far(cfg: BenchConfig, loaded, notes: list[str], rows: list[dict], names: list[str]) -> None:
    """results.json with the rows measured so far (`meta.complete` false), so a process that dies in a
    later runtime (out of memory, killed) loses none of them; the final write replaces it."""
    done = sorted((dict(r) for r in rows), key=lambda r: names.index(r["runtime"]))
    add_speedups(done)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {**metadata(cfg, loaded, notes), "complete": False}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": done}, indent=2, default=str))


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
