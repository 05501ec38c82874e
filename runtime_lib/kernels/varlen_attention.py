"""Triton varlen ("unified") paged attention: prefill, chunked prefill and mixed batches.

Why a Triton kernel and not torch SDPA over gathered KV: a batch mixes sequences whose query
lengths (1 .. thousands) and cached prefixes differ. Gather+SDPA pads every sequence to
(max_query_len, max_context_len), copies the whole context out of the cache, and needs an
explicit boolean mask, which rules out SDPA's flash backend. This kernel reads K/V straight
from the paged cache, does only the causal work of each sequence, and serves any query length
(decode tokens included) in one launch. The reference stays `paged_attention_torch`.

Grid (num_q_tiles, num_kv_heads). A program owns BLOCK_Q consecutive query tokens of one
sequence and all GROUP query heads of one KV head: its BLOCK_M = BLOCK_Q * GROUP rows share
every K/V tile it loads (row r is token r // GROUP, head r % GROUP). Query tiles never cross a
sequence; sequence s's tiles start at index cu_q[s] // BLOCK_Q + s, so the grid size
total_tokens // BLOCK_Q + num_seqs is a host-known upper bound (spare programs exit).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from runtime_lib.kernels.paged_attention import LOG2E, check_paged_inputs, interpreter_dot_upcast, mma


@triton.jit
def _find_seq(cu_q_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """Largest s with cu_q[s] // BLOCK_Q + s <= tile (binary search; cu_q is (B+1,))."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(cu_q_ptr + mid) // BLOCK_Q + mid
        if start <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _varlen_kernel(
    out_ptr, q_ptr, k_ptr, v_ptr, block_tables_ptr, context_lens_ptr, cu_q_ptr,
    scale_log2, window, num_seqs,
    stride_qt, stride_qh,
    stride_kblk, stride_kslot, stride_khead,
    stride_bt,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
    HEAD_SIZE: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_seq(cu_q_ptr, tile, num_seqs, BLOCK_Q)
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    local_tile = tile - (q_start // BLOCK_Q + seq)
    if local_tile * BLOCK_Q >= q_len:
        return  # spare program of the upper-bound grid
    ctx = tl.load(context_lens_ptr + seq)
    prefix = ctx - q_len  # cached tokens before this step's queries

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_local = local_tile * BLOCK_Q + offs_m // GROUP                          # (BLOCK_M,) token in seq
    heads = kv_head * GROUP + offs_m % GROUP                                  # (BLOCK_M,)
    row_valid = (offs_m < BLOCK_Q * GROUP) & (q_local < q_len)
    d_mask = offs_d < HEAD_SIZE
    q = tl.load(q_ptr + (q_start + q_local)[:, None].to(tl.int64) * stride_qt + heads[:, None] * stride_qh
                + offs_d[None, :], mask=row_valid[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    q_abs = prefix + q_local                                                  # (BLOCK_M,) absolute position

    # Keys this tile can see: up to its last query (causal), from its first query's window start.
    hi = prefix + tl.minimum((local_tile + 1) * BLOCK_Q, q_len)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(prefix + local_tile * BLOCK_Q - window + 1, 0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kv_base = kv_head * stride_khead
    for kv_tile in range(lo, hi, BLOCK_N):
        pos = kv_tile + tl.arange(0, BLOCK_N)                                 # (BLOCK_N,)
        in_range = pos < hi
        blk = tl.load(block_tables_ptr + seq * stride_bt + pos // BLOCK_SIZE, mask=in_range, other=0)
        offs_kv = kv_base + blk.to(tl.int64) * stride_kblk + (pos % BLOCK_SIZE) * stride_kslot
        kv_mask = in_range[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + offs_kv[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(v_ptr + offs_kv[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        s = mma(q, tl.trans(k.to(q.dtype)), INPUT_PRECISION, DOT_UPCAST) * scale_log2  # (BLOCK_M, BLOCK_N)
        allowed = in_range[None, :] & (pos[None, :] <= q_abs[:, None])
        if HAS_WINDOW:
            allowed &= pos[None, :] > q_abs[:, None] - window
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row may see nothing in this tile yet (causal edge, window start): keep exp2 finite.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + mma(p.to(q.dtype), v.to(q.dtype), INPUT_PRECISION, DOT_UPCAST)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (q_start + q_local)[:, None].to(tl.int64) * stride_ot + heads[:, None] * stride_oh
             + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_mask[None, :])


def paged_varlen_attention(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, cu_query_lens: torch.Tensor, max_query_len: int,
                           scale: float, sliding_window: int | None = None, *,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cached prefix and themselves.

    q: (T, h, d) flattened tokens of B sequences; cu_query_lens: (B+1,) int32 offsets into T;
    context_lens: (B,) int32 kv length *after* this step (the cache already holds the new
    tokens); max_query_len: host upper bound on the query lengths (picks the tile shape).
    Returns (T, h, d) in q's dtype, accumulated in fp32.
    """
    check_paged_inputs(q, kv_layer, block_tables, context_lens)
    if cu_query_lens.dtype != torch.int32 or cu_query_lens.shape != (context_lens.shape[0] + 1,):
        raise ValueError(f"cu_query_lens must be int32 of shape (B+1,)=({context_lens.shape[0] + 1},), "
                         f"got {cu_query_lens.dtype} {tuple(cu_query_lens.shape)}")
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window}")
    num_tokens, num_heads, head_size = q.shape
    num_seqs = context_lens.shape[0]
    _, _, block_size, num_kv_heads, _ = kv_layer.shape
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    if num_tokens == 0 or num_seqs == 0:
        return out

    # Rows = query tokens x GQA group; 16..128 rows so tl.dot has an MMA-sized M.
    block_m = min(128, max(16, triton.next_power_of_2(group * max(max_query_len, 1))))
    block_m = max(block_m, triton.next_power_of_2(group))
    block_q = block_m // group
    block_n = 64 if head_size <= 128 else 32
    fp32 = q.dtype == torch.float32
    num_q_tiles = num_tokens // block_q + num_seqs
    k_cache, v_cache = kv_layer[0], kv_layer[1]
    _varlen_kernel[(num_q_tiles, num_kv_heads)](
        out, q, k_cache, v_cache, block_tables, context_lens, cu_query_lens,
        scale * LOG2E, sliding_window or 0, num_seqs,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, BLOCK_M=block_m, BLOCK_Q=block_q,
        HEAD_SIZE=head_size, BLOCK_D=triton.next_power_of_2(head_size),
        BLOCK_SIZE=block_size, BLOCK_N=block_n,
        HAS_WINDOW=sliding_window is not None, INPUT_PRECISION="ieee" if fp32 else "tf32",
        DOT_UPCAST=interpreter_dot_upcast(q.dtype), num_warps=8 if block_m >= 128 else 4, num_stages=2,
    )
    return out
