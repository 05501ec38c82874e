"""CUDA-graph decode (runtime_lib/cuda_graph.py): bucket choice, padding rows confined to the
scratch block, the compiled decode forward's parity with the model, and (on a GPU) graph
replay through Session.run equal to the eager step.

On CPU the runner runs its padded static-buffer forward eagerly (`use_cuda_graph=False`): the
same buffers, padding and bucket logic a graph replays, minus the capture."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from runtime_lib.cuda_graph import (
    DecodeGraphRunner,
    choose_bucket,
    graph_batch_sizes,
    graph_unsupported_reason,
    llama_decode_forward,
    make_compiled_decode_forward,
    packed_rows,
    supports_compiled_decode,
)
from runtime_lib.model_step import StepRow, build_step_inputs
from runtime_lib.models import allocate_kv_cache, build_model, load_model
from runtime_lib.session import Session, TorchBackend

BLOCK_SIZE = 4
NUM_BLOCKS = 24          # the last one is the scratch block
SCRATCH = NUM_BLOCKS - 1
PROMPTS = [[1, 17, 42, 99, 250, 7], [1, 300, 5, 5, 8, 120, 64, 33, 390], [1, 2, 3], [9, 8, 7, 6, 5]]

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ----------------------------------------------------------------------------- buckets
def test_buckets_are_powers_of_two_up_to_the_max_batch_which_is_always_a_bucket():
    assert graph_batch_sizes(1) == (1,)
    assert graph_batch_sizes(64) == (1, 2, 4, 8, 16, 32, 64)
    assert graph_batch_sizes(100) == (1, 2, 4, 8, 16, 32, 64, 100)
    assert graph_batch_sizes(1000)[-2:] == (512, 1000)
    with pytest.raises(ValueError, match="max_batch_size must be >= 1, got 0"):
        graph_batch_sizes(0)


@pytest.mark.parametrize("rows, bucket", [(1, 1), (2, 2), (3, 4), (17, 32), (64, 64), (65, 100), (100, 100),
                                          (101, None)])
def test_a_batch_replays_the_smallest_bucket_that_holds_it(rows, bucket):
    assert choose_bucket(rows, graph_batch_sizes(100)) == bucket


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model(llama_dir):
    return load_model(llama_dir, dtype="float32")


def block_tables() -> list[list[int]]:
    """Interleaved, non-contiguous blocks per sequence, never the scratch block; room to grow."""
    return [[1 + i + len(PROMPTS) * j for j in range(5)] for i in range(len(PROMPTS))]


def prefilled_cache(model) -> torch.Tensor:
    cfg = model.config
    kv = allocate_kv_cache(cfg, NUM_BLOCKS, BLOCK_SIZE)
    torch.manual_seed(0)
    kv[:, :, SCRATCH] = torch.randn_like(kv[:, :, SCRATCH])  # prove padding only ever writes slot 0
    rows = [StepRow(p, 0, t) for p, t in zip(PROMPTS, block_tables())]
    inputs = build_step_inputs(rows, BLOCK_SIZE, "cpu")
    meta = Session._metadata({**inputs, "kv_cache": kv})
    TorchBackend(model).forward(inputs["input_ids"], inputs["position_ids"], kv, meta, inputs["logits_indices"])
    return kv


def decode_inputs(rows_idx: list[int], tokens: list[int], extra: int = 0) -> dict:
    """One decode token for each listed sequence, `extra` tokens after its prompt."""
    tables = block_tables()
    rows = [StepRow([tok], len(PROMPTS[i]) + extra, tables[i]) for i, tok in zip(rows_idx, tokens)]
    return build_step_inputs(rows, BLOCK_SIZE, "cpu")


def eager_decode(model, kv: torch.Tensor, inputs: dict) -> torch.Tensor:
    meta = Session._metadata({**inputs, "kv_cache": kv})
    return TorchBackend(model).forward(inputs["input_ids"], inputs["position_ids"], kv, meta,
                                       inputs["logits_indices"])


def runner_decode(runner: DecodeGraphRunner, inputs: dict) -> torch.Tensor:
    return runner.run(inputs["input_ids"], inputs["position_ids"], inputs["slot_mapping"],
                      inputs["sequence_lengths"], inputs["kv_cache_block_offsets"], inputs["logits_indices"])


def make_runner(model, kv, forward=None, max_batch_size=8, max_seq_len=64) -> DecodeGraphRunner:
    return DecodeGraphRunner(forward or TorchBackend(model).forward, kv, max_batch_size=max_batch_size,
                             max_seq_len=max_seq_len, scratch_block=SCRATCH, use_cuda_graph=False)


# ----------------------------------------------------------------------------- padded runner
def test_padded_bucket_step_equals_the_eager_step_and_padding_touches_only_the_scratch_slot(model):
    eager_kv, runner_kv = prefilled_cache(model), prefilled_cache(model)
    inputs = decode_inputs([0, 1, 3], [5, 6, 7])   # 3 rows -> bucket 4: one padding row
    expected = eager_decode(model, eager_kv, inputs)
    runner = make_runner(model, runner_kv)
    got = runner_decode(runner, inputs)
    assert got.shape == expected.shape == (3, model.config.vocab_size)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    live = [b for b in range(NUM_BLOCKS) if b != SCRATCH]
    # Same writes to live blocks (layer >= 1 K/V differ by rounding: attention over a padded width).
    torch.testing.assert_close(runner_kv[:, :, live], eager_kv[:, :, live], rtol=1e-5, atol=1e-5)
    # The padding row wrote slot 0 of the scratch block and nothing else there.
    assert torch.equal(runner_kv[:, :, SCRATCH, 1:], eager_kv[:, :, SCRATCH, 1:])
    assert not torch.equal(runner_kv[:, :, SCRATCH, 0], eager_kv[:, :, SCRATCH, 0])


def test_a_smaller_batch_after_a_larger_one_resets_the_rows_it_no_longer_uses(model):
    eager_kv, runner_kv = prefilled_cache(model), prefilled_cache(model)
    runner = make_runner(model, runner_kv)
    big = decode_inputs([0, 1, 2, 3], [11, 12, 13, 14])
    eager_decode(model, eager_kv, big)
    runner_decode(runner, big)
    small = decode_inputs([2], [21], extra=1)       # only sequence 2, one token later
    expected = eager_decode(model, eager_kv, small)
    got = runner_decode(runner, small)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Rows 1..3 are padding again: a stale row would have rewritten sequence 1/3's slot.
    live = [b for b in range(NUM_BLOCKS) if b != SCRATCH]
    torch.testing.assert_close(runner_kv[:, :, live], eager_kv[:, :, live], rtol=1e-5, atol=1e-5)
    assert runner.context_lens[1:4].tolist() == [1, 1, 1]
    assert runner.slot_mapping[1:4].tolist() == [SCRATCH * BLOCK_SIZE] * 3


def test_packed_int64_inputs_are_recognised_only_as_consecutive_runs_of_one_buffer():
    buf = torch.arange(12)
    ids, pos, slots = buf[0:3], buf[3:6], buf[6:9]
    assert torch.equal(packed_rows(3, ids, pos, slots), buf[:9].view(3, 3))
    assert packed_rows(3, ids, slots, pos) is None                  # out of order
    assert packed_rows(3, ids, pos, torch.arange(6, 9)) is None       # another buffer
    assert packed_rows(3, buf[0:3], buf[4:7]) is None                 # a gap
    assert packed_rows(3, ids.int(), pos.int()) is None               # not int64


def test_a_step_packed_as_build_step_inputs_lays_it_out_on_cuda_lands_with_the_same_result(model):
    """The one-copy path for packed inputs: a (4, B) int64 buffer of ids, positions, slots and
    logits indices gives what separate tensors give."""
    eager_kv, runner_kv = prefilled_cache(model), prefilled_cache(model)
    inputs = decode_inputs([0, 1, 3], [5, 6, 7])
    expected = eager_decode(model, eager_kv, inputs)
    packed = torch.stack([inputs["input_ids"], inputs["position_ids"], inputs["slot_mapping"],
                          inputs["logits_indices"]]).reshape(-1)
    ids, pos, slots, logits = packed.view(4, 3).unbind(0)
    assert packed_rows(3, ids, pos, slots, logits) is not None
    runner = make_runner(model, runner_kv)
    got = runner.run(ids, pos, slots, inputs["sequence_lengths"], inputs["kv_cache_block_offsets"], logits)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert runner.slot_mapping[3].item() == SCRATCH * BLOCK_SIZE    # the padding row of bucket 4


def test_logits_for_a_subset_of_rows_come_back_in_the_requested_order(model):
    eager_kv, runner_kv = prefilled_cache(model), prefilled_cache(model)
    inputs = decode_inputs([0, 1, 2], [5, 6, 7])
    inputs["logits_indices"] = torch.tensor([2, 0])
    expected = eager_decode(model, eager_kv, inputs)
    got = runner_decode(make_runner(model, runner_kv), inputs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_short_steps_of_few_rows_run_with_the_short_context_bound(model):
    """`short_context=(rows, length)`: the forward sees `length` as max_context_len for steps of
    at most `rows` rows whose longest context fits it, the runner's max_seq_len otherwise."""
    kv = prefilled_cache(model)
    backend, bounds = TorchBackend(model), []

    def forward(input_ids, positions, kv_cache, meta, logits_indices):
        bounds.append(meta.max_context_len)
        return backend.forward(input_ids, positions, kv_cache, meta, logits_indices)

    runner = DecodeGraphRunner(forward, kv, max_batch_size=4, max_seq_len=64, scratch_block=SCRATCH,
                               use_cuda_graph=False, short_context=(1, 16))
    one = decode_inputs([2], [21])
    runner.run(*(one[k] for k in ("input_ids", "position_ids", "slot_mapping", "sequence_lengths",
                                  "kv_cache_block_offsets", "logits_indices")), max_context_len=16)
    runner.run(*(one[k] for k in ("input_ids", "position_ids", "slot_mapping", "sequence_lengths",
                                  "kv_cache_block_offsets", "logits_indices")), max_context_len=17)
    runner_decode(runner, one)                           # no bound given: the runner's max_seq_len
    runner_decode(runner, decode_inputs([0, 1], [5, 6]))  # two rows
    assert bounds == [16, 64, 64, 64]
    assert DecodeGraphRunner(forward, kv, max_batch_size=4, max_seq_len=16, scratch_block=SCRATCH,
                             use_cuda_graph=False, short_context=(1, 16)).short_context is None
    with pytest.raises(ValueError, match=r"short_context must be \(rows >= 1, length >= 1\)"):
        DecodeGraphRunner(forward, kv, max_batch_size=4, max_seq_len=64, scratch_block=SCRATCH,
                          use_cuda_graph=False, short_context=(0, 16))


