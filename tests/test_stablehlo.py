"""StableHLO exports (vlmrt export --format stablehlo) on the stablehlo runtime: greedy tokens and
stage tensors against eager fp32, in a fresh process with no model code or torchax importable; an
artefact against the live jax runtime's stage; clear errors for bad inputs and broken folders.

One slimm-tiny export (batch bucket 4, sequence bucket 192) is shared by the file, and the fresh
process compiles its five artefacts once (fast-compile XLA options) for every parity check.
VLMRT_TEST_JAX=all also runs every family's tiny preset against eager and the live jax runtime
(results in docs/frameworks.md).
"""

import builtins
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from conftest import ASSETS, PARITY_PROMPTS, load_tiny, parity_batch, parity_images
from vlmrt.errors import VlmrtError

CI_PRESET = "slimm-tiny"
PRESETS = ["slimm-tiny", "minigpt4-tiny", "qwen-vl-tiny", "minicpm-v-tiny"]
ALL = os.environ.get("VLMRT_TEST_JAX") == "all"
BATCH, SEQ = (4,), (192,)  # one bucket each: the shared prompts + 32 tokens fit 192
pytestmark = pytest.mark.usefixtures("one_thread")


def _need_jax():
    if importlib.util.find_spec("jax") is None or importlib.util.find_spec("torchax") is None:
        pytest.skip("the [jax] extra (jax, torchax) is not installed")


_EXPORTS = {}


def exported(preset, tmp_path_factory):
    """The StableHLO export of tiny `preset`, once per session."""
    _need_jax()
    from vlmrt.export.stablehlo import export_stablehlo_model
    from vlmrt.export.static import StaticShapes

    if preset not in _EXPORTS:
        out = tmp_path_factory.mktemp(f"stablehlo-{preset}")
        export_stablehlo_model(load_tiny(preset), out, StaticShapes(BATCH, SEQ), force=True)
        _EXPORTS[preset] = out
    return _EXPORTS[preset]


def _pipeline(folder):
    from vlmrt.models import load_model
    from vlmrt.pipeline import Pipeline

    return Pipeline(load_model(str(folder)), runtime_options={"fast_compile": True})  # the manifest picks it


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return exported(CI_PRESET, tmp_path_factory)


@pytest.fixture(scope="module")
def pipe(folder):
    return _pipeline(folder)


def _config(pipe, tokens=32):
    return replace(pipe.generation_config(max_new_tokens=tokens), stop_strings=(), stop_token_ids=())


def _greedy(pipe, n, tokens=32):
    return pipe(parity_images(n), PARITY_PROMPTS[:n], _config(pipe, tokens)).token_ids


FRESH = """
import json, sys, importlib.abc
BLOCK = ('torchax', 'vlmrt.models.', 'vlmrt.export.static_cache', 'vlmrt.export.stablehlo', 'vlmrt.runtimes.jax',
         'vlmrt.runtimes.torchax_bridge', 'vlmrt.runtimes.eager')
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.startswith(BLOCK):
            raise ImportError(f'blocked: {name}')
sys.meta_path.insert(0, Block())
import torch
from vlmrt.models import load_model
from vlmrt.runtimes.stablehlo import StableHloRuntime
loaded = load_model(sys.argv[1])
runtime = StableHloRuntime(loaded, fast_compile=True)
out = {}
for n, ref in torch.load(sys.argv[2], weights_only=False).items():
    ref.tokenizer = loaded.tokenizer
    r = ref.compare(runtime)
    out[n] = {'ok': r.ok, 'summary': r.summary(), 'ref_tokens': r.ref_tokens, 'tokens': r.tokens}
print('MODULES', sorted(m for m in sys.modules if m.startswith(BLOCK) or m == 'vlmrt.models'))
print('RESULTS', json.dumps(out))
"""


