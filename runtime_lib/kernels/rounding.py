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
    exactly representable in `dt`, so a later cast is exact). EMULATE_RNE: bf16 by integer ops.
    FP8 (e4m3) saturates at +-448 as `write_kv` does (the interpreter's cast wraps larger values)."""
    if dt == tl.float8e4nv:
        x = tl.where(x != x, x, tl.minimum(tl.maximum(x, -448.0), 448.0))
        if EMULATE_RNE:  # the interpreter casts fp32 -> e4m3 wrongly, but exact e4m3 values right
            bits = x.to(tl.uint32, bitcast=True)
            a = tl.abs(x)
            exp = ((bits >> 23) & 0xFF).to(tl.int32) - 127
            step = ((tl.maximum(exp, -6) + 124) << 23).to(tl.float32, bitcast=True)  # 2^(e-3); subnormal 2^-9
            r = ((a / step + 8388608.0) - 8388608.0) * step       # a / step < 16: + 2^23 rounds to even
            x = (r.to(tl.uint32, bitcast=True) | (bits & 0x80000000)).to(tl.float32, bitcast=True)
        return x.to(dt).to(tl.float32)
    if EMULATE_RNE and dt == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)            # round half to even on bit 16
        r = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
        return tl.where(x != x, x, r)                        # keep NaN a NaN
    return x.to(dt).to(tl.float32)


__all__ = ["interpreter_rounds_bf16", "round_to"]
