"""Planted bugs: the tests of runtimes must catch the mistakes that positions, masks, caches and
batches invite. Each bug is planted into a working runtime at its boundary (monkeypatching its
methods, or the decoder's config for the rotary theta; no source edits), and:

1. the tensor-level parity helper (vlmrt/eval/tensor_parity.py) must report a failure, at the stage
   where the bug sits, on every runtime (eager, compiled, onnx) and for two families (a Llama
   decoder with Q-Former features, and SliMM's M-RoPE + DeepStack decoder);
2. on every family's tiny preset, the bugs that reach the decoder change the greedy tokens within a
   few steps, and a different image gives a different answer (the synthetic weights see their
   inputs, vlmrt/weights.py).

A planted bug the helper misses is a failing test; so is an unplanted runtime the helper rejects.
"""

import copy
import dataclasses

import pytest
import torch
from PIL import Image

from conftest import ASSETS, load_tiny
from families import FAMILY_TESTS
from vlmrt.eval.tensor_parity import Reference
from vlmrt.models.layers import LlamaForCausalLM
from vlmrt.pipeline import Pipeline
from vlmrt.processor import Processor
from vlmrt.runtimes import runtime_class

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["Describe this image.", "What is the person holding?", "Hi"]  # three lengths: left padding
PLANTED_FAMILIES = ["minigpt4-tiny", "slimm-tiny"]


def photo():
    return Image.open(ASSETS / "astronaut.jpg").convert("RGB")


def _is_decode(embeds) -> bool:
    return embeds.shape[1] == 1


def _wrap_decode(monkeypatch, runtime, change):
    """runtime.decode (the lock-step loop) and, where the runtime has one, runtime.run_step (the
    engine, vlmrt/engine.py) with their arguments passed through `change(embeds, positions, mask,
    slots)`; slots are [T] from the loop, [n,T] (per row) from the engine."""
    decode = runtime.decode

    def planted(embeds, positions, mask, slots, **extras):
        return decode(*change(embeds, positions, mask, slots), **extras)

    monkeypatch.setattr(runtime, "decode", planted)
    if hasattr(runtime, "run_step"):
        run_step = runtime.run_step

        def planted_step(step):
            e, p, m, s = change(step.inputs_embeds, step.position_ids, step.attention_mask, step.cache_position)
            return run_step(dataclasses.replace(step, inputs_embeds=e, position_ids=p, attention_mask=m, cache_position=s))

        monkeypatch.setattr(runtime, "run_step", planted_step)


def position_plus_one(monkeypatch, runtime):
    """Decode steps see their position + 1 (prefill is right)."""
    _wrap_decode(monkeypatch, runtime, lambda e, p, m, s: (e, p + 1 if _is_decode(e) else p, m, s))


def previous_slot_masked(monkeypatch, runtime):
    """A decode step cannot see the slot of the token before it."""
    def change(e, p, m, s):
        if _is_decode(e):
            m = m.clone()
            if s.dim() == 2:  # the engine: each row its own slot
                m[torch.arange(m.shape[0]), s[:, 0] - 1] = 0
            else:
                m[:, int(s[0]) - 1] = 0
        return e, p, m, s
    _wrap_decode(monkeypatch, runtime, change)


def padding_mask_dropped(monkeypatch, runtime):
    """Left padding counts as real tokens: every slot before a row's last valid one is marked valid."""
    def change(e, p, m, s):
        return e, p, m.flip(-1).cummax(-1).values.flip(-1), s  # [B,S]: 0 0 1 1 0 -> 1 1 1 1 0
    _wrap_decode(monkeypatch, runtime, change)


def rows_swapped(monkeypatch, runtime):
    """The prompt's first two rows trade their embeddings (positions and masks stay): rows mixed up."""
    def change(e, p, m, s):
        return (e if _is_decode(e) else e[[1, 0, *range(2, e.shape[0])]]), p, m, s
    _wrap_decode(monkeypatch, runtime, change)


def features_scaled(monkeypatch, runtime):
    """The vision stage's features come out x1.5 (every named output, for families with several)."""
    encode = runtime.encode_images

    def planted(pixels, **kw):
        out = encode(pixels, **kw)
        return {k: v * 1.5 for k, v in out.items()} if isinstance(out, dict) else out * 1.5

    monkeypatch.setattr(runtime, "encode_images", planted)


def rope_theta_doubled(monkeypatch, model):
    """The decoder's rotary base x2 (planted in the model, before a runtime is built from it)."""
    decoder = next(m for m in model.modules() if isinstance(m, LlamaForCausalLM))
    monkeypatch.setattr(decoder, "config", dataclasses.replace(decoder.config, rope_theta=2 * decoder.config.rope_theta))


