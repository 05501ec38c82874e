"""Text <-> token ids for serving: load a checkpoint's tokenizer offline, resolve end/pad ids,
encode stop/bad word lists (TensorRT-LLM's `[2, L]` layout), and detokenize a token stream
incrementally so that the streamed deltas concatenate to exactly `Tokenizer.decode(all_ids)`.

Incremental detokenization keeps two offsets into the (special-token-free) id stream, as vLLM and
TGI do: `prefix_offset` .. `read_offset` is a short window of already-emitted tokens that gives the
next tokens their context (leading-space stripping, UTF-8 bytes split across tokens). Each step
decodes `ids[prefix_offset:]` and emits what it adds to `ids[prefix_offset:read_offset]`'s text.
Text is held back while
  * it ends in U+FFFD: a multi-byte UTF-8 character split across byte-level tokens is incomplete;
  * the last token is a SentencePiece byte-fallback token (`<0xE6>`): the `ByteFallback` decoder
    turns a whole run of byte tokens into text or, if any byte of the run is invalid, into one
    U+FFFD per byte, so no part of a run is final before the run ends.
Offsets only ever move to a point where neither holds, so a window never starts inside a
character or a byte run, and a window's own start effects (SentencePiece strips one leading
space at the start of a decoded string) stay inside already-emitted text.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
REPLACEMENT_CHAR = "\ufffd"


class Tokenizer:
    """A Hugging Face tokenizer plus the ids serving needs. `decode` never cleans up
    tokenization spaces (that rewrite looks across token boundaries, which a stream cannot undo)."""

    def __init__(self, hf_tokenizer: Any, *, end_id: int | None = None, pad_id: int | None = None,
                 add_special_tokens: bool = True) -> None:
        self.hf = hf_tokenizer
        self.add_special_tokens = add_special_tokens
        # The Rust tokenizer when there is one: same result as `hf.decode` without cleanup, 4x faster.
        self._backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        self.bos_id: int | None = hf_tokenizer.bos_token_id
        resolved_end = end_id if end_id is not None else hf_tokenizer.eos_token_id
        if resolved_end is None:
            raise ValueError("end_id: the tokenizer has no eos_token and no end_id was given")
        self.end_id: int = int(resolved_end)
        resolved_pad = pad_id if pad_id is not None else hf_tokenizer.pad_token_id
        self.pad_id: int = int(resolved_pad) if resolved_pad is not None else self.end_id
        self.vocab_size: int = len(hf_tokenizer)
        self.special_ids: frozenset[int] = self._find_special_ids()
        self.byte_fallback_ids: frozenset[int] = self._find_byte_fallback_ids()

    def _find_special_ids(self) -> frozenset[int]:
        # Exactly the ids `decode(..., skip_special_tokens=True)` drops: the Rust tokenizer skips
        # added tokens flagged special; a slow tokenizer skips `all_special_ids`.
        decoder = getattr(self.hf, "added_tokens_decoder", None)
        if self._backend is not None and decoder is not None:
            return frozenset(i for i, tok in decoder.items() if getattr(tok, "special", False))
        return frozenset(self.hf.all_special_ids)

    def _find_byte_fallback_ids(self) -> frozenset[int]:
        if self._backend is None or "ByteFallback" not in str(self._backend.decoder):
            return frozenset()
        return frozenset(i for tok, i in self.hf.get_vocab().items() if _BYTE_TOKEN.match(tok))

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        add = self.add_special_tokens if add_special_tokens is None else add_special_tokens
        return list(self.hf.encode(text, add_special_tokens=add))

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in token_ids]
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens,
                              clean_up_tokenization_spaces=False)

    def encode_words(self, words: Iterable[str | bytes]) -> list[list[int]]:
        """Stop/bad words -> one id sequence per word, without BOS (as TensorRT-LLM's
        preprocessing does). Words that encode to nothing are dropped."""
        out = []
        for word in words:
            if isinstance(word, bytes):
                word = word.decode("utf-8")
            ids = self.encode(word, add_special_tokens=False)
            if ids:
                out.append(ids)
        return out

    def incremental(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)


def load_tokenizer(model_dir: str | Path, *, end_id: int | None = None, pad_id: int | None = None,
                   add_special_tokens: bool = True) -> Tokenizer:
    """Load the tokenizer stored in a checkpoint or engine directory (local files only).

    `end_id` falls back to the tokenizer's eos token, then to `generation_config.json` /
    `config.json`'s `eos_token_id`; `pad_id` to the pad token, then `pad_token_id`, then `end_id`.
    """
    from transformers import AutoTokenizer

    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"model_dir {str(path)!r} is not a directory")
    hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if end_id is None and hf.eos_token_id is None:
        end_id = _config_id(path, "eos_token_id")
    if pad_id is None and hf.pad_token_id is None:
        pad_id = _config_id(path, "pad_token_id")
    return Tokenizer(hf, end_id=end_id, pad_id=pad_id, add_special_tokens=add_special_tokens)


def _config_id(path: Path, key: str) -> int | None:
    for name in ("generation_config.json", "config.json"):
        f = path / name
        if f.is_file():
            value = json.loads(f.read_text()).get(key)
            if isinstance(value, list):
                value = value[0] if value else None
            if value is not None:
                return int(value)
    return None


class IncrementalDetokenizer:
    """Streams text for a growing token sequence. `add(ids)` returns the text that became final;
    `finish()` returns the rest. The concatenation of everything returned equals
    `tokenizer.decode(all_ids, skip_special_tokens)`."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._skip = tokenizer.special_ids if skip_special_tokens else frozenset()
        self._byte_ids = tokenizer.byte_fallback_ids
        self.token_ids: list[int] = []  # every id added, special ones included
        self._ids: list[int] = []       # the ids that produce text (special ones dropped when skipped)
        self.prefix_offset = 0
        self.read_offset = 0
        self._prefix_text = ""          # decode(_ids[prefix_offset:read_offset])
        self._emitted: list[str] = []
        self.finished = False

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._emitted)

    def add(self, token_ids: Iterable[int]) -> str:
        if self.finished:
            raise RuntimeError("IncrementalDetokenizer.add() after finish()")
        added = False
        for i in token_ids:
            i = int(i)
            self.token_ids.append(i)
            if i not in self._skip:
                self._ids.append(i)
                added = True
        if not added:
            return ""
        return self._advance(final=False)

    def finish(self) -> str:
        """Emit whatever is still held back (an incomplete character becomes U+FFFD, as in `decode`)."""
        if self.finished:
            return ""
        delta = self._advance(final=True) if self.read_offset < len(self._ids) else ""
        self.finished = True
        return delta

    def _advance(self, final: bool) -> str:
        window_text = self.tokenizer.decode(self._ids[self.prefix_offset:], self.skip_special_tokens)
        if not final:
            if window_text.endswith(REPLACEMENT_CHAR):
                return ""
            if self._byte_ids and self._ids[-1] in self._byte_ids:
                return ""
        if window_text.startswith(self._prefix_text):
            delta = window_text[len(self._prefix_text):]
        else:
            # A decoder whose output for the window start changed with later tokens: fall back to
            # the exact answer (one full decode) rather than emit text that disagrees with it.
            full = self.tokenizer.decode(self._ids, self.skip_special_tokens)
            emitted = self.text
            delta = full[len(emitted):] if full.startswith(emitted) else ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self._ids)
        self._prefix_text = self.tokenizer.decode(self._ids[self.prefix_offset:self.read_offset],
                                                  self.skip_special_tokens)
        if delta:
            self._emitted.append(delta)
        return delta


