"""CUDA-graph prefill and mixed steps (runtime_lib/prefill_graph.py): token buckets, the padding
sequence confined to the scratch block, state reset between steps of different sizes, Session
dispatch, the compiled prefill forward's parity with the model, and (on a GPU) graph replay
equal to the eager step.

On CPU the runner runs its padded static-buffer forward eagerly (`use_cuda_graph=False`): the
same buffers, padding and bucket logic a graph replays, minus the capture."""
from __future__ import annotations

import pytest
import torch

from runtime_lib.cuda_graph import DecodeGraphRunner
from runtime_lib.model_step import StepRow, build_step_inputs
from runtime_lib.models import allocate_kv_cache, load_model
from runtime_lib.prefill_graph import (
    PREFILL_TOKEN_BUCKETS,
    PrefillGraphRunner,
    llama_prefill_forward,
    make_compiled_prefill_forward,
    prefill_token_buckets,
)
from runtime_lib.session import Session, TorchBackend

BLOCK_SIZE = 4
NUM_BLOCKS = 32          # the last one is the scratch block
SCRATCH = NUM_BLOCKS - 1
PROMPTS = [[1, 17, 42, 99, 250, 7], [1, 300, 5, 5, 8, 120, 64, 33, 390], [1, 2, 3], [9, 8, 7, 6, 5]]
LIVE = [b for b in range(NUM_BLOCKS) if b != SCRATCH]

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ----------------------------------------------------------------------------- buckets
def test_token_buckets_stop_at_the_limit_which_is_always_a_bucket():
    assert prefill_token_buckets(2048) == PREFILL_TOKEN_BUCKETS
    assert prefill_token_buckets(100) == (16, 32, 64, 100)
    assert prefill_token_buckets(8) == (8,)
    assert prefill_token_buckets(4096)[-3:] == (1536, 2048, 4096)
    with pytest.raises(ValueError, match="max_num_tokens must be >= 1, got 0"):
        prefill_token_buckets(0)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model(llama_dir):
    return load_model(llama_dir, dtype="float32")


def block_tables() -> list[list[int]]:
    """Interleaved, non-contiguous blocks per sequence, never the scratch block; room to grow."""
    return [[1 + i + len(PROMPTS) * j for j in range(7)] for i in range(len(PROMPTS))]


def fresh_cache(model) -> torch.Tensor:
    kv = allocate_kv_cache(model.config, NUM_BLOCKS, BLOCK_SIZE)
    torch.manual_seed(0)
    kv[:, :, SCRATCH] = torch.randn_like(kv[:, :, SCRATCH])  # prove padding only ever writes slot 0
    return kv


def step_inputs(rows: list[StepRow]) -> dict:
    return build_step_inputs(rows, BLOCK_SIZE, "cpu")


def prompt_rows(which: list[int], start: int = 0, stop: int | None = None) -> list[StepRow]:
    """Prompt tokens [start, stop) of each listed sequence (a chunk when start > 0)."""
    tables = block_tables()
    return [StepRow(PROMPTS[i][start:stop], start, tables[i]) for i in which]


def decode_row(i: int, token: int) -> StepRow:
    return StepRow([token], len(PROMPTS[i]), block_tables()[i])


def eager_step(model, kv: torch.Tensor, inputs: dict) -> torch.Tensor:
    meta = Session._metadata({**inputs, "kv_cache": kv})
    return TorchBackend(model).forward(inputs["input_ids"], inputs["position_ids"], kv, meta,
                                       inputs["logits_indices"])


def runner_step(runner: PrefillGraphRunner, inputs: dict) -> torch.Tensor:
    return runner.run(inputs["input_ids"], inputs["position_ids"], inputs["slot_mapping"], inputs["query_lengths"],
                      inputs["sequence_lengths"], inputs["kv_cache_block_offsets"], inputs["logits_indices"])


