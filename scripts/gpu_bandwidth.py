"""Weight-read bandwidth of a device, and the decode floor it gives a model (scripts/gpu_check.sh).

Decode is memory-bound: each step reads every decoder weight once, so no runtime decodes a token
faster than (decoder weight bytes) / (read bandwidth). The bandwidth is measured here, in the same
run as the benchmark, two ways over >= --gib GiB: a sum (a pure read) and a matrix-vector product
(the shape of a decode step's matmuls); the faster one is the floor's bandwidth.

Usage: python scripts/gpu_bandwidth.py --device cuda --gib 4 --model minigpt4-7b --dtype fp16 --out bw.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def timed(fn, device: torch.device, repeats: int = 10) -> float:
    """Median seconds of fn() after two warm-up calls, the device synchronized around each."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def read_bandwidth(device: torch.device, gib: float, dtype: torch.dtype) -> dict:
    """GB/s (1e9 bytes) of a sum and of a GEMV over a [rows, 8192] matrix of `gib` GiB."""
    cols = 8192
    rows = int(gib * 2**30 / (cols * torch.finfo(dtype).bits // 8))
    w = torch.randn(rows, cols, device=device, dtype=dtype)  # [rows, 8192]
    x = torch.randn(cols, 1, device=device, dtype=dtype)
    nbytes = w.numel() * w.element_size()
    out = {"bytes": nbytes, "sum_gbps": nbytes / timed(lambda: w.sum(), device) / 1e9,
           "gemv_gbps": nbytes / timed(lambda: w @ x, device) / 1e9}
    out["gbps"] = max(out["sum_gbps"], out["gemv_gbps"])
    return out


def decoder_bytes(model: str, dtype: torch.dtype) -> int:
    """Bytes a decode step reads: every decoder weight except the embedding table (one row of it is
    read), the lm_head included; counted on the meta device (nothing allocated)."""
    from vlmrt.models import all_presets, family_class
    from vlmrt.models.layers import LlamaForCausalLM

    family, cfg = all_presets()[model]
    with torch.device("meta"):
        vlm = family_class(family)(cfg)
    decoder = next(m for m in vlm.modules() if isinstance(m, LlamaForCausalLM))
    embed = decoder.model.embed_tokens.weight
    params = {id(p): p for p in decoder.parameters()}  # a tied lm_head counts once
    if decoder.lm_head.weight is not embed:
        params.pop(id(embed))
    return sum(p.numel() for p in params.values()) * (torch.finfo(dtype).bits // 8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--gib", type=float, default=4.0, help="GiB read per measurement (>= 4 on a GPU)")
    ap.add_argument("--model", default="minigpt4-7b", help="the preset whose decode floor is computed")
    ap.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    bw = read_bandwidth(device, a.gib, dtype)
    weights = decoder_bytes(a.model, dtype)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "model": a.model, "dtype": a.dtype, **bw, "decoder_weight_bytes": weights,
              "floor_ms_per_token": weights / (bw["gbps"] * 1e9) * 1e3}
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"read bandwidth {bw['gbps']:.0f} GB/s (sum {bw['sum_gbps']:.0f}, gemv {bw['gemv_gbps']:.0f}) over "
          f"{bw['bytes'] / 1e9:.1f} GB; {a.model} {a.dtype} decoder weights {weights / 1e9:.2f} GB -> floor "
          f"{result['floor_ms_per_token']:.2f} ms/token at batch 1")


if __name__ == "__main__":
    main()
