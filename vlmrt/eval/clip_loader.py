"""Load a CLIP judge from local files: a Hugging Face CLIP folder, or an open_clip checkpoint.

The open_clip package needs torchvision, which does not install cleanly beside every torch build,
so an open_clip checkpoint (e.g. `open_clip_pytorch_model.bin` of
laion/CLIP-ViT-H-14-laion2B-s32B-b79K, the seeds' judge) is converted into transformers'
`CLIPModel`, which computes the same function. Key names follow open_clip `model.py` /
`transformer.py` (the OpenAI CLIP layout) and transformers `models/clip/modeling_clip.py`:

```
 open_clip                                transformers CLIPModel
 token_embedding.weight                   text_model.embeddings.token_embedding.weight
 positional_embedding [77,W]              text_model.embeddings.position_embedding.weight
 transformer.resblocks.{i}.*              text_model.encoder.layers.{i}.*      (block map below)
 ln_final.*                               text_model.final_layer_norm.*
 text_projection [W,E] (x @ P)            text_projection.weight [E,W]          (transposed)
 visual.conv1.weight [W,3,p,p]            vision_model.embeddings.patch_embedding.weight
 visual.class_embedding [W]               vision_model.embeddings.class_embedding
 visual.positional_embedding [1+g*g,W]    vision_model.embeddings.position_embedding.weight
 visual.ln_pre.* / visual.ln_post.*       vision_model.pre_layrnorm.* / vision_model.post_layernorm.*
 visual.transformer.resblocks.{i}.*       vision_model.encoder.layers.{i}.*
 visual.proj [W,E] (x @ P)                visual_projection.weight [E,W]        (transposed)
 logit_scale                              logit_scale
 block: ln_1 -> layer_norm1, ln_2 -> layer_norm2, mlp.c_fc -> mlp.fc1, mlp.c_proj -> mlp.fc2,
        attn.out_proj -> self_attn.out_proj, attn.in_proj_{weight,bias} [3W,..] -> q/k/v_proj (thirds, in q k v order)
```

Both pool the same way: the image tower takes the class token after `ln_post`; the text tower takes
the end-of-text token (open_clip: the argmax id, which is `<|endoftext|>` = 49407; transformers:
the first `eos_token_id`, set from the tokenizer).

Sizes come from the tensors. Head counts and the activation are not in the tensors: they come from
`open_clip_config.json` beside the checkpoint (the hub layout: {"model_cfg": ..., "preprocess_cfg":
...}) when present, else from the released ViT configs (open_clip `model_configs/ViT-*.json`:
text heads = width / 64; vision heads = width / 64 except ViT-H (1280 wide, head_width 80), ViT-g
(1408, 88) and ViT-bigG (1664, 104), which have 16) and open_clip's default nn.GELU (OpenAI-trained
weights need `"quick_gelu": true` in the config). ViT-H-14: 224 px, patch 14, vision width 1280, 32
layers, 16 heads; text width 1024, 24 layers, 16 heads, context 77, vocab 49408; embed 1024.

The tokenizer is not in the checkpoint: it is read from Hugging Face tokenizer files (tokenizer.json,
or vocab.json + merges.txt) in the checkpoint's folder (the laion hub folder has both) or a folder
given as `tokenizer`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmrt.errors import VlmrtError

HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
OPEN_CLIP_FILES = ("open_clip_pytorch_model.bin", "open_clip_model.safetensors")
VISION_HEADS = {1280: 16, 1408: 16, 1664: 16}  # ViT-H, ViT-g, ViT-bigG; others: width / 64

_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}
_TOWERS = {"transformer.resblocks.": "text_model.encoder.layers.", "visual.transformer.resblocks.": "vision_model.encoder.layers."}
_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
          "attn.out_proj": "self_attn.out_proj"}
_IGNORED = ("attn_mask",)  # a causal-mask buffer some checkpoints carry; the model builds its own


@dataclass
class ClipJudge:
    """A CLIP model ready to embed images and texts (unit-norm embeddings, fp32)."""

    model: torch.nn.Module  # transformers CLIPModel
    tokenizer: object
    image_processor: object  # CLIPImageProcessorPil: resize shortest side, center crop, normalize
    source: str  # "hf" or "open_clip"
    path: str
    device: torch.device

    @torch.inference_mode()
    def embed_images(self, images: list) -> torch.Tensor:
        """PIL images -> [N,E] unit vectors."""
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        out = self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype))
        return torch.nn.functional.normalize(_pooled(out).float(), dim=-1).cpu()

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Texts -> [N,E] unit vectors; texts longer than the context are truncated (as open_clip does)."""
        limit = self.model.config.text_config.max_position_embeddings
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=limit, return_tensors="pt")
        out = self.model.get_text_features(input_ids=enc["input_ids"].to(self.device),
                                           attention_mask=enc["attention_mask"].to(self.device))
        return torch.nn.functional.normalize(_pooled(out).float(), dim=-1).cpu()


