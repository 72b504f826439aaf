"""Why a weight format loses agreement with fp32 on a model: per-layer weight and output errors, the
top-1/top-2 logit gaps of the fp32 model, and teacher-forced agreement for formats and controls.

```
 model (a preset, or "qwen2-0.5b-llm": slimm-qwen2-0.5b's decoder with a tiny vision tower)
   └► eager fp32: greedy tokens (N steps) ─► teacher-forced logits [1,N,V] ─► gap = top1 - top2
        each decoder linear's inputs are recorded on the way
   per format: ||W_q - W|| / ||W||  and  ||x W_q^T - x W^T|| / ||x W^T||   (x: the recorded inputs)
   per variant: agreement (argmax == fp32 token), max |logit error| / max |fp32 logit|, and the
   steps an error of that variant's size could flip: gap_t <= 2 max_v |logit error_t,v| (a step
   whose gap is larger keeps its argmax whatever the error's direction; every disagreement is one)
      FORMAT         vlmrt.quantize (the packed kernels, bf16 activations)
      onnx:FORMAT    the onnx runtime's export quantized with ONNX Runtime's tools
      noise-R        every quantized linear + Gaussian noise of R x its RMS (no format: a control)
      int4-fp32-gN   int4 asymmetric at block N dequantized to fp32 (blocks the kernels do not take)
```

Usage: python bench/format_fidelity.py qwen-vl-tiny --formats int8,int4 --variants int8,int4,noise-0.0625
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from torch import nn

from vlmrt.bench import VlmrtRunner, make_workload, preprocess
from vlmrt.processor import Processor
from vlmrt.quantize import (WeightConfig, head_config, linear_method, loaded_for, parse_weights, quantize_model,
                            select_linears)


def load(name: str):
    if name == "qwen2-0.5b-llm":
        sys.path.insert(0, "bench")
        from llama_cpp_peer import build_decoder_model

        return build_decoder_model(0)
    from vlmrt.models import load_model

    return load_model(name)


def reference(base, n: int):
    """(batch, fp32 tokens [1,n], fp32 logits [1,n,V], {linear name: [(x [M,K], ...)]})."""
    proc = Processor(base.spec, base.tokenizer)
    batch, _ = preprocess(proc, make_workload(proc, 1, "Describe this image in detail."), torch.device("cpu"))
    runner = VlmrtRunner("eager", base, {})
    tokens = runner.generate(batch, n)[1]
    inputs: dict[str, list] = {}
    hooks = [base.model.get_submodule(name).register_forward_hook(
        lambda mod, i, o, name=name: inputs.setdefault(name, []).append(i[0].detach().reshape(-1, i[0].shape[-1])))
        for name in select_linears(base.model, WeightConfig("int8"))]
    logits = runner.forced_logits(batch, tokens)
    for h in hooks:
        h.remove()
    return batch, tokens, logits, {k: torch.cat(v) for k, v in inputs.items()}


def layer_errors(base, inputs: dict, spec: str) -> list[tuple[str, int, float, float]]:
    """(name, K, relative weight error, relative output error) per quantized linear of `spec`."""
    cfg = parse_weights(spec)
    rows = []
    for name in select_linears(base.model, cfg):
        w = base.model.get_submodule(name).weight.detach()
        method = linear_method(head_config(cfg) if name.endswith("lm_head") else cfg)
        packed = method.quantize(w)
        deq = method.dequantize(packed, tuple(w.shape))
        x = inputs[name]
        y = x @ w.T
        yq = method.apply({k: v for k, v in packed.items() if k != "levels"}, x)[:, :w.shape[0]].float()
        rows.append((name, w.shape[1], float((deq - w).norm() / w.norm()), float((yq - y).norm() / y.norm())))
    return rows


@torch.no_grad()
def variant(base, spec: str):
    """A copy of `base` with `spec`'s weights (see the module docstring)."""
    m = copy.deepcopy(base)
    if spec.startswith("noise-") or spec.startswith("int4-fp32-g"):
        g = torch.Generator().manual_seed(0)
        for name in select_linears(m.model, WeightConfig("int8")):
            lin = m.model.get_submodule(name)
            w = lin.weight.detach()
            if spec.startswith("noise-"):
                new = w + torch.randn(w.shape, generator=g) * w.pow(2).mean().sqrt() * float(spec[6:])
            else:
                gs = int(spec.rpartition("g")[2])
                grp = w.reshape(w.shape[0], -1, gs)  # [N,G,gs]
                lo, hi = grp.amin(-1, keepdim=True), grp.amax(-1, keepdim=True)
                step = ((hi - lo) / 15).clamp(min=1e-12)
                new = (torch.round((grp - lo) / step).clamp(0, 15) * step + lo).reshape(w.shape)
            lin.weight = nn.Parameter(new, requires_grad=False)  # a tied head gets its own copy
        return m
    quantize_model(m.model, parse_weights(spec))
    return m


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--formats", default="", help="formats whose per-layer errors to print")
    p.add_argument("--variants", default="int8,int4", help="formats and controls whose agreement to print")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = load(args.model)
    batch, tokens, ref, inputs = reference(base, args.steps)
    top2 = ref.topk(2, -1).values
    gap = (top2[..., 0] - top2[..., 1]).flatten()
    print(f"{args.model}: vocabulary {ref.shape[-1]}, fp32 logit std {float(ref.std()):.3f}, top1-top2 gap "
          f"median {float(gap.median()):.3f}, min {float(gap.min()):.4f}")
    for spec in filter(None, args.formats.split(",")):
        print(f"{spec}: layer, K, relative weight error, relative output error")
        for name, k, we, oe in layer_errors(base, inputs, spec):
            print(f"  {name:50s} {k:6d} {we:.4f} {oe:.4f}")
    for spec in filter(None, args.variants.split(",")):
        if spec.startswith("onnx:"):
            runner = VlmrtRunner("onnx", loaded_for(base, "onnx", parse_weights(spec[5:]), {}), {})
        else:
            runner = VlmrtRunner("eager", variant(base, spec), {})
        logits = runner.forced_logits(batch, tokens)
        agree = float((logits.argmax(-1) == tokens).float().mean())
        err = (logits - ref).abs()  # [1,N,V]
        rel = float(err.max() / ref.abs().max())
        flippable = float((gap <= 2 * err.amax(-1).flatten()).float().mean())
        print(f"{args.model} {spec:16s} agreement {agree * 100:5.1f}%  max logit error {rel:.3f}  "
              f"steps it could flip {flippable * 100:5.1f}%", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
