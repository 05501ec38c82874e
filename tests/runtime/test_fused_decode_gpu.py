"""The fused decode kernels compiled for the GPU (the CPU suite runs them interpreted, in
tests/kernels/): bit-exact RoPE + KV write, small_linear against the eager ops, and greedy
generation through the fused step equal to generation without it."""
from __future__ import annotations

import pytest
import torch

from runtime_lib.layers.attention import write_kv
from runtime_lib.layers.rotary import RotaryEmbedding, apply_rotary

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("T", [1, 16])
def test_rope_kv_write_equals_the_eager_ops_bit_for_bit(T):
    from runtime_lib.kernels.rope_kv import rope_kv_write

    h, kvh, d, bs, nb = 32, 8, 128, 16, 8
    g = torch.Generator(device="cuda").manual_seed(T)
    rotary = RotaryEmbedding(d, 4096, 500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 8192}).cuda()
    qkv = torch.randn(T, (h + 2 * kvh) * d, device="cuda", generator=g).to(torch.bfloat16)
    positions = torch.randint(0, 4096, (T,), device="cuda", generator=g)
    slots = torch.randperm(nb * bs, device="cuda", generator=g)[:T]
    kv, kv_ref = (torch.full((2, nb, bs, kvh, d), 7.0, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    q = rope_kv_write(qkv, positions, rotary.cos_cache, rotary.sin_cache, kv, slots, h, kvh)
    q_ref, k_ref, v_ref = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
    cos, sin = rotary.cos_cache[positions].to(qkv.dtype), rotary.sin_cache[positions].to(qkv.dtype)
    q_ref = apply_rotary(q_ref.reshape(T, h, d), cos, sin)
    write_kv(kv_ref, apply_rotary(k_ref.reshape(T, kvh, d), cos, sin), v_ref.reshape(T, kvh, d), slots)
    assert torch.equal(q, q_ref)
    assert torch.equal(kv, kv_ref)


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("prologue", ["none", "rmsnorm", "silu_mul"])
def test_small_linear_matches_the_eager_ops(rows, prologue):
    from runtime_lib.kernels.small_linear import small_linear, small_linear_torch

    n, k = 1000, 2048
    g = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, 2 * k if prologue == "silu_mul" else k, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).to(torch.bfloat16)
    kw = dict(prologue=prologue, residual=torch.randn(rows, n, device="cuda", generator=g).to(torch.bfloat16),
              norm_weight=(torch.rand(k, device="cuda", generator=g) + 0.5).to(torch.bfloat16)
              if prologue == "rmsnorm" else None)
    got = small_linear(x, w, **kw).float()
    exact = small_linear_torch(x.double(), w.double(), **{key: v.double() if isinstance(v, torch.Tensor) else v
                                                          for key, v in kw.items()})
    eager = small_linear_torch(x, w, **kw).float()
    err_got = ((got - exact).norm() / exact.norm()).item()
    err_eager = ((eager - exact).norm() / exact.norm()).item()
    assert err_got <= 1.5 * err_eager + 1e-4, (err_got, err_eager)


def test_greedy_generation_through_the_fused_step_equals_the_eager_step_fp32(llama_dir):
    from runtime_lib.model_runner import ModelRunner

    prompts = [torch.tensor(p) for p in ([1, 17, 42, 99, 250, 7], [1, 300, 5, 5, 8, 120, 64, 33, 390], [1, 2, 3])]
    runner = ModelRunner.from_dir(llama_dir, device="cuda", dtype="float32")
    assert runner.session.runtime.fused_decode
    fused = runner.generate(prompts, max_new_tokens=24, end_id=2, pad_id=3)
    assert runner.session._graph_runner is not None and runner.session._graph_runner.num_replays > 0
    runner.session.cuda_graphs = False
    runner.session._graph_runner = None
    runner.session.runtime.disable_cuda_graphs()
    assert torch.equal(fused, runner.generate(prompts, max_new_tokens=24, end_id=2, pad_id=3))


def test_greedy_generation_across_the_short_context_bound_equals_the_eager_step_fp32(llama_dir):
    """A row whose context grows past FUSED_ATTENTION_MAX_CONTEXT moves from the short-context
    graph (attention in the qkv kernel) to the full one (split-K kernel) mid-generation."""
    from runtime_lib.fused_decode import FUSED_ATTENTION_MAX_CONTEXT
    from runtime_lib.model_runner import ModelRunner

    runner = ModelRunner.from_dir(llama_dir, device="cuda", dtype="float32")
    start = FUSED_ATTENTION_MAX_CONTEXT - 8
    if runner.max_sequence_length < start + 24:
        pytest.skip("the test checkpoint's context is too short")
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(4, runner.vocab_size, (start,), generator=g)
    fused = runner.generate([prompt], max_new_tokens=20, end_id=-1, pad_id=3)
    graphs = runner.session._graph_runner
    assert graphs is not None and graphs.short_context is not None
    assert {bound for _, bound in graphs._graphs} == {FUSED_ATTENTION_MAX_CONTEXT, graphs.max_seq_len}
    runner.session.cuda_graphs = False
    runner.session._graph_runner = None
    runner.session.runtime.disable_cuda_graphs()
    assert torch.equal(fused, runner.generate([prompt], max_new_tokens=20, end_id=-1, pad_id=3))


def test_split_k_merge_in_one_launch_is_right_on_every_graph_replay():
    """The arrival counters reset themselves: a captured decode launch with many partitions gives
    the reference result on every replay, for new inputs, and leaves the counters at zero."""
    from runtime_lib.kernels.paged_attention import arrival_counters, paged_decode_attention
    from runtime_lib.layers.attention import AttentionMetadata, paged_attention_torch

    B, h, kvh, d, bs = 4, 32, 8, 128, 16
    ctx = [37, 700, 1500, 16]
    tables = [list(range(i * 100, i * 100 + -(-c // bs))) for i, c in enumerate(ctx)]
    meta = AttentionMetadata.build([1] * B, ctx, tables, bs, device="cuda")
    kv = torch.randn(2, 400, bs, kvh, d, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(B, h, d, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)

    def step():
        paged_decode_attention(q, kv, meta.block_tables, meta.context_lens, d ** -0.5, None, 4096, out=out)

    step()  # warm-up: compiles, allocates the counters outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for i in range(3):
        q.copy_(torch.randn_like(q))
        graph.replay()
        torch.cuda.synchronize()
        ref = paged_attention_torch(q.float(), kv.float(), meta, d ** -0.5)
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
        assert not arrival_counters(q.device, B * kvh).any(), f"counters left set after replay {i}"


def test_programmatic_dependent_launch_changes_no_bit_of_the_fused_step(llama_dir, monkeypatch):
    """PDL only lets a kernel start streaming weights before its predecessor ends; greedy tokens
    and the last step's logits are bit-identical with it switched off (bf16, CUDA graphs)."""
    from runtime_lib.kernels.pdl import DISABLE_ENV, pdl_enabled
    from runtime_lib.model_runner import ModelRunner

    if not pdl_enabled(torch.device("cuda")):
        pytest.skip("PDL needs sm_90+")
    prompts = [torch.tensor([1, 17, 42, 99, 250, 7]), torch.tensor([1, 300, 5, 5, 8, 120, 64, 33, 390])]

    def run():
        runner = ModelRunner.from_dir(llama_dir, device="cuda", dtype="bfloat16", gather_generation_logits=True)
        outs = [runner.generate([p], max_new_tokens=32, end_id=-1, pad_id=3, return_dict=True) for p in prompts]
        return [o["output_ids"] for o in outs], [o["generation_logits"] for o in outs]

    ids_pdl, logits_pdl = run()
    monkeypatch.setenv(DISABLE_ENV, "0")
    assert not pdl_enabled(torch.device("cuda"))
    ids_plain, logits_plain = run()
    for a, b in zip(ids_pdl, ids_plain):
        assert torch.equal(a, b)
    for a, b in zip(logits_pdl, logits_plain):
        assert torch.equal(a, b)


def qkv_layer(n: int, hidden: int, head_size: int, seed: int):
    """A bf16 input row, qkv weight (n, hidden), norm weight and Llama-3 rotary tables on the
    GPU, and the generator that made them (for more inputs)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(1, hidden, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(n, hidden, device="cuda", generator=g) / hidden ** 0.5).to(torch.bfloat16)
    norm_w = (torch.rand(hidden, device="cuda", generator=g) + 0.5).to(torch.bfloat16)
    return x, w, norm_w, RotaryEmbedding(head_size, 4096, 500000.0).cuda(), g


@pytest.mark.parametrize("pdl", [False, True])
def test_qkv_rope_kv_equals_the_projection_then_rope_kv_write_bit_for_bit(pdl):
    """The one-launch qkv step of the fused decode path, compiled (and with PDL on sm_90+), on
    Llama-3.1-8B shapes, against the two launches it replaces with the same launch shape."""
    from runtime_lib.kernels.pdl import pdl_enabled
    from runtime_lib.kernels.qkv_rope_kv import qkv_rope_kv, rope_tuning
    from runtime_lib.kernels.rope_kv import rope_kv_write
    from runtime_lib.kernels.small_linear import small_linear

    if pdl and not pdl_enabled(torch.device("cuda")):
        pytest.skip("PDL needs sm_90+")
    h, kvh, d, hidden, bs, nb = 32, 8, 128, 4096, 16, 8
    n = (h + 2 * kvh) * d
    x, w, norm_w, rotary, _ = qkv_layer(n, hidden, d, seed=7)
    positions = torch.tensor([1234], device="cuda")
    slots = torch.tensor([37], device="cuda")
    kv, kv_ref = (torch.full((2, nb, bs, kvh, d), 7.0, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    tuning = rope_tuning(n, hidden, d, x.device)
    q = qkv_rope_kv(x, w, norm_w, 1e-5, positions, rotary.cos_cache, rotary.sin_cache, kv, slots, h, kvh,
                    tuning=tuning, pdl=pdl)
    qkv = small_linear(x, w, prologue="rmsnorm", norm_weight=norm_w, eps=1e-5, tuning=tuning)
    q_ref = rope_kv_write(qkv, positions, rotary.cos_cache, rotary.sin_cache, kv_ref, slots, h, kvh)
    assert torch.equal(q, q_ref)
    assert torch.equal(kv, kv_ref)


@pytest.mark.parametrize("pdl", [False, True])
def test_attention_in_the_qkv_epilogue_is_right_on_every_graph_replay(pdl):
    """Llama-3.2-1B shapes: qkv + RoPE + K/V write + decode attention in one launch, captured in
    a graph and replayed for contexts of 1 to 1024 tokens, equals qkv_rope_kv followed by the
    decode kernel (bf16 within an ulp or two: the two kernels' warp counts differ), and leaves
    the arrival counters at zero."""
    from runtime_lib.kernels.paged_attention import DecodeTuning, arrival_counters, paged_decode_attention
    from runtime_lib.kernels.pdl import pdl_enabled
    from runtime_lib.kernels.qkv_rope_kv import (
        ATTENTION_BLOCK_N,
        DecodeAttention,
        qkv_rope_kv,
        qkv_rope_kv_attention,
    )

    if pdl and not pdl_enabled(torch.device("cuda")):
        pytest.skip("PDL needs sm_90+")
    h, kvh, d, hidden, bs, nb = 32, 8, 64, 2048, 16, 80
    n = (h + 2 * kvh) * d
    x, w, norm_w, rotary, g = qkv_layer(n, hidden, d, seed=11)
    kv = torch.randn(2, nb, bs, kvh, d, device="cuda", generator=g).to(torch.bfloat16)
    table = torch.randperm(nb, device="cuda", generator=g)[:64].int().view(1, 64)
    positions = torch.zeros(1, dtype=torch.int64, device="cuda")
    slots = torch.zeros(1, dtype=torch.int64, device="cuda")
    lens = torch.zeros(1, dtype=torch.int32, device="cuda")
    out = torch.empty(1, h, d, device="cuda", dtype=torch.bfloat16)
    args = (positions, rotary.cos_cache, rotary.sin_cache)

    def set_context(ctx):
        positions.fill_(ctx - 1)
        slots.fill_(int(table[0, (ctx - 1) // bs]) * bs + (ctx - 1) % bs)
        lens.fill_(ctx)

    def step(kv_layer):
        qkv_rope_kv_attention(x, w, norm_w, 1e-5, *args, kv_layer, slots, h, kvh,
                              DecodeAttention(table, lens, d ** -0.5), out=out, pdl=pdl)

    set_context(5)
    step(kv.clone())  # warm-up: compiles, allocates the counters outside the capture
    graph_kv = kv.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(graph_kv)
    for ctx in (1, 17, 300, 1024):
        set_context(ctx)
        graph_kv.copy_(kv)
        graph.replay()
        ref_kv = kv.clone()
        q = qkv_rope_kv(x, w, norm_w, 1e-5, *args, ref_kv, slots, h, kvh)
        ref = paged_decode_attention(q, ref_kv, table, lens, d ** -0.5, None, 1024, partition_size=1024,
                                     tuning=DecodeTuning(block_n=ATTENTION_BLOCK_N))
        torch.cuda.synchronize()
        assert torch.equal(graph_kv, ref_kv), ctx
        torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
        assert not arrival_counters(x.device, kvh).any(), f"counters left set at context {ctx}"


def test_one_launch_argmax_equals_torch_on_a_llama3_vocabulary():
    from runtime_lib.kernels.paged_attention import arrival_counters
    from runtime_lib.sampling_ops import argmax_rows

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4, 128256, device="cuda", generator=g).to(torch.bfloat16).float()
    x[1, 100000] = x[1, 5] = x[1].max() + 1    # a tie across slices: the first index wins
    x[2] = 0.0
    for _ in range(3):                          # the counters reset themselves between launches
        assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
    assert not arrival_counters(x.device, 4)[:4].any()