def _pooled(out) -> torch.Tensor:
    return out.pooler_output if hasattr(out, "pooler_output") else out  # transformers 5 returns an output object


def load_clip(path: str | os.PathLike, tokenizer: str | os.PathLike | None = None, device: str = "cpu") -> ClipJudge:
    """Load a CLIP judge from local files.

    Args:
        path: a Hugging Face CLIP folder (config.json + model.safetensors / pytorch_model.bin), an
            open_clip checkpoint file (`open_clip_pytorch_model.bin`), or a folder holding one.
        tokenizer: folder with the tokenizer files; default: the folder of `path`.
        device: "cpu" or "cuda".

    Raises:
        VlmrtError: the path is missing or holds something else than a CLIP model.
    """
    from vlmrt.config import resolve_device

    p, dev = Path(path), resolve_device(device)
    if not p.exists():
        raise VlmrtError(f"CLIP model not found: {p}; give --clip a local Hugging Face CLIP folder or an open_clip "
                         "checkpoint (open_clip_pytorch_model.bin), nothing is downloaded")
    if p.is_dir():
        if (p / "config.json").is_file() and any((p / f).is_file() for f in HF_WEIGHTS):
            return load_hf_clip(p, tokenizer, dev)
        found = next((p / f for f in OPEN_CLIP_FILES if (p / f).is_file()), None)
        if found is None:
            raise VlmrtError(f"{p} holds neither a Hugging Face CLIP model (config.json + model.safetensors or "
                             f"pytorch_model.bin) nor an open_clip checkpoint ({' or '.join(OPEN_CLIP_FILES)})")
        p = found
    return load_open_clip(p, tokenizer, dev)


def load_hf_clip(folder: Path, tokenizer, device: torch.device) -> ClipJudge:
    """A Hugging Face CLIP folder (e.g. openai/clip-vit-large-patch14, laion/CLIP-ViT-H-14-...)."""
    from transformers import CLIPModel

    cfg = json.loads((folder / "config.json").read_text())
    if cfg.get("model_type") != "clip":
        raise VlmrtError(f"{folder}/config.json describes a {cfg.get('model_type')!r} model, not a CLIP model "
                         "(model_type 'clip')")
    try:
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises many types for a broken folder
        raise VlmrtError(f"cannot load the CLIP model in {folder}: {e.__class__.__name__}: {e}") from None
    tok = _tokenizer(Path(tokenizer) if tokenizer else folder, len_limit=model.config.text_config.vocab_size)
    processor = image_processor(folder, model.config.vision_config.image_size)
    return ClipJudge(model.to(device).eval(), tok, processor, "hf", str(folder), device)


def load_open_clip(file: Path, tokenizer, device: torch.device) -> ClipJudge:
    """An open_clip checkpoint, converted into transformers' CLIPModel (see the module docstring)."""
    from transformers import CLIPModel

    state = read_open_clip_state(file)
    meta = _open_clip_config(file.parent)
    tok = _tokenizer(Path(tokenizer) if tokenizer else file.parent, len_limit=state["token_embedding.weight"].shape[0])
    hf_state = convert_open_clip_state(state)
    config = open_clip_config(state, meta.get("model_cfg", {}), tok)
    model, info = CLIPModel.from_pretrained(None, config=config, state_dict=hf_state, output_loading_info=True)
    bad = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if bad or info.get("error_msgs"):
        raise VlmrtError(f"{file}: the converted weights do not fit CLIPModel: {bad or info['error_msgs']}")
    pre = meta.get("preprocess_cfg", {})
    processor = image_processor(None, config.vision_config.image_size, pre.get("mean"), pre.get("std"))
    return ClipJudge(model.to(device).eval(), tok, processor, "open_clip", str(file), device)