def make_runner(model, kv, forward=None, max_num_seqs=4, max_seq_len=28, max_num_tokens=64) -> PrefillGraphRunner:
    return PrefillGraphRunner(forward or TorchBackend(model).forward, kv, max_num_seqs=max_num_seqs,
                              max_seq_len=max_seq_len, scratch_block=SCRATCH, max_num_tokens=max_num_tokens,
                              use_cuda_graph=False)


def assert_same_live_cache_and_scratch_slot_0_only(runner_kv, eager_kv):
    torch.testing.assert_close(runner_kv[:, :, LIVE], eager_kv[:, :, LIVE], rtol=1e-5, atol=1e-5)
    assert torch.equal(runner_kv[:, :, SCRATCH, 1:], eager_kv[:, :, SCRATCH, 1:])


# ----------------------------------------------------------------------------- padded runner
def test_padded_prefill_equals_the_eager_step_and_padding_touches_only_the_scratch_slot(model):
    eager_kv, runner_kv = fresh_cache(model), fresh_cache(model)
    inputs = step_inputs(prompt_rows([0, 1, 2, 3]))     # 23 tokens -> bucket 32: 9 padding tokens
    expected = eager_step(model, eager_kv, inputs)
    runner = make_runner(model, runner_kv)
    got = runner_step(runner, inputs)
    assert got.shape == expected.shape == (4, model.config.vocab_size)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert_same_live_cache_and_scratch_slot_0_only(runner_kv, eager_kv)
    assert not torch.equal(runner_kv[:, :, SCRATCH, 0], eager_kv[:, :, SCRATCH, 0])  # padding wrote there
    # Sequence slot 4 was the padding sequence: 9 tokens, context 9.
    assert runner.seq_lens[:, 4].tolist() == [9, 9]


def test_mixed_step_of_prefill_chunks_and_decode_tokens_equals_the_eager_step(model):
    eager_kv, runner_kv = fresh_cache(model), fresh_cache(model)
    runner = make_runner(model, runner_kv)
    first = step_inputs(prompt_rows([0, 2]) + prompt_rows([1], 0, 4))   # seq 1: first chunk of 4
    torch.testing.assert_close(runner_step(runner, first), eager_step(model, eager_kv, first), rtol=1e-5, atol=1e-5)
    # Decode tokens for 0 and 2, the rest of 1's prompt (a chunk over a cached prefix), 3's prompt.
    mixed = step_inputs([decode_row(0, 11), *prompt_rows([1], 4), decode_row(2, 12), *prompt_rows([3])])
    assert mixed["host_max_query_length"] == 5 and mixed["input_ids"].shape[0] == 12
    expected = eager_step(model, eager_kv, mixed)
    torch.testing.assert_close(runner_step(runner, mixed), expected, rtol=1e-5, atol=1e-5)
    assert_same_live_cache_and_scratch_slot_0_only(runner_kv, eager_kv)
    assert runner.num_replays == 2


def test_a_smaller_step_after_a_larger_one_returns_the_leftover_slots_to_padding(model):
    eager_kv, runner_kv = fresh_cache(model), fresh_cache(model)
    runner = make_runner(model, runner_kv)
    big = step_inputs(prompt_rows([0, 1, 2, 3]))        # 23 tokens, 4 sequences, bucket 32
    eager_step(model, eager_kv, big)
    runner_step(runner, big)
    small = step_inputs([decode_row(1, 21)])            # 1 token, 1 sequence, bucket 16
    expected = eager_step(model, eager_kv, small)
    torch.testing.assert_close(runner_step(runner, small), expected, rtol=1e-5, atol=1e-5)
    assert_same_live_cache_and_scratch_slot_0_only(runner_kv, eager_kv)
    # Token slots past the step are padding (a stale slot would rewrite a live block) ...
    assert runner.slot_mapping[1:23].tolist() == [SCRATCH * BLOCK_SIZE] * 22
    assert runner.input_ids[1:23].tolist() == [0] * 22 and runner.positions[1:23].tolist() == [0] * 22
    # ... sequence slot 1 is the padding sequence (15 tokens) with an all-scratch table, 2..4 empty.
    assert runner.seq_lens[:, 1:].tolist() == [[15, 0, 0, 0], [15, 0, 0, 0]]
    assert (runner.block_tables[1:] == SCRATCH).all()
    assert runner.logits_indices[1:].tolist() == [0, 0, 0]  # stale indices could overrun the bucket


