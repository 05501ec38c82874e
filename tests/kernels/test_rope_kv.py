"""The fused RoPE + paged KV-write kernel (`rope_kv_write`) is bit-identical to the eager torch
path (`apply_rotary` with cos/sin cast to the activation dtype, then `write_kv`) for fp32, bf16
and fp16, and writes nothing but the slots it is given.

Runs on CPU under TRITON_INTERPRET=1 (conftest.py); one GPU test compares the compiled kernel.
Every case reads q/k/v out of a wider tensor (row stride > width), uses unsorted positions and
shuffled slots spread over several blocks, and starts from a cache full of a sentinel.
"""
from __future__ import annotations

import types
from dataclasses import dataclass

import pytest
import torch

from runtime_lib.config import FP8_KV_DTYPE, FP8_KV_MAX
from runtime_lib.layers.rotary import RotaryEmbedding

SENTINEL = -1234.0  # exactly representable in fp16, bf16 and fp32
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}


@pytest.fixture(scope="module")
def rope_kv(interpreted) -> types.ModuleType:
    """The kernel module with its kernel interpreted."""
    from runtime_lib.kernels import rope_kv

    return interpreted(rope_kv, "_rope_kv_kernel")


@dataclass
class Case:
    qkv: torch.Tensor            # (T, (h + 2kvh) * d), a column slice of a wider tensor
    positions: torch.Tensor      # (T,)
    cos: torch.Tensor            # (P, d/2) fp32
    sin: torch.Tensor
    kv: torch.Tensor             # (2, num_blocks, block_size, kvh, d), all SENTINEL
    slots: torch.Tensor          # (T,) int64
    num_heads: int
    num_kv_heads: int

    def args(self, kv: torch.Tensor) -> tuple:
        return (self.qkv, self.positions, self.cos, self.sin, kv, self.slots, self.num_heads,
                self.num_kv_heads)


def make_case(*, T: int = 5, num_heads: int = 4, num_kv_heads: int = 2, head_size: int = 64,
              dtype: torch.dtype = torch.float32, kv_dtype: torch.dtype | None = None,
              block_size: int = 4, num_blocks: int = 6, rope_scaling: dict | None = None,
              max_positions: int = 64, seed: int = 0, device: str = "cpu") -> Case:
    gen = torch.Generator().manual_seed(seed)
    width = (num_heads + 2 * num_kv_heads) * head_size
    # Scale 3 so products and sums land on many binades: every rounding step shows.
    wide = torch.randn(T, width + 24, generator=gen) * 3
    qkv = wide.to(dtype)[:, 8:8 + width]
    assert qkv.stride(0) > width
    positions = torch.randperm(max_positions, generator=gen)[:T]       # unsorted, distinct
    rotary = RotaryEmbedding(head_size, max_positions, rope_scaling=rope_scaling)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:T]  # shuffled, across blocks
    kv = torch.full((2, num_blocks, block_size, num_kv_heads, head_size), SENTINEL).to(kv_dtype or dtype)
    return Case(qkv.to(device), positions.to(device), rotary.cos_cache.to(device),
                rotary.sin_cache.to(device), kv.to(device), slots.to(device), num_heads, num_kv_heads)


def run_both(mod: types.ModuleType, case: Case, **kw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                  torch.Tensor]:
    kv_kernel, kv_ref = case.kv.clone(), case.kv.clone()
    q_kernel = mod.rope_kv_write(*case.args(kv_kernel), **kw)
    q_ref = mod.rope_kv_write_torch(*case.args(kv_ref))
    return q_kernel, kv_kernel, q_ref, kv_ref


def assert_untouched_outside(kv: torch.Tensor, slots: torch.Tensor) -> None:
    flat = kv.view(2, kv.shape[1] * kv.shape[2], *kv.shape[3:])
    others = torch.ones(flat.shape[1], dtype=torch.bool, device=kv.device)
    others[slots] = False
    assert (flat[:, others] == SENTINEL).all(), "a slot not in slot_mapping was written"
    assert not (flat[:, slots] == SENTINEL).all(), "the named slots were not written"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 2), (2, 2)], ids=["gqa", "mha"])
