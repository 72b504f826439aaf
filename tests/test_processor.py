"""Images in every mode become 8-bit RGB; prompts become ids laid out as the release does."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_tiny
from vlmrt.errors import VlmrtError
from vlmrt.processor import Processor, ProcessorSpec, image_to_pixels, load_image


def _modes(tmp_path):
    rgb = Image.new("RGB", (40, 30), (200, 100, 50))
    yield "RGBA", rgb.convert("RGBA")
    yield "LA", rgb.convert("LA")
    yield "L", rgb.convert("L")
    yield "1", rgb.convert("1")
    yield "P", rgb.convert("P")
    yield "CMYK", rgb.convert("CMYK")
    yield "I;16", Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16))
    yield "I", Image.fromarray(np.full((30, 40), 70000, dtype=np.int32))
    yield "F", Image.fromarray(np.full((30, 40), 0.5, dtype=np.float32))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "1", "P", "CMYK", "I;16", "I", "F"])
def test_every_image_mode_becomes_rgb(tmp_path, mode):
    img = dict(_modes(tmp_path))[mode]
    ext = ".tif" if mode in ("I", "F", "CMYK") else ".png"
    path = tmp_path / f"img{ext}"
    img.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (40, 30)


def test_16_bit_is_rescaled_not_clipped():
    img = Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16))  # half of 65535
    assert np.asarray(load_image(img))[0, 0].tolist() == [128, 128, 128]


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (2, 2), (255, 0, 0, 0))
    assert np.asarray(load_image(img))[0, 0].tolist() == [255, 255, 255]


def test_missing_image(tmp_path):
    with pytest.raises(VlmrtError, match="image not found"):
        load_image(tmp_path / "nope.jpg")


def test_not_an_image(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("hello")
    with pytest.raises(VlmrtError, match="not an image"):
        load_image(p)


def test_truncated_image(tmp_path, photo):
    p = tmp_path / "cut.jpg"
    p.write_bytes(photo.read_bytes()[:2000])
    with pytest.raises(VlmrtError, match="cannot read image|not an image"):
        load_image(p)


def test_pixels_are_resized_and_normalized():
    spec = ProcessorSpec(image_size=28, template="{prompt}", image_placeholder="<I>", image_token_id=0,
                         num_image_tokens=1, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    px = image_to_pixels(Image.new("RGB", (100, 60), (255, 0, 128)), spec)
    assert px.shape == (3, 28, 28)
    assert torch.allclose(px[:, 5, 5], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]), atol=1e-5)


def test_prompt_ids_follow_the_release_layout():
    loaded = load_tiny("minigpt4-tiny")
    proc = Processor(loaded.spec, loaded.tokenizer)
    tok, spec = loaded.tokenizer, loaded.spec
    ids = proc.prompt_ids("What is this?")
    before, after = spec.template.replace("{prompt}", "What is this?").split("<ImageHere>")
    want = [tok.bos_token_id] + tok(before, add_special_tokens=False).input_ids
    want += [spec.image_token_id] * spec.num_image_tokens + tok(after, add_special_tokens=False).input_ids
    assert ids == want
    assert ids.count(spec.image_token_id) == spec.num_image_tokens == 8


def test_batch_is_left_padded_with_a_non_image_id(photo):
    loaded = load_tiny("minigpt4-tiny")
    proc = Processor(loaded.spec, loaded.tokenizer)
    b = proc([photo, photo], ["Hi", "A much longer question about the picture"])
    assert b["attention_mask"][0, 0] == 0 and b["attention_mask"][1].all()
    assert b["input_ids"][0, 0] == proc.pad_token_id != loaded.spec.image_token_id
    assert b["pixel_values"].shape == (2, 3, 56, 56)


def test_empty_prompt():
    loaded = load_tiny("minigpt4-tiny")
    with pytest.raises(VlmrtError, match="prompt is empty"):
        Processor(loaded.spec, loaded.tokenizer).prompt_ids("   ")


def test_spec_survives_a_json_round_trip():
    import json

    spec = load_tiny("minigpt4-tiny").spec
    assert ProcessorSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