def test_logits_for_a_subset_of_rows_come_back_in_the_requested_order(model):
    eager_kv, runner_kv = fresh_cache(model), fresh_cache(model)
    inputs = step_inputs(prompt_rows([0, 1, 2]))
    inputs["logits_indices"] = torch.tensor([17, 2, 5])  # last of seq 2, a middle token of 0, last of 0
    expected = eager_step(model, eager_kv, inputs)
    torch.testing.assert_close(runner_step(make_runner(model, runner_kv), inputs), expected, rtol=1e-5, atol=1e-5)


def test_steps_the_runner_was_not_built_for_are_refused(model):
    runner = make_runner(model, fresh_cache(model), max_num_seqs=2, max_seq_len=12, max_num_tokens=16)
    assert runner.buckets == (16,) and runner.max_blocks_per_seq == 4
    assert runner.can_run(16, 2, 12, 4, 2)
    assert not runner.can_run(17, 2, 12, 4, 2)   # more tokens than the largest bucket
    assert not runner.can_run(16, 3, 12, 4, 2)   # more sequences
    assert not runner.can_run(16, 2, 13, 4, 2)   # a longer context
    assert not runner.can_run(16, 2, 12, 5, 2)   # a wider block table
    assert not runner.can_run(16, 2, 12, 4, 3)   # more logits rows (context logits)
    assert not runner.can_run(0, 1, 12, 4, 0)
    with pytest.raises(ValueError, match="does not fit this runner"):
        runner_step(runner, step_inputs(prompt_rows([0, 1, 2])))


def test_steps_past_the_largest_bucket_run_unpadded_up_to_max_unpadded_tokens(model):
    """A step larger than every bucket runs the forward at its own size (no padding sequence)
    when it fits `max_unpadded_tokens`, and leaves later padded steps as they were."""
    eager_kv, runner_kv = fresh_cache(model), fresh_cache(model)
    runner = PrefillGraphRunner(TorchBackend(model).forward, runner_kv, max_num_seqs=4, max_seq_len=28,
                                scratch_block=SCRATCH, max_num_tokens=16, use_cuda_graph=False,
                                max_unpadded_tokens=24)
    assert runner.buckets == (16,) and runner.can_run(24, 4, 28, 7, 4) and not runner.can_run(25, 4, 28, 7, 4)
    big = step_inputs(prompt_rows([0, 1, 2, 3]))        # 23 tokens: past the bucket, unpadded
    torch.testing.assert_close(runner_step(runner, big), eager_step(model, eager_kv, big), rtol=1e-5, atol=1e-5)
    assert runner.seq_lens[:, 4].tolist() == [0, 0]     # no padding sequence
    assert torch.equal(runner_kv[:, :, SCRATCH], eager_kv[:, :, SCRATCH])  # nothing written to scratch
    small = step_inputs([decode_row(1, 21), decode_row(3, 22)])  # back to the padded bucket of 16
    torch.testing.assert_close(runner_step(runner, small), eager_step(model, eager_kv, small), rtol=1e-5, atol=1e-5)
    assert_same_live_cache_and_scratch_slot_0_only(runner_kv, eager_kv)
    with pytest.raises(ValueError, match="max_unpadded_tokens must be >= 0, got -1"):
        PrefillGraphRunner(TorchBackend(model).forward, runner_kv, max_num_seqs=4, max_seq_len=28,
                           scratch_block=SCRATCH, use_cuda_graph=False, max_unpadded_tokens=-1)


