"""Weight formats in `vlmrt bench`: runtime labels with a format (`eager:int8`, `onnx:int4-g64`),
the bytes one decode step reads, a memory-bandwidth probe, and the fidelity columns.

Decode at batch 1 is memory-bound: each token reads every decoder weight once. So the floor of
decode ms/token is (bytes read per token) / (the bandwidth this process gets), measured in the same
process right before the report (on a shared machine the bandwidth moves with the load):

```
 probe: sum() over a 256 MiB fp32 tensor, median of 5 ─► GB/s, with the threads the runtimes use
 bytes/token: torch runtimes ─► decoder linears (packed buffers) + norms + lm_head
              onnx           ─► decoder.onnx + decoder.onnx.data on disk
 row: effective GB/s = bytes/token / decode s/token; floor fraction = floor ms / decode ms
      max logit error = max |logits - eager fp32 logits| over teacher-forced steps
```
"""

from __future__ import annotations

import statistics
import time

import torch

from vlmrt.errors import VlmrtError
from vlmrt.quantize import WeightConfig, decoder_weight_bytes, parse_runtime_spec

PROBE_MIB = 256


def split_label(label: str, default: WeightConfig) -> tuple[str, WeightConfig]:
    """A bench runtime label -> (runtime name, weight format); see parse_runtime_spec."""
    return parse_runtime_spec(label, default)


def bandwidth_probe(mib: int = PROBE_MIB, repeats: int = 5) -> float:
    """Read bandwidth in GB/s this process gets now: the median time of sum() over `mib` MiB."""
    x = torch.ones(mib * 2**20 // 4)  # fp32
    x.sum()  # fault the pages in
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(times) / 1e9


def bytes_per_token(runner) -> int | None:
    """Weight bytes one decode step reads, for a vlmrt runtime (None when unknown)."""
    rt = getattr(runner, "runtime", None)
    if rt is None:
        return None
    folder = getattr(rt, "folder", None)
    if folder is not None:  # onnx: the decoder graph and its weights file
        return sum(f.stat().st_size for f in folder.glob("decoder.onnx*"))
    model = getattr(rt, "model", None)
    if not isinstance(model, torch.nn.Module):  # paddle: `model` is the cache's geometry; its own weights
        model = getattr(getattr(rt, "loaded", None), "model", None)  # are the loaded model's, lowered
    return decoder_weight_bytes(model) if isinstance(model, torch.nn.Module) else None


def add_bandwidth_columns(rows: list[dict], gb_s: float | None) -> None:
    """effective_gb_s and floor_fraction per row (batch 1 rows: one weight read per token)."""
    for r in rows:
        b, ms = r.get("bytes_per_token"), r.get("decode_ms_per_token")
        r["effective_gb_s"] = b / ms / 1e6 if b and ms else None
        floor = b / gb_s / 1e6 if b and gb_s else None  # ms
        r["floor_fraction"] = floor / ms if floor and ms else None


def max_logit_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """max |logits - reference| over [B,N,V] teacher-forced logits."""
    if logits.shape != reference.shape:
        raise VlmrtError(f"logits of shape {list(logits.shape)} cannot be compared with {list(reference.shape)}")
    return float((logits.float() - reference.float()).abs().max())
