"""Peak host memory of loading a release checkpoint, whole (tp=1) and as each rank's shard (tp=2).

The checkpoint is written here, never downloaded: a SliMM release folder in Hugging Face layout
(config.json, two safetensors shards + model.safetensors.index.json, a tokenizer) whose decoder has
SliMM-Qwen2-0.5B's shape (24 layers x 896, 14 heads, 2 KV heads, MLP 4864, vocabulary 151657, tied
embedding) and whose vision tower is slimm-tiny's, synthetic weights from a seed, stored in bf16.
Each load runs in a fresh process (`--measure`), which prints its peak resident set (VmHWM of
/proc/self/status) before and after `load_model`, and the bytes of the model it holds. Loading
needs no process group (a rank's shard plan is its own), so the ranks are measured one after the
other.

    PYTHONPATH=. python bench/tp_load_rss.py [--folder /tmp/vlmrt-slimm-05b-release] [--tp 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

VISION = {"depth": 3, "embed_dim": 32, "num_heads": 4, "mlp_ratio": 2.0, "patch_size": 14, "spatial_merge_size": 2,
          "temporal_patch_size": 2, "in_chans": 3}
DECODER = {"vocab_size": 151657, "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
           "num_key_value_heads": 2, "intermediate_size": 4864, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
           "max_position_embeddings": 32768, "tie_word_embeddings": True}


def config_json() -> dict:
    return {"architectures": ["SliMMForConditionalGeneration"], "model_type": "qwen2", **DECODER,
            "rope_scaling": {"type": "default", "rope_type": "default", "mrope_section": [8, 12, 12]},
            "vision_config": VISION, "use_deepstack": False}


def write_release(folder: Path) -> None:
    """The folder, tensor by tensor from a seeded generator (normal, std 0.02), two shards."""
    from safetensors.torch import save_file

    from vlmrt.models import load_model
    from vlmrt.models.slimm import SliMMForConditionalGeneration, config_from_release

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_json()))
    load_model("slimm-tiny").tokenizer.save_pretrained(str(folder))
    with torch.device("meta"):  # names and shapes only
        shapes = {k: v.shape for k, v in SliMMForConditionalGeneration(
            config_from_release(config_json(), {}, {})).state_dict().items() if k != "lm_head.weight"}
    names = sorted(shapes)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    g = torch.Generator().manual_seed(0)
    for shard, keys in shards.items():
        save_file({k: (torch.randn(shapes[k], generator=g) * 0.02).to(torch.bfloat16) for k in keys}, str(folder / shard))
    index = {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def vm_hwm_mib() -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def measure(folder: str, tp: int, rank: int) -> dict:
    """One load in this process: peak RSS before and after, seconds, and the model's bytes."""
    from vlmrt.models import load_model
    from vlmrt.tp.shard import Shard

    before = vm_hwm_mib()
    t0 = time.perf_counter()
    loaded = load_model(folder, dtype="bf16", shard=Shard(rank, tp) if tp > 1 else None)
    seconds = time.perf_counter() - t0
    model = loaded.model
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20
    lm = [p for n, p in model.named_parameters() if ".layers." in n]
    return {"tp": tp, "rank": rank, "hwm_before_mib": before, "hwm_after_mib": vm_hwm_mib(), "seconds": seconds,
            "model_mib": held, "decoder_layers_mib": sum(p.numel() * p.element_size() for p in lm) / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", default="/tmp/vlmrt-slimm-05b-release")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--measure", nargs=2, type=int, metavar=("TP", "RANK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.folder, *args.measure)))
        return
    folder = Path(args.folder)
    if not (folder / "model.safetensors.index.json").exists():
        t0 = time.perf_counter()
        write_release(folder)
        print(f"wrote {folder} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print("| tp | rank | load s | peak RSS MiB before load | peak RSS MiB after | peak - before | model MiB held | decoder layers MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for tp, rank in [(1, 0), *((args.tp, r) for r in range(args.tp))]:
        out = subprocess.run([sys.executable, __file__, "--folder", str(folder), "--measure", str(tp), str(rank)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {tp} | {rank} | {r['seconds']:.1f} | {r['hwm_before_mib']:.0f} | {r['hwm_after_mib']:.0f} | "
              f"{r['hwm_after_mib'] - r['hwm_before_mib']:.0f} | {r['model_mib']:.0f} | {r['decoder_layers_mib']:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
