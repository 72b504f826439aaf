"""Caption every image of a folder, in batches, resumably (`vlmrt caption`).

```
 list_images(DIR) ─► skip those already captioned in OUT ─► batches of N ─┐
                                                                          ▼
          OUT.json ◄── atomic rewrite after every batch ◄── Pipeline(images, prompts) (greedy or beams)
```

Output format (`vlmrt.captions/1`): one JSON document, rewritten atomically after every batch (so
the file on disk is always complete, valid JSON; an interrupt loses at most the batch in flight):

```json
{"format": "vlmrt.captions/1", "complete": true, "pending": 0,
 "setup": {"model": "minigpt4-tiny", "runtime": "eager", "dtype": "fp32", "prompt": "...",
           "max_new_tokens": 64, "images_dir": "/abs/dir"},
 "synthetic_weights": true, "device": "cpu",
 "entries": [
   {"image": "a.jpg", "caption": "...", "runtime": "eager", "model": "minigpt4-tiny",
    "token_ids": [...], "finish_reason": "stop", "timings": {"batch_size": 8, "vision_ms": ...}},
   {"image": "broken.jpg", "error": "broken.jpg is not an image PIL can read ...",
    "runtime": "eager", "model": "minigpt4-tiny"}]}
```

`image` is the path relative to the image folder; `timings` are those of the batch the image was
in. Running again with the same `--out` resumes: images with a caption are kept, images that
failed are tried again, the rest are captioned. A file made with a different setup (model,
runtime, dtype, prompt, length, folder, beams, repetition penalty) is refused rather than mixed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from vlmrt.errors import VlmrtError
from vlmrt.eval.images import list_images, read_json, write_json_atomic

FORMAT = "vlmrt.captions/1"
DEFAULT_PROMPT = "Describe this image in one sentence."


def dtype_name(dtype) -> str:
    """torch dtype -> "fp32" / "fp16" / "bf16" (the CLI's names)."""
    from vlmrt.config import DTYPES

    return next((k for k, v in DTYPES.items() if v == dtype), str(dtype))


def runtime_name(pipe) -> str:
    return getattr(pipe.runtime, "name", type(pipe.runtime).__name__)


def caption_setup(pipe, images_dir, prompt: str, max_new_tokens: int, num_beams: int = 1,
                  repetition_penalty: float = 1.0) -> dict:
    """What must match for a run to resume an earlier output file (the decoding knobs only when set,
    so files written before they existed still resume)."""
    setup = {
        "model": pipe.loaded.name,
        "runtime": runtime_name(pipe),
        "dtype": dtype_name(pipe.loaded.dtype),
        "prompt": prompt,
        "max_new_tokens": max_new_tokens,
        "images_dir": str(Path(images_dir).resolve()),
    }
    if num_beams != 1:
        setup["num_beams"] = num_beams
    if repetition_penalty != 1.0:
        setup["repetition_penalty"] = repetition_penalty
    return setup


def load_previous(out: Path, setup: dict) -> dict[str, dict]:
    """Entries of an earlier run into `out` (image -> entry), or {} when there is none.

    Raises:
        VlmrtError: `out` is not a captions file, or was made with a different setup.
    """
    if not out.exists():
        return {}
    doc = read_json(out, "a vlmrt captions file")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise VlmrtError(f"{out} exists and is not a vlmrt captions file; pass another --out or remove it")
    old = doc.get("setup", {})
    diff = [k for k in dict.fromkeys([*setup, *old]) if old.get(k) != setup.get(k)]  # a knob set on one side only too
    if diff:
        what = ", ".join(f"{k}: {old.get(k)!r} there, {setup.get(k)!r} now" for k in diff)
        raise VlmrtError(f"{out} was made with a different setup ({what}); pass another --out to start a new file")
    return {e["image"]: e for e in doc.get("entries", []) if "image" in e}


def caption_header(pipe) -> dict:
    """What the output file records about the run besides its setup (not checked on resume)."""
    return {"synthetic_weights": pipe.loaded.synthetic, "device": str(pipe.loaded.device)}


class CaptionsFile:
    """The output of a run as it grows: earlier entries plus each finished batch, the whole document
    rewritten atomically after every batch (the local loop and the Ray driver both write through it).

    Args:
        out: the JSON file.
        setup: `caption_setup(...)` of this run.
        header: `caption_header(pipe)`.
        entries: image -> entry from an earlier run (`load_previous`).
        todo: how many images this run still has to caption.
    """

    def __init__(self, out: Path, setup: dict, header: dict, entries: dict[str, dict], todo: int):
        self.out, self.setup, self.header, self.entries, self.pending = out, setup, header, entries, todo

    def document(self) -> dict:
        return {"format": FORMAT, "complete": self.pending == 0, "pending": self.pending, "setup": self.setup,
                **self.header, "entries": [self.entries[k] for k in sorted(self.entries)]}

    def add(self, batch: list[dict]) -> None:
        """Record one finished batch of entries and rewrite the file."""
        for entry in batch:
            self.entries[entry["image"]] = entry
        self.pending = max(self.pending - len(batch), 0)
        write_json_atomic(self.out, self.document())

    def finish(self) -> dict:
        """Write the final document (every image tried) and return it."""
        self.pending = 0
        doc = self.document()
        write_json_atomic(self.out, doc)
        return doc


def check_caption_args(batch_size: int, prompt: str) -> None:
    """Reject settings no run can use, before anything is loaded."""
    if batch_size < 1:
        raise VlmrtError(f"--batch must be at least 1, got {batch_size}")
    if not prompt.strip():
        raise VlmrtError("the prompt is empty; pass a question, e.g. --prompt 'Describe this image.'")


def images_to_do(names: list[str], entries: dict[str, dict]) -> list[str]:
    """The images still without a caption: never captioned, or failed last time."""
    return [n for n in names if "caption" not in entries.get(n, {})]


def caption_batch(pipe, root: Path, names: list[str], prompt: str, config) -> list[dict]:
    """Caption `names` (paths relative to `root`) in one batch; unreadable images become error entries."""
    from vlmrt.processor import load_image

    base = {"runtime": runtime_name(pipe), "model": pipe.loaded.name}
    entries, images, ok = {}, [], []
    for name in names:
        try:
            images.append(load_image(root / name))
            ok.append(name)
        except VlmrtError as e:
            entries[name] = {"image": name, "error": str(e), **base}
    if ok:
        result = pipe(images, [prompt] * len(ok), config)
        timings = {"batch_size": len(ok), **result.timings}
        for i, name in enumerate(ok):
            entries[name] = {"image": name, "caption": result.texts[i], **base, "token_ids": result.token_ids[i],
                             "finish_reason": result.finish_reasons[i], "timings": timings}
    return [entries[n] for n in names]


def caption_folder(
    pipe,
    images_dir: str | os.PathLike,
    out: str | os.PathLike,
    prompt: str = DEFAULT_PROMPT,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    recursive: bool = False,
    progress: bool = True,
    num_beams: int = 1,
    repetition_penalty: float = 1.0,
) -> dict:
    """Caption every image in `images_dir` into `out` (format in the module docstring); resumable.

    Args:
        pipe: a `vlmrt.pipeline.Pipeline` (model + runtime).
        images_dir: the image folder.
        out: the JSON file; rewritten atomically after every batch, resumed when it exists.
        prompt: the question asked of every image.
        batch_size: images per batch.
        max_new_tokens: caption length limit.
        recursive: also caption images in subfolders.
        progress: show a progress bar with ETA on stderr.
        num_beams: 1 decodes greedily; K > 1 with beam search (e.g. MiniCPM-V-2's release: 3 beams,
            repetition_penalty 1.2), so captions can match how a release decodes.
        repetition_penalty: > 1 discourages repeats (1.0: off).

    Returns:
        The document written to `out`.
    """
    check_caption_args(batch_size, prompt)
    root, out = Path(images_dir), Path(out)
    names = list_images(root, recursive)
    setup = caption_setup(pipe, root, prompt, max_new_tokens, num_beams, repetition_penalty)
    entries = load_previous(out, setup)
    todo = images_to_do(names, entries)
    config = pipe.generation_config(max_new_tokens=max_new_tokens, num_beams=num_beams,
                                    repetition_penalty=repetition_penalty)
    from tqdm.auto import tqdm

    writer = CaptionsFile(out, setup, caption_header(pipe), entries, len(todo))
    bar = tqdm(total=len(names), initial=len(names) - len(todo), unit="img", desc="captioning",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    with bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            writer.add(caption_batch(pipe, root, chunk, prompt, config))
            bar.update(len(chunk))
    return writer.finish()


def summarize(doc: dict) -> str:
    """One line: how many images were captioned, how many failed."""
    done = sum("caption" in e for e in doc["entries"])
    failed = [e for e in doc["entries"] if "error" in e]
    line = f"{done} images captioned"
    if failed:
        line += f", {len(failed)} unreadable (recorded with their error): " + ", ".join(e["image"] for e in failed[:5])
        line += " ..." if len(failed) > 5 else ""
    return line
