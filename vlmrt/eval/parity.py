"""Runtime parity report: run several runtimes on the same weights and inputs, compare with the first.

```
 one LoadedModel ─► runtime 0 (reference) ─► vision ─► embedding ─► prefill ─► greedy tokens, logits
                 ├► runtime 1 ──────────────► same, compared with the reference
                 └► runtime 2 ...
```

Per image and runtime (N = new tokens, decoding greedy with stop tokens off, so every run is N long):

- `agreement`: fraction of the N greedy tokens equal to the reference's, position by position;
  `first_divergence`: index of the first differing token (None when all agree). Each runtime
  runs the request on its own engine (`EngineTokens`: `vlmrt.pipeline.run_on_engine`, the path of
  Pipeline and `vlmrt run`); a runtime without engine steps, the lock-step loop (`generate()`).
- `logits`: max / mean absolute logit error over the N steps, teacher-forced: both runtimes are fed
  the reference's tokens, so step i's logits answer the same question in both (a free-running
  runtime that diverged would be compared on different histories).
- `stages`: each stage's own output error, the stage fed the reference's inputs: `vision`
  (image_features from the same pixel_values), `embedding` (inputs_embeds from the same ids and
  the reference's image features), `prefill_logits` (the last position's logits [1,V] from the
  reference's embeddings), `kv_prefill` (the cache after that prefill, valid slots) and
  `decode_logits` (the worst decode step).

All of these come from one helper, `vlmrt.eval.tensor_parity` (the runtime tests use it too).
Errors are reported as max_abs, mean_abs and rel (max_abs / max |reference|), in fp32.
"""

from __future__ import annotations

import os
import sys

from vlmrt.errors import VlmrtError
from vlmrt.eval.images import list_images
from vlmrt.eval.tensor_parity import Reference

DEFAULT_PROMPT = "Describe this image."


def build_runtimes(loaded, names: list[str], weights=None) -> dict[str, object]:
    """One runtime per name, all on the same loaded weights; repeated names get `#2`, `#3` labels.

    Args:
        loaded: the model (its own weights).
        names: runtime names, each optionally with a weight format (`eager:int8`, `onnx:int4`).
        weights: the vlmrt.quantize.WeightConfig of names without a format (None: the model's own).
    """
    from vlmrt.quantize import WeightConfig, loaded_for, parse_runtime_spec
    from vlmrt.runtimes import load_frameworks, runtime_class

    if len(names) < 2:
        raise VlmrtError(f"parity needs at least two runtimes, e.g. --runtime eager,onnx; got {','.join(names) or 'none'}")
    load_frameworks([spec.partition(":")[0] for spec in names])
    runtimes: dict[str, object] = {}
    pool: dict = {}  # one quantized copy of the model per format
    for spec in names:
        label, k = spec, 1
        while label in runtimes:
            k += 1
            label = f"{spec}#{k}"
        name, cfg = parse_runtime_spec(spec, weights or WeightConfig())
        runtimes[label] = runtime_class(name)(loaded_for(loaded, name, cfg, pool))
    return runtimes


def token_agreement(ref: list[int], other: list[int]) -> tuple[float, int | None]:
    """(fraction of positions with equal tokens over the longer length, first differing index or None)."""
    n = max(len(ref), len(other))
    if n == 0:
        return 1.0, None
    same = [i < len(ref) and i < len(other) and ref[i] == other[i] for i in range(n)]
    first = next((i for i, s in enumerate(same) if not s), None)
    return sum(same) / n, first


