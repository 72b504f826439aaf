"""`vlmrt eval clipscore --ray`: the CLIP judge on a Ray cluster, for caption sets too large for one machine.

```
 driver: read_sets (files checked against the folder) ─► one row per image: its caption in each set
         from_items ─► map_batches(JudgeActor × N) ─► per-image CLIP-S of every set ─► build_report
                       each actor: load_clip once; embed the batch's images once, every set's texts
```

The report is the one `clipscore_report` builds (same means, comparisons, bootstrap and notes); only
the embedding runs on the actors, in batches of --batch images, so scores can differ from the local
command's by float rounding (~1e-7). The images and the CLIP files must be at the same path on
every node.
"""

from __future__ import annotations

import json
import os
from contextlib import closing
from pathlib import Path

import numpy as np

from vlmrt.eval.clipscore import PREFIX, W, build_report, clip_s, read_sets
from vlmrt.eval.ray_cluster import RayResources, absolute, ray_cluster, run_actor_pool


class JudgeActor:
    """One per actor: loads the CLIP judge once, then scores batch after batch."""

    def __init__(self, clip: str, tokenizer: str | None, device: str, root: str, w: float, prefix: str, threads: int):
        import torch

        from vlmrt.eval.clip_loader import load_clip

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        torch.set_num_threads(threads)
        self.judge, self.root, self.w, self.prefix = load_clip(clip, tokenizer=tokenizer, device=device), Path(root), w, prefix

    def __call__(self, batch: dict) -> dict:
        """batch: "image" [n], "captions" [n] (JSON list per image: its caption in each set, or null)."""
        from vlmrt.processor import load_image

        names = [str(n) for n in batch["image"]]
        caps = [json.loads(c) for c in batch["captions"]]
        images = self.judge.embed_images([load_image(self.root / n) for n in names])  # [n,E]
        where = [(i, j) for i, row in enumerate(caps) for j, c in enumerate(row) if c is not None]
        texts = self.judge.embed_texts([self.prefix + caps[i][j] for i, j in where])  # [m,E]
        scores = [[None] * len(row) for row in caps]
        for (i, j), t in zip(where, texts):
            scores[i][j] = clip_s(t, images[i], self.w)
        n = len(names)
        return {"image": np.array(names), "scores": np.array([json.dumps(s) for s in scores]),
                "clip": np.array([self.judge.path] * n), "source": np.array([self.judge.source] * n)}


def clipscore_report_ray(clip: str | os.PathLike, images_dir: str | os.PathLike, caption_files: list,
                         resources: RayResources = RayResources(), tokenizer: str | os.PathLike | None = None,
                         device: str = "cpu", w: float = W, prefix: str = PREFIX, samples: int = 10000, seed: int = 0,
                         batch_size: int = 32) -> dict:
    """`clipscore_report` with the embedding on a pool of Ray actors (the report is the same).

    Args:
        clip: the CLIP judge (as `load_clip`: a Hugging Face CLIP folder or an open_clip checkpoint).
        images_dir, caption_files, w, prefix, samples, seed: as in `clipscore_report`.
        resources: cluster address, pool size, CPUs and GPUs per actor.
        tokenizer: folder with the CLIP tokenizer files (default: the CLIP folder).
        device: where each actor runs its judge ("cuda" with --gpus-per-actor).
        batch_size: images per actor call.
    """
    from vlmrt.errors import VlmrtError

    if batch_size < 1:
        raise VlmrtError(f"--batch must be at least 1, got {batch_size}")
    resources.check_device(device)
    root, names, caps = read_sets(Path(images_dir).resolve(), caption_files)
    images = sorted(set().union(*caps))
    rows = [{"image": n, "captions": json.dumps([c.get(n) for c in caps])} for n in images]
    constructor = {"clip": absolute(clip), "tokenizer": absolute(tokenizer) if tokenizer else None, "device": device,
                   "root": str(root), "w": w, "prefix": prefix, "threads": resources.threads}
    set_scores, info = [{} for _ in caps], {}
    with ray_cluster(resources) as ray, closing(run_actor_pool(ray, rows, JudgeActor, constructor, batch_size,
                                                                resources)) as blocks:
        for block in blocks:
            info = {"clip": str(block["clip"][0]), "source": str(block["source"][0])}
            for name, row in zip(block["image"], block["scores"]):
                for j, s in enumerate(json.loads(row)):
                    if s is not None:
                        set_scores[j][str(name)] = s
    set_scores = [{k: s[k] for k in sorted(s)} for s in set_scores]  # in image order, as the local report
    return build_report(info, root, caption_files, names, set_scores, w, prefix, samples, seed)
