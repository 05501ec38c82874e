"""Triton varlen ("unified") paged attention: prefill, chunked prefill and mixed batches.

Why a Triton kernel and not torch SDPA over gathered KV: a batch mixes sequences whose query
lengths (1 .. thousands) and cached prefixes differ. Gather+SDPA pads every sequence to
(max_query_len, max_context_len), copies the whole context out of the cache, and needs an
explicit boolean mask, which rules out SDPA's flash backend. This kernel reads K/V straight
from the paged cache and does only the causal work of each sequence. Measured on an H200
(8B heads, bf16, graph-replay GPU time, bench/results/gpu_kernels-*): 3-12x faster than
gather+SDPA on prompts and chunked prefill, ~40x on a mixed prefill+decode batch; on equal
fresh prompts, flash SDPA over a contiguous cache is still 1.4-1.6x faster, but it cannot read
the paged cache or mix lengths. The reference stays `paged_attention_torch`.

Grid (num_q_tiles * num_kv_heads,). A program owns BLOCK_Q consecutive query tokens of one
sequence and all GROUP query heads of one KV head: its BLOCK_M = BLOCK_Q * GROUP rows share
every K/V tile it loads (row r is token r // GROUP, head r % GROUP). Query tiles never cross a
sequence; sequence s's tiles start at index cu_q[s] // BLOCK_Q + s, so the grid size
total_tokens // BLOCK_Q + num_seqs is a host-known upper bound (spare programs exit).
One-token sequences of a mixed batch go to the split-K decode kernel (second launch).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from runtime_lib.kernels.paged_attention import (
    DEFAULT_DECODE_TUNING,
    LOG2E,
    DecodeTuning,
    check_paged_inputs,
    interpreter_dot_upcast,
    launch_decode,
    mma,
)


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
def _attend_tile(acc, m_i, l_i, q, q_abs, kv_start, hi, seq,
                 k_ptr, v_ptr, block_tables_ptr, stride_bt, kv_base, stride_kblk, stride_kslot,
                 scale_log2, window,
                 HEAD_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                 MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """One online-softmax step over keys kv_start .. kv_start + BLOCK_N. Unmasked tiles lie
    wholly inside every row's causal range: no bounds checks, no score masking."""
    pos = kv_start + tl.arange(0, BLOCK_N)                                    # (BLOCK_N,)
    offs_d = tl.arange(0, HEAD_SIZE)
    bt_ptrs = block_tables_ptr + seq * stride_bt + pos // BLOCK_SIZE
    if MASKED:
        in_range = pos < hi
        blk = tl.load(bt_ptrs, mask=in_range, other=0)
    else:
        blk = tl.load(bt_ptrs)
    offs_kv = kv_base + blk.to(tl.int64) * stride_kblk + (pos % BLOCK_SIZE) * stride_kslot
    kv_ptrs = offs_kv[:, None] + offs_d[None, :]                              # (BLOCK_N, HEAD_SIZE)
    if MASKED:
        k = tl.load(k_ptr + kv_ptrs, mask=in_range[:, None], other=0.0)
        v = tl.load(v_ptr + kv_ptrs, mask=in_range[:, None], other=0.0)
    else:
        k = tl.load(k_ptr + kv_ptrs)
        v = tl.load(v_ptr + kv_ptrs)
    s = mma(q, tl.trans(k.to(q.dtype)), INPUT_PRECISION, DOT_UPCAST) * scale_log2  # (BLOCK_M, BLOCK_N)
    if MASKED:
        allowed = in_range[None, :] & (pos[None, :] <= q_abs[:, None])
        if HAS_WINDOW:
            allowed &= pos[None, :] > q_abs[:, None] - window
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row may see nothing in a masked tile yet (causal edge, window start): keep exp2 finite.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + mma(p.to(q.dtype), v.to(q.dtype), INPUT_PRECISION, DOT_UPCAST)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])  # they change every step: no re-JIT
def _varlen_kernel(
    out_ptr, q_ptr, k_ptr, v_ptr, block_tables_ptr, context_lens_ptr, cu_q_ptr,
    scale_log2, window, num_seqs, num_kv_heads,
    stride_qt, stride_qh,
    stride_kblk, stride_kslot, stride_khead,
    stride_bt,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
    HEAD_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, SKIP_DECODE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    # 1-D grid, highest query tile first: under causal masking later tiles do the most work, and
    # starting them first shortens the tail. All KV heads of a tile run next to each other.
    pid = tl.program_id(0)
    kv_head = pid % num_kv_heads
    tile = tl.num_programs(0) // num_kv_heads - 1 - pid // num_kv_heads
    seq = _find_seq(cu_q_ptr, tile, num_seqs, BLOCK_Q)
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    local_tile = tile - (q_start // BLOCK_Q + seq)
    if local_tile * BLOCK_Q >= q_len:
        return  # spare program of the upper-bound grid
    if SKIP_DECODE and q_len == 1:
        return  # one-token sequences go to the split-K decode kernel
    ctx = tl.load(context_lens_ptr + seq)
    prefix = ctx - q_len  # cached tokens before this step's queries

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_SIZE)
    q_local = local_tile * BLOCK_Q + offs_m // GROUP                          # (BLOCK_M,) token in seq
    heads = kv_head * GROUP + offs_m % GROUP                                  # (BLOCK_M,)
    row_valid = (offs_m < BLOCK_Q * GROUP) & (q_local < q_len)
    q_rows = (q_start + q_local).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=row_valid[:, None], other=0.0)                           # (BLOCK_M, HEAD_SIZE)
    q_abs = prefix + q_local                                                  # (BLOCK_M,) absolute position

    # Keys this tile can see: up to its last query (causal), from its first query's window start.
    first_q = prefix + local_tile * BLOCK_Q
    hi = prefix + tl.minimum((local_tile + 1) * BLOCK_Q, q_len)
    if HAS_WINDOW:
        lo = tl.maximum(first_q - window + 1, 0)
        full_end = lo  # window edges differ per row: mask every tile
    else:
        lo = 0
        full_end = ((first_q + 1) // BLOCK_N) * BLOCK_N  # keys <= first_q: visible to all rows

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_SIZE], tl.float32)
    kv_base = kv_head * stride_khead
    for kv_start in range(lo, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, q_abs, kv_start, hi, seq,
                                     k_ptr, v_ptr, block_tables_ptr, stride_bt, kv_base, stride_kblk,
                                     stride_kslot, scale_log2, window, HEAD_SIZE, BLOCK_SIZE, BLOCK_N,
                                     False, HAS_WINDOW, INPUT_PRECISION, DOT_UPCAST)
    for kv_start in range(full_end, hi, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, q_abs, kv_start, hi, seq,
                                     k_ptr, v_ptr, block_tables_ptr, stride_bt, kv_base, stride_kblk,
                                     stride_kslot, scale_log2, window, HEAD_SIZE, BLOCK_SIZE, BLOCK_N,
                                     True, HAS_WINDOW, INPUT_PRECISION, DOT_UPCAST)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


