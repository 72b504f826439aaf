"""Several images in one prompt: each in the family's own markup in its user turn, all through the
vision stage, spliced in order. The engine's answer equals one assembled by hand from the model's
stages (one vision call over all images, one row of features, the lock-step loop), and depends on
every image; a model that takes fewer refuses more."""

from dataclasses import replace

import pytest
import torch
from PIL import Image

from conftest import load_tiny, parity_images
from vlmrt.engine import Request
from vlmrt.errors import VlmrtError
from vlmrt.generate import generate
from vlmrt.pipeline import Pipeline
from vlmrt.processor import Conversation, Processor

pytestmark = pytest.mark.usefixtures("one_thread")

MULTI = ["minigpt4-tiny", "minicpm-v-tiny", "qwen-vl-tiny", "slimm-tiny"]  # families that take several images per prompt
TURNS = (("user", "What is this?"), ("assistant", "A photo."), ("user", "And this one, compared?"))
TWO = Conversation(TURNS, image_turns=(0, 2))  # one image in each user turn


@pytest.fixture(scope="module", params=MULTI)
def pipe(request):
    return Pipeline(load_tiny(request.param))


@pytest.fixture(scope="module")
def images():
    a, b = parity_images(2)
    return [a, b.transpose(Image.ROTATE_180)]


class _OneVisionCall:
    """The eager runtime, its vision stage run once over all N images, each image's real features
    kept (MiniCPM-V: its chunks, not the padding ones) and laid out as one row [1,sum Q_i,D]: the
    reference the engine's per-image path must equal."""

    def __init__(self, runtime, counts):
        self.runtime, self.counts = runtime, counts

    def __getattr__(self, name):
        return getattr(self.runtime, name)

    def encode_images(self, pixel_values, **named):
        feats = self.runtime.encode_images(pixel_values, **named)  # [N,Q,D]
        if isinstance(feats, dict):  # SliMM: its embedding stage lays [N,Q,D] (and DeepStack's) out in order
            return feats
        if self.counts is not None:
            return torch.cat([f[None, :n] for f, n in zip(feats, self.counts.tolist())], dim=1)
        return feats.reshape(1, -1, feats.shape[-1])


def _by_hand(pipe, images, prompt, n: int) -> list[int]:
    batch = pipe.processor.several_images(images, prompt)
    cfg = pipe.generation_config(max_new_tokens=n, stop_strings=(), stop_token_ids=())
    with torch.inference_mode():
        runtime = _OneVisionCall(pipe.runtime, batch.get("image_tokens"))
        return generate(runtime, batch, cfg, pipe.loaded.tokenizer).token_ids[0]


def test_two_images_in_two_turns_equal_the_hand_built_reference_and_use_both(pipe, images):
    n = 6
    cfg = pipe.generation_config(max_new_tokens=n, stop_strings=(), stop_token_ids=())
    rows = pipe.engine.run([Request(TWO, images, cfg), Request(TWO, images[::-1], cfg),
                            Request(Conversation(TURNS, image_turn=0), images[0], cfg),
                            Request(Conversation(TURNS, image_turn=2), images[1], cfg)])
    both, swapped, first, second = (r.row.tokens for r in rows)
    assert both == _by_hand(pipe, images, TWO, n)
    assert swapped == _by_hand(pipe, images[::-1], TWO, n)
    assert both != first and both != second and both != swapped  # every image, in its place, counts
    spec = pipe.processor.spec
    batch = pipe.processor.several_images(images, TWO)
    assert batch["pixel_values"].shape[0] == 2
    per_image = batch["image_tokens"] if "image_tokens" in batch else torch.tensor([spec.num_image_tokens] * 2)
    assert int((batch["input_ids"] == spec.image_token_id).sum()) == int(per_image.sum())
    assert pipe([images], ["Compare them."], cfg).token_ids[0] == _by_hand(pipe, images, "Compare them.", n)


def test_the_markup_is_rendered_once_per_image_in_its_turn(pipe):
    text = pipe.processor.render(TWO)
    image = pipe.processor.spec.chat.image
    q1, q2 = text.index("What is this?"), text.index("And this one, compared?")
    a1 = text.index("A photo.")
    markup = [image.replace("{n}", "1")] * 2
    assert text.count(pipe.processor.spec.image_placeholder) == 2
    assert text.rfind(markup[0], 0, q1) >= 0 and text.rfind(markup[1], a1, q2) > a1
    in_one = pipe.processor.render(Conversation((("user", "Compare."),), image_turns=(0, 0)))
    assert image.replace("{n}", "1") + image.replace("{n}", "2") + "Compare." in in_one  # Qwen-VL: Picture 1:, 2:


def test_qwen_vl_numbers_the_pictures_of_a_turn():
    p = Pipeline(load_tiny("qwen-vl-tiny")).processor
    text = p.render(Conversation((("user", "Compare."),), image_turns=(0, 0)))
    assert "Picture 1: <img>{image}</img>\nPicture 2: <img>{image}</img>\nCompare." in text


def test_too_many_images_and_a_count_mismatch_are_refused(pipe, images):
    limit = pipe.processor.spec.max_images
    with pytest.raises(VlmrtError, match=f"at most {limit} images"):
        pipe.processor.several_images([images[0]] * (limit + 1), "Compare.")
    with pytest.raises(VlmrtError, match="places 2 images but 1"):
        pipe.processor.several_images(images[:1], TWO)
    with pytest.raises(VlmrtError, match="only be in a user message"):
        pipe.processor.several_images(images, Conversation(TURNS, image_turns=(0, 1)))
    with pytest.raises(VlmrtError, match="run on the engine only"):
        pipe([images], ["Compare."], pipe.generation_config(num_beams=2, max_new_tokens=2))


def test_a_model_that_takes_one_image_refuses_two(pipe, images):
    one = Processor(replace(pipe.processor.spec, max_images=1), pipe.processor.tokenizer)
    with pytest.raises(VlmrtError, match="at most 1 image per prompt"):
        one.several_images(images, "Compare.")


def test_the_onnx_runtime_gives_the_eager_tokens(images, tmp_path_factory):
    """MiniCPM-V-2: the exported vision graph per image (with its patch inputs), padding chunks cut."""
    pytest.importorskip("onnxruntime")
    from onnx_exports import exported
    from vlmrt.models import load_model

    eager = Pipeline(load_tiny("minicpm-v-tiny"))
    onnx = Pipeline(load_model(str(exported("minicpm-v-tiny", tmp_path_factory))), "onnx")
    cfg = eager.generation_config(max_new_tokens=4)
    assert onnx([images], [TWO], cfg).token_ids == eager([images], [TWO], cfg).token_ids
