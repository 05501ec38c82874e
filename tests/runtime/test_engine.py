"""LLMEngine: in-flight batching gives every request exactly what it gets alone, frees every
block on finish / abort / preemption, and rejects what it cannot serve with a clear error."""
from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from runtime_lib.config import SamplingConfig
from runtime_lib.engine import EngineBusyError, EngineConfig, LLMEngine
from runtime_lib.model_runner import ModelRunner
from runtime_lib.session import Session

END, PAD = 2, 3


@pytest.fixture(scope="module")
def session(llama_dir) -> Session:
    return Session.from_dir(llama_dir, device="cpu")


def make_engine(session, llama_dir, **kw) -> LLMEngine:
    cfg = dict(model_dir=str(llama_dir), device="cpu", block_size=4, num_kv_blocks=256,
               max_num_batched_tokens=64)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg), session=session)


def sampling(i: int, max_new_tokens: int = 12, **kw) -> SamplingConfig:
    """Even rows greedy, odd rows seeded nucleus sampling."""
    if i % 2:
        kw = {"temperature": 0.9, "top_k": 0, "top_p": 0.9, "random_seed": 1000 + i, **kw}
    return SamplingConfig(end_id=END, pad_id=PAD, max_new_tokens=max_new_tokens, **kw)


def prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 400) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def collect(stream) -> tuple[list[int], str]:
    tokens, reason = [], None
    for out in stream:
        tokens += out.new_token_ids
        reason = out.finish_reason
    return tokens, reason


def assert_no_leak(engine: LLMEngine) -> None:
    deadline = time.monotonic() + 5
    while engine.stats().num_requests_active and time.monotonic() < deadline:
        time.sleep(0.01)
    st = engine.stats()
    assert st.num_requests_active == 0
    assert st.num_running == 0 and st.num_waiting == 0
    assert st.num_kv_blocks_free == st.num_kv_blocks_total, st
    assert all(engine.blocks.ref_count(b) == 0 for b in range(engine.blocks.num_blocks))


def test_concurrent_results_equal_results_alone_and_offline(session, llama_dir):
    """Tight pool + small token budget force chunked prefill, preemption and prefix reuse."""
    engine = make_engine(session, llama_dir, num_kv_blocks=40)
    runner = ModelRunner.from_engine(session)
    ps = prompts(12)
    try:
        streams = [engine.add_request(f"r{i}", p, sampling(i)) for i, p in enumerate(ps)]
        together = [collect(s) for s in streams]
        assert engine.stats().num_preempted_total > 0, "pool should be tight enough to preempt"
        for i, p in enumerate(ps):
            alone = collect(engine.add_request(f"alone{i}", p, sampling(i)))
            assert together[i] == alone
            out = runner.generate([torch.tensor(p)], sampling_config=sampling(i), output_sequence_lengths=True)
            n = int(out["sequence_lengths"][0, 0])
            assert together[i][0] == out["output_ids"][0, 0, len(p):n].tolist()
        assert_no_leak(engine)
    finally:
        engine.shutdown()


def test_prefix_cache_hit_on_repeated_prompt(session, llama_dir):
    engine = make_engine(session, llama_dir)
    p = prompts(1, seed=3, lo=30, hi=31)[0]
    try:
        first = collect(engine.add_request("a", p, sampling(0)))
        rate_before = engine.stats().prefix_cache_hit_rate
        second = collect(engine.add_request("b", p, sampling(0)))
        assert first == second
        assert engine.stats().prefix_cache_hit_rate > rate_before
        assert_no_leak(engine)
    finally:
        engine.shutdown()


def test_abort_midstream_frees_blocks_and_sends_final(session, llama_dir):
    engine = make_engine(session, llama_dir)
    try:
        got = []
        done = threading.Event()

        def on_output(out):
            got.append(out)
            if len(got) == 2:
                engine.abort("x")
            if out.finished:
                done.set()

        engine.add_request("x", prompts(1)[0], sampling(0, max_new_tokens=200, ignore_eos=True),
                           on_output=on_output)
        assert done.wait(10)
        assert got[-1].finished and got[-1].finish_reason == "abort"
        assert sum(len(o.new_token_ids) for o in got) < 200
        assert sum(o.finished for o in got) == 1
        assert_no_leak(engine)
    finally:
        engine.shutdown()


