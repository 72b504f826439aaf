"""CLI rows for the fidelity tools: `vlmrt caption` and `vlmrt eval parity|clipscore`.

Each command parses arguments, calls the library function and prints; nothing else. Kept apart from
vlmrt/cli.py so that file only holds the table rows; importing this module imports no torch.
"""

from __future__ import annotations

import argparse
import sys


def add_caption_args(p: argparse.ArgumentParser) -> None:
    from vlmrt.cli import _common_model_args
    from vlmrt.eval.caption import DEFAULT_PROMPT

    _common_model_args(p)
    p.add_argument("--images", required=True, help="folder of images (jpg, png, webp, ...)")
    p.add_argument("--out", required=True, help="captions JSON file; rewritten after every batch, resumed if it exists")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"question asked of every image (default {DEFAULT_PROMPT!r})")
    p.add_argument("--batch", type=int, default=8, help="images per batch (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="caption length limit (default 64)")
    p.add_argument("--num-beams", type=int, default=1,
                   help="1: greedy (default); K > 1: beam search, e.g. 3 with --repetition-penalty 1.2 as MiniCPM-V-2's release")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1.0 = off)")
    p.add_argument("--recursive", action="store_true", help="also caption images in subfolders")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def cmd_caption(args) -> int:
    """Caption every image in a folder (greedy or beam search), in batches, into a JSON file written after every batch.
    Running the same command again resumes an interrupted run; unreadable images are recorded, not fatal."""
    from vlmrt.eval.caption import caption_folder, summarize
    from vlmrt.eval.images import list_images
    from vlmrt.pipeline import Pipeline

    list_images(args.images, args.recursive)  # fail on a bad folder before loading a model
    pipe = Pipeline.load(args.model, runtime=args.runtime, device=args.device, dtype=args.dtype, seed=args.seed,
                         kv_cache_gib=args.kv_cache_gib)
    _note_synthetic(pipe.loaded)
    doc = caption_folder(pipe, args.images, args.out, prompt=args.prompt, batch_size=args.batch,
                         max_new_tokens=args.max_new_tokens, recursive=args.recursive, progress=not args.no_progress,
                         num_beams=args.num_beams, repetition_penalty=args.repetition_penalty)
    print(f"{summarize(doc)}; written to {args.out}", file=sys.stderr)
    return 0


def add_parity_args(p: argparse.ArgumentParser) -> None:
    from vlmrt.eval.parity import DEFAULT_PROMPT

    p.add_argument("--model", required=True, help="a preset (see `vlmrt models`) or a release folder")
    p.add_argument("--runtimes", required=True, help="comma-separated, the first is the reference, e.g. eager,onnx")
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"question asked of every image (default {DEFAULT_PROMPT!r})")
    p.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per image, stop tokens off (default 16)")
    p.add_argument("--min-agreement", type=float, default=None,
                   help="exit 1 when a runtime's overall token agreement is below this (e.g. 0.99); default: report only")
    p.add_argument("--json", help="also write the full report to this JSON file")
    p.add_argument("--recursive", action="store_true", help="also use images in subfolders")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="weights and activations (default fp32)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--seed", type=int, default=0, help="seed of synthetic weights (default 0)")


def cmd_parity(args) -> int:
    """Run several runtimes on the same weights and images; report greedy token agreement, first
    divergence, teacher-forced logit error and per-stage output error against the first runtime.
    Prints a markdown table; exits 1 when agreement is below --min-agreement."""
    from vlmrt.eval.images import list_images, write_json_atomic
    from vlmrt.eval.parity import build_runtimes, markdown, parity_report
    from vlmrt.models import load_model

    names = [n.strip() for n in args.runtimes.split(",") if n.strip()]
    list_images(args.images, args.recursive)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, seed=args.seed)
    _note_synthetic(loaded)
    report = parity_report(loaded, build_runtimes(loaded, names), args.images, prompt=args.prompt,
                           new_tokens=args.new_tokens, recursive=args.recursive, min_agreement=args.min_agreement,
                           progress=sys.stderr.isatty())
    print(markdown(report))
    if args.json:
        write_json_atomic(args.json, report)
    return 0 if report["passed"] else 1


def add_clipscore_args(p: argparse.ArgumentParser) -> None:
    from vlmrt.eval.clipscore import PREFIX

    p.add_argument("--images", required=True, help="the image folder the captions were made from")
    p.add_argument("--captions", required=True, nargs="+", help="caption files; the 2nd, 3rd ... are compared with the 1st")
    p.add_argument("--clip", required=True,
                   help="a Hugging Face CLIP folder, or an open_clip checkpoint (open_clip_pytorch_model.bin) or its folder")
    p.add_argument("--tokenizer", help="folder with the CLIP tokenizer files (default: the --clip folder)")
    p.add_argument("--prefix", default=PREFIX, help=f"text put before every caption (default {PREFIX!r}, as in CLIPScore)")
    p.add_argument("--json", help="also write the full report (per-image scores) to this JSON file")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")


def cmd_clipscore(args) -> int:
    """Score caption sets against their images with a local CLIP model (CLIP-S = 2.5 * max(cos, 0),
    Hessel et al. 2021); report means, and each set against the first with a paired bootstrap interval."""
    from vlmrt.eval.clip_loader import load_clip
    from vlmrt.eval.clipscore import clipscore_report, markdown, read_captions
    from vlmrt.eval.images import list_images, write_json_atomic

    list_images(args.images, recursive=True)  # fail on bad input before loading a model
    for f in args.captions:
        read_captions(f)
    judge = load_clip(args.clip, tokenizer=args.tokenizer, device=args.device)
    report = clipscore_report(judge, args.images, args.captions, prefix=args.prefix, seed=args.seed)
    print(markdown(report))
    if args.json:
        write_json_atomic(args.json, report)
    return 0


EVAL_COMMANDS = {
    "parity": ("runtime vs runtime: token agreement, logit and stage errors", add_parity_args, cmd_parity),
    "clipscore": ("CLIP score of caption sets, with a paired comparison", add_clipscore_args, cmd_clipscore),
}


def add_eval_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    for name, (help_text, add_args, func) in EVAL_COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=func.__doc__))


def cmd_eval(args) -> int:
    """Fidelity checks: `parity` compares runtimes, `clipscore` judges caption sets with CLIP."""
    return EVAL_COMMANDS[args.eval_command][2](args)


def _note_synthetic(loaded) -> None:
    if loaded.synthetic:
        print(f"note: {loaded.name} runs on synthetic weights (seeded, no download): its text is meaningless",
              file=sys.stderr)