@pytest.mark.parametrize("head_size", [16, 64, 128])
def test_kernel_equals_torch_path_bit_for_bit(rope_kv, dtype, num_heads, num_kv_heads, head_size):
    case = make_case(num_heads=num_heads, num_kv_heads=num_kv_heads, head_size=head_size, dtype=dtype,
                     seed=head_size)
    q, kv, q_ref, kv_ref = run_both(rope_kv, case)
    assert q.dtype == dtype and q.shape == (5, num_heads, head_size)
    assert torch.equal(q, q_ref)
    assert torch.equal(kv, kv_ref)
    assert_untouched_outside(kv, case.slots)


def test_reference_is_what_the_llama_layer_does(rope_kv):
    """The reference itself: RotaryEmbedding.forward + write_kv on the split projection."""
    from runtime_lib.layers.attention import write_kv

    case = make_case(dtype=torch.bfloat16, head_size=16)
    h, kvh, d = 4, 2, 16
    q, k, v = case.qkv.split([h * d, kvh * d, kvh * d], dim=-1)
    rotary = RotaryEmbedding(d, 64)
    q_rot, k_rot = rotary(case.positions, q.reshape(-1, h, d), k.reshape(-1, kvh, d))
    kv_layer = case.kv.clone()
    write_kv(kv_layer, k_rot, v.reshape(-1, kvh, d), case.slots)
    kv_ref = case.kv.clone()
    assert torch.equal(rope_kv.rope_kv_write_torch(*case.args(kv_ref)), q_rot)
    assert torch.equal(kv_ref, kv_layer)


def test_bf16_rounds_after_each_op_like_torch(rope_kv):
    """Computing the rotation in fp32 and rounding once would differ from torch somewhere here."""
    case = make_case(dtype=torch.bfloat16, head_size=128, T=8, seed=3)
    q, _, q_ref, _ = run_both(rope_kv, case)
    h, d = 4, 128
    x = case.qkv[:, :h * d].float().view(-1, h, d)
    cos = case.cos[case.positions].to(torch.bfloat16).float()
    sin = case.sin[case.positions].to(torch.bfloat16).float()
    from runtime_lib.layers.rotary import apply_rotary
    once = apply_rotary(x, cos, sin).to(torch.bfloat16)
    assert not torch.equal(once, q_ref), "test data too easy: single rounding matches"
    assert torch.equal(q, q_ref)


def test_llama3_scaled_cos_sin(rope_kv):
    case = make_case(dtype=torch.bfloat16, head_size=64, rope_scaling=LLAMA3_SCALING, seed=7)
    plain = make_case(dtype=torch.bfloat16, head_size=64, seed=7)
    assert not torch.equal(case.cos, plain.cos)  # the scaling really changes the frequencies
    q, kv, q_ref, kv_ref = run_both(rope_kv, case)
    assert torch.equal(q, q_ref) and torch.equal(kv, kv_ref)


