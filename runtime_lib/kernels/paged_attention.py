"""Triton paged decode attention: one new query token per sequence over its paged KV cache.

Flash-decoding layout. Grid (num_seqs, num_kv_heads, num_partitions): each program owns one
KV head of one sequence and one slice (partition) of its context, and handles every query
head of that KV head's GQA group at once, so each K/V tile is read from HBM exactly once.
With more than one partition, each program writes its partial (max, sum, out) triple and
counts its arrival on an atomic counter; the last one of a (sequence, KV head) to arrive merges
them. One launch per layer: a second merge kernel cost ~3 us a layer at batch 1 on an H100.

Cache layout (see runtime_lib/layers/attention.py):
    kv_layer: (2, num_blocks, block_size, num_kv_heads, head_size)
Context position p of sequence b is slot `p % block_size` of block `block_tables[b, p // block_size]`.

No host<->device syncs: the partition count comes from the host int `max_context_len` (under
CUDA graphs, pass the capture-time bound, e.g. the engine's max sequence length), and each row
cuts its own context into about as many slices as fill the GPU at this batch (128 tokens to the
capture-time slice size each), so a short row in a graph captured for 128k tokens runs 1-2
slices and a long one enough for the GPU; programs past a row's last slice exit at once.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..config import FP8_KV_DTYPE
from .pdl import wait_for_previous

LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KV_DTYPES = SUPPORTED_DTYPES + (FP8_KV_DTYPE,)  # K/V tiles are cast to q's dtype after the load


@functools.cache
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_parallelism(device: torch.device) -> int:
    """Number of programs the device runs at once, roughly; a small constant off-GPU."""
    if device.type == "cuda":
        return num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # TRITON_INTERPRET on CPU: keep grids small, the interpreter runs programs serially


def check_paged_inputs(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                       context_lens: torch.Tensor, sliding_window: int | None = None) -> None:
    """Shape/dtype checks shared by the attention entry points (host-only, no sync)."""
    if kv_layer.dim() != 5 or kv_layer.shape[0] != 2:
        raise ValueError(f"kv_layer must be (2, num_blocks, block_size, num_kv_heads, head_size), "
                         f"got shape {tuple(kv_layer.shape)}")
    _, _, block_size, num_kv_heads, head_size = kv_layer.shape
    if q.dim() != 3 or q.shape[2] != head_size:
        raise ValueError(f"q must be (tokens, num_heads, head_size={head_size}), got shape {tuple(q.shape)}")
    if q.shape[1] % num_kv_heads != 0:
        raise ValueError(f"num_heads={q.shape[1]} must be a multiple of num_kv_heads={num_kv_heads}")
    if q.dtype not in SUPPORTED_DTYPES or kv_layer.dtype not in KV_DTYPES:
        raise ValueError(f"q dtype must be one of {SUPPORTED_DTYPES} and kv dtype one of {KV_DTYPES}, "
                         f"got {q.dtype}/{kv_layer.dtype}")
    if block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if q.stride(2) != 1 or kv_layer.stride(4) != 1:
        raise ValueError("q and kv_layer must be contiguous in head_size (last dim stride 1)")
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise ValueError(f"block_tables/context_lens must be int32, got {block_tables.dtype}/{context_lens.dtype}")
    if block_tables.dim() != 2 or context_lens.dim() != 1 or block_tables.shape[0] != context_lens.shape[0]:
        raise ValueError(f"block_tables must be (B, max_blocks) and context_lens (B,), got "
                         f"{tuple(block_tables.shape)} and {tuple(context_lens.shape)}")
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window}")


def interpreter_dot_upcast(dtype: torch.dtype) -> bool:
    """Triton 3.6's interpreter multiplies bf16 tl.dot operands as raw integers (garbage);
    under TRITON_INTERPRET the kernels upcast bf16 operands to fp32 after the same rounding."""
    return dtype == torch.bfloat16 and bool(triton.knobs.runtime.interpret)


@triton.jit
def mma(a, b, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot with fp32 accumulation; UPCAST only for the CPU interpreter (see above)."""
    if UPCAST:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=INPUT_PRECISION)
    return c


