"""The CPU decode fast path (`paged_decode_attention_torch`) equals the general plain-torch
reference (`paged_attention_torch`) on decode batches, and declines everything else."""
from __future__ import annotations

import pytest
import torch

from runtime_lib.layers.attention import (
    AttentionMetadata,
    paged_attention,
    paged_attention_torch,
    paged_decode_attention_torch,
)

BLOCK = 4


def decode_batch(context_lens: list[int], heads: int, kv_heads: int, head_size: int = 8, seed: int = 0):
    """Random KV pool, shuffled (non-contiguous) block tables and one query per sequence."""
    g = torch.Generator().manual_seed(seed)
    tables, next_free = [], 1
    for n in context_lens:
        nb = -(-n // BLOCK)
        tables.append(list(range(next_free, next_free + nb)))
        next_free += nb
    perm = torch.randperm(next_free - 1, generator=g) + 1  # relabel blocks: non-contiguous tables
    tables = [[int(perm[b - 1]) for b in t] for t in tables]
    kv = torch.randn(2, next_free, BLOCK, kv_heads, head_size, generator=g)
    q = torch.randn(len(context_lens), heads, head_size, generator=g)
    meta = AttentionMetadata.build([1] * len(context_lens), context_lens, tables, BLOCK)
    return q, kv, meta


@pytest.mark.parametrize("context_lens,heads,kv_heads", [
    ([1], 4, 4),
    ([5, 1, 12, 8], 4, 2),
    ([16, 3, 9], 8, 1),
    ([4, 8, 12], 2, 2),  # every context ends on a block boundary
])
def test_decode_fast_path_equals_the_reference(context_lens, heads, kv_heads):
    q, kv, meta = decode_batch(context_lens, heads, kv_heads)
    want = paged_attention_torch(q, kv, meta, scale=0.3)
    got = paged_decode_attention_torch(q, kv, meta, scale=0.3)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(paged_attention(q, kv, meta, scale=0.3), want, atol=1e-6, rtol=1e-5)


def test_fast_path_declines_prefill_batches():
    g = torch.Generator().manual_seed(1)
    kv = torch.randn(2, 8, BLOCK, 2, 8, generator=g)
    meta = AttentionMetadata.build([3, 1], [3, 6], [[1], [2, 3]], BLOCK)
    q = torch.randn(4, 2, 8, generator=g)
    assert paged_decode_attention_torch(q, kv, meta, scale=0.5) is None
    torch.testing.assert_close(paged_attention(q, kv, meta, scale=0.5), paged_attention_torch(q, kv, meta, 0.5))


def test_sliding_window_takes_the_general_path():
    q, kv, meta = decode_batch([12, 7], 4, 2)
    want = paged_attention_torch(q, kv, meta, scale=0.3, sliding_window=4)
    torch.testing.assert_close(paged_attention(q, kv, meta, scale=0.3, sliding_window=4), want)
