"""Row argmax of a few long rows (greedy decoding over a 128k vocabulary) in one launch.

torch reduces one row in one thread block (~40 us for 128k logits on an H100), and the
two-stage torch form (`sampling_ops.chunked_argmax`) takes six small launches. Here each of
CHUNKS programs per row reduces a slice to its (max, first index), and the last program of
the row to arrive on an atomic counter merges the slices in order, as the decode attention
merges its split-K partials (kernels/paged_attention.py): one launch.

Ties go to the first maximal index, as torch.argmax; a row of NaN or -inf values gives the
first index of the first slice holding its maximum (torch picks a NaN's index: rows with NaN
logits are not supported).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .paged_attention import arrival_counters


@triton.jit
def _argmax_kernel(x_ptr, part_val_ptr, part_idx_ptr, counters_ptr, out_ptr, V, stride_x,
                   CHUNKS: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    start = chunk * CHUNK
    best_val = tl.full((), float("-inf"), tl.float32)
    best_idx = tl.full((), 0, tl.int64) + start
    for off in range(start, start + CHUNK, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + row.to(tl.int64) * stride_x + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m = tl.max(v, axis=0)
        i = tl.min(tl.where(v == m, offs, 2147483647), axis=0).to(tl.int64)   # first max in the block
        better = m > best_val                                                  # strict: earlier blocks win ties
        best_idx = tl.where(better, i, best_idx)
        best_val = tl.where(better, m, best_val)
    slot = row * CHUNKS + chunk
    tl.store(part_val_ptr + slot, best_val)
    tl.store(part_idx_ptr + slot, best_idx)
    # The last slice of the row to finish merges (stores -> barrier -> release arrival -> acquire).
    tl.debug_barrier()
    if tl.atomic_add(counters_ptr + row, 1, sem="acq_rel", scope="gpu") == CHUNKS - 1:
        tl.atomic_xchg(counters_ptr + row, 0, sem="relaxed", scope="gpu")   # ready for the next launch
        offs_c = tl.arange(0, CHUNKS)
        vals = tl.load(part_val_ptr + row * CHUNKS + offs_c, cache_modifier=".cg")
        idxs = tl.load(part_idx_ptr + row * CHUNKS + offs_c, cache_modifier=".cg")
        m = tl.max(vals, axis=0)
        first = tl.min(tl.where(vals == m, offs_c, CHUNKS), axis=0)            # first slice with the max
        tl.store(out_ptr + row, tl.sum(tl.where(offs_c == first, idxs, 0), axis=0))


def argmax_rows_triton(x: torch.Tensor, chunks: int = 128) -> torch.Tensor:
    """`x.argmax(dim=-1)` for (B, V) float logits, int64 (B,), in one launch; `chunks` (a power
    of two) slices per row. No host sync, so it can sit in a CUDA graph or an async step."""
    if x.dim() != 2 or x.stride(1) != 1 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be (B, V) float, contiguous in V, got {tuple(x.shape)} {x.dtype}")
    if chunks < 1 or chunks & (chunks - 1):
        raise ValueError(f"chunks must be a power of two, got {chunks}")
    B, V = x.shape
    out = torch.empty(B, dtype=torch.int64, device=x.device)
    if B == 0:
        return out
    chunk = triton.cdiv(V, chunks)
    block = min(1024, triton.next_power_of_2(chunk))
    part_val = torch.empty((B, chunks), dtype=torch.float32, device=x.device)
    part_idx = torch.empty((B, chunks), dtype=torch.int64, device=x.device)
    _argmax_kernel[(B, chunks)](x, part_val, part_idx, arrival_counters(x.device, B), out, V, x.stride(0),
                                CHUNKS=chunks, CHUNK=chunk, BLOCK=block, num_warps=4)
    return out


__all__ = ["argmax_rows_triton"]
