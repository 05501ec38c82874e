"""FP8 weights on the GPU: `_scaled_mm` on FP8 tensor cores computes the layer the CPU tests
pin down, the engine's graph-replayed (and compiled) steps give the tokens its eager steps
give, and the fused batch-1 step (FP8 weights, unquantized activations) gives the tokens of
eager steps over the dequantized weights."""
from __future__ import annotations

import pytest
import torch

from runtime_lib.config import SamplingConfig
from runtime_lib.layers.fp8_linear import Fp8Linear, dequantize_model, quantize_rows, quantize_weight

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
PROMPTS = [[1, 17, 42, 99, 250, 7], [1, 300, 5, 5, 8, 120, 64, 33, 390], [1, 2, 3]]


def test_fp8_linear_on_cuda_is_the_dequantized_matmul():
    torch.manual_seed(0)
    x = torch.randn(37, 4096, device="cuda").to(torch.bfloat16)
    w = torch.randn(6144, 4096, device="cuda") * 0.02
    lin = Fp8Linear(4096, 6144).cuda()
    q, s = quantize_weight(w)
    lin.weight.copy_(q)
    lin.weight_scale.copy_(s)
    qx, sx = quantize_rows(x)
    ref = (qx.float() * sx) @ (q.float() * s[:, None]).t()   # fp32 arithmetic over the same e4m3 values
    out = lin(x).float()                                     # bf16 output of the FP8 tensor cores
    torch.testing.assert_close(out, ref, atol=1e-2 * float(ref.abs().amax()), rtol=1e-2)


def test_fp8_model_on_cuda_matches_the_cpu_model(llama_dir):
    """bf16 on CUDA against fp32 on CPU, both with FP8 projections: one prefill's logits."""
    from runtime_lib.layers.attention import AttentionMetadata
    from runtime_lib.models import allocate_kv_cache, load_model

    ids = [1, 17, 42, 99, 250, 7, 300, 5]
    logits = []
    for device, dtype in (("cpu", "float32"), ("cuda", "bfloat16")):
        model = load_model(llama_dir, device=device, dtype=dtype, quantization="fp8")
        kv = allocate_kv_cache(model.config, 4, 16, device=device)
        meta = AttentionMetadata.build([len(ids)], [len(ids)], [[0]], 16, device=device)
        hidden = model(torch.tensor(ids, device=device), torch.arange(len(ids), device=device), kv, meta)
        logits.append(model.compute_logits(hidden).float().cpu())
    err = float((logits[1] - logits[0]).abs().max() / logits[0].std())
    assert err < 0.15, err


def engine_tokens(session, llama_dir, prompts, **cfg) -> list[list[int]]:
    from runtime_lib.engine import EngineConfig, LLMEngine

    scfg = SamplingConfig(end_id=-1, pad_id=3, max_new_tokens=24)
    engine = LLMEngine(EngineConfig(model_dir=str(llama_dir), max_num_seqs=4, num_kv_blocks=64, **cfg),
                       session=session)
    try:
        streams = [engine.add_request(f"r{i}", p, scfg) for i, p in enumerate(prompts)]
        return [[t for o in s for t in o.new_token_ids] for s in streams]
    finally:
        engine.shutdown()


@pytest.mark.parametrize("compile_decode", [False, True])
def test_engine_with_fp8_weights_graphs_equal_eager_steps(llama_dir, compile_decode):
    from runtime_lib.session import Session

    session = Session.from_dir(llama_dir, device="cuda", dtype="bfloat16", quantization="fp8")
    graphs = engine_tokens(session, llama_dir, PROMPTS, cuda_graphs=True, compile_decode=compile_decode,
                           fused_decode=False)
    eager = engine_tokens(session, llama_dir, PROMPTS, cuda_graphs=False)
    assert all(len(r) == 24 for r in graphs)
    assert graphs == eager


def test_fused_batch1_step_over_fp8_weights_equals_eager_dequantized_steps(llama_dir):
    from runtime_lib.session import Session, TorchBackend

    fp8 = Session.from_dir(llama_dir, device="cuda", dtype="float32", quantization="fp8")
    plain_model = dequantize_model(fp8.model)
    plain = Session(TorchBackend(plain_model), plain_model.config)
    for prompt in PROMPTS:   # one request at a time: every decode step is a fused one-row step
        fused = engine_tokens(fp8, llama_dir, [prompt], cuda_graphs=True, fused_decode=True)
        assert fused == engine_tokens(plain, llama_dir, [prompt], cuda_graphs=False)
