"""GPU side of `runtime_lib.layers.attention.paged_attention`: picks the Triton kernel for a step.

Decode steps (one query token per sequence) run the split-K decode kernel; anything else
(prefill, chunked prefill, mixed batches) runs the varlen kernel, which hands its one-token
sequences to the decode kernel. Shapes the kernels do not cover fall back to the torch path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime_lib.kernels.paged_attention import KV_DTYPES, SUPPORTED_DTYPES, paged_decode_attention
from runtime_lib.kernels.varlen_attention import paged_varlen_attention
from runtime_lib.layers.attention import AttentionMetadata, paged_attention_torch


def kernels_support(q: torch.Tensor, kv_layer: torch.Tensor) -> bool:
    """The kernels cover power-of-two head sizes 16..256, fp16/bf16/fp32 queries and those or
    FP8 caches."""
    head_size = q.shape[-1]
    return (16 <= head_size <= 256 and head_size & (head_size - 1) == 0
            and q.dtype in SUPPORTED_DTYPES and kv_layer.dtype in KV_DTYPES)


def paged_attention_triton(q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata,
                           scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """q: (T, h, d) -> (T, h, d) on CUDA tensors; same contract as `paged_attention_torch`."""
    if not kernels_support(q, kv_layer):
        return paged_attention_torch(q, kv_layer, meta, scale, sliding_window)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if meta.is_decode:
        return paged_decode_attention(q, kv_layer, meta.block_tables, meta.context_lens, scale,
                                      sliding_window, meta.max_context_len)
    cu = meta.cu_query_lens
    if cu is None:  # device-side prefix sum: no host sync
        cu = F.pad(torch.cumsum(meta.query_lens, 0, dtype=torch.int32), (1, 0))
    return paged_varlen_attention(q, kv_layer, meta.block_tables, meta.context_lens, cu, meta.max_query_len,
                                  scale, sliding_window, max_context_len=meta.max_context_len)
