"""runtime_lib.tokenizer: loading, end/pad ids, word lists, and the incremental detokenizer's
contract: streamed deltas concatenate to exactly `decode(all_ids)`, whatever the chunking."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime_lib.demo import CORPUS, build_tokenizer
from runtime_lib.tokenizer import (
    REPLACEMENT_CHAR,
    Tokenizer,
    from_word_list_format,
    load_tokenizer,
    to_word_list_format,
)

CORPUS_LINES = [ln for ln in CORPUS.read_text(encoding="utf-8").splitlines() if ln.strip()]


def build_sentencepiece_like(out_dir: Path, metaspace: bool) -> Path:
    """A Llama-like tokenizer: BPE over "▁"-joined text with `byte_fallback` and the 256 `<0xNN>`
    byte tokens in the vocabulary, and an alphabet too small for CJK/emoji (they fall back to bytes).
    `metaspace=False` is Llama 2's decoder chain (Replace, ByteFallback, Fuse, Strip); True is the
    Metaspace pre-tokenizer with ByteFallback + Metaspace decoders."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = RustTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    if metaspace:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    else:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"],
                                  limit_alphabet=70, show_progress=False)
    tok.train([str(CORPUS)], trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    if metaspace:
        spec["decoder"] = {"type": "Sequence", "decoders": [
            {"type": "ByteFallback"},
            {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": True}]}
    else:
        spec["decoder"] = {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    rust = RustTokenizer.from_str(json.dumps(spec))
    fast = PreTrainedTokenizerFast(tokenizer_object=rust, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="module")
def bytelevel(tmp_path_factory) -> Tokenizer:
    out = tmp_path_factory.mktemp("tok-bytelevel")
    build_tokenizer(out)
    return load_tokenizer(out)


@pytest.fixture(scope="module")
def sp_strip(tmp_path_factory) -> Tokenizer:
    return load_tokenizer(build_sentencepiece_like(tmp_path_factory.mktemp("tok-sp"), metaspace=False))


@pytest.fixture(scope="module")
def sp_metaspace(tmp_path_factory) -> Tokenizer:
    return load_tokenizer(build_sentencepiece_like(tmp_path_factory.mktemp("tok-ms"), metaspace=True))


@pytest.fixture(params=["bytelevel", "sp_strip", "sp_metaspace"])
def any_tokenizer(request) -> Tokenizer:
    return request.getfixturevalue(request.param)


def stream(tok: Tokenizer, ids: list[int], chunks: list[int] | None = None,
           skip_special_tokens: bool = True) -> list[str]:
    """Feed `ids` in chunks of the given sizes (cycled; default one id at a time); return the deltas."""
    detok = tok.incremental(skip_special_tokens=skip_special_tokens)
    sizes = chunks or [1]
    deltas, pos, k = [], 0, 0
    while pos < len(ids):
        n = sizes[k % len(sizes)]
        deltas.append(detok.add(ids[pos:pos + n]))
        pos += n
        k += 1
    deltas.append(detok.finish())
    return deltas


# --- loading and ids ------------------------------------------------------------------------

def test_demo_tokenizer_ids_come_from_the_checkpoint(llama_dir):
    tok = load_tokenizer(llama_dir)
    assert (tok.end_id, tok.pad_id, tok.bos_id) == (2, 3, 1)
    assert tok.vocab_size == 400
    assert tok.special_ids == {0, 1, 2, 3}


def test_explicit_end_and_pad_ids_override_the_tokenizer(llama_dir):
    tok = load_tokenizer(llama_dir, end_id=7, pad_id=9)
    assert (tok.end_id, tok.pad_id) == (7, 9)


def test_end_id_falls_back_to_config_json_and_pad_to_end(tmp_path):
    from transformers import PreTrainedTokenizerFast

    build_tokenizer(tmp_path)
    hf = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    bare = tmp_path / "bare"
    PreTrainedTokenizerFast(tokenizer_object=hf.backend_tokenizer).save_pretrained(str(bare))
    (bare / "config.json").write_text(json.dumps({"eos_token_id": [5, 6]}))
    tok = load_tokenizer(bare)
    assert (tok.end_id, tok.pad_id) == (5, 5)


def test_missing_directory_names_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_dir"):
        load_tokenizer(tmp_path / "nope")


@pytest.mark.parametrize("line", CORPUS_LINES[:8])
def test_bytelevel_roundtrips_real_text(bytelevel, line):
    assert bytelevel.decode(bytelevel.encode(line)) == line


def test_sentencepiece_like_really_uses_byte_fallback_and_leading_spaces(sp_strip, sp_metaspace):
    for tok in (sp_strip, sp_metaspace):
        ids = tok.encode("Hi 🚀 東京", add_special_tokens=False)
        assert set(ids) & tok.byte_fallback_ids, "emoji/CJK should fall back to <0xNN> tokens"
        assert tok.decode(ids) == "Hi 🚀 東京"
        pieces = tok.hf.convert_ids_to_tokens(tok.encode("Hello world", add_special_tokens=False))
        assert any(p.startswith("▁") for p in pieces)


def test_encode_words_has_no_bos_and_drops_empty_words(sp_strip):
    words = sp_strip.encode_words(["world", b"fox", ""])
    assert len(words) == 2
    assert all(sp_strip.bos_id not in w for w in words)
    assert sp_strip.decode(words[0]) == "world"


# --- incremental detokenizer ------------------------------------------------------------------

@pytest.mark.parametrize("line", CORPUS_LINES)
def test_streaming_real_text_one_token_at_a_time(any_tokenizer, line):
    ids = any_tokenizer.encode(line, add_special_tokens=False)
    deltas = stream(any_tokenizer, ids)
    assert "".join(deltas) == any_tokenizer.decode(ids)
    # Split characters are held back, never streamed as replacement characters.
    assert not any(REPLACEMENT_CHAR in d for d in deltas) or REPLACEMENT_CHAR in line


def test_multibyte_character_is_held_until_complete(bytelevel):
    ids = bytelevel.encode("🚀", add_special_tokens=False)
    assert len(ids) > 1, "the demo vocabulary should split this emoji across tokens"
    detok = bytelevel.incremental()
    assert [detok.add([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1:]) == "🚀"
    assert detok.finish() == ""


def test_byte_fallback_run_is_held_until_it_ends(sp_strip):
    ids = sp_strip.encode("🚀 fox", add_special_tokens=False)
    run = [k for k, i in enumerate(ids) if i in sp_strip.byte_fallback_ids]
    assert len(run) == 4 and run == list(range(run[0], run[0] + 4)), "the rocket is 4 byte tokens"
    detok = sp_strip.incremental()
    deltas = [detok.add([i]) for i in ids]
    assert "".join(deltas[:run[-1] + 1]) == ""  # the run could still turn invalid
    assert deltas[run[-1] + 1].startswith("🚀")
    assert "".join(deltas) == "🚀 fox"
    assert detok.finish() == ""


def test_incomplete_character_at_the_end_is_flushed_as_decode_does(bytelevel):
    ids = bytelevel.encode("ok 🚀", add_special_tokens=False)[:-1]
    deltas = stream(bytelevel, ids)
    assert deltas[-1].endswith(REPLACEMENT_CHAR)
    assert "".join(deltas) == bytelevel.decode(ids)


def test_sentencepiece_leading_space_is_kept_between_tokens_and_stripped_at_start(sp_strip):
    ids = sp_strip.encode("fox fox fox", add_special_tokens=False)
    deltas = [d for d in stream(sp_strip, ids) if d]
    assert deltas[0].startswith("fox") and "".join(deltas) == "fox fox fox"


def test_special_tokens_are_skipped_or_kept_on_request(bytelevel):
    ids = bytelevel.encode("dog", add_special_tokens=False) + [bytelevel.end_id]
    assert "".join(stream(bytelevel, ids)) == "dog"
    assert "".join(stream(bytelevel, ids, skip_special_tokens=False)) == "dog</s>"


def test_add_after_finish_is_an_error(bytelevel):
    detok = bytelevel.incremental()
    detok.finish()
    with pytest.raises(RuntimeError):
        detok.add([5])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_ids_any_chunking_concatenate_to_decode(any_tokenizer, data):
    vocab = any_tokenizer.vocab_size
    # Bias toward byte tokens so split characters and invalid byte runs are common.
    byte_ids = sorted(any_tokenizer.byte_fallback_ids) or list(range(4, min(vocab, 260)))
    id_strategy = st.one_of(st.integers(0, vocab - 1), st.sampled_from(byte_ids))
    ids = data.draw(st.lists(id_strategy, max_size=40), label="ids")
    chunks = data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=4), label="chunks")
    skip = data.draw(st.booleans(), label="skip_special_tokens")
    assert "".join(stream(any_tokenizer, ids, chunks, skip)) == any_tokenizer.decode(ids, skip)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.sampled_from(sorted(set("".join(CORPUS_LINES)))), max_size=60))
def test_random_text_streams_back_to_itself(any_tokenizer, text):
    ids = any_tokenizer.encode(text, add_special_tokens=False)
    assert "".join(stream(any_tokenizer, ids)) == any_tokenizer.decode(ids)


# --- TensorRT-LLM word-list tensors ------------------------------------------------------------

def test_word_list_format_matches_tensorrt_llm_layout():
    arr = to_word_list_format([[[5, 6], [7]], [[9]]])
    assert arr.dtype == np.int32 and arr.shape == (2, 2, 3)
    assert arr[0].tolist() == [[5, 6, 7], [2, 3, -1]]
    assert arr[1].tolist() == [[9, 0, 0], [1, -1, -1]]
    assert from_word_list_format(arr[0]) == [[5, 6], [7]]
    assert from_word_list_format(arr[1:2]) == [[9]]


def test_empty_word_list_is_one_padding_column():
    arr = to_word_list_format([[]])
    assert arr.tolist() == [[[0], [-1]]]
    assert from_word_list_format(arr[0]) == []


@pytest.mark.parametrize("bad, match", [
    (np.zeros((3, 2), np.int32), r"stop_words_list must have shape \[2, L\]"),
    (np.array([[1, 2], [2, 1]], np.int32), "stop_words_list offsets must increase"),
    (np.array([[1, 2], [5, -1]], np.int32), "stop_words_list offsets"),
])
def test_malformed_word_list_names_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        from_word_list_format(bad)
