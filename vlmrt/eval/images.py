"""Helpers the fidelity tools share: listing an image folder and writing JSON atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

from vlmrt.errors import VlmrtError


def list_images(folder: str | os.PathLike, recursive: bool = False) -> list[str]:
    """Image files in `folder` as sorted POSIX paths relative to it (jpg, png, webp, bmp, tiff, gif).

    Args:
        folder: the image folder.
        recursive: also look in subfolders.

    Raises:
        VlmrtError: the folder does not exist or holds no image.
    """
    root = Path(folder)
    if not root.exists():
        raise VlmrtError(f"image folder not found: {root}")
    if not root.is_dir():
        raise VlmrtError(f"{root} is a file; pass the folder that holds the images")
    walk = root.rglob("*") if recursive else root.iterdir()
    from vlmrt.processor import is_image_file  # here, not at the top: the CLI's help imports no torch

    found = sorted(p.relative_to(root).as_posix() for p in walk if p.is_file() and is_image_file(p))
    if not found:
        hint = "" if recursive else " (add --recursive to search subfolders)"
        raise VlmrtError(f"no images in {root}: looked for .jpg .jpeg .png .webp .bmp .tif .gif files{hint}")
    return found


def write_json_atomic(path: str | os.PathLike, data) -> None:
    """Write `data` as JSON so that `path` always holds either the old or the new file, never half of one.

    The text goes to a temporary file beside `path`, is flushed to disk, then renamed over `path`
    (`os.replace` is atomic on POSIX and Windows when both are on one file system).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str | os.PathLike, what: str):
    """Load a JSON file, turning a missing or broken file into a clear `VlmrtError`."""
    path = Path(path)
    if not path.is_file():
        raise VlmrtError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VlmrtError(f"{path} is not a JSON file ({e}); expected {what}") from None
