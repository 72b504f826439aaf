"""Token log-probabilities in the shape of OpenAI's chat completions API: the request fields
`logprobs` (bool) and `top_logprobs` (0-20, only with `logprobs`), and `choices[i].logprobs` =
{"content": [ChatCompletionTokenLogprob...], "refusal": null} (field names from the openai client's
types `ChatCompletionTokenLogprob` / `TopLogprob`: token, logprob, bytes, top_logprobs).

```
 engine Event.logprobs: TokenLogprob(token_id, logprob, top=((id, logprob), ...)) per sampled token
   ─► TokenPieces: id ─► its bytes in the answer (UTF-8) and a display string
   ─► {"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...]}
```

The values are those of the distribution the model produced (log_softmax of the raw logits; see
vlmrt.engine.TokenLogprob). Every sampled token is listed, so the list matches
`usage.completion_tokens`: a stop token or the tokens of a stop string are there too, though their
text is not in the answer.
"""

from __future__ import annotations

import functools
import json

from vlmrt.serve_loop import HttpError

MAX_TOP_LOGPROBS = 20  # OpenAI's limit


def requested_logprobs(body: dict) -> int | None:
    """The body's `logprobs` / `top_logprobs` -> GenerationConfig.logprobs (None: not asked)."""
    asked, top = body.get("logprobs"), body.get("top_logprobs")
    if asked is not None and not isinstance(asked, bool):
        raise HttpError(400, f"`logprobs` must be true or false, got {json.dumps(asked)[:40]}")
    if top is not None:
        if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise HttpError(400, f"`top_logprobs` must be an integer in [0, {MAX_TOP_LOGPROBS}], got "
                                 f"{json.dumps(top)[:40]}")
        if top and asked is not True:  # 0 asks for nothing, so it may come alone (some clients send it)
            raise HttpError(400, "`top_logprobs` needs `logprobs` set to true; add \"logprobs\": true")
    return (top or 0) if asked else None


class TokenPieces:
    """A token id -> its bytes as they appear in a decoded answer, and a display string.

    Byte-level BPE (GPT-2 style: Qwen): the piece's characters map back to bytes exactly.
    SentencePiece and others: a byte-fallback piece `<0xAB>` is that byte; any other piece is what
    it adds to the text after a plain anchor token (so a word's leading space is kept), except as
    the answer's first token, where the decoder drops it as the answer's text does. A special token
    (skipped in the answer's text) shows as its own text. A token that is part of a UTF-8 character
    shows its bytes escaped (`\\xe2`); its `bytes` are exact either way.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special = frozenset(getattr(tokenizer, "all_special_ids", ()))
        self.byte_level = _byte_decoder(tokenizer)
        self.anchor = (tokenizer.encode("a", add_special_tokens=False) or [None])[0]
        self.anchor_text = self._decode([self.anchor]) if self.anchor is not None else ""
        self.piece = functools.lru_cache(maxsize=1 << 16)(self._piece)  # per id: a few decodes, once


    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _piece(self, token_id: int, first: bool = False) -> bytes:
        """The token's bytes; `first`: as the answer's first token."""
        if token_id in self.special:
            return self.tokenizer.convert_ids_to_tokens(token_id).encode()
        name = self.tokenizer.convert_ids_to_tokens(token_id)
        if self.byte_level is not None and all(c in self.byte_level for c in name):
            return bytes(self.byte_level[c] for c in name)
        if len(name) == 6 and name.startswith("<0x") and name.endswith(">"):
            return bytes([int(name[3:5], 16)])
        if first or self.anchor is None:
            return self._decode([token_id]).encode()
        return self._decode([self.anchor, token_id])[len(self.anchor_text):].encode()

    def entry(self, token_id: int, logprob: float, first: bool = False) -> dict:
        raw = self.piece(token_id, first)
        return {"token": raw.decode("utf-8", errors="backslashreplace"), "logprob": logprob, "bytes": list(raw)}

    def content(self, logprobs: list, start: int = 0) -> list[dict]:
        """TokenLogprobs of an answer's tokens start, start+1, ... -> OpenAI's `logprobs.content`."""
        out = []
        for i, lp in enumerate(logprobs, start):
            e = self.entry(lp.token_id, lp.logprob, i == 0)
            e["top_logprobs"] = [self.entry(t, v, i == 0) for t, v in lp.top]
            out.append(e)
        return out


def choice_logprobs(pieces: TokenPieces | None, logprobs: list | None, start: int = 0) -> dict | None:
    """A choice's (or a chunk's) `logprobs` field: None when not asked."""
    if pieces is None or logprobs is None:
        return None
    return {"content": pieces.content(logprobs, start), "refusal": None}


def _byte_decoder(tokenizer) -> dict[str, int] | None:
    """GPT-2's byte <-> printable character table when the tokenizer decodes byte-level, else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or "ByteLevel" not in type(backend.decoder).__name__ + repr(backend.decoder):
        return None
    # GPT-2's table: printable Latin-1 bytes stand for themselves, the other 68 for chr(256 + n) in order
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    moved = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + n): b for n, b in enumerate(moved)}}
