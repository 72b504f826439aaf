"""The CLI's shared vocabulary: one spelling per concept (old ones still accepted, unlisted), numeric
checks that exit 2 with one line, a help that imports no torch, clean exits on a closed pipe, and the
compile feedback of `vlmrt run`."""

import os
import subprocess
import sys

import pytest

from vlmrt import __version__
from vlmrt.cli import COMMANDS, build_parser, format_timings, main


def test_help_models_and_every_command_help_import_no_torch():
    code = (
        "import sys\n"
        "from vlmrt.cli import COMMANDS, main\n"
        "for argv in [['--help'], ['models', '--json'], ['eval', 'parity', '--help'], ['eval', 'clipscore', '--help'],\n"
        "             *[[c, '--help'] for c in COMMANDS]]:\n"
        "    assert main(argv) == 0, argv\n"
        "heavy = [m for m in ('torch', 'transformers', 'onnxruntime', 'numpy', 'PIL') if m in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stderr, proc.stderr
    assert "usage: vlmrt bench" in proc.stdout and '"presets"' in proc.stdout


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"vlmrt {__version__}"


def test_models_lists_the_catalog(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "minigpt4-7b" in out and "7.833B" in out and "32x4096" in out


def _args(*argv):
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize("argv, dest, value", [
    (["bench", "--model", "m", "--out", "o", "--new-tokens", "5"], "max_new_tokens", 5),
    (["eval", "parity", "--model", "m", "--images", "i", "--new-tokens", "3"], "max_new_tokens", 3),
    (["eval", "parity", "--model", "m", "--images", "i", "--runtimes", "eager,onnx"], "runtime", ("eager", "onnx")),
])
def test_old_spellings_still_work_with_a_note(argv, dest, value):
    args = _args(*argv)
    assert getattr(args, dest) == value
    old = next(a for a in argv if a in ("--new-tokens", "--runtimes"))
    assert args.renamed == [f"{old} is now --{dest.replace('_', '-')}; the old spelling goes away in the next release"]


def test_new_spellings_leave_no_note():
    args = _args("bench", "--model", "m", "--out", "o", "--max-new-tokens", "5", "--runtime", "eager")
    assert args.max_new_tokens == 5 and args.runtime == ("eager",) and not getattr(args, "renamed", None)


@pytest.mark.parametrize("command, old", [(["bench"], "--new-tokens"), (["eval", "parity"], "--runtimes"),
                                          (["eval", "parity"], "--new-tokens"), (["export"], "MODEL")])
def test_old_spellings_are_not_in_help(command, old, capsys):
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert old not in out.replace("--model MODEL", "")


def test_export_takes_model_as_positional_for_a_release(capsys, tmp_path):
    (tmp_path / "x").write_text("not empty")
    assert main(["export", "minigpt4-tiny", "--out", str(tmp_path)]) == 2  # parsed, then refused: --out is not empty
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("note: `vlmrt export MODEL` is now `vlmrt export --model MODEL`") and "not empty" in err[1]
    assert main(["export", "--out", str(tmp_path)]) == 2
    assert "no model to export; give one with --model" in capsys.readouterr().err


RUN = ["run", "--model", "minigpt4-tiny", "--image", "x.jpg", "--prompt", "Hi"]
BAD_NUMBERS = [  # (argv, what the one line says)
    (RUN + ["--temperature", "-1"], "argument --temperature: must be in [0.0, inf), got -1"),
    (RUN + ["--top-p", "0"], "argument --top-p: must be in (0.0, 1.0], got 0"),
    (RUN + ["--top-p", "1.5"], "argument --top-p: must be in (0.0, 1.0], got 1.5"),
    (RUN + ["--top-k", "-2"], "argument --top-k: must be at least 0, got -2"),
    (RUN + ["--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1, got 0"),
    (RUN + ["--max-new-tokens", "ten"], "argument --max-new-tokens: expected an integer, got 'ten'"),
    (RUN + ["--num-beams", "0"], "argument --num-beams: must be at least 1, got 0"),
    (RUN + ["--repetition-penalty", "0"], "argument --repetition-penalty: must be in (0.0, inf), got 0"),
    (RUN + ["--temperature", "nan"], "argument --temperature: must be in [0.0, inf), got nan"),
    (RUN + ["--runtime", "eager,onnx"], "argument --runtime: this command runs one runtime"),
    (["bench", "--model", "m", "--out", "o", "--batch", "1,0"], "argument --batch: expected comma-separated integers >= 1, e.g. 1,2,4; got '1,0'"),
    (["bench", "--model", "m", "--out", "o", "--batch", "1,two"], "argument --batch: expected comma-separated integers >= 1, e.g. 1,2,4; got '1,two'"),
    (["bench", "--model", "m", "--out", "o", "--repeats", "0"], "argument --repeats: must be at least 1"),
    (["bench", "--model", "m", "--out", "o", "--warmup", "-1"], "argument --warmup: must be at least 0"),
    (["bench", "--model", "m", "--out", "o", "--prompt-tokens", "1"], "argument --prompt-tokens: must be at least 2"),
    (["caption", "--model", "m", "--images", "i", "--out", "o", "--batch", "0"], "argument --batch: must be at least 1"),
    (["eval", "parity", "--model", "m", "--images", "i", "--min-agreement", "2"], "argument --min-agreement: must be in"),
    (["serve", "--model", "m", "--port", "70000"], "argument --port: must be in 0..65535, got 70000"),
    (["serve", "--model", "m", "--max-batch", "0"], "argument --max-batch: must be at least 1"),
    (["serve", "--model", "m", "--max-queue", "-5"], "argument --max-queue: must be at least 0, got -5"),
    (["export", "--model", "m", "--out", "o", "--opset", "3"], "argument --opset: must be at least 7"),
    (["run", "--image", "x.jpg", "--prompt", "Hi"], "the following arguments are required: --model"),
]


@pytest.mark.parametrize("argv, message", BAD_NUMBERS, ids=[" ".join(a[-2:]) for a, _ in BAD_NUMBERS])
def test_bad_numbers_exit_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlmrt: error: ") and message in lines[0], err
    assert lines[0].endswith("--help`)") and not out  # points at the help, prints no usage block


def test_a_closed_pipe_ends_quietly():
    """`vlmrt models --json | head -1`: the reader has gone before vlmrt writes."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-m", "vlmrt", "models", "--json"], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=60)
    finally:
        os.close(write)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr


@pytest.mark.parametrize("command", [["run"], ["caption"], ["serve"], ["bench"], ["export"], ["eval", "parity"]])
def test_every_command_has_one_spelling_per_concept(command, capsys):
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "--model MODEL" in out and "--runtimes" not in out and "--new-tokens" not in out
    assert ("--max-new-tokens" in out) == (command not in (["serve"], ["export"]))


def test_light_copies_of_defaults_match_their_modules():
    """The argument tables repeat two defaults so that building them imports neither torch nor numpy."""
    from vlmrt.eval import clipscore, commands, parity

    assert commands.PARITY_PROMPT == parity.DEFAULT_PROMPT and commands.PREFIX == clipscore.PREFIX


def test_timing_table_keeps_compile_time_apart():
    t = {"preprocess_ms": 2.0, "vision_ms": 10.0, "prefill_ms": 5.0, "ttft_ms": 15.0, "ms_per_token": 1.5,
         "decode_steps": 7, "tokens_per_s": 600.0}
    assert "compile" not in format_timings(t, 1)
    t["compile_ms"] = {"vision": 21000.0, "prefill": 900.0, "decode": 0.0, "total": 21900.0}
    line = format_timings(t, 1).splitlines()[-1]
    assert line.startswith("compile") and "21,900 ms (vision 21,000, prefill 900)" in line and "decode" not in line


def test_commands_table_is_complete():
    assert set(COMMANDS) == {"run", "models", "caption", "eval", "export", "bench", "serve"}
