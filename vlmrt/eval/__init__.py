"""Fidelity tools: does an accelerated model still say the same thing?

```
 image folder ─► caption.py ─► captions.json (one per runtime) ─┐
                                                               ├─► clipscore.py: CLIP score per set + paired bootstrap
 image folder ─► parity.py: runtime A vs B on the same weights ─┘   (tokens, logits, stage outputs)
```

- `caption.py`   caption a folder, resumable (`vlmrt caption`)
- `parity.py`    runtime-vs-runtime report: token agreement, first divergence, logit and stage errors
                 (`vlmrt eval parity`)
- `clipscore.py` CLIP-score judge over caption sets (`vlmrt eval clipscore`); `clip_loader.py` loads
                 the judge from a Hugging Face CLIP folder or an open_clip checkpoint
- `ray_caption.py`, `ray_clipscore.py`  the same two on a Ray cluster (`--ray`: a pool of actors, one
                 model each, same output); `ray_cluster.py` connects, sizes the pool and streams the batches
- `commands.py`  the CLI rows (arguments and thin command functions)
- `images.py`    the shared folder listing and atomic JSON writing
"""
