"""`vlmrt caption`: batched folder captioning, incremental output, resume after an interrupt,
unreadable images recorded, bad input."""

import json

import pytest
from PIL import Image

from conftest import load_tiny
from vlmrt.cli import main
from vlmrt.errors import VlmrtError
from vlmrt.eval.caption import caption_folder
from vlmrt.pipeline import Pipeline

TOKENS = 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return Pipeline(load_tiny("minigpt4-tiny"))


def make_images(folder, n, sub=None):
    """n small distinct images (png, jpg and webp) in folder (or folder/sub)."""
    d = folder / sub if sub else folder
    d.mkdir(parents=True, exist_ok=True)
    exts = ["png", "jpg", "webp"]
    for i in range(n):
        img = Image.new("RGB", (24 + 5 * i, 20 + 3 * i), (40 * i % 256, 255 - 30 * i % 256, 90))
        img.save(d / f"img{i}.{exts[i % 3]}")
    return d


class CountingPipe:
    """Forwards to a Pipeline, records batch sizes, and raises KeyboardInterrupt on call `fail_on`."""

    def __init__(self, pipe, fail_on=None):
        self.pipe, self.fail_on, self.batches = pipe, fail_on, []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, images, prompts, config):
        self.batches.append(len(images))
        if len(self.batches) == self.fail_on:
            raise KeyboardInterrupt
        return self.pipe(images, prompts, config)


def test_captions_every_image_and_records_unreadable_ones(pipe, tmp_path):
    d = make_images(tmp_path / "imgs", 3)
    (d / "broken.jpg").write_bytes(b"this is not a jpeg")
    (d / "notes.txt").write_text("ignored")
    doc = caption_folder(pipe, d, tmp_path / "out.json", batch_size=2, max_new_tokens=TOKENS, progress=False)
    assert doc == json.loads((tmp_path / "out.json").read_text())
    assert doc["complete"] and doc["pending"] == 0 and doc["setup"]["runtime"] == "eager"
    by_image = {e["image"]: e for e in doc["entries"]}
    assert sorted(by_image) == ["broken.jpg", "img0.png", "img1.jpg", "img2.webp"]
    assert "error" in by_image["broken.jpg"] and "caption" not in by_image["broken.jpg"]
    for name in ("img0.png", "img1.jpg", "img2.webp"):
        e = by_image[name]
        assert isinstance(e["caption"], str) and len(e["token_ids"]) <= TOKENS
        assert e["model"] == "minigpt4-tiny" and e["runtime"] == "eager" and e["timings"]["batch_size"] >= 1
        assert "ttft_ms" in e["timings"]


def test_interrupted_run_resumes_and_loses_nothing(pipe, tmp_path):
    d = make_images(tmp_path / "imgs", 5)
    full = caption_folder(pipe, d, tmp_path / "full.json", batch_size=2, max_new_tokens=TOKENS, progress=False)

    out = tmp_path / "out.json"
    first = CountingPipe(pipe, fail_on=2)
    with pytest.raises(KeyboardInterrupt):
        caption_folder(first, d, out, batch_size=2, max_new_tokens=TOKENS, progress=False)
    partial = json.loads(out.read_text())  # valid JSON: written atomically after the first batch
    assert not partial["complete"] and partial["pending"] == 3
    assert [e["image"] for e in partial["entries"]] == ["img0.png", "img1.jpg"]

    second = CountingPipe(pipe)
    done = caption_folder(second, d, out, batch_size=2, max_new_tokens=TOKENS, progress=False)
    assert second.batches == [2, 1]  # only the three images not yet captioned
    assert done["complete"]
    assert [(e["image"], e["caption"]) for e in done["entries"]] == [(e["image"], e["caption"]) for e in full["entries"]]

    third = CountingPipe(pipe)
    caption_folder(third, d, out, batch_size=2, max_new_tokens=TOKENS, progress=False)
    assert third.batches == []  # nothing left to do


def test_resume_refuses_a_file_made_with_another_setup(pipe, tmp_path):
    d = make_images(tmp_path / "imgs", 1)
    out = tmp_path / "out.json"
    caption_folder(pipe, d, out, batch_size=1, max_new_tokens=TOKENS, progress=False)
    with pytest.raises(VlmrtError, match="different setup.*prompt"):
        caption_folder(pipe, d, out, prompt="What is this?", batch_size=1, max_new_tokens=TOKENS, progress=False)
    (tmp_path / "other.json").write_text('{"something": "else"}')
    with pytest.raises(VlmrtError, match="not a vlmrt captions file"):
        caption_folder(pipe, d, tmp_path / "other.json", max_new_tokens=TOKENS, progress=False)


def test_empty_or_missing_folder_is_a_clear_error(pipe, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VlmrtError, match="no images in"):
        caption_folder(pipe, tmp_path / "empty", tmp_path / "out.json", progress=False)
    rc = main(["caption", "--model", "minigpt4-tiny", "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "o.json")])
    assert rc == 2 and "no images in" in capsys.readouterr().err
    rc = main(["caption", "--model", "minigpt4-tiny", "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "o.json")])
    assert rc == 2 and "not found" in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()


def test_cli_caption_recursive(tmp_path, capsys):
    d = make_images(tmp_path / "imgs", 1)
    make_images(d, 2, sub="sub")
    out = tmp_path / "caps.json"
    args = ["caption", "--model", "minigpt4-tiny", "--images", str(d), "--out", str(out), "--batch", "3",
            "--max-new-tokens", str(TOKENS), "--recursive", "--no-progress"]
    assert main(args) == 0
    doc = json.loads(out.read_text())
    assert [e["image"] for e in doc["entries"]] == ["img0.png", "sub/img0.png", "sub/img1.jpg"]
    assert "3 images captioned" in capsys.readouterr().err


def test_beam_search_captions_equal_the_pipeline_and_resume_only_with_the_same_beams(pipe, tmp_path):
    d = make_images(tmp_path / "imgs", 2)
    out = tmp_path / "beams.json"
    doc = caption_folder(pipe, d, out, batch_size=2, max_new_tokens=8, progress=False, num_beams=3,
                         repetition_penalty=1.2)
    cfg = pipe.generation_config(max_new_tokens=8, num_beams=3, repetition_penalty=1.2)
    names = ["img0.png", "img1.jpg"]
    expected = pipe([str(d / n) for n in names], ["Describe this image in one sentence."] * 2, cfg)
    assert [e["token_ids"] for e in doc["entries"]] == expected.token_ids
    assert doc["setup"]["num_beams"] == 3 and doc["setup"]["repetition_penalty"] == 1.2
    with pytest.raises(VlmrtError, match="different setup"):
        caption_folder(pipe, d, out, batch_size=2, max_new_tokens=8, progress=False)  # greedy into a beams file
