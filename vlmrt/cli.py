"""The `vlmrt` command: a thin layer over the library. Each subcommand is a row in COMMANDS:
(help, function adding its arguments, function running it). Shared flags come from the groups in
vlmrt/options.py, so every subcommand spells a concept the same way.

Building the parser imports no torch (nor transformers or onnxruntime): `vlmrt --help`, `vlmrt CMD
--help` and `vlmrt models` answer at once; a command imports what it needs when it runs.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on a model hub: every file is local
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import json
import sys

from vlmrt import __version__
from vlmrt.errors import VlmrtError
from vlmrt.eval.commands import add_caption_args, add_eval_args, cmd_caption, cmd_eval
from vlmrt.options import (Parser, at_least, generation_args, in_range, int_list, model_args, non_negative_int,
                           note_renamed, parallel_args, positive_int, runtime_args, weight_args,
                           kv_cache_args)


def add_run_args(p: argparse.ArgumentParser) -> None:
    model_args(p)
    kv_cache_args(runtime_args(p))
    generation_args(p)
    weight_args(p)
    parallel_args(p)
    p.add_argument("--image", required=True, action="append", metavar="FILE", help="image file; repeat for a batch")
    p.add_argument("--prompt", required=True, action="append", metavar="TEXT", help="the question; one for all images or one per image")
    p.add_argument("--json", action="store_true", help="print one JSON object (answers, token ids, timings) instead of text")


def cmd_run(args) -> int:
    """Answer a question about an image, streaming the answer to stdout and timings to stderr."""
    from vlmrt.pipeline import Pipeline
    from vlmrt.processor import load_image

    prompts = args.prompt * len(args.image) if len(args.prompt) == 1 else args.prompt
    if len(prompts) != len(args.image):
        raise VlmrtError(f"{len(args.image)} images but {len(prompts)} prompts; give one prompt, or one per image")
    if not all(p.strip() for p in prompts):
        raise VlmrtError("the prompt is empty; pass a question, e.g. --prompt 'Describe this image.'")
    from vlmrt.quantize import weights_from_args

    weights = weights_from_args(args)
    images = [load_image(p) for p in args.image]  # fail on a bad image before loading a model
    pipe = Pipeline.load(args.model, runtime=args.runtime, device=args.device, dtype=args.dtype, seed=args.seed,
                         weights=weights, kv_cache_gib=args.kv_cache_gib)
    watch_compiles(pipe.runtime)
    print_notes(pipe.notes)  # the runtime that runs, when it is not the one asked for
    cfg = pipe.generation_config(
        max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0, temperature=args.temperature or 1.0,
        top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
        num_beams=args.num_beams,
    )
    stream = not args.json and len(args.image) == 1
    on_text = (lambda row, text: print(text, end="", flush=True)) if stream else None
    result = pipe(images, prompts, cfg, on_text=on_text)
    if stream:
        print(flush=True)  # end the streamed line before anything goes to stderr
    elif not args.json:
        for i, text in enumerate(result.texts):
            print(f"[{i}] {text}", flush=True)
    print_notes(result.notes + _synthetic_note(pipe.loaded))
    if args.json:
        print(json.dumps(_result_json(pipe, args, result), indent=2))
        return 0
    print(format_timings(result.timings, len(args.image)), file=sys.stderr)
    return 0


def print_notes(notes: list[str]) -> None:
    for note in notes:
        print(f"note: {note}", file=sys.stderr)


def watch_compiles(runtime) -> None:
    """One line on stderr while a stage compiles for a new shape, ended by how long it took."""
    if hasattr(runtime, "on_compile"):
        runtime.on_compile = compile_notice


def compile_notice(what: str):
    print(f"vlmrt: compiling {what} ...", end="", file=sys.stderr, flush=True)
    return lambda seconds: print(f" {seconds:.1f} s", file=sys.stderr, flush=True)


def _result_json(pipe, args, result) -> dict:
    return {
        "model": pipe.loaded.name,
        "family": pipe.loaded.family,
        "synthetic_weights": pipe.loaded.synthetic,
        "runtime": pipe.runtime.name,  # an export folder runs on onnx
        "device": args.device,
        "dtype": args.dtype,
        "weights": args.quantize or "fp",
        "prompt_tokens": result.prompt_tokens,
        "answers": [
            {"image": img, "text": t, "token_ids": ids, "finish_reason": r}
            for img, t, ids, r in zip(args.image, result.texts, result.token_ids, result.finish_reasons)
        ],
        "timings": result.timings,  # stage times; compile_ms (compiled runtime): first calls at new shapes, apart
        "notes": pipe.notes + result.notes,
    }


def format_timings(t: dict, batch: int) -> str:
    rows = [
        ("preprocess", f"{t['preprocess_ms']:.1f} ms"),
        ("vision", f"{t['vision_ms']:.1f} ms"),
        ("prefill", f"{t['prefill_ms']:.1f} ms"),
        ("first token", f"{t['ttft_ms']:.1f} ms (vision + prefill)"),
        ("decode", f"{t['ms_per_token']:.2f} ms/token x {t['decode_steps']} steps, batch {batch}"),
        ("throughput", f"{t['tokens_per_s']:.1f} tokens/s"),
    ]
    spent = t.get("compile_ms") or {}
    if spent.get("total"):
        parts = ", ".join(f"{stage} {ms:,.0f}" for stage, ms in spent.items() if stage != "total" and ms)
        rows.append(("compile", f"{spent['total']:,.0f} ms ({parts}): new shapes, not in the times above"))
    return "\n".join(["stage        time", "-----------  " + "-" * 30] + [f"{a:<11}  {b}" for a, b in rows])


def _synthetic_note(loaded) -> list[str]:
    if not loaded.synthetic:
        return []
    return [f"{loaded.name} runs on synthetic weights (seeded, no download): its text is meaningless, its timings are real"]


def add_models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def cmd_models(args) -> int:
    """List model families and presets (from the preset catalog: no model is built, torch is not imported)."""
    from vlmrt.catalog import read_catalog

    catalog = read_catalog()
    rows = catalog["presets"]
    if args.json:
        print(json.dumps(catalog, indent=2))
        return 0
    w = max(len(r["preset"]) for r in rows) + 2
    print(f"{'preset':<{w}}{'family':<10}{'params':>10}  {'llm layers x width':<20}{'context':>8}")
    for r in rows:
        print(f"{r['preset']:<{w}}{r['family']:<10}{r['params_b']:>9.3f}B  {r['llm']:<20}{r['context']:>8}")
    return 0


def add_export_args(p: argparse.ArgumentParser) -> None:
    model_args(p, dtypes=("fp32", "fp16"), device=False, required=False, sampling=False,
               model_help="a preset (see `vlmrt models`) or a release folder")
    p.add_argument("old_model", nargs="?", metavar="MODEL", help=argparse.SUPPRESS)  # the old spelling: export MODEL
    p.add_argument("--out", required=True, metavar="DIR", help="the export folder (absent or empty unless --force)")
    p.add_argument("--opset", type=at_least(7), default=17, metavar="N", help="ONNX opset (default 17)")
    p.add_argument("--force", action="store_true", help="overwrite an earlier export in a non-empty --out")
    p.add_argument("--format", default="onnx", choices=["onnx", "aoti", "paddle", "mindir", "stablehlo"],
                   help="onnx graphs (default), AOTInductor .pt2 packages, Paddle Inference model files, MindSpore MINDIR "
                        "graphs, or StableHLO (jax.export) artefacts per bucket")
    p.add_argument("--static-shapes", action="store_true", help="onnx: fixed shapes only, one graph per bucket (for Ascend ATC)")
    p.add_argument("--batch", metavar="B,B,...", help="--static-shapes or stablehlo: batch buckets, e.g. 1,4 (default 1)")
    p.add_argument("--seq", metavar="T,T,...", help="--static-shapes or stablehlo: sequence buckets, e.g. 128,512; the largest is the KV "
                                 "cache (default 512)")
    weight_args(p, threads=False)


def cmd_export(args) -> int:
    """Export a model's vision, embedding and decoder stages (ONNX graphs, AOTInductor packages,
    Paddle Inference model files, MINDIR graphs or StableHLO artefacts),
    with the tokenizer and a manifest; `vlmrt run --model DIR ...` then runs it with no model code.
    fp16 is for GPU providers (ONNX Runtime's CPU kernels are fp32)."""
    from vlmrt.export import export
    from vlmrt.progress import StepBar
    from vlmrt.quantize import weights_from_args

    if args.old_model:
        if args.model:
            raise VlmrtError(f"two models: --model {args.model} and {args.old_model}; give one, with --model")
        args.model = args.old_model
        note_renamed(args, "`vlmrt export MODEL`", "`vlmrt export --model MODEL`")
        print_notes(args.renamed[-1:])
    if not args.model:
        raise VlmrtError("no model to export; give one with --model PRESET_OR_FOLDER (see `vlmrt models`)")
    with StepBar(total=5, desc="export", log_prefix="vlmrt export") as bar:  # load, 3 stages, tokenizer + manifest
        m = export(args.model, args.out, dtype=args.dtype, opset=args.opset, force=args.force, seed=args.seed,
                   progress=bar.step, format=args.format, static_shapes=args.static_shapes, batch=args.batch, seq=args.seq,
                   weights=weights_from_args(args))
    files = [g.info.file for g in m.graphs] or [s.file for s in m.stages.values()]
    print(f"exported {m.name} ({m.family}, {m.dtype}, {m.weights} weights) to {args.out}: " + ", ".join(files))
    return 0


def add_serve_args(p: argparse.ArgumentParser) -> None:
    from vlmrt.serve_options import ServeOptions

    d = ServeOptions()
    model_args(p, sampling=False)  # each request seeds its own sampling
    kv_cache_args(runtime_args(p))
    weight_args(p)
    parallel_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", metavar="HOST",
                   help="interface to listen on (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=at_least(0, 65535), default=8000, metavar="PORT",
                   help="TCP port (default 8000; 0 picks a free one)")
    g.add_argument("--max-batch", type=positive_int, default=32, metavar="N",
                   help="most requests decoded together: the engine's KV slots (default 32; --kv-cache-gib may allow fewer)")
    g.add_argument("--max-queue", type=non_negative_int, default=d.max_queue, metavar="N",
                   help=f"most requests waiting for a slot; more are answered 503 with Retry-After (default {d.max_queue})")
    g.add_argument("--request-timeout", type=in_range(0.0, low_open=True), default=d.request_timeout_s, metavar="S",
                   help=f"seconds a request may take, queue included; then it stops with a 504 (default {d.request_timeout_s:g})")
    g.add_argument("--body-timeout", type=in_range(0.0, low_open=True), default=d.body_timeout_s, metavar="S",
                   help=f"seconds to receive a request body; a slow or short body gets a 408 (default {d.body_timeout_s:g})")
    g.add_argument("--max-body-mib", type=in_range(0.0, low_open=True), default=d.max_body_mib, metavar="MIB",
                   help=f"largest request body (default {d.max_body_mib:g})")
    g.add_argument("--api-key", default=os.environ.get("VLMRT_API_KEY", ""), metavar="KEY",
                   help="require `Authorization: Bearer KEY` on /v1/* (default: $VLMRT_API_KEY; none: no auth)")
    g.add_argument("--allowed-local-media-path", default="", metavar="DIR",
                   help="images may be files under DIR (file:// URLs or paths); default: data: URLs only")
    g.add_argument("--allowed-media-domains", nargs="+", default=[], metavar="HOST",
                   help="http(s) image URLs on these hosts (and their subdomains) are fetched; default: none (refused)")
    g.add_argument("--image-fetch-timeout", type=in_range(0.0, low_open=True), default=d.image_fetch_timeout_s,
                   metavar="S",
                   help=f"seconds an image fetch may take; its size limit is --max-body-mib (default {d.image_fetch_timeout_s:g})")
    g.add_argument("--image-cache-mib", type=in_range(0.0), default=d.image_cache_mib, metavar="MIB",
                   help=f"vision outputs kept for images asked again (default {d.image_cache_mib:g}; 0 = off)")


