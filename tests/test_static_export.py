"""Static-shape ONNX exports (vlmrt export --static-shapes): no dynamic dimension in any graph, the
manifest's buckets, the ATC command lines, ONNX Runtime at the fixed shapes, and the onnx runtime
padding requests to the buckets with the greedy tokens of eager (tiny presets, fp32, CPU)."""

import re
from dataclasses import replace

import numpy as np
import onnx
import pytest

from conftest import assert_runtime_parity, load_tiny
from families import FAMILY_TESTS
from static_exports import BATCH, SEQ, static_exported
from test_onnx_runtime import PROMPTS, images
from vlmrt.cli import main
from vlmrt.errors import VlmrtError
from vlmrt.export import read_manifest
from vlmrt.models import load_model
from vlmrt.pipeline import Pipeline

FAMILIES = sorted(FAMILY_TESTS)


@pytest.fixture(scope="module", params=FAMILIES)
def folder(request, tmp_path_factory):
    return static_exported(FAMILY_TESTS[request.param]["tiny"], tmp_path_factory)


def _unknown_dims(values) -> list[str]:
    return [v.name for v in values if not v.type.tensor_type.HasField("shape")
            or any(not d.HasField("dim_value") for d in v.type.tensor_type.shape.dim)]


def test_no_dynamic_dimension_in_any_graph(folder):
    m = read_manifest(folder)
    assert {(g.stage, g.sequence, g.images) for g in m.graphs} == {
        ("vision", None, True), ("embedding", SEQ[0], True), ("embedding", 1, False),
        ("decoder", SEQ[0], True), ("decoder", 1, True)}
    for g in m.graphs:
        path = folder / g.info.file
        onnx.checker.check_model(str(path))
        graph = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True).graph
        outputs = {o.name for o in graph.output}
        inner = {name for node in graph.node for name in node.output if name and name not in outputs}
        assert inner <= {v.name for v in graph.value_info}, g.info.file  # every intermediate has a shape
        for part in (graph.input, graph.output, graph.value_info):
            assert _unknown_dims(part) == [], g.info.file
        assert all(isinstance(d, int) for t in g.info.inputs + g.info.outputs for d in t.shape), g.info.file


def test_manifest_lists_the_buckets_and_the_cache(folder):
    m = read_manifest(folder)
    assert m.static == {"batch": list(BATCH), "sequence": list(SEQ), "cache_len": SEQ[0]}
    s, b = SEQ[0], BATCH[0]
    for g in m.graphs:
        ins = {t.name: t for t in g.info.inputs}
        assert g.batch == b
        if g.stage == "decoder":
            assert ins["past_key_values.0.key"].shape == (b, m.num_kv_heads, s, m.head_dim)
            assert ins["past_key_values.0.key"].dims == ("batch", m.num_kv_heads, "cache_sequence", m.head_dim)
            assert ins["attention_mask"].shape == (b, s)
            assert ins["cache_position"].shape == (b, g.sequence)
            assert {t.name: t.shape for t in g.info.outputs}["logits"][:2] == (b, 1)
        if g.stage == "embedding":
            assert ins["input_ids"].shape == (b, g.sequence)
            assert ("image_features" in ins or any("deepstack" in k for k in ins)) == g.images


def test_readme_has_one_atc_line_per_graph(folder):
    m, text = read_manifest(folder), (folder / "README.md").read_text()
    lines = [line for line in text.splitlines() if line.startswith("atc ")]
    assert len(lines) == len(m.graphs)
    for g, line in zip(m.graphs, lines):
        shape = ";".join(f"{t.name}:{','.join(map(str, t.shape))}" for t in g.info.inputs)
        stem = g.info.file[:-5]
        assert line == (f'atc --model={g.info.file} --framework=5 --input_shape="{shape}" --output={stem} '
                        f'--soc_version=<yours>')
        assert re.search(r"input_shape=\"[^a-z\"]*[a-z_.0-9]+:\d", line)


