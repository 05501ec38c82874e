"""Triton linear layer for steps of a few rows (decode at batch <= 16), with the elementwise work
around it fused in.

A batch-1 decode step is a chain of GEMVs that each stream one weight matrix from HBM. What makes
it slower than its weight bytes are the small kernels between them (RMSNorm, SiLU*mul, residual
adds: ~5 launches per layer) and cuBLAS's split-K reduce launches. Here each GEMV does that work:

    prologue  "none"      a = x
              "rmsnorm"   a = norm_weight * (x * rsqrt(mean(x^2) + eps))     a Llama RMSNorm of x
              "silu_mul"  a = silu(x[:, :K]) * x[:, K:]                      the gated MLP's activation
    matmul    y = a @ weight.T (+ bias)                                      weight: (N, K), nn.Linear's
    epilogue  y = y + residual                                               optional

An FP8 (e4m3) weight comes with its per-output-channel `weight_scale` (layers/fp8_linear.py):
the tiles are widened after the load and each column's sum is scaled once at the end, so the
step streams half the bytes. The activations stay in the model dtype here (the batched path
quantizes them per token): a memory-bound GEMV gains nothing from FP8 arithmetic.

Every program recomputes its prologue from x (a few KB that stay in L2) instead of a launch
writing `a` to HBM; one program owns BLOCK_N whole output columns, so there is no split-K reduce.
Rounding: the RMSNorm is applied as a per-row scale after the dot product (the rows' sums of
squares accumulate in the same pass over x, so x is read once and no pass over it delays the
weight stream), which skips eager torch's two bf16 roundings of the normalised activation:
closer to the exact value, not bit-equal to eager bf16. SiLU*mul, the output and the residual
add round to the model dtype where eager torch does. In fp32 the fused layer equals the eager
one up to summation order.

One row (M == 1) runs a pure GEMV (multiply-accumulate in registers); 2..16 rows multiply a
16-row tile on the tensor cores (the padding rows cost arithmetic, which a memory-bound step has
to spare). The decode step uses only the one-row form: from two rows on, cuBLAS plus
torch.compile's fused elementwise kernels were faster on an H100 (bench/results/gpu_linear-*).
Launch shapes per device: small_linear_tuning.json, written by `bench/gpu_linear.py`.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from runtime_lib.config import FP8_DTYPE
from runtime_lib.kernels.paged_attention import device_parallelism, interpreter_dot_upcast, mma
from runtime_lib.kernels.pdl import first_tile_then_wait, prefetch_columns
from runtime_lib.kernels.rounding import interpreter_rounds_bf16, round_to

MAX_ROWS = 16
PROLOGUES = {"none": 0, "rmsnorm": 1, "silu_mul": 2}
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP8_WEIGHT_DTYPE = FP8_DTYPE


@triton.jit
def _mac_tile(acc, ss, w, x_rows, norm_w_ptr, offs_k, k_mask, m_mask, K,
              dt: tl.constexpr, PROLOGUE: tl.constexpr, BLOCK_M: tl.constexpr,
              INPUT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, RNE: tl.constexpr):
    """acc += prologue(x)[:, k-tile] times the (BN, BK) weight tile `w`; ss += rows' x^2."""
    a_mask = m_mask[:, None] & k_mask[None, :]
    if PROLOGUE == 2:
        g = tl.load(x_rows + offs_k[None, :], mask=a_mask, other=0.0).to(tl.float32)
        u = tl.load(x_rows + K + offs_k[None, :], mask=a_mask, other=0.0).to(tl.float32)
        s = round_to(g / (1.0 + tl.exp(-g)), dt, RNE)                             # silu, rounded
        a = round_to(s * u, dt, RNE).to(dt)                                        # (BM, BK)
    else:
        a = tl.load(x_rows + offs_k[None, :], mask=a_mask, other=0.0)
        if PROLOGUE == 1:
            # RMSNorm is a per-row scale: sum w * (norm_w * x) now, multiply by rsqrt(mean
            # x^2) at the end, so x is read once and no pass over it precedes the weights.
            af = a.to(tl.float32)
            ss += tl.sum(af * af, axis=1)
            nw = tl.load(norm_w_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            a = af * nw[None, :]
    if BLOCK_M == 1:
        acc += w.to(tl.float32) * a.to(tl.float32)                                 # (BN, BK)
    else:
        acc += mma(a.to(dt), tl.trans(w.to(dt)), INPUT_PRECISION, DOT_UPCAST)     # (BM, BN)
    return acc, ss


@triton.jit
def _small_linear_kernel(
    x_ptr, w_ptr, out_ptr, res_ptr, norm_w_ptr, bias_ptr, w_scale_ptr,
    M, N, K, stride_xm, stride_wn, stride_om, stride_rm, eps,
    PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_W_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, RNE: tl.constexpr, USE_PDL: tl.constexpr,
    PREFETCH_COLS: tl.constexpr,
):
    pid = tl.program_id(0)
    dt: tl.constexpr = x_ptr.dtype.element_ty   # the activations' (an FP8 weight is widened to it)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_k0 = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_m[:, None] * stride_xm                                   # (BM, 1)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn                       # (BN, 1)

    ss = tl.zeros([BLOCK_M], dtype=tl.float32)   # each row's sum of squares (RMSNorm), same pass
    if BLOCK_M == 1:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # x, the residual and the output are touched only after the wait (kernels/pdl.py); rows past
    # N are clamped for the prefetch, which has no mask.
    rows_in_range = tl.minimum(offs_n, N - 1).to(tl.int64)
    first_tile_then_wait(w_ptr + rows_in_range[:, None] * stride_wn, K, BLOCK_K, PREFETCH_COLS, USE_PDL)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + offs_k0
        k_mask = offs_k < K
        w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)  # (BN, BK)
        acc, ss = _mac_tile(acc, ss, w, x_rows, norm_w_ptr, offs_k, k_mask, m_mask, K,
                            dt, PROLOGUE, BLOCK_M, INPUT_PRECISION, DOT_UPCAST, RNE)

    if BLOCK_M == 1:
        y = tl.sum(acc, axis=1)[None, :]                                          # (1, BN)
    else:
        y = acc
    if PROLOGUE == 1:
        y = y * tl.rsqrt(ss / K + eps)[:, None]
    if HAS_W_SCALE:
        y = y * tl.load(w_scale_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y = round_to(y, dt, RNE)                                                       # the linear's output
    o_mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RES:
        r = tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=o_mask, other=0.0)
        y = round_to(y + r.to(tl.float32), dt, RNE)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], y.to(out_ptr.dtype.element_ty),
             mask=o_mask)


