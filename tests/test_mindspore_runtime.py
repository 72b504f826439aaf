"""The mindspore runtime (stages lowered from torch.export programs to MindSpore graphs) against
eager fp32 on SliMM, the family the MindSpore system ran: every stage's tensors and 32 free-running
greedy tokens; the MINDIR export run by `mindspore.load` + `nn.GraphCell` in a fresh interpreter that
cannot import vlmrt's model code or the lowering, giving eager's tensors and the live runtime's
tokens; engine steps, the cache, an op the lowering does not know, and clear errors without the
[mindspore] extra.

MindSpore needs numpy<2, so these tests run in their own virtual environment (.ci/run); in the main
one, only the tests that need no MindSpore run. VLMRT_TEST_MINDSPORE=all runs the parity check on
every family.
"""

import builtins
import functools
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ASSETS, load_tiny, parity_batch
from vlmrt.errors import VlmrtError

CI_PRESET = "slimm-tiny"
PRESETS = ["slimm-tiny", "minigpt4-tiny", "qwen-vl-tiny", "minicpm-v-tiny"]
ALL = os.environ.get("VLMRT_TEST_MINDSPORE") == "all"
pytestmark = pytest.mark.usefixtures("one_thread")
needs_mindspore = pytest.mark.skipif(
    importlib.util.find_spec("mindspore") is None,
    reason="the [mindspore] extra (mindspore, numpy<2: its own virtual environment) is not installed")

_RUNTIMES = {}
_LIVE = {}  # the CI preset's parity result on the live runtime


def _runtime(preset):
    from vlmrt.runtimes.mindspore import MindSporeRuntime

    if preset not in _RUNTIMES:
        _RUNTIMES[preset] = MindSporeRuntime(load_tiny(preset), threads=1)
    return _RUNTIMES[preset]


def _preset_param(preset):
    marks = [needs_mindspore] + ([] if preset == CI_PRESET or ALL else [pytest.mark.skip(
        reason="lowering runs torch.export per stage (tens of seconds per family); VLMRT_TEST_MINDSPORE=all runs it")])
    return pytest.param(preset, marks=marks, id=preset)


@pytest.fixture(scope="module")
def reference():
    """Eager fp32's stage tensors, 3 decode steps and 32 greedy tokens on two left-padded rows."""
    from vlmrt.eval.tensor_parity import Reference
    from vlmrt.runtimes.eager import EagerRuntime

    loaded = load_tiny(CI_PRESET)
    return Reference(EagerRuntime(loaded), parity_batch(loaded, 2), loaded.tokenizer, 3, 32)


@pytest.mark.parametrize("preset", [_preset_param(p) for p in PRESETS])
def test_stages_and_32_greedy_tokens_match_eager(preset, reference):
    from vlmrt.eval.tensor_parity import runtime_parity
    from vlmrt.runtimes.eager import EagerRuntime

    loaded, runtime = load_tiny(preset), _runtime(preset)
    if preset == CI_PRESET:
        result = _LIVE[preset] = reference.compare(runtime)
    else:
        result = runtime_parity(EagerRuntime(loaded), runtime, parity_batch(loaded, 2), loaded.tokenizer,
                                steps=3, token_steps=32)
    result.assert_ok("mindspore")
    assert all(len(ids) == 32 for ids in result.tokens)


FRESH = """
import json, sys, importlib.abc
BLOCK = ('vlmrt.models.', 'vlmrt.export.static_cache', 'vlmrt.export.mindir', 'vlmrt.export.aoti',
         'vlmrt.runtimes.mindspore_lower', 'vlmrt.runtimes.aten_lower', 'vlmrt.runtimes.eager')
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.startswith(BLOCK):
            raise ImportError(f'blocked: {name}')
sys.meta_path.insert(0, Block())
import torch
from vlmrt.models import load_model
from vlmrt.pipeline import Pipeline
runtime = Pipeline(load_model(sys.argv[1])).runtime  # the manifest picks the runtime
ref = torch.load(sys.argv[2], weights_only=False)
ref.tokenizer = runtime.loaded.tokenizer
r = ref.compare(runtime)
print('MODULES', sorted(m for m in sys.modules if m.startswith(BLOCK) or m == 'vlmrt.models'))
print('RESULTS', json.dumps({'name': runtime.name, 'kind': runtime.kind, 'ok': r.ok, 'summary': r.summary(),
                             'tokens': r.tokens}))
"""