def test_runner_validates_its_arguments(model):
    kv = allocate_kv_cache(model.config, NUM_BLOCKS, BLOCK_SIZE)
    fwd = TorchBackend(model).forward
    with pytest.raises(ValueError, match=rf"scratch_block must be in \[0, {NUM_BLOCKS}\).*got {NUM_BLOCKS}"):
        PrefillGraphRunner(fwd, kv, max_num_seqs=4, max_seq_len=16, scratch_block=NUM_BLOCKS)
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1, got 0"):
        PrefillGraphRunner(fwd, kv, max_num_seqs=0, max_seq_len=16, scratch_block=0)
    with pytest.raises(ValueError, match="use_cuda_graph=True needs a CUDA kv_cache"):
        PrefillGraphRunner(fwd, kv, max_num_seqs=4, max_seq_len=16, scratch_block=0, use_cuda_graph=True)


# ----------------------------------------------------------------------------- Session dispatch
def test_session_sends_decode_steps_to_the_decode_runner_prefill_steps_to_the_token_runner_and_large_ones_eager(model):
    session = Session(TorchBackend(model), model.config)
    kv, eager_kv = fresh_cache(model), fresh_cache(model)
    decode = DecodeGraphRunner(TorchBackend(model).forward, kv, max_batch_size=4, max_seq_len=28,
                               scratch_block=SCRATCH, use_cuda_graph=False)
    prefill = make_runner(model, kv, max_num_tokens=16)
    # What enable_cuda_graphs registers on a GPU (it returns None on CPU): held weakly by decode runner.
    session._graph_runners[decode] = prefill
    assert session.prefill_graph_runner(kv) is prefill and session.prefill_graph_runner(eager_kv) is None
    steps = [step_inputs(prompt_rows([0, 1])),                # 15 tokens: token runner
             step_inputs(prompt_rows([2, 3])),                # 8 tokens: token runner
             step_inputs([decode_row(i, 30 + i) for i in range(4)])]  # decode-only: decode runner
    for inputs in steps:
        out: dict = {}
        session.run({**inputs, "kv_cache": kv}, out)
        torch.testing.assert_close(out["logits"], eager_step(model, eager_kv, inputs), rtol=1e-5, atol=1e-5)
    assert (prefill.num_replays, decode.num_replays) == (2, 1)
    # 23 tokens (the prompts again, recomputed): past the largest bucket, so eager.
    big = step_inputs(prompt_rows([0, 1, 2, 3]))
    out = {}
    session.run({**big, "kv_cache": kv}, out)
    torch.testing.assert_close(out["logits"], eager_step(model, eager_kv, big), rtol=1e-5, atol=1e-5)
    assert (prefill.num_replays, decode.num_replays) == (2, 1)
    session.disable_cuda_graphs(kv)
    assert session.prefill_graph_runner(kv) is None


# ----------------------------------------------------------------------------- compiled prefill
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_prefill_forward_written_for_dynamo_matches_the_model(make_checkpoint, family):
    model = load_model(make_checkpoint(family), dtype="float32")
    eager_kv, kv = fresh_cache(model), fresh_cache(model)
    first = step_inputs(prompt_rows([0, 2]) + prompt_rows([1], 0, 4))
    mixed = step_inputs([decode_row(0, 11), *prompt_rows([1], 4), decode_row(2, 12), *prompt_rows([3])])
    for inputs in (first, mixed):
        expected = eager_step(model, eager_kv, inputs)
        meta = Session._metadata({**inputs, "kv_cache": kv})
        with torch.no_grad():
            got = llama_prefill_forward(model, inputs["input_ids"], inputs["position_ids"], kv, meta.slot_mapping,
                                        meta.block_tables, meta.query_lens, meta.context_lens, meta.cu_query_lens,
                                        inputs["logits_indices"], 28)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kv, eager_kv, rtol=1e-5, atol=1e-5)  # the custom op wrote K/V in place


