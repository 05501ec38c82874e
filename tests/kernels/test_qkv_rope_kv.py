"""The one-row qkv projection with RoPE and the K/V write in its epilogue (`qkv_rope_kv`) equals
the two launches it replaces, `rope_kv_write(small_linear(x, W, prologue="rmsnorm"))`, bit for
bit (bf16, fp16 and fp32 on the interpreter), and writes nothing but the one slot.

Runs on CPU under TRITON_INTERPRET=1 (conftest.py)."""
from __future__ import annotations

import types

import pytest
import torch

from runtime_lib.config import FP8_KV_DTYPE
from runtime_lib.kernels.small_linear import LinearTuning
from runtime_lib.layers.rotary import RotaryEmbedding

SENTINEL = -1234.0
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}


@pytest.fixture(scope="module")
def mods(interpreted) -> types.SimpleNamespace:
    """The three kernel modules, interpreted (dependencies first)."""
    from runtime_lib.kernels import qkv_rope_kv, rope_kv, small_linear

    small_linear = interpreted(small_linear, "_small_linear_kernel")
    rope_kv = interpreted(rope_kv, "_rope_kv_kernel")
    qkv_rope_kv = interpreted(qkv_rope_kv, "_qkv_rope_kv_kernel")
    return types.SimpleNamespace(fused=qkv_rope_kv.qkv_rope_kv, linear=small_linear.small_linear,
                                 rope=rope_kv.rope_kv_write)


def make_inputs(*, h=4, kvh=2, d=32, hidden=96, dtype=torch.bfloat16, bias=False, seed=0, rope_scaling=None,
                kv_dtype=None):
    g = torch.Generator().manual_seed(seed)
    n = (h + 2 * kvh) * d
    x = (torch.randn(1, hidden, generator=g) * 2).to(dtype)
    w = (torch.randn(n, hidden, generator=g) / hidden ** 0.5).to(dtype)
    norm_w = (torch.rand(hidden, generator=g) + 0.5).to(dtype)
    b = (torch.randn(n, generator=g) * 0.1).to(dtype) if bias else None
    rotary = RotaryEmbedding(d, 64, rope_scaling=rope_scaling)
    positions = torch.tensor([37])
    slots = torch.tensor([13])                                   # block 3, offset 1 of 4-slot blocks
    kv = torch.full((2, 6, 4, kvh, d), SENTINEL).to(kv_dtype or dtype)  # FP8: saturates to -448
    return dict(x=x, weight=w, norm_weight=norm_w, eps=1e-5, positions=positions, cos_cache=rotary.cos_cache,
                sin_cache=rotary.sin_cache, kv_layer=kv, slot_mapping=slots, num_heads=h, num_kv_heads=kvh,
                bias=b)


def two_launches(mods, a: dict, tuning: LinearTuning) -> tuple[torch.Tensor, torch.Tensor]:
    kv = a["kv_layer"].clone()
    qkv = mods.linear(a["x"], a["weight"], bias=a["bias"], prologue="rmsnorm", norm_weight=a["norm_weight"],
                      eps=a["eps"], tuning=tuning)
    q = mods.rope(qkv, a["positions"], a["cos_cache"], a["sin_cache"], kv, a["slot_mapping"], a["num_heads"],
                  a["num_kv_heads"])
    return q, kv


def fused(mods, a: dict, tuning: LinearTuning) -> tuple[torch.Tensor, torch.Tensor]:
    kv = a["kv_layer"].clone()
    q = mods.fused(**{**a, "kv_layer": kv}, tuning=tuning)
    return q, kv


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("block_n", [2, 8, 16])
def test_one_launch_equals_the_projection_then_rope_kv_write_bit_for_bit(mods, dtype, block_n):
    a = make_inputs(dtype=dtype, rope_scaling=LLAMA3_SCALING)
    tuning = LinearTuning(block_n=block_n, block_k=32)  # 96 columns: three k-tiles
    q, kv = fused(mods, a, tuning)
    q_ref, kv_ref = two_launches(mods, a, tuning)
    assert q.shape == (1, 4, 32) and q.dtype == dtype
    assert torch.equal(q, q_ref)
    assert torch.equal(kv, kv_ref)
    written = torch.zeros(6, 4, dtype=torch.bool)
    written[3, 1] = True
    assert (kv[:, ~written] == SENTINEL).all()                   # nothing outside slot 13
    assert (kv[:, written] != SENTINEL).all()


def test_bias_gqa_and_head_size_128(mods):
    a = make_inputs(h=8, kvh=2, d=128, hidden=64, bias=True, seed=3)
    tuning = LinearTuning(block_n=8, block_k=64)
    q, kv = fused(mods, a, tuning)
    q_ref, kv_ref = two_launches(mods, a, tuning)
    assert torch.equal(q, q_ref) and torch.equal(kv, kv_ref)


def test_bad_inputs_name_the_argument(mods):
    a = make_inputs()
    with pytest.raises(ValueError, match=r"x must be one contiguous row \(1, 96\)"):
        mods.fused(**{**a, "x": a["x"].expand(2, 96)})
    with pytest.raises(ValueError, match=r"norm_weight must have shape \(96,\)"):
        mods.fused(**{**a, "norm_weight": a["norm_weight"][:10]})
    with pytest.raises(ValueError, match="tuning.block_n=6 must be even with block_n/2 dividing head_size/2"):
        mods.fused(**a, tuning=LinearTuning(block_n=6, block_k=32))
    with pytest.raises(ValueError, match="qkv must be"):                 # a weight of the wrong height
        mods.fused(**{**a, "weight": a["weight"][:-32]})


