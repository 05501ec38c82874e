"""One-row qkv projection with RoPE and the paged K/V write in its epilogue: one launch where the
fused decode step had two (`small_linear` then `rope_kv_write`).

    qkv = RMSNorm(x) @ W_qkv.T (+ bias)        as small_linear(prologue="rmsnorm")
    q   = rope(qkv[q heads])                   -> q_out (1, h, d)
    k   = rope(qkv[k heads]), v = qkv[v heads] -> kv_layer at slot_mapping[0]

RoPE (the non-interleaved "rotate half" form) pairs dimension i of a head with i + d/2, so each
program owns BLOCK_N/2 such pairs of one head: its weight rows are d0..d0+P-1 and the same plus
d/2, interleaved, and the rotation happens in registers. The grid and the bytes read are those
of the plain GEMV; only the row order within a program changes.

Used where the projection is small (`ONE_LAUNCH_MAX_BYTES`): on an H100 the one launch made
Llama-3.2-1B's step 1.5% faster, but Llama-3.1-8B's 1.4% slower: its 50 MB projection ran
~2.4 us slower this way than as a plain `small_linear`, more than the launch it saves
(bench/gpu_fused_step.py, bench/results/gpu_fused_step-*).

Bits: the projection rounds like `small_linear`, the rotation and the cache stores like
`rope_kv_write` (each op rounded to the activation dtype), so in bf16/fp16 the result is
bit-identical to the two-launch form with the same launch shape. In fp32 the compiler may fuse
the rotation's multiply and add (`rope_kv_write` forbids it to match eager torch bit for bit;
here that would also slow the GEMV's multiply-accumulate): within an ulp.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .paged_attention import (
    LOG2E,
    arrival_counters,
    attend_range,
    check_paged_inputs,
    interpreter_dot_upcast,
)
from .pdl import first_tile_then_wait, prefetch_columns
from .rope_kv import check_rope_kv_inputs
from .rounding import interpreter_rounds_bf16, round_to
from .small_linear import LinearTuning, _mac_tile, choose_tuning

ONE_LAUNCH_MAX_BYTES = 16 << 20  # qkv weights up to this size take the one-launch form
# K/V tokens per tile of the epilogue's attention: one program per KV group walks the context,
# so fewer, larger tiles (H100, Llama-3.2-1B step at 384 tokens: 1.073 ms with 128, 1.117 with 64).
ATTENTION_BLOCK_N = 128


@triton.jit
def _qkv_rope_kv_kernel(
    x_ptr, w_ptr, norm_w_ptr, bias_ptr, positions_ptr, cos_ptr, sin_ptr, slot_ptr,
    q_out_ptr, k_cache_ptr, v_cache_ptr,
    K, stride_wn, eps, stride_cos_p, stride_sin_p, stride_out_h,
    stride_kv_blk, stride_kv_slot, stride_kv_head,
    num_heads, num_kv_heads,
    attn_out_ptr, block_table_ptr, context_lens_ptr, arrivals_ptr, scale_log2, window, stride_attn_h,
    HAS_BIAS: tl.constexpr, HEAD_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_UPCAST: tl.constexpr, RNE: tl.constexpr, USE_PDL: tl.constexpr, PREFETCH_COLS: tl.constexpr,
    ATTEND: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, ATTN_BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    PAIRS: tl.constexpr = BLOCK_N // 2
    HALF: tl.constexpr = HEAD_SIZE // 2
    pid = tl.program_id(0)
    head = pid // (HALF // PAIRS)                       # 0..h-1 q, then k, then v heads
    d0 = (pid % (HALF // PAIRS)) * PAIRS
    i = tl.arange(0, BLOCK_N)
    dim = d0 + i // 2 + (i % 2) * HALF                  # (BN,): pairs (d, d + HALF), interleaved
    offs_n = head * HEAD_SIZE + dim
    dt: tl.constexpr = w_ptr.dtype.element_ty
    kv_dt: tl.constexpr = k_cache_ptr.dtype.element_ty
    offs_k0 = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + tl.arange(0, 1)[:, None]           # (1, 1): one row
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    n_ok = offs_n >= 0                                  # every row exists (the grid covers N exactly)
    m_ok = tl.arange(0, 1) < 1

    rotates = head < num_heads + num_kv_heads            # q and k heads; v heads are copied
    offs_p = d0 + tl.arange(0, PAIRS)
    # The step's inputs (written before the chain's first kernel, never by a kernel of it): their
    # dependent loads (position -> cos/sin) run while the weights stream, not after the loop
    # (measured 0.2-1.5 us a call faster on an H100, bench/gpu_fused_step.py).
    slot = tl.load(slot_ptr).to(tl.int64)
    pos = tl.load(positions_ptr).to(tl.int64)
    c_raw = tl.load(cos_ptr + pos * stride_cos_p + offs_p, mask=rotates & (offs_p < HALF), other=0.0)
    s_raw = tl.load(sin_ptr + pos * stride_sin_p + offs_p, mask=rotates & (offs_p < HALF), other=0.0)
    ss = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    first_tile_then_wait(w_rows, K, BLOCK_K, PREFETCH_COLS, USE_PDL)   # kernels/pdl.py
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + offs_k0
        k_mask = offs_k < K
        w = tl.load(w_rows + offs_k[None, :], mask=n_ok[:, None] & k_mask[None, :], other=0.0)
        acc, ss = _mac_tile(acc, ss, w, x_rows, norm_w_ptr, offs_k, k_mask, m_ok, K,
                            dt, 1, 1, "ieee", DOT_UPCAST, RNE)

    y = tl.sum(acc, axis=1) * tl.rsqrt(tl.sum(ss, axis=0) / K + eps)                 # (BN,)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n).to(tl.float32)
    y = round_to(y, dt, RNE)                                                         # the qkv value

    kv_off = (slot // BLOCK_SIZE) * stride_kv_blk + (slot % BLOCK_SIZE) * stride_kv_slot
    if rotates:
        # rope_kv_write's rotation, op by op (see kernels/rope_kv.py), on the pairs in registers.
        c = round_to(c_raw, dt, True)                                                # (P,)
        s = round_to(s_raw, dt, True)
        x1, x2 = tl.split(tl.reshape(y, (PAIRS, 2)))                                 # dims d, d + HALF
        x1c = round_to(x1 * c, dt, True)
        x2s = round_to(x2 * s, dt, True)
        x2c = round_to(x2 * c, dt, True)
        x1s = round_to(x1 * s, dt, True)
        o1 = round_to(x1c - x2s, dt, True)
        o2 = round_to(x2c + x1s, dt, True)
        rot = tl.reshape(tl.join(o1, o2), (BLOCK_N,))                                # back to `dim` order
        if head < num_heads:
            tl.store(q_out_ptr + head * stride_out_h + dim, rot.to(dt))
        else:
            k_dst = k_cache_ptr + kv_off + (head - num_heads).to(tl.int64) * stride_kv_head
            tl.store(k_dst + dim, round_to(rot, kv_dt, True).to(kv_dt))
    else:
        v_dst = v_cache_ptr + kv_off + (head - num_heads - num_kv_heads).to(tl.int64) * stride_kv_head
        tl.store(v_dst + dim, round_to(y, kv_dt, True).to(kv_dt))

    if ATTEND:
        # The last program of a KV group (its q heads' and its k and v head's slices) to arrive
        # runs that group's decode attention: every value it reads (q, the new K/V slot) is
        # stored by then. Same protocol as the split-K merge in kernels/paged_attention.py:
        # stores, barrier, acq_rel arrival; the reader acquires it and reads through L2 (.cg).
        kv_head = tl.where(head < num_heads, head // GROUP, (head - num_heads) % num_kv_heads)
        tl.debug_barrier()
        counter = arrivals_ptr + kv_head
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == (GROUP + 2) * (HALF // PAIRS) - 1:
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # ready for the next launch / replay
            offs_g = tl.arange(0, BLOCK_G)
            offs_d = tl.arange(0, HEAD_SIZE)
            heads = kv_head * GROUP + offs_g
            g_mask = (offs_g < GROUP)[:, None]
            q = tl.load(q_out_ptr + heads[:, None] * stride_out_h + offs_d[None, :], mask=g_mask, other=0.0,
                        cache_modifier=".cg")                                          # (BLOCK_G, d)
            ctx = tl.load(context_lens_ptr)
            lo = 0
            if HAS_WINDOW:
                lo = tl.maximum(ctx - window, 0)
            kv_head_off = kv_head.to(tl.int64) * stride_kv_head
            _, att_l, att_acc = attend_range(q, k_cache_ptr + kv_head_off, v_cache_ptr + kv_head_off,
                                             block_table_ptr, lo, ctx, stride_kv_blk, stride_kv_slot, scale_log2,
                                             HEAD_SIZE, BLOCK_SIZE, ATTN_BLOCK_N, INPUT_PRECISION, DOT_UPCAST,
                                             ".cg")
            out = att_acc / tl.where(att_l > 0, att_l, 1.0)[:, None]
            tl.store(attn_out_ptr + heads[:, None] * stride_attn_h + offs_d[None, :],
                     out.to(attn_out_ptr.dtype.element_ty), mask=g_mask)


def rope_tuning(n: int, k: int, head_size: int, device: torch.device) -> LinearTuning:
    """small_linear's launch shape for this matrix, with BLOCK_N made a valid pair count: even,
    and BLOCK_N / 2 dividing head_size / 2."""
    t = choose_tuning(1, n, k, device)
    block_n = t.block_n if t.block_n % 2 == 0 and (head_size // 2) % (t.block_n // 2) == 0 else 8
    return LinearTuning(block_n=block_n, block_k=t.block_k, num_warps=t.num_warps, num_stages=t.num_stages)


def qkv_rope_kv(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                positions: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                kv_layer: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int, *,
                bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
                tuning: LinearTuning | None = None, pdl: bool = False) -> torch.Tensor:
    """rope_kv_write(small_linear(x, weight, bias=bias, prologue="rmsnorm", ...), ...) for one row
    in one launch. x: (1, K); weight: (N, K) with N = (h + 2*kvh) * d; norm_weight: (K,); the
    rest as `rope_kv_write`. Returns q rotated, (1, h, d) in weight's dtype (into `out`)."""
    return _launch(x, weight, norm_weight, eps, positions, cos_cache, sin_cache, kv_layer, slot_mapping,
                   num_heads, num_kv_heads, bias, out, tuning, pdl, attention=None)


