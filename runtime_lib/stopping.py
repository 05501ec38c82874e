"""Stopping: TRT-LLM's `StoppingCriteria` API, the stream-safe stop-sequence matcher, and
TRT-LLM's `[batch, 2, max_len]` word-list format for stop/bad words.

Stop sequences are matched on generated token ids only (never the prompt), and the matched
sequence is removed from the output (DESIGN §6: OpenAI/vLLM semantics, not TRT-LLM's).
"""
from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from runtime_lib import tokenizer as _tok

WordList = list[list[int]]  # one row's words, each a list of token ids


class StoppingCriteria:
    """Decides after a step whether the whole batch stops (TRT-LLM's interface).

    `input_ids`: (batch * beams, seq_len) token ids so far; `scores`: (batch * beams, vocab)
    logits of the step. Return True to stop.
    """

    def __call__(self, step: int, input_ids: torch.Tensor, scores: torch.Tensor) -> bool:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__")


class StoppingCriteriaList(list, StoppingCriteria):
    """Stops when any of its criteria says stop. Every criterion is evaluated (no short
    circuit) so stateful criteria see every step."""

    def __call__(self, step: int, input_ids: torch.Tensor, scores: torch.Tensor) -> bool:
        results = [bool(criteria(step, input_ids, scores)) for criteria in self]
        return any(results)


# --------------------------------------------------------------------------- stop words


@dataclass(frozen=True, slots=True)
class StopCheck:
    """What the matcher knows after one more token.

    `matched`: a stop sequence ends at this token; generation of the sequence ends.
    `num_stop_tokens`: length of that stop sequence, i.e. how many trailing tokens to strip
    from the output (0 when not matched).
    `num_held`: how many trailing tokens (this one included) a stream must not emit yet,
    because they are a proper prefix of some stop sequence and may still turn into one.
    When a match happens the held tokens are exactly those stripped (plus none other).
    """

    matched: bool
    num_stop_tokens: int
    num_held: int


_NO_MATCH = StopCheck(False, 0, 0)


class StopWordsMatcher:
    """Aho-Corasick matcher over token ids for one sequence's stop sequences.

    Feed generated tokens one at a time with `push`. Each call is amortised O(1). When several
    stop sequences end at the same token, the longest one is reported (it starts earliest, so
    the text before it is what the user should see). The automaton is built once; `clone()`
    gives an independent matcher (same automaton, fresh state) for another sequence with the
    same stop words, e.g. `n > 1` or beams.
    """

    def __init__(self, stop_words: Sequence[Sequence[int]]) -> None:
        words = [list(w) for w in stop_words]
        for i, word in enumerate(words):
            if not word:
                raise ValueError(f"stop_words[{i}] is empty; every stop sequence needs >= 1 token")
            for t in word:
                if not isinstance(t, (int, np.integer)) or t < 0:
                    raise ValueError(f"stop_words[{i}] has token id {t!r}; ids must be integers >= 0")
        self.stop_words: tuple[tuple[int, ...], ...] = tuple(tuple(int(t) for t in w) for w in words)
        # Trie: state 0 is the root (empty prefix).
        self._goto: list[dict[int, int]] = [{}]
        self._depth: list[int] = [0]
        word_len: list[int] = [0]
        for word in self.stop_words:
            state = 0
            for t in word:
                nxt = self._goto[state].get(t)
                if nxt is None:
                    nxt = len(self._goto)
                    self._goto[state][t] = nxt
                    self._goto.append({})
                    self._depth.append(self._depth[state] + 1)
                    word_len.append(0)
                state = nxt
            word_len[state] = len(word)
        # Failure links (BFS) and, per state, the longest stop word that is a suffix of it.
        self._fail: list[int] = [0] * len(self._goto)
        self._match_len: list[int] = list(word_len)
        queue = list(self._goto[0].values())
        head = 0
        while head < len(queue):
            s = queue[head]
            head += 1
            for t, nxt in self._goto[s].items():
                f = self._fail[s]
                while f and t not in self._goto[f]:
                    f = self._fail[f]
                cand = self._goto[f].get(t, 0)
                self._fail[nxt] = cand if cand != nxt else 0
                self._match_len[nxt] = max(self._match_len[nxt], self._match_len[self._fail[nxt]])
                queue.append(nxt)
        self._state = 0
        self._finished = False

    @property
    def max_stop_len(self) -> int:
        return max((len(w) for w in self.stop_words), default=0)

    @property
    def num_held(self) -> int:
        """Trailing tokens currently held back (0 after a match: the sequence is over)."""
        return 0 if self._finished else self._depth[self._state]

    def clone(self) -> StopWordsMatcher:
        other = object.__new__(StopWordsMatcher)
        other.__dict__.update(self.__dict__)
        other._state = 0
        other._finished = False
        return other

    def reset(self) -> None:
        self._state = 0
        self._finished = False

    def push(self, token_id: int) -> StopCheck:
        if self._finished:
            raise RuntimeError("StopWordsMatcher.push after a stop sequence matched; call reset() first")
        if not self.stop_words:
            return _NO_MATCH
        s = self._state
        goto = self._goto
        while s and token_id not in goto[s]:
            s = self._fail[s]
        s = goto[s].get(token_id, 0)
        self._state = s
        n = self._match_len[s]
        if n:
            self._finished = True
            return StopCheck(True, n, n)
        return StopCheck(False, 0, self._depth[s])

    def extend(self, token_ids: Sequence[int]) -> tuple[int, StopCheck]:
        """Push several tokens; stop at the first match. Returns (tokens consumed, last check)."""
        check = StopCheck(False, 0, self.num_held)
        for i, t in enumerate(token_ids):
            check = self.push(int(t))
            if check.matched:
                return i + 1, check
        return len(token_ids), check