def test_cancel_storm_leaves_nothing_behind(session, llama_dir):
    """200 streams, half aborted at random times: the rest finish correctly."""
    engine = make_engine(session, llama_dir, num_kv_blocks=120, max_num_seqs=32)
    rng = random.Random(7)
    ps = prompts(200, seed=11, lo=2, hi=12)
    try:
        finals: dict[str, object] = {}
        tokens: dict[str, list[int]] = {f"s{i}": [] for i in range(200)}
        all_done = threading.Event()
        lock = threading.Lock()

        def on_output(out):
            with lock:
                tokens[out.request_id] += out.new_token_ids
                if out.finished:
                    assert out.request_id not in finals, "two final responses"
                    finals[out.request_id] = out
                    if len(finals) == 200:
                        all_done.set()

        for i, p in enumerate(ps):
            engine.add_request(f"s{i}", p, sampling(i, max_new_tokens=8), on_output=on_output)
        cancelled = rng.sample(range(200), 100)
        for i in cancelled:
            time.sleep(rng.random() * 0.002)
            engine.abort(f"s{i}")
        assert all_done.wait(120)
        kept = [i for i in range(200) if i not in set(cancelled)]
        for i in kept[:10]:  # spot-check survivors against a solo run
            if finals[f"s{i}"].finish_reason != "abort":
                assert tokens[f"s{i}"] == collect(engine.add_request(f"solo{i}", ps[i], sampling(i, 8)))[0]
        assert all(finals[f"s{i}"].finish_reason in ("stop", "length") for i in kept)
        assert_no_leak(engine)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_num_return_sequences_share_the_prompt(session, llama_dir, prefix_caching):
    """n > 1: the samples after the first reuse the prompt's computed blocks (each recomputes
    only the last prompt token), and sample i equals a lone request seeded seed + i."""
    engine = make_engine(session, llama_dir, enable_prefix_caching=prefix_caching)
    p = prompts(1, seed=5, lo=21, hi=22)[0]
    n, new = 3, 10
    try:
        outs = {}
        for out in engine.add_request("n", p, sampling(1, max_new_tokens=new, num_return_sequences=n,
                                                       ignore_eos=True)):
            outs.setdefault(out.sequence_index, []).extend(out.new_token_ids)
        assert sorted(outs) == [0, 1, 2]
        assert len({tuple(v) for v in outs.values()}) > 1, "samples with distinct seeds should differ"
        computed = engine.stats().num_computed_tokens_total
        # prompt once, one recomputed prompt token per extra sample, then one token per decode step
        assert computed <= len(p) + (n - 1) + n * (new - 1), computed
        seed = sampling(1).random_seed
        for i in range(n):
            solo = collect(engine.add_request(f"solo{i}", p, sampling(1, max_new_tokens=new, ignore_eos=True,
                                                                      random_seed=seed + i)))[0]
            assert outs[i] == solo
        assert_no_leak(engine)
    finally:
        engine.shutdown()


def test_fp8_kv_cache_batches_forks_and_preempts_like_the_full_precision_one(session, llama_dir):
    """kv_cache_dtype="fp8": the pool is e4m3 (1 byte a value). Concurrent requests under a tight
    pool (chunked prefill, preemption, prefix reuse) and an n=2 request (block copies) each get
    what they get alone from the same engine, and every block comes back."""
    engine = make_engine(session, llama_dir, num_kv_blocks=40, kv_cache_dtype="fp8")
    try:
        assert engine.kv_cache.dtype == torch.float8_e4m3fn and engine.kv_cache.element_size() == 1
        ps = prompts(8, seed=3)
        streams = [engine.add_request(f"r{i}", p, sampling(i)) for i, p in enumerate(ps)]
        together = [collect(s) for s in streams]
        assert engine.stats().num_preempted_total > 0
        for i, p in enumerate(ps):
            assert together[i] == collect(engine.add_request(f"alone{i}", p, sampling(i)))
        outs: dict[int, list[int]] = {}
        for out in engine.add_request("n", ps[0], sampling(1, max_new_tokens=6, num_return_sequences=2,
                                                           ignore_eos=True)):
            outs.setdefault(out.sequence_index, []).extend(out.new_token_ids)
        assert sorted(outs) == [0, 1] and all(len(v) == 6 for v in outs.values())
        assert_no_leak(engine)
    finally:
        engine.shutdown()


def test_kv_cache_dtype_is_validated():
    with pytest.raises(ValueError, match=r"kv_cache_dtype must be one of \['auto', 'fp8'\], got 'int4'"):
        EngineConfig(model_dir="x", kv_cache_dtype="int4")


def test_stop_words_never_reach_the_stream(session, llama_dir):
    engine = make_engine(session, llama_dir)
    p = prompts(1, seed=2)[0]
    try:
        free, _ = collect(engine.add_request("a", p, sampling(0, max_new_tokens=12)))
        stop = free[4:6]
        outs = list(engine.add_request("b", p, sampling(0, max_new_tokens=12, stop_words_list=[[stop]])))
        streamed = [t for o in outs for t in o.new_token_ids]
        assert streamed == free[:4]
        assert outs[-1].finish_reason == "stop"
        assert_no_leak(engine)
    finally:
        engine.shutdown()


