"""Fused Gumbel-max sampling on the GPU: per row, argmax over candidates of
`logit + Gumbel(seed, step, vocab id)` in one pass, the noise made in registers.

The noise is the same counter-based splitmix64 as `runtime_lib.sampling_ops.uniform_noise`
(integer part bit-identical), so a row's choice does not depend on the batch around it. The
torch version materialises ~15 (S, K) int64 temporaries; this kernel reads the logits once.
Grid: one program per row, looping over the candidates in blocks.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _mix64(z):
    # splitmix64 finaliser on uint64 (shifts are logical, multiplies wrap)
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


@triton.jit
def _gumbel_argmax_kernel(vals_ptr, idx_ptr, seeds_ptr, steps_ptr, out_ptr, K, stride_v, stride_i,
                          HAS_IDX: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    seed = tl.load(seeds_ptr + row).to(tl.uint64, bitcast=True)
    step = tl.load(steps_ptr + row).to(tl.uint64, bitcast=True)
    gamma = tl.full((), 0x9E3779B97F4A7C15, tl.uint64)
    salt = tl.full((), 0x2545F4914F6CDD1D, tl.uint64)
    key = _mix64(seed ^ _mix64(step * gamma + salt))
    best_val = tl.full((), float("-inf"), tl.float32)
    best_pos = tl.full((), 0, tl.int64)
    for start in range(0, K, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < K
        v = tl.load(vals_ptr + row * stride_v + offs, mask=mask, other=float("-inf"))
        if HAS_IDX:
            ids = tl.load(idx_ptr + row * stride_i + offs, mask=mask, other=0).to(tl.uint64, bitcast=True)
        else:
            ids = offs.to(tl.uint64)
        z = _mix64(key + (ids + 1) * gamma)
        u = ((z >> 41).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # (k + 0.5) / 2**23
        score = tl.where(mask, v - tl.log(-tl.log(u)), float("-inf"))
        blk_max = tl.max(score, axis=0)
        blk_pos = tl.argmax(score, axis=0)
        better = blk_max > best_val  # strict: the first maximum wins, as torch.argmax
        best_pos = tl.where(better, start + blk_pos.to(tl.int64), best_pos)
        best_val = tl.where(better, blk_max, best_val)
    tl.store(out_ptr + row, best_pos)


def gumbel_argmax(vals: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
                  idx: torch.Tensor | None = None, block: int = 2048) -> torch.Tensor:
    """Position (S,) int64 of argmax over k of `vals[s, k] + Gumbel(seeds[s], steps[s], id)`,
    where id = idx[s, k], or k when `idx` is None.

    vals (S, K) float32 (-inf = excluded), seeds/steps (S,) int64, idx (S, K) int64.
    """
    S, K = vals.shape
    if vals.dtype != torch.float32 or vals.stride(1) != 1:
        raise ValueError(f"vals must be float32 with unit stride in K, got {vals.dtype} strides {vals.stride()}")
    if idx is not None and (idx.shape != vals.shape or idx.dtype != torch.int64 or idx.stride(1) != 1):
        raise ValueError(f"idx must be int64 {tuple(vals.shape)} with unit stride in K, "
                         f"got {idx.dtype} {tuple(idx.shape)} strides {idx.stride()}")
    out = torch.empty(S, dtype=torch.int64, device=vals.device)
    if S == 0:
        return out
    BLOCK = min(block, triton.next_power_of_2(max(K, 16)))
    _gumbel_argmax_kernel[(S,)](
        vals, idx if idx is not None else vals, seeds.contiguous(), steps.contiguous(), out, K,
        vals.stride(0), idx.stride(0) if idx is not None else 0,
        HAS_IDX=idx is not None, BLOCK=BLOCK)
    return out


__all__ = ["gumbel_argmax"]
