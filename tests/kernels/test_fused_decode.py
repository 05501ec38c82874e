"""The fused small-batch decode step (runtime_lib/fused_decode.py) computes the model's decode step.

Run on CPU under TRITON_INTERPRET=1 (conftest.py): the same Triton kernels the GPU replays
(small_linear, rope_kv_write, paged decode attention), on tiny Llama-family checkpoints. The
reference is the eager model forward on a copy of the same prefilled cache; both the logits and
the K/V the step writes must agree."""
from __future__ import annotations

import pytest
import torch

from runtime_lib.model_step import StepRow, build_step_inputs
from runtime_lib.models import allocate_kv_cache, load_model
from runtime_lib.session import Session, TorchBackend

pytest.importorskip("triton")

BLOCK_SIZE = 4
NUM_BLOCKS = 24
PROMPTS = [[1, 17, 42, 99, 250, 7], [1, 300, 5, 5, 8, 120, 64, 33, 390], [1, 2, 3]]


@pytest.fixture(scope="module")
def fused(interpreted):
    """runtime_lib.fused_decode over interpreted kernels (it imports them at each call)."""
    from runtime_lib import fused_decode
    from runtime_lib.kernels import paged_attention, qkv_rope_kv, rope_kv, small_linear

    for module, kernel in ((paged_attention, "_decode_partition_kernel"), (rope_kv, "_rope_kv_kernel"),
                           (small_linear, "_small_linear_kernel"), (qkv_rope_kv, "_qkv_rope_kv_kernel")):
        interpreted(module, kernel)
    return fused_decode


def tables() -> list[list[int]]:
    return [[1 + i + len(PROMPTS) * j for j in range(5)] for i in range(len(PROMPTS))]


def prefilled(model) -> torch.Tensor:
    kv = allocate_kv_cache(model.config, NUM_BLOCKS, BLOCK_SIZE)
    inputs = build_step_inputs([StepRow(p, 0, t) for p, t in zip(PROMPTS, tables())], BLOCK_SIZE, "cpu")
    TorchBackend(model).forward(inputs["input_ids"], inputs["position_ids"], kv,
                                Session._metadata({**inputs, "kv_cache": kv}), inputs["logits_indices"])
    return kv


def decode_step(model, kv, forward, extra: int = 0, which: tuple[int, ...] = (0, 1, 2)) -> torch.Tensor:
    rows = [StepRow([5 + i], len(p) + extra, t) for i, (p, t) in enumerate(zip(PROMPTS, tables())) if i in which]
    inputs = build_step_inputs(rows, BLOCK_SIZE, "cpu")
    meta = Session._metadata({**inputs, "kv_cache": kv})
    with torch.no_grad():
        return forward(inputs["input_ids"], inputs["position_ids"], kv, meta, inputs["logits_indices"])


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_fused_step_equals_the_eager_step_fp32(fused, make_checkpoint, family):
    model = load_model(make_checkpoint(family), dtype="float32")
    eager_kv, kv = prefilled(model), prefilled(model)
    for extra in range(2):  # two steps: the second attends to the K/V the first one wrote
        expected = decode_step(model, eager_kv, TorchBackend(model).forward, extra)
        got = decode_step(model, kv, lambda *a: fused.llama_fused_decode_forward(model, *a), extra)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kv, eager_kv, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_one_row_step_with_the_fused_qkv_rope_kv_launch_equals_the_eager_step_fp32(fused, make_checkpoint, family):
    """One row takes `qkv_rope_kv` (projection + RoPE + K/V write in one launch; qwen2: with bias)."""
    model = load_model(make_checkpoint(family), dtype="float32")
    eager_kv, kv = prefilled(model), prefilled(model)
    for extra in range(2):
        expected = decode_step(model, eager_kv, TorchBackend(model).forward, extra, which=(1,))
        got = decode_step(model, kv, lambda *a: fused.llama_fused_decode_forward(model, *a), extra, which=(1,))
        assert got.shape == (1, model.config.vocab_size)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kv, eager_kv, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", [(1,), (0, 1, 2)], ids=["one_row", "three_rows"])
def test_fused_step_over_fp8_weights_equals_the_dequantized_eager_step(fused, make_checkpoint, which):
    """FP8 projections (quantization="fp8"; qwen2: with biases) stream e4m3 and scale each column:
    the eager step over the dequantized weights, in fp32 (the activations stay unquantized here,
    so the W8A8 batched step differs from both by its activation rounding)."""
    from runtime_lib.layers.fp8_linear import dequantize_model

    model = load_model(make_checkpoint("qwen2"), dtype="float32", quantization="fp8")
    plain = dequantize_model(model)
    eager_kv, kv = prefilled(plain), prefilled(plain)   # the same cache: only the step differs
    for extra in range(2):
        expected = decode_step(plain, eager_kv, TorchBackend(plain).forward, extra, which=which)
        got = decode_step(model, kv, lambda *a: fused.llama_fused_decode_forward(model, *a), extra, which=which)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_fused_step_in_bf16_stays_within_rounding_of_the_eager_step(fused, llama_dir):
    model = load_model(llama_dir, dtype="bfloat16")
    eager_kv, kv = prefilled(model), prefilled(model)
    expected = decode_step(model, eager_kv, TorchBackend(model).forward)
    got = decode_step(model, kv, lambda *a: fused.llama_fused_decode_forward(model, *a))
    assert got.dtype == torch.float32 and got.shape == expected.shape
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel < 2e-2, rel
    kv_rel = ((kv.float() - eager_kv.float()).norm() / eager_kv.float().norm()).item()
    assert kv_rel < 1e-2, kv_rel


def test_dispatch_fuses_one_row_decode_steps_only(fused, llama_dir):
    model = load_model(llama_dir, dtype="float32")
    calls = []

    def fallback(*args):
        calls.append(args[0].shape[0])
        return TorchBackend(model).forward(*args)

    forward = fused.make_fused_decode_forward(model, fallback)
    kv = prefilled(model)

    def step(rows: list[StepRow]) -> None:
        inputs = build_step_inputs(rows, BLOCK_SIZE, "cpu")
        with torch.no_grad():
            forward(inputs["input_ids"], inputs["position_ids"], kv, Session._metadata({**inputs, "kv_cache": kv}),
                    inputs["logits_indices"])

    step([StepRow([7], len(PROMPTS[0]), tables()[0])])
    assert calls == []  # one decode row: fused
    decode_step(model, kv, forward, extra=1)
    assert calls == [3]  # three rows: the fallback (cuBLAS beats the GEMVs from two rows on)
    step([StepRow([7, 8], len(PROMPTS[0]) + 2, tables()[0])])
    assert calls == [3, 2]  # a prefill chunk: not a decode step


def test_models_outside_the_llama_family_are_refused(fused, make_checkpoint):
    gpt2 = load_model(make_checkpoint("gpt2"), dtype="float32")
    assert "not a Llama-family" in fused.fused_decode_unsupported_reason(gpt2)
    with pytest.raises(ValueError, match="fused decode does not support"):
        fused.make_fused_decode_forward(gpt2, None)