@pytest.mark.parametrize("dtype, kv_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.bfloat16)])
def test_cache_of_another_dtype_is_cast_on_store(rope_kv, dtype, kv_dtype):
    case = make_case(dtype=dtype, kv_dtype=kv_dtype, head_size=16, seed=11)
    q, kv, q_ref, kv_ref = run_both(rope_kv, case)
    assert q.dtype == dtype and kv.dtype == kv_dtype
    assert torch.equal(q, q_ref) and torch.equal(kv, kv_ref)
    assert_untouched_outside(kv, case.slots)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp8_cache_is_rounded_to_nearest_even_and_saturates_like_write_kv(rope_kv, dtype):
    # Values from ~1e-4 (e4m3 subnormals) to ~3e3 (past its 448 maximum): the kernel's stores
    # equal write_kv's clamp-then-cast byte for byte.
    case = make_case(dtype=dtype, kv_dtype=FP8_KV_DTYPE, head_size=16, seed=13)
    scales = 10.0 ** (torch.arange(case.qkv.shape[1]) % 16 * (7 / 15) - 4)  # 1e-4 .. 1e3 in every head
    scales = scales.to(dtype)
    case.qkv.mul_(scales)
    q, kv, q_ref, kv_ref = run_both(rope_kv, case)
    assert q.dtype == dtype and kv.dtype == FP8_KV_DTYPE
    assert torch.equal(q, q_ref)
    bits, bits_ref = kv.view(torch.uint8), kv_ref.view(torch.uint8)
    assert torch.equal(bits, bits_ref)
    written = kv_ref.float().view(2, -1, *kv.shape[3:])[:, case.slots]
    assert not torch.isnan(written).any()
    assert written.abs().amax() == FP8_KV_MAX                  # some values saturated
    assert ((written != 0) & (written.abs() < 2 ** -6)).any()  # some are subnormal


def test_int32_positions_and_slots_and_out_buffer(rope_kv):
    case = make_case(dtype=torch.float16, head_size=16, seed=5)
    q_ref = rope_kv.rope_kv_write_torch(*case.args(case.kv.clone()))
    case.positions, case.slots = case.positions.int(), case.slots.int()
    # out: a strided view (T, h, d) of a bigger buffer, as a caller's preallocated q might be.
    buf = torch.zeros(5, 6, 16, dtype=torch.float16)
    out = buf[:, 1:5]
    kv = case.kv.clone()
    got = rope_kv.rope_kv_write(*case.args(kv), out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(out, q_ref)
    assert (buf[:, 0] == 0).all() and (buf[:, 5] == 0).all()
    assert_untouched_outside(kv, case.slots.long())


def test_padding_rows_on_one_scratch_slot_and_empty_batch(rope_kv):
    """Padding rows all point at one scratch slot; the real rows' slots are still exact."""
    case = make_case(dtype=torch.bfloat16, head_size=16, T=4, seed=9)
    case.slots = torch.tensor([5, 0, 0, 17])   # rows 1 and 2 are padding on scratch slot 0
    case.qkv[2] = case.qkv[1]                 # identical padding rows: the write order is moot
    case.positions[2] = case.positions[1]
    q, kv, q_ref, kv_ref = run_both(rope_kv, case)
    assert torch.equal(q, q_ref) and torch.equal(kv, kv_ref)

    empty = make_case(T=0, head_size=16)
    kv = empty.kv.clone()
    assert rope_kv.rope_kv_write(*empty.args(kv)).shape == (0, 4, 16)
    assert (kv == SENTINEL).all()


def test_validation_errors_name_the_field(rope_kv):
    case = make_case(head_size=16)
    args = dict(qkv=case.qkv, positions=case.positions, cos_cache=case.cos, sin_cache=case.sin,
                kv_layer=case.kv, slot_mapping=case.slots, num_heads=4, num_kv_heads=2)

    def expect(match: str, **changes) -> None:
        for fn in (rope_kv.rope_kv_write, rope_kv.rope_kv_write_torch):
            with pytest.raises(ValueError, match=match):
                fn(**{**args, **changes})

    rot = RotaryEmbedding(24, 64)
    expect(r"head_size must be a power of two in \[16, 256\], got 24",
           qkv=torch.zeros(5, 8 * 24), cos_cache=rot.cos_cache, sin_cache=rot.sin_cache,
           kv_layer=torch.zeros(2, 6, 4, 2, 24))
    expect(r"head_size must be a power of two in \[16, 256\], got 8", kv_layer=torch.zeros(2, 6, 4, 2, 8))
    expect(r"head_size must be a power of two in \[16, 256\], got 512", kv_layer=torch.zeros(2, 6, 4, 2, 512))
    expect(r"kv_layer must be \(2, num_blocks", kv_layer=torch.zeros(6, 4, 2, 16))
    expect(r"num_heads=3 must be a positive multiple of num_kv_heads=2", num_heads=3)
    expect(r"kv_layer.shape\[3\] must equal num_kv_heads=1", num_heads=4, num_kv_heads=1)
    expect(r"qkv must be \(tokens, \(num_heads \+ 2\*num_kv_heads\) \* head_size = 128\)",
           qkv=torch.zeros(5, 112))
    expect(r"dtype must be one of", qkv=case.qkv.double())
    expect(r"dtype must be one of", kv_layer=case.kv.to(torch.float64))
    expect(r"qkv and kv_layer must be contiguous in the last dim", qkv=torch.zeros(128, 5).t())
    expect(r"positions must be \(5,\) int32 or int64", positions=case.positions.float())
    expect(r"positions must be \(5,\) int32 or int64", positions=case.positions[:4])
    expect(r"slot_mapping must be \(5,\) int64", slot_mapping=case.slots.float())
    expect(r"cos_cache must be \(max_positions, head_size/2=8\) float32", cos_cache=case.cos.half())
    expect(r"sin_cache must be \(max_positions, head_size/2=8\) float32", sin_cache=case.sin[:, :4])
    expect(r"out must be \(5, 4, 16\) torch.float32", out=torch.zeros(5, 4, 16, dtype=torch.float16))
    expect(r"out must be \(5, 4, 16\) torch.float32", out=torch.zeros(5, 2, 16))
