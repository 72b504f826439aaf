"""Quantized ONNX exports: the fp graphs of vlmrt/export/onnx.py rewritten by ONNX Runtime's own
quantization tools, so ONNX Runtime's CPU kernels (MLAS) run them.

```
 <out>/decoder.onnx (+ .data), fp32
   int8 ─► MatMulNBitsQuantizer(bits 8, block INT8_BLOCK or int8-gN's N, symmetric)      (INT8_TOOL "nbits")
           or quantize_dynamic(weight QInt8, per channel, MatMul with constant weights)   (INT8_TOOL "dynamic")
           MatMul ─► DynamicQuantizeLinear (activations, per call) + MatMulInteger: W8A8
   int4 ─► MatMulNBitsQuantizer(bits 4, block_size, is_symmetric, accuracy_level)
           MatMul ─► MatMulNBits (weight-only storage; accuracy_level 4 quantizes activations to int8
           per block inside the kernel)
 ─► <out>/decoder.onnx (+ .data), written in place; the manifest records the format
```

lm_head's MatMul is left fp when the config says so (`-nohead`); with int4 it gets a second pass
at 8 bits (MatMulNBits, block INT8_BLOCK, symmetric) unless the config says int4 (`-head4`). The
vision graph is quantized only with `vision`. The embedding graph (a table lookup) is never touched.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from vlmrt.errors import VlmrtError

ONNX_FORMATS = ("int8", "int4")
# MatMulNBits' accuracy_level (the minimum precision of its inner products): 4 = int8 activations.
# Chosen by measurement on a 2-core AVX2 CPU (bench/RESULTS.md).
ACCURACY_LEVEL = 4
INT8_TOOL = "nbits"  # int8: MatMulNBits with 8 bits (weight-only), or "dynamic": quantize_dynamic (W8A8)
INT8_BLOCK = 128  # int8 MatMulNBits block size (one scale per 128 input columns: about per channel)


def check_onnx_format(cfg) -> None:
    """A clear error for a format the onnx runtime has no tool for."""
    if not cfg.is_fp and cfg.format not in ONNX_FORMATS:
        raise VlmrtError(f"the onnx runtime quantizes to {', '.join(ONNX_FORMATS)} (ONNX Runtime's tools), not "
                         f"{cfg.format}; use --runtime eager for {cfg.format} weights")


def _lm_head_nodes(proto) -> list[str]:
    return [n.name for n in proto.graph.node if n.op_type in ("MatMul", "Gemm") and "lm_head" in n.name]


def quantize_graph(path: Path, cfg, accuracy_level: int | None = None, int8_tool: str = INT8_TOOL) -> None:
    """Rewrite one graph file (and its external data) in place with cfg's format.

    Args:
        path: the graph (its external data beside it).
        cfg: a vlmrt.quantize.WeightConfig, int8 or int4.
        accuracy_level: MatMulNBits' accuracy_level (None: ACCURACY_LEVEL).
        int8_tool: "nbits" (MatMulNBits, 8 bits, weight-only) or "dynamic" (quantize_dynamic, W8A8).
    """
    import logging

    import onnx

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # one INFO line per MatMul otherwise
    proto = onnx.load(str(path), load_external_data=False)
    heads = _lm_head_nodes(proto)
    own_head = cfg.lm_head and cfg.head != cfg.format  # int4 with an int8 head: a second pass for it
    exclude = [] if cfg.lm_head and not own_head else heads
    del proto
    tmp = path.parent / f".tmp-quant-{path.stem}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    out = tmp / path.name
    if cfg.format == "int8" and int8_tool == "dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(path), str(out), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                         per_channel=True, nodes_to_exclude=exclude, use_external_data_format=True,
                         extra_options={"MatMulConstBOnly": True})
    else:
        level = ACCURACY_LEVEL if accuracy_level is None else accuracy_level
        bits, block, sym = ((8, cfg.group_size or INT8_BLOCK, True) if cfg.format == "int8"
                            else (4, cfg.group_size, cfg.symmetric))
        proto = _nbits(onnx.load(str(path)), bits, block, sym, level, exclude=exclude)
        if own_head and heads:
            proto = _nbits(proto, 8, INT8_BLOCK, True, level, include=heads)
        onnx.save_model(proto, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=out.name + ".data", size_threshold=1024)
    _replace_graph(path, out)
    shutil.rmtree(tmp, ignore_errors=True)


def _nbits(proto, bits: int, block: int, symmetric: bool, level: int, exclude=None, include=None):
    """One MatMulNBitsQuantizer pass over `proto` (the MatMuls in `include`, or all but `exclude`)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(proto, bits=bits, block_size=block, is_symmetric=symmetric, accuracy_level=level,
                             nodes_to_exclude=exclude or [], nodes_to_include=include)
    q.process()
    return q.model.model


def _replace_graph(path: Path, new: Path) -> None:
    """Move `new` (and the external data file it names) over `path` and `path`.data."""
    import onnx

    proto = onnx.load(str(new), load_external_data=True)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
                    size_threshold=1024)


def quantize_export(folder: Path, cfg, progress=None, accuracy_level: int | None = None,
                    int8_tool: str = INT8_TOOL) -> None:
    """Quantize an fp export's decoder (and vision graph with `cfg.vision`) in place.

    Args:
        folder: an export folder (vlmrt/export/onnx.py) with fp32 weights.
        cfg: a vlmrt.quantize.WeightConfig, int8 or int4.
        progress: called with one line per graph.
        accuracy_level: MatMulNBits' accuracy_level (None: ACCURACY_LEVEL).
        int8_tool: see quantize_graph.
    """
    check_onnx_format(cfg)
    for stage in ("decoder",) + (("vision",) if cfg.vision else ()):
        t0 = time.perf_counter()
        path = Path(folder) / f"{stage}.onnx"
        try:
            quantize_graph(path, cfg, accuracy_level, int8_tool)
        except VlmrtError:
            raise
        except Exception as e:  # ONNX Runtime's tools raise assorted types
            raise VlmrtError(f"ONNX Runtime could not quantize {path} to {cfg.tag} ({e.__class__.__name__}: {e})") from None
        if progress:
            size = sum(f.stat().st_size for f in path.parent.glob(f"{stage}.onnx*")) / 2**20
            progress(f"{stage}: quantized to {cfg.tag} with ONNX Runtime's tools, {size:.1f} MiB, "
                     f"{time.perf_counter() - t0:.1f} s")
