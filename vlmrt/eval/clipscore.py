"""CLIP-score judge: score caption sets against their images and compare the sets (`vlmrt eval clipscore`).

CLIPScore (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image
Captioning", eq. 1; reference code jmhessel/clipscore):

    CLIP-S(c, v) = w * max(cos(E_text(prefix + c), E_image(v)), 0),   w = 2.5, prefix "A photo depicts "

```
 images/ ─► ClipJudge.embed_images ─► v [N,E] ─┐
 A.json  ─► ClipJudge.embed_texts  ─► a [N,E] ─┼─► per-image scores A, B ─► means, paired difference B - A,
 B.json  ─► ClipJudge.embed_texts  ─► b [N,E] ─┘                            seeded bootstrap 95% interval
```

Caption files: the output of `vlmrt caption` (entries without a caption, i.e. unreadable images,
are skipped), a JSON object {image: caption}, or a list of {"image": ..., "caption": ...}; image
names are paths relative to the image folder. Every named image must exist in the folder. Sets are
compared on the images they share (a note says when that is fewer than a set holds).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vlmrt.errors import VlmrtError
from vlmrt.eval.images import list_images, read_json

W = 2.5  # Hessel et al. 2021: rescales CLIP-S to roughly [0, 1] on their data
PREFIX = "A photo depicts "  # Hessel et al. 2021 prepend it to every candidate caption
_FORMATS = ('a `vlmrt caption` output, a JSON object {"image": "caption", ...} '
            'or a list of {"image": ..., "caption": ...}')


def read_captions(path: str | os.PathLike) -> dict[str, str]:
    """image (relative path) -> caption, from any of the accepted caption formats (module docstring)."""
    if not Path(path).is_file():
        raise VlmrtError(f"captions file not found: {path}; write it with `vlmrt caption ... --out {path}` first")
    doc = read_json(path, "a captions file")
    if isinstance(doc, dict) and isinstance(doc.get("entries"), list):
        doc = [e for e in doc["entries"] if isinstance(e, dict) and "caption" in e]
    if isinstance(doc, list):
        if not all(isinstance(e, dict) and isinstance(e.get("image"), str) and isinstance(e.get("caption"), str)
                   for e in doc):
            raise VlmrtError(f"{path}: every list item must be {{\"image\": ..., \"caption\": ...}}; expected {_FORMATS}")
        caps = {e["image"]: e["caption"] for e in doc}
    elif isinstance(doc, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in doc.items()):
        caps = dict(doc)
    else:
        raise VlmrtError(f"{path} is not a captions file; expected {_FORMATS}")
    if not caps:
        raise VlmrtError(f"{path} holds no captions")
    return caps


def match_images(captions: dict[str, str], images_dir: Path, source: str) -> dict[str, str]:
    """Check that every captioned image is in the folder; accept absolute paths inside it.

    Raises:
        VlmrtError: some captioned images are not in the folder (names the first few).
    """
    root = images_dir.resolve()
    out, missing = {}, []
    for name, caption in captions.items():
        p = Path(name)
        if p.is_absolute() and p.resolve().is_relative_to(root):
            name = p.resolve().relative_to(root).as_posix()
        if (root / name).is_file():
            out[name] = caption
        else:
            missing.append(name)
    if missing:
        some = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise VlmrtError(f"{len(missing)} of the {len(captions)} images captioned in {source} are not in {images_dir} "
                         f"({some}); pass the --images folder the captions were made from")
    return out


def clip_scores(judge, images_dir: Path, captions: dict[str, str], image_embeds: dict, w: float = W,
                prefix: str = PREFIX, batch_size: int = 32) -> dict[str, float]:
    """Per-image CLIP-S of one caption set. `image_embeds` caches image embeddings across sets."""
    from vlmrt.processor import load_image

    names = sorted(captions)
    todo = [n for n in names if n not in image_embeds]
    for i in range(0, len(todo), batch_size):
        chunk = todo[i:i + batch_size]
        vecs = judge.embed_images([load_image(images_dir / n) for n in chunk])
        image_embeds.update(zip(chunk, vecs))
    scores = {}
    for i in range(0, len(names), batch_size):
        chunk = names[i:i + batch_size]
        text = judge.embed_texts([prefix + captions[n] for n in chunk])  # [n,E] unit vectors
        for n, t in zip(chunk, text):
            scores[n] = clip_s(t, image_embeds[n], w)
    return scores


def clip_s(text, image, w: float = W) -> float:
    """CLIP-S of one caption and one image from their unit embeddings ([E] each)."""
    return w * max(float(text @ image), 0.0)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, samples: int = 10000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of b - a over paired items, with a percentile bootstrap interval (items resampled with
    replacement, `samples` times, from a seeded generator)."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(samples, len(d)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"mean_diff": float(d.mean()), "ci_low": float(lo), "ci_high": float(hi), "level": level,
            "samples": samples, "seed": seed}


def compare_sets(first: tuple[str, dict], other: tuple[str, dict], samples: int, seed: int) -> dict:
    """Paired comparison of `other` against `first` on their shared images."""
    (name_a, sa), (name_b, sb) = first, other
    common = sorted(set(sa) & set(sb))
    if not common:
        raise VlmrtError(f"{name_a} and {name_b} caption no image in common; nothing to compare")
    boot = paired_bootstrap(np.array([sa[k] for k in common]), np.array([sb[k] for k in common]), samples, seed)
    higher = name_b if boot["mean_diff"] > 0 else name_a if boot["mean_diff"] < 0 else "tie"
    significant = boot["ci_low"] > 0 or boot["ci_high"] < 0  # the interval excludes 0
    return {"a": name_a, "b": name_b, "images": len(common), **boot, "higher": higher, "significant": significant}


def set_names(files: list) -> list[str]:
    """Short unique names for caption files: the stem, with as many parent folders as it takes to
    tell it from the others (runs/eager/caps.json, runs/onnx/caps.json -> eager/caps, onnx/caps);
    a file given twice gets #1, #2."""
    paths = [Path(f).with_suffix("") for f in files]

    def tail(p: Path, depth: int) -> str:
        return Path(*p.parts[-depth:]).as_posix()

    names = []
    for p in paths:
        others = [q for q in paths if q != p]
        depth = 1
        while depth < len(p.parts) and any(tail(q, depth) == tail(p, depth) for q in others):
            depth += 1
        names.append(tail(p, depth))
    return [f"{n}#{names[:i].count(n) + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def read_sets(images_dir: str | os.PathLike, caption_files: list) -> tuple[Path, list[str], list[dict[str, str]]]:
    """Read and check the caption files against the folder: (folder, set names, captions per set).

    Raises:
        VlmrtError: no caption file, a bad one, or captions of images not in the folder.
    """
    root = Path(images_dir)
    list_images(root, recursive=True)  # the folder exists and holds images
    if not caption_files:
        raise VlmrtError("give at least one captions file (--captions A.json [B.json ...])")
    return root, set_names(caption_files), [match_images(read_captions(f), root, str(f)) for f in caption_files]


def build_report(judge_info: dict, root: Path, caption_files: list, names: list[str], set_scores: list[dict],
                 w: float = W, prefix: str = PREFIX, samples: int = 10000, seed: int = 0) -> dict:
    """The report of `clipscore_report` from the per-image scores of each set (however they were computed).

    Args:
        judge_info: {"clip": path, "source": "hf" or "open_clip"}.
        root: the image folder.
        caption_files, names: the files and their set names (`read_sets`).
        set_scores: image -> CLIP-S, one dict per file.
        w, prefix, samples, seed: as in `clipscore_report`.
    """
    folder = list_images(root, recursive=True)
    sets, notes = [], []
    for name, f, scores in zip(names, caption_files, set_scores):
        sets.append({"name": name, "file": str(f), "images": len(scores), "mean": float(np.mean(list(scores.values()))),
                     "scores": scores})
        if len(scores) < len(folder):
            notes.append(f"{name} captions {len(scores)} of the {len(folder)} images in {root}")
    comparisons = [compare_sets((sets[0]["name"], sets[0]["scores"]), (s["name"], s["scores"]), samples, seed)
                   for s in sets[1:]]
    for c, s in zip(comparisons, sets[1:]):
        if c["images"] < max(s["images"], sets[0]["images"]):
            notes.append(f"{c['a']} vs {c['b']}: compared on the {c['images']} images both caption")
    return {"clip": judge_info["clip"], "source": judge_info["source"], "w": w, "prefix": prefix,
            "images_dir": str(root), "sets": sets, "comparisons": comparisons, "notes": notes}


def clipscore_report(judge, images_dir: str | os.PathLike, caption_files: list, w: float = W, prefix: str = PREFIX,
                     samples: int = 10000, seed: int = 0) -> dict:
    """Score each caption file against the images and compare every set with the first.

    Args:
        judge: a `ClipJudge` (see `vlmrt.eval.clip_loader.load_clip`).
        images_dir: the image folder the captions were made from.
        caption_files: one or more caption files (formats in the module docstring).
        w: CLIP-S weight (2.5 as in Hessel et al. 2021).
        prefix: text put before every caption ("A photo depicts " as in Hessel et al. 2021).
        samples, seed: bootstrap resamples and their seed.

    Returns:
        {"clip", "source", "w", "prefix", "images_dir", "sets": [{"name", "file", "images", "mean",
         "scores"}], "comparisons": [{"a", "b", "images", "mean_diff", "ci_low", "ci_high", "higher",
         "significant"}],
         "notes"}.
    """
    root, names, caps = read_sets(images_dir, caption_files)
    embeds = {}  # image embeddings, shared by the sets
    set_scores = [clip_scores(judge, root, c, embeds, w, prefix) for c in caps]
    return build_report({"clip": judge.path, "source": judge.source}, root, caption_files, names, set_scores,
                        w, prefix, samples, seed)


def markdown(report: dict) -> str:
    """Means per set and the paired comparisons as markdown tables."""
    lines = [f"CLIP score (w={report['w']}, prefix {report['prefix']!r}) with {report['clip']}", "",
             "| captions | images | mean CLIP-S |", "|---|---|---|"]
    lines += [f"| {s['name']} | {s['images']} | {s['mean']:.4f} |" for s in report["sets"]]
    if report["comparisons"]:
        lines += ["", "| b vs a | images | mean difference (b - a) | 95% bootstrap interval | higher | interval excludes 0 |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {c['b']} vs {c['a']} | {c['images']} | {c['mean_diff']:+.4f} "
                  f"| [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] | {c['higher']} | {'yes' if c['significant'] else 'no'} |"
                  for c in report["comparisons"]]
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)
