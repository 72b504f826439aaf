"""AOTInductor exports (vlmrt export --format aoti) on the aoti runtime: greedy tokens and stage
outputs against eager, the runtime picked from the manifest, and no model code imported (tiny
presets, fp32, CPU).

Compiling a package writes and builds C++ (tens of seconds each on two cores), so CI compiles one
family (MiniGPT-4: three packages, once per session, with -O0 C++). Set VLMRT_TEST_AOTI=all to run
the greedy-token check on every family (all four pass; times in docs/export.md).
"""

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from conftest import ASSETS, assert_runtime_parity, load_tiny
from families import FAMILY_TESTS
from static_exports import aoti_exported
from test_onnx_runtime import PROMPTS, _batch, images
from vlmrt.cli import main
from vlmrt.errors import VlmrtError
from vlmrt.export import read_manifest
from vlmrt.models import load_model
from vlmrt.pipeline import Pipeline

CI_FAMILY = "minigpt4"
ALL = os.environ.get("VLMRT_TEST_AOTI") == "all"
RTOL, ATOL = 1e-4, 1e-5  # fp32


def _family_param(family):
    marks = [] if family == CI_FAMILY or ALL else [pytest.mark.skip(
        reason="AOTInductor builds a family's packages in minutes on 2 cores (docs/export.md); VLMRT_TEST_AOTI=all runs it")]
    return pytest.param(family, marks=marks, id=family)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return aoti_exported(FAMILY_TESTS[CI_FAMILY]["tiny"], tmp_path_factory)


def test_manifest_names_the_aoti_runtime_and_dynamic_dims(folder):
    m = read_manifest(folder)
    data = json.loads((folder / "manifest.json").read_text())
    assert (data["format_version"], m.runtime) == (2, "aoti")
    files = sorted(g.info.file for g in m.graphs)
    assert files == ["decoder.pt2", "embedding.pt2", "vision.pt2"]
    assert all((folder / f).stat().st_size > 0 for f in files)
    dec = {t.name: t.shape for t in m.stages["decoder"].inputs}
    assert dec["inputs_embeds"][:2] == ("batch", "sequence")
    assert dec["past_key_values.0.key"] == ("batch", m.num_kv_heads, "cache_sequence", m.head_dim)
    assert dec["cache_position"] == ("batch", "sequence")


@pytest.mark.parametrize("family", [_family_param(f) for f in sorted(FAMILY_TESTS)])
@pytest.mark.parametrize("n", [1, 3], ids=["batch1", "batch3"])
def test_greedy_tokens_identical_to_eager(family, n, tmp_path_factory):
    loaded = load_tiny(FAMILY_TESTS[family]["tiny"])
    eager = Pipeline(loaded, "eager")
    aoti = Pipeline(load_model(str(aoti_exported(loaded.name, tmp_path_factory))))  # the manifest picks aoti
    assert aoti.runtime.name == "aoti"
    cfg = replace(eager.generation_config(max_new_tokens=32), stop_strings=(), stop_token_ids=())
    ref, out = eager(images(n), PROMPTS[:n], cfg), aoti(images(n), PROMPTS[:n], cfg)
    assert [len(ids) for ids in ref.token_ids] == [32] * n
    assert out.token_ids == ref.token_ids


def test_every_stage_and_step_matches_eager(folder):
    """Tensor-level parity (vlmrt/eval/tensor_parity.py) with eager fp32: image features, embeddings,
    prefill logits, KV cache and 4 decode steps on 3 left-padded rows; and text-only embedding."""
    loaded = load_tiny(FAMILY_TESTS[CI_FAMILY]["tiny"])
    rt = Pipeline(load_model(str(folder))).runtime
    assert_runtime_parity(loaded, rt, steps=4)
    eager = Pipeline(loaded, "eager").runtime
    ids = _batch(Pipeline(loaded, "eager").processor, 2)["input_ids"][:, -2:]
    torch.testing.assert_close(rt.embed(ids, None), eager.embed(ids, None), rtol=RTOL, atol=ATOL)


def test_runs_with_no_model_code_imported(folder):
    """A fresh interpreter runs the export; no module of vlmrt.models but the registry is imported."""
    code = (
        "import sys\n"
        "from vlmrt.cli import main\n"
        f"assert main(['run', '--model', {str(folder)!r}, '--image', {str(ASSETS / 'astronaut.jpg')!r}, "
        "'--prompt', 'hi', '--max-new-tokens', '4']) == 0\n"
        "assert 'vlmrt.runtimes.aoti' in sys.modules\n"
        "print('MODULES', sorted(m for m in sys.modules if m.startswith('vlmrt.models') "
        "or m in ('vlmrt.export.static_cache', 'vlmrt.export.aoti')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=ASSETS.parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("MODULES"))
    assert line == "MODULES ['vlmrt.models']", line


def test_onnx_runtime_refuses_an_aoti_export(folder, capsys):
    with pytest.raises(VlmrtError, match="runs on --runtime aoti"):
        Pipeline(load_model(str(folder)), "onnx")
    assert main(["run", "--model", str(folder), "--runtime", "compiled", "--image", str(ASSETS / "astronaut.jpg"),
                 "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "AOTInductor export" in err, err



def test_decoder_examples_hold_a_prompt_longer_than_the_default_cache():
    """A dynamic-resolution prompt (slimm-qwen2-0.5b: hundreds of image tokens) is longer than the
    examples' default 24 slots: the cache grows to hold every example row's slots, and the decoder
    runs on them (the example inputs only, no compile)."""
    from vlmrt.export.aoti import _decoder_io
    from vlmrt.export.static_cache import StaticCacheDecoder
    from vlmrt.stages import CACHE_POSITION, INPUTS_EMBEDS

    loaded = load_tiny("minigpt4-tiny")
    embeds = torch.randn(2, 40, loaded.config.decoder.hidden_size)  # [B,T,D], T > 24
    io = _decoder_io(loaded, {INPUTS_EMBEDS: embeds}, {})
    assert int(io.inputs[CACHE_POSITION].max()) < io.inputs["past_key_values.0.key"].shape[2]
    with torch.no_grad():
        logits = StaticCacheDecoder(loaded.model, list(io.inputs))(*io.inputs.values())[0]
    assert logits.shape[:2] == (2, 1) and bool(logits.isfinite().all())