@triton.jit
def attend_range(q, k_ptr, v_ptr, block_table_ptr, lo, hi, stride_kblk, stride_kslot, scale_log2,
                 HEAD_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, CACHE: tl.constexpr):
    """Online softmax of the (BLOCK_G, BLOCK_D) query heads `q` of one KV head over context
    positions [lo, hi) of one sequence: k_ptr/v_ptr point at that KV head in the cache,
    block_table_ptr at the sequence's block table. Returns the unnormalised (m, l, acc).
    CACHE: the K/V loads' cache modifier (".cg" when this kernel wrote them itself)."""
    BLOCK_G: tl.constexpr = q.shape[0]
    BLOCK_D: tl.constexpr = q.shape[1]
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_SIZE
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for tile in range(lo, hi, BLOCK_N):
        pos = tile + tl.arange(0, BLOCK_N)                                      # (BLOCK_N,)
        valid = pos < hi
        blk = tl.load(block_table_ptr + pos // BLOCK_SIZE, mask=valid, other=0)
        offs_kv = blk.to(tl.int64) * stride_kblk + (pos % BLOCK_SIZE) * stride_kslot
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + offs_kv[:, None] + offs_d[None, :], mask=kv_mask, other=0.0,
                    cache_modifier=CACHE)                                       # (BLOCK_N, BLOCK_D)
        v = tl.load(v_ptr + offs_kv[:, None] + offs_d[None, :], mask=kv_mask, other=0.0, cache_modifier=CACHE)
        s = mma(q, tl.trans(k.to(q.dtype)), INPUT_PRECISION, DOT_UPCAST) * scale_log2  # (BLOCK_G, BLOCK_N)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + mma(p.to(q.dtype), v.to(q.dtype), INPUT_PRECISION, DOT_UPCAST)
        m_i = m_new
    return m_i, l_i, acc


# Host ints that change from step to step are plain arguments, not specialised (a new value
# divisible by 16, or a new constexpr, would JIT-compile a new variant in the middle of serving).
@triton.jit(do_not_specialize=["num_partitions", "slices_wanted", "min_partition",
                               "max_partition", "stride_bt"])