def test_runner_refuses_batches_and_tables_it_was_not_built_for(model):
    kv = prefilled_cache(model)
    runner = make_runner(model, kv, max_batch_size=2, max_seq_len=8)
    assert runner.can_run(2, 8, 2) and not runner.can_run(3, 8, 2) and not runner.can_run(1, 9, 2)
    with pytest.raises(ValueError, match="does not fit this runner"):
        runner_decode(runner, decode_inputs([0, 1, 2], [1, 2, 3]))


def test_runner_validates_the_scratch_block_and_the_device(model):
    kv = allocate_kv_cache(model.config, NUM_BLOCKS, BLOCK_SIZE)
    fwd = TorchBackend(model).forward
    with pytest.raises(ValueError, match=rf"scratch_block must be in \[0, {NUM_BLOCKS}\).*got {NUM_BLOCKS}"):
        DecodeGraphRunner(fwd, kv, max_batch_size=4, max_seq_len=16, scratch_block=NUM_BLOCKS)
    with pytest.raises(ValueError, match="use_cuda_graph=True needs a CUDA kv_cache"):
        DecodeGraphRunner(fwd, kv, max_batch_size=4, max_seq_len=16, scratch_block=0, use_cuda_graph=True)


def test_session_without_cuda_runs_eagerly_and_enables_no_graphs(model):
    session = Session(TorchBackend(model), model.config)
    kv = allocate_kv_cache(model.config, NUM_BLOCKS, BLOCK_SIZE)
    assert session.enable_cuda_graphs(kv, max_batch_size=4, max_seq_len=32, scratch_block=SCRATCH) is None


