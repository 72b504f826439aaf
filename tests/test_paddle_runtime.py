"""The paddle runtime (stages lowered from torch.export programs to Paddle static programs) against
eager fp32: every stage's tensors and 32 free-running greedy tokens; the Paddle export (Paddle
Inference predictors) giving the same tokens with no model code imported; engine steps, beam search,
an op the lowering does not know, and a clear error without the [paddle] extra.

Lowering runs torch.export on each stage (tens of seconds per family on two cores), so CI runs the
family the Paddle systems ran first (MiniGPT-4) once per module; VLMRT_TEST_PADDLE=all runs the
parity check on every family.
"""

import builtins
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from conftest import ASSETS, load_tiny, parity_batch
from vlmrt.errors import VlmrtError

CI_PRESET = "minigpt4-tiny"
PRESETS = ["minigpt4-tiny", "qwen-vl-tiny", "slimm-tiny", "minicpm-v-tiny"]
ALL = os.environ.get("VLMRT_TEST_PADDLE") == "all"
pytestmark = pytest.mark.usefixtures("one_thread")
needs_paddle = pytest.mark.skipif(importlib.util.find_spec("paddle") is None,
                                  reason="the [paddle] extra (paddlepaddle) is not installed")

_RUNTIMES = {}


def _runtime(preset):
    from vlmrt.runtimes.paddle import PaddleRuntime

    if preset not in _RUNTIMES:
        _RUNTIMES[preset] = PaddleRuntime(load_tiny(preset), threads=1)
    return _RUNTIMES[preset]


def _preset_param(preset):
    marks = [needs_paddle] + ([] if preset == CI_PRESET or ALL else [pytest.mark.skip(
        reason="lowering runs torch.export per stage (~1 min per family on 2 cores); VLMRT_TEST_PADDLE=all runs it")])
    return pytest.param(preset, marks=marks, id=preset)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The CI preset's Paddle export, saved from the live runtime's programs (no second lowering)."""
    from vlmrt.export.paddle import export_paddle_model

    out = tmp_path_factory.mktemp("paddle-export")
    export_paddle_model(load_tiny(CI_PRESET), out, force=True, lowered=_runtime(CI_PRESET).lowered)
    return out


@pytest.mark.parametrize("preset", [_preset_param(p) for p in PRESETS])
def test_stages_and_32_greedy_tokens_match_eager(preset):
    from vlmrt.eval.tensor_parity import runtime_parity
    from vlmrt.runtimes.eager import EagerRuntime

    loaded, runtime = load_tiny(preset), _runtime(preset)
    result = runtime_parity(EagerRuntime(loaded), runtime, parity_batch(loaded, 2), loaded.tokenizer,
                            steps=3, token_steps=32)
    result.assert_ok("paddle")
    assert all(len(ids) == 32 for ids in result.tokens)


@needs_paddle
def test_export_round_trip_gives_the_same_tokens(exported):
    """Paddle Inference predictors over the saved programs: the live runtime's tokens, and a manifest
    naming the paddle runtime, so `vlmrt run --model DIR` picks it."""
    from vlmrt.config import GenerationConfig
    from vlmrt.export import read_manifest
    from vlmrt.generate import generate
    from vlmrt.models import load_model
    from vlmrt.pipeline import Pipeline

    m = read_manifest(exported)
    assert m.runtime == "paddle" and sorted(g.info.file for g in m.graphs) == ["decoder.json", "embedding.json", "vision.json"]
    dec = {t.name: t.shape for t in m.stages["decoder"].inputs}
    assert dec["past_key_values.0.key"] == ("batch", m.num_kv_heads, "cache_sequence", m.head_dim)
    runtime = Pipeline(load_model(str(exported))).runtime
    assert runtime.name == "paddle" and "predictors" in runtime.kind
    loaded = load_tiny(CI_PRESET)
    batch, cfg = parity_batch(loaded, 2), GenerationConfig(max_new_tokens=32)
    assert generate(runtime, batch, cfg, loaded.tokenizer).token_ids == \
        generate(_runtime(CI_PRESET), batch, cfg, loaded.tokenizer).token_ids
    with pytest.raises(VlmrtError, match="runs on --runtime paddle"):
        Pipeline(load_model(str(exported)), "onnx")


@needs_paddle
def test_export_runs_with_no_model_code_imported(exported):
    """A fresh interpreter runs the export; no module of vlmrt.models but the registry is imported,
    and neither the lowering nor the export code."""
    code = (
        "import sys\n"
        "from vlmrt.cli import main\n"
        f"assert main(['run', '--model', {str(exported)!r}, '--image', {str(ASSETS / 'astronaut.jpg')!r}, "
        "'--prompt', 'hi', '--max-new-tokens', '4']) == 0\n"
        "assert 'vlmrt.runtimes.paddle' in sys.modules\n"
        "print('MODULES', sorted(m for m in sys.modules if m.startswith('vlmrt.models') "
        "or m in ('vlmrt.runtimes.paddle_lower', 'vlmrt.export.paddle', 'vlmrt.export.aoti')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=ASSETS.parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("MODULES"))
    assert line == "MODULES ['vlmrt.models']", line


@needs_paddle
def test_engine_steps_and_beam_search_match_eager():
    """run_step on the engine's pool (a two-row prefill over whole rows, one decode step over an
    attention window shorter than the rows) against eager's, and beam search (a B*K-row cache, rows
    reordered) against eager's beams."""
    from vlmrt.config import GenerationConfig
    from vlmrt.engine import StepInputs, attention_window
    from vlmrt.generate import generate, prompt_positions, split_embedded
    from vlmrt.runtimes.eager import EagerRuntime

    loaded, runtime = load_tiny(CI_PRESET), _runtime(CI_PRESET)
    eager, batch = EagerRuntime(loaded), parity_batch(loaded, 2)
    b, t = batch["input_ids"].shape
    embeds, extras = split_embedded(eager.embed(batch["input_ids"], eager.encode_images(batch["pixel_values"])))
    positions, s = prompt_positions(batch), t + 100  # rows longer than the decode step's window
    mask = torch.zeros(b, s + 1, dtype=torch.long)
    mask[:, :t] = batch["attention_mask"]
    slots = torch.arange(t)[None].expand(b, t).contiguous()
    mask2 = mask.clone()
    mask2[:, t] = 1
    steps = [StepInputs(0, b, embeds, positions, slots, mask, torch.tensor([t - 1]), extras),
             StepInputs(0, b, split_embedded(eager.embed(torch.tensor([[5], [7]]), None))[0], positions[..., -1:] + 1,
                        torch.full((b, 1), t), mask2, window=t + 1)]
    with torch.inference_mode():  # as the engine runs its steps
        for rt in (eager, runtime):
            rt.allocate_slots(b, s)
        for step in steps:
            torch.testing.assert_close(runtime.run_step(step), eager.run_step(step), rtol=1e-4, atol=1e-4)
    assert attention_window(steps[1], s)[0] < s + 1  # the decode step read a window, not whole rows
    valid = mask2.bool()
    for k_ref, k_out in zip(eager.pool.keys, runtime.pool.keys):
        torch.testing.assert_close(k_out.transpose(1, 2)[valid], k_ref.transpose(1, 2)[valid], rtol=1e-4, atol=1e-5)
    cfg = GenerationConfig(max_new_tokens=4, num_beams=2)
    assert generate(runtime, batch, cfg, loaded.tokenizer).token_ids == generate(eager, batch, cfg, loaded.tokenizer).token_ids


