"""Qwen-VL and Qwen-VL-Chat: a 448 px OpenCLIP-style ViT-bigG (48 blocks, width 1664), a one-layer
cross-attention resampler to 256 tokens, and the Qwen-7B (v1) decoder, on the three-stage contract.

Facts from ../shared/models/SPEC.md section 3, which restates the release (`Qwen/Qwen-VL-Chat`:
config.json, visual.py, modeling_qwen.py, tokenization_qwen.py, qwen_generation_utils.py). Vision
modules carry the release's names (`transformer.visual.` minus `transformer.`), so vision weights
load as they are; the decoder is the shared Llama-style one (layers.py) with q/k/v biases, which
is Qwen-7B under Qwen2 naming, and the loader renames those keys once (`release_to_ours`).

```
 pixel_values [B,3,448,448]
   └► conv1 (14x14, no bias) ─► [B,1024,1664] + positional_embedding (16x16 -> 32x32 bicubic) ─► ln_pre
   └► 48 x (ln_1 ─► attn (head-interleaved in_proj) ─► + ; ln_2 ─► mlp (GELU) ─► +)    [B,1024,1664]
   └► attn_pool: 256 queries x-attend kv_proj(x) (keys + pos_embed resized 16x16 -> 32x32) [B,256,4096]
   └► ln_post ─► @ proj ─► image_features [B,256,4096]
 input_ids: ... <img> <imgpad> x256 </img> ...  ─► wte; the 256 <imgpad> rows <- image_features
 inputs_embeds ─► Qwen-7B (RMSNorm, rotary, c_attn with bias, SwiGLU on w2) ─► logits [B,T,151936]
```

The tokenizer is the release's tiktoken BPE (`qwen.tiktoken`), rebuilt as a Hugging Face
`tokenizers` byte-level BPE (no `tiktoken` package, no remote code); see `build_qwen_tokenizer`.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlmrt.errors import VlmrtError
from vlmrt.models.layers import DecoderConfig, LlamaForCausalLM, Resampler, SplicedLlamaStages
from vlmrt.processor import ChatTemplate, ProcessorSpec


@dataclass(frozen=True)
class QwenViTConfig:
    image_size: int = 448
    patch_size: int = 14
    width: int = 1664
    layers: int = 48
    heads: int = 16
    mlp_hidden: int = 8192  # int(1664 * 4.9231)
    pos_grid: int = 16  # the stored positional table is 16x16 (256 rows), resized to the patch grid
    query_grid: int = 16  # 16x16 = 256 resampler queries
    output_dim: int = 4096  # resampler width = the LLM's hidden size
    resampler_heads: int = 32  # output_dim / 128 in the release
    eps: float = 1e-6

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_queries(self) -> int:
        return self.query_grid ** 2


@dataclass(frozen=True)
class QwenVLConfig:
    vision: QwenViTConfig
    decoder: DecoderConfig
    template: str  # key of TEMPLATES: "chatml" (Qwen-VL-Chat) or "plain" (Qwen-VL)
    image_start_id: int = 151857  # <img>; </img> and <imgpad> follow (config.json visual.image_start_id)

    @property
    def special_start_id(self) -> int:
        """Id of <|endoftext|>: the release numbers its special tokens from len(ranks) on."""
        return self.image_start_id - SPECIAL_TOKENS.index("<img>")

    def special_id(self, token: str) -> int:
        return self.special_start_id + SPECIAL_TOKENS.index(token)

    @classmethod
    def from_hf(cls, hf: dict, chat_format: str) -> "QwenVLConfig":
        """Read the release's config.json dict (the only place it is read). The sizes of the stored
        positional and query tables (16x16 each) are not in it; the loader checks them on the weights."""
        heads, hidden, v = hf["num_attention_heads"], hf["hidden_size"], hf["visual"]
        if hf.get("kv_channels", hidden // heads) * heads != hidden or hf.get("rotary_pct", 1.0) != 1.0:
            raise VlmrtError("config.json: kv_channels x heads must equal hidden_size and rotary_pct be 1.0 (as in Qwen-7B)")
        if not hf.get("no_bias", True) or v["width"] == v["output_dim"]:
            raise VlmrtError("config.json: no_bias false or visual width == output_dim are Qwen-VL variants vlmrt does not support")
        decoder = DecoderConfig(
            vocab_size=hf["vocab_size"], hidden_size=hidden, num_layers=hf["num_hidden_layers"], num_heads=heads,
            num_kv_heads=heads, intermediate_size=hf["intermediate_size"] // 2,  # w1/w2 are half as wide
            rms_norm_eps=hf.get("layer_norm_epsilon", 1e-6), rope_theta=float(hf.get("rotary_emb_base", 10000)),
            # dynamic NTK and log-n scaling are identities up to seq_length, and not implemented past it
            max_position_embeddings=hf.get("seq_length", 2048), qkv_bias=True,
        )
        vision = QwenViTConfig(
            image_size=v["image_size"], patch_size=v["patch_size"], width=v["width"], layers=v["layers"],
            heads=v["heads"], mlp_hidden=int(v["width"] * v["mlp_ratio"]), output_dim=v["output_dim"],
            resampler_heads=v["output_dim"] // 128,
        )
        return cls(vision, decoder, "chatml" if chat_format == "chatml" else "plain", v.get("image_start_id", 151857))


# Special tokens in id order from len(ranks) (151643 in the release): SPEC 3.5.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|extra_{i}|>" for i in range(205)),
                  "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>")
# The release's pre-tokenizer pattern (tokenization_qwen.py PAT_STR): digits one by one.
QWEN_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# One user turn, as the release's from_list_format + make_context render it (SPEC 3.5, 3.6).
# `{image}` becomes <imgpad> x 256 (the release writes the image path's bytes there, then pads).
_PICTURE = "Picture 1: <img>{image}</img>\n{prompt}"
TEMPLATES = {
    "chatml": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
              + _PICTURE + "<|im_end|>\n<|im_start|>assistant\n",
    "plain": _PICTURE,
}
CHATS = {  # Qwen's make_context: history turns between the system block and the query
    "chatml": ChatTemplate("\n<|im_start|>user\n{content}<|im_end|>", "\n<|im_start|>assistant\n{content}<|im_end|>",
                           "\n<|im_start|>assistant\n", "Picture {n}: <img>{image}</img>\n",
                           "<|im_start|>system\n{content}<|im_end|>", "You are a helpful assistant."),
    "plain": ChatTemplate("{content}", "{content}", "", "Picture {n}: <img>{image}</img>\n"),  # no roles, no system
}
MAX_IMAGES = 4  # per prompt: 258 ids each (SPEC 3.5), numbered per query as from_list_format does
STOP_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|im_start|>")

_QWEN_7B = DecoderConfig(vocab_size=151936, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                         intermediate_size=11008, rms_norm_eps=1e-6, max_position_embeddings=2048, qkv_bias=True)
_TINY_VIT = QwenViTConfig(image_size=112, width=48, layers=2, heads=4, mlp_hidden=96, pos_grid=4, query_grid=4,
                          output_dim=32, resampler_heads=4)
_TINY_LLM = replace(_QWEN_7B, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=64,
                    max_position_embeddings=512)  # the real vocabulary, so special ids are the release's

PRESETS = {
    "qwen-vl-7b": QwenVLConfig(QwenViTConfig(), _QWEN_7B, "plain"),
    "qwen-vl-chat-7b": QwenVLConfig(QwenViTConfig(), _QWEN_7B, "chatml"),
    "qwen-vl-tiny": QwenVLConfig(_TINY_VIT, _TINY_LLM, "chatml"),
}


# ----------------------------------------------------------------------------- vision (release names)
def resize_abs_pos(pos: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[L0,C] table of a square grid -> [num_tokens,C]: bicubic (align_corners False) in fp32, cast
    back; a no-op when the grids match (the release's get_abs_pos). Shapes are static."""
    src, tgt = math.isqrt(pos.shape[0]), math.isqrt(num_tokens)
    if src == tgt:
        return pos
    grid = pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)  # [1,C,src,src]
    grid = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)  # [1,C,tgt,tgt]
    return grid.permute(0, 2, 3, 1).reshape(tgt * tgt, -1).to(pos.dtype)


