"""Write tiny MiniGPT-4 release folders in the original file layout and key names (SPEC 1.9):
eva_vit_g.pth (flat), blip2_pretrained_flant5xxl.pth ({"model": ...}), pretrained_minigpt4_7b.pth
({"model": {"llama_proj.*"}, "optimizer": ..., ...}), and a Vicuna folder in Hugging Face layout."""

import json
from pathlib import Path

import torch


def write_minigpt4_release(loaded, folder: Path, llm_format: str = "safetensors", extra_block: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
    cfg = loaded.config
    eva = {k[len("visual_encoder."):]: v for k, v in state.items() if k.startswith("visual_encoder.")}
    if extra_block:  # EVA-CLIP's last block, which BLIP-2 drops
        last = cfg.vision.depth - 1
        eva.update({k.replace(f"blocks.{last}.", f"blocks.{cfg.vision.depth}."): v
                    for k, v in eva.items() if k.startswith(f"blocks.{last}.")})
    torch.save(eva, folder / "eva_vit_g.pth")
    if cfg.qformer is not None:
        blip2 = {k: v for k, v in state.items() if k.startswith(("Qformer.", "query_tokens", "ln_vision."))}
        h = cfg.qformer.hidden
        blip2.update({  # parts of the BLIP-2 file MiniGPT-4 does not use
            "Qformer.bert.embeddings.word_embeddings.weight": torch.zeros(30, h),
            "Qformer.bert.embeddings.position_ids": torch.arange(16)[None],
            "Qformer.bert.encoder.layer.0.intermediate.dense.weight": torch.zeros(cfg.qformer.intermediate, h),
            "Qformer.bert.encoder.layer.0.output.dense.weight": torch.zeros(h, cfg.qformer.intermediate),
            "Qformer.cls.predictions.bias": torch.zeros(30),
            "t5_proj.weight": torch.zeros(8, h),
        })
        torch.save({"model": blip2}, folder / "blip2_pretrained_flant5xxl.pth")
    proj = {k: v for k, v in state.items() if k.startswith("llama_proj.")}
    torch.save({"model": proj, "optimizer": {}, "epoch": 3, "config": {}}, folder / "pretrained_minigpt4_7b.pth")
    write_llama_folder(loaded, folder / "vicuna", llm_format)
    return folder


def write_llama_folder(loaded, folder: Path, llm_format: str) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    d = loaded.config.decoder
    llm = {k[len("llama_model."):]: v.contiguous() for k, v in loaded.model.state_dict().items() if k.startswith("llama_model.")}
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": d.vocab_size,
        "hidden_size": d.hidden_size, "intermediate_size": d.intermediate_size, "num_hidden_layers": d.num_layers,
        "num_attention_heads": d.num_heads, "num_key_value_heads": d.num_kv_heads, "rms_norm_eps": d.rms_norm_eps,
        "max_position_embeddings": d.max_position_embeddings, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": -1,
    }
    (folder / "config.json").write_text(json.dumps(config))
    loaded.tokenizer.save_pretrained(folder)
    if llm_format == "safetensors":
        save_file(llm, folder / "model.safetensors")
        return
    names = sorted(llm)  # two .bin shards with an index, as the Vicuna releases ship
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for shard, keys in shards.items():
        torch.save({k: llm[k] for k in keys}, folder / shard)
    index = {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def write_sentencepiece_tokenizer(folder: Path) -> None:
    """Replace the tokenizer with a SentencePiece tokenizer.model + tokenizer_config.json, the way the
    Vicuna and Llama-2 releases ship it (trained here on a few sentences, byte fallback on)."""
    import io

    import sentencepiece as spm

    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / f).unlink(missing_ok=True)
    text = ["Describe this image in detail.", "What is the person wearing?", "Give the following image: "
            "ImageContent. You will be able to see the image once I provide it to you.", "###Human: Assistant:"] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=400, model_type="bpe",
                                   byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
