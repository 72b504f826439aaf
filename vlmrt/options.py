"""The CLI's shared vocabulary: argument groups every subcommand reuses, value checks, old spellings.

One name per concept across subcommands: `--model`, `--runtime` (a comma list where a command
compares runtimes), `--max-new-tokens`, `--batch`, `--dtype`, `--device`, `--seed`. A flag that
several commands share is added once, to its group below; a flag of one command stays in that
command's `add_*_args`. Every numeric option is checked by its `type`, so a bad value exits 2 with
one line before any work starts. Importing this module imports no torch.

```
 model_args      --model --dtype --device --seed       run, caption, serve, bench, eval parity, export
 runtime_args    --runtime NAME | --runtime A,B,...    run, caption, serve | bench, eval parity
 kv_cache_args   --kv-cache-gib (in the runtime group)  run, caption, serve
 generation_args --max-new-tokens (+ sampling, beams)  run, caption, bench, eval parity
 weight_args     --quantize --quantize-vision --threads run, caption, serve, bench, eval parity (export: no --threads)
 parallel_args   --tp N | --tp N,N,... --tp-timeout    run, caption, serve | bench
```
"""

from __future__ import annotations

import argparse

DTYPE_NAMES = ("fp32", "fp16", "bf16")
MODEL_HELP = "a preset (see `vlmrt models`) or a folder with a release or an export"


class Parser(argparse.ArgumentParser):
    """argparse, with usage mistakes reported as one line (and exit code 2), like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"vlmrt: error: {message} (see `{self.prog} --help`)\n")


# ----------------------------------------------------------------------------- value checks
def _number(kind, text: str, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def at_least(low: int, high: int | None = None):
    """An integer >= `low` (and <= `high`), as an argparse `type`."""
    def check(text: str) -> int:
        n = _number(int, text, "an integer")
        if n < low or (high is not None and n > high):
            raise argparse.ArgumentTypeError(
                f"must be at least {low}, got {n}" if high is None else f"must be in {low}..{high}, got {n}")
        return n
    return check


def in_range(low: float, high: float | None = None, low_open: bool = False, high_open: bool = False):
    """A number in [low, high] (`low_open` / `high_open` exclude an end; high None: no upper end)."""
    def check(text: str) -> float:
        x = _number(float, text, "a number")
        below = x <= low if low_open else x < low
        above = high is not None and (x >= high if high_open else x > high)
        if below or above or x != x:  # x != x: NaN
            lo, hi = "(" if low_open else "[", ")" if high_open or high is None else "]"
            raise argparse.ArgumentTypeError(f"must be in {lo}{low}, {'inf' if high is None else high}{hi}, got {text}")
        return x
    return check


positive_int = at_least(1)
non_negative_int = at_least(0)


def int_list(text: str) -> tuple[int, ...]:
    """Comma-separated integers >= 1, e.g. `1,2,4` (batch sizes)."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items or not all(x.isdigit() and int(x) >= 1 for x in items):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, e.g. 1,2,4; got {text!r}")
    return tuple(int(x) for x in items)


def name_list(text: str) -> tuple[str, ...]:
    """Comma-separated names, e.g. `eager,onnx` (order kept, repeats allowed: parity compares eager,eager)."""
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    if not items:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, e.g. eager,onnx; got {text!r}")
    return items


def one_name(text: str) -> str:
    """A single runtime: a comma list is for the commands that compare runtimes."""
    if "," in text:
        raise argparse.ArgumentTypeError(
            f"this command runs one runtime, got {text!r}; compare runtimes with `vlmrt bench` or `vlmrt eval parity`")
    return text.strip()


# ----------------------------------------------------------------------------- old spellings
class _OldSpelling(argparse.Action):
    """A renamed option's old spelling: sets the new one's value and records a one-line note."""

    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True if self.nargs == 0 else values)
        note_renamed(namespace, option_string or self.dest, self.new)


def note_renamed(namespace, old: str, new: str) -> None:
    notes = list(getattr(namespace, "renamed", None) or [])
    notes.append(f"{old} is now {new}; the old spelling goes away in the next release")
    namespace.renamed = notes


def old_spelling(p, old: str, new: str, dest: str, **kwargs) -> None:
    """Accept `old` for `new` without listing it in --help (kwargs: the new option's `type`, ...)."""
    p.add_argument(old, dest=dest, action=_OldSpelling, new=new, help=argparse.SUPPRESS, default=argparse.SUPPRESS,
                   **kwargs)


# ----------------------------------------------------------------------------- shared groups
def model_args(p, dtypes: tuple[str, ...] = DTYPE_NAMES, device: bool = True, required: bool = True,
               model_help: str = MODEL_HELP, sampling: bool = True):
    """--model, --dtype, --device, --seed: what to load and where (`sampling`: the seed also seeds sampling).
    Returns the group (add flags to it)."""
    g = p.add_argument_group("model")
    g.add_argument("--model", required=required, help=model_help)
    g.add_argument("--dtype", default="fp32", choices=dtypes, help="weights and activations (default fp32)")
    if device:
        g.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    g.add_argument("--seed", type=int, default=0, metavar="N",
                   help=f"seed of synthetic weights{' and of sampling' if sampling else ''} (default 0)")
    return g


