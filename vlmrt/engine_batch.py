"""The engine's admission as batches: the images of every request admitted in one step go through
the vision stage together, and their prompts through one prefill call per contiguous run of pool
rows, right-padded to the longest (the lock-step loop's batched prefill, on the slot pool).

Based on vLLM's batched prefill of the requests scheduled in one step (its encoder cache runs the
images of a step as one batch) and on the padded-batch prefill of `generate()` here.

```
 admitted requests (pool slots a, a+1, ...)
   images ─► one item per image, [1,3,H,W] (+ named inputs [1,...]) ─► grouped by shape
          ─► encode_images([n,3,H,W]) per group, at most `vision_batch` images a call
          ─► each output cut on its batch axis (-3: image_features [n,Q,D], deepstack [K,n,Q,D])
          ─► per request: its images' features joined on the token axis (-2), each cut to its
             `image_tokens` real features when the processor gives them
   patch rows (SliMM: [N_patches,P] + grids) ─► one call per request, every image of it at once
   prompts ─► embed per request [1,L_i,D] ─► right-padded to T = max L_i, joined: [n,T,D]
          ─► one run_step over rows [a, a+n): positions [n,T] or [3,n,T], extras [K,n,T,D],
             cache_position [n,T] = 0..T-1, mask row i = 1 on [0, L_i), logits_at [n] = L_i - 1,
             causal_prefill only when no row is padded (else the float mask path)
```

Why the padding is harmless (as in the compiled runtime's padded prefill): a padding token of row i
sits at a slot >= L_i; real queries never see it (causal), and decode step k overwrites slot L_i + k
before the mask marks it valid. A padding query sees row i's valid keys, so it stays finite.

Runtime capabilities (attributes; absent: 1, the per-request calls of before):
- `vision_batch`: most images one `encode_images` call takes (None: any);
- `prefill_rows`: most rows one prefill `run_step` takes (None: any).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmrt.errors import VlmrtError
from vlmrt.generate import vision_inputs

BATCH_AXIS, TOKEN_AXIS = -3, -2  # of every vision output and prefill extra: [...,n,Q,D]


def capability(runtime, name: str) -> int | None:
    """A runtime's `vision_batch` or `prefill_rows` (None: any number; absent: 1)."""
    most = getattr(runtime, name, 1)
    if most is not None and most < 1:
        raise VlmrtError(f"the {runtime.name} runtime's {name} must be None or at least 1, got {most}")
    return most


def chunks(items: list, most: int | None) -> list[list]:
    """`items` in consecutive lists of at most `most` (None: one list)."""
    step = len(items) if most is None else most
    return [items[i:i + step] for i in range(0, len(items), max(step, 1))]


def split_batch(out, n: int) -> list:
    """A vision output of n images (a tensor or a dict of them, each [...,n,Q,D]) -> n outputs
    [...,1,Q,D] (views), in order."""
    if isinstance(out, dict):
        parts = {k: split_batch(v, n) for k, v in out.items()}
        return [{k: parts[k][i] for k in out} for i in range(n)]
    if out.dim() < 3 or out.shape[BATCH_AXIS] != n:
        raise VlmrtError(f"a vision output of shape {tuple(out.shape)} for {n} images has no image axis -3 "
                         "([...,n,Q,D]); the engine cannot batch this family's images (set vision_batch = 1)")
    return list(out.split(1, dim=BATCH_AXIS))