@needs_mindspore
def test_mindir_export_in_a_fresh_process_matches_eager_and_the_live_runtime(reference, tmp_path):
    """The export, saved from the live runtime's Cells (no second lowering), run on GraphCells in an
    interpreter where the model code, the lowering and the export side cannot be imported: every
    stage's tensors against eager's, and the live runtime's 32 tokens; then the errors of a broken folder."""
    from vlmrt.export import read_manifest
    from vlmrt.export.mindir import export_mindir_model

    live = _runtime(CI_PRESET)
    out = tmp_path / "mindir"
    export_mindir_model(load_tiny(CI_PRESET), out, lowered=live.lowered)
    m = read_manifest(out)
    assert m.runtime == "mindspore" and sorted(g.info.file for g in m.graphs) == [
        "decoder.mindir", "embedding.mindir", "vision.mindir"]
    path = tmp_path / "reference.pt"
    tokenizer, reference.tokenizer = reference.tokenizer, None  # the fresh process uses the export's own
    try:
        torch.save(reference, path)
    finally:
        reference.tokenizer = tokenizer
    done = subprocess.run([sys.executable, "-c", FRESH, str(out), str(path)], capture_output=True, text=True,
                          timeout=600, cwd=ASSETS.parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(x.split(" ", 1) for x in done.stdout.splitlines() if x.startswith(("MODULES", "RESULTS")))
    assert lines["MODULES"] == "['vlmrt.models']", lines["MODULES"]
    got = json.loads(lines["RESULTS"])
    assert got["name"] == "mindspore" and "GraphCell" in got["kind"]
    assert got["ok"], got["summary"]
    live_tokens = (_LIVE.get(CI_PRESET) or reference.compare(live)).tokens
    assert got["tokens"] == live_tokens
    _broken_exports_are_named(out)


def _broken_exports_are_named(out):
    """Another runtime asked for, and a corrupt MINDIR file: one clear line each."""
    from vlmrt.models import load_model
    from vlmrt.pipeline import Pipeline
    from vlmrt.runtimes.mindspore import MindSporeRuntime

    with pytest.raises(VlmrtError, match="runs on --runtime mindspore"):
        Pipeline(load_model(str(out)), "onnx")
    path = out / "vision.mindir"
    path.chmod(0o600)  # MindSpore writes its files read-only
    path.write_bytes(b"not a MINDIR file")
    with pytest.raises(VlmrtError, match=r"cannot load .*vision\.mindir.*--format mindir"):
        MindSporeRuntime(load_model(str(out)))


@needs_mindspore
def test_engine_steps_match_eager():
    """run_step on the engine's pool (a two-row prefill with M-RoPE positions [3,B,T], one decode step
    with text positions [B,1], as the engine gives them) against eager's."""
    from vlmrt.engine import StepInputs
    from vlmrt.generate import prompt_positions, split_embedded, vision_inputs
    from vlmrt.runtimes.eager import EagerRuntime

    loaded, runtime = load_tiny(CI_PRESET), _runtime(CI_PRESET)
    eager, batch = EagerRuntime(loaded), parity_batch(loaded, 2)
    b, t = batch["input_ids"].shape
    feats = eager.encode_images(batch["pixel_values"], **vision_inputs(batch))
    embeds, extras = split_embedded(eager.embed(batch["input_ids"], feats))
    positions, s = prompt_positions(batch), t + 8
    mask = torch.zeros(b, s + 1, dtype=torch.long)
    mask[:, :t] = batch["attention_mask"]
    slots = torch.arange(t)[None].expand(b, t).contiguous()
    mask2 = mask.clone()
    mask2[:, t] = 1
    steps = [StepInputs(0, b, embeds, positions, slots, mask, torch.tensor([t - 1]), extras),
             StepInputs(0, b, split_embedded(eager.embed(torch.tensor([[5], [7]]), None))[0], positions[0, :, -1:] + 1,
                        torch.full((b, 1), t), mask2)]  # text positions [B,1], as the engine gives them
    with torch.inference_mode():  # as the engine runs its steps
        for rt in (eager, runtime):
            rt.allocate_slots(b, s)
        for step in steps:
            torch.testing.assert_close(runtime.run_step(step), eager.run_step(step), rtol=1e-4, atol=1e-4)
    valid = mask2.bool()
    for k_ref, k_out in zip(eager.pool.keys, runtime.pool.keys):
        torch.testing.assert_close(k_out.transpose(1, 2)[valid], k_ref.transpose(1, 2)[valid], rtol=1e-4, atol=1e-5)


@needs_mindspore
def test_cache_shape_and_bad_slots():
    from vlmrt.generate import split_embedded

    runtime = _runtime(CI_PRESET)
    runtime.start(2, 5)
    assert [tuple(k.shape) for k in runtime.keys] == [(2, runtime.num_kv_heads, 128, runtime.head_dim)] * runtime.num_layers
    with pytest.raises(VlmrtError, match="do not fit the model's context"):
        runtime.start(1, runtime.max_context + 1)
    runtime.start(1, 4)
    embeds = split_embedded(runtime.embed(torch.tensor([[1]]), None))[0]
    with pytest.raises(VlmrtError, match="past the"):
        runtime.decode(embeds, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 5, dtype=torch.long),
                       torch.tensor([runtime.seq]))