class VisualAttention(nn.Module):
    """Self-attention with the release's fused, head-interleaved `in_proj` (Megatron layout): output
    feature h*(3*hd) + j*hd + d is query (j=0), key (1) or value (2) of head h (SPEC 3.2)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)
        self.heads = heads

    def forward(self, x):
        b, n, w = x.shape
        qkv = self.in_proj(x).view(b, n, self.heads, 3, w // self.heads)  # [B,N,H,3,hd]
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each [B,H,N,hd]
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(hd), no mask
        return self.out_proj(out.transpose(1, 2).reshape(b, n, w))


class VisualMlp(nn.Module):
    def __init__(self, cfg: QwenViTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.width, cfg.mlp_hidden)
        self.c_proj = nn.Linear(cfg.mlp_hidden, cfg.width)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))  # exact (erf) GELU


class VisualAttentionBlock(nn.Module):
    def __init__(self, cfg: QwenViTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = VisualAttention(cfg.width, cfg.heads)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = VisualMlp(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TransformerBlock(nn.Module):
    """The release's name for the stack of ViT blocks (`visual.transformer.resblocks.{i}`)."""

    def __init__(self, cfg: QwenViTConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(VisualAttentionBlock(cfg) for _ in range(cfg.layers))

    def forward(self, x):
        for block in self.resblocks:
            x = block(x)
        return x


class VisionTransformer(nn.Module):
    """`transformer.visual`: ViT + resampler + ln_post + proj; pixels in, LLM-width tokens out."""

    def __init__(self, cfg: QwenViTConfig):
        super().__init__()
        self.config = cfg
        self.conv1 = nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size, bias=False)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.pos_grid ** 2, cfg.width))
        self.ln_pre = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.transformer = TransformerBlock(cfg)
        self.attn_pool = Resampler(cfg.num_queries, cfg.output_dim, cfg.resampler_heads, cfg.width, cfg.eps)
        self.ln_post = nn.LayerNorm(cfg.output_dim, eps=cfg.eps)
        self.proj = nn.Parameter(torch.empty(cfg.output_dim, cfg.output_dim))  # used as x @ proj

    def forward(self, pixel_values):
        x = self.conv1(pixel_values).flatten(2).transpose(1, 2)  # [B,3,S,S] -> [B,P,W], P = grid^2
        x = self.ln_pre(x + resize_abs_pos(self.positional_embedding, x.shape[1]))
        x = self.transformer(x)  # [B,P,W]
        key_pos = resize_abs_pos(self.attn_pool.pos_embed, x.shape[1])  # [P,D]: query grid -> patch grid
        x = self.attn_pool(x, key_pos)  # [B,Q,D]
        return self.ln_post(x) @ self.proj  # [B,Q,D]


