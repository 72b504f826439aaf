"""Run-time options as frozen dataclasses; the CLI fills them, the library consumes them.

Model configs live with their family (models/<family>.py); these are the knobs shared by all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmrt.errors import VlmrtError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class GenerationConfig:
    """How to pick tokens and when to stop.

    Greedy when `do_sample` is False (the default); otherwise seeded sampling with temperature,
    top-k (0 = off), top-p (1.0 = off). `repetition_penalty` (1.0 = off) follows CTRL / Hugging
    Face: a logit of an already generated token is divided by it when positive, multiplied when
    negative. It looks at generated tokens only, as Hugging Face does when a prompt is given as
    embeddings (which is how every VLM here is driven).

    `num_beams` > 1 searches with that many beams instead (vlmrt/beam.py; deterministic, so not with
    `do_sample`), with Hugging Face's rules: a finished hypothesis scores its summed log-probabilities
    over (generated tokens, stop tokens included) ** `length_penalty`; with `early_stopping` False (Hugging
    Face's default) a prompt's search ends once it holds `num_beams` finished hypotheses and the best
    running beam, scored at its current length, cannot beat the worst of them; True ends it as soon as it
    holds `num_beams` finished hypotheses. (Hugging Face's third setting, "never", is not offered.)
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[tuple[int, ...], ...] = ()  # each entry a token sequence that ends a sequence
    stop_strings: tuple[str, ...] = ()  # the text is cut before the first of these
    pad_token_id: int = 0  # fed to sequences that already finished, inside a batch
    num_beams: int = 1  # 1: greedy or sampling; > 1: beam search
    length_penalty: float = 1.0  # beam search: finished scores are divided by length ** length_penalty
    early_stopping: bool = False  # beam search: see above
    logprobs: int | None = None  # the engine's events carry each sampled token's log-probability and this
    # many most likely tokens (vlmrt.engine.TokenLogprob; None: none, 0: the sampled token's only)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise VlmrtError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise VlmrtError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise VlmrtError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.repetition_penalty <= 0:
            raise VlmrtError("top_k must be >= 0 and repetition_penalty > 0")
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise VlmrtError(f"num_beams must be an integer >= 1, got {self.num_beams!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            raise VlmrtError(f"logprobs must be None or an integer >= 0 (how many top tokens), got {self.logprobs!r}")
        if self.logprobs is not None and self.num_beams > 1:
            raise VlmrtError("beam search returns no token log-probabilities; use num_beams=1 with logprobs")
        if self.num_beams > 1 and self.do_sample:
            raise VlmrtError(f"beam search (num_beams={self.num_beams}) with sampling is not supported; "
                             "drop the temperature (do_sample) or use num_beams=1")


@dataclass(frozen=True)
class RunOptions:
    """Where and how the stages run."""

    runtime: str = "eager"
    dtype: str = "fp32"
    device: str = "cpu"
    seed: int = 0  # seed of the synthetic weights (presets without checkpoint files)
    extra: dict = field(default_factory=dict, hash=False)  # runtime-specific settings

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in DTYPES:
            raise VlmrtError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        return DTYPES[self.dtype]


def resolve_device(name: str) -> torch.device:
    """Check that the device exists here and return it."""
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise VlmrtError(f"--device {name} asked for, but this machine has no CUDA GPU (or this torch build has no CUDA); use --device cpu")
        return torch.device(name)
    raise VlmrtError(f"unknown device {name!r}; use cpu or cuda")


_THREADS: list[int | None] = [None]  # set by set_threads; None: each runtime's own default


def set_threads(n: int | None) -> None:
    """CPU threads for PyTorch (intra-op) and for ONNX Runtime sessions made afterwards; None: leave the
    defaults. On shared cores fewer threads than cores can be faster (less waiting for a descheduled one)."""
    if n is None:
        return
    if not isinstance(n, int) or n < 1:
        raise VlmrtError(f"--threads must be an integer >= 1, got {n!r}")
    torch.set_num_threads(n)
    _THREADS[0] = n


def cpu_threads() -> int | None:
    """The count given to set_threads, or None."""
    return _THREADS[0]
