"""The preset catalog: what `vlmrt models` lists, readable without torch or building a model.

The presets themselves live with their family (models/<family>.py, registered in
vlmrt/models/__init__.py). Their listing (family, parameter count, LLM shape, context) is derived
from them once and kept in models/presets.json, so listing takes milliseconds instead of importing
torch and building every preset on the meta device. tests/test_registry.py fails when the file is
out of date; `python -m vlmrt.catalog` rewrites it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CATALOG = Path(__file__).resolve().parent / "models" / "presets.json"


def read_catalog() -> dict:
    """{"families": [...], "presets": [{"preset", "family", "params", "params_b", "llm", "context"}, ...]}."""
    return json.loads(CATALOG.read_text())


def build_catalog() -> dict:
    """The catalog as the registry has it now: every preset built on the meta device (imports torch)."""
    import torch

    from vlmrt.models import FAMILIES, all_presets, family_class

    rows = []
    for name, (family, cfg) in all_presets().items():
        with torch.device("meta"):
            n = sum(p.numel() for p in family_class(family)(cfg).parameters())
        d = cfg.decoder
        rows.append({"preset": name, "family": family, "params": n, "params_b": round(n / 1e9, 3),
                     "llm": f"{d.num_layers}x{d.hidden_size}", "context": d.max_position_embeddings})
    return {"families": list(FAMILIES), "presets": rows}


def write_catalog() -> None:
    """Rewrite models/presets.json, one preset a line (a new preset is a one-line diff)."""
    cat = build_catalog()
    rows = ",\n".join("  " + json.dumps(r) for r in cat["presets"])
    CATALOG.write_text(f'{{"families": {json.dumps(cat["families"])},\n "presets": [\n{rows}\n]}}\n')


if __name__ == "__main__":
    write_catalog()
    print(f"wrote {CATALOG}", file=sys.stderr)