def to_word_list_format(word_lists: Sequence[Sequence[Sequence[int]]]) -> np.ndarray:
    """Per batch entry a list of id sequences -> TensorRT-LLM's `[batch, 2, L]` int32 tensor:
    row 0 the flattened ids, row 1 the cumulative end offsets, padded with 0 and -1 respectively."""
    flat: list[list[int]] = []
    offsets: list[list[int]] = []
    for words in word_lists:
        ids = [int(t) for w in words for t in w]
        ends = np.cumsum([len(w) for w in words if len(w)]).tolist()
        flat.append(ids)
        offsets.append(ends)
    width = max(1, max((len(f) for f in flat), default=0))
    out = np.zeros((len(word_lists), 2, width), dtype=np.int32)
    out[:, 1, :] = -1
    for b, (ids, ends) in enumerate(zip(flat, offsets)):
        out[b, 0, :len(ids)] = ids
        out[b, 1, :len(ends)] = ends
    return out


def from_word_list_format(tensor: np.ndarray, field: str = "stop_words_list") -> list[list[int]]:
    """One batch entry's `[2, L]` (or `[1, 2, L]`) word-list tensor -> list of id sequences.
    Raises ValueError naming `field` when the layout is not TensorRT-LLM's."""
    arr = np.asarray(tensor)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or arr.shape[0] != 2:
        raise ValueError(f"{field} must have shape [2, L] (ids, end offsets), got {list(np.shape(tensor))}")
    ids, ends = arr[0].tolist(), arr[1].tolist()
    words: list[list[int]] = []
    start = 0
    for end in ends:
        if end < 0:
            break
        if end <= start or end > len(ids):
            raise ValueError(f"{field} offsets must increase and stay within {len(ids)} ids, got {ends}")
        words.append([int(t) for t in ids[start:end]])
        start = end
    return words


__all__ = [
    "REPLACEMENT_CHAR",
    "IncrementalDetokenizer",
    "Tokenizer",
    "from_word_list_format",
    "load_tokenizer",
    "to_word_list_format",
]
