"""Tokenizers: a local loader for released tokenizer files, and a synthetic tokenizer of any
vocabulary size for presets that run on synthetic weights.

The synthetic tokenizer is a SentencePiece-style Unigram model (Hugging Face `tokenizers`) with
byte fallback, built deterministically: special tokens and any pinned pieces at fixed ids (so a
preset's stop-token ids mean the same thing as in the release), the 256 byte pieces, common English
words, then invented syllables until the vocabulary is full. It encodes any text and decodes any id,
so the whole pipeline runs; the words a synthetic model picks are, of course, meaningless.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from vlmrt.errors import VlmrtError

_WORDS = (
    "the a an of and to in is on with for this that it as at by from be are was image picture photo "
    "describe what who where when how why there here these those his her their its some many one two "
    "man woman person people space suit astronaut flag sky blue white red black green large small "
    "standing sitting holding wearing looking in front behind next near left right top bottom "
    "background foreground detail details shows show color colors answer question please you your "
    "i me my we our can will would see seen scene object objects"
).split()
_ONSETS = "b c d f g h j k l m n p r s t v w z ch sh th st tr pl br gr".split()
_VOWELS = "a e i o u ai ea ou io".split()
_CODAS = ["", "n", "r", "s", "t", "l", "m", "nd", "st", "ck"]


def _pieces():
    """Deterministic stream of candidate pieces after the fixed ones."""
    yield from ("\u2581" + w for w in _WORDS)
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?;:'\"()-#"
    yield from chars
    yield from ("\u2581" + c for c in chars)
    syllables = [o + v + c for o in _ONSETS for v in _VOWELS for c in _CODAS]
    for s in syllables:
        yield "\u2581" + s
        yield s
    for a, b in itertools.product(syllables, repeat=2):
        yield "\u2581" + a + b


def build_synthetic_tokenizer(
    vocab_size: int,
    special: dict[int, str],
    pinned: dict[int, str] | None = None,
    bos: str | None = None,
    eos: str | None = None,
    unk: str = "<unk>",
    pad: str | None = None,
):
    """Build a `PreTrainedTokenizerFast` with exactly `vocab_size` ids.

    Args:
        vocab_size: number of ids; every id decodes to something.
        special: id -> special token text (e.g. {0: "<unk>", 1: "<s>", 2: "</s>"}).
        pinned: id -> ordinary piece that must sit at that id (e.g. {835: "\u2581###"} as in Llama).
        bos, eos, unk, pad: which special texts play these roles.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    fixed = {**special, **(pinned or {})}
    if max(fixed) >= vocab_size:
        raise ValueError(f"pinned id {max(fixed)} does not fit a vocabulary of {vocab_size}")
    taken = set(fixed.values())
    stream = itertools.chain((f"<0x{i:02X}>" for i in range(256)), _pieces())
    vocab: list[tuple[str, float]] = []
    for i in range(vocab_size):
        if i in fixed:
            piece = fixed[i]
        else:
            piece = next(p for p in stream if p not in taken)
            taken.add(piece)
        # Unigram scores are log-probabilities; whole words beat syllables beat bytes.
        score = -2.0 if piece.startswith("\u2581") and piece[1:] in _WORDS else -5.0 - 0.1 * len(piece)
        vocab.append((piece, -20.0 if piece.startswith("<0x") else score))
    unk_id = next(i for i, t in special.items() if t == unk)
    tok = Tokenizer(models.Unigram(vocab, unk_id=unk_id, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad or unk)
    others = [t for t in special.values() if t not in (bos, eos, unk, pad)]
    if others:
        fast.add_special_tokens({"additional_special_tokens": others})
    return fast


def load_tokenizer(folder: str | os.PathLike):
    """Load the tokenizer saved in `folder` (tokenizer.json, or a SentencePiece tokenizer.model)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise VlmrtError(f"no tokenizer in {folder}: expected tokenizer.json or tokenizer.model there")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises many types for a broken folder
        raise VlmrtError(f"cannot load the tokenizer in {folder}: {e.__class__.__name__}: {e}") from None