def test_an_op_the_lowering_does_not_know_is_named():
    """Lowering is plain Python over the torch.export graph: this runs without MindSpore too."""
    from vlmrt.runtimes.mindspore_lower import lower_program

    class Odd(torch.nn.Module):
        def forward(self, x):
            return torch.special.bessel_j0(x)

    ep = torch.export.export(Odd(), (torch.ones(2),)).run_decompositions()
    with pytest.raises(VlmrtError, match=r"vision stage uses aten\.special_bessel_j0.*MindSpore lowering"):
        lower_program(ep, ["pixel_values"], ["image_features"], "vision", "odd")


class _Foldable(torch.nn.Module):
    """A linear layer, x * 1.0, permutes that compose to the identity, a same-shape expand and a
    linear layer on a non-contiguous input (torch.export writes it as a bmm of the expanded weight)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.out = torch.nn.Linear(8, 4), torch.nn.Linear(4, 4, bias=False)

    def forward(self, x):  # x [B,T,8]
        y = self.lin(x) * 1.0  # [B,T,4]
        z = y.permute(2, 0, 1).permute(0, 2, 1).permute(2, 1, 0).transpose(1, 2).transpose(1, 2)  # y
        z = z.unsqueeze(1).expand(-1, 2, -1, -1).transpose(1, 2).reshape(x.shape[0], -1, 8)[..., :4]  # [B,T,4]
        return (self.out(z).expand(x.shape[0], -1, -1) + y,)


@functools.cache
def _folded():
    from torch.export import Dim

    from vlmrt.runtimes.mindspore_lower import lower_program

    module = _Foldable().eval()
    dims = ({0: Dim("batch", min=1, max=8), 1: Dim("sequence", min=1, max=64)},)
    ep = torch.export.export(module, (torch.randn(2, 3, 8),), dynamic_shapes=dims).run_decompositions()
    return module, lower_program(ep, ["x"], ["y"], "decoder", "foldable")


def test_the_lowering_writes_no_kernel_where_none_is_needed():
    """The folds of vlmrt/runtimes/mindspore_fold.py, read in the source (no MindSpore needed):
    unfolded, the module is 8 transposes (a weight's among them), 3 broadcasts and a multiply by 1."""
    source = _folded()[1].source
    assert "vops.matmul_t(view, p_lin_weight)" in source and "ops.transpose(p_lin_weight" not in source
    assert source.count("ops.transpose(") == 2  # the head transpose, the bmm's weight (a small one)
    assert source.count("ops.broadcast_to(") == 1 and "* 1.0" not in source
    assert "ops.reshape(x, (-1, 8))" in source  # one size-dependent dim: a constant shape


@needs_mindspore
def test_the_folded_graph_matches_torch_at_two_shapes(tmp_path):
    """One dynamic-shape graph of the folded source against torch at two batch and sequence sizes."""
    from vlmrt.runtimes.mindspore import to_ms, to_torch
    from vlmrt.runtimes.mindspore_lower import build_cell

    module, lowered = _folded()
    cell = build_cell(lowered, tmp_path, "foldable")
    for shape in [(2, 3, 8), (1, 5, 8)]:
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(to_torch(cell(to_ms(x))[0]), module(x)[0], rtol=1e-5, atol=1e-6)


def test_missing_extra_names_it(monkeypatch):
    """Without mindspore installed, the runtime and the export format say which extra to install."""
    from vlmrt.export import export
    from vlmrt.runtimes import runtime_class

    real_import = builtins.__import__

    def no_mindspore(name, *args, **kwargs):
        if name == "mindspore" or name.startswith("mindspore."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mindspore)
    with pytest.raises(VlmrtError, match=r"vlmrt\[mindspore\].*numpy<2"):
        runtime_class("mindspore")(load_tiny(CI_PRESET))
    with pytest.raises(VlmrtError, match=r"vlmrt\[mindspore\]"):
        export(CI_PRESET, "/nonexistent/never-written", format="mindir")


@needs_mindspore
def test_numpy_2_is_refused_with_the_reason(monkeypatch):
    """MindSpore's ops fail at run time under numpy 2: the runtime says so before anything runs."""
    import vlmrt.runtimes.mindspore as msrt

    monkeypatch.setattr(msrt.np, "__version__", "2.1.0")
    with pytest.raises(VlmrtError, match=r"needs numpy<2 \(numpy 2\.1\.0"):
        msrt.import_mindspore()


_BESIDE_PADDLE = """
import os, sys
from vlmrt.errors import VlmrtError
from vlmrt.runtimes import load_frameworks
from vlmrt.runtimes.mindspore import import_mindspore
if sys.argv[1] == "first":
    load_frameworks(["eager", "paddle", "mindspore"])
import paddle
try:
    import_mindspore()
except VlmrtError as e:
    print("error:", e)
print("GLOG_v:", os.environ.get("GLOG_v"))
"""


@needs_mindspore
@pytest.mark.skipif(importlib.util.find_spec("paddle") is None, reason="paddlepaddle is not in this environment")
@pytest.mark.parametrize("order", ["first", "after"])
def test_mindspore_beside_paddle_in_one_process(order):
    """MindSpore's CPU plugin fails to load once Paddle's oneDNN is loaded: a --runtime list loads it
    first; loaded after Paddle, the error says why and what to do. Its GLOG_v is not left for Paddle."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)}
    env.pop("GLOG_v", None)
    out = subprocess.run([sys.executable, "-c", _BESIDE_PADDLE, order], capture_output=True, text=True, env=env,
                         timeout=300).stdout
    if order == "first":
        assert "error:" not in out, out
    else:
        assert "cannot load after Paddle" in out and "load mindspore first" in out, out
    assert "GLOG_v: None" in out, out
