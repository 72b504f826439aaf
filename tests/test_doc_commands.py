"""The commands in README.md and docs/*.md parse as written: every flag they name exists, none is an old
spelling, and the ones that run on a tiny preset (or an export of one) name files that exist in the tree.
Parsing only: building the parser imports no torch, so this checks every documented line in well under a
second. Running them is what the tests of each command do."""

import shlex
from pathlib import Path

import pytest

from vlmrt.catalog import read_catalog
from vlmrt.cli import COMMANDS as SUBCOMMANDS, build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TINY = {p["preset"] for p in read_catalog()["presets"] if "tiny" in p["preset"]}


def shell_lines(path: Path):
    """(line number, logical line) of every line in a fenced block that is not Python or JSON; a line
    ending in a backslash is joined with the next."""
    fence, held, start = None, "", 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fence = None if fence is not None else line.strip().strip("`")
            continue
        if fence is None or fence in ("python", "json"):
            continue
        start = start or number
        if line.rstrip().endswith("\\"):
            held += line.rstrip()[:-1] + " "
            continue
        yield start, held + line
        held, start = "", 0


def vlmrt_argv(segment: str) -> list[str] | None:
    """The arguments after `vlmrt` (or `python -m vlmrt`, `torchrun ... -m vlmrt`, `venv-ms/bin/vlmrt`) in one
    shell command, or None when it runs something else."""
    try:
        words = shlex.split(segment, comments=True)
    except ValueError:  # a heredoc's JSON, an unbalanced quote in a diagram
        return None
    while words and "=" in words[0] and not words[0].startswith("-"):  # PYTHONPATH=. OUT=...
        words = words[1:]
    if words and Path(words[0]).name == "vlmrt":
        return words[1:]
    for i in range(len(words) - 1):
        if words[i] == "-m" and words[i + 1] == "vlmrt" and Path(words[0]).name in ("python", "python3", "torchrun"):
            return words[i + 2:]
    return None


def documented_commands():
    found = []
    for path in DOCS:
        for number, line in shell_lines(path):
            for segment in line.split("&&"):
                argv = vlmrt_argv(segment)
                if argv is not None and "..." not in argv:
                    found.append((f"{path.relative_to(ROOT)}:{number}", argv))
    return found


COMMANDS = documented_commands()


def test_the_docs_have_commands_to_check():
    assert len(COMMANDS) > 60 and {argv[0] for _, argv in COMMANDS} >= {"run", "export", "bench", "serve", "eval"}


def problems(where: str, argv: list[str], capsys) -> list[str]:
    """What is wrong with one documented command line: it does not parse, it uses an old spelling, or (on a
    tiny preset or an export of one) it names an image that is not in the tree."""
    if "--help" in argv:
        rest = [a for a in argv if a != "--help"]
        return [] if not rest or rest[0] in SUBCOMMANDS else [f"{where}: no such command: {rest[0]}"]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return [f"{where}: `vlmrt {shlex.join(argv)}` exits {e.code}: {capsys.readouterr().err.strip()}"]
    found = [f"{where}: an old spelling: {n}" for n in getattr(args, "renamed", None) or []]
    if getattr(args, "old_model", None):
        found.append(f"{where}: `vlmrt export MODEL` is now `vlmrt export --model MODEL`")
    model = getattr(args, "model", None) or ""
    if model in TINY or model.startswith("exports/"):  # runs as written, from the repository root
        for flag in ("image", "images"):
            value = getattr(args, flag, None)
            found += [f"{where}: --{flag} {name} is not in the repository"
                      for name in ([value] if isinstance(value, str) else value or []) if not (ROOT / name).exists()]
    return found


def test_every_documented_command_parses_as_written(capsys):
    found = [line for where, argv in COMMANDS for line in problems(where, argv, capsys)]
    assert not found, "\n".join(found)


def _help(capsys, *command) -> str:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*command, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def _section(text: str, title: str) -> str:
    """The lines of one argument group in a --help text, from `title:` to the blank line after it."""
    return text.split(f"\n{title}:\n", 1)[1].split("\n\n", 1)[0]


@pytest.mark.parametrize("command", [["run"], ["caption"], ["serve"]])
def test_help_lists_the_kv_budget_with_the_runtime(command, capsys):
    assert "--kv-cache-gib GIB" in _section(_help(capsys, *command), "runtime")


@pytest.mark.parametrize("command, samples", [(["run"], True), (["caption"], False), (["serve"], False),
                                              (["bench"], False), (["export"], False), (["eval", "parity"], False)])
def test_help_says_what_the_seed_seeds(command, samples, capsys):
    seed = " ".join(_section(_help(capsys, *command), "model").split("--seed N", 1)[1].split())
    assert seed.startswith("seed of synthetic weights and of sampling" if samples else "seed of synthetic weights (default 0)")


def test_help_texts_say_what_the_commands_do(capsys):
    top = " ".join(_help(capsys).split())
    assert all(f in top for f in ("ONNX", "AOTInductor", "Paddle", "MINDIR", "StableHLO"))  # every export format
    caption = _help(capsys, "caption")
    assert "--temperature" not in caption and "streamed" not in caption  # caption neither samples nor streams
    assert "--ray" in _section(caption, "ray (docs/ray.md)") and "--ray" in _section(_help(capsys, "eval", "clipscore"),
                                                                                      "ray (docs/ray.md)")
    serve = " ".join(_help(capsys, "serve").split())
    assert "one image per request" not in serve and "images in any user message" in serve