class EngineTokens:
    """Free-running greedy tokens on each runtime's engine (one engine per runtime, made on first use
    and kept for every image), as Pipeline and `vlmrt run` produce them; a runtime without engine
    steps runs the lock-step loop (`vlmrt.generate.generate`).

    Args:
        processor: the model's Processor.
        tokenizer: for the lock-step loop.
    """

    def __init__(self, processor, tokenizer):
        self.processor, self.tokenizer, self.engines = processor, tokenizer, {}

    def __call__(self, runtime, batch: dict, config) -> list[list[int]]:
        """Tokens per row of `batch` (one engine request per row) under `config` (greedy, no stops)."""
        from vlmrt.generate import generate

        if not hasattr(runtime, "run_step"):
            return generate(runtime, batch, config, self.tokenizer).token_ids
        from vlmrt.bench_batch import engine_options, first_row
        from vlmrt.engine import Engine, Request
        from vlmrt.pipeline import run_on_engine

        if id(runtime) not in self.engines:
            self.engines[id(runtime)] = Engine(runtime, self.processor, config, engine_options(1))
        if batch["input_ids"].shape[0] != 1:
            raise VlmrtError("parity runs one image per batch")
        return run_on_engine(self.engines[id(runtime)], [Request("", None, config, inputs=first_row(batch))]).token_ids


def compare_image(loaded, processor, runtimes: dict, image, prompt: str, new_tokens: int,
                  run_tokens: EngineTokens | None = None) -> dict:
    """The per-image report: reference tokens, then agreement, logit and stage errors per runtime,
    all from one `vlmrt.eval.tensor_parity.Reference` (stages fed the reference's inputs, N steps
    teacher-forced on its tokens, free-running greedy tokens on the engine: `run_tokens`, default a
    new `EngineTokens`)."""
    batch = processor([image], [prompt])
    names = list(runtimes)
    run_tokens = run_tokens or EngineTokens(processor, loaded.tokenizer)
    ref = Reference(runtimes[names[0]], batch, loaded.tokenizer, steps=new_tokens, token_steps=new_tokens,
                    run_tokens=run_tokens)
    report = {"reference_tokens": ref.token_ids[0], "runtimes": {}}
    for name in names[1:]:
        result = ref.compare(runtimes[name])
        tokens = result.tokens[0]
        agreement, first = token_agreement(ref.token_ids[0], tokens)
        steps = [result.by_name["prefill_logits"]] + [result.by_name[f"decode_step_{i}"] for i in range(1, new_tokens)]
        report["runtimes"][name] = {
            "tokens": tokens,
            "agreement": agreement,
            "first_divergence": first,
            "logits": {"max_abs": max(c.max_abs for c in steps), "mean_abs": sum(c.mean_abs for c in steps) / len(steps),
                       "per_step_max_abs": [c.max_abs for c in steps]},
            "stages": result.stage_errors(),
            "tensor_parity_ok": result.ok,
        }
    return report


def overall(images: list[dict], names: list[str]) -> dict:
    """Per runtime, over all images: pooled agreement, images identical, worst errors."""
    out = {}
    for name in names:
        rows = [im["runtimes"][name] for im in images if "runtimes" in im]
        if not rows:
            continue
        total = sum(len(r["tokens"]) or 1 for r in rows)
        divs = [r["first_divergence"] for r in rows if r["first_divergence"] is not None]
        out[name] = {
            "agreement": sum(r["agreement"] * (len(r["tokens"]) or 1) for r in rows) / total,
            "images_identical": sum(r["first_divergence"] is None for r in rows),
            "images": len(rows),
            "earliest_divergence": min(divs) if divs else None,
            "logits_max_abs": max(r["logits"]["max_abs"] for r in rows),
            "logits_mean_abs": sum(r["logits"]["mean_abs"] for r in rows) / len(rows),
            "stages_max_abs": {s: max(r["stages"][s]["max_abs"] for r in rows) for s in rows[0]["stages"]},
        }
    return out


def _compare_folder(loaded, runtimes, names, root, prompt, new_tokens, progress) -> list[dict]:
    """One report row per image; an unreadable image gets a row with its error."""
    from tqdm.auto import tqdm

    from vlmrt.processor import Processor, load_image

    processor = Processor(loaded.spec, loaded.tokenizer)
    run_tokens, rows = EngineTokens(processor, loaded.tokenizer), []
    for name in tqdm(names, unit="img", desc="parity", disable=not progress, file=sys.stderr):
        try:
            image = load_image(os.path.join(root, name))
        except VlmrtError as e:
            rows.append({"image": name, "error": str(e)})
            continue
        rows.append({"image": name, **compare_image(loaded, processor, runtimes, image, prompt, new_tokens, run_tokens)})
    return rows


