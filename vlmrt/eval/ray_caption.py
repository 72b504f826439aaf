"""`vlmrt caption --ray`: caption a folder on a Ray cluster, into the same file as the local command.

```
 driver: list_images ─► probe (one task loads the model: setup + header) ─► load_previous(OUT)
         todo ─► from_items ─► map_batches(CaptionActor × N) ─► blocks ─► CaptionsFile.add ─► OUT.json
                               each actor: Pipeline loaded once, caption_batch per batch
```

Same images, model, runtime and settings as `vlmrt caption`, same output format and resume rules
(`vlmrt.eval.caption`): the driver alone reads and writes OUT, rewriting it atomically after every
finished block, so a killed run (driver, actor or cluster) loses at most the batches in flight; a
run with the same OUT captions only the images still without a caption, and a changed setup is
refused. Actors read the images from the folder's absolute path: on a multi-node cluster the folder
(and a model folder) must be at that path on every node (shared storage).
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlmrt.eval.caption import (DEFAULT_PROMPT, CaptionsFile, caption_batch, caption_header, caption_setup,
                                check_caption_args, images_to_do, load_previous)
from vlmrt.eval.images import list_images
from vlmrt.eval.ray_cluster import RayResources, absolute, ray_cluster, run_actor_pool, run_task


@dataclass(frozen=True)
class PipelineSpec:
    """What an actor needs to build its own Pipeline (the arguments of `Pipeline.load`)."""

    model: str  # a preset, or a model / export folder (absolute, so every actor finds it)
    runtime: str = "eager"
    device: str = "cpu"
    dtype: str = "fp32"
    seed: int = 0

    def load(self):
        from vlmrt.pipeline import Pipeline

        return Pipeline.load(self.model, runtime=self.runtime, device=self.device, dtype=self.dtype, seed=self.seed)


@dataclass(frozen=True)
class CaptionTask:
    """The settings every actor captions with (`caption_folder`'s arguments)."""

    root: str  # the image folder, absolute
    prompt: str
    max_new_tokens: int
    num_beams: int
    repetition_penalty: float

    def setup(self, pipe) -> dict:
        return caption_setup(pipe, self.root, self.prompt, self.max_new_tokens, self.num_beams,
                             self.repetition_penalty)


def _load(spec: PipelineSpec, threads: int):
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # an actor never waits on a model hub either
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    torch.set_num_threads(threads)
    return spec.load()


def _describe(spec: PipelineSpec, task: CaptionTask, threads: int) -> tuple[dict, dict]:
    """(setup, header) of the run, from a pipeline built as the actors will build theirs."""
    pipe = _load(spec, threads)
    return task.setup(pipe), caption_header(pipe)


class CaptionActor:
    """One per actor: loads the pipeline once, then captions batch after batch."""

    def __init__(self, spec: PipelineSpec, task: CaptionTask, setup: dict, threads: int):
        from vlmrt.errors import VlmrtError

        self.pipe, self.task = _load(spec, threads), task
        if task.setup(self.pipe) != setup:  # e.g. a node where the model folder holds something else
            raise VlmrtError(f"an actor built a different setup ({task.setup(self.pipe)}) than the probe ({setup})")
        self.config = self.pipe.generation_config(max_new_tokens=task.max_new_tokens, num_beams=task.num_beams,
                                                  repetition_penalty=task.repetition_penalty)

    def __call__(self, batch: dict) -> dict:
        names = [str(n) for n in batch["image"]]
        entries = caption_batch(self.pipe, Path(self.task.root), names, self.task.prompt, self.config)
        return {"image": np.array(names), "entry": np.array([json.dumps(e) for e in entries])}


def caption_folder_ray(
    spec: PipelineSpec,
    images_dir: str | os.PathLike,
    out: str | os.PathLike,
    resources: RayResources = RayResources(),
    prompt: str = DEFAULT_PROMPT,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    recursive: bool = False,
    progress: bool = True,
    num_beams: int = 1,
    repetition_penalty: float = 1.0,
) -> dict:
    """`caption_folder` on a Ray cluster: one Pipeline per actor, batches streamed through Ray Data.

    Args:
        spec: the model, runtime, device, dtype and seed every actor loads.
        images_dir: the image folder (at the same path on every node).
        out: the JSON file, written by this process only; resumed when it exists.
        resources: cluster address, pool size, CPUs and GPUs per actor.
        prompt, batch_size, max_new_tokens, recursive, progress, num_beams, repetition_penalty:
            as in `vlmrt.eval.caption.caption_folder`.

    Returns:
        The document written to `out`, in the format of `caption_folder`.
    """
    check_caption_args(batch_size, prompt)
    resources.check_device(spec.device)
    root, out = Path(images_dir).resolve(), Path(out)
    names = list_images(root, recursive)
    spec = PipelineSpec(absolute(spec.model), spec.runtime, spec.device, spec.dtype, spec.seed)
    task = CaptionTask(str(root), prompt, max_new_tokens, num_beams, repetition_penalty)
    with ray_cluster(resources) as ray:
        setup, header = run_task(ray, _describe, resources, spec, task, resources.threads)
        entries = load_previous(out, setup)
        todo = images_to_do(names, entries)
        writer = CaptionsFile(out, setup, header, entries, len(todo))
        if todo:
            _stream(ray, writer, todo, spec, task, setup, batch_size, resources, len(names), progress)
    return writer.finish()


def _stream(ray, writer: CaptionsFile, todo: list[str], spec, task, setup, batch_size, resources, total, progress):
    from tqdm.auto import tqdm

    constructor = {"spec": spec, "task": task, "setup": setup, "threads": resources.threads}
    bar = tqdm(total=total, initial=total - len(todo), unit="img", desc=f"captioning on {resources.actors} actors",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    blocks = run_actor_pool(ray, [{"image": n} for n in todo], CaptionActor, constructor, batch_size, resources)
    with bar, closing(blocks):  # closing stops the pool at once when the driver is interrupted
        for block in blocks:
            writer.add([json.loads(s) for s in block["entry"]])
            bar.update(len(block["entry"]))