def _decode_partition_kernel(
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, arrivals_ptr,
    q_ptr, k_ptr, v_ptr, block_tables_ptr, context_lens_ptr, cu_q_ptr,
    scale_log2, window,
    stride_qb, stride_qh,
    stride_kblk, stride_kslot, stride_khead,
    stride_bt,
    stride_ob, stride_oh,
    num_heads, num_kv_heads, num_partitions, slices_wanted, min_partition, max_partition,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
    HEAD_SIZE: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_PARTITIONS: tl.constexpr, HAS_WINDOW: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr, DOT_FP16: tl.constexpr, MIXED: tl.constexpr, USE_PDL: tl.constexpr,
):
    wait_for_previous(USE_PDL)  # q, the cache and the arrival counters come from earlier kernels
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)

    if MIXED:
        # Mixed batch: q is (T, h, d) with cu_q offsets; only one-token sequences are ours,
        # the varlen kernel takes the rest.
        q_row = tl.load(cu_q_ptr + seq)
        if tl.load(cu_q_ptr + seq + 1) - q_row != 1:
            return
    else:
        q_row = seq
    ctx = tl.load(context_lens_ptr + seq)
    # The grid's partition count is fixed (by the host's max_context_len, a graph's capture
    # bound); each row cuts its own context into ~slices_wanted slices (enough programs to fill
    # the GPU at this batch), each min..max_partition tokens, so a short row in a long-context
    # graph runs few slices and a long one as many as the GPU needs.
    part_size = tl.cdiv(tl.cdiv(ctx, slices_wanted), BLOCK_N) * BLOCK_N
    part_size = tl.minimum(tl.maximum(part_size, min_partition), max_partition)
    part_start = part * part_size
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_SIZE
    heads = kv_head * GROUP + offs_g                                            # (BLOCK_G,)
    if USE_PARTITIONS and part_start >= ctx:
        # Past this sequence's end: no partial, no arrival (the merge counts only partitions
        # that start inside the context). An empty row (ctx 0: padding) still gets its zeros.
        if part == 0:
            tl.store(out_ptr + q_row * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                     tl.zeros([BLOCK_G, BLOCK_D], tl.float32).to(out_ptr.dtype.element_ty),
                     mask=g_mask[:, None] & d_mask[None, :])
        return
    lo = part_start
    if HAS_WINDOW:
        lo = tl.maximum(lo, ctx - window)  # the token sees positions (ctx-1-window, ctx-1]
    hi = tl.minimum(part_start + part_size, ctx)

    q = tl.load(q_ptr + q_row * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)             # (BLOCK_G, BLOCK_D)
    if DOT_FP16:
        # FP8 cache, bf16 q: e4m3 -> fp16 is one instruction per pair (-> bf16 takes three), and
        # fp16 holds every e4m3 value and q's usual range with more mantissa; saturate q at 65504.
        q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)

    m_i, l_i, acc = attend_range(q, k_ptr + kv_head * stride_khead, v_ptr + kv_head * stride_khead,
                                 block_tables_ptr + seq * stride_bt, lo, hi, stride_kblk, stride_kslot,
                                 scale_log2, HEAD_SIZE, BLOCK_SIZE, BLOCK_N, INPUT_PRECISION, DOT_UPCAST, "")

    if USE_PARTITIONS:
        # Partials: (B, H, P) for m/l and (B, H, P, BLOCK_D) for the unnormalized output.
        row = (seq * num_heads + heads) * num_partitions + part   # (BLOCK_G,)
        tl.store(part_m_ptr + row, m_i, mask=g_mask)
        tl.store(part_l_ptr + row, l_i, mask=g_mask)
        tl.store(part_acc_ptr + row[:, None] * BLOCK_D + offs_d[None, :], acc, mask=g_mask[:, None])
        # The last of this (sequence, KV head)'s partitions to finish merges them all: no second
        # launch. Every thread's stores precede the barrier, the barrier precedes the release
        # (acq_rel) arrival, and the merging program acquires it before reading the partials.
        tl.debug_barrier()
        counter = arrivals_ptr + seq * num_kv_heads + kv_head
        num_parts = tl.cdiv(ctx, part_size)  # the partitions that run (the rest exited above)
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == num_parts - 1:
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # ready for the next launch / replay
            base = (seq * num_heads + heads) * num_partitions                                  # (BLOCK_G,)
            m_run = tl.full([BLOCK_G], float("-inf"), tl.float32)
            l_run = tl.zeros([BLOCK_G], tl.float32)
            acc_run = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
            for p in range(0, num_parts):
                # .cg: read the partials from L2, where the other programs' stores landed.
                m_p = tl.load(part_m_ptr + base + p, mask=g_mask, other=float("-inf"), cache_modifier=".cg")
                l_p = tl.load(part_l_ptr + base + p, mask=g_mask, other=0.0, cache_modifier=".cg")
                a_p = tl.load(part_acc_ptr + (base + p)[:, None] * BLOCK_D + offs_d[None, :],
                              mask=g_mask[:, None], other=0.0, cache_modifier=".cg")  # (BLOCK_G, BLOCK_D)
                m_new = tl.maximum(m_run, m_p)
                # Partitions emptied by a sliding window carry m = -inf; keep exp2 off -inf - -inf.
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_run - m_safe)
                w = tl.exp2(m_p - m_safe)
                l_run = l_run * alpha + l_p * w
                acc_run = acc_run * alpha[:, None] + a_p * w[:, None]
                m_run = m_new
            out = acc_run / tl.where(l_run > 0, l_run, 1.0)[:, None]
            tl.store(out_ptr + q_row * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
    else:
        # l_i >= 1 whenever ctx > 0 (the max term is exp2(0)); ctx == 0 (padded slot) gives 0.
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + q_row * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])


