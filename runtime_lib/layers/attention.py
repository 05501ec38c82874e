"""Attention over the paged KV cache: the metadata contract every driver fills in
(GenerationSession, LLMEngine) and the portable plain-torch path used on CPU.

Tokens are flattened ("remove_input_padding"): one step runs T new tokens that belong to
B sequences, each contributing `query_lens[b]` tokens (a prefill chunk or one decode token).

KV cache layout, one tensor for the whole model:
    kv_cache: (num_layers, 2, num_blocks, block_size, num_kv_heads, head_size)
A token at absolute position p of sequence b lives in block `block_tables[b, p // block_size]`
at offset `p % block_size`; `slot_mapping` gives the flat slot (block * block_size + offset)
of each new token so writes are one `index_copy_`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import FP8_KV_DTYPE, FP8_KV_MAX


@dataclass
class AttentionMetadata:
    query_lens: torch.Tensor      # (B,) int32 new tokens per sequence this step
    context_lens: torch.Tensor    # (B,) int32 kv length per sequence *after* this step
    block_tables: torch.Tensor    # (B, max_blocks_per_seq) int32, padded with 0
    slot_mapping: torch.Tensor    # (T,) int64 flat cache slot of each new token
    max_query_len: int            # host ints, so the step needs no device->host sync
    max_context_len: int
    # Optional precomputed helpers; built lazily by `prepare` when absent.
    cu_query_lens: torch.Tensor | None = None  # (B+1,) int32
    is_decode: bool = False       # every sequence has exactly one query token

    @classmethod
    def build(cls, query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
              block_size: int, device: torch.device | str = "cpu") -> AttentionMetadata:
        """Host-side constructor from plain lists (drivers batch this once per step)."""
        slots: list[int] = []
        for q, c, table in zip(query_lens, context_lens, block_tables):
            for pos in range(c - q, c):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        width = max((len(t) for t in block_tables), default=1) or 1
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        cu = [0]
        for q in query_lens:
            cu.append(cu[-1] + q)
        return cls(
            query_lens=torch.tensor(query_lens, dtype=torch.int32, device=device),
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            max_query_len=max(query_lens, default=0),
            max_context_len=max(context_lens, default=0),
            cu_query_lens=torch.tensor(cu, dtype=torch.int32, device=device),
            is_decode=all(q == 1 for q in query_lens),
        )


def write_kv(kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter this step's keys/values into the paged cache of one layer.

    kv_layer: (2, num_blocks, block_size, kvh, d); k, v: (T, kvh, d). An FP8 cache saturates
    at +-448 (a plain cast would turn larger values into NaN) and is written through uint8
    views (index_copy_ has no float8 kernel on CPU)."""
    _, num_blocks, block_size, kvh, d = kv_layer.shape
    flat = kv_layer.view(2, num_blocks * block_size, kvh, d)
    if flat.dtype == FP8_KV_DTYPE:
        k = k.clamp(-FP8_KV_MAX, FP8_KV_MAX).to(flat.dtype).view(torch.uint8)
        v = v.clamp(-FP8_KV_MAX, FP8_KV_MAX).to(flat.dtype).view(torch.uint8)
        flat = flat.view(torch.uint8)
    flat[0].index_copy_(0, slot_mapping, k.to(flat.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(flat.dtype))


def paged_attention_torch(q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata,
                          scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention of the new tokens over each sequence's cached keys/values.

    q: (T, h, d) -> (T, h, d). The cache must already hold this step's keys/values.
    Gathers every sequence's context into a padded (B, max_ctx) batch and runs one SDPA;
    correct for any mix of prefill chunks and decode tokens. CPU / reference path.
    """
    T, h, d = q.shape
    _, num_blocks, block_size, kvh, _ = kv_layer.shape
    B = meta.query_lens.shape[0]
    device = q.device
    max_ctx, max_q = meta.max_context_len, meta.max_query_len

    # (B, max_ctx) flat slots of every context position
    pos = torch.arange(max_ctx, device=device)
    blocks = meta.block_tables.long().gather(1, (pos // block_size).expand(B, -1).clamp(
        max=meta.block_tables.shape[1] - 1))
    slots = blocks * block_size + pos % block_size
    flat = kv_layer.view(2, num_blocks * block_size, kvh, d)
    k = flat[0][slots].to(q.dtype)  # (B, max_ctx, kvh, d)
    v = flat[1][slots].to(q.dtype)

    # Scatter flat queries into (B, max_q, h, d).
    cu = meta.cu_query_lens
    if cu is None:
        cu = F.pad(torch.cumsum(meta.query_lens, 0), (1, 0)).to(torch.int32)
    qpos = torch.arange(max_q, device=device)
    q_valid = qpos[None, :] < meta.query_lens[:, None]                   # (B, max_q)
    q_index = (cu[:-1, None].long() + qpos[None, :]).clamp(max=max(T - 1, 0))
    qb = q[q_index]                                                         # (B, max_q, h, d)

    # Absolute position of each query and key; causal (+ sliding window) mask.
    q_abs = (meta.context_lens - meta.query_lens)[:, None] + qpos[None, :]  # (B, max_q)
    allowed = (pos[None, None, :] <= q_abs[:, :, None]) & (pos[None, None, :] < meta.context_lens[:, None, None])
    if sliding_window is not None:
        allowed &= pos[None, None, :] > q_abs[:, :, None] - sliding_window
    allowed &= q_valid[:, :, None]
    allowed[:, :, 0] |= ~q_valid  # padded query rows: attend to something to avoid NaN

    out = F.scaled_dot_product_attention(
        qb.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=allowed[:, None], scale=scale, enable_gqa=(h != kvh))    # (B, h, max_q, d)
    out = out.transpose(1, 2)                                               # (B, max_q, h, d)
    return out[q_valid]                                                     # (T, h, d)


def paged_decode_attention_torch(q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata,
                                 scale: float) -> torch.Tensor | None:
    """Decode-only fast path of `paged_attention_torch` (one query per sequence, no window):
    the query is the last position, so causality reduces to a key-length mask, and the query
    needs no scatter. About 20% of a small model's CPU decode step (bench/bench_cpu.py). Returns
    None when the batch is not a plain decode batch; the caller then takes the general path."""
    T, h, d = q.shape
    _, num_blocks, block_size, kvh, _ = kv_layer.shape
    B, width = meta.block_tables.shape
    max_ctx = meta.max_context_len
    num_ctx_blocks = -(-max_ctx // block_size)
    if not meta.is_decode or T != B or num_ctx_blocks > width or max_ctx < 1:
        return None
    offsets = torch.arange(block_size, device=q.device)
    slots = (meta.block_tables[:, :num_ctx_blocks].long()[:, :, None] * block_size + offsets)  # (B, nb, bs)
    slots = slots.flatten(1)[:, :max_ctx]                                                      # (B, max_ctx)
    flat = kv_layer.view(2, num_blocks * block_size, kvh, d)
    k = flat[0][slots].to(q.dtype).transpose(1, 2)                          # (B, kvh, max_ctx, d)
    v = flat[1][slots].to(q.dtype).transpose(1, 2)
    valid = torch.arange(max_ctx, device=q.device)[None, :] < meta.context_lens[:, None]   # (B, max_ctx)
    out = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=valid[:, None, None, :],
                                         scale=scale, enable_gqa=(h != kvh))  # (B, h, 1, d)
    return out[:, :, 0, :]                                                  # (T, h, d)


def paged_attention(q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata,
                    scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """The one attention entry point every model layer calls: q (T, h, d) -> (T, h, d).

    Dispatch lives here so faster backends (Triton paged-decode / varlen-prefill kernels on
    GPU) slot in behind the same call; the plain-torch path is the portable reference."""
    if q.is_cuda:
        triton_attention = _triton_attention()
        if triton_attention is not None:
            return triton_attention(q, kv_layer, meta, scale, sliding_window)
    if sliding_window is None and meta.is_decode:
        out = paged_decode_attention_torch(q, kv_layer, meta, scale)
        if out is not None:
            return out
    return paged_attention_torch(q, kv_layer, meta, scale, sliding_window)


@functools.cache
def _triton_attention():
    """runtime_lib.kernels' entry point, imported on first CUDA call; None without triton."""
    try:
        from runtime_lib.kernels.attention_dispatch import paged_attention_triton
    except ImportError:
        return None
    return paged_attention_triton