def test_dynamic_ntk_rope_is_not_captured(model):
    config = dataclasses.replace(model.config, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    dyn = build_model(config, model.state_dict())
    assert graph_unsupported_reason(model) is None
    assert "dynamic" in graph_unsupported_reason(dyn)
    assert not supports_compiled_decode(dyn)


# ----------------------------------------------------------------------------- compiled decode
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_decode_forward_written_for_dynamo_matches_the_model(make_checkpoint, family):
    model = load_model(make_checkpoint(family), dtype="float32")
    eager_kv, kv = prefilled_cache(model), prefilled_cache(model)
    inputs = decode_inputs([0, 1, 3], [5, 6, 7])
    expected = eager_decode(model, eager_kv, inputs)
    meta = Session._metadata({**inputs, "kv_cache": kv})
    with torch.no_grad():
        got = llama_decode_forward(model, inputs["input_ids"], inputs["position_ids"], kv, meta.slot_mapping,
                                   meta.block_tables, meta.context_lens, torch.ones(3, dtype=torch.int32),
                                   torch.arange(4, dtype=torch.int32), inputs["logits_indices"], 64)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kv, eager_kv, rtol=1e-5, atol=1e-5)  # the custom op wrote K/V in place
    assert not torch.equal(kv, prefilled_cache(model))