_ARRIVALS: dict[torch.device, list[torch.Tensor]] = {}


def arrival_counters(device: torch.device, count: int) -> torch.Tensor:
    """Zeroed int32 counters, one per (sequence, KV head), for the in-kernel partition merge.

    The merging program resets its counter, so one buffer per device serves every launch in
    stream order, eagerly or replayed from a CUDA graph; graphs keep its address, so a buffer
    is never freed (a larger request adds one). Launches on concurrent streams must not share
    it: the engine runs every step on one stream."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    buffers = _ARRIVALS.setdefault(device, [])
    if not buffers or buffers[-1].numel() < count:
        buffers.append(torch.zeros(max(count, 1 << 16), dtype=torch.int32, device=device))
    return buffers[-1]


@dataclass(frozen=True)
class DecodeTuning:
    """Launch knobs of the decode kernel. Defaults: best geometric mean over B 1/8/64/256 x
    ctx 1024/4096 in `bench/gpu_kernels.py --sections sweep` on an H200 (1.026x of each
    shape's best; the old 1024/4 warps/2 stages was ~4% slower at B=256)."""
    block_n: int | None = None          # K/V tokens per inner-loop tile; None: max(block_size, 64)
    max_partition_size: int = 2048      # split-K slice upper bound (tokens)
    num_warps: int = 2
    num_stages: int = 3
    fp8_dot_fp16: bool = True           # FP8 cache with bf16 q: tile products in fp16 (see the kernel)


DEFAULT_DECODE_TUNING = DecodeTuning()


def decode_block_n(block_size: int, head_size: int) -> int:
    """Default K/V tokens per inner-loop tile. One tile = several cache blocks when blocks are
    small: fewer, larger loads per iteration."""
    return max(block_size, 64 if head_size <= 128 else 32)


def choose_partition_size(num_seqs: int, num_kv_heads: int, max_context_len: int, parallelism: int,
                          block_n: int, max_partition_size: int = 2048) -> int:
    """Largest power-of-two partition (>= block_n) that still gives ~2 programs per SM.

    Few, long sequences split into many partitions (fill the GPU); large batches keep long
    partitions (fewer partials to merge: each costs head_size + 2 floats per query head, against
    2 * partition * head_size cache elements per KV head read to produce it)."""
    size = max_partition_size
    min_size = max(block_n, 128)
    while size > min_size and num_seqs * num_kv_heads * triton.cdiv(max_context_len, size) < 2 * parallelism:
        size //= 2
    return max(size, block_n)


def paged_decode_attention(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, sliding_window: int | None = None,
                           max_context_len: int | None = None, *, partition_size: int | None = None,
                           out: torch.Tensor | None = None,
                           tuning: DecodeTuning = DEFAULT_DECODE_TUNING, pdl: bool = False) -> torch.Tensor:
    """Attention of one new token per sequence over its paged context (which already holds it).

    q: (B, h, d); kv_layer: (2, num_blocks, block_size, kvh, d); block_tables: (B, max_blocks)
    int32; context_lens: (B,) int32, may be 0 for padded batch slots (their output is 0).
    max_context_len: host upper bound on context_lens (defaults to max_blocks * block_size,
    which needs no sync). partition_size: force the split-K slice length (tests); a power of
    two >= 16. pdl: launch with programmatic dependent launch (kernels/pdl.py).
    Returns (B, h, d) in q's dtype, accumulated in fp32.
    """
    check_paged_inputs(q, kv_layer, block_tables, context_lens, sliding_window)
    if q.shape[0] != context_lens.shape[0]:
        raise ValueError(f"decode q must have one token per sequence: q.shape[0]={q.shape[0]}, "
                         f"context_lens.shape[0]={context_lens.shape[0]}")
    if partition_size is not None and (partition_size < 16 or partition_size & (partition_size - 1)):
        raise ValueError(f"partition_size must be a power of two >= 16, got {partition_size}")
    if out is None:
        out = torch.empty_like(q)
    return launch_decode(q, kv_layer, block_tables, context_lens, scale, sliding_window, max_context_len,
                         out, partition_size=partition_size, tuning=tuning, pdl=pdl)


def launch_decode(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                  context_lens: torch.Tensor, scale: float, sliding_window: int | None,
                  max_context_len: int | None, out: torch.Tensor, *, partition_size: int | None = None,
                  tuning: DecodeTuning = DEFAULT_DECODE_TUNING,
                  cu_query_lens: torch.Tensor | None = None, pdl: bool = False) -> torch.Tensor:
    """Launch the decode kernels on validated inputs. With `cu_query_lens` (B+1,), q and out
    are the (T, h, d) tokens of a mixed batch and only sequences with exactly one query token
    are computed (written at their row); the varlen kernel covers the others."""
    num_seqs = context_lens.shape[0]
    num_heads, head_size = q.shape[1], q.shape[2]
    _, _, block_size, num_kv_heads, _ = kv_layer.shape
    group = num_heads // num_kv_heads
    if max_context_len is None:
        max_context_len = block_tables.shape[1] * block_size
    if num_seqs == 0 or max_context_len <= 0:
        return out.zero_() if cu_query_lens is None else out

    block_n = tuning.block_n or decode_block_n(block_size, head_size)
    forced = partition_size is not None
    if not forced:
        partition_size = choose_partition_size(num_seqs, num_kv_heads, max_context_len,
                                               device_parallelism(q.device), block_n,
                                               tuning.max_partition_size)
    block_n = min(block_n, partition_size)
    num_partitions = triton.cdiv(max_context_len, partition_size)
    # A row of context c runs ~slices_wanted slices of min_partition..partition_size tokens
    # (a forced size is kept exactly). Measured on an H100 in a graph bound to 128k tokens
    # (bench/gpu_kernels.py --sections graphbound).
    min_partition = partition_size if forced else min(partition_size, max(block_n, 128))
    slices_wanted = max(1, triton.cdiv(2 * device_parallelism(q.device), num_seqs * num_kv_heads))
    use_partitions = num_partitions > 1
    block_d = triton.next_power_of_2(head_size)

    if use_partitions:
        part_acc = torch.empty((num_seqs, num_heads, num_partitions, block_d), dtype=torch.float32, device=q.device)
        part_m = torch.empty((num_seqs, num_heads, num_partitions), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
    else:
        part_acc = part_m = part_l = out  # unused by the kernel in this mode
    arrivals = arrival_counters(q.device, num_seqs * num_kv_heads) if use_partitions else context_lens
    mixed = cu_query_lens is not None
    cu_q = cu_query_lens if mixed else context_lens  # unused unless mixed
    k_cache, v_cache = kv_layer[0], kv_layer[1]
    fp32 = q.dtype == torch.float32

    _decode_partition_kernel[(num_seqs, num_kv_heads, num_partitions)](
        out, part_acc, part_m, part_l, arrivals,
        q, k_cache, v_cache, block_tables, context_lens, cu_q,
        scale * LOG2E, sliding_window or 0,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        num_heads, num_kv_heads, num_partitions, slices_wanted, min_partition, partition_size,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
        HEAD_SIZE=head_size, BLOCK_D=block_d,
        BLOCK_SIZE=block_size, BLOCK_N=block_n,
        USE_PARTITIONS=use_partitions, HAS_WINDOW=sliding_window is not None,
        INPUT_PRECISION="ieee" if fp32 else "tf32", DOT_UPCAST=interpreter_dot_upcast(q.dtype),
        DOT_FP16=tuning.fp8_dot_fp16 and kv_layer.dtype == FP8_KV_DTYPE and q.dtype == torch.bfloat16,
        MIXED=mixed, USE_PDL=pdl, num_warps=tuning.num_warps, num_stages=tuning.num_stages, launch_pdl=pdl,
    )
    return out