RUNTIME_BUGS = {  # bug -> (planter, the first check that must fail)
    "decode_position_plus_1": (position_plus_one, "decode_step_1"),
    "previous_kv_slot_masked": (previous_slot_masked, "decode_step_1"),
    "image_features_x1.5": (features_scaled, "vision"),
    "left_padding_mask_dropped": (padding_mask_dropped, "prefill_logits"),
    "two_rows_swapped": (rows_swapped, "prefill_logits"),
}
RUNTIMES = ["eager", "compiled", "onnx"]


def _batch(loaded):
    return Processor(loaded.spec, loaded.tokenizer)([photo()] * 3, PROMPTS)


def _build(name, loaded, tmp_path_factory, tag=""):
    """A runtime on `loaded` (compiled: dynamo's "eager" backend, to skip Inductor's C++ builds)."""
    if name == "onnx":
        from onnx_exports import exported
        from vlmrt.export import export_model
        from vlmrt.models import load_model

        if not tag:  # the healthy model: the export the other onnx tests share
            return runtime_class("onnx")(load_model(str(exported(loaded.name, tmp_path_factory))))
        out = tmp_path_factory.mktemp(f"planted-{loaded.name}{tag}")
        export_model(loaded, out, force=True, progress=None)
        return runtime_class("onnx")(load_model(str(out)))
    options = {"max_batch": 4, "batch_buckets": (4,), "backend": "eager"} if name == "compiled" else {}
    return runtime_class(name)(loaded, **options)


_REFERENCES = {}


def reference(preset):
    """Eager fp32 on the tiny preset: the trace every planted runtime is compared with (4 steps)."""
    if preset not in _REFERENCES:
        loaded = load_tiny(preset)
        _REFERENCES[preset] = Reference(runtime_class("eager")(loaded), _batch(loaded), loaded.tokenizer, steps=4)
    return _REFERENCES[preset]


@pytest.fixture(scope="module", params=[(r, p) for r in RUNTIMES for p in PLANTED_FAMILIES],
                ids=lambda rp: f"{rp[0]}-{rp[1]}")
def built(request, tmp_path_factory):
    """(runtime name, preset, a healthy runtime): built once, bugs are planted per test."""
    name, preset = request.param
    return name, preset, _build(name, load_tiny(preset), tmp_path_factory)


def test_the_helper_passes_the_runtime_without_a_bug(built):
    _, preset, runtime = built
    reference(preset).compare(runtime).assert_ok()


@pytest.mark.parametrize("bug", sorted(RUNTIME_BUGS))
def test_the_helper_catches_a_planted_bug(built, bug, monkeypatch):
    _, preset, runtime = built
    plant, where = RUNTIME_BUGS[bug]
    plant(monkeypatch, runtime)
    result = reference(preset).compare(runtime)
    assert not result.ok, f"{bug} went unnoticed:\n{result.summary()}"
    assert result.failures[0] == where, f"{bug} first seen at {result.failures[0]}, expected {where}\n{result.summary()}"


@pytest.mark.parametrize("name", RUNTIMES)
@pytest.mark.parametrize("preset", PLANTED_FAMILIES)
def test_the_helper_catches_a_doubled_rope_theta(name, preset, monkeypatch, tmp_path_factory):
    loaded = dataclasses.replace(load_tiny(preset), model=copy.deepcopy(load_tiny(preset).model))
    rope_theta_doubled(monkeypatch, loaded.model)
    result = reference(preset).compare(_build(name, loaded, tmp_path_factory, "-rope"))
    assert not result.ok and result.failures[0] == "prefill_logits", result.summary()


# ----------------------------------------------------------------------------- the tokens see them too
TOKEN_BUGS = {"decode_position_plus_1": position_plus_one, "previous_kv_slot_masked": previous_slot_masked,
              "image_features_x1.5": features_scaled}
N = 16  # greedy tokens per row; every bug below changes some row's tokens well before this


def _greedy(pipe, images):
    cfg = pipe.generation_config(max_new_tokens=N, stop_strings=(), stop_token_ids=())
    return pipe(images, PROMPTS, cfg).token_ids


@pytest.fixture(scope="module", params=sorted(FAMILY_TESTS))
def tiny(request):
    pipe = Pipeline(load_tiny(FAMILY_TESTS[request.param]["tiny"]))
    return pipe, _greedy(pipe, [photo()] * 3)


def test_a_different_image_gives_a_different_answer(tiny):
    pipe, expected = tiny
    grey = Image.new("RGB", photo().size, (128, 128, 128))
    assert _greedy(pipe, [grey] * 3) != expected


def test_the_answer_is_not_one_token_repeated(tiny):
    _, expected = tiny
    assert all(len(set(row)) > N // 4 for row in expected), expected


@pytest.mark.parametrize("bug", sorted(TOKEN_BUGS))
def test_greedy_tokens_change_under_a_planted_bug(tiny, bug, monkeypatch):
    pipe, expected = tiny
    TOKEN_BUGS[bug](monkeypatch, pipe.runtime)
    assert _greedy(pipe, [photo()] * 3) != expected
