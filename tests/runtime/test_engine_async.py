"""Asynchronous scheduling in LLMEngine: preparing step t+1 before step t's tokens reach the
host changes nothing a client sees (same tokens, stops, log probs, finish reasons, counts as
synchronous stepping), never leaks a placeholder token, and costs no extra step for a
length-capped request. Plus `build_step_inputs`' device-side token feed."""
from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from runtime_lib.config import SamplingConfig
from runtime_lib.engine import EngineConfig, LLMEngine
from runtime_lib.model_step import StepRow, build_step_inputs
from runtime_lib.session import Session

END, PAD = 2, 3


def prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 400) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def assert_no_leak(engine: LLMEngine) -> None:
    deadline = time.monotonic() + 5
    while engine.stats().num_requests_active and time.monotonic() < deadline:
        time.sleep(0.01)
    st = engine.stats()
    assert st.num_requests_active == 0 and st.num_running == 0 and st.num_waiting == 0
    assert st.num_kv_blocks_free == st.num_kv_blocks_total, st


@pytest.fixture(scope="module")
def session(llama_dir) -> Session:
    return Session.from_dir(llama_dir, device="cpu")


def make_engine(session, llama_dir, async_scheduling: bool, **kw) -> LLMEngine:
    cfg = dict(model_dir=str(llama_dir), device="cpu", block_size=4, num_kv_blocks=256,
               max_num_batched_tokens=64, async_scheduling=async_scheduling)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg), session=session)


def run_all(engine: LLMEngine, requests: list[tuple[list[int], SamplingConfig]]) -> list[dict]:
    """Submit all at once; per request (and sequence index): tokens, log probs, finish info."""
    results: list[dict] = [dict() for _ in requests]
    left = [sum(cfg.num_return_sequences or 1 for _, cfg in requests)]
    done = threading.Event()
    lock = threading.Lock()

    def callback(i):
        def on_output(out):
            with lock:
                r = results[i].setdefault(out.sequence_index, {"tokens": [], "lps": [], "n_finals": 0})
                r["tokens"] += out.new_token_ids
                r["lps"] += out.new_log_probs or []
                if out.finished:
                    r.update(n_finals=r["n_finals"] + 1, reason=out.finish_reason, n_out=out.num_output_tokens,
                             cum=None if out.cum_log_prob is None else round(out.cum_log_prob, 4))
                    left[0] -= 1
                    if not left[0]:
                        done.set()
        return on_output

    for i, (p, cfg) in enumerate(requests):
        engine.add_request(f"q{i}", p, cfg, on_output=callback(i))
    assert done.wait(60)
    for r in results:
        for seq in r.values():
            assert seq["n_finals"] == 1, "exactly one final output per sequence"
            assert seq["n_out"] == len(seq["tokens"]), "num_output_tokens counts what was streamed"
            assert all(t >= 0 for t in seq["tokens"]), "a placeholder leaked"
            seq["lps"] = [round(x, 4) for x in seq["lps"]]
    return results


def mixed_requests(stop_token: int) -> list[tuple[list[int], SamplingConfig]]:
    """Greedy, seeded sampling, penalties (host history), stop words, an end id that fires
    early, min_length, n > 1 and log probs, in one batch."""
    ps = prompts(10, seed=21)
    base = dict(end_id=END, pad_id=PAD, max_new_tokens=10)
    cfgs = [
        SamplingConfig(**base),
        SamplingConfig(**base, temperature=0.8, top_k=20, random_seed=5),
        SamplingConfig(**base, repetition_penalty=1.3, presence_penalty=0.5),
        SamplingConfig(**{**base, "end_id": stop_token}),
        SamplingConfig(**{**base, "end_id": stop_token}, min_length=6),
        SamplingConfig(**base, temperature=0.9, top_p=0.9, top_k=0, random_seed=9, num_return_sequences=3),
        SamplingConfig(**base, output_log_probs=True, output_cum_log_probs=True),
        SamplingConfig(**base, no_repeat_ngram_size=2, temperature=0.7, top_k=5, random_seed=3),
        SamplingConfig(**{**base, "max_new_tokens": 1}),
        SamplingConfig(**base, stop_words_list=[[[stop_token]]]),
    ]
    for i in (3, 4, 9):  # the prompt whose greedy continuation holds `stop_token`
        ps[i] = ps[0]
    return list(zip(ps, cfgs))


