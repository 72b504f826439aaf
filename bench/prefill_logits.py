"""Prefill of one decoder, all positions' logits vs the last position's only (`logits_at`).

The decoder is a `LlamaForCausalLM` at SliMM-Qwen2-0.5B's widths by default (24 layers x 896, 14
heads, 2 KV heads, MLP 4864, q/k/v biases, vocabulary 151936), random weights, fp32, batch 1. The
prompt is random embeddings; only the head's work differs between the two calls.

    PYTHONPATH=. .venv/bin/python bench/prefill_logits.py [--tokens 64 300] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vlmrt.kv_cache import StaticKVCache
from vlmrt.models.layers import DecoderConfig, LlamaForCausalLM

QWEN2_05B = DecoderConfig(vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                          intermediate_size=4864, qkv_bias=True, tie_word_embeddings=True,
                          max_position_embeddings=4096)


@torch.inference_mode()
def time_prefill(model: LlamaForCausalLM, tokens: int, logits_at, runs: int) -> float:
    """Median ms of `runs` prefills of `tokens` positions, after one warm-up."""
    cfg = model.config
    cache = StaticKVCache(cfg.num_layers, 1, cfg.num_kv_heads, tokens, cfg.head_dim, torch.float32, "cpu")
    x = torch.randn(1, tokens, cfg.hidden_size)  # [1,T,D]
    positions, mask, slots = torch.arange(tokens)[None], torch.ones(1, tokens, dtype=torch.long), torch.arange(tokens)
    times = []
    for _ in range(runs + 1):
        t0 = time.perf_counter()
        model(x, positions, mask, slots, cache, logits_at)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 300], help="prompt lengths (default 64 300)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per setting, after one warm-up (default 3)")
    args = p.parse_args()
    torch.manual_seed(0)
    model = LlamaForCausalLM(QWEN2_05B).eval()
    print("| prompt tokens | all positions ms | last position ms | speed-up |\n|---|---|---|---|")
    for t in args.tokens:
        every = time_prefill(model, t, None, args.runs)
        last = time_prefill(model, t, torch.tensor([t - 1]), args.runs)
        print(f"| {t} | {every:.0f} | {last:.0f} | {every / last:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
