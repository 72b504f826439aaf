"""Eager vs onnx on this machine's CPU, in one run: vision ms, prefill ms and decode ms/token.

The model is a real preset cut to fewer decoder layers so that it fits in memory (MiniGPT-4 7B in
fp32 needs ~30 GB): by default minigpt4-7b (EVA-ViT-g + Q-Former + Vicuna-7B widths: hidden 4096,
32 heads, 11008 MLP, vocabulary 32001) with 4 of its 32 decoder layers, synthetic weights, fp32,
batch 1, one image and the Vicuna template (~100 prompt tokens with the 32 image tokens).

Both runtimes run through the same generation loop (vlmrt.generate), so the figures include what a
user sees: embedding, decoder, sampling. One discarded warm-up each, then the median of --runs, the
runtimes taking turns so that both see the same load from other work on the machine (both are in
memory then, ~17 GB at 4 layers; --low-memory runs them one after the other instead).

    .venv/bin/python bench/onnx_cpu.py [--preset minigpt4-7b] [--layers 4] [--new-tokens 16] [--runs 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vlmrt.export import export_model, is_export_folder, load_export, read_manifest  # noqa: E402
from vlmrt.export.onnx import config_hash  # noqa: E402
from vlmrt.models import LoadedModel, family_class  # noqa: E402
from vlmrt.pipeline import Pipeline  # noqa: E402
from vlmrt.weights import build_on, init_synthetic  # noqa: E402

PHOTO = ROOT / "vlmrt" / "assets" / "astronaut.jpg"
PROMPT = "Describe this image in as much detail as you can, please."


def reduced_preset(family: str, preset: str, layers: int, seed: int = 0) -> LoadedModel:
    """`preset` with its decoder cut to `layers` layers, synthetic weights, fp32 on the CPU."""
    cls = family_class(family)
    cfg = cls.presets[preset]
    cfg = replace(cfg, decoder=replace(cfg.decoder, num_layers=layers))
    model = build_on(torch.device("cpu"), torch.float32, lambda: cls(cfg))
    init_synthetic(model, seed)
    return LoadedModel(model.eval(), cls.synthetic_tokenizer(cfg), model.processor_spec, f"{preset}-{layers}layers",
                       family, True, cfg, torch.device("cpu"), torch.float32, seed=seed)


def measure(pipes: dict, new_tokens: int, runs: int) -> dict:
    """Medians over `runs` per runtime, after one warm-up each, exactly `new_tokens` tokens per run.

    The runtimes take turns (eager, onnx, eager, onnx, ...) so that both see the same load from
    other work on the machine.
    """
    done: dict = {name: [] for name in pipes}
    for i in range(runs + 1):
        for name, pipe in pipes.items():
            cfg = replace(pipe.generation_config(max_new_tokens=new_tokens), stop_strings=(), stop_token_ids=())
            result = pipe([PHOTO], [PROMPT], cfg)
            if i:  # run 0 is the warm-up (allocations, ORT's first-run setup)
                done[name].append(result)
    out = {}
    for name, results in done.items():
        med = lambda k: statistics.median(r.timings[k] for r in results)
        out[name] = {"vision_ms": med("vision_ms"), "prefill_ms": med("prefill_ms"),
                     "decode_ms_per_token": med("ms_per_token"), "prompt_tokens": results[0].prompt_tokens,
                     "load_avg_1min": os.getloadavg()[0], "tokens": results[0].token_ids[0]}
    return out


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="minigpt4")
    ap.add_argument("--preset", default="minigpt4-7b")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers kept (default 4)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=None, help="export folder (default: a temporary one, removed after)")
    ap.add_argument("--reuse", action="store_true", help="reuse the export in --out if it is of this model")
    ap.add_argument("--low-memory", action="store_true", help="hold one runtime at a time (no interleaving)")
    ap.add_argument("--onnx-threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    args = ap.parse_args()
    threads = torch.get_num_threads()
    print(f"{args.preset} with {args.layers} decoder layers, fp32, batch 1, {args.new_tokens} new tokens, "
          f"median of {args.runs}; torch threads {threads}, onnx threads {args.onnx_threads or 'all cores'}", flush=True)

    loaded = reduced_preset(args.family, args.preset, args.layers)
    n_params = sum(p.numel() for p in loaded.model.parameters())
    tmp = tempfile.TemporaryDirectory(prefix="vlmrt-bench-") if args.out is None else None
    out = Path(args.out or tmp.name)
    t0 = time.perf_counter()
    if not (args.reuse and is_export_folder(out) and read_manifest(out).config_hash == config_hash(loaded)):
        export_model(loaded, out, force=True)
    export_s = time.perf_counter() - t0
    if args.low_memory:  # one runtime in memory at a time: eager first, then onnx
        eager = measure({"eager": Pipeline(loaded, "eager")}, args.new_tokens, args.runs)["eager"]
        del loaded
        gc.collect()
        onnx = measure({"onnx": Pipeline(load_export(out), "onnx", {"threads": args.onnx_threads})}, args.new_tokens, args.runs)["onnx"]
    else:
        pipes = {"eager": Pipeline(loaded, "eager"), "onnx": Pipeline(load_export(out), "onnx", {"threads": args.onnx_threads})}
        both = measure(pipes, args.new_tokens, args.runs)
        eager, onnx = both["eager"], both["onnx"]
    report(args, eager, onnx, n_params, export_s)
    if tmp:
        tmp.cleanup()
    return 0


def report(args, eager: dict, onnx: dict, n_params: int, export_s: float) -> None:
    same = eager.pop("tokens") == onnx.pop("tokens")
    print(f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; params {n_params / 1e9:.2f} B; prompt {eager['prompt_tokens']} tokens; "
          f"export {export_s:.0f} s; greedy tokens identical: {same}; peak RSS {peak_rss_gib():.1f} GiB")
    print(f"{'':<22}{'eager':>10}{'onnx':>10}{'speed-up':>10}")
    for key, label in (("vision_ms", "vision ms"), ("prefill_ms", "prefill ms"), ("decode_ms_per_token", "decode ms/token")):
        print(f"{label:<22}{eager[key]:>10.1f}{onnx[key]:>10.1f}{eager[key] / onnx[key]:>9.2f}x")
    print(f"{'load average (1 min)':<22}{eager['load_avg_1min']:>10.2f}{onnx['load_avg_1min']:>10.2f}"
          "   (other work on the machine; 2 cores)")
    print(json.dumps({"preset": args.preset, "decoder_layers": args.layers, "eager": eager, "onnx": onnx,
                      "identical_tokens": same}))


if __name__ == "__main__":
    sys.exit(main())