def cmd_serve(args) -> int:
    """Serve a model over HTTP: OpenAI-compatible POST /v1/chat/completions (multi-turn chats, `n`
    choices, images in any user message, up to the family's limit per request, or none; "stream": true
    for Server-Sent Events), GET /v1/models, GET /health, GET /metrics. Requests run on the engine: they
    join and leave the running batch at any step, and a client that disconnects frees its slot. Needs the
    serve extra. See docs/serve.md."""
    from vlmrt.engine import EngineOptions
    from vlmrt.models import load_model
    from vlmrt.pipeline import Pipeline
    from vlmrt.quantize import weights_from_args, with_weights
    from vlmrt.serve import CHAT_PATH, ServeOptions, make_server, require_serve_extra
    from vlmrt.tp.group import this_rank  # model-free: an export loads no model code

    require_serve_extra()
    options = ServeOptions(max_queue=args.max_queue, max_body_mib=args.max_body_mib, body_timeout_s=args.body_timeout,
                           request_timeout_s=args.request_timeout, api_key=args.api_key,
                           allowed_local_media_path=args.allowed_local_media_path, image_cache_mib=args.image_cache_mib,
                           allowed_media_domains=tuple(args.allowed_media_domains),
                           image_fetch_timeout_s=args.image_fetch_timeout)
    options.check()  # before a model load that may take minutes
    weights = weights_from_args(args)
    shard = this_rank(weights)  # in a tensor-parallel group: this rank's shard only
    loaded = with_weights(load_model(args.model, device=args.device, dtype=args.dtype, seed=args.seed, shard=shard), weights)
    runtime_options = {"max_batch": args.max_batch} if args.runtime == "compiled" else None
    pipe = Pipeline(loaded, args.runtime, runtime_options, EngineOptions(kv_cache_gib=args.kv_cache_gib))
    watch_compiles(pipe.runtime)
    print_notes(pipe.notes)
    server = make_server(pipe, args.host, args.port, options, args.max_batch)
    notes = "".join(f"; note: {n}" for n in _synthetic_note(loaded))
    auth = "" if options.api_key else "; no API key: anyone who reaches the port may use it"
    print(f"vlmrt: serving {server.model_name} ({pipe.runtime.name}, {loaded.device}) at {server.url}/v1 "
          f"(POST {CHAT_PATH}; Ctrl-C stops){auth}{notes}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    print("vlmrt: server stopped", file=sys.stderr)
    return 0


def add_bench_args(p: argparse.ArgumentParser) -> None:
    model_args(p, model_help="a preset (see `vlmrt models`) or a release folder", sampling=False)
    runtime_args(p, many=True, default="eager,compiled,hf",
                 extra_help="; also hf (transformers generate) and hf-compiled on the same weights; a vlmrt "
                            "runtime may name a weight format: eager:int8,onnx:int4-g64")
    generation_args(p, max_new_tokens=256, sampling=False, beams=False, tokens_help="tokens generated per row, stops ignored")
    weight_args(p)
    parallel_args(p, many=True)
    g = p.add_argument_group("sweep")
    g.add_argument("--batch", type=int_list, default=(1, 2, 4, 8, 10), metavar="B,B,...",
                   help="comma-separated batch sizes (default 1,2,4,8,10)")
    g.add_argument("--prompt-tokens", type=at_least(2), default=None, metavar="N",
                   help="text tokens per prompt, image tokens on top (default: the chat template with a short question)")
    g.add_argument("--repeats", type=positive_int, default=3, metavar="N", help="timed runs per runtime and batch; medians reported (default 3)")
    g.add_argument("--warmup", type=non_negative_int, default=1, metavar="N", help="discarded runs first; compile happens here (default 1)")
    g.add_argument("--no-agreement", action="store_true", help="skip the token comparison with eager fp32")
    g.add_argument("--one-at-a-time", action="store_true",
                   help="build, measure and free each runtime in turn: the memory of one runtime's copy of the "
                        "weights, not all of them (the timed runs are then not interleaved across runtimes)")
    g.add_argument("--profile", action="store_true",
                   help="profile one more pass per runtime and batch: device vs host time per decode step, "
                        "syncs, top ops, a Chrome trace per row (docs/bench.md)")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    s = p.add_argument_group("load scenario")
    s.add_argument("--scenario", default="batch", choices=["batch", "serve"],
                   help="batch (default): the per-batch-size table; serve: load on the engine vs one request at a "
                        "time (vlmrt/bench_serve.py, writes serve.json)")
    s.add_argument("--requests", type=positive_int, default=64, metavar="N", help="serve: requests in the load (default 64)")
    s.add_argument("--concurrency", type=positive_int, default=32, metavar="N", help="serve: clients sending requests (default 32)")
    s.add_argument("--rate", type=in_range(0.0, low_open=True), default=None, metavar="R",
                   help="serve: Poisson arrivals per second instead of clients")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder for results.json, results.csv, results.png (--scenario serve: serve.json)")


def cmd_bench(args) -> int:
    """Time runtimes (and Hugging Face generate on the same weights) per stage and batch size; or, with
    --scenario serve, a load on the engine against one request at a time."""
    from vlmrt.bench import BenchConfig, format_table, run_bench
    from vlmrt.quantize import weights_from_args

    weights_from_args(args)  # --threads, and a clear error for a bad --quantize before any work
    if args.scenario == "serve":
        return _serve_bench(args)
    tp = args.tp if isinstance(args.tp, int) else 1
    if tp > 1 or not isinstance(args.tp, int):
        args.runtime = _tp_runtimes(args)
    if not isinstance(args.tp, int):
        return _tp_sweep(args)
    cfg = BenchConfig(
        model=args.model, out=args.out, runtimes=args.runtime, batches=args.batch, new_tokens=args.max_new_tokens,
        prompt_tokens=args.prompt_tokens, dtype=args.dtype, device=args.device, repeats=args.repeats,
        warmup=args.warmup, seed=args.seed, agreement=not args.no_agreement, profile=args.profile,
        quantize=args.quantize, quantize_vision=args.quantize_vision, tp=tp,
        one_at_a_time=args.one_at_a_time,
    )
    result = run_bench(cfg, progress=not args.no_progress)
    print_notes(result["meta"]["notes"])
    print(format_table(result["rows"]))
    if cfg.profile:
        from vlmrt.profiling import format_profile

        print("\nper decode step (profiled pass):\n" + format_profile(result["rows"]))
    return 0


def _tp_runtimes(args) -> tuple[str, ...]:
    """The runtimes of a bench with --tp: eager (with a weight format or not) only."""
    runtimes = tuple(args.runtime)
    if runtimes == ("eager", "compiled", "hf"):  # the default: the one runtime tensor parallelism runs on
        return ("eager",)
    if any(r.partition(":")[0] != "eager" for r in runtimes):
        raise VlmrtError(f"--tp runs on the eager runtime only; give --runtime eager (or eager:int8), not {','.join(runtimes)}")
    return runtimes


def _tp_sweep(args) -> int:
    """--tp 1,2,...: each value as its own `vlmrt bench --tp N --out OUT/tp-N` (its own group of
    ranks), then every table; OUT/tp.json holds each run's rows and meta."""
    from pathlib import Path

    import subprocess

    runs = {}
    for n in args.tp:
        out = Path(args.out) / f"tp-{n}"
        print(f"vlmrt bench: --tp {n} -> {out}", file=sys.stderr, flush=True)
        again = [*args.argv, "--runtime", ",".join(args.runtime), "--tp", str(n), "--out", str(out)]  # the last one counts
        code = subprocess.run([sys.executable, "-m", "vlmrt", *again]).returncode
        if code:
            return code
        runs[n] = json.loads((out / "results.json").read_text())
    Path(args.out, "tp.json").write_text(json.dumps({str(n): r for n, r in runs.items()}, indent=1))
    return 0


def _serve_bench(args) -> int:
    from vlmrt.bench_serve import ServeBenchConfig, format_serve, run_serve_bench

    runtimes = list(args.runtime)
    default = runtimes == ["eager", "compiled", "hf"]
    if len(runtimes) > 1 and not default:
        raise VlmrtError("--scenario serve runs one runtime; give one --runtime (eager or compiled)")
    cfg = ServeBenchConfig(model=args.model, out=args.out, requests=args.requests, concurrency=args.concurrency,
                           rate=args.rate, runtime="eager" if default else runtimes[0], dtype=args.dtype,
                           device=args.device, seed=args.seed)
    print(format_serve(run_serve_bench(cfg)))
    return 0


COMMANDS = {
    "run": ("answer a question about an image", add_run_args, cmd_run),
    "models": ("list model families and presets", add_models_args, cmd_models),
    "caption": ("caption every image in a folder, resumably", add_caption_args, cmd_caption),
    "eval": ("fidelity checks: runtime parity, CLIP score", add_eval_args, cmd_eval),
    "export": ("export a model's stages (ONNX, AOTInductor, Paddle, MINDIR or StableHLO) plus a manifest", add_export_args, cmd_export),
    "bench": ("time runtimes per stage and batch size, against Hugging Face generate", add_bench_args, cmd_bench),
    "serve": ("serve a model over HTTP: OpenAI-compatible chat completions on the engine", add_serve_args, cmd_serve),
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="vlmrt",
        description="Run vision-language models fast, on interchangeable runtimes, and prove it.",
        epilog="Presets run on synthetic weights from a seed (no download): their text is meaningless, timings are real.",
    )
    parser.add_argument("--version", action="version", version=f"vlmrt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_args, func) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=func.__doc__)
        add_args(p)
        p.set_defaults(func=func)
    return parser


def run_command(args, argv: list[str]) -> int:
    """`args.func(args)`, or with --tp N (N > 1) the same as rank 0 of a tensor-parallel group."""
    args.argv = argv  # a --tp sweep runs the command again per value
    tp = getattr(args, "tp", 1)
    if isinstance(tp, tuple) and len(tp) == 1:  # bench: one value is a group like any other command's
        args.tp = tp = tp[0]
    if isinstance(tp, int) and tp > 1:
        from vlmrt.tp.launch import run_parallel

        return run_parallel(args, argv)
    return args.func(args)


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]); returns the exit code (2: bad input)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already reported in one line
        return e.code
    if os.environ.get("RANK", "0") == "0":  # a follower rank prints its errors only
        print_notes(getattr(args, "renamed", None) or [])
    try:
        code = run_command(args, sys.argv[1:] if argv is None else list(argv))
        sys.stdout.flush()  # a closed pipe shows here, inside the try, not in Python's exit-time flush
        return code
    except VlmrtError as e:
        print(f"vlmrt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlmrt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`vlmrt models --json | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
        return 141  # 128 + SIGPIPE, as a shell reports a command a closed pipe stopped


if __name__ == "__main__":
    sys.exit(main())