@dataclass(frozen=True)
class LinearTuning:
    """Launch shape of one small_linear call."""
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


SHIPPED_TUNING = Path(__file__).with_name("small_linear_tuning.json")
TUNING_ENV = "RUNTIME_LIB_SMALL_LINEAR_TABLE"  # a table from bench/gpu_linear.py, searched first


@functools.cache
def _tuning_table(path: str) -> dict[str, dict[str, dict[str, int]]]:
    """{device name: {"rows,n,k": {block_n, block_k, num_warps, num_stages}}}; {} when absent."""
    p = Path(path)
    return json.loads(p.read_text()) if p.is_file() else {}


def tuned(device_name: str, key: str) -> LinearTuning | None:
    for path in (os.environ.get(TUNING_ENV), SHIPPED_TUNING):
        entry = _tuning_table(str(path)).get(device_name, {}).get(key) if path else None
        if entry:
            return LinearTuning(**entry)
    return None


def row_class(num_rows: int) -> int:
    """1 row runs the GEMV form; 2..16 rows share the 16-row tensor-core tile. (A CUDA-core
    GEMV over 2..8 rows was 1.3-3x slower than cuBLAS on an H100: bench/results/gpu_linear-*.)"""
    return 1 if num_rows == 1 else MAX_ROWS


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def choose_tuning(num_rows: int, n: int, k: int, device: torch.device, fp8: bool = False) -> LinearTuning:
    """The tuned launch shape for this device and matrix, else a heuristic. One row: 8 weight
    rows per program, so there are many programs per SM and their loads, not the one program's
    dependency chain, keep HBM busy. Several rows: 16-row x 64-column tensor-core tiles.
    `fp8`: an FP8 weight, whose shapes the table keys "fp8:rows,n,k" (`bench/gpu_linear.py --fp8`)."""
    m = row_class(num_rows)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        found = tuned(_device_name(index), ("fp8:" if fp8 else "") + f"{m},{n},{k}")
        if found is not None:
            return found
    if m == 1:  # within ~5% of the best for every Llama matrix on an H100 (bench/gpu_linear.py)
        return LinearTuning(block_n=8, block_k=min(2048, triton.next_power_of_2(k)), num_warps=8, num_stages=3)
    block_n = 64 if triton.cdiv(n, 64) >= device_parallelism(device) else 32
    return LinearTuning(block_n=block_n, block_k=256, num_warps=4, num_stages=3)