def test_beam_request_runs_in_the_engine(session, llama_dir):
    engine = make_engine(session, llama_dir)
    runner = ModelRunner.from_engine(session)
    p = prompts(1, seed=9)[0]
    cfg = SamplingConfig(end_id=END, pad_id=PAD, max_new_tokens=8, num_beams=2, length_penalty=1.3)
    try:
        outs = list(engine.add_request("beam", p, cfg))
        ref = runner.generate([torch.tensor(p)], sampling_config=cfg, output_sequence_lengths=True)
        n = int(ref["sequence_lengths"][0, 0])
        assert outs[-1].finished
        assert outs[0].new_token_ids == ref["output_ids"][0, 0, len(p):n].tolist()
    finally:
        engine.shutdown()


def test_bad_requests_are_rejected_with_the_numbers(session, llama_dir):
    engine = make_engine(session, llama_dir, num_kv_blocks=8, max_queue_size=2)
    try:
        with pytest.raises(ValueError, match="empty"):
            engine.add_request("e", [], sampling(0))
        with pytest.raises(ValueError, match="outside the vocabulary"):
            engine.add_request("v", [5, 10_000], sampling(0))
        with pytest.raises(ValueError, match="max_seq_len"):
            engine.add_request("l", [5] * 10, sampling(0, max_new_tokens=10_000))
        with pytest.raises(ValueError, match="can never fit"):
            engine.add_request("big", [5] * 30, sampling(0, max_new_tokens=30))
        with pytest.raises(ValueError, match=r"top_p must be in \[0.0, 1.0\]"):
            engine.add_request("p", [5], sampling(0, top_p=1.5))
        with pytest.raises(ValueError, match="temperature"):
            engine.add_request("t", [5], sampling(0, temperature=-1.0))
        assert engine.is_healthy()
    finally:
        engine.shutdown()


def test_full_queue_says_busy(session, llama_dir):
    engine = make_engine(session, llama_dir, max_queue_size=1, max_num_seqs=1)
    try:
        streams = []
        with pytest.raises(EngineBusyError, match="busy"):
            for i in range(50):
                streams.append(engine.add_request(f"q{i}", [5, 6, 7], sampling(0, max_new_tokens=50,
                                                                                  ignore_eos=True)))
        for i in range(len(streams)):
            engine.abort(f"q{i}")
        assert_no_leak(engine)
    finally:
        engine.shutdown()


def test_detokenized_deltas_concatenate_to_the_decoded_output(session, llama_dir):
    """With a tokenizer attached, each output carries its text delta; streamed deltas (stop-word
    hold-back included) join to exactly the decoded tokens."""
    from runtime_lib.tokenizer import load_tokenizer

    tok = load_tokenizer(llama_dir)
    engine = make_engine(session, llama_dir)
    try:
        for i, prompt in enumerate(["Hello 東京 🙂", "Café naïve", "def hello(name):"]):
            ids = tok.encode(prompt)
            outs = list(engine.add_request(f"t{i}", ids, sampling(i, max_new_tokens=24), detokenize=True))
            tokens = [t for o in outs for t in o.new_token_ids]
            assert "".join(o.text for o in outs) == tok.decode(tokens)
        beam = SamplingConfig(end_id=END, pad_id=PAD, max_new_tokens=6, num_beams=2)
        (out,) = list(engine.add_request("beam", tok.encode("Once"), beam, detokenize=True))
        assert out.text == tok.decode(out.new_token_ids)
        assert_no_leak(engine)
    finally:
        engine.shutdown()


def test_cpu_kv_pool_is_capped_by_available_memory(session, llama_dir, monkeypatch):
    """A long-context model must not ask the CPU for more KV memory than the machine has."""
    import os

    page = os.sysconf("SC_PAGE_SIZE")
    monkeypatch.setattr(os, "sysconf", lambda name: page if name == "SC_PAGE_SIZE" else 64)  # 64 pages free
    engine = make_engine(session, llama_dir, num_kv_blocks=None, max_seq_len=512, max_num_seqs=64)
    try:
        mc = engine.model_config
        block_bytes = 2 * mc.num_layers * 4 * mc.num_kv_heads * mc.head_size * 4
        assert engine.blocks.num_blocks == max(1, int(64 * page * 0.9) // block_bytes)
        assert engine.blocks.num_blocks < 64 * (512 // 4)
    finally:
        engine.shutdown()


def test_freeze_gc_freezes_the_start_up_heap_until_shutdown(session, llama_dir):
    """A full collection then skips the model and whatever else start-up left alive; off by
    default on CPU, on by default on CUDA."""
    import gc

    assert gc.get_freeze_count() == 0
    plain = make_engine(session, llama_dir)
    assert gc.get_freeze_count() == 0           # CPU default: off
    plain.shutdown()
    engine = make_engine(session, llama_dir, freeze_gc=True)
    try:
        assert gc.get_freeze_count() > 0
        tokens, reason = collect(engine.add_request("r", prompts(1)[0], sampling(0, max_new_tokens=4)))
        assert len(tokens) == 4 and reason == "length"
    finally:
        engine.shutdown()
    assert gc.get_freeze_count() == 0
