"""An FP8 (e4m3) KV cache on the GPU: the compiled kernels write the bytes `write_kv` writes
(round to nearest even, saturate at 448), read them as the torch path does, and the engine's
graph-replayed (and fused batch-1) steps give the tokens its eager steps give."""
from __future__ import annotations

import pytest
import torch

from runtime_lib.config import FP8_KV_DTYPE, SamplingConfig
from runtime_lib.layers.attention import AttentionMetadata, paged_attention_torch, write_kv
from runtime_lib.layers.rotary import RotaryEmbedding, apply_rotary

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_kv_write_into_fp8_equals_write_kv_byte_for_byte(dtype):
    from runtime_lib.kernels.rope_kv import rope_kv_write

    T, h, kvh, d, bs, nb = 16, 32, 8, 128, 16, 8
    g = torch.Generator(device="cuda").manual_seed(0)
    rotary = RotaryEmbedding(d, 4096, 500000.0).cuda()
    width = (h + 2 * kvh) * d
    scales = 10.0 ** (torch.arange(width, device="cuda") % 32 * (7 / 31) - 4)   # 1e-4 .. 1e3
    qkv = (torch.randn(T, width, device="cuda", generator=g) * scales).to(dtype)
    positions = torch.randint(0, 4096, (T,), device="cuda", generator=g)
    slots = torch.randperm(nb * bs, device="cuda", generator=g)[:T]
    kv, kv_ref = (torch.zeros(2, nb, bs, kvh, d, device="cuda", dtype=FP8_KV_DTYPE) for _ in range(2))
    rope_kv_write(qkv, positions, rotary.cos_cache, rotary.sin_cache, kv, slots, h, kvh)
    _, k_ref, v_ref = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
    cos, sin = rotary.cos_cache[positions].to(dtype), rotary.sin_cache[positions].to(dtype)
    write_kv(kv_ref, apply_rotary(k_ref.reshape(T, kvh, d), cos, sin), v_ref.reshape(T, kvh, d), slots)
    assert torch.equal(kv.view(torch.uint8), kv_ref.view(torch.uint8))
    assert kv_ref.float().abs().amax() == 448.0


@pytest.mark.parametrize("query_lens", [[1, 1, 1, 1], [1, 37, 1, 5]], ids=["decode", "mixed"])
def test_attention_kernels_read_fp8_as_the_torch_path_does(query_lens):
    from runtime_lib.kernels.attention_dispatch import paged_attention_triton

    g = torch.Generator(device="cuda").manual_seed(1)
    h, kvh, d, bs = 32, 8, 128, 16
    context_lens = [700, 40, 1500, 9]
    tables, used = [], 0
    for c in context_lens:
        n = -(-c // bs)
        tables.append(list(range(used, used + n)))
        used += n
    kv = torch.randn(2, used, bs, kvh, d, device="cuda", generator=g).to(FP8_KV_DTYPE)
    meta = AttentionMetadata.build(query_lens, context_lens, tables, bs, device="cuda")
    q = torch.randn(sum(query_lens), h, d, device="cuda", generator=g).to(torch.bfloat16)
    out = paged_attention_triton(q, kv, meta, d ** -0.5)
    ref = paged_attention_torch(q.float(), kv, meta, d ** -0.5)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("compile_decode", [False, True])
def test_engine_on_an_fp8_cache_graphs_equal_eager_steps(llama_dir, compile_decode):
    from runtime_lib.engine import EngineConfig, LLMEngine
    from runtime_lib.session import Session

    session = Session.from_dir(llama_dir, device="cuda", dtype="float32")
    prompts = [[1, 17, 42, 99, 250, 7], [1, 300, 5, 5, 8, 120, 64, 33, 390], [1, 2, 3]]
    scfg = SamplingConfig(end_id=-1, pad_id=3, max_new_tokens=24)
    results = []
    for graphs in (True, False):
        engine = LLMEngine(EngineConfig(model_dir=str(llama_dir), max_num_seqs=4, num_kv_blocks=64,
                                        kv_cache_dtype="fp8", cuda_graphs=graphs,
                                        compile_decode=compile_decode and graphs), session=session)
        try:
            assert engine.kv_cache.dtype == FP8_KV_DTYPE
            one = [t for o in engine.add_request("solo", prompts[0], scfg) for t in o.new_token_ids]  # fused bs1
            streams = [engine.add_request(f"r{i}", p, scfg) for i, p in enumerate(prompts)]
            results.append([one] + [[t for o in s for t in o.new_token_ids] for s in streams])
        finally:
            engine.shutdown()
    assert results[0] == results[1]
    assert all(len(r) == 24 for r in results[0])