def small_linear(x: torch.Tensor, weight: torch.Tensor, *, bias: torch.Tensor | None = None,
                 residual: torch.Tensor | None = None, prologue: str = "none",
                 norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                 out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
                 tuning: LinearTuning | None = None, pdl: bool = False,
                 weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """y = prologue(x) @ weight.T (+ bias) (+ residual) for 1..16 rows; see the module docstring.

    x: (M, K), or (M, 2K) for "silu_mul" (gate then up, as the fused gate_up projection writes
    them); weight: (N, K) in x's dtype, or e4m3 with `weight_scale` (N,) fp32; bias: (N,);
    residual: (M, N); norm_weight: (K,) for "rmsnorm".
    Returns (M, N) in `out_dtype` (default: x's dtype), rounded to x's dtype first.
    pdl: launch with programmatic dependent launch (kernels/pdl.py; caller checks `pdl_enabled`).
    Host-side checks only (no device sync), so the call can be captured in a CUDA graph."""
    if prologue not in PROLOGUES:
        raise ValueError(f"prologue must be one of {sorted(PROLOGUES)}, got {prologue!r}")
    if weight.dim() != 2 or weight.stride(1) != 1:
        raise ValueError(f"weight must be a 2-D (N, K) tensor contiguous in K, got shape {tuple(weight.shape)} "
                         f"strides {weight.stride()}")
    n, k = weight.shape
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be a 2-D (M, K) tensor contiguous in K, got shape {tuple(x.shape)}")
    m = x.shape[0]
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"x must have 1..{MAX_ROWS} rows, got {m}")
    want_k = 2 * k if prologue == "silu_mul" else k
    if x.shape[1] != want_k:
        raise ValueError(f"x has {x.shape[1]} columns; weight {tuple(weight.shape)} with prologue "
                         f"{prologue!r} needs {want_k}")
    if x.dtype not in SUPPORTED_DTYPES or weight.dtype not in (x.dtype, FP8_WEIGHT_DTYPE):
        raise ValueError(f"x must be one of {SUPPORTED_DTYPES} and weight x's dtype or {FP8_WEIGHT_DTYPE}, "
                         f"got {x.dtype}/{weight.dtype}")
    if (weight.dtype == FP8_WEIGHT_DTYPE) != (weight_scale is not None) or (
            weight_scale is not None and (weight_scale.shape != (n,) or weight_scale.dtype != torch.float32)):
        got = None if weight_scale is None else (tuple(weight_scale.shape), weight_scale.dtype)
        raise ValueError(f"an FP8 weight needs weight_scale of shape ({n},) float32 (and only an FP8 weight "
                         f"takes one), got {got}")
    if prologue == "rmsnorm" and (norm_weight is None or norm_weight.shape != (k,)):
        raise ValueError(f"prologue 'rmsnorm' needs norm_weight of shape ({k},), got "
                         f"{None if norm_weight is None else tuple(norm_weight.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if residual is not None and (residual.shape != (m, n) or residual.stride(1) != 1):
        raise ValueError(f"residual must be ({m}, {n}) contiguous in its last dim, got {tuple(residual.shape)}")
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype or x.dtype, device=x.device)
    if prologue == "silu_mul" and m > 1:
        # The tensor-core path keeps its weight loads pipelined only when the activation tile
        # is a plain load; an in-loop SiLU*mul stalls it (~3.5x slower on an H100), so
        # several rows compute the activation with torch first.
        gate, up = x.split(k, dim=-1)
        x, prologue = F.silu(gate) * up, "none"
    tuning = tuning or choose_tuning(m, n, k, x.device, weight.dtype == FP8_WEIGHT_DTYPE)
    block_m = row_class(m)
    _small_linear_kernel[(triton.cdiv(n, tuning.block_n),)](
        x, weight, out,
        residual if residual is not None else out,
        norm_weight if norm_weight is not None else weight,
        bias if bias is not None else weight,
        weight_scale if weight_scale is not None else weight,
        m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        residual.stride(0) if residual is not None else 0, eps,
        PROLOGUE=PROLOGUES[prologue], HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        HAS_W_SCALE=weight_scale is not None,
        BLOCK_M=block_m, BLOCK_N=tuning.block_n, BLOCK_K=tuning.block_k,
        INPUT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        DOT_UPCAST=interpreter_dot_upcast(x.dtype), RNE=interpreter_rounds_bf16(), USE_PDL=pdl,
        PREFETCH_COLS=prefetch_columns(tuning.block_k, weight.dtype),
        num_warps=tuning.num_warps, num_stages=tuning.num_stages, launch_pdl=pdl,
    )
    return out


def small_linear_torch(x: torch.Tensor, weight: torch.Tensor, *, bias: torch.Tensor | None = None,
                       residual: torch.Tensor | None = None, prologue: str = "none",
                       norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                       out_dtype: torch.dtype | None = None, weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The same function from the model's eager torch ops: the reference for tests (an FP8
    weight is dequantized to x's dtype first)."""
    if weight_scale is not None:
        weight = (weight.float() * weight_scale[:, None]).to(x.dtype)
    if prologue == "rmsnorm":
        xf = x.float()
        a = norm_weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    elif prologue == "silu_mul":
        gate, up = x.split(weight.shape[1], dim=-1)
        a = F.silu(gate) * up
    else:
        a = x
    y = F.linear(a, weight, bias)
    if residual is not None:
        y = residual + y
    return y.to(out_dtype or x.dtype)


__all__ = ["MAX_ROWS", "FP8_WEIGHT_DTYPE", "LinearTuning", "choose_tuning", "small_linear", "small_linear_torch"]