def cat_batch(parts: list):
    """The inverse of `split_batch`: outputs [...,1,Q,D] (or dicts) -> one [...,n,Q,D]."""
    if isinstance(parts[0], dict):
        return {k: cat_batch([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts, dim=BATCH_AXIS)


def shape_key(pixels: torch.Tensor, named: dict) -> tuple:
    """Images whose vision inputs have equal shapes and dtypes can share a call."""
    return (tuple(pixels.shape), pixels.dtype, *sorted((k, tuple(v.shape), v.dtype) for k, v in named.items()))


def encode_images(runtime, images: list[tuple[torch.Tensor, dict]]) -> list:
    """Single images (pixels [1,...], named inputs [1,...]) -> their vision outputs [...,1,Q,D], in
    order; images of one shape go through the stage together, `vision_batch` at most a call."""
    outs: list = [None] * len(images)
    groups: dict[tuple, list[int]] = {}
    for i, (pixels, named) in enumerate(images):
        groups.setdefault(shape_key(pixels, named), []).append(i)
    for members in groups.values():
        for part in chunks(members, capability(runtime, "vision_batch")):
            if len(part) == 1:  # one image: the call of before, nothing cut
                pixels, named = images[part[0]]
                outs[part[0]] = runtime.encode_images(pixels, **named)
                continue
            pixels = torch.cat([images[i][0] for i in part])  # [n,3,H,W]
            named = {k: torch.cat([images[i][1][k] for i in part]) for k in images[part[0]][1]}
            for i, out in zip(part, split_batch(runtime.encode_images(pixels, **named), len(part))):
                outs[i] = out
    return outs


def encode_requests(runtime, batches: list[dict]) -> list:
    """The vision stage's output for each one-row batch (None: text only), every image of them as
    a batch of single images (`encode_images`). A prompt with several images (pixel_values
    [N,3,H,W], named inputs [N,...]) gets one row [1,sum Q_i,D]: each image cut to its
    `image_tokens` real features when the processor gives them (padding chunks), joined on the
    token axis in order. Patch rows (SliMM's [N_patches,P] + grids), and an image whose named
    inputs are not one row per image, take their request's call alone."""
    out: list = [None] * len(batches)
    images, owner = [], []  # single images, and (request, image index) of each
    for r, batch in enumerate(batches):
        pixels, named = batch.get("pixel_values"), vision_inputs(batch)
        if pixels is None:
            continue
        n = pixels.shape[0]
        per_image = all(torch.is_tensor(v) and v.dim() and v.shape[0] == n for v in named.values())
        if pixels.dim() != 4 or (n == 1 and not per_image):  # inputs not one row per image: the call alone
            out[r] = runtime.encode_images(pixels, **named)
            continue
        for i in range(n):
            images.append((pixels[i:i + 1], {k: v[i:i + 1] for k, v in named.items()}))
            owner.append((r, i))
    feats = encode_images(runtime, images)
    per_request: dict[int, list] = {}
    for (r, _), f in zip(owner, feats):
        per_request.setdefault(r, []).append(f)
    for r, fs in per_request.items():
        out[r] = fs[0] if len(fs) == 1 else _join(fs, batches[r].get("image_tokens"))
    return out


def _join(feats: list, counts: torch.Tensor | None):
    """One prompt's image outputs [...,1,Q_i,D] -> [...,1,sum Q_i,D], each cut to counts[i]."""
    cut = (lambda t, i: t[..., :int(counts[i]), :]) if counts is not None else (lambda t, i: t)
    if isinstance(feats[0], dict):  # e.g. {image_features [1,Q,D], deepstack_features [K,1,Q,D]}
        return {k: torch.cat([cut(f[k], i) for i, f in enumerate(feats)], dim=TOKEN_AXIS) for k in feats[0]}
    return torch.cat([cut(f, i) for i, f in enumerate(feats)], dim=TOKEN_AXIS)


def runs(slots: list[int], most: int | None) -> list[list[int]]:
    """Indices into `slots` (ascending) as runs of consecutive pool rows, `most` rows at most each."""
    out: list[list[int]] = []
    for i, slot in enumerate(slots):
        if out and slot == slots[out[-1][-1]] + 1 and (most is None or len(out[-1]) < most):
            out[-1].append(i)
        else:
            out.append([i])
    return out


def pad_prompts(embedded: list[tuple[torch.Tensor, dict]], positions: list[torch.Tensor]):
    """Per request inputs_embeds [1,L_i,D], extras {name: [...,1,L_i,D]} and positions [1,L_i] or
    [3,1,L_i] -> right-padded to T = max L_i and joined: [n,T,D], {name: [...,n,T,D]}, [n,T] or [3,n,T]
    (a text-only prompt's [1,L] beside M-RoPE ones: [3,1,L], as the model expands text positions)."""
    t = max(e.shape[1] for e, _ in embedded)
    embeds = torch.cat([F.pad(e, (0, 0, 0, t - e.shape[1])) for e, _ in embedded])  # [n,T,D]
    extras = {k: torch.cat([F.pad(x[k], (0, 0, 0, t - x[k].shape[TOKEN_AXIS])) for _, x in embedded], dim=BATCH_AXIS)
              for k in embedded[0][1]}  # e.g. deepstack_embeds [K,n,T,D], zero past each row's prompt
    if any(p.dim() == 3 for p in positions):  # M-RoPE beside a text-only prompt's [1,L]: its three components alike
        positions = [p if p.dim() == 3 else p[None].expand(3, -1, -1) for p in positions]
    pos = torch.cat([F.pad(p, (0, t - p.shape[-1])) for p in positions], dim=-2)  # [n,T] or [3,n,T]
    return embeds, extras, pos
