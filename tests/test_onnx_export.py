"""Export to ONNX: the files, the graph I/O contract, the manifest, the export cache, bad input."""

import json
import shutil

import onnx
import pytest
import torch

from conftest import load_tiny
from families import FAMILY_TESTS
from onnx_exports import exported
from vlmrt.cli import main
from vlmrt.errors import VlmrtError
from vlmrt.export import FORMAT_VERSION, read_manifest
from vlmrt.export.manifest import MIN_FORMAT_VERSION
from vlmrt.export.onnx import StageIO
from vlmrt.models import load_model
from vlmrt.stages import STAGES

FAMILIES = sorted(FAMILY_TESTS)


def tiny(family: str) -> str:
    return FAMILY_TESTS[family]["tiny"]


@pytest.fixture
def export_copy(tmp_path, tmp_path_factory):
    """A private copy of the tiny MiniGPT-4 export, to damage."""
    dst = tmp_path / "export"
    shutil.copytree(exported("minigpt4-tiny", tmp_path_factory), dst)
    return dst


@pytest.mark.parametrize("family", FAMILIES)
def test_export_writes_graphs_tokenizer_and_manifest(family, tmp_path_factory):
    loaded, out = load_tiny(tiny(family)), exported(tiny(family), tmp_path_factory)
    m = read_manifest(out)
    assert json.loads((out / "manifest.json").read_text())["format_version"] == MIN_FORMAT_VERSION  # a dynamic export still writes version 1
    assert (m.family, m.dtype, m.image_token_id) == (family, "fp32", loaded.model.image_token_id)
    model = loaded.model
    assert (m.num_layers, m.num_kv_heads, m.head_dim, m.max_context) == (
        model.num_layers, model.num_kv_heads, model.head_dim, model.max_context)
    assert m.processor == loaded.spec
    again = load_model(str(out))
    assert again.model is None and again.max_context == model.max_context
    text = "What is in this picture?"
    assert again.tokenizer(text).input_ids == loaded.tokenizer(text).input_ids


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_io_names_and_dynamic_axes(family, tmp_path_factory):
    m = read_manifest(exported(tiny(family), tmp_path_factory))
    dec = m.stages["decoder"]
    ins, outs = {t.name: t for t in dec.inputs}, {t.name: t for t in dec.outputs}
    for i in range(m.num_layers):
        for kv in ("key", "value"):
            # the static-cache form: a fixed-size cache row per request, presents as large as the pasts
            assert ins[f"past_key_values.{i}.{kv}"].shape == ("batch", m.num_kv_heads, "cache_sequence", m.head_dim)
            assert outs[f"present.{i}.{kv}"].shape == ("batch", m.num_kv_heads, "cache_sequence", m.head_dim)
    assert ins["inputs_embeds"].shape[:2] == ("batch", "sequence")
    assert ins["attention_mask"].shape == ("batch", "cache_sequence")
    assert ins["cache_position"].shape == ("batch", "sequence")  # per-row write slots
    assert ins["logits_index"].shape == ("batch",)
    assert outs["logits"].shape[:2] == ("batch", 1)  # one position per row only
    emb = {t.name: t for t in m.stages["embedding"].inputs}
    assert emb["input_ids"].shape == ("batch", "sequence")
    assert emb["image_features"].shape[:2] == ("batch", "image_tokens")  # every family splices image features


@pytest.mark.parametrize("family", FAMILIES)
def test_graphs_pass_the_checker_with_external_data(family, tmp_path_factory):
    out = exported(tiny(family), tmp_path_factory)
    for stage, info in read_manifest(out).stages.items():
        assert info.external_data and (out / info.external_data).stat().st_size > 0, stage
        onnx.checker.check_model(str(out / info.file))


def _initializer_bytes(path) -> int:
    from vlmrt.export.onnx import _tensor_bytes

    return sum(_tensor_bytes(t) for t in onnx.load(str(path), load_external_data=False).graph.initializer)


def _used_param_bytes(model, outputs) -> int:
    """Bytes of the parameters that `outputs` depend on."""
    params = [p for p in model.parameters() if p.is_floating_point()]
    flat = [o for o in (outputs.values() if isinstance(outputs, dict) else [outputs]) if o.is_floating_point()]
    grads = torch.autograd.grad(sum(o.sum() for o in flat), params, allow_unused=True)
    return sum(p.numel() * p.element_size() for p, g in zip(params, grads) if g is not None)


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_and_embedding_graphs_hold_only_their_own_weights(family, tmp_path_factory):
    loaded, out = load_tiny(tiny(family)), exported(tiny(family), tmp_path_factory)
    from vlmrt.export.onnx import default_io

    io = default_io("vision", loaded, {})
    hook = getattr(loaded.model, "export_io", None)
    io = (hook("vision", io) or io) if hook else io
    name, *rest = io.inputs
    with torch.enable_grad():
        feats = loaded.model.encode_images(io.inputs[name], **{k: io.inputs[k] for k in rest})
        used = _used_param_bytes(loaded.model, feats)
        ids = torch.tensor([[1, loaded.spec.image_token_id, 5]])
        table = _used_param_bytes(loaded.model, loaded.model.embed(ids, None))
    total = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    assert _initializer_bytes(out / "vision.onnx") <= used * 1.05 + 2**16 < total
    assert _initializer_bytes(out / "embedding.onnx") <= table * 1.05 + 2**16


