"""runtime_lib.stopping and runtime_lib.logits_processor: stop sequences end generation and are
stripped, a stream holds back exactly the tokens that may still become a stop sequence, and
TRT-LLM's word-list format round-trips."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime_lib.logits_processor import LogitsProcessor, LogitsProcessorList
from runtime_lib.stopping import (
    StoppingCriteria,
    StoppingCriteriaList,
    StopWordsMatcher,
    from_word_list_format,
    ids_to_word_list_format,
    normalize_word_lists,
    strip_stop_words,
    to_word_list_format,
)


def feed(stop_words, tokens):
    m = StopWordsMatcher(stop_words)
    return [m.push(t) for t in tokens]


def brute_force(stop_words, tokens):
    """Reference: first position where any stop word ends; the longest one there."""
    for end in range(1, len(tokens) + 1):
        hits = [len(w) for w in stop_words
                if len(w) <= end and list(tokens[end - len(w):end]) == list(w)]
        if hits:
            return end, max(hits)
    return None


def longest_held(stop_words, tokens):
    """Reference hold-back: longest suffix that is a proper prefix of some stop word."""
    best = 0
    for w in stop_words:
        for n in range(1, len(w)):
            if n <= len(tokens) and list(tokens[len(tokens) - n:]) == list(w[:n]):
                best = max(best, n)
    return best


# ----------------------------------------------------------------------------- matcher


def test_full_match_ends_generation_and_strips_the_stop_tokens():
    checks = feed([[7, 8, 9]], [1, 7, 8, 9])
    assert [c.matched for c in checks] == [False, False, False, True]
    assert checks[-1].num_stop_tokens == 3
    assert strip_stop_words([1, 7, 8, 9, 4], [[7, 8, 9]]) == ([1], True)


def test_partial_prefix_is_held_back_then_released_when_it_breaks():
    checks = feed([[7, 8, 9]], [1, 7, 8, 5])
    assert [c.num_held for c in checks] == [0, 1, 2, 0]
    assert not any(c.matched for c in checks)
    assert strip_stop_words([1, 7, 8, 5], [[7, 8, 9]]) == ([1, 7, 8, 5], False)


def test_broken_prefix_can_restart_a_match_inside_itself():
    # 7 7 8 9: the first 7 breaks the pattern, the second 7 starts the real match
    checks = feed([[7, 8, 9]], [7, 7, 8, 9])
    assert [c.num_held for c in checks] == [1, 1, 2, 3] and checks[-1].matched
    # 1 2 1 2 3 against [1 2 3]: failure link from "1 2" back to "" then "1", "1 2"
    checks = feed([[1, 2, 3]], [1, 2, 1, 2, 3])
    assert [c.num_held for c in checks] == [1, 2, 1, 2, 3] and checks[-1].matched


def test_single_token_stop_word_matches_immediately_and_holds_nothing_before():
    checks = feed([[5]], [1, 2, 5])
    assert [(c.matched, c.num_stop_tokens, c.num_held) for c in checks] == [
        (False, 0, 0), (False, 0, 0), (True, 1, 1)]


def test_overlapping_stop_words_report_the_first_to_complete():
    # [2, 3, 4] completes at the 4th token, before [1, 2, 3, 4, 5] could
    assert strip_stop_words([1, 2, 3, 4, 5], [[1, 2, 3, 4, 5], [2, 3, 4]]) == ([1], True)
    # both end together: the longer one is stripped (its text starts earlier)
    checks = feed([[3, 4], [2, 3, 4]], [2, 3, 4])
    assert checks[-1].matched and checks[-1].num_stop_tokens == 3
    # a stop word that is the suffix of a partial match of another
    checks = feed([[1, 2, 3, 9], [2, 3]], [1, 2, 3])
    assert checks[-1].matched and checks[-1].num_stop_tokens == 2


def test_no_stop_words_never_match_nor_hold():
    assert all(c == feed([], [1])[0] for c in feed([], [1, 2, 3]))
    assert feed([], [1])[0].num_held == 0


def test_push_after_match_is_an_error_until_reset_and_clone_is_independent():
    m = StopWordsMatcher([[4]])
    assert m.push(4).matched
    with pytest.raises(RuntimeError):
        m.push(1)
    m.reset()
    assert not m.push(1).matched
    m.push(3)
    other = m.clone()
    assert other.num_held == 0 and other.push(4).matched


@pytest.mark.parametrize("bad, msg", [([[]], r"stop_words\[0\] is empty"),
                                      ([[1, -1]], r"stop_words\[0\] has token id -1")])
def test_invalid_stop_words_raise_value_error(bad, msg):
    with pytest.raises(ValueError, match=msg):
        StopWordsMatcher(bad)


stop_words_st = st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=4), min_size=1, max_size=4)


@settings(max_examples=300, deadline=None)
@given(stop_words=stop_words_st, tokens=st.lists(st.integers(0, 3), max_size=30))
def test_streaming_never_emits_stop_text_and_equals_the_non_streamed_output(stop_words, tokens):
    m = StopWordsMatcher(stop_words)
    emitted: list[int] = []
    seen: list[int] = []
    final = None
    for t in tokens:
        seen.append(t)
        check = m.push(t)
        if check.matched:
            final = seen[:len(seen) - check.num_stop_tokens]
            assert len(emitted) <= len(final)  # never emitted anything that is now stripped
            emitted = final
            break
        assert check.num_held == longest_held(stop_words, seen)
        visible = seen[:len(seen) - check.num_held]
        assert visible[:len(emitted)] == emitted  # monotone: emitted text is never taken back
        emitted = visible
    ref = brute_force(stop_words, tokens)
    if ref is None:
        assert final is None
        emitted = seen  # end of generation: the held tail is flushed
        assert emitted == list(tokens)
    else:
        end, n = ref
        assert final == list(tokens[:end - n])
    assert strip_stop_words(tokens, stop_words) == (emitted, ref is not None)


# ----------------------------------------------------------------------------- word lists


def test_word_list_format_matches_trt_llm_layout():
    arr = ids_to_word_list_format([[[5, 6], [7]], [[8, 9, 10]], []])
    assert arr.dtype == np.int32 and arr.shape == (3, 2, 3)
    assert arr[0].tolist() == [[5, 6, 7], [2, 3, -1]]
    assert arr[1].tolist() == [[8, 9, 10], [3, -1, -1]]
    assert arr[2].tolist() == [[0, 0, 0], [-1, -1, -1]]
    assert ids_to_word_list_format([[]]).shape == (1, 2, 1)  # never zero-width


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.lists(st.integers(0, 50_000), min_size=1, max_size=5), max_size=4),
                min_size=1, max_size=4))
def test_word_list_format_round_trips(rows):
    arr = ids_to_word_list_format(rows)
    assert from_word_list_format(arr) == rows
    assert from_word_list_format(torch.from_numpy(arr)) == rows


def test_from_word_list_format_rejects_bad_layouts():
    with pytest.raises(ValueError, match=r"\[batch, 2, max_len\]"):
        from_word_list_format(np.zeros((2, 3, 4), dtype=np.int32))
    with pytest.raises(ValueError, match="offsets"):
        from_word_list_format(np.array([[[1, 2], [2, 1]]]))  # offsets going backwards
    with pytest.raises(ValueError, match="negative"):
        ids_to_word_list_format([[[1, -2]]])


class CharTokenizer:
    """One id per character (ord), plus a BOS when asked: enough to check the encoding rules."""

    def encode(self, text, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]


def test_to_word_list_format_splits_csv_like_trt_llm_and_per_string_like_the_backend():
    tok = CharTokenizer()
    arr = to_word_list_format([["ab,c"], [b"d"]], tok)
    assert from_word_list_format(arr) == [[[97, 98], [99]], [[100]]]
    arr = to_word_list_format([["ab,c", "e"]], tok, split_csv=False)
    assert from_word_list_format(arr) == [[[97, 98, 44, 99], [101]]]
    # a string without a comma is one word, even where csv would read newlines or quotes
    arr = to_word_list_format([["\n\n"], ['"q"']], tok)
    assert from_word_list_format(arr) == [[[10, 10]], [[34, 113, 34]]]
    arr = to_word_list_format([["x"]], tok, add_special_tokens=True)
    assert from_word_list_format(arr) == [[[1, 120]]]
    with pytest.raises(ValueError, match="tokenizer"):
        to_word_list_format([["x"]], None)


def test_to_word_list_format_with_a_real_tokenizer(llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_dir)
    arr = to_word_list_format([[" the end, stop"], ["\n\n"]], tok)
    rows = from_word_list_format(arr)
    enc = lambda s: tok.encode(s, add_special_tokens=False)
    assert rows[0] == [enc(" the end"), enc(" stop")]
    assert rows[1] == [enc("\n\n")]


def test_normalize_word_lists_accepts_every_spelling():
    assert normalize_word_lists(None, 2) == [[], []]
    assert normalize_word_lists([], 2) == [[], []]
    assert normalize_word_lists([[1, 2], [3]], 2) == [[[1, 2], [3]], [[1, 2], [3]]]
    assert normalize_word_lists([[[1]], [[2, 3]]], 2) == [[[1]], [[2, 3]]]
    arr = ids_to_word_list_format([[[4, 5]]])
    assert normalize_word_lists(arr, 3) == [[[4, 5]]] * 3
    with pytest.raises(ValueError, match="stop_words_list has 2 rows for a batch of 3"):
        normalize_word_lists([[[1]], [[2]]], 3, "stop_words_list")
    with pytest.raises(ValueError, match="bad_words_list must be"):
        normalize_word_lists([["a"]], 1, "bad_words_list")


# ----------------------------------------------------------------------------- criteria, processors


class StopAtStep(StoppingCriteria):
    def __init__(self, at):
        self.at = at
        self.calls = 0

    def __call__(self, step, input_ids, scores):
        self.calls += 1
        return step >= self.at


def test_stopping_criteria_list_stops_when_any_says_stop_and_asks_them_all():
    a, b = StopAtStep(5), StopAtStep(2)
    crit = StoppingCriteriaList([a, b])
    ids, scores = torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 10)
    assert not crit(1, ids, scores)
    assert crit(2, ids, scores)
    assert a.calls == b.calls == 2
    assert not StoppingCriteriaList()(0, ids, scores)
    with pytest.raises(NotImplementedError):
        StoppingCriteria()(0, ids, scores)


class AddToToken(LogitsProcessor):
    def __init__(self, token, value):
        self.token, self.value = token, value

    def __call__(self, step, input_ids, scores):
        scores[:, self.token] += self.value
        return scores


class DoubleAll(LogitsProcessor):
    def __call__(self, step, input_ids, scores):
        return scores * 2


def test_logits_processor_list_applies_processors_in_order():
    ids = torch.zeros(2, 3, dtype=torch.long)
    out = LogitsProcessorList([AddToToken(1, 1.0), DoubleAll()])(0, ids, torch.zeros(2, 4))
    assert out.tolist() == [[0, 2, 0, 0]] * 2
    out = LogitsProcessorList([DoubleAll(), AddToToken(1, 1.0)])(0, ids, torch.zeros(2, 4))
    assert out.tolist() == [[0, 1, 0, 0]] * 2


def test_logits_processor_returning_a_wrong_shape_is_named():
    class Bad(LogitsProcessor):
        def __call__(self, step, input_ids, scores):
            return scores[:, :2]

    with pytest.raises(ValueError, match=r"Bad returned \(2, 2\)"):
        LogitsProcessorList([Bad()])(0, torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 4))