def parity_report(
    loaded,
    runtimes: dict[str, object],
    images_dir: str | os.PathLike,
    prompt: str = DEFAULT_PROMPT,
    new_tokens: int = 16,
    recursive: bool = False,
    min_agreement: float | None = None,
    progress: bool = False,
) -> dict:
    """Compare `runtimes` (label -> runtime; the first is the reference) image by image.

    Args:
        loaded: the `LoadedModel` every runtime was built from (tokenizer and processor spec).
        runtimes: at least two runtimes, e.g. from `build_runtimes(loaded, ["eager", "onnx"])`.
        images_dir: the image folder; unreadable images are recorded and skipped.
        prompt: the question asked of every image.
        new_tokens: greedy tokens per image (stop tokens off, so every run has exactly this many).
        recursive: also use images in subfolders.
        min_agreement: when given, `passed` is False if any runtime's overall agreement is below it.
        progress: show a progress bar on stderr.

    Returns:
        {"model", "reference", "runtimes", "prompt", "new_tokens", "images": [...], "overall": {...},
         "min_agreement", "passed"}; see the module docstring for the measures.
    """
    if len(runtimes) < 2:
        raise VlmrtError("parity needs at least two runtimes to compare")
    if new_tokens < 1:
        raise VlmrtError(f"--max-new-tokens must be at least 1, got {new_tokens}")
    root = images_dir
    rows = _compare_folder(loaded, runtimes, list_images(root, recursive), root, prompt, new_tokens, progress)
    labels = list(runtimes)
    summary = overall(rows, labels[1:])
    if not summary:
        raise VlmrtError(f"no image in {root} could be read; see the errors: {rows[0]['error']}")
    passed = min_agreement is None or all(s["agreement"] >= min_agreement for s in summary.values())
    return {
        "model": loaded.name, "synthetic_weights": loaded.synthetic, "reference": labels[0],
        "runtimes": labels, "prompt": prompt, "new_tokens": new_tokens, "images_dir": str(root),
        "images": rows, "overall": summary, "min_agreement": min_agreement, "passed": passed,
    }


def _g(x: float) -> str:
    return f"{x:.2e}"


def markdown(report: dict) -> str:
    """The report as two markdown tables: per image, then overall."""
    stages = ("vision", "embedding", "prefill_logits", "kv_prefill", "decode_logits")
    head = ("| image | runtime | agreement | first divergence | logits max | logits mean "
            "| vision max | embedding max | prefill max | kv max | decode max |")
    lines = [f"Parity vs `{report['reference']}` on {report['model']}, {report['new_tokens']} greedy tokens per image",
             "", head, "|" + "---|" * 11]
    for im in report["images"]:
        if "error" in im:
            lines.append(f"| {im['image']} | (unreadable) |" + " |" * 9)
            continue
        for name, r in im["runtimes"].items():
            s = r["stages"]
            div = "-" if r["first_divergence"] is None else str(r["first_divergence"])
            errs = " | ".join(_g(s[k]["max_abs"]) if k in s else "-" for k in stages)
            lines.append(f"| {im['image']} | {name} | {r['agreement']:.3f} | {div} | {_g(r['logits']['max_abs'])} "
                         f"| {_g(r['logits']['mean_abs'])} | {errs} |")
    lines += ["", "| runtime | agreement | identical images | earliest divergence | logits max | logits mean |",
              "|" + "---|" * 6]
    for name, o in report["overall"].items():
        div = "-" if o["earliest_divergence"] is None else str(o["earliest_divergence"])
        lines.append(f"| {name} | {o['agreement']:.3f} | {o['images_identical']}/{o['images']} | {div} "
                     f"| {_g(o['logits_max_abs'])} | {_g(o['logits_mean_abs'])} |")
    if report["min_agreement"] is not None:
        verdict = "PASS" if report["passed"] else "FAIL"
        lines += ["", f"{verdict}: minimum agreement {report['min_agreement']}"]
    return "\n".join(lines)
