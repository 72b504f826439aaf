"""vlmrt's decode against llama.cpp on the same CPU, the same decoder shape and the same weights.

```
 slimm-qwen2-0.5b's decoder (Qwen2-0.5B shape, synthetic weights from a seed; a tiny vision tower,
 which decode never runs)
   ├─► vlmrt: eager / compiled / onnx, each at fp32 and the asked weight formats (--formats)
   └─► GGUF files (the `gguf` package: qwen2 arch, f32, f16, q8_0, q4_0), same tensors
         └─► llama.cpp: llama-cpp-python (`import llama_cpp`) or the llama-bench binary (--llama-bench)
 rounds x (every system, every format), interleaved: prompt of P tokens, then N decode steps timed
 ─► median ms/token per row, ratio to llama.cpp at the same precision, load average beside each figure
```

Usage (a minute or two on an idle 2-core machine; see bench/RESULTS.md):

    python bench/llama_cpp_peer.py --threads 2 --rounds 3 --tokens 16 \\
        --formats fp32,bf16,int8,int4 --runtimes eager,onnx --out /tmp/peer

Where no llama-cpp-python wheel exists: build only llama.cpp's `llama` shared library from the
llama-cpp-python source archive (`pip download llama-cpp-python --no-deps --no-binary :all:`, its
vendor/llama.cpp; cmake with -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_COMMON=OFF,
target `llama`), put the archive's `llama_cpp` folder on PYTHONPATH and point LLAMA_CPP_LIB_PATH at
the built libllama.so (bench/RESULTS.md has the exact commands).

Without llama-cpp-python or llama-bench the llama.cpp rows say so, the GGUF files are still
written (run llama-bench on them by hand), and vlmrt's rows are measured. On VMs that advertise AMX
but do not allow it, build llama.cpp with `-DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

GGUF_TYPES = {"fp32": "F32", "fp16": "F16", "bf16": "F16", "int8": "Q8_0", "int4": "Q4_0"}  # vlmrt format -> GGUF
PROMPT = 16


def gguf_type(fmt: str) -> str:
    """The GGUF type llama.cpp runs beside vlmrt's format ("int8-g32" -> "Q8_0")."""
    return GGUF_TYPES[fmt.partition("-")[0]]


def output_type(qtype: str, width: int) -> str:
    """The type llama.cpp's own quantizer (llama-quantize) gives a tied token_embd/output table:
    q6_K for quantized files, q8_0 where the width is not a multiple of q6_K's 256 (Qwen2-0.5B: 896)."""
    if qtype in ("F32", "F16", "Q8_0"):
        return qtype
    return "Q6_K" if width % 256 == 0 else "Q8_0"


# ----------------------------------------------------------------------------- the model
def build_decoder_model(seed: int):
    """slimm-qwen2-0.5b's decoder with a tiny vision tower, as a LoadedModel of the registry's kind."""
    from vlmrt.models import LoadedModel, family_class
    from vlmrt.models.slimm import PRESETS
    from vlmrt.weights import build_on, init_synthetic

    tiny = PRESETS["slimm-tiny"]
    cfg = replace(PRESETS["slimm-qwen2-0.5b"], vision=tiny.vision, image_size=tiny.image_size, dynamic=False,
                  pre_resize=False, deepstack="none")
    cls = family_class("slimm")
    model = build_on(torch.device("cpu"), torch.float32, lambda: cls(cfg))
    init_synthetic(model, seed)
    return LoadedModel(model.eval(), cls.synthetic_tokenizer(cfg), model.processor_spec, "slimm-qwen2-0.5b-llm-peer",
                       "slimm", True, cfg, torch.device("cpu"), torch.float32, seed=seed)


