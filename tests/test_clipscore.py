"""`vlmrt eval clipscore`: CLIP-S with a tiny CLIP saved locally, as a Hugging Face folder and as an
open_clip-layout checkpoint (converted on load); paired bootstrap comparison; bad input."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlmrt.cli import main
from vlmrt.errors import VlmrtError
from vlmrt.eval.clip_loader import load_clip
from vlmrt.eval.clipscore import clipscore_report, paired_bootstrap, read_captions, set_names

SPECIALS = ["<|startoftext|>", "<|endoftext|>"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_clip_tokenizer():
    """A CLIP byte-level BPE tokenizer with the 256 byte symbols (plain and word-final) and a few merges."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    pieces = SPECIALS + alphabet + [a + "</w>" for a in alphabet] + ["th", "the</w>", "ph", "pho", "phot", "an</w>"]
    vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
    merges = [("t", "h"), ("th", "e</w>"), ("p", "h"), ("ph", "o"), ("pho", "t"), ("a", "n</w>")]
    return CLIPTokenizer(vocab=vocab, merges=merges)


def to_open_clip(hf: dict) -> dict:
    """transformers CLIPModel state dict -> open_clip key layout (the inverse of the loader's map,
    written independently from open_clip's module names)."""
    out = {}
    for key, v in hf.items():
        for tower, oc in (("text_model.encoder.layers.", "transformer.resblocks."),
                          ("vision_model.encoder.layers.", "visual.transformer.resblocks.")):
            if key.startswith(tower):
                i, rest = key[len(tower):].split(".", 1)
                for hf_name, oc_name in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                                         ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")):
                    if rest.startswith(hf_name + "."):
                        out[f"{oc}{i}.{oc_name}{rest[len(hf_name):]}"] = v
                if rest.startswith("self_attn.q_proj."):
                    kind = rest.rsplit(".", 1)[1]
                    qkv = [hf[f"{tower}{i}.self_attn.{n}_proj.{kind}"] for n in "qkv"]
                    out[f"{oc}{i}.attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)
    top = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
           "text_model.embeddings.position_embedding.weight": "positional_embedding",
           "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias",
           "vision_model.embeddings.class_embedding": "visual.class_embedding",
           "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
           "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
           "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight", "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
           "vision_model.post_layernorm.weight": "visual.ln_post.weight",
           "vision_model.post_layernorm.bias": "visual.ln_post.bias", "logit_scale": "logit_scale"}
    out.update({oc: hf[k] for k, oc in top.items()})
    out["text_projection"] = hf["text_projection.weight"].t().contiguous()  # open_clip: x @ text_projection
    out["visual.proj"] = hf["visual_projection.weight"].t().contiguous()
    return out


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    """(HF CLIP folder, open_clip folder): one tiny CLIP (width 32, 2 layers, 32 px, patch 8) saved both ways."""
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    root = tmp_path_factory.mktemp("clip")
    tok = tiny_clip_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=24, hidden_act="gelu", bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8, hidden_act="gelu")
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    hf_dir, oc_dir = root / "hf", root / "open_clip"
    model.save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(hf_dir)
    oc_dir.mkdir()
    torch.save(to_open_clip(model.state_dict()), oc_dir / "open_clip_pytorch_model.bin")
    tok.save_pretrained(oc_dir)
    cfg = {"model_cfg": {"embed_dim": 16, "vision_cfg": {"width": 32, "head_width": 16, "layers": 2, "patch_size": 8,
                                                         "image_size": 32},
                         "text_cfg": {"width": 32, "heads": 4, "layers": 2, "context_length": 24}}}
    (oc_dir / "open_clip_config.json").write_text(json.dumps(cfg))
    return hf_dir, oc_dir


@pytest.fixture()
def data(tmp_path):
    """An image folder of 4 images and two caption files: A as `vlmrt caption` writes it (with an
    unreadable image recorded), B as a plain {image: caption} object."""
    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    names = [f"im{i}.png" for i in range(4)]
    for n in names:
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(d / n)
    a = {"format": "vlmrt.captions/1", "entries": [{"image": n, "caption": f"a photo of thing {i}"} for i, n in enumerate(names)]
         + [{"image": "broken.jpg", "error": "not an image"}]}
    b = {n: ["the cat", "an astronaut", "a red bus", "the sea"][i] for i, n in enumerate(names)}
    (tmp_path / "A.json").write_text(json.dumps(a))
    (tmp_path / "B.json").write_text(json.dumps(b))
    return d, tmp_path / "A.json", tmp_path / "B.json"