@pytest.fixture(scope="module")
def fresh_run(folder, tmp_path_factory):
    """The export run in a fresh interpreter that cannot import vlmrt's model code, torchax, the
    eager runtime or the export side: each stage's tensors, 3 decode steps and 32 free-running greedy
    tokens against eager fp32's (vlmrt/eval/tensor_parity.py `Reference`, computed here), for 1 row
    and for 3 left-padded rows of different lengths (both padded to the batch bucket of 4). The
    batches are made here: SliMM's processor hook lives with its model code."""
    from vlmrt.eval.tensor_parity import Reference
    from vlmrt.runtimes.eager import EagerRuntime

    loaded = load_tiny(CI_PRESET)
    refs = {n: Reference(EagerRuntime(loaded), parity_batch(loaded, n), loaded.tokenizer, 3, 32) for n in (1, 3)}
    for ref in refs.values():
        ref.tokenizer = None  # the fresh process uses the export's own
    path = tmp_path_factory.mktemp("stablehlo-refs") / "refs.pt"
    torch.save(refs, path)
    done = subprocess.run([sys.executable, "-c", FRESH, str(folder), str(path)], capture_output=True, text=True,
                          timeout=600, cwd=ASSETS.parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(x.split(" ", 1) for x in done.stdout.splitlines() if x.startswith(("MODULES", "RESULTS")))
    return lines["MODULES"], {int(n): r for n, r in json.loads(lines["RESULTS"]).items()}


def test_manifest_artefacts_and_weights_as_arguments(folder):
    import jax
    from safetensors.numpy import load_file

    from vlmrt.export import read_manifest

    m = read_manifest(folder)
    assert (m.runtime, m.static) == ("stablehlo", {"batch": [4], "sequence": [192], "cache_len": 192})
    files = sorted(g.info.file for g in m.graphs)
    assert files == ["decoder.b4.t1.shlo", "decoder.b4.t192.shlo", "embedding.b4.t1.shlo", "embedding.b4.t192.shlo",
                     "vision.b4.shlo"]
    weights = load_file(str(folder / "weights.safetensors"))
    params = sum(p.numel() for p in load_tiny(CI_PRESET).model.parameters())
    assert sum(a.size for a in weights.values()) >= params  # every weight (and buffer) once
    weight_bytes = (folder / "weights.safetensors").stat().st_size
    for f in files:  # weights are arguments, not constants: each artefact far smaller than them
        exp = jax.export.deserialize(bytearray((folder / f).read_bytes()))
        assert len(exp.in_avals) >= len(weights)
        assert (folder / f).stat().st_size < weight_bytes / 10, f
    dec = {t.name: t for t in next(g for g in m.graphs if g.info.file == "decoder.b4.t1.shlo").info.inputs}
    assert dec["past_key_values.0.key"].shape == (4, m.num_kv_heads, 192, m.head_dim)
    assert dec["cache_position"].dims == ("batch", "sequence") and dec["cache_position"].dtype == "int32"


def test_runs_with_no_model_code_or_torchax(fresh_run):
    modules, _ = fresh_run
    assert modules == "['vlmrt.models']", modules


@pytest.mark.parametrize("n", [1, 3], ids=["batch1", "batch3"])
def test_greedy_tokens_identical_to_eager(fresh_run, n):
    result = fresh_run[1][n]
    assert [len(ids) for ids in result["ref_tokens"]] == [32] * n
    assert result["tokens"] == result["ref_tokens"]


def test_every_stage_matches_eager(fresh_run):
    for n, result in fresh_run[1].items():
        assert result["ok"], f"{n} rows:\n{result['summary']}"


def test_text_embedding_is_the_live_jax_runtimes(pipe):
    """The text-only embedding artefact gives exactly what the jax runtime's jitted stage gives."""
    from vlmrt.runtimes.jax import JaxRuntime

    assert pipe.runtime.name == "stablehlo"
    ids = torch.tensor([[5], [151643]])
    want = JaxRuntime(load_tiny(CI_PRESET), fast_compile=True).embed(ids, None)
    got = pipe.runtime.embed(ids, None)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


def test_prompt_longer_than_the_largest_bucket(pipe):
    long = " ".join(["word"] * 100)  # about 220 tokens: more than the 192 of the export, less than the context
    cfg = _config(pipe, 4)
    with pytest.raises(VlmrtError, match="do not fit this StableHLO export's KV cache of 192 slots; re-export"):
        pipe(parity_images(1), [long], cfg)
    with pytest.raises(VlmrtError, match=r"no decoder graph .* fits batch 5"):
        pipe.runtime.start(5, 8)


def test_corrupt_or_missing_files_are_clear_errors(folder, pipe, tmp_path, capsys):
    from dataclasses import replace as replaced

    from vlmrt.cli import main
    from vlmrt.runtimes.stablehlo import StableHloRuntime

    copy = tmp_path / "export"
    shutil.copytree(folder, copy)
    loaded = replaced(pipe.loaded, export_dir=copy)
    artefact = copy / "decoder.b4.t1.shlo"
    artefact.write_bytes(b"not an artefact" * 10)
    with pytest.raises(VlmrtError, match="cannot load .*decoder.b4.t1.shlo as a jax.export artefact.*re-export"):
        StableHloRuntime(loaded)
    artefact.unlink()
    assert main(["run", "--model", str(copy), "--image", str(ASSETS / "astronaut.jpg"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is missing decoder.b4.t1.shlo" in err[0], err
    shutil.copy(folder / "decoder.b4.t1.shlo", artefact)
    (copy / "weights.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(VlmrtError, match="cannot read .*weights.safetensors"):
        StableHloRuntime(loaded)


def test_refusals(pipe, tmp_path, capsys):
    from vlmrt.cli import main
    from vlmrt.pipeline import Pipeline

    with pytest.raises(VlmrtError, match="a StableHLO export; it runs on --runtime stablehlo, not onnx"):
        Pipeline(pipe.loaded, "onnx")
    with pytest.raises(VlmrtError, match="runs a StableHLO export folder; make one with `vlmrt export"):
        Pipeline(load_tiny(CI_PRESET), "stablehlo")
    capsys.readouterr()
    assert main(["export", "--model", CI_PRESET, "--out", str(tmp_path / "x"), "--format", "stablehlo",
                 "--batch", "1", "--seq", "4096"]) == 2  # the buckets need no --static-shapes here
    err = capsys.readouterr().err.strip().splitlines()
    assert "--seq 4096 is longer than the model's context of 512" in err[-1], err


def test_missing_jax_names_the_extra(pipe, monkeypatch):
    from vlmrt.pipeline import Pipeline

    real = builtins.__import__

    def no_jax(name, *args, **kwargs):
        if name == "jax" or name.startswith("jax."):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_jax)
    with pytest.raises(VlmrtError, match=r"needs JAX; install the extra: pip install 'vlmrt\[jax\]'"):
        Pipeline(pipe.loaded)


@pytest.mark.skipif(not ALL, reason="an export and XLA compiles per family (~1 min on 2 cores); VLMRT_TEST_JAX=all runs it")
@pytest.mark.parametrize("preset", PRESETS)
def test_every_family_matches_eager_and_the_jax_runtime(preset, tmp_path_factory):
    from vlmrt.pipeline import Pipeline

    loaded = load_tiny(preset)
    pipe = _pipeline(exported(preset, tmp_path_factory))
    live = Pipeline(loaded, "jax", runtime_options={"fast_compile": True})
    for n in (1, 3):
        ref = _greedy(Pipeline(loaded, "eager"), n)
        assert _greedy(pipe, n) == ref, (preset, n)
        assert _greedy(live, n) == ref, (preset, n)