def test_onnx_runtime_runs_every_graph_at_its_fixed_shape(folder):
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    for g in read_manifest(folder).graphs:
        sess = ort.InferenceSession(str(folder / g.info.file), providers=["CPUExecutionProvider"])
        feed = {}
        for t in g.info.inputs:
            if t.name in ("cache_position", "position_ids"):  # distinct slots 0..T-1 in every row
                feed[t.name] = np.broadcast_to(np.arange(t.shape[-1]), t.shape).astype(t.dtype)
            elif t.name == "logits_index":
                feed[t.name] = np.full(t.shape, g.sequence - 1, dtype=t.dtype)
            elif t.dtype.startswith("int"):
                feed[t.name] = rng.integers(1 if t.name == "attention_mask" else 0, 100, size=t.shape).astype(t.dtype)
            else:
                feed[t.name] = rng.standard_normal(t.shape).astype(t.dtype)
        outs = sess.run(None, feed)
        assert [o.shape for o in outs] == [tuple(t.shape) for t in g.info.outputs], g.info.file
        assert all(np.isfinite(o).all() for o in outs), g.info.file


def _greedy(folder, n):
    m = read_manifest(folder)
    eager = Pipeline(load_tiny(m.name), "eager")
    static = Pipeline(load_model(str(folder)))
    assert type(static.runtime).__name__ == "StaticOnnxRuntime"
    assert not hasattr(static.runtime, "run_step")  # bucketed graphs: the lock-step loop, not the engine
    cfg = replace(eager.generation_config(max_new_tokens=32), stop_strings=(), stop_token_ids=())
    ref, out = eager(images(n), PROMPTS[:n], cfg), static(images(n), PROMPTS[:n], cfg)
    assert [len(ids) for ids in ref.token_ids] == [32] * n
    assert out.token_ids == ref.token_ids


def test_static_export_gives_the_greedy_tokens_of_eager(folder):
    """3 rows of different lengths (left-padded) in the batch bucket of 4: one row of padding."""
    _greedy(folder, 3)


def test_every_stage_and_step_matches_eager(folder):
    """Tensor-level parity (vlmrt/eval/tensor_parity.py): image features, embeddings, prefill logits,
    the KV cache after prefill and 4 decode steps' logits, on 3 left-padded rows, fp32 tolerances."""
    m = read_manifest(folder)
    assert_runtime_parity(load_tiny(m.name), Pipeline(load_model(str(folder))).runtime, steps=4)


def test_one_row_padded_to_the_bucket(tmp_path_factory):
    _greedy(static_exported("minigpt4-tiny", tmp_path_factory), 1)


def test_requests_beyond_the_buckets_are_clear_errors(tmp_path_factory):
    folder = static_exported("minigpt4-tiny", tmp_path_factory)
    pipe = Pipeline(load_model(str(folder)))
    cfg = pipe.generation_config(max_new_tokens=SEQ[0])  # prompt + answer > the cache's slots
    with pytest.raises(VlmrtError, match="KV cache of 192 slots; re-export with a larger --seq"):
        pipe(images(1), PROMPTS[:1], cfg)
    with pytest.raises(VlmrtError, match="no decoder graph .* fits batch 5"):
        pipe.runtime.start(5, 16)


def _one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


@pytest.mark.parametrize("extra, match", [
    (["--seq", "128"], "add --static-shapes"),
    (["--static-shapes", "--seq", "12x"], "comma-separated integers"),
    (["--static-shapes", "--batch", "0"], "positive integers"),
    (["--static-shapes", "--seq", "100000"], "longer than the model's context"),
    (["--static-shapes", "--format", "aoti"], "--static-shapes is for --format onnx"),
])
def test_bad_static_flags(tmp_path, capsys, extra, match):
    _one_line_error(capsys, ["export", "--model", "minigpt4-tiny", "--out", str(tmp_path / "e"), *extra], match)


def test_cli_static_export(tmp_path, capsys):
    out = tmp_path / "e"
    assert main(["export", "--model", "minigpt4-tiny", "--out", str(out), "--static-shapes", "--batch", "1", "--seq", "160"]) == 0
    assert "decoder.b1.t160.onnx" in capsys.readouterr().out
    assert read_manifest(out).static == {"batch": [1], "sequence": [160], "cache_len": 160}
    assert main(["run", "--model", str(out), "--image", "vlmrt/assets/astronaut.jpg", "--prompt", "hi",
                 "--max-new-tokens", "4"]) == 0