# ----------------------------------------------------------------------------- the model
class QWenLMHeadModel(SplicedLlamaStages, nn.Module):
    """Qwen-VL / Qwen-VL-Chat on the stage contract (see vlmrt/stages.py).

    Worked example (qwen-vl-chat-7b): "What is this?" renders to
    `<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\nPicture 1: <img>{image}</img>\\nWhat is this?<|im_end|>\\n<|im_start|>assistant\\n`;
    the processor tokenizes the text around `{image}` and puts 256 <imgpad> (151859) ids there, so
    the span is <img> 151857, 256 x 151859, </img> 151858. `encode_images` turns [1,3,448,448] into
    [1,256,4096]; `embed` writes those rows over the 256 <imgpad> positions (the release writes them
    over whatever lies between <img> and </img>: the same positions); `decode` runs Qwen-7B.
    """

    presets = PRESETS

    @staticmethod
    def is_release_folder(folder: Path) -> bool:
        """A folder with qwen.tiktoken, or whose config.json names QWenLMHeadModel."""
        if not folder.is_dir():
            return False
        config = folder / "config.json"
        return (folder / "qwen.tiktoken").exists() or (config.is_file() and "QWenLMHeadModel" in config.read_text(errors="replace"))

    def __init__(self, cfg: QwenVLConfig):
        super().__init__()
        self.config = cfg
        self.visual = VisionTransformer(cfg.vision)
        self.llm = LlamaForCausalLM(cfg.decoder)
        d = cfg.decoder
        self.num_layers, self.num_kv_heads, self.head_dim = d.num_layers, d.num_kv_heads, d.head_dim
        self.max_context = d.max_position_embeddings
        self.image_token_id = cfg.special_id("<imgpad>")

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B,3,S,S] -> image_features [B,Q,D]."""
        return self.visual(pixel_values)

    @property
    def language_model(self) -> LlamaForCausalLM:
        return self.llm

    @property
    def processor_spec(self) -> ProcessorSpec:
        cfg = self.config
        return ProcessorSpec(
            image_size=cfg.vision.image_size,
            template=TEMPLATES[cfg.template],
            image_placeholder="{image}",
            image_token_id=self.image_token_id,
            num_image_tokens=cfg.vision.num_queries,
            add_bos=False,  # Qwen has no BOS
            stop_token_ids=tuple((cfg.special_id(t),) for t in STOP_TOKENS),
            chat=CHATS[cfg.template],
            max_images=MAX_IMAGES,
        )

    @staticmethod
    def synthetic_tokenizer(cfg: QwenVLConfig):
        """A byte-level BPE with the release's layout: special tokens from cfg's <|endoftext|> id on."""
        return build_qwen_tokenizer(synthetic_ranks(cfg.special_start_id))


# ----------------------------------------------------------------------------- tokenizer (qwen.tiktoken)
def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """qwen.tiktoken: one `base64(token) rank` per line -> {token bytes: rank}; ranks must be 0..N-1."""
    if not path.is_file():
        raise VlmrtError(f"{path.parent}: missing qwen.tiktoken (the Qwen tokenizer file of the release)")
    ranks = {}
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise VlmrtError(f"{path}: line {n} is not `base64-token rank`; the file is corrupt, download it again") from None
    if not ranks or set(ranks.values()) != set(range(len(ranks))):
        raise VlmrtError(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps; the file is corrupt")
    return ranks


def _byte_to_char() -> list[str]:
    """GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the other 68 bytes
    map to code points 256.. in byte order (what `tokenizers`' ByteLevel pre-tokenizer emits)."""
    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    shifted = itertools.count(256)
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def build_qwen_tokenizer(ranks: dict[bytes, int]):
    """tiktoken ranks -> `PreTrainedTokenizerFast` that tokenizes exactly as the release does.

    tiktoken merges, inside each regex piece, the adjacent pair whose concatenation has the lowest
    rank, and takes a piece that is itself a token whole. The same as a BPE whose merges are every
    split (a, b) of every token with a, b tokens, ordered by the token's rank, with `ignore_merges`
    (a whole-piece hit wins). NFC first, as the release's `tokenize` does. Special tokens get ids
    len(ranks) + i in SPECIAL_TOKENS order; no BOS; <|endoftext|> is EOS and pad.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = dict(enumerate(_byte_to_char()))
    by_rank = {r: t.decode("latin-1").translate(alphabet) for t, r in ranks.items()}  # byte-level text
    vocab = {t: r for r, t in by_rank.items()}
    merges = sorted((r, ranks[t[:i]], ranks[t[i:]]) for t, r in ranks.items() for i in range(1, len(t))
                    if t[:i] in ranks and t[i:] in ranks)  # (rank of the result, left, right)
    pairs = [(by_rank[a], by_rank[b]) for _, a, b in merges]
    start = len(ranks)
    vocab.update({tok: start + i for i, tok in enumerate(SPECIAL_TOKENS)})
    bpe = Tokenizer(models.BPE(vocab, pairs, ignore_merges=True))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def synthetic_ranks(size: int) -> dict[bytes, int]:
    """`size` ranks for synthetic presets: the 256 bytes, then English words and invented syllables
    (with and without a leading space) grown one byte at a time, so every token is reachable by
    merges. Deterministic; the text a synthetic model writes with it is meaningless."""
    ranks = {bytes([b]): b for b in range(256)}
    syllables = [o + v + c for o in "b c d f g h k l m n p r s t v w".split() for v in "a e i o u ea ou".split()
                 for c in ("", "n", "r", "s", "t", "l", "nd")]
    words = itertools.chain(_WORDS, syllables, (a + b for a, b in itertools.product(syllables, repeat=2)))
    for word in itertools.chain.from_iterable((w, " " + w) for w in words):
        for k in range(2, len(word) + 1):
            if len(ranks) == size:
                return ranks
            ranks.setdefault(word[:k].encode(), len(ranks))
    raise ValueError(f"cannot build {size} synthetic ranks")


_WORDS = ("the a an of and to in is on with for this that it image picture photo describe what who where there "
          "man woman person space suit astronaut flag sky blue white red black large small standing holding "
          "wearing left right top bottom background detail shows color answer question you can see scene").split()


# ----------------------------------------------------------------------------- loading the release
_LAYER_RENAMES = {  # transformer.h.{i}.<release> -> llm.model.layers.{i}.<ours> (SPEC 3.4)
    "ln_1.weight": "input_layernorm.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "mlp.w2.weight": "mlp.gate_proj.weight",  # the SiLU acts on w2
    "mlp.w1.weight": "mlp.up_proj.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}
_TOP_RENAMES = {
    "transformer.wte.weight": "llm.model.embed_tokens.weight",
    "transformer.ln_f.weight": "llm.model.norm.weight",
    "lm_head.weight": "llm.lm_head.weight",
}


def release_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The one renaming step: release keys -> our module names. `transformer.visual.*` loses its
    `transformer.` prefix; the LLM maps onto Qwen2/Llama names, `c_attn` split into q/k/v by rows
    ([Q;K;V] blocks). Unknown keys pass through unchanged, so strict assignment names them."""
    out = {}
    for key, t in state.items():
        if key.startswith("transformer.visual."):
            out[key[len("transformer."):]] = t
        elif key in _TOP_RENAMES:
            out[_TOP_RENAMES[key]] = t
        elif key.startswith("transformer.h."):
            _, _, i, rest = key.split(".", 3)
            prefix = f"llm.model.layers.{i}."
            if rest in ("attn.c_attn.weight", "attn.c_attn.bias"):
                for name, part in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}.{rest.rsplit('.', 1)[1]}"] = part
            else:
                out[prefix + _LAYER_RENAMES.get(rest, rest)] = t
        else:
            out[key] = t
    return out