@needs_paddle
def test_cache_shape_and_bad_slots():
    runtime = _runtime(CI_PRESET)
    runtime.start(2, 5)
    assert [k.shape for k in runtime.keys] == [[2, runtime.num_kv_heads, 5, runtime.head_dim]] * runtime.num_layers
    with pytest.raises(VlmrtError, match="do not fit the model's context"):
        runtime.start(1, runtime.max_context + 1)
    runtime.start(1, 4)
    embeds = runtime.embed(torch.tensor([[1]]), None)
    with pytest.raises(VlmrtError, match="past the"):
        runtime.decode(embeds, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 5, dtype=torch.long), torch.tensor([4]))


@needs_paddle
def test_an_op_the_lowering_does_not_know_is_named():
    from vlmrt.runtimes.paddle_lower import lower_program

    class Odd(torch.nn.Module):
        def forward(self, x):
            return torch.special.bessel_j0(x)

    ep = torch.export.export(Odd(), (torch.ones(2),)).run_decompositions()
    with pytest.raises(VlmrtError, match=r"vision stage uses aten\.special_bessel_j0"):
        lower_program(ep, ["pixel_values"], ["image_features"], "vision", "odd")


@needs_paddle
def test_linear_layers_read_their_weights_transposed_not_copied(tmp_path):
    """torch.export writes a linear layer as mm(x, permute(weight)): the lowering gives the matmul
    transpose_y and writes no transpose (Paddle ran it as a weight copy at every call)."""
    from vlmrt.runtimes.paddle import to_paddle
    from vlmrt.runtimes.paddle_lower import build_layer, lower_program

    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4, bias=False)).eval()
    x = torch.randn(2, 3, 8)
    ep = torch.export.export(lin, (x,)).run_decompositions()
    lowered = lower_program(ep, ["pixel_values"], ["image_features"], "vision", "linear")
    assert lowered.source.count("transpose_y=True") == 2 and "paddle.transpose" not in lowered.source
    out = build_layer(lowered, tmp_path, "linear")(to_paddle(x))[0]
    torch.testing.assert_close(torch.from_dlpack(out), lin(x), rtol=1e-5, atol=1e-6)


def test_missing_extra_names_it(monkeypatch):
    """Without paddle installed, the runtime and the export format say which extra to install."""
    from vlmrt.export import export
    from vlmrt.runtimes import runtime_class

    real_import = builtins.__import__

    def no_paddle(name, *args, **kwargs):
        if name == "paddle" or name.startswith("paddle."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_paddle)
    with pytest.raises(VlmrtError, match=r"vlmrt\[paddle\]"):
        runtime_class("paddle")(load_tiny(CI_PRESET))
    with pytest.raises(VlmrtError, match=r"vlmrt\[paddle\]"):
        export(CI_PRESET, "/nonexistent/never-written", format="paddle")