def test_async_equals_sync_on_a_mixed_batch(session, llama_dir):
    free = run_all(make_engine(session, llama_dir, False), [(prompts(1, seed=21)[0],
                                                            SamplingConfig(end_id=END, pad_id=PAD, max_new_tokens=10))])
    stop_token = free[0][0]["tokens"][3]  # fires mid-stream for request 3: its stop is seen a step late
    results = {}
    for mode in (False, True):
        engine = make_engine(session, llama_dir, mode)
        try:
            results[mode] = run_all(engine, mixed_requests(stop_token))
            assert_no_leak(engine)
        finally:
            engine.shutdown()
    assert results[True] == results[False]
    at = free[0][0]["tokens"].index(stop_token)
    assert results[True][3][0]["reason"] == "stop" and results[True][3][0]["tokens"] == free[0][0]["tokens"][:at + 1]
    assert results[True][9][0]["reason"] == "stop" and results[True][9][0]["tokens"] == free[0][0]["tokens"][:at]


def test_async_equals_sync_under_preemption_and_chunked_prefill(session, llama_dir):
    """A tight pool preempts sequences that hold a placeholder; they recompute correctly."""
    reqs = [(p, SamplingConfig(end_id=END, pad_id=PAD, max_new_tokens=12, **(
        {"temperature": 0.9, "top_k": 0, "top_p": 0.9, "random_seed": 100 + i} if i % 2 else {})))
        for i, p in enumerate(prompts(12))]
    results = {}
    for mode in (False, True):
        engine = make_engine(session, llama_dir, mode, num_kv_blocks=40)
        try:
            results[mode] = run_all(engine, reqs)
            assert engine.stats().num_preempted_total > 0, "pool should be tight enough to preempt"
            assert_no_leak(engine)
        finally:
            engine.shutdown()
    assert results[True] == results[False]


def test_length_capped_request_takes_no_extra_step(session, llama_dir):
    """The step count of a lone request is the same in both modes: a row whose next token
    reaches max_tokens gets no placeholder and is not scheduled again."""
    steps = {}
    for mode in (False, True):
        engine = make_engine(session, llama_dir, mode)
        try:
            run_all(engine, [(prompts(1, seed=4)[0], SamplingConfig(end_id=-1, pad_id=PAD, max_new_tokens=7))])
            steps[mode] = engine.stats().num_steps_total
        finally:
            engine.shutdown()
    assert steps[True] == steps[False] == 7


def test_abort_while_a_placeholder_is_pending(session, llama_dir):
    """Aborting from the output callback (a step is always in flight then) sends one final
    output, no placeholder, and frees every block."""
    engine = make_engine(session, llama_dir, True)
    try:
        got, done = [], threading.Event()

        def on_output(out):
            got.append(out)
            if len(got) == 3:
                engine.abort("x")
            if out.finished:
                done.set()

        engine.add_request("x", prompts(1)[0], SamplingConfig(end_id=-1, pad_id=PAD, max_new_tokens=200),
                           on_output=on_output)
        assert done.wait(10)
        assert [o.finished for o in got].count(True) == 1 and got[-1].finish_reason == "abort"
        assert all(t >= 0 for o in got for t in o.new_token_ids)
        assert got[-1].num_output_tokens <= 200
        assert_no_leak(engine)
    finally:
        engine.shutdown()


def test_feed_index_takes_the_token_from_the_device():
    feed = torch.tensor([70, 71, 72])
    rows = [StepRow([5, 6, 7], 0, [0]), StepRow([-1], 5, [1, 2], feed_index=2),
            StepRow([-1], 3, [3], feed_index=0)]
    inputs = build_step_inputs(rows, 4, "cpu", feed_tokens=feed)
    assert inputs["input_ids"].tolist() == [5, 6, 7, 72, 70]
    assert inputs["position_ids"].tolist() == [0, 1, 2, 5, 3]
    with pytest.raises(ValueError, match="feed_tokens is None"):
        build_step_inputs(rows, 4, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("feeds", [(2, 0), (0, 1)])   # scattered, then a run (one copy)
def test_cuda_step_inputs_in_one_pinned_buffer_equal_the_cpu_ones(feeds):
    from runtime_lib.cuda_graph import packed_rows

    feed = torch.tensor([70, 71, 72])
    decode = [StepRow([-1], 5, [1, 2], feed_index=feeds[0]), StepRow([-1], 3, [3], feed_index=feeds[1])]
    for rows in ([StepRow([5, 6, 7], 0, [0]), *decode], decode):
        cpu = build_step_inputs(rows, 4, "cpu", feed_tokens=feed)
        gpu = build_step_inputs(rows, 4, "cuda", feed_tokens=feed.cuda())
        for name, value in cpu.items():
            got = gpu[name].cpu() if isinstance(value, torch.Tensor) else gpu[name]
            assert torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value, name
    # A decode step's int64 fields are one packed (4, B) block: the graph runner's one copy.
    assert packed_rows(2, gpu["input_ids"], gpu["position_ids"], gpu["slot_mapping"],
                       gpu["logits_indices"]) is not None
