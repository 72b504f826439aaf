"""CLI rows for the fidelity tools: `vlmrt caption` and `vlmrt eval parity|clipscore`.

Each command parses arguments, calls the library function and prints; nothing else. Kept apart from
vlmrt/cli.py so that file only holds the table rows; importing this module imports no torch.
"""

from __future__ import annotations

import argparse
import sys

from vlmrt.errors import VlmrtError
from vlmrt.options import (generation_args, kv_cache_args, in_range, model_args, parallel_args, positive_int, runtime_args,
                           weight_args)

PARITY_PROMPT = "Describe this image."  # vlmrt.eval.parity.DEFAULT_PROMPT (that module imports torch)
PREFIX = "A photo depicts "  # vlmrt.eval.clipscore.PREFIX (that module imports numpy); tests check both


def add_caption_args(p: argparse.ArgumentParser) -> None:
    from vlmrt.eval.caption import DEFAULT_PROMPT

    model_args(p, sampling=False)
    kv_cache_args(runtime_args(p))
    generation_args(p, sampling=False, tokens_help="caption length limit")
    weight_args(p)
    parallel_args(p)
    p.add_argument("--images", required=True, metavar="DIR", help="folder of images (jpg, png, webp, ...)")
    p.add_argument("--out", required=True, metavar="FILE", help="captions JSON file; rewritten after every batch, resumed if it exists")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, metavar="TEXT", help=f"question asked of every image (default {DEFAULT_PROMPT!r})")
    p.add_argument("--batch", type=positive_int, default=8, metavar="N", help="images per batch (default 8)")
    p.add_argument("--recursive", action="store_true", help="also caption images in subfolders")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_ray_args(p)


def add_ray_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ray (docs/ray.md)")
    g.add_argument("--ray", action="store_true",
                   help="run on a Ray cluster (pip install 'vlmrt[ray]'): a pool of actors, each loading the model once")
    g.add_argument("--address", metavar="HOST:PORT", help="with --ray: the cluster (host:6379 or ray://host:10001); "
                                                          "default: RAY_ADDRESS, else a new local cluster")
    g.add_argument("--actors", type=int, metavar="N", help="with --ray: actors in the pool (default 1)")
    g.add_argument("--cpus-per-actor", type=float, metavar="F",
                   help="with --ray: CPUs each actor holds, fractions allowed (default 0.5; leave some for Ray Data)")
    g.add_argument("--gpus-per-actor", type=float, metavar="G",
                   help="with --ray: GPUs each actor holds (default 0; e.g. 1 with --device cuda)")


def ray_resources(args):
    """The RayResources the --ray flags ask for, or None without --ray (then the other flags are refused)."""
    from vlmrt.errors import VlmrtError
    from vlmrt.eval.ray_cluster import RayResources

    given = {k: getattr(args, k) for k in ("address", "actors", "cpus_per_actor", "gpus_per_actor")
             if getattr(args, k) is not None}
    if not args.ray:
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise VlmrtError(f"{flags} only apply to a Ray run; add --ray")
        return None
    return RayResources(**given)


def cmd_caption(args) -> int:
    """Caption every image in a folder (greedy or beam search), in batches, into a JSON file written after every batch.
    Running the same command again resumes an interrupted run; unreadable images are recorded, not fatal.
    With --ray, a pool of Ray actors captions into the same file (docs/ray.md)."""
    from vlmrt.cli import print_notes, watch_compiles
    from vlmrt.eval.caption import caption_folder, summarize
    from vlmrt.eval.images import list_images
    from vlmrt.pipeline import Pipeline

    from vlmrt.quantize import weights_from_args

    weights = weights_from_args(args)
    list_images(args.images, args.recursive)  # fail on a bad folder before loading a model
    resources = ray_resources(args)
    if resources is not None:
        if not weights.is_fp:
            raise VlmrtError("--quantize does not reach ray workers yet; caption without --ray, or without --quantize")
        if args.tp > 1:
            raise VlmrtError("--tp does not reach ray workers; caption without --ray, or with --tp 1")
        return _caption_on_ray(args, resources)
    pipe = Pipeline.load(args.model, runtime=args.runtime, device=args.device, dtype=args.dtype, seed=args.seed,
                         weights=weights, kv_cache_gib=args.kv_cache_gib)
    watch_compiles(pipe.runtime)
    print_notes(pipe.notes)
    _note_synthetic(pipe.loaded)
    doc = caption_folder(pipe, args.images, args.out, prompt=args.prompt, batch_size=args.batch,
                         max_new_tokens=args.max_new_tokens, recursive=args.recursive, progress=not args.no_progress,
                         num_beams=args.num_beams, repetition_penalty=args.repetition_penalty)
    print(f"{summarize(doc)}; written to {args.out}", file=sys.stderr)
    return 0


