"""The `vlmrt` command: a thin layer over the library. Each subcommand is a row in COMMANDS:
(help, function adding its arguments, function running it)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on a model hub: every file is local
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import json
import sys

from vlmrt.errors import VlmrtError
from vlmrt.bench import add_bench_args, cmd_bench
from vlmrt.eval.commands import add_caption_args, add_eval_args, cmd_caption, cmd_eval


def _common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a preset (see `vlmrt models`) or a folder with a release or an export")
    p.add_argument("--runtime", default="eager", help="eager (default), compiled or onnx (an export folder always runs on onnx)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="weights and activations (default fp32)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--seed", type=int, default=0, help="seed of synthetic weights and of sampling (default 0)")
    p.add_argument("--kv-cache-gib", type=float, default=None,
                   help="memory for the engine's KV cache slots, in GiB (default: half the free GPU memory; on a "
                        "CPU a tenth of the RAM, at most 4)")


def add_run_args(p: argparse.ArgumentParser) -> None:
    _common_model_args(p)
    p.add_argument("--image", required=True, action="append", help="image file; repeat for a batch")
    p.add_argument("--prompt", required=True, action="append", help="the question; one for all images or one per image")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1.0 = off)")
    p.add_argument("--num-beams", type=int, default=1,
                   help="beam search with K beams (1 = off, default; not with --temperature > 0); the answer "
                        "is printed once it is complete, not streamed")
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
    images = [load_image(p) for p in args.image]  # fail on a bad image before loading a model
    pipe = Pipeline.load(args.model, runtime=args.runtime, device=args.device, dtype=args.dtype, seed=args.seed,
                         kv_cache_gib=args.kv_cache_gib)
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
    for note in result.notes + _synthetic_note(pipe.loaded):
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps(_result_json(pipe, args, result), indent=2))
        return 0
    print(format_timings(result.timings, len(args.image)), file=sys.stderr)
    return 0


def _result_json(pipe, args, result) -> dict:
    return {
        "model": pipe.loaded.name,
        "family": pipe.loaded.family,
        "synthetic_weights": pipe.loaded.synthetic,
        "runtime": getattr(pipe.runtime, "name", args.runtime),  # an export folder runs on onnx
        "device": args.device,
        "dtype": args.dtype,
        "prompt_tokens": result.prompt_tokens,
        "answers": [
            {"image": img, "text": t, "token_ids": ids, "finish_reason": r}
            for img, t, ids, r in zip(args.image, result.texts, result.token_ids, result.finish_reasons)
        ],
        "timings": result.timings,
        "notes": result.notes,
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
    return "\n".join(["stage        time", "-----------  " + "-" * 30] + [f"{a:<11}  {b}" for a, b in rows])


def _synthetic_note(loaded) -> list[str]:
    if not loaded.synthetic:
        return []
    return [f"{loaded.name} runs on synthetic weights (seeded, no download): its text is meaningless, its timings are real"]


def add_models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def cmd_models(args) -> int:
    """List model families and presets."""
    from vlmrt.models import FAMILIES, all_presets, family_class

    rows = []
    for name, (family, cfg) in all_presets().items():
        with __import__("torch").device("meta"):
            n = sum(p.numel() for p in family_class(family)(cfg).parameters())
        d = cfg.decoder
        rows.append({"preset": name, "family": family, "params_b": round(n / 1e9, 3),
                     "llm": f"{d.num_layers}x{d.hidden_size}", "context": d.max_position_embeddings})
    if args.json:
        print(json.dumps({"families": list(FAMILIES), "presets": rows}, indent=2))
        return 0
    w = max(len(r["preset"]) for r in rows) + 2
    print(f"{'preset':<{w}}{'family':<10}{'params':>10}  {'llm layers x width':<20}{'context':>8}")
    for r in rows:
        print(f"{r['preset']:<{w}}{r['family']:<10}{r['params_b']:>9.3f}B  {r['llm']:<20}{r['context']:>8}")
    return 0


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a preset (see `vlmrt models`) or a release folder")
    p.add_argument("--out", required=True, help="the export folder (absent or empty unless --force)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"], help="weights and activations (default fp32; fp16 for GPU providers)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--force", action="store_true", help="overwrite an earlier export in a non-empty --out")
    p.add_argument("--seed", type=int, default=0, help="seed of synthetic weights (presets; default 0)")


def cmd_export(args) -> int:
    """Export a model's vision, embedding and decoder stages to ONNX graphs, with the tokenizer and a
    manifest; `vlmrt run --model OUT ...` then runs it on ONNX Runtime with no model code."""
    from vlmrt.export import export

    m = export(args.model, args.out, dtype=args.dtype, opset=args.opset, force=args.force, seed=args.seed)
    print(f"exported {m.name} ({m.family}, {m.dtype}) to {args.out}: " + ", ".join(s.file for s in m.stages.values()))
    return 0


def add_serve_args(p: argparse.ArgumentParser) -> None:
    from vlmrt.serve import ServeOptions

    d = ServeOptions()
    _common_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument("--max-batch", type=int, default=32,
                   help="most requests decoded together: the engine's KV slots (default 32; --kv-cache-gib may allow fewer)")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help=f"most requests waiting for a slot; more are answered 503 with Retry-After (default {d.max_queue})")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout_s,
                   help=f"seconds a request may take, queue included; then it stops with a 504 (default {d.request_timeout_s:g})")
    p.add_argument("--body-timeout", type=float, default=d.body_timeout_s,
                   help=f"seconds to receive a request body; a slow or short body gets a 408 (default {d.body_timeout_s:g})")
    p.add_argument("--max-body-mib", type=float, default=d.max_body_mib, help=f"largest request body (default {d.max_body_mib:g})")
    p.add_argument("--api-key", default=os.environ.get("VLMRT_API_KEY", ""),
                   help="require `Authorization: Bearer KEY` on /v1/* (default: $VLMRT_API_KEY; none: no auth)")
    p.add_argument("--allowed-local-media-path", default="", metavar="DIR",
                   help="images may be files under DIR (file:// URLs or paths); default: data: URLs only")
    p.add_argument("--image-cache-mib", type=float, default=d.image_cache_mib,
                   help=f"vision outputs kept for images asked again (default {d.image_cache_mib:g}; 0 = off)")


def cmd_serve(args) -> int:
    """Serve a model over HTTP: OpenAI-compatible POST /v1/chat/completions (multi-turn chats, one image
    per request or none; "stream": true for Server-Sent Events), GET /v1/models, GET /health,
    GET /metrics. Requests run on the engine: they join and leave the running batch at any step, and a
    client that disconnects frees its slot. Needs the serve extra. See docs/serve.md."""
    from vlmrt.engine import EngineOptions
    from vlmrt.models import load_model
    from vlmrt.pipeline import Pipeline
    from vlmrt.serve import CHAT_PATH, ServeOptions, make_server, require_serve_extra

    require_serve_extra()
    options = ServeOptions(max_queue=args.max_queue, max_body_mib=args.max_body_mib, body_timeout_s=args.body_timeout,
                           request_timeout_s=args.request_timeout, api_key=args.api_key,
                           allowed_local_media_path=args.allowed_local_media_path, image_cache_mib=args.image_cache_mib)
    options.check()  # before a model load that may take minutes
    if args.max_batch < 1:
        raise VlmrtError(f"--max-batch must be at least 1, got {args.max_batch}")
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, seed=args.seed)
    runtime_options = {"max_batch": args.max_batch} if args.runtime == "compiled" else None
    pipe = Pipeline(loaded, args.runtime, runtime_options, EngineOptions(kv_cache_gib=args.kv_cache_gib))
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


COMMANDS = {
    "run": ("answer a question about an image", add_run_args, cmd_run),
    "models": ("list model families and presets", add_models_args, cmd_models),
    "caption": ("caption every image in a folder, resumably", add_caption_args, cmd_caption),
    "eval": ("fidelity checks: runtime parity, CLIP score", add_eval_args, cmd_eval),
    "export": ("export a model to ONNX graphs plus a manifest", add_export_args, cmd_export),
    "bench": ("time runtimes per stage and batch size, against Hugging Face generate", add_bench_args, cmd_bench),
    "serve": ("serve a model over HTTP: OpenAI-compatible chat completions on the engine", add_serve_args, cmd_serve),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmrt",
        description="Run vision-language models fast, on interchangeable runtimes, and prove it.",
        epilog="Presets run on synthetic weights from a seed (no download): their text is meaningless, timings are real.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_args, func) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=func.__doc__)
        add_args(p)
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except VlmrtError as e:
        print(f"vlmrt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlmrt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