def strip_stop_words(token_ids: Sequence[int], stop_words: Sequence[Sequence[int]]) -> tuple[list[int], bool]:
    """Non-streaming helper: cut `token_ids` before the first stop sequence it contains.
    Returns (kept tokens, whether a stop sequence was found)."""
    matcher = StopWordsMatcher(stop_words)
    consumed, check = matcher.extend(token_ids)
    if check.matched:
        return list(token_ids[:consumed - check.num_stop_tokens]), True
    return list(token_ids), False


# --------------------------------------------------------------------------- word-list format


def ids_to_word_list_format(word_ids: Sequence[Sequence[Sequence[int]]]) -> np.ndarray:
    """Token-id words per row -> TRT-LLM's int32 array `[batch, 2, max_len]`.

    Row `b`: `[b, 0]` holds the words' ids concatenated (padded with 0), `[b, 1]` the cumulative
    end offset of each word (padded with -1). Empty words are dropped, as TRT-LLM does;
    `max_len >= 1` so the array is never empty. (`runtime_lib.tokenizer.to_word_list_format`.)
    """
    for b, words in enumerate(word_ids):
        for w, word in enumerate(words):
            if any(int(t) < 0 for t in word):
                raise ValueError(f"word_ids[{b}][{w}] has a negative token id; ids must be >= 0")
    return _tok.to_word_list_format(word_ids)


def to_word_list_format(word_dict: Sequence[Sequence[str | bytes]], tokenizer: Any,
                        add_special_tokens: bool = False, *, split_csv: bool = True) -> np.ndarray:
    """Words per batch row -> TRT-LLM's `[batch, 2, max_len]` int32 array (see
    `ids_to_word_list_format`).

    As TRT-LLM's function of the same name, each string of `word_dict[b]` is split as one CSV
    line (`" I am happy, I am sad"` -> two words); a string without a comma is one word as is.
    tensorrtllm_backend's preprocessing model
    instead treats every string as one word: pass `split_csv=False` for that.
    """
    if tokenizer is None:
        raise ValueError("tokenizer is required to encode words")
    rows: list[list[list[int]]] = []
    for item in word_dict:
        if isinstance(item, (str, bytes)):
            item = [item]
        words: list[str] = []
        for s in item:
            s = s.decode() if isinstance(s, bytes) else str(s)
            # csv only where there is something to split: it would drop "\n\n" and unquote '"x"'
            words += next(csv.reader([s]), []) if split_csv and "," in s else [s]
        rows.append([list(tokenizer.encode(w, add_special_tokens=add_special_tokens)) for w in words])
    return ids_to_word_list_format(rows)


def from_word_list_format(array: Any) -> list[list[list[int]]]:
    """TRT-LLM's `[batch, 2, max_len]` (or one row's `[2, max_len]`) -> words per row.

    Offsets end at the first -1; each offset is a word's end in the flat ids.
    """
    arr = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1] != 2:
        raise ValueError(f"word list must have shape [batch, 2, max_len], got {list(arr.shape)}")
    return [_tok.from_word_list_format(arr[b], f"word list row {b}") for b in range(arr.shape[0])]


def normalize_word_lists(value: Any, batch_size: int, name: str = "word list") -> list[list[list[int]]]:
    """Accept every spelling of per-row stop/bad words and return one list of words per row.

    - None / empty -> no words for any row;
    - TRT-LLM array `[batch, 2, L]` (numpy or torch); `[1, 2, L]` applies to every row;
    - `list[list[list[int]]]`: words per row (length 1 applies to every row);
    - `list[list[int]]`: one set of words shared by every row.
    """
    if value is None:
        return [[] for _ in range(batch_size)]
    if isinstance(value, (np.ndarray, torch.Tensor)):
        rows = from_word_list_format(value)
    else:
        value = list(value)
        if not value:
            return [[] for _ in range(batch_size)]
        depth3 = all(isinstance(r, (list, tuple)) and all(isinstance(w, (list, tuple)) for w in r)
                     for r in value)
        if depth3:
            rows = [[[int(t) for t in w] for w in r] for r in value]
        elif all(isinstance(w, (list, tuple)) and all(isinstance(t, (int, np.integer)) for t in w)
                 for w in value):
            rows = [[[int(t) for t in w] for w in value]]
        else:
            raise ValueError(f"{name} must be None, a [batch, 2, L] array, words per row "
                             f"(list[list[list[int]]]) or shared words (list[list[int]])")
    if len(rows) == 1 and batch_size != 1:
        rows = [[list(w) for w in rows[0]] for _ in range(batch_size)]
    if len(rows) != batch_size:
        raise ValueError(f"{name} has {len(rows)} rows for a batch of {batch_size}")
    return rows


__all__ = [
    "StopCheck",
    "StopWordsMatcher",
    "StoppingCriteria",
    "StoppingCriteriaList",
    "WordList",
    "from_word_list_format",
    "ids_to_word_list_format",
    "normalize_word_lists",
    "strip_stop_words",
    "to_word_list_format",
]