def _caption_on_ray(args, resources) -> int:
    from vlmrt.eval.caption import summarize
    from vlmrt.eval.ray_caption import PipelineSpec, caption_folder_ray

    spec = PipelineSpec(args.model, args.runtime, args.device, args.dtype, args.seed)
    doc = caption_folder_ray(spec, args.images, args.out, resources, prompt=args.prompt, batch_size=args.batch,
                             max_new_tokens=args.max_new_tokens, recursive=args.recursive,
                             progress=not args.no_progress, num_beams=args.num_beams,
                             repetition_penalty=args.repetition_penalty)
    if doc["synthetic_weights"]:
        print(f"note: {doc['setup']['model']} runs on synthetic weights (seeded, no download): its text is meaningless",
              file=sys.stderr)
    print(f"{summarize(doc)}; written to {args.out}", file=sys.stderr)
    return 0


def add_parity_args(p: argparse.ArgumentParser) -> None:
    model_args(p, model_help="a preset (see `vlmrt models`) or a release folder", sampling=False)
    runtime_args(p, many=True, extra_help="; the first is the reference, e.g. eager,onnx (at least two); each may "
                                          "name a weight format: eager,eager:int8,onnx:int4")
    generation_args(p, max_new_tokens=16, sampling=False, beams=False, tokens_help="greedy tokens per image, stop tokens off")
    weight_args(p)
    p.add_argument("--images", required=True, metavar="DIR", help="folder of images")
    p.add_argument("--prompt", default=PARITY_PROMPT, metavar="TEXT", help=f"question asked of every image (default {PARITY_PROMPT!r})")
    p.add_argument("--min-agreement", type=in_range(0.0, 1.0), default=None, metavar="A",
                   help="exit 1 when a runtime's overall token agreement is below this (e.g. 0.99); default: report only")
    p.add_argument("--json", metavar="FILE", help="also write the full report to this JSON file")
    p.add_argument("--recursive", action="store_true", help="also use images in subfolders")


def cmd_parity(args) -> int:
    """Run several runtimes on the same weights and images; report greedy token agreement, first
    divergence, teacher-forced logit error and per-stage output error against the first runtime.
    Prints a markdown table; exits 1 when agreement is below --min-agreement."""
    from vlmrt.eval.images import list_images, write_json_atomic
    from vlmrt.eval.parity import build_runtimes, markdown, parity_report
    from vlmrt.models import load_model
    from vlmrt.quantize import weights_from_args

    if not args.runtime:
        raise VlmrtError("eval parity needs the runtimes to compare: --runtime REFERENCE,OTHER,... (e.g. eager,onnx)")
    names = list(args.runtime)
    weights = weights_from_args(args)
    list_images(args.images, args.recursive)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, seed=args.seed)
    _note_synthetic(loaded)
    report = parity_report(loaded, build_runtimes(loaded, names, weights), args.images, prompt=args.prompt,
                           new_tokens=args.max_new_tokens, recursive=args.recursive, min_agreement=args.min_agreement,
                           progress=sys.stderr.isatty())
    print(markdown(report))
    if args.json:
        write_json_atomic(args.json, report)
    return 0 if report["passed"] else 1


def add_clipscore_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", required=True, metavar="DIR", help="the image folder the captions were made from")
    p.add_argument("--captions", required=True, nargs="+", metavar="FILE", help="caption files; the 2nd, 3rd ... are compared with the 1st")
    p.add_argument("--clip", required=True, metavar="PATH",
                   help="a Hugging Face CLIP folder, or an open_clip checkpoint (open_clip_pytorch_model.bin) or its folder")
    p.add_argument("--tokenizer", metavar="DIR", help="folder with the CLIP tokenizer files (default: the --clip folder)")
    p.add_argument("--prefix", default=PREFIX, metavar="TEXT", help=f"text put before every caption (default {PREFIX!r}, as in CLIPScore)")
    p.add_argument("--json", metavar="FILE", help="also write the full report (per-image scores) to this JSON file")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="bootstrap seed (default 0)")  # not model_args: no --model here
    add_ray_args(p)


def cmd_clipscore(args) -> int:
    """Score caption sets against their images with a local CLIP model (CLIP-S = 2.5 * max(cos, 0),
    Hessel et al. 2021); report means, and each set against the first with a paired bootstrap interval.
    With --ray, a pool of Ray actors does the embedding (docs/ray.md)."""
    from vlmrt.eval.clip_loader import load_clip
    from vlmrt.eval.clipscore import clipscore_report, markdown, read_captions
    from vlmrt.eval.images import list_images, write_json_atomic

    list_images(args.images, recursive=True)  # fail on bad input before loading a model
    for f in args.captions:
        read_captions(f)
    resources = ray_resources(args)
    if resources is not None:
        from vlmrt.eval.ray_clipscore import clipscore_report_ray

        report = clipscore_report_ray(args.clip, args.images, args.captions, resources, tokenizer=args.tokenizer,
                                      device=args.device, prefix=args.prefix, seed=args.seed)
    else:
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