# ----------------------------------------------------------------------------- attention fused in
@pytest.fixture(scope="module")
def attn_mods(mods, interpreted, kernels) -> types.SimpleNamespace:
    from runtime_lib.kernels import qkv_rope_kv

    qkv_rope_kv = interpreted(qkv_rope_kv, "_qkv_rope_kv_kernel")
    return types.SimpleNamespace(fused=qkv_rope_kv.qkv_rope_kv_attention, spec=qkv_rope_kv.DecodeAttention,
                                 qkv=mods.fused, decode=kernels.decode)


def history(a: dict, ctx: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill the first ctx-1 context positions of a shuffled 3-block table with random K/V; the
    step's token goes to position ctx-1. Returns (block_tables (1, 3), context_lens (1,))."""
    g = torch.Generator().manual_seed(seed)
    kv = a["kv_layer"]
    table = torch.tensor([[4, 0, 2]], dtype=torch.int32)
    bs = kv.shape[2]
    for p in range(ctx - 1):
        kv[:, table[0, p // bs], p % bs] = torch.randn(kv.shape[0], *kv.shape[3:], generator=g).to(kv.dtype)
    last = ctx - 1
    a["slot_mapping"] = torch.tensor([int(table[0, last // bs]) * bs + last % bs])
    a["positions"] = torch.tensor([last])
    return table, torch.tensor([ctx], dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("ctx,window", [(1, None), (7, None), (12, None), (12, 5)])
def test_attention_in_the_epilogue_equals_qkv_rope_kv_then_paged_decode_attention(attn_mods, kernels, dtype, ctx,
                                                                                   window):
    a = make_inputs(h=8, kvh=2, d=32, dtype=dtype, seed=ctx)          # GQA group 4, 4-slot blocks
    table, lens = history(a, ctx)
    tuning = LinearTuning(block_n=8, block_k=32)
    kv = a["kv_layer"].clone()
    out = attn_mods.fused(**{**a, "kv_layer": kv}, attention=attn_mods.spec(table, lens, 0.3, window),
                          tuning=tuning)
    kv_ref = a["kv_layer"].clone()
    q = attn_mods.qkv(**{**a, "kv_layer": kv_ref}, tuning=tuning)
    ref = attn_mods.decode(q, kv_ref, table, lens, 0.3, window, max_context_len=128, partition_size=128,
                           tuning=kernels.DecodeTuning(block_n=128))  # one tile, as the epilogue's
    assert out.shape == (1, 8, 32) and out.dtype == dtype
    assert torch.equal(kv, kv_ref)                                    # the K/V write as before
    assert torch.equal(out, ref)                                      # one pass: the unsplit kernel's bits
    # A second call reuses the arrival counters: they were reset by each group's last program.
    spec = attn_mods.spec(table, lens, 0.3, window)
    again = attn_mods.fused(**{**a, "kv_layer": a["kv_layer"].clone()}, attention=spec, tuning=tuning)
    assert torch.equal(again, out)


@pytest.mark.parametrize("ctx", [1, 12])
def test_fp8_cache_one_launch_and_epilogue_attention_equal_the_separate_kernels(attn_mods, kernels, ctx):
    a = make_inputs(h=8, kvh=2, d=32, seed=ctx, kv_dtype=FP8_KV_DTYPE)
    table, lens = history(a, ctx)
    tuning = LinearTuning(block_n=8, block_k=32)
    kv = a["kv_layer"].clone()
    out = attn_mods.fused(**{**a, "kv_layer": kv}, attention=attn_mods.spec(table, lens, 0.3), tuning=tuning)
    kv_ref = a["kv_layer"].clone()
    q = attn_mods.qkv(**{**a, "kv_layer": kv_ref}, tuning=tuning)
    ref = attn_mods.decode(q, kv_ref, table, lens, 0.3, max_context_len=128, partition_size=128,
                           tuning=kernels.DecodeTuning(block_n=128, fp8_dot_fp16=False))  # the epilogue's bf16 dots
    assert torch.equal(kv.view(torch.uint8), kv_ref.view(torch.uint8))
    assert torch.equal(out, ref)
    slot = int(a["slot_mapping"])
    written = kv.view(2, -1, *kv.shape[3:])[:, slot].float()
    assert (written != -448).all() and torch.isfinite(written).all()  # this step's K/V are in the cache


def test_attention_spec_is_checked(attn_mods):
    a = make_inputs()
    table = torch.zeros(1, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"attention.context_lens must be \(1,\)"):
        attn_mods.fused(**a, attention=attn_mods.spec(table.expand(2, 3), torch.ones(2, dtype=torch.int32), 1.0))
    with pytest.raises(ValueError, match="block_tables/context_lens must be int32"):
        attn_mods.fused(**a, attention=attn_mods.spec(table.long(), torch.ones(1, dtype=torch.int32), 1.0))
    with pytest.raises(ValueError, match="sliding_window must be a positive int"):
        attn_mods.fused(**a, attention=attn_mods.spec(table, torch.ones(1, dtype=torch.int32), 1.0, 0))
