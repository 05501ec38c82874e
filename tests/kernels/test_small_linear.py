"""`small_linear` (the fused decode-step linear) computes what the model's eager torch ops compute.

Run on CPU under TRITON_INTERPRET=1 (conftest.py), tiny shapes with ragged tails (N and K not
multiples of the launch blocks). The reference is `small_linear_torch`: the same RMSNorm /
SiLU*mul / bias / residual ops as the model layers, rounding after each op in the model dtype.
fp32 must agree to summation order; bf16 to at most one ulp on a few elements (the two sum
the same products in a different order before the one rounding to bf16), except the RMSNorm
prologue, which rounds at other points and must be about as close to the exact value."""
from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def sl():
    from triton.runtime.interpreter import InterpretedFunction

    from runtime_lib.kernels import small_linear

    if not isinstance(small_linear._small_linear_kernel, InterpretedFunction):
        small_linear = importlib.reload(small_linear)
    return small_linear


def make_inputs(m: int, n: int, k: int, prologue: str, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xk = 2 * k if prologue == "silu_mul" else k
    x = torch.randn(m, xk, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    return dict(
        x=x, weight=w,
        norm_weight=(torch.rand(k, generator=g) + 0.5).to(dtype) if prologue == "rmsnorm" else None,
        bias=torch.randn(n, generator=g).to(dtype),
        residual=torch.randn(m, n, generator=g).to(dtype),
    )


def assert_matches(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        return
    ulp = torch.finfo(dtype).eps * ref.float().abs().clamp_min(1e-3)
    diff = (got.float() - ref.float()).abs()
    assert (diff <= ulp * 1.01).all(), f"max diff {diff.max().item()} exceeds one ulp"
    assert (diff > 0).float().mean().item() <= 0.05, "more than 5% of the elements differ"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 8, 16])
@pytest.mark.parametrize("prologue", ["none", "rmsnorm", "silu_mul"])
@pytest.mark.parametrize("epilogue", ["plain", "bias", "residual"])
def test_matches_the_eager_ops(sl, dtype, m, prologue, epilogue):
    n, k = 40, 100  # tails at both launch blocks below
    t = make_inputs(m, n, k, prologue, dtype, seed=m)
    kw = dict(prologue=prologue, norm_weight=t["norm_weight"], eps=1e-5,
              bias=t["bias"] if epilogue == "bias" else None,
              residual=t["residual"] if epilogue == "residual" else None)
    got = sl.small_linear(t["x"], t["weight"], tuning=sl.LinearTuning(block_n=16, block_k=32), **kw)
    eager = sl.small_linear_torch(t["x"], t["weight"], **kw)
    if prologue == "rmsnorm" and dtype != torch.float32:
        # The norm is a scale after the dot product (other rounding points than eager bf16):
        # within the same error of the exact result as eager bf16.
        exact = sl.small_linear_torch(t["x"].double(), t["weight"].double(), **{
            key: (v.double() if isinstance(v, torch.Tensor) else v) for key, v in kw.items()})

        def err(y):
            return ((y.double() - exact).norm() / exact.norm()).item()
        assert got.dtype == eager.dtype and err(got) <= 1.5 * err(eager) + 1e-4, (err(got), err(eager))
        return
    assert_matches(got, eager, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("prologue", ["none", "rmsnorm", "silu_mul"])
def test_fp8_weight_is_the_dequantized_weight(sl, dtype, m, prologue):
    """An e4m3 weight with per-column scales (layers/fp8_linear.py) computes what eager ops
    compute over the dequantized weight: fp32 to summation order; bf16 about as close to the
    exact (float64) result as eager, which rounds the dequantized weight to bf16."""
    from runtime_lib.layers.fp8_linear import quantize_weight

    n, k = 40, 100
    t = make_inputs(m, n, k, prologue, dtype, seed=10 + m)
    q, scale = quantize_weight(t["weight"])
    kw = dict(prologue=prologue, norm_weight=t["norm_weight"], eps=1e-5, bias=t["bias"], residual=t["residual"])
    got = sl.small_linear(t["x"], q, weight_scale=scale, tuning=sl.LinearTuning(block_n=16, block_k=32), **kw)
    eager = sl.small_linear_torch(t["x"], q, weight_scale=scale, **kw)
    assert got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
        return
    exact = sl.small_linear_torch(t["x"].double(), q.double() * scale.double()[:, None], **{
        key: (v.double() if isinstance(v, torch.Tensor) else v) for key, v in kw.items()})

    def err(y):
        return ((y.double() - exact).norm() / exact.norm()).item()
    assert err(got) <= 1.5 * err(eager) + 1e-4, (err(got), err(eager))


def test_bf16_rounding_is_round_to_nearest_even_like_torch(sl):
    # The interpreter truncates fp32 -> bf16; the kernel must still round like the GPU (and torch).
    t = make_inputs(2, 24, 64, "none", torch.bfloat16, seed=5)
    got = sl.small_linear(t["x"], t["weight"], tuning=sl.LinearTuning(block_n=8, block_k=64))
    exact = (t["x"].double() @ t["weight"].double().T).to(torch.bfloat16)
    assert torch.equal(got, exact)


def test_logits_in_fp32_and_strided_rows(sl):
    t = make_inputs(4, 50, 32, "rmsnorm", torch.bfloat16, seed=2)
    wide = torch.randn(4, 48).to(torch.bfloat16)
    wide[:, 8:40] = t["x"]
    x = wide[:, 8:40]  # row stride 48 > K
    got = sl.small_linear(x, t["weight"], prologue="rmsnorm", norm_weight=t["norm_weight"],
                          out_dtype=torch.float32, tuning=sl.LinearTuning(block_n=16, block_k=16))
    ref = sl.small_linear_torch(t["x"].float(), t["weight"].float(), prologue="rmsnorm",
                                norm_weight=t["norm_weight"].float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-2)


def test_default_launch_shape_covers_every_column(sl):
    t = make_inputs(1, 300, 70, "none", torch.float32)
    got = sl.small_linear(t["x"], t["weight"])  # heuristic tuning on CPU
    torch.testing.assert_close(got, t["x"] @ t["weight"].T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call, message", [
    (lambda sl, x, w: sl.small_linear(x, w, prologue="gelu"), "prologue must be one of"),
    (lambda sl, x, w: sl.small_linear(torch.zeros(17, 8), w), "1..16 rows"),
    (lambda sl, x, w: sl.small_linear(torch.zeros(2, 9), w), "needs 8"),
    (lambda sl, x, w: sl.small_linear(x, w, prologue="silu_mul"), "needs 16"),
    (lambda sl, x, w: sl.small_linear(x, w, prologue="rmsnorm"), "norm_weight of shape (8,)"),
    (lambda sl, x, w: sl.small_linear(x.double(), w.double()), "x must be one of"),
    (lambda sl, x, w: sl.small_linear(x, w.to(torch.float8_e4m3fn)), "an FP8 weight needs weight_scale of shape (8,)"),
    (lambda sl, x, w: sl.small_linear(x, w, weight_scale=torch.ones(8)), "only an FP8 weight takes one"),
    (lambda sl, x, w: sl.small_linear(x, w.t()), "contiguous in K"),
    (lambda sl, x, w: sl.small_linear(x, w, residual=torch.zeros(2, 5)), "residual must be (2, 8)"),
    (lambda sl, x, w: sl.small_linear(x, w, bias=torch.zeros(3)), "bias must have shape (8,)"),
])
def test_rejects_bad_inputs_naming_the_field(sl, call, message):
    x, w = torch.zeros(2, 8), torch.zeros(8, 8)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        call(sl, x, w)