def test_export_progress_is_shown(tmp_path, capsys):
    assert main(["export", "--model", "minigpt4-tiny", "--out", str(tmp_path / "e")]) == 0
    err = capsys.readouterr().err
    assert all(f"{s}: {s}.onnx written" in err for s in STAGES)
    run = ["run", "--model", str(tmp_path / "e"), "--image", "vlmrt/assets/astronaut.jpg", "--prompt", "What is this?",
           "--max-new-tokens", "4"]
    assert main(run) == 0
    assert "runs on onnx" not in capsys.readouterr().err  # no runtime asked for: onnx is no override
    assert main(run + ["--runtime", "eager", "--json"]) == 0  # an export asked to run eagerly says where it runs
    out, err = capsys.readouterr()
    assert err.count("is an ONNX export: it runs on onnx, not eager") == 1 and json.loads(out)["runtime"] == "onnx"


def _one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


def test_export_into_a_non_empty_folder_needs_force(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    _one_line_error(capsys, ["export", "--model", "minigpt4-tiny", "--out", str(tmp_path)], "not empty")
    with pytest.raises(VlmrtError, match="--force"):
        from vlmrt.export import export

        export("minigpt4-tiny", tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_export_folder_missing_a_graph(export_copy, capsys):
    (export_copy / "decoder.onnx").unlink()
    with pytest.raises(VlmrtError, match="missing decoder.onnx"):
        load_model(str(export_copy))
    _one_line_error(capsys, ["run", "--model", str(export_copy), "--image", "vlmrt/assets/astronaut.jpg",
                             "--prompt", "hi"], "missing decoder.onnx")


def test_export_folder_missing_weights(export_copy):
    (export_copy / "vision.onnx.data").unlink()
    with pytest.raises(VlmrtError, match="missing vision.onnx.data"):
        load_model(str(export_copy))


@pytest.mark.parametrize("content, match", [
    ("{not json", "corrupt"),
    ('{"format": "vlmrt-onnx-export", "format_version": 1}', "corrupt"),
    ('[1, 2]', "not a vlmrt export manifest"),
])
def test_corrupt_manifest(export_copy, content, match):
    (export_copy / "manifest.json").write_text(content)
    with pytest.raises(VlmrtError, match=match):
        load_model(str(export_copy))


@pytest.mark.parametrize("version, match", [(FORMAT_VERSION + 1, "newer"), (MIN_FORMAT_VERSION - 1, "older")])
def test_manifest_from_another_format_version(export_copy, capsys, version, match):
    path = export_copy / "manifest.json"
    path.write_text(path.read_text().replace('"format_version": 1', f'"format_version": {version}'))
    with pytest.raises(VlmrtError, match=match):
        load_model(str(export_copy))
    _one_line_error(capsys, ["run", "--model", str(export_copy), "--image", "vlmrt/assets/astronaut.jpg",
                             "--prompt", "hi"], match)


def test_preset_on_onnx_runtime_exports_to_the_cache_once(tmp_path, monkeypatch):
    from vlmrt.export.onnx import cache_folder, ensure_export

    from vlmrt.runtimes.onnx import OnnxRuntime

    monkeypatch.setenv("VLMRT_CACHE", str(tmp_path))
    loaded = load_tiny("minigpt4-tiny")
    folder = OnnxRuntime(loaded).folder  # `--model minigpt4-tiny --runtime onnx`
    assert folder == cache_folder(loaded) and folder.parent == tmp_path / "exports"
    assert "minigpt4-tiny-fp32-seed0-" in folder.name
    stamp = (folder / "manifest.json").stat().st_mtime_ns
    assert ensure_export(loaded, progress=None) == folder  # reused
    assert (folder / "manifest.json").stat().st_mtime_ns == stamp
    path = folder / "manifest.json"
    path.write_text(path.read_text().replace(read_manifest(folder).config_hash, "0" * 16))  # an edited preset
    messages = []
    ensure_export(loaded, progress=messages.append)
    assert "stale" in messages[0] and read_manifest(folder).config_hash != "0" * 16


def test_family_hook_can_add_an_input(tmp_path, monkeypatch):
    """A family's export_io hook adds a named input; it reaches the stage call by keyword."""
    loaded = load_tiny("minigpt4-tiny")
    model = loaded.model
    seen = {}

    def export_io(stage, io: StageIO):
        if stage == "vision":
            io.inputs["image_scale"] = torch.ones(io.inputs["pixel_values"].shape[0], 1, 1, 1)
            io.dynamic_axes["image_scale"] = {0: "batch"}
        return io

    def encode_images(pixel_values, image_scale=None):
        seen["image_scale"] = image_scale is not None
        return type(model).encode_images(model, pixel_values * image_scale)

    monkeypatch.setattr(model, "export_io", export_io, raising=False)
    monkeypatch.setattr(model, "encode_images", encode_images)
    from vlmrt.export import export_model

    m = export_model(loaded, tmp_path, progress=None)
    assert seen["image_scale"]
    vision = {t.name: t.shape for t in m.stages["vision"].inputs}
    assert vision["image_scale"] == ("batch", 1, 1, 1)