def write_gguf(model, cfg, path: Path, fmt: str) -> Path:
    """The decoder's tensors as a llama.cpp `qwen2` GGUF file; matrices in `fmt`, the tied embedding /
    output table as llama-quantize types it (`output_type`), norms and biases f32."""
    import gguf

    d, qtype = cfg.decoder, gguf.GGMLQuantizationType[gguf_type(fmt)]
    head = gguf.GGMLQuantizationType[output_type(gguf_type(fmt), d.hidden_size)]
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_context_length(d.max_position_embeddings)
    w.add_embedding_length(d.hidden_size)
    w.add_block_count(d.num_layers)
    w.add_feed_forward_length(d.intermediate_size)
    w.add_head_count(d.num_heads)
    w.add_head_count_kv(d.num_kv_heads)
    w.add_rope_freq_base(d.rope_theta)
    w.add_layer_norm_rms_eps(d.rms_norm_eps)
    w.add_file_type({"F32": 0, "F16": 1, "Q8_0": 7, "Q4_0": 2}[gguf_type(fmt)])
    w.add_tokenizer_model("gpt2")  # a placeholder vocabulary: decode is fed token ids, never text
    w.add_token_list([f"<t{i}>" for i in range(d.vocab_size)])
    w.add_token_types([1] * d.vocab_size)
    w.add_token_merges(["<t1> <t2>"])  # llama.cpp refuses a BPE vocabulary without merges; one placeholder
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}

    def add(name: str, arr: np.ndarray, kind=qtype):
        if arr.ndim == 2 and arr.shape[1] % 32 == 0:
            w.add_tensor(name, gguf.quants.quantize(arr, kind), raw_dtype=kind)
        else:
            w.add_tensor(name, arr.astype(np.float32))

    add("token_embd.weight", sd["model.embed_tokens.weight"], head)  # tied: llama.cpp reuses it as the output
    add("output_norm.weight", sd["model.norm.weight"])
    for i in range(d.num_layers):
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                key = f"model.layers.{i}.{ours}.{kind}"
                if key in sd:
                    add(f"blk.{i}.{theirs}.{kind}", sd[key])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ----------------------------------------------------------------------------- timing
def load_avg() -> float:
    return os.getloadavg()[0]


def time_vlmrt(runtime, hidden: int, tokens: int, mrope: bool) -> float:
    """Median ms per decode step at batch 1 after a PROMPT-token prefill."""
    total = PROMPT + tokens
    runtime.start(1, total)
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(1, total, dtype=torch.long)

    def pos(a, b):
        p = torch.arange(a, b)[None]  # [1,T]
        return p[None].expand(3, 1, -1) if mrope else p

    runtime.decode(torch.randn(1, PROMPT, hidden, generator=g), pos(0, PROMPT), mask, torch.arange(PROMPT))
    times = []
    for i in range(PROMPT, total):
        x = torch.randn(1, 1, hidden, generator=g)
        t0 = time.perf_counter()
        runtime.decode(x, pos(i, i + 1), mask, torch.tensor([i]))
        runtime.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


class LlamaCpp:
    """llama.cpp on one GGUF file: llama-cpp-python when importable, else the llama-bench binary."""

    def __init__(self, path: Path, threads: int, bench_bin: str | None):
        self.path, self.threads, self.bin, self.llm = path, threads, bench_bin, None
        try:
            import llama_cpp

            self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=threads, n_threads_batch=threads,
                                       n_batch=PROMPT, verbose=False)
        except ImportError:
            if not bench_bin:
                raise RuntimeError("llama.cpp is not installed: neither llama-cpp-python nor a llama-bench binary")

    def time(self, tokens: int) -> float:
        if self.llm is not None:
            self.llm.reset()
            self.llm.eval(list(range(1, PROMPT + 1)))
            times = []
            for i in range(tokens):
                t0 = time.perf_counter()
                self.llm.eval([100 + i])
                times.append(time.perf_counter() - t0)
            return statistics.median(times) * 1e3
        out = subprocess.run([self.bin, "-m", str(self.path), "-p", "0", "-n", str(tokens), "-t", str(self.threads),
                              "-r", "1", "-o", "json"], capture_output=True, text=True, check=True).stdout
        return 1e3 / json.loads(out)[0]["avg_ts"]


