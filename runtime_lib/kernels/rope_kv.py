"""Fused rotary embedding + paged KV-cache write: one Triton launch per layer instead of a
RoPE kernel plus two `index_copy_` launches.

Reads the fused qkv projection output directly, rotates the query heads into `out`, rotates
the key heads and scatters them into `kv_layer[0]`, and copies the value heads (unrotated)
into `kv_layer[1]`, each token at its flat `slot_mapping` slot. Grid (T, h + 2*kvh): program
(t, j) handles one head of one token: a q head (j < h), a k head (h <= j < h+kvh) or a v head.

Bit-exact with the eager torch path (`rope_kv_write_torch`: `apply_rotary` with cos/sin cast to
the activation dtype, then `write_kv`): torch does each fp16/bf16 elementwise op in fp32 and
rounds to the dtype after each op, so the kernel rounds cos/sin, both products and the sum to
the activation dtype one by one, and compiles with fp contraction off so fp32 mul+sub never
becomes one FMA (eager torch rounds each product to fp32 in memory).

Cache layout (see runtime_lib/layers/attention.py):
    kv_layer: (2, num_blocks, block_size, num_kv_heads, head_size), slot = block * block_size + offset
No host<->device syncs and no data-dependent shapes: CUDA-graph capturable. Positions must lie
inside the cos/sin caches and slots inside the cache; they are not checked (that would need a
sync). Padding rows point at a scratch block and are written like any other row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layers.attention import write_kv
from ..layers.rotary import apply_rotary
from .paged_attention import KV_DTYPES
from .pdl import wait_for_previous
from .rounding import round_to

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)
MIN_HEAD_SIZE, MAX_HEAD_SIZE = 16, 256


@triton.jit
def _rope_kv_kernel(
    qkv_ptr, positions_ptr, cos_ptr, sin_ptr, slot_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
    stride_qkv_t, stride_cos_p, stride_sin_p,
    stride_out_t, stride_out_h,
    stride_kv_blk, stride_kv_slot, stride_kv_head,
    num_heads, num_kv_heads,
    BLOCK_SIZE: tl.constexpr, HEAD_SIZE: tl.constexpr, USE_PDL: tl.constexpr,
):
    wait_for_previous(USE_PDL)                  # qkv comes from the previous kernel
    tok = tl.program_id(0)
    head = tl.program_id(1)                     # 0..h-1 q, h..h+kvh-1 k, then v
    HALF: tl.constexpr = HEAD_SIZE // 2
    offs = tl.arange(0, HALF)
    # bf16 rounds by integer ops (EMULATE_RNE=True) on CPU and GPU alike: the same bits as the
    # GPU's cvt.rn, and the interpreter's truncating cast never enters the bit-exact tests.
    dt: tl.constexpr = qkv_ptr.dtype.element_ty
    kv_dt: tl.constexpr = k_cache_ptr.dtype.element_ty
    # int64 throughout: T * row stride and slot * slot stride overflow int32 on large caches.
    row = qkv_ptr + tok.to(tl.int64) * stride_qkv_t + head.to(tl.int64) * HEAD_SIZE
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    kv_off = (slot // BLOCK_SIZE) * stride_kv_blk + (slot % BLOCK_SIZE) * stride_kv_slot

    if head < num_heads + num_kv_heads:
        pos = tl.load(positions_ptr + tok).to(tl.int64)
        # cos/sin are rounded to the activation dtype first, as `cos.to(q.dtype)` in torch.
        c = round_to(tl.load(cos_ptr + pos * stride_cos_p + offs), dt, True)          # (HALF,) fp32
        s = round_to(tl.load(sin_ptr + pos * stride_sin_p + offs), dt, True)
        x1 = tl.load(row + offs).to(tl.float32)                                     # (HALF,)
        x2 = tl.load(row + HALF + offs).to(tl.float32)
        # Each op rounds to the activation dtype (a no-op for fp32), as eager torch does.
        x1c = round_to(x1 * c, dt, True)
        x2s = round_to(x2 * s, dt, True)
        x2c = round_to(x2 * c, dt, True)
        x1s = round_to(x1 * s, dt, True)
        o1 = round_to(x1c - x2s, dt, True)                                          # (HALF,) fp32
        o2 = round_to(x2c + x1s, dt, True)
        if head < num_heads:
            q_dst = q_out_ptr + tok.to(tl.int64) * stride_out_t + head.to(tl.int64) * stride_out_h
            tl.store(q_dst + offs, o1.to(dt))  # exact: o1 is representable in dt
            tl.store(q_dst + HALF + offs, o2.to(dt))
        else:
            # torch casts the rotated k (already in dt) to the cache dtype: one more rounding.
            # (Distinct names per branch: compiled Triton needs one type per name across an if.)
            k_dst = k_cache_ptr + kv_off + (head - num_heads).to(tl.int64) * stride_kv_head
            tl.store(k_dst + offs, round_to(o1, kv_dt, True).to(kv_dt))
            tl.store(k_dst + HALF + offs, round_to(o2, kv_dt, True).to(kv_dt))
    else:
        offs_d = tl.arange(0, HEAD_SIZE)
        v = tl.load(row + offs_d).to(tl.float32)                                    # (HEAD_SIZE,)
        v_dst = v_cache_ptr + kv_off + (head - num_heads - num_kv_heads).to(tl.int64) * stride_kv_head
        tl.store(v_dst + offs_d, round_to(v, kv_dt, True).to(kv_dt))


def check_rope_kv_inputs(qkv: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor,
                         sin_cache: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor,
                         num_heads: int, num_kv_heads: int, out: torch.Tensor | None) -> int:
    """Shape/dtype/device checks (host-only, no sync). Returns head_size."""
    if kv_layer.dim() != 5 or kv_layer.shape[0] != 2:
        raise ValueError(f"kv_layer must be (2, num_blocks, block_size, num_kv_heads, head_size), "
                         f"got shape {tuple(kv_layer.shape)}")
    head_size = kv_layer.shape[4]
    if head_size < MIN_HEAD_SIZE or head_size > MAX_HEAD_SIZE or head_size & (head_size - 1):
        raise ValueError(f"head_size must be a power of two in [{MIN_HEAD_SIZE}, {MAX_HEAD_SIZE}], "
                         f"got {head_size}")
    if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be a positive multiple of num_kv_heads={num_kv_heads}")
    if kv_layer.shape[3] != num_kv_heads:
        raise ValueError(f"kv_layer.shape[3] must equal num_kv_heads={num_kv_heads}, "
                         f"got shape {tuple(kv_layer.shape)}")
    width = (num_heads + 2 * num_kv_heads) * head_size
    if qkv.dim() != 2 or qkv.shape[1] != width:
        raise ValueError(f"qkv must be (tokens, (num_heads + 2*num_kv_heads) * head_size = {width}), "
                         f"got shape {tuple(qkv.shape)}")
    T = qkv.shape[0]
    if qkv.dtype not in SUPPORTED_DTYPES or kv_layer.dtype not in KV_DTYPES:
        raise ValueError(f"qkv dtype must be one of {SUPPORTED_DTYPES} and kv_layer dtype one of {KV_DTYPES}, "
                         f"got {qkv.dtype}/{kv_layer.dtype}")
    if qkv.stride(1) != 1 or kv_layer.stride(4) != 1:
        raise ValueError(f"qkv and kv_layer must be contiguous in the last dim (stride 1), "
                         f"got qkv.stride()={qkv.stride()}, kv_layer.stride()={kv_layer.stride()}")
    if positions.shape != (T,) or positions.dtype not in INDEX_DTYPES:
        raise ValueError(f"positions must be ({T},) int32 or int64, got shape {tuple(positions.shape)} "
                         f"{positions.dtype}")
    if slot_mapping.shape != (T,) or slot_mapping.dtype not in INDEX_DTYPES:
        raise ValueError(f"slot_mapping must be ({T},) int64 (or int32), got shape "
                         f"{tuple(slot_mapping.shape)} {slot_mapping.dtype}")
    for name, cache in (("cos_cache", cos_cache), ("sin_cache", sin_cache)):
        if cache.dim() != 2 or cache.shape[1] != head_size // 2 or cache.dtype != torch.float32:
            raise ValueError(f"{name} must be (max_positions, head_size/2={head_size // 2}) float32, "
                             f"got shape {tuple(cache.shape)} {cache.dtype}")
        if cache.stride(1) != 1:
            raise ValueError(f"{name} must be contiguous in the last dim, got stride {cache.stride()}")
    if out is not None:
        if out.shape != (T, num_heads, head_size) or out.dtype != qkv.dtype:
            raise ValueError(f"out must be ({T}, {num_heads}, {head_size}) {qkv.dtype}, "
                             f"got shape {tuple(out.shape)} {out.dtype}")
        if out.stride(2) != 1:
            raise ValueError(f"out must be contiguous in the last dim, got stride {out.stride()}")
    tensors = {"qkv": qkv, "positions": positions, "cos_cache": cos_cache, "sin_cache": sin_cache,
               "kv_layer": kv_layer, "slot_mapping": slot_mapping}
    if out is not None:
        tensors["out"] = out
    for name, t in tensors.items():
        if t.device != qkv.device:
            raise ValueError(f"{name} is on {t.device}, expected qkv's device {qkv.device}")
    return head_size


def rope_kv_write(qkv: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor,
                  sin_cache: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor,
                  num_heads: int, num_kv_heads: int, out: torch.Tensor | None = None,
                  pdl: bool = False) -> torch.Tensor:
    """Rotate q and k of the fused projection, write k/v into the paged cache; one launch.

    qkv: (T, (h + 2*kvh) * d), last dim contiguous (row stride may be larger); positions: (T,)
    int32/int64; cos_cache/sin_cache: (P, d/2) float32 (RotaryEmbedding's buffers);
    kv_layer: (2, num_blocks, block_size, kvh, d), any supported dtype (cast on store);
    slot_mapping: (T,) flat slots. Returns q rotated as (T, h, d) in qkv's dtype (into `out`).
    pdl: launch with programmatic dependent launch (kernels/pdl.py).
    """
    head_size = check_rope_kv_inputs(qkv, positions, cos_cache, sin_cache, kv_layer, slot_mapping,
                                     num_heads, num_kv_heads, out)
    T = qkv.shape[0]
    if out is None:
        out = torch.empty((T, num_heads, head_size), dtype=qkv.dtype, device=qkv.device)
    if T == 0:
        return out
    k_cache, v_cache = kv_layer[0], kv_layer[1]   # (num_blocks, block_size, kvh, d) views
    _rope_kv_kernel[(T, num_heads + 2 * num_kv_heads)](
        qkv, positions, cos_cache, sin_cache, slot_mapping, out, k_cache, v_cache,
        qkv.stride(0), cos_cache.stride(0), sin_cache.stride(0),
        out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        num_heads, num_kv_heads,
        BLOCK_SIZE=kv_layer.shape[2], HEAD_SIZE=head_size, USE_PDL=pdl,
        num_warps=1 if head_size <= 128 else 2, launch_pdl=pdl,
        enable_fp_fusion=False,  # eager torch never fuses x1*cos - x2*sin into one FMA
    )
    return out


def rope_kv_write_torch(qkv: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor,
                        sin_cache: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor,
                        num_heads: int, num_kv_heads: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The plain-torch reference and CPU fallback of `rope_kv_write` (same contract): what
    LlamaAttention does eagerly, `apply_rotary` + `write_kv`."""
    head_size = check_rope_kv_inputs(qkv, positions, cos_cache, sin_cache, kv_layer, slot_mapping,
                                     num_heads, num_kv_heads, out)
    T = qkv.shape[0]
    q_size, kv_size = num_heads * head_size, num_kv_heads * head_size
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q = q.view(T, num_heads, head_size)
    k = k.view(T, num_kv_heads, head_size)
    v = v.view(T, num_kv_heads, head_size)
    cos = cos_cache[positions].to(qkv.dtype)                       # (T, d/2)
    sin = sin_cache[positions].to(qkv.dtype)
    q = apply_rotary(q, cos, sin)                                  # (T, h, d)
    k = apply_rotary(k, cos, sin)                                  # (T, kvh, d)
    write_kv(kv_layer, k, v, slot_mapping.long())
    if out is None:
        return q
    return out.copy_(q)


__all__ = ["rope_kv_write", "rope_kv_write_torch", "check_rope_kv_inputs", "SUPPORTED_DTYPES"]
