"""End to end through the CLI: output, JSON, help, and every bad input exiting 2 with one clear line."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import load_tiny
from release_files import write_minigpt4_release
from vlmrt.cli import COMMANDS, build_parser, main

TINY = ["--model", "minigpt4-tiny"]


def _run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_run_streams_text_and_prints_timings(capsys, photo):
    code, out, err = _run(capsys, "run", *TINY, "--image", str(photo), "--prompt", "Describe this image.",
                          "--max-new-tokens", "8")
    assert code == 0 and out.strip()
    assert "synthetic weights" in err and "meaningless" in err
    for stage in ("preprocess", "vision", "prefill", "first token", "decode", "throughput"):
        assert stage in err


def test_run_json_has_text_ids_and_timings(capsys, photo):
    code, out, _ = _run(capsys, "run", *TINY, "--image", str(photo), "--prompt", "Describe this image.",
                        "--max-new-tokens", "6", "--json")
    data = json.loads(out)
    assert code == 0 and data["synthetic_weights"] is True
    ans = data["answers"][0]
    assert len(ans["token_ids"]) == 6 and isinstance(ans["text"], str)
    assert {"vision_ms", "prefill_ms", "ttft_ms", "ms_per_token", "tokens_per_s"} <= data["timings"].keys()


def test_run_batch_prints_one_line_per_image(capsys, photo):
    code, out, _ = _run(capsys, "run", *TINY, "--image", str(photo), "--image", str(photo), "--prompt", "Hi",
                        "--max-new-tokens", "4")
    assert code == 0 and out.startswith("[0] ") and "\n[1] " in out


def test_models_lists_every_preset(capsys):
    code, out, _ = _run(capsys, "models", "--json")
    names = {p["preset"] for p in json.loads(out)["presets"]}
    assert code == 0 and {"minigpt4-7b", "minigpt4-13b", "minigpt4-llama2-7b", "minigpt4-tiny"} <= names


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([command, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "usage: vlmrt " + command in out and len(out.splitlines()) > 3


def _bad(capsys, *args):
    code, out, err = _run(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("vlmrt: error: ") and "Traceback" not in err, err
    return lines[0]


def test_missing_image(capsys, tmp_path):
    msg = _bad(capsys, "run", *TINY, "--image", str(tmp_path / "x.jpg"), "--prompt", "Hi")
    assert "image not found" in msg


def test_file_that_is_not_an_image(capsys, tmp_path):
    p = tmp_path / "x.png"
    p.write_bytes(b"\x00" * 100)
    assert "not an image" in _bad(capsys, "run", *TINY, "--image", str(p), "--prompt", "Hi")


def test_empty_prompt(capsys, photo):
    assert "prompt is empty" in _bad(capsys, "run", *TINY, "--image", str(photo), "--prompt", "")


def test_prompt_longer_than_context(capsys, photo):
    assert "shorten the prompt" in _bad(capsys, "run", *TINY, "--image", str(photo), "--prompt", "the " * 600)


def test_unknown_preset(capsys, photo):
    msg = _bad(capsys, "run", "--model", "minigpt5-7b", "--image", str(photo), "--prompt", "Hi")
    assert "unknown model 'minigpt5-7b'" in msg and "minigpt4-7b" in msg


def test_unknown_runtime(capsys, photo):
    msg = _bad(capsys, "run", *TINY, "--runtime", "tensorrt-llm", "--image", str(photo), "--prompt", "Hi")
    assert "unknown runtime 'tensorrt-llm'" in msg and "eager" in msg


def test_checkpoint_folder_with_a_missing_file(capsys, photo, tmp_path):
    folder = write_minigpt4_release(load_tiny("minigpt4-tiny"), tmp_path / "rel")
    (folder / "blip2_pretrained_flant5xxl.pth").unlink()
    msg = _bad(capsys, "run", "--model", str(folder), "--image", str(photo), "--prompt", "Hi")
    assert "missing blip2_pretrained_flant5xxl.pth" in msg


def test_checkpoint_folder_with_a_corrupt_file(capsys, photo, tmp_path):
    folder = write_minigpt4_release(load_tiny("minigpt4-tiny"), tmp_path / "rel")
    (folder / "eva_vit_g.pth").write_bytes(b"PK\x03\x04 not really a zip")
    msg = _bad(capsys, "run", "--model", str(folder), "--image", str(photo), "--prompt", "Hi")
    assert "eva_vit_g.pth" in msg and "corrupt" in msg


def test_release_folder_runs_end_to_end(capsys, photo, tmp_path):
    folder = write_minigpt4_release(load_tiny("minigpt4-tiny"), tmp_path / "rel")
    code, out, err = _run(capsys, "run", "--model", str(folder), "--image", str(photo), "--prompt", "Hi",
                          "--max-new-tokens", "4")
    assert code == 0 and "synthetic" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu(capsys, photo):
    msg = _bad(capsys, "run", *TINY, "--device", "cuda", "--image", str(photo), "--prompt", "Hi")
    assert "no CUDA GPU" in msg and "--device cpu" in msg


def test_the_readme_demo_command_works_as_a_process(photo):
    """The README's first command, minus its install step, in a fresh process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "vlmrt", "run", "--model", "minigpt4-tiny", "--image", str(photo),
         "--prompt", "Describe this image."], capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and "ms/token" in proc.stderr


def test_bad_input_exits_2_without_traceback_as_a_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vlmrt", "run", "--model", "minigpt4-tiny", "--image",
                           str(tmp_path / "none.png"), "--prompt", "Hi"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "image not found" in proc.stderr