@dataclass(frozen=True)
class DecodeAttention:
    """What the one-row decode attention needs beyond the projection's inputs (as
    `paged_decode_attention` takes them): the row's block table (1, max_blocks) and context
    length (1,) int32 (it holds this step's token), the softmax scale, the sliding window."""
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    scale: float
    sliding_window: int | None = None


def qkv_rope_kv_attention(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                          positions: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                          kv_layer: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int,
                          attention: DecodeAttention, *, bias: torch.Tensor | None = None,
                          out: torch.Tensor | None = None, tuning: LinearTuning | None = None,
                          pdl: bool = False) -> torch.Tensor:
    """`qkv_rope_kv` and then `paged_decode_attention` of its q over the row's context, in the
    same launch: the last program of each KV group to finish runs that group's attention, over
    the whole context in one pass (no split-K), so keep it to short contexts
    (`fused_decode.FUSED_ATTENTION_MAX_CONTEXT`). Returns the attention output (1, h, d) in
    weight's dtype (into `out`); q goes to a scratch buffer."""
    return _launch(x, weight, norm_weight, eps, positions, cos_cache, sin_cache, kv_layer, slot_mapping,
                   num_heads, num_kv_heads, bias, out, tuning, pdl, attention=attention)


def _launch(x, weight, norm_weight, eps, positions, cos_cache, sin_cache, kv_layer, slot_mapping,
            num_heads, num_kv_heads, bias, out, tuning, pdl, attention: DecodeAttention | None) -> torch.Tensor:
    n, k = weight.shape
    if x.dim() != 2 or x.shape != (1, k) or x.stride(1) != 1 or x.dtype != weight.dtype:
        raise ValueError(f"x must be one contiguous row (1, {k}) of {weight.dtype}, got shape {tuple(x.shape)} "
                         f"{x.dtype}")
    if weight.stride(1) != 1:
        raise ValueError(f"weight must be contiguous in K, got strides {weight.stride()}")
    if norm_weight.shape != (k,):
        raise ValueError(f"norm_weight must have shape ({k},), got {tuple(norm_weight.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    # rope_kv_write's checks, with a (1, N) stand-in for the projection's output (a view of
    # weight's storage: only its shape, dtype and device are looked at).
    head_size = check_rope_kv_inputs(weight.as_strided((1, n), (n, 1)), positions, cos_cache, sin_cache,
                                     kv_layer, slot_mapping, num_heads, num_kv_heads, out)
    if attention is None and out is not None:
        q = out
    else:  # with attention, q is scratch and `out` takes the attention output
        q = torch.empty((1, num_heads, head_size), dtype=weight.dtype, device=x.device)
    if attention is None:
        attn_out, block_tables, context_lens, arrivals = q, slot_mapping, slot_mapping, slot_mapping  # unused
    else:
        block_tables, context_lens = attention.block_tables, attention.context_lens
        check_paged_inputs(q, kv_layer, block_tables, context_lens, attention.sliding_window)
        if context_lens.shape != (1,):
            raise ValueError(f"attention.context_lens must be (1,): one row, got {tuple(context_lens.shape)}")
        attn_out = out if out is not None else torch.empty_like(q)
        arrivals = arrival_counters(x.device, num_kv_heads)
    tuning = tuning or rope_tuning(n, k, head_size, x.device)
    if tuning.block_n % 2 or (head_size // 2) % (tuning.block_n // 2):
        raise ValueError(f"tuning.block_n={tuning.block_n} must be even with block_n/2 dividing head_size/2")
    k_cache, v_cache = kv_layer[0], kv_layer[1]
    block_size = kv_layer.shape[2]
    group = num_heads // num_kv_heads
    _qkv_rope_kv_kernel[(n // tuning.block_n,)](
        x, weight, norm_weight, bias if bias is not None else weight, positions, cos_cache, sin_cache,
        slot_mapping, q, k_cache, v_cache,
        k, weight.stride(0), eps, cos_cache.stride(0), sin_cache.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        num_heads, num_kv_heads,
        attn_out, block_tables, context_lens, arrivals,
        (attention.scale if attention else 1.0) * LOG2E, (attention and attention.sliding_window) or 0,
        attn_out.stride(1),
        HAS_BIAS=bias is not None, HEAD_SIZE=head_size, BLOCK_SIZE=block_size,
        BLOCK_N=tuning.block_n, BLOCK_K=tuning.block_k,
        DOT_UPCAST=interpreter_dot_upcast(weight.dtype), RNE=interpreter_rounds_bf16(), USE_PDL=pdl,
        PREFETCH_COLS=prefetch_columns(tuning.block_k, weight.dtype),
        ATTEND=attention is not None, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
        ATTN_BLOCK_N=max(ATTENTION_BLOCK_N, block_size),
        HAS_WINDOW=attention is not None and attention.sliding_window is not None,
        INPUT_PRECISION="ieee" if weight.dtype == torch.float32 else "tf32",
        num_warps=tuning.num_warps, num_stages=tuning.num_stages, launch_pdl=pdl,
    )
    return attn_out


__all__ = ["ONE_LAUNCH_MAX_BYTES", "DecodeAttention", "qkv_rope_kv", "qkv_rope_kv_attention", "rope_tuning"]