@dataclass(frozen=True)
class VarlenTuning:
    """Launch knobs of the varlen kernel. Defaults: best geometric mean over 1x2048, 8x512 and
    4x512-on-3584 prompts in `bench/gpu_kernels.py --sections sweep` on an H200 (1.02x of
    each shape's best)."""
    max_block_m: int = 64    # rows (query tokens x GQA group) per program, upper bound
    block_n: int = 64        # keys per inner-loop tile
    num_warps: int = 4       # for block_m >= 64; smaller tiles use 4
    num_stages: int = 2


DEFAULT_VARLEN_TUNING = VarlenTuning()


def paged_varlen_attention(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, cu_query_lens: torch.Tensor, max_query_len: int,
                           scale: float, sliding_window: int | None = None, *,
                           max_context_len: int | None = None, split_decode: bool = True,
                           out: torch.Tensor | None = None,
                           tuning: VarlenTuning = DEFAULT_VARLEN_TUNING,
                           decode_tuning: DecodeTuning = DEFAULT_DECODE_TUNING) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cached prefix and themselves.

    q: (T, h, d) flattened tokens of B sequences; cu_query_lens: (B+1,) int32 offsets into T;
    context_lens: (B,) int32 kv length *after* this step (the cache already holds the new
    tokens); max_query_len: host upper bound on the query lengths (picks the tile shape).
    head_size must be a power of two. split_decode: sequences with a single query token go
    to the split-K decode kernel (a second launch; max_context_len bounds its partitions)
    instead of a mostly idle BLOCK_M-row tile here. Returns (T, h, d) in q's dtype, fp32 accumulation.
    """
    check_paged_inputs(q, kv_layer, block_tables, context_lens, sliding_window)
    if cu_query_lens.dtype != torch.int32 or cu_query_lens.shape != (context_lens.shape[0] + 1,):
        raise ValueError(f"cu_query_lens must be int32 of shape (B+1,)=({context_lens.shape[0] + 1},), "
                         f"got {cu_query_lens.dtype} {tuple(cu_query_lens.shape)}")
    num_tokens, num_heads, head_size = q.shape
    if head_size < 16 or head_size & (head_size - 1):
        raise ValueError(f"head_size must be a power of two >= 16 for the varlen kernel, got {head_size}")
    num_seqs = context_lens.shape[0]
    _, _, block_size, num_kv_heads, _ = kv_layer.shape
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    if num_tokens == 0 or num_seqs == 0:
        return out

    # Rows = query tokens x GQA group; 16..max_block_m rows so tl.dot has an MMA-sized M.
    block_m = min(tuning.max_block_m, max(16, triton.next_power_of_2(group * max(max_query_len, 1))))
    block_m = max(block_m, triton.next_power_of_2(group))
    block_q = block_m // group
    block_n = tuning.block_n if head_size <= 128 else min(tuning.block_n, 32)
    fp32 = q.dtype == torch.float32
    skip_decode = split_decode and max_query_len > 1
    num_q_tiles = num_tokens // block_q + num_seqs
    k_cache, v_cache = kv_layer[0], kv_layer[1]
    _varlen_kernel[(num_q_tiles * num_kv_heads,)](
        out, q, k_cache, v_cache, block_tables, context_lens, cu_query_lens,
        scale * LOG2E, sliding_window or 0, num_seqs, num_kv_heads,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, BLOCK_M=block_m, BLOCK_Q=block_q,
        HEAD_SIZE=head_size, BLOCK_SIZE=block_size, BLOCK_N=block_n,
        HAS_WINDOW=sliding_window is not None, SKIP_DECODE=skip_decode,
        INPUT_PRECISION="ieee" if fp32 else "tf32", DOT_UPCAST=interpreter_dot_upcast(q.dtype),
        num_warps=tuning.num_warps if block_m >= 64 else 4, num_stages=tuning.num_stages,
    )
    if skip_decode:
        launch_decode(q, kv_layer, block_tables, context_lens, scale, sliding_window, max_context_len, out,
                      tuning=decode_tuning, cu_query_lens=cu_query_lens)
    return out
