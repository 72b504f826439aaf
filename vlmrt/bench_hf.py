"""The `hf` baseline of `vlmrt bench`: Hugging Face transformers' own `generate` on our weights.

`transformers.LlamaForCausalLM` (or `Qwen2ForCausalLM` when the decoder has q/k/v biases) is built
from our decoder's config and handed our decoder's tensors (key names already match, so a strict
`load_state_dict(assign=True)` shares them: no copy). Our vision and embedding stages (eager) make
`inputs_embeds`; transformers does prefill, cache and decoding. This is what a transformers user
runs today, on the very same weights. For decoders with their own position scheme (SliMM's M-RoPE and
DeepStack) transformers' plain decoder is a timing baseline of the same size: its tokens differ, and
the agreement column says by how much.
"""

from __future__ import annotations

import time

import torch

from vlmrt.errors import VlmrtError
from vlmrt.generate import split_embedded, vision_inputs


class HFRunner:
    """Hugging Face transformers' generate on the same decoder weights, fed our vision and embedding
    output as `inputs_embeds` (the comparison a user of transformers would make).

    `hf-compiled` asks for transformers' static cache, which transformers compiles by itself on CUDA
    (torch.compile of the forward); on CPU it runs the static cache uncompiled.
    """

    def __init__(self, name: str, loaded):
        if loaded.model is None:
            raise VlmrtError(f"{loaded.name} is an ONNX export; the hf baseline needs a preset or a release folder")
        self.name, self.loaded = name, loaded
        self.hf = hf_llama_like(find_llama_decoder(loaded.model), loaded.device)
        self.static = name == "hf-compiled"
        self.compile_s = None

    def _sync(self):
        if self.loaded.device.type == "cuda":
            torch.cuda.synchronize(self.loaded.device)

    def _gen_config(self, new_tokens: int):
        from transformers import GenerationConfig as HFGenerationConfig

        return HFGenerationConfig(
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
            bos_token_id=None, pad_token_id=0, cache_implementation="static" if self.static else None,
        )

    def generate(self, batch: dict, new_tokens: int) -> tuple[dict, torch.Tensor]:
        from transformers import LogitsProcessorList

        model, clock = self.loaded.model, _FirstLogits(self._sync)
        self._sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            features = model.encode_images(batch["pixel_values"].to(self.loaded.dtype), **vision_inputs(batch))
            self._sync()
            t_vision = time.perf_counter()
            embeds, _ = split_embedded(model.embed(batch["input_ids"], features))  # [B,T,D]
            self.hf.generation_config = self._gen_config(new_tokens)
            out = self.hf.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                   generation_config=self.hf.generation_config,
                                   logits_processor=LogitsProcessorList([clock]))
        self._sync()
        t_end = time.perf_counter()
        steps = new_tokens - 1
        timings = {"vision_ms": (t_vision - t0) * 1e3, "prefill_ms": (clock.t - t_vision) * 1e3,
                   "ttft_ms": (clock.t - t0) * 1e3, "decode_ms": (t_end - clock.t) * 1e3, "decode_steps": steps,
                   "ms_per_token": (t_end - clock.t) * 1e3 / steps}
        return timings, out[:, -new_tokens:].cpu()  # inputs_embeds only: generate returns the new tokens

    def predict(self, batch: dict, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced greedy picks [B,N] from one forward over prompt + tokens[:, :-1]."""
        model, t = self.loaded.model, batch["input_ids"].shape[1]
        with torch.inference_mode():
            features = model.encode_images(batch["pixel_values"].to(self.loaded.dtype), **vision_inputs(batch))
            ids = torch.cat([batch["input_ids"], tokens[:, :-1].to(batch["input_ids"].device)], dim=1)  # [B,T+N-1]
            mask = torch.cat([batch["attention_mask"], torch.ones_like(ids[:, t:])], dim=1)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            embeds, _ = split_embedded(model.embed(ids, features))
            logits = self.hf(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
        return logits[:, t - 1:].argmax(-1).cpu()  # [B,N]


class _FirstLogits:
    """A logits processor that only notes when the first logits (the end of prefill) exist."""

    def __init__(self, sync):
        self.sync, self.t = sync, None

    def __call__(self, input_ids, scores):
        if self.t is None:
            self.sync()
            self.t = time.perf_counter()
        return scores


def find_llama_decoder(model):
    """The model's decoder stage, if it is our Llama-style decoder without MiniCPM's scalings."""
    from vlmrt.models.layers import LlamaForCausalLM

    for m in model.modules():
        if isinstance(m, LlamaForCausalLM):
            c = m.config
            if c.residual_multiplier == 1.0 and c.logits_divisor == 1.0:
                return m
    raise VlmrtError("the hf baseline needs a plain Llama decoder (transformers' LlamaForCausalLM); "
                     "this model's decoder is something else; leave hf out of --runtime")


def hf_llama_like(decoder, device: torch.device):
    """transformers.LlamaForCausalLM built from our DecoderConfig, holding our decoder's tensors.

    Key names already match, so this is a strict `load_state_dict(assign=True)`: the HF model shares
    the weights instead of copying them (a 7B decoder is 13.5 GB in fp16).
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    c = decoder.config
    # Llama's attention_bias would also bias o_proj; Qwen2 biases exactly q/k/v, as our qkv_bias does
    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if c.qkv_bias else (LlamaConfig, LlamaForCausalLM)
    cfg = config_cls(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings, rope_theta=c.rope_theta,
        tie_word_embeddings=c.tie_word_embeddings, pad_token_id=0,
    )
    with torch.device("meta"):
        hf = model_cls(cfg)
    wanted = set(hf.state_dict())  # a family's model may hold its vision tower beside the decoder (SliMM)
    hf.load_state_dict({k: v for k, v in decoder.state_dict().items() if k in wanted}, strict=True, assign=True)
    with torch.device(device):  # non-persistent buffers (rotary inv_freq) are not in the state dict
        hf.model.rotary_emb = type(hf.model.rotary_emb)(cfg)
    left = [n for n, b in hf.named_buffers() if b.is_meta]
    if left:
        raise VlmrtError(f"internal: transformers' Llama has buffers we did not fill: {', '.join(left)}")
    return hf.eval()
