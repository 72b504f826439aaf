"""The commands in README.md and docs/*.md parse as written: every flag they name exists, none is an old
spelling, and the ones that run on a tiny preset (or an export of one) name files that exist in the tree.
Parsing only: building the parser imports no torch, so this checks every documented line in well under a
second. Running them is what the tests of each command do."""

import shlex
from pathlib import Path

import pytest

from vlmrt.catalog import read_catalog
from vlmrt.cli import build_parser

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


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_a_documented_command_parses(where, argv, capsys):
    if "--help" in argv:
        argv = [a for a in argv if a != "--help"]
        assert argv and argv[0] in ("run", "models", "caption", "eval", "export", "bench", "serve"), where
        return
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{where}: `vlmrt {shlex.join(argv)}` exits {e.code}: {capsys.readouterr().err.strip()}")
    assert not getattr(args, "renamed", None), f"{where}: an old spelling: {args.renamed}"
    assert not getattr(args, "old_model", None), f"{where}: `vlmrt export MODEL` is now `vlmrt export --model MODEL`"
    model = getattr(args, "model", None) or ""
    if model in TINY or model.startswith("exports/"):  # runs as written, from the repository root
        for flag in ("image", "images"):
            value = getattr(args, flag, None)
            for name in [value] if isinstance(value, str) else value or []:
                assert (ROOT / name).exists(), f"{where}: --{flag} {name} is not in the repository"
