"""The onnx runtime against the eager reference, stage by stage and end to end (tiny presets, fp32,
CPU), and its behaviour without onnxruntime.

Each stage gets the same inputs on both runtimes (the eager runtime's outputs of the stage before),
so a failure names the stage at fault.
"""

import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from conftest import ASSETS, PARITY_PROMPTS, assert_runtime_parity, load_tiny, parity_images
from families import FAMILY_TESTS
from onnx_exports import exported
from vlmrt.errors import VlmrtError
from vlmrt.generate import prompt_positions, split_embedded
from vlmrt.models import load_model
from vlmrt.pipeline import Pipeline

FAMILIES = sorted(FAMILY_TESTS)
PROMPTS = PARITY_PROMPTS
images = parity_images
RTOL, ATOL = 1e-4, 1e-5  # fp32


@pytest.fixture(scope="module", params=FAMILIES)
def pipes(request, tmp_path_factory):
    """Pipelines of one family's tiny preset on the eager runtime and on its export."""
    loaded = load_tiny(FAMILY_TESTS[request.param]["tiny"])
    return Pipeline(loaded, "eager"), Pipeline(load_model(str(exported(loaded.name, tmp_path_factory))), "onnx")


@pytest.fixture(scope="module")
def pair(pipes):
    """(eager runtime, onnx runtime, processor)."""
    return pipes[0].runtime, pipes[1].runtime, pipes[0].processor


def _batch(processor, n=3):
    return processor(images(n), PROMPTS[:n])


def _vision_inputs(batch):
    return {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "pixel_values", "position_ids")}


def _close(actual, expected, what):
    if isinstance(expected, dict):
        for k in expected:
            _close(actual[k], expected[k], f"{what}[{k}]")
        return
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def test_every_stage_and_step_matches_eager(pipes):
    """Image features, embeddings, prefill logits, the KV cache after prefill and 8 decode steps'
    logits, on 3 rows of different lengths (left padding), within fp32 tolerances; and the tokens."""
    eager, onnx = pipes
    assert_runtime_parity(eager.loaded, onnx.runtime, steps=8)


def test_text_only_embedding_matches_eager(pair):
    """Decode steps embed text only: the graph gets image_tokens = 0 (the helper covers the rest)."""
    eager, onnx, processor = pair
    tokens = _batch(processor)["input_ids"][:, -2:]
    _close(onnx.embed(tokens, None), eager.embed(tokens, None), "embedding (text only)")


def _prefill(rt, batch, embedded, extra_slots):
    b, t = batch["input_ids"].shape
    rt.start(b, t + extra_slots)
    mask = torch.zeros(b, t + extra_slots, dtype=torch.long)
    mask[:, :t] = batch["attention_mask"]
    embeds, extras = split_embedded(embedded)
    return rt.decode(embeds, prompt_positions(batch), mask, torch.arange(t), **extras), mask


@pytest.mark.parametrize("n", [1, 3], ids=["batch1", "batch3"])
def test_greedy_tokens_identical_for_64_new_tokens(pipes, n):
    cfg = replace(pipes[0].generation_config(max_new_tokens=64), stop_strings=(), stop_token_ids=())
    ref, out = (p(images(n), PROMPTS[:n], cfg) for p in pipes)
    assert [len(ids) for ids in ref.token_ids] == [64] * n
    assert out.token_ids == ref.token_ids


def test_the_runtime_refuses_to_skip_cache_slots(pair):
    eager, onnx, processor = pair
    batch = _batch(processor, 1)
    embedded = eager.embed(batch["input_ids"], eager.encode_images(batch["pixel_values"], **_vision_inputs(batch)))
    _, mask = _prefill(onnx, batch, embedded, 4)
    embeds, _ = split_embedded(embedded)
    with pytest.raises(VlmrtError, match="must continue at slot"):
        onnx.decode(embeds[:, :1], torch.zeros(1, 1, dtype=torch.long), mask, torch.tensor([0]))


def test_onnx_runtime_without_onnxruntime_is_a_clear_error(monkeypatch, tmp_path_factory, capsys):
    from vlmrt.cli import main
    from vlmrt.runtimes import runtime_class

    folder = exported("minigpt4-tiny", tmp_path_factory)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    with pytest.raises(VlmrtError, match="onnxruntime is not installed"):
        runtime_class("onnx")(load_model(str(folder)))
    assert main(["run", "--model", str(folder), "--image", str(ASSETS / "astronaut.jpg"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install onnxruntime" in err
    assert Pipeline(load_tiny("minigpt4-tiny"))(images(1), ["hi"]).token_ids  # eager still works


def test_vlmrt_imports_without_onnxruntime():
    """A fresh interpreter with onnxruntime unimportable still imports every vlmrt module."""
    code = ("import sys; sys.modules['onnxruntime'] = None\n"
            "import vlmrt, vlmrt.cli, vlmrt.export, vlmrt.pipeline, vlmrt.runtimes.eager, vlmrt.runtimes.onnx\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ASSETS.parent.parent)
    assert done.returncode == 0, done.stderr
