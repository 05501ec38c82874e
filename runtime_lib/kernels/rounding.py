"""Rounding fp32 values to the model dtype inside Triton kernels, the way eager torch does.

Kernels that must compute what a chain of eager bf16/fp16 ops computes round after each op.
Triton 3.6's CPU interpreter converts fp32 to bf16 by truncation (compiled kernels round to
nearest even), so a kernel that is checked bit for bit on CPU rounds bf16 with integer ops."""
from __future__ import annotations

import triton
import triton.language as tl


def interpreter_rounds_bf16() -> bool:
    """True under TRITON_INTERPRET: pass as `round_to`'s EMULATE_RNE so CPU tests see GPU bits."""
    return bool(triton.knobs.runtime.interpret)


@triton.jit
def round_to(x, dt: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """fp32 x rounded to nearest-even in `dt`, returned as fp32 (the value the next op reads;
    exactly representable in `dt`, so a later cast is exact). EMULATE_RNE: bf16 by integer ops."""
    if EMULATE_RNE and dt == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)            # round half to even on bit 16
        r = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
        return tl.where(x != x, x, r)                        # keep NaN a NaN
    return x.to(dt).to(tl.float32)


__all__ = ["interpreter_rounds_bf16", "round_to"]
