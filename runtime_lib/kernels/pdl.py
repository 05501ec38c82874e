"""Programmatic dependent launch (PDL) for chains of dependent Triton kernels (Hopper and later).

In a batch-1 decode step each kernel streams a few MB of weights and then waits for its
successor's launch, ramp-up and first DRAM round trip: on an H100 that costs a few µs per
kernel, ~80 times a step. A kernel launched with PDL (`launch_pdl=True`) may start while its
predecessor still runs; it loads what does not depend on the predecessor (its weights) and then
waits (`griddepcontrol.wait`) for the predecessor to finish and its writes to be visible.

The rule every PDL kernel follows: nothing the previous kernels write is read, and nothing they
read is written, before `wait_for_previous`. Before it, a GEMV only asks L2 for its first weight
tile (`prefetch_l2`: a hint that holds no registers, so the main loop and its software
pipelining stay exactly as without PDL; peeling the first tile into registers instead cost the
8B step 10% on an H100). Completion is transitive (each kernel finishes only
after its own wait returned), so a chain of such kernels is ordered like plain stream order.
CUDA graphs keep the programmatic edges when the chain is captured.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

DISABLE_ENV = "RUNTIME_LIB_PDL"  # "0": launch every kernel in plain stream order


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL: CUDA sm_90+, not under TRITON_INTERPRET,
    and not switched off by RUNTIME_LIB_PDL=0."""
    from ..cuda_graph import switched_off_by_env

    if device.type != "cuda" or triton.knobs.runtime.interpret or switched_off_by_env(DISABLE_ENV):
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability(index) >= (9, 0)


@triton.jit
def wait_for_previous(USE_PDL: tl.constexpr):
    """Block until the previous kernel in the stream has finished, then let the next kernel
    launch (its programs start once all of ours are past this point). No-op without PDL."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs, USE_PDL: tl.constexpr):
    """Start pulling the cache lines at `ptrs` (valid addresses, one per 128-byte line is
    enough) into L2; no-op without PDL."""
    if USE_PDL:
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // dummy $0", "=r,l", [ptrs], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def first_tile_then_wait(w_rows, K, BLOCK_K: tl.constexpr, PREFETCH_COLS: tl.constexpr, USE_PDL: tl.constexpr):
    """A GEMV's PDL prologue: ask L2 for the first (rows, BLOCK_K) tile of its weights (which
    no earlier kernel writes), then wait for the previous kernel. `w_rows`: (BN, 1) pointers
    to valid weight rows. No-op without PDL."""
    if USE_PDL:
        cols = tl.minimum(tl.arange(0, PREFETCH_COLS) * (BLOCK_K // PREFETCH_COLS), K - 1)
        prefetch_l2(w_rows + cols[None, :], USE_PDL)
        wait_for_previous(USE_PDL)


def prefetch_columns(block_k: int, dtype: torch.dtype) -> int:
    """How many columns of a BLOCK_K-wide weight tile `prefetch_l2` touches: one per 128 bytes."""
    return max(1, block_k * dtype.itemsize // 128)


__all__ = ["DISABLE_ENV", "first_tile_then_wait", "pdl_enabled", "prefetch_columns", "prefetch_l2",
           "wait_for_previous"]
