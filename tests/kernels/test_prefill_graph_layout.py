"""The padded step layout that CUDA-graph prefill replays (runtime_lib/prefill_graph.py) gives the
Triton kernels the same answer for the real tokens as the unpadded step.

A bucket fixes the launch grids, so the kernels see: the real sequences, then one padding
sequence (the bucket's leftover tokens, context = its own tokens, every block-table entry the
scratch block), then empty sequences (0 query tokens, 0 context); `max_query_len` is the
bucket and `max_context_len` the runner's bound, both larger than the step needs. Run on CPU
under TRITON_INTERPRET=1 (conftest.py). The cache is NaN outside every real context (the
scratch block holds finite values, as it does in a live pool), so one stray read shows.
"""
from __future__ import annotations

import pytest
import torch

from runtime_lib.layers.attention import AttentionMetadata, paged_attention_torch

BLOCK_SIZE = 16
NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE = 8, 2, 32


def padded_step(query_lens: list[int], context_lens: list[int], bucket: int, num_seq_slots: int,
                max_context_len: int, seed: int = 0):
    """(real metadata, padded metadata, q (bucket, h, d), clean kv, poisoned kv)."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-c // BLOCK_SIZE) for c in context_lens]
    num_blocks = sum(blocks_per_seq) + 2            # + block 0 (padding of tables) + the scratch block
    scratch = num_blocks - 1
    order = (torch.randperm(num_blocks - 2, generator=gen) + 1).tolist()
    tables, used = [], 0
    for n in blocks_per_seq:
        tables.append(order[used:used + n])
        used += n
    kv_clean = torch.zeros(2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE)
    kv_poisoned = torch.full_like(kv_clean, float("nan"))
    for table, ctx in zip(tables, context_lens):
        for pos in range(ctx):
            block, slot = table[pos // BLOCK_SIZE], pos % BLOCK_SIZE
            kv_clean[:, block, slot] = torch.randn(2, NUM_KV_HEADS, HEAD_SIZE, generator=gen)
            kv_poisoned[:, block, slot] = kv_clean[:, block, slot]
    kv_poisoned[:, scratch] = torch.randn(2, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE, generator=gen)
    real = AttentionMetadata.build(query_lens, context_lens, tables, BLOCK_SIZE)

    num_tokens, num_seqs = sum(query_lens), len(query_lens)
    pad = bucket - num_tokens
    width = -(-max_context_len // BLOCK_SIZE)
    block_tables = torch.full((num_seq_slots, width), scratch, dtype=torch.int32)
    for i, t in enumerate(tables):
        block_tables[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
    q_lens = torch.zeros(num_seq_slots, dtype=torch.int32)
    ctx = torch.zeros(num_seq_slots, dtype=torch.int32)
    q_lens[:num_seqs], ctx[:num_seqs] = real.query_lens, real.context_lens
    q_lens[num_seqs], ctx[num_seqs] = pad, pad
    cu = torch.nn.functional.pad(torch.cumsum(q_lens, 0, dtype=torch.int32), (1, 0))
    padded = AttentionMetadata(query_lens=q_lens, context_lens=ctx, block_tables=block_tables,
                               slot_mapping=torch.zeros(bucket, dtype=torch.int64), max_query_len=bucket,
                               max_context_len=max_context_len, cu_query_lens=cu, is_decode=False)
    q = torch.randn(bucket, NUM_HEADS, HEAD_SIZE, generator=gen)
    return real, padded, q, kv_clean, kv_poisoned


@pytest.mark.parametrize("query_lens,context_lens,bucket", [
    ([1, 12, 1, 5], [33, 20, 3, 5], 32),       # mixed: decode rows, a chunk over a prefix, a prompt
    ([17], [17], 32),                          # one prompt, 15 padding tokens
    ([16], [16 + 40], 16),                     # a chunk that fills its bucket: empty padding sequence
    ([1, 1, 1], [70, 2, 40], 16),              # decode rows only, through the mixed path
])
@pytest.mark.parametrize("max_partition_size", [2048, 32])   # one decode pass / split-K partials + reduce
def test_padded_layout_gives_the_real_tokens_the_unpadded_answer(kernels, query_lens, context_lens, bucket,
                                                                 max_partition_size):
    real, padded, q, kv_clean, kv_poisoned = padded_step(query_lens, context_lens, bucket, num_seq_slots=8,
                                                         max_context_len=128)
    T = sum(query_lens)
    scale = HEAD_SIZE ** -0.5
    out = kernels.varlen(q, kv_poisoned, padded.block_tables, padded.context_lens, padded.cu_query_lens,
                         padded.max_query_len, scale, max_context_len=padded.max_context_len,
                         decode_tuning=kernels.DecodeTuning(max_partition_size=max_partition_size))
    assert out.shape == q.shape
    assert torch.isfinite(out).all(), "a kernel read a slot outside a context, or left a token unwritten"
    expected = paged_attention_torch(q[:T], kv_clean, real, scale)
    torch.testing.assert_close(out[:T], expected, atol=2e-5, rtol=2e-5)


def test_dispatch_with_the_padded_metadata_matches_the_torch_path_on_it(kernels):
    """What `paged_attention` runs on CUDA for the runner's metadata, against the torch path the
    CPU runner runs on the same padded metadata (padding sequence included)."""
    real, padded, q, kv_clean, kv_poisoned = padded_step([1, 9, 1], [20, 9, 5], 16, num_seq_slots=5,
                                                         max_context_len=64)
    scale = HEAD_SIZE ** -0.5
    out = kernels.dispatch(q, kv_poisoned, padded, scale)
    kv_ref = torch.where(torch.isnan(kv_poisoned), torch.zeros_like(kv_poisoned), kv_poisoned)
    torch.testing.assert_close(out, paged_attention_torch(q, kv_ref, padded, scale), atol=2e-5, rtol=2e-5)