def load_release(folder: str | Path, device: torch.device, dtype: torch.dtype, shard=None):
    """Load a Qwen-VL or Qwen-VL-Chat release folder: config.json (architectures QWenLMHeadModel),
    generation_config.json (chat_format "chatml" picks the chat template; default chatml), qwen.tiktoken,
    and the weights (pytorch_model-*.bin shards with an index as released, or safetensors). No remote
    code is run and nothing is downloaded.

    Returns (model, tokenizer, config). Errors name the file and the key at fault.
    """
    from vlmrt.weights import assign_weights, build_on, read_hf_weights, read_json

    folder = Path(folder)
    hf = read_json(folder / "config.json")
    if "QWenLMHeadModel" not in (hf.get("architectures") or []) or "visual" not in hf:
        raise VlmrtError(f"{folder}/config.json does not describe a Qwen-VL model (architectures QWenLMHeadModel with a visual section)")
    gen = folder / "generation_config.json"
    chat_format = read_json(gen).get("chat_format", "chatml") if gen.exists() else "chatml"
    try:
        cfg = QwenVLConfig.from_hf(hf, chat_format)
    except KeyError as e:
        raise VlmrtError(f"{folder}/config.json lacks {e}; the file is incomplete") from None
    tokenizer = build_qwen_tokenizer(read_tiktoken_ranks(folder / "qwen.tiktoken"))
    img = tokenizer.convert_tokens_to_ids("<img>")
    if img != cfg.image_start_id:
        raise VlmrtError(f"{folder}: qwen.tiktoken puts <img> at id {img} but config.json says visual.image_start_id "
                         f"{cfg.image_start_id}; the tokenizer file does not belong to this model")
    state = release_to_ours(read_hf_weights(folder, lazy=shard is not None))
    grid = lambda k: math.isqrt(state[k].shape[0]) if k in state else 16  # the stored tables are 16x16 as released
    cfg = replace(cfg, vision=replace(cfg.vision, pos_grid=grid("visual.positional_embedding"),
                                      query_grid=grid("visual.attn_pool.query")))
    model = build_on(device, dtype, lambda: QWenLMHeadModel(cfg), shard)
    assign_weights(model, state, f"Qwen-VL release in {folder}", shard)
    return model.eval(), tokenizer, cfg