def read_open_clip_state(file: Path) -> dict[str, torch.Tensor]:
    """Read an open_clip checkpoint's state dict (a plain one, or a training checkpoint's
    `state_dict`, with DistributedDataParallel's `module.` prefix removed)."""
    hint = "expected an open_clip checkpoint such as ViT-H-14's open_clip_pytorch_model.bin"
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(file))
        else:
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and safetensors errors differ by version
        raise VlmrtError(f"{file} is not a checkpoint torch can read ({e.__class__.__name__}); {hint}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise VlmrtError(f"{file} holds a {type(obj).__name__}, not a state dict; {hint}")
    state = {k.removeprefix("module."): v for k, v in obj.items() if torch.is_tensor(v)}
    required = ("visual.conv1.weight", "visual.proj", "token_embedding.weight", "text_projection")
    missing = [k for k in required if k not in state]
    if missing:
        seen = ", ".join(list(state)[:3])
        raise VlmrtError(f"{file} is not an open_clip ViT CLIP checkpoint: no {', '.join(missing)} "
                         f"(its keys start {seen} ...); {hint}")
    return state


def _open_clip_config(folder: Path) -> dict:
    f = folder / "open_clip_config.json"
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise VlmrtError(f"{f} is not valid JSON: {e}") from None


def _blocks(state: dict, prefix: str) -> int:
    return len({k[len(prefix):].split(".", 1)[0] for k in state if k.startswith(prefix)})


def open_clip_config(state: dict, model_cfg: dict, tokenizer):
    """A transformers CLIPConfig for an open_clip state dict: sizes from the tensors, head counts
    and activation from `model_cfg` (open_clip's model config) or the released defaults."""
    from transformers import CLIPConfig

    conv = state["visual.conv1.weight"]  # [W,3,p,p]
    v_width, patch = conv.shape[0], conv.shape[-1]
    grid = math.isqrt(state["visual.positional_embedding"].shape[0] - 1)
    t_vocab, t_width = state["token_embedding.weight"].shape
    v_cfg, t_cfg = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    v_heads = v_width // v_cfg["head_width"] if "head_width" in v_cfg else VISION_HEADS.get(v_width, v_width // 64)
    t_heads = t_cfg.get("heads", t_width // 64)
    for tower, width, heads in (("vision", v_width, v_heads), ("text", t_width, t_heads)):
        if heads < 1 or width % heads:
            raise VlmrtError(f"cannot tell the {tower} tower's head count (width {width}); put open_clip's "
                             "model config in open_clip_config.json beside the checkpoint")
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    text = dict(vocab_size=t_vocab, hidden_size=t_width, num_attention_heads=t_heads,
                num_hidden_layers=_blocks(state, "transformer.resblocks."),
                intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                max_position_embeddings=state["positional_embedding"].shape[0], hidden_act=act, layer_norm_eps=1e-5,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=v_width, num_attention_heads=v_heads, patch_size=patch, image_size=grid * patch,
                  num_hidden_layers=_blocks(state, "visual.transformer.resblocks."),
                  intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                  hidden_act=act, layer_norm_eps=1e-5)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=state["visual.proj"].shape[1])


def convert_open_clip_state(state: dict) -> dict[str, torch.Tensor]:
    """Rename (and split / transpose) open_clip keys into transformers CLIPModel keys.

    Raises:
        VlmrtError: a key has no counterpart (an open_clip variant CLIPModel cannot express, such
            as attentional pooling, layer scale or a timm / HF text tower); the message names it.
    """
    out, unknown = {}, []
    for key, value in state.items():
        if key in _TOP:
            out[_TOP[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
        elif key not in _IGNORED:
            mapped = _block_keys(key, value)
            if mapped is None:
                unknown.append(key)
            out.update(mapped or {})
    if unknown:
        raise VlmrtError(f"open_clip keys with no transformers CLIPModel counterpart: {', '.join(unknown[:5])}"
                         f"{' ...' if len(unknown) > 5 else ''}; only plain ViT CLIP models (like ViT-H-14) convert")
    return out


def _block_keys(key: str, value: torch.Tensor) -> dict | None:
    """One transformer block's key -> its CLIPModel key(s); None when unknown."""
    for src, dst in _TOWERS.items():
        if not key.startswith(src):
            continue
        index, rest = key[len(src):].split(".", 1)
        base = f"{dst}{index}."
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[1]  # weight | bias
            return {f"{base}self_attn.{n}_proj.{kind}": t.contiguous() for n, t in zip("qkv", value.chunk(3, dim=0))}
        for s, d in _BLOCK.items():
            if rest.startswith(s + "."):
                return {base + d + rest[len(s):]: value}
    return None


def image_processor(folder: Path | None, size: int, mean=None, std=None):
    """CLIP preprocessing: resize the shortest side to `size` (bicubic), center crop, normalize
    (OpenAI CLIP mean / std unless given). A folder's preprocessor_config.json wins when present."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    if folder is not None and (folder / "preprocessor_config.json").is_file():
        return CLIPImageProcessorPil.from_pretrained(str(folder), local_files_only=True)
    extra = {k: tuple(v) for k, v in (("image_mean", mean), ("image_std", std)) if v}
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **extra)


def _tokenizer(folder: Path, len_limit: int):
    from vlmrt.tokenizer import load_tokenizer

    names = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
    if not folder.is_dir() or not any((folder / n).is_file() for n in names):
        raise VlmrtError(f"no CLIP tokenizer in {folder}: put the Hugging Face tokenizer files there (tokenizer.json, "
                         "or vocab.json + merges.txt, as in the laion/CLIP-ViT-H-14-laion2B-s32B-b79K folder) "
                         "or pass --tokenizer DIR")
    tok = load_tokenizer(folder)
    if len(tok) > len_limit:
        raise VlmrtError(f"the tokenizer in {folder} has {len(tok)} tokens, the CLIP text tower {len_limit}: "
                         "they do not belong together")
    if tok.eos_token_id is None:
        raise VlmrtError(f"the tokenizer in {folder} has no end-of-text token, which CLIP pools on")
    return tok
