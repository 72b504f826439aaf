"""The jax runtime (torchax-lowered stages, jitted, preallocated cache) against eager fp32: every
stage's tensors, 32 free-running greedy tokens, and a clear error without the [jax] extra.

XLA compiles each stage at each new shape (seconds apiece on two cores), so CI runs the full check
on one family (SliMM, the family the JAX systems ran); VLMRT_TEST_JAX=all runs it on every family.
"""

import builtins
import importlib.util
import os

import pytest
import torch

from conftest import load_tiny, parity_batch
from vlmrt.errors import VlmrtError

CI_PRESET = "slimm-tiny"
PRESETS = ["slimm-tiny", "minigpt4-tiny", "qwen-vl-tiny", "minicpm-v-tiny"]
ALL = os.environ.get("VLMRT_TEST_JAX") == "all"
pytestmark = pytest.mark.usefixtures("one_thread")


def _preset_param(preset):
    marks = [] if preset == CI_PRESET or ALL else [pytest.mark.skip(
        reason="XLA compiles every stage per family (~20 s on 2 cores); VLMRT_TEST_JAX=all runs it")]
    return pytest.param(preset, marks=marks, id=preset)


_RUNTIMES = {}


def _runtime(preset):
    if importlib.util.find_spec("jax") is None or importlib.util.find_spec("torchax") is None:
        pytest.skip("the [jax] extra (jax, torchax) is not installed")
    from vlmrt.runtimes.jax import JaxRuntime

    if preset not in _RUNTIMES:
        _RUNTIMES[preset] = JaxRuntime(load_tiny(preset), fast_compile=True)
    return _RUNTIMES[preset]


@pytest.mark.parametrize("preset", [_preset_param(p) for p in PRESETS])
def test_stages_and_32_greedy_tokens_match_eager(preset):
    from vlmrt.eval.tensor_parity import runtime_parity
    from vlmrt.runtimes.eager import EagerRuntime

    loaded, runtime = load_tiny(preset), _runtime(preset)
    result = runtime_parity(EagerRuntime(loaded), runtime, parity_batch(loaded, 2), loaded.tokenizer,
                            steps=3, token_steps=32)
    result.assert_ok("jax")
    assert all(len(ids) == 32 for ids in result.tokens)
    assert runtime.stage_modes == {"vision": "jit", "embedding": "jit", "decoder": "jit"}


def test_cache_is_preallocated_and_reused():
    """start() allocates [B,H_kv,S,hd] per layer, S rounded up to a shared bucket; decode keeps the shapes."""
    runtime = _runtime(CI_PRESET)
    from vlmrt.runtimes.jax import SEQ_BUCKET

    m = runtime.model
    runtime.start(2, 5)
    assert runtime.seq == SEQ_BUCKET
    assert [tuple(k.shape) for k in runtime.keys] == [(2, m.num_kv_heads, SEQ_BUCKET, m.head_dim)] * m.num_layers
    with pytest.raises(VlmrtError, match="do not fit the model's context"):
        runtime.start(1, m.max_context + 1)


def test_slot_past_the_cache_is_an_error():
    runtime = _runtime(CI_PRESET)
    runtime.start(1, 4)
    d = runtime.embed(torch.tensor([[1]]), None)
    embeds = d["inputs_embeds"] if isinstance(d, dict) else d
    with pytest.raises(VlmrtError, match="past the"):
        runtime.decode(embeds, torch.zeros(3, 1, 1, dtype=torch.long), torch.ones(1, runtime.seq + 1, dtype=torch.long),
                       torch.tensor([runtime.seq]))


def test_missing_extra_names_it(monkeypatch):
    """Without jax (or torchax) installed, choosing the runtime says which extra to install."""
    from vlmrt.runtimes import runtime_class
    from vlmrt.runtimes.torchax_bridge import import_jax

    real_import = builtins.__import__

    def no_jax(name, *args, **kwargs):
        if name == "jax" or name.startswith("jax.") or name == "torchax":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_jax)
    with pytest.raises(VlmrtError, match=r"vlmrt\[jax\]"):
        import_jax()
    with pytest.raises(VlmrtError, match=r"vlmrt\[jax\]"):
        runtime_class("jax")(load_tiny(CI_PRESET))


