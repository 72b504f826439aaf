"""`vlmrt eval parity`: eager vs eager agrees exactly; eager vs a deliberately perturbed copy does not,
the report says where (stages, first divergence) and the CLI exits 1 under --min-agreement."""

import copy
import dataclasses
import json

import pytest
import torch
from PIL import Image

from conftest import load_tiny
from vlmrt.cli import main
from vlmrt.errors import VlmrtError
from vlmrt.eval.parity import build_runtimes, markdown, parity_report, token_agreement
from vlmrt.runtimes import RUNTIMES
from vlmrt.runtimes.eager import EagerRuntime

TOKENS = 6


pytestmark = pytest.mark.usefixtures("one_thread")


class PerturbedRuntime(EagerRuntime):
    """Eager on a copy of the weights with noise in the vision projection and the LM head: a stand-in
    for a broken accelerated runtime."""

    name = "perturbed"

    def __init__(self, loaded):
        model = copy.deepcopy(loaded.model)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in (model.llama_proj.weight, model.llama_model.lm_head.weight):
                p.add_(torch.randn(p.shape, generator=gen) * p.std() * 2.0)
        super().__init__(dataclasses.replace(loaded, model=model))


@pytest.fixture(scope="module")
def tiny():
    return load_tiny("minigpt4-tiny")


@pytest.fixture()
def images(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(2):
        Image.new("RGB", (30 + 9 * i, 26), (200 - 90 * i, 40 * i, 120)).save(d / f"im{i}.png")
    return d


@pytest.fixture()
def fast_cli(monkeypatch, tiny):
    """CLI runs reuse the session's tiny model and know the `perturbed` runtime."""
    monkeypatch.setattr("vlmrt.models.load_model", lambda *a, **k: tiny)
    monkeypatch.setitem(RUNTIMES, "perturbed", f"{__name__}:PerturbedRuntime")


def test_token_agreement():
    assert token_agreement([1, 2, 3, 4], [1, 2, 3, 4]) == (1.0, None)
    assert token_agreement([1, 2, 3, 4], [1, 9, 3, 4]) == (0.75, 1)
    assert token_agreement([1, 2, 3, 4], [1, 2]) == (0.5, 2)


def test_eager_vs_eager_agrees_exactly(tiny, images):
    report = parity_report(tiny, build_runtimes(tiny, ["eager", "eager"]), images, new_tokens=TOKENS, min_agreement=1.0)
    assert report["passed"] and report["runtimes"] == ["eager", "eager#2"]
    o = report["overall"]["eager#2"]
    assert o["agreement"] == 1.0 and o["images_identical"] == 2 and o["earliest_divergence"] is None
    assert o["logits_max_abs"] == 0.0 and all(v == 0.0 for v in o["stages_max_abs"].values())
    for im in report["images"]:
        r = im["runtimes"]["eager#2"]
        assert r["tokens"] == im["reference_tokens"] and len(r["tokens"]) == TOKENS  # stops off: exactly N tokens
        assert len(r["logits"]["per_step_max_abs"]) == TOKENS
    json.dumps(report)  # JSON-serializable as is
    assert "| im0.png | eager#2 | 1.000 | - |" in markdown(report)


def test_perturbed_copy_disagrees_and_the_report_says_where(tiny, images):
    runtimes = {"eager": EagerRuntime(tiny), "perturbed": PerturbedRuntime(tiny)}
    report = parity_report(tiny, runtimes, images, new_tokens=TOKENS, min_agreement=0.99)
    o = report["overall"]["perturbed"]
    assert not report["passed"] and o["agreement"] < 1.0 and o["earliest_divergence"] is not None
    assert o["logits_max_abs"] > 1e-3
    stages = o["stages_max_abs"]
    assert stages["vision"] > 1e-3 and stages["prefill_logits"] > 1e-3
    assert stages["embedding"] == 0.0  # fed the reference's image features, the token table is untouched
    for im in report["images"]:
        r = im["runtimes"]["perturbed"]
        div = r["first_divergence"]
        if div is not None:
            assert r["tokens"][:div] == im["reference_tokens"][:div] and r["tokens"][div] != im["reference_tokens"][div]
    assert "FAIL" in markdown(report)


def test_cli_exit_codes_and_json(fast_cli, images, tmp_path, capsys):
    out = tmp_path / "parity.json"
    base = ["eval", "parity", "--model", "minigpt4-tiny", "--images", str(images), "--max-new-tokens", str(TOKENS)]
    assert main(base + ["--runtime", "eager,eager", "--min-agreement", "1.0"]) == 0
    assert "PASS" in capsys.readouterr().out
    assert main(base + ["--runtime", "eager,perturbed", "--min-agreement", "0.99", "--json", str(out)]) == 1
    assert "FAIL" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["passed"] is False and doc["overall"]["perturbed"]["agreement"] < 0.99
    assert main(base + ["--runtime", "eager,perturbed"]) == 0  # no threshold: report only


def test_bad_input(fast_cli, images, tmp_path, capsys):
    base = ["eval", "parity", "--model", "minigpt4-tiny", "--max-new-tokens", "2"]
    assert main(base + ["--images", str(images), "--runtime", "eager"]) == 2
    assert "at least two runtimes" in capsys.readouterr().err
    assert main(base + ["--images", str(images), "--runtime", "eager,warp-drive"]) == 2
    assert "unknown runtime 'warp-drive'" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(base + ["--images", str(tmp_path / "empty"), "--runtime", "eager,eager"]) == 2
    assert "no images in" in capsys.readouterr().err


def test_unreadable_images_are_recorded_and_all_unreadable_is_an_error(tiny, tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "bad.png").write_bytes(b"not a png")
    runtimes = build_runtimes(tiny, ["eager", "eager"])
    with pytest.raises(VlmrtError, match="could be read"):
        parity_report(tiny, runtimes, d, new_tokens=2)
    Image.new("RGB", (20, 20)).save(d / "good.png")
    report = parity_report(tiny, runtimes, d, new_tokens=2)
    assert "error" in report["images"][0] and report["overall"]["eager#2"]["images"] == 1


def test_first_mismatch_is_relative_to_the_reference_scale():
    """The lowerings' graph check: fp32 noise of 1e-5 on values of ~1 passes (an elementwise atol of
    1e-5 failed it at 0.5B widths), an error of 1e-3 of the scale fails and is named, so do NaN and
    a wrong shape."""
    from vlmrt.eval.tensor_parity import first_mismatch

    ref = torch.linspace(-2.0, 2.0, 64).reshape(4, 16)
    noisy = ref + 1.6e-5 * torch.sign(torch.sin(torch.arange(64.0))).reshape(4, 16)
    assert first_mismatch(["logits", "key"], [ref.clone(), noisy], [ref, ref]) is None
    wrong = ref.clone()
    wrong[1, 3] += 4e-3
    assert first_mismatch(["logits", "key"], [ref, wrong], [ref, ref]).startswith("key: rel 2.0e-03")
    nan = ref.clone()
    nan[0, 0] = float("nan")
    assert first_mismatch(["logits"], [nan], [ref]).startswith("logits: rel nan")
    assert first_mismatch(["logits"], [ref[:, :8]], [ref]) == "logits: shape (4, 8) != (4, 16)"