def runtime_args(p, many: bool = False, default: str | None = None, extra_help: str = ""):
    """--runtime: one name, or (many) a comma list whose order a command may give meaning to."""
    g = p.add_argument_group("runtime")
    from vlmrt.runtimes import RUNTIMES  # a table of names: no torch

    names = ", ".join(RUNTIMES)
    if many:
        g.add_argument("--runtime", type=name_list, default=name_list(default) if default else None, metavar="A,B,...",
                       help=f"comma-separated runtimes: {names}{extra_help}" + (f" (default {default})" if default else ""))
        old_spelling(g, "--runtimes", "--runtime", "runtime", type=name_list)
    else:
        g.add_argument("--runtime", type=one_name, default=None, metavar="NAME",
                       help=f"{names}{extra_help} (default eager; an export folder runs on the runtime its manifest names)")
    return g


def generation_args(p, max_new_tokens: int = 64, sampling: bool = True, beams: bool = True,
                    tokens_help: str = "answer length limit"):
    """--max-new-tokens, and (sampling) temperature, top-k, top-p, repetition penalty, (beams) --num-beams."""
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens, metavar="N",
                   help=f"{tokens_help} (default {max_new_tokens})")
    old_spelling(g, "--new-tokens", "--max-new-tokens", "max_new_tokens", type=positive_int)
    if sampling:
        g.add_argument("--temperature", type=in_range(0.0), default=0.0, metavar="T", help="0 = greedy (default); > 0 samples")
        g.add_argument("--top-k", type=non_negative_int, default=0, metavar="K", help="sample from the k most likely tokens (0 = off)")
        g.add_argument("--top-p", type=in_range(0.0, 1.0, low_open=True), default=1.0, metavar="P",
                       help="nucleus sampling mass, in (0, 1] (1.0 = off)")
    if sampling or beams:
        g.add_argument("--repetition-penalty", type=in_range(0.0, low_open=True), default=1.0, metavar="R",
                       help="> 1 discourages repeats (1.0 = off)")
    if beams:
        g.add_argument("--num-beams", type=positive_int, default=1, metavar="K",
                       help="beam search with K beams (1 = off, default" + ("; not with --temperature > 0); the answer "
                            "is printed once it is complete, not streamed" if sampling else ")"))
    return g


def weight_args(p, threads: bool = True):
    """--quantize, --quantize-vision (and --threads): the weight format and CPU threads. Returns the group."""
    g = p.add_argument_group("weights")
    g.add_argument("--quantize", default=None, metavar="FORMAT",
                   help="weight format of the decoder's linear layers: int8 (per channel; int8-g32: a scale per 32 "
                        "columns), int4 (block 32, lm_head int8; int4-g64, "
                        "int4-g128-sym, int4-head4, ...), fp16 or bf16; add -nohead to keep lm_head as is "
                        "(default: the model's own weights)")
    g.add_argument("--quantize-vision", action="store_true", help="also quantize the vision stage's linear layers")
    if threads:
        g.add_argument("--threads", type=positive_int, default=None, metavar="N",
                       help="CPU threads of PyTorch and ONNX Runtime (default: all this process may use)")
    return g


def kv_cache_args(g):
    """--kv-cache-gib, into `g` (the runtime group): the engine's KV pool budget (commands that generate through
    the engine)."""
    g.add_argument("--kv-cache-gib", type=in_range(0.0, low_open=True), default=None, metavar="GIB",
                   help="memory for the engine's KV cache slots, in GiB (default: half the free GPU memory; on a "
                        "CPU a tenth of the RAM, at most 4)")


def parallel_args(p, many: bool = False):
    """--tp (ranks of tensor parallelism; `many`: a comma list to sweep) and --tp-timeout."""
    g = p.add_argument_group("tensor parallel")
    if many:
        g.add_argument("--tp", type=int_list, default=(1,), metavar="N,N,...",
                       help="tensor-parallel ranks to sweep, e.g. 1,2: each value runs as its own group (default 1)")
    else:
        g.add_argument("--tp", type=positive_int, default=1, metavar="N",
                       help="split the decoder over N ranks (torch.distributed: gloo on CPU, NCCL on CUDA); started "
                            "here, or by `torchrun --nproc-per-node N -m vlmrt ...` (default 1; see docs/tp.md)")
    g.add_argument("--tp-timeout", type=in_range(0.0, low_open=True), default=300.0, metavar="S",
                   help="seconds a rank waits for the others in a collective before it stops with an error (default 300)")
    return g