def _features(out):
    return out["image_features"] if isinstance(out, dict) else out


def test_engine_steps_match_eager():
    """run_step on the engine's pool: a two-row prefill at slots [0, T) and one decode step, against
    eager's run_step on the same inputs (the shapes of the parity test: no new compile)."""
    from vlmrt.engine import StepInputs
    from vlmrt.generate import prompt_positions, split_embedded
    from vlmrt.runtimes.eager import EagerRuntime

    loaded, runtime = load_tiny(CI_PRESET), _runtime(CI_PRESET)
    eager, batch = EagerRuntime(loaded), parity_batch(loaded, 2)
    from vlmrt.runtimes.jax import SEQ_BUCKET

    b, t = batch["input_ids"].shape
    embeds, extras = split_embedded(eager.embed(batch["input_ids"], eager.encode_images(batch["pixel_values"],
                                                **{k: v for k, v in batch.items() if k == "image_grid_thw"})))
    positions = prompt_positions(batch)
    mask = torch.zeros(b, SEQ_BUCKET, dtype=torch.long)
    mask[:, :t] = batch["attention_mask"]
    slots = torch.arange(t)[None].expand(b, t).contiguous()
    steps = [StepInputs(0, b, embeds, positions, slots, mask, torch.tensor([t - 1]), extras)]
    mask2 = mask.clone()
    mask2[:, t] = 1
    token = torch.tensor([[5], [7]])
    steps.append(StepInputs(0, b, split_embedded(eager.embed(token, None))[0], positions[..., -1:] + 1, torch.full((b, 1), t), mask2))
    with torch.inference_mode():  # as the engine runs its steps
        for rt in (eager, runtime):
            rt.allocate_slots(b, SEQ_BUCKET - 1)
        for step in steps:
            ref, out = eager.run_step(step), runtime.run_step(step)
            assert out.shape == ref.shape
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        one = parity_batch(loaded, 1)  # one image: a new shape, so the vision stage is traced in inference mode
        kwargs = {k: v for k, v in one.items() if k == "image_grid_thw"}
        torch.testing.assert_close(_features(runtime.encode_images(one["pixel_values"], **kwargs)),
                                   _features(eager.encode_images(one["pixel_values"], **kwargs)), rtol=1e-4, atol=1e-5)
    valid = mask2.bool()
    for k_ref, k_out in zip(eager.pool.keys, runtime.pool.keys):
        torch.testing.assert_close(k_out.transpose(1, 2)[valid], k_ref.transpose(1, 2)[valid], rtol=1e-4, atol=1e-5)


def test_beam_search_matches_eager():
    """Beam search prefills B prompts into a cache of B*K rows, then reorders rows: same beams as eager."""
    from vlmrt.config import GenerationConfig
    from vlmrt.generate import generate
    from vlmrt.runtimes.eager import EagerRuntime

    loaded, runtime = load_tiny(CI_PRESET), _runtime(CI_PRESET)
    batch, cfg = parity_batch(loaded, 2), GenerationConfig(max_new_tokens=4, num_beams=2)
    ref = generate(EagerRuntime(loaded), batch, cfg, loaded.tokenizer).token_ids
    assert generate(runtime, batch, cfg, loaded.tokenizer).token_ids == ref


def test_torch_compile_still_works_after_torchax_is_imported():
    """torchax renames torch's PrivateUse1 backend to "jax"; a later torch.compile in the same
    process (the compiled runtime beside the jax one, or the next test file) must still trace."""
    if importlib.util.find_spec("jax") is None or importlib.util.find_spec("torchax") is None:
        pytest.skip("the [jax] extra (jax, torchax) is not installed")
    from vlmrt.runtimes.torchax_bridge import import_jax

    import_jax()
    torch._dynamo.reset()
    f = torch.compile(lambda x: x * 2 + 1, backend="eager")
    assert torch.equal(f(torch.arange(3)), torch.arange(3) * 2 + 1)
