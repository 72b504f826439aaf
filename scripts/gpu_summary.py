"""The GPU check's summary (scripts/gpu_check.sh): bench rows against the bandwidth floor and the
targets, as Markdown on stdout.

Usage: python scripts/gpu_summary.py OUT_DIR   (reads OUT_DIR/bench/results.json, bandwidth.json, *.log)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TARGETS = [  # (what, row filter, value, test)
    ("decode at batch 1 >= 85% of the bandwidth floor (compiled)", ("compiled", 1), "floor_fraction", lambda v: v >= 0.85),
    ("batch 10 >= 2500 tokens/s (compiled)", ("compiled", 10), "tokens_per_s", lambda v: v >= 2500),
    ("vision at batch 1 <= 2.0 ms (compiled)", ("compiled", 1), "vision_ms", lambda v: v <= 2.0),
    ("end to end at batch 1 >= 6x hf (compiled)", ("compiled", 1), "speedup_vs_hf", lambda v: v >= 6),
    ("warm-up/compile <= 60 s (compiled, batch 1)", ("compiled", 1), "warmup_s", lambda v: v <= 60),
    ("fp16 compiled vs fp32 eager agreement >= 95%", ("compiled", 1), "agreement", lambda v: v >= 0.95),
]


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))


def main(out: Path) -> None:
    bench, bw = _load(out / "bench" / "results.json"), _load(out / "bandwidth.json")
    print(f"# GPU check summary\n\n{(out / 'env.txt').read_text() if (out / 'env.txt').exists() else ''}")
    if bw:
        print(f"Read bandwidth {bw['gbps']:.0f} GB/s on {bw['device']}; {bw['model']} {bw['dtype']} decoder "
              f"{bw['decoder_weight_bytes'] / 1e9:.2f} GB -> floor {bw['floor_ms_per_token']:.2f} ms/token\n")
    rows = bench["rows"] if bench else []
    cols = ["runtime", "batch", "decode_ms_per_token", "floor_fraction", "tokens_per_s", "vision_ms", "ttft_ms",
            "e2e_ms", "speedup_vs_hf", "warmup_s", "agreement", "error"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    by = {}
    for r in rows:
        if bw and r.get("decode_ms_per_token"):
            r["floor_fraction"] = bw["floor_ms_per_token"] / r["decode_ms_per_token"]  # batch 1: a fraction of the floor
        by[(r["runtime"], r["batch"])] = r
        print("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    print("\n## Targets\n")
    for what, key, col, test in TARGETS:
        v = by.get(key, {}).get(col)
        verdict = "not measured" if v is None else ("met" if test(v) else "MISSED")
        print(f"- {what}: {_fmt(v)} ({verdict})")
    for log in ("pytest-gpu.log", "smoke.log"):
        text = (out / log).read_text().strip().splitlines() if (out / log).exists() else []
        last = text[-1] if text else "(no log)"
        if log == "smoke.log":
            last = f"{sum(line == 'exit 0' for line in text)} of 8 smoke runs exited 0"
        print(f"\n{log}: {last}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