def test_hf_folder_scores_are_clip_s(clip_dirs, data):
    from transformers import CLIPModel, CLIPTokenizer

    hf_dir, _ = clip_dirs
    images, a_file, _ = data
    judge = load_clip(hf_dir)
    assert judge.source == "hf"
    report = clipscore_report(judge, images, [a_file])
    scores = report["sets"][0]["scores"]
    assert sorted(scores) == ["im0.png", "im1.png", "im2.png", "im3.png"]
    # by hand: 2.5 * max(cos, 0), caption prefixed with "A photo depicts "
    model, tok = CLIPModel.from_pretrained(hf_dir).eval(), CLIPTokenizer.from_pretrained(hf_dir)
    pixels = judge.image_processor(images=[Image.open(images / "im2.png").convert("RGB")], return_tensors="pt")
    with torch.no_grad():
        v = model.get_image_features(pixel_values=pixels["pixel_values"]).pooler_output
        t = model.get_text_features(**tok(["A photo depicts a photo of thing 2"], return_tensors="pt")).pooler_output
    cos = torch.nn.functional.cosine_similarity(v, t).item()
    assert scores["im2.png"] == pytest.approx(2.5 * max(cos, 0.0), abs=1e-5)
    assert report["sets"][0]["mean"] == pytest.approx(np.mean(list(scores.values())))


def test_open_clip_checkpoint_converts_to_the_same_model(clip_dirs, data):
    hf_dir, oc_dir = clip_dirs
    images, a_file, b_file = data
    hf = clipscore_report(load_clip(hf_dir), images, [a_file, b_file])
    for path in (oc_dir, oc_dir / "open_clip_pytorch_model.bin"):
        judge = load_clip(path)
        assert judge.source == "open_clip" and judge.model.config.vision_config.num_attention_heads == 2
        oc = clipscore_report(judge, images, [a_file, b_file])
        for s_hf, s_oc in zip(hf["sets"], oc["sets"]):
            for k in s_hf["scores"]:
                assert s_oc["scores"][k] == pytest.approx(s_hf["scores"][k], abs=1e-5)


def test_paired_comparison(clip_dirs, data):
    hf_dir, _ = clip_dirs
    images, a_file, b_file = data
    judge = load_clip(hf_dir)
    report = clipscore_report(judge, images, [a_file, b_file, a_file], seed=3)
    assert [s["name"] for s in report["sets"]] == ["A#1", "B", "A#2"]
    c_ab, c_aa = report["comparisons"]
    diff = np.mean([report["sets"][1]["scores"][k] - report["sets"][0]["scores"][k] for k in report["sets"][0]["scores"]])
    assert c_ab["mean_diff"] == pytest.approx(diff) and c_ab["ci_low"] <= diff <= c_ab["ci_high"]
    assert c_ab["higher"] == ("B" if diff > 0 else "A#1")
    assert (c_aa["mean_diff"], c_aa["ci_low"], c_aa["ci_high"], c_aa["higher"]) == (0.0, 0.0, 0.0, "tie")
    again = clipscore_report(judge, images, [a_file, b_file], seed=3)["comparisons"][0]
    assert (again["ci_low"], again["ci_high"]) == (c_ab["ci_low"], c_ab["ci_high"])  # seeded


def test_set_names():
    assert set_names(["x/A.json", "y/B.json"]) == ["A", "B"]
    assert set_names(["runs/eager/caps.json", "runs/onnx/caps.json"]) == ["eager/caps", "onnx/caps"]
    assert set_names(["a/A.json", "a/A.json", "b/B.json"]) == ["A#1", "A#2", "B"]
    assert set_names(["x/caps.json", "y/caps.json", "z/other.json"]) == ["x/caps", "y/caps", "other"]


def test_paired_bootstrap():
    r = paired_bootstrap(np.zeros(20), np.ones(20), samples=500)
    assert (r["mean_diff"], r["ci_low"], r["ci_high"]) == (1.0, 1.0, 1.0)
    rng = np.random.default_rng(1)
    a = rng.normal(size=200)
    r = paired_bootstrap(a, a + 0.5 + rng.normal(scale=0.1, size=200), samples=2000, seed=1)
    assert 0.45 < r["ci_low"] < r["mean_diff"] < r["ci_high"] < 0.55