def test_compiled_prefill_in_the_runner_matches_eager_across_two_buckets(model):
    """torch.compile (aot_eager on CPU: tracing with a dynamic token count, the custom op and its
    in-place KV write) inside the padded runner, for a bucket of 32 then of 16."""
    torch._dynamo.reset()
    eager_kv, runner_kv = fresh_cache(model), fresh_cache(model)
    runner = make_runner(model, runner_kv, forward=make_compiled_prefill_forward(model, backend="aot_eager"))
    steps = [step_inputs(prompt_rows([0, 1, 2, 3])),
             step_inputs([decode_row(0, 5), decode_row(3, 6), decode_row(1, 7)])]
    for inputs in steps:
        expected = eager_step(model, eager_kv, inputs)
        torch.testing.assert_close(runner_step(runner, inputs), expected, rtol=1e-5, atol=1e-5)
    assert_same_live_cache_and_scratch_slot_0_only(runner_kv, eager_kv)


# ----------------------------------------------------------------------------- GPU
def _gpu_session_steps(llama_dir, compile_: bool, graph_tokens: int = 64, max_step_tokens: int = 0):
    model = load_model(llama_dir, device="cuda", dtype="float32")
    session = Session(TorchBackend(model), model.config)
    session.prefill_graph_max_tokens = graph_tokens
    kv = session.allocate_kv_cache(NUM_BLOCKS, BLOCK_SIZE)
    eager_kv = kv.clone()
    decode = session.enable_cuda_graphs(kv, max_batch_size=4, max_seq_len=28, scratch_block=SCRATCH,
                                        compile=compile_, max_step_tokens=max_step_tokens)
    prefill = session.prefill_graph_runner(kv)
    assert decode is not None and prefill is not None
    tables = block_tables()
    steps = [[StepRow(PROMPTS[0], 0, tables[0]), StepRow(PROMPTS[1][:4], 0, tables[1])],
             [StepRow([11], 6, tables[0]), StepRow(PROMPTS[1][4:], 4, tables[1]), StepRow(PROMPTS[2], 0, tables[2])],
             [StepRow([12], 7, tables[0]), StepRow([13], 9, tables[1]), StepRow([14], 3, tables[2])],
             [StepRow(PROMPTS[3], 0, tables[3]), StepRow([15], 8, tables[0])]]
    for rows in steps:
        inputs = build_step_inputs(rows, BLOCK_SIZE, "cuda")
        out: dict = {}
        session.run({**inputs, "kv_cache": kv}, out)
        expected = eager_step(model, eager_kv, inputs)
        torch.testing.assert_close(out["logits"], expected, rtol=1e-4, atol=1e-4)
    assert prefill.num_replays == 3 and decode.num_replays == 1
    # Prefill / mixed steps of 10, 9 and 6 tokens: all in bucket 16; with one bucket of 8, the
    # first two run unpadded and only the last replays a graph.
    assert prefill.captured_buckets == ((16,) if graph_tokens >= 16 else (8,))
    torch.testing.assert_close(kv[:, :, LIVE], eager_kv[:, :, LIVE], rtol=1e-4, atol=1e-4)


@needs_cuda
@pytest.mark.gpu
def test_session_replays_prefill_and_mixed_steps_from_graphs_with_the_eager_logits(llama_dir):
    _gpu_session_steps(llama_dir, compile_=False)


@needs_cuda
@pytest.mark.gpu
def test_compiled_prefill_graphs_give_the_eager_logits(llama_dir):
    torch._dynamo.reset()
    _gpu_session_steps(llama_dir, compile_=True)


@needs_cuda
@pytest.mark.gpu
def test_compiled_steps_past_the_largest_bucket_run_unpadded_with_the_eager_logits(llama_dir):
    torch._dynamo.reset()
    _gpu_session_steps(llama_dir, compile_=True, graph_tokens=8, max_step_tokens=64)