# ----------------------------------------------------------------------------- the run
def make_systems(args, loaded, out: Path) -> dict:
    """label -> (callable returning ms/token, precision); a system that cannot start maps to its error."""
    from vlmrt.quantize import loaded_for, parse_weights
    from vlmrt.runtimes import runtime_class

    hidden, systems, pool = loaded.config.decoder.hidden_size, {}, {}
    for fmt in args.formats:
        weights = parse_weights(None if fmt == "fp32" else fmt)
        for name in args.runtimes:
            variants = [("", {})]
            if name == "onnx" and args.prepacking_both and fmt == "fp32":  # the session option, both ways
                variants = [(" prepack", {"prepacking": True}), (" no-prepack", {"prepacking": False})]
            for suffix, options in variants:
                label = f"vlmrt {name}{suffix} {fmt}"
                try:
                    mine = loaded_for(loaded, name, weights, pool, lambda: build_decoder_model(args.seed))
                    rt = runtime_class(name)(mine, **options)
                    systems[label] = (lambda rt=rt: time_vlmrt(rt, hidden, args.tokens, True), fmt)
                except Exception as e:  # a runtime without this format says why; the run goes on
                    systems[label] = (str(e).splitlines()[0], fmt)
        label = f"llama.cpp {gguf_type(fmt).lower()}"
        if label in systems or args.no_llama_cpp:
            continue
        path = out / f"decoder-{gguf_type(fmt).lower()}.gguf"
        try:
            if not path.exists():
                write_gguf(loaded.model, loaded.config, path, fmt)
            cpp = LlamaCpp(path, args.threads, args.llama_bench)
            systems[label] = (lambda cpp=cpp: cpp.time(args.tokens), fmt)
        except Exception as e:
            systems[label] = (f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}", fmt)
    return systems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--formats", default="fp32,bf16,int8,int4", help="vlmrt formats (GGUF: f32, f16, q8_0, q4_0)")
    p.add_argument("--runtimes", default="eager,onnx", help="vlmrt runtimes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians over rounds reported")
    p.add_argument("--tokens", type=int, default=16, help="decode steps timed per round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prepacking-both", action="store_true", help="onnx fp32 rows with weight prepacking on and off")
    p.add_argument("--no-llama-cpp", action="store_true", help="vlmrt rows only (no GGUF files)")
    p.add_argument("--llama-bench", default=shutil.which("llama-bench"), help="llama-bench binary (if no llama-cpp-python)")
    p.add_argument("--out", default="/tmp/vlmrt-peer", help="GGUF files and results.json")
    args = p.parse_args(argv)
    args.formats, args.runtimes = args.formats.split(","), args.runtimes.split(",")
    from vlmrt.config import set_threads

    set_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = build_decoder_model(args.seed)
    systems = make_systems(args, loaded, out)
    runs: dict[str, list] = {k: [] for k, (f, _) in systems.items() if callable(f)}
    for r in range(args.rounds):
        for label in runs:
            runs[label].append((systems[label][0](), load_avg()))
            print(f"round {r + 1}: {label}: {runs[label][-1][0]:.1f} ms/token (load {runs[label][-1][1]:.2f})",
                  file=sys.stderr, flush=True)
    rows = report(systems, runs)
    (out / "results.json").write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=2) + "\n")
    return 0


def report(systems: dict, runs: dict) -> list[dict]:
    rows = []
    for label, (f, fmt) in systems.items():
        if not callable(f):
            rows.append({"system": label, "format": fmt, "error": f})
            continue
        ms = statistics.median(m for m, _ in runs[label])
        rows.append({"system": label, "format": fmt, "ms_per_token": ms,
                     "load": [round(x, 2) for _, x in runs[label]]})
    peers = {gguf_type(r["format"]): r["ms_per_token"] for r in rows
             if r["system"].startswith("llama.cpp") and "ms_per_token" in r}
    print("| system | format | ms/token | x llama.cpp same precision | load averages |\n|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['system']} | {r['format']} | - | - | not run: {r['error']} |")
            continue
        peer = peers.get(gguf_type(r["format"]))
        ratio = f"{r['ms_per_token'] / peer:.2f}x" if peer else "-"
        print(f"| {r['system']} | {r['format']} | {r['ms_per_token']:.1f} | {ratio} | {', '.join(map(str, r['load']))} |")
    return rows


if __name__ == "__main__":
    sys.exit(main())