def test_cli_clipscore(clip_dirs, data, tmp_path, capsys):
    _, oc_dir = clip_dirs
    images, a_file, b_file = data
    out = tmp_path / "score.json"
    rc = main(["eval", "clipscore", "--images", str(images), "--captions", str(a_file), str(b_file),
               "--clip", str(oc_dir / "open_clip_pytorch_model.bin"), "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| A | 4 |" in printed and "| B vs A | 4 |" in printed
    doc = json.loads(out.read_text())
    assert doc["w"] == 2.5 and doc["prefix"] == "A photo depicts " and len(doc["sets"][1]["scores"]) == 4


def test_captions_that_do_not_match_the_folder(clip_dirs, data, tmp_path, capsys):
    hf_dir, _ = clip_dirs
    images, _, _ = data
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"im0.png": "a cat", "elsewhere/dog.jpg": "a dog", "x.png": "x"}))
    with pytest.raises(VlmrtError, match=r"2 of the 3 images captioned in .* are not in"):
        clipscore_report(load_clip(hf_dir), images, [wrong])
    rc = main(["eval", "clipscore", "--images", str(images), "--captions", str(wrong), "--clip", str(hf_dir)])
    assert rc == 2 and "are not in" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    rc = main(["eval", "clipscore", "--images", str(tmp_path / "empty"), "--captions", str(wrong), "--clip", str(hf_dir)])
    assert rc == 2 and "no images in" in capsys.readouterr().err


@pytest.mark.parametrize("content", [[1, 2, 3], {"im0.png": 5}, {"entries": []}, "just text"])
def test_bad_captions_files(tmp_path, content):
    f = tmp_path / "caps.json"
    f.write_text(json.dumps(content))
    with pytest.raises(VlmrtError, match="captions"):
        read_captions(f)
    f.write_text("{not json")
    with pytest.raises(VlmrtError, match="not a JSON file"):
        read_captions(f)
    with pytest.raises(VlmrtError, match=r"captions file not found: .*ref.json; write it with `vlmrt caption"):
        read_captions(tmp_path / "ref.json")


def test_clip_files_of_the_wrong_format(clip_dirs, data, tmp_path, capsys):
    _, oc_dir = clip_dirs
    images, a_file, _ = data
    text = tmp_path / "open_clip_pytorch_model.bin"
    text.write_text("definitely not a checkpoint")
    with pytest.raises(VlmrtError, match="not a checkpoint torch can read"):
        load_clip(text)
    rc = main(["eval", "clipscore", "--images", str(images), "--captions", str(a_file), "--clip", str(text)])
    assert rc == 2 and "not a checkpoint torch can read" in capsys.readouterr().err
    other = tmp_path / "other.bin"
    torch.save({"model.layers.0.weight": torch.zeros(2)}, other)
    with pytest.raises(VlmrtError, match="not an open_clip ViT CLIP checkpoint.*visual.conv1.weight"):
        load_clip(other)
    odd = tmp_path / "odd.bin"
    state = torch.load(oc_dir / "open_clip_pytorch_model.bin")
    torch.save({**state, "visual.attn_pool.query": torch.zeros(4, 32)}, odd)
    with pytest.raises(VlmrtError, match="no transformers CLIPModel counterpart: visual.attn_pool.query"):
        load_clip(odd, tokenizer=oc_dir)
    with pytest.raises(VlmrtError, match="no CLIP tokenizer in"):
        load_clip(odd)
    with pytest.raises(VlmrtError, match="cannot tell the vision tower's head count"):
        load_clip(_copy(oc_dir, tmp_path / "nocfg"))
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (llama / "model.safetensors").write_bytes(b"")
    with pytest.raises(VlmrtError, match="'llama' model, not a CLIP model"):
        load_clip(llama)
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "weights.npz").write_bytes(b"")
    with pytest.raises(VlmrtError, match="neither a Hugging Face CLIP model"):
        load_clip(tmp_path / "stuff")
    with pytest.raises(VlmrtError, match="CLIP model not found: .*nowhere; give --clip a local Hugging Face CLIP folder"):
        load_clip(tmp_path / "nowhere")


def _copy(src, dst):
    """The open_clip folder without its open_clip_config.json: head counts unknown at width 32."""
    import shutil

    shutil.copytree(src, dst)
    (dst / "open_clip_config.json").unlink()
    return dst