def test_compiled_decode_in_the_runner_matches_eager_across_two_buckets(model):
    """torch.compile (aot_eager on CPU: tracing, the custom op and its in-place KV write) inside
    the padded runner, for a bucket of 4 then of 1."""
    torch._dynamo.reset()
    eager_kv, runner_kv = prefilled_cache(model), prefilled_cache(model)
    runner = make_runner(model, runner_kv, forward=make_compiled_decode_forward(model, backend="aot_eager"))
    for rows_idx, toks, extra in (([0, 1, 3], [5, 6, 7], 0), ([2], [9], 0)):
        inputs = decode_inputs(rows_idx, toks, extra)
        expected = eager_decode(model, eager_kv, inputs)
        torch.testing.assert_close(runner_decode(runner, inputs), expected, rtol=1e-5, atol=1e-5)
    live = [b for b in range(NUM_BLOCKS) if b != SCRATCH]
    torch.testing.assert_close(runner_kv[:, :, live], eager_kv[:, :, live], rtol=1e-5, atol=1e-5)


def test_compiled_decode_compiles_once_for_one_row_and_once_for_every_larger_bucket(model):
    """Dynamo traces the step twice (one row; any larger batch, the row dimension dynamic), not
    once per bucket: a recompile would stall serving for the length of a compile."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    forward = make_compiled_decode_forward(model, backend="aot_eager")
    runner = make_runner(model, prefilled_cache(model), forward=forward)
    for rows_idx in ([0, 1, 3], [2], [0, 1], [0, 1, 2, 3], [1, 2, 3]):      # buckets 4, 1, 2, 4, 4
        runner_decode(runner, decode_inputs(rows_idx, [5] * len(rows_idx)))
    assert counters["stats"]["unique_graphs"] == 2


# ----------------------------------------------------------------------------- GPU
@needs_cuda
@pytest.mark.gpu
def test_session_replays_graphs_for_decode_steps_with_the_eager_logits(llama_dir):
    model = load_model(llama_dir, device="cuda", dtype="float32")
    session = Session(TorchBackend(model), model.config)
    kv = session.allocate_kv_cache(NUM_BLOCKS, BLOCK_SIZE)
    tables = block_tables()
    prefill = build_step_inputs([StepRow(p, 0, t) for p, t in zip(PROMPTS, tables)], BLOCK_SIZE, "cuda")
    session.run({**prefill, "kv_cache": kv}, {})
    eager_kv = kv.clone()
    runner = session.enable_cuda_graphs(kv, max_batch_size=8, max_seq_len=20, scratch_block=SCRATCH)
    assert runner is not None
    for extra in range(3):
        inputs = build_step_inputs([StepRow([5 + i], len(p) + extra, tables[i]) for i, p in enumerate(PROMPTS[:3])],
                                   BLOCK_SIZE, "cuda")
        out: dict = {}
        session.run({**inputs, "kv_cache": kv}, out)
        expected = eager_decode(model, eager_kv, inputs)
        torch.testing.assert_close(out["logits"], expected, rtol=1e-4, atol=1e-4)
    assert runner.num_replays == 3 and runner.captured_batch_sizes == (4,)
    live = [b for b in range(NUM_BLOCKS) if b != SCRATCH]
    torch.testing.assert_close(kv[:, :, live], eager_kv[:, :, live])


@needs_cuda
@pytest.mark.gpu
def test_generate_with_graphs_equals_generate_without(llama_dir):
    from runtime_lib.model_runner import ModelRunner

    prompts = [torch.tensor(p) for p in PROMPTS]
    runner = ModelRunner.from_dir(llama_dir, device="cuda", dtype="float32")
    with_graphs = runner.generate(prompts, max_new_tokens=12, end_id=2, pad_id=3)
    assert runner.session._graph_runner is not None and runner.session._graph_runner.num_replays > 0
    runner.session.cuda_graphs = False
    runner.session._graph_runner = None
    runner.session.runtime.disable_cuda_graphs()
    without = runner.generate(prompts, max_new_tokens=12, end_id=2, pad_id=3)
    assert torch.equal(with_graphs, without)
