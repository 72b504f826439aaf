"""Loader round trips on tiny release folders written in the original layout, and broken folders."""

import json

import pytest
import torch

from conftest import load_tiny
from release_files import write_minigpt4_release, write_sentencepiece_tokenizer
from vlmrt.config import GenerationConfig
from vlmrt.errors import VlmrtError
from vlmrt.models import load_model


def _same_weights(a, b, skip=()):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert k in skip or torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("preset,llm_format", [("minigpt4-tiny", "safetensors"), ("minigpt4-tiny", "bin"),
                                               ("minigpt4-llama2-tiny", "safetensors")])
def test_release_folder_round_trip(tmp_path, preset, llm_format, photo):
    src = load_tiny(preset)
    folder = write_minigpt4_release(src, tmp_path / "release", llm_format)
    loaded = load_model(str(folder))
    assert loaded.family == "minigpt4" and not loaded.synthetic
    if src.config.qformer is None:  # ln_vision is never trained nor saved in these variants (SPEC 1.4)
        assert torch.equal(loaded.model.ln_vision.weight, torch.ones(src.config.vision.width))
        assert torch.equal(loaded.model.ln_vision.bias, torch.zeros(src.config.vision.width))
    _same_weights(src.model, loaded.model, skip=("ln_vision.weight", "ln_vision.bias") if src.config.qformer is None else ())
    assert loaded.spec == src.spec
    assert loaded.tokenizer("Describe this image.").input_ids == src.tokenizer("Describe this image.").input_ids


def _release(tmp_path):
    return write_minigpt4_release(load_tiny("minigpt4-tiny"), tmp_path / "release")


def test_missing_key_is_named(tmp_path):
    folder = _release(tmp_path)
    eva = torch.load(folder / "eva_vit_g.pth")
    del eva["blocks.1.attn.q_bias"]
    torch.save(eva, folder / "eva_vit_g.pth")
    with pytest.raises(VlmrtError, match=r"missing .*visual_encoder\.blocks\.1\.attn\.q_bias"):
        load_model(str(folder))


def test_unexpected_key_is_named(tmp_path):
    folder = _release(tmp_path)
    blip2 = torch.load(folder / "blip2_pretrained_flant5xxl.pth")
    blip2["model"]["Qformer.bert.encoder.layer.0.attention.self.rotary"] = torch.zeros(3)
    torch.save(blip2, folder / "blip2_pretrained_flant5xxl.pth")
    with pytest.raises(VlmrtError, match=r"unexpected .*layer\.0\.attention\.self\.rotary"):
        load_model(str(folder))


def test_wrong_shape_is_named(tmp_path):
    folder = _release(tmp_path)
    proj = torch.load(folder / "pretrained_minigpt4_7b.pth")
    proj["model"]["llama_proj.bias"] = torch.zeros(7)
    torch.save(proj, folder / "pretrained_minigpt4_7b.pth")
    with pytest.raises(VlmrtError, match=r"llama_proj\.bias has shape \[7\]"):
        load_model(str(folder))


@pytest.mark.parametrize("victim,match", [
    ("eva_vit_g.pth", "missing eva_vit_g.pth"),
    ("blip2_pretrained_flant5xxl.pth", "missing blip2_pretrained_flant5xxl.pth"),
    ("pretrained_minigpt4_7b.pth", "exactly one MiniGPT-4 checkpoint"),
    ("vicuna/config.json", "exactly one LLM subfolder"),
    ("vicuna/model.safetensors", "no weights in"),
])
def test_missing_file_is_named(tmp_path, victim, match):
    folder = _release(tmp_path)
    (folder / victim).unlink()
    with pytest.raises(VlmrtError, match=match):
        load_model(str(folder))


@pytest.mark.parametrize("victim", ["eva_vit_g.pth", "pretrained_minigpt4_7b.pth", "vicuna/model.safetensors"])
def test_corrupt_file_is_reported(tmp_path, victim):
    folder = _release(tmp_path)
    data = (folder / victim).read_bytes()
    (folder / victim).write_bytes(data[: len(data) // 3])
    with pytest.raises(VlmrtError, match="corrupt"):
        load_model(str(folder))


def test_corrupt_config_json_is_reported(tmp_path):
    folder = _release(tmp_path)
    (folder / "vicuna" / "config.json").write_text("{not json")
    with pytest.raises(VlmrtError, match="not valid JSON"):
        load_model(str(folder))


def test_missing_tokenizer_is_reported(tmp_path):
    folder = _release(tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (folder / "vicuna" / f).unlink()
    with pytest.raises(VlmrtError, match="no tokenizer"):
        load_model(str(folder))


def test_vicuna_config_special_ids_are_ignored(tmp_path):
    """Vision-CAIR's config says bos 0 / eos 1 (an old conversion); the tokenizer's ids rule."""
    folder = _release(tmp_path)
    cfg = json.loads((folder / "vicuna" / "config.json").read_text())
    assert cfg["bos_token_id"] == 0
    loaded = load_model(str(folder))
    assert loaded.tokenizer.bos_token_id == 1 and loaded.tokenizer.eos_token_id == 2


def test_sentencepiece_tokenizer_model_as_released(tmp_path, photo):
    folder = _release(tmp_path)
    write_sentencepiece_tokenizer(folder / "vicuna")
    loaded = load_model(str(folder))
    ids = loaded.tokenizer("Describe this image.").input_ids
    assert ids[0] == 1 and loaded.tokenizer.decode(ids, skip_special_tokens=True) == "Describe this image."
    from vlmrt.pipeline import Pipeline

    out = Pipeline(loaded)([photo], ["What is this?"], GenerationConfig(max_new_tokens=3))
    assert len(out.token_ids[0]) == 3
