"""GPU check and benchmark of the Triton paged-attention kernels against the torch paths.

One command, from the repository root, on a CUDA machine:

    python3 bench/gpu_kernels.py                      # correctness + decode/prefill timings (~1 min)
    python3 bench/gpu_kernels.py --sections sweep     # launch-parameter search for both kernels
    python3 bench/gpu_kernels.py --quick              # fewer shapes (smoke run)
    python3 bench/gpu_kernels.py --sections offline   # big-batch decode knobs + cuBLAS GEMMs by row count
    python3 bench/gpu_kernels.py --sections gemm      # 8B projections: bf16 cuBLAS vs FP8 _scaled_mm by rows
    python3 bench/gpu_kernels.py --sections blas      # 8B projections: cuBLAS vs cuBLASLt vs max-autotune, bf16

Shapes are Llama-3.1-8B attention (32 query heads, 8 KV heads, head 128, bf16). Decode compares
the Triton split-K kernel, the torch reference (gather the paged cache + SDPA) and SDPA over a
contiguous (B, kvh, ctx, d) cache, prints achieved GB/s of K/V read against the measured
device-to-device copy bandwidth. Prefill compares the Triton varlen kernel with the same two.
Without CUDA it prints why and exits 0. Results (JSON + Markdown) go to $OUT when set, else
bench/results/. Exit status 1 when a correctness check fails.
"""
from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from runtime_lib.layers.attention import AttentionMetadata, paged_attention_torch

NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE = 32, 8, 128  # Llama-3.1-8B
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@dataclass
class Check:
    name: str
    max_abs_err: float
    tol: float
    passed: bool


@dataclass
class DecodeRow:
    batch: int
    context: int
    partition_size: int
    triton_us: float
    triton_graph_us: float
    triton_host_us: float
    torch_paged_us: float
    sdpa_contiguous_us: float
    kv_mbytes: float
    triton_gbps: float
    triton_graph_gbps: float
    pct_of_copy_bw: float
    max_abs_err_vs_torch: float


@dataclass
class PrefillRow:
    case: str
    tokens: int
    triton_us: float
    triton_graph_us: float
    triton_host_us: float
    torch_paged_us: float
    sdpa_contiguous_us: float | None
    triton_tflops: float
    max_abs_err_vs_torch: float


@dataclass
class Report:
    device: str
    torch: str
    triton: str
    python: str
    date: str
    copy_gbps: float
    checks: list[Check] = field(default_factory=list)
    decode: list[DecodeRow] = field(default_factory=list)
    prefill: list[PrefillRow] = field(default_factory=list)
    sweep: list[dict] = field(default_factory=list)
    graph_bound: list[dict] = field(default_factory=list)
    gemm: list[dict] = field(default_factory=list)
    fp8: list[dict] = field(default_factory=list)
    fp8_gemm: list[dict] = field(default_factory=list)
    blas: list[dict] = field(default_factory=list)


# ----------------------------------------------------------------------------- helpers

def bench_us(fn, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median GPU time of fn in µs (triton.testing.do_bench: CUDA events, L2 flushed per call)."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") * 1e3


def graph_us(fn, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """GPU time of fn replayed from a CUDA graph (what the engine's captured decode step pays)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench_us(graph.replay, warmup_ms, rep_ms)


def host_us(fn, calls: int = 200) -> float:
    """CPU time per call of fn (the wrapper + launch cost an eager, uncaptured step pays)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def results_stem(name: str, device: str, date: str, tag: str = "") -> Path:
    """$OUT (else bench/results/) / `<name>-<device slug>-<YYYY-MM-DD><tag>`, the folder created."""
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).resolve().parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "".join(ch if ch.isalnum() else "-" for ch in device).strip("-").lower()
    return out_dir / f"{name}-{slug}-{date[:10]}{tag}"


def write_results(stem: Path, data: dict, md: str) -> None:
    """`stem`.json (the run's data) and `stem`.md (its tables) side by side."""
    stem.with_suffix(".json").write_text(json.dumps(data, indent=2))
    stem.with_suffix(".md").write_text(md)


def copy_bandwidth_gbps() -> float:
    """Device-to-device copy bandwidth (read + write bytes / time), the practical HBM roofline."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = bench_us(functools.partial(dst.copy_, src))
    return 2 * n / us / 1e3  # the buffers are freed on return


@dataclass
class PagedBatch:
    q: torch.Tensor          # (T, h, d)
    kv: torch.Tensor         # (2, num_blocks, block_size, kvh, d)
    meta: AttentionMetadata
    scale: float


def make_paged_batch(query_lens: list[int], context_lens: list[int], *, block_size: int = 16,
                     dtype: torch.dtype = torch.bfloat16, num_heads: int = NUM_HEADS,
                     num_kv_heads: int = NUM_KV_HEADS, head_size: int = HEAD_SIZE, seed: int = 0) -> PagedBatch:
    """A randomly filled cache whose blocks are handed out in shuffled order (fragmented pool)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    blocks_per_seq = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(blocks_per_seq) + 1
    order = torch.randperm(num_blocks, device="cuda", generator=gen).tolist()
    tables, used = [], 0
    for n in blocks_per_seq:
        tables.append(order[used:used + n])
        used += n
    kv = torch.randn(2, num_blocks, block_size, num_kv_heads, head_size, device="cuda", dtype=dtype, generator=gen)
    meta = AttentionMetadata.build(query_lens, context_lens, tables, block_size, device="cuda")
    q = torch.randn(sum(query_lens), num_heads, head_size, device="cuda", dtype=dtype, generator=gen)
    return PagedBatch(q, kv, meta, head_size ** -0.5)


def contiguous_kv(batch: PagedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The same contexts as a dense (B, kvh, max_ctx, d) cache (all contexts equal length here)."""
    m = batch.meta
    _, num_blocks, block_size, kvh, d = batch.kv.shape
    pos = torch.arange(m.max_context_len, device="cuda")
    slots = m.block_tables.long().gather(1, (pos // block_size).expand(m.block_tables.shape[0], -1)) * block_size \
        + pos % block_size                                                   # (B, ctx)
    flat = batch.kv.view(2, num_blocks * block_size, kvh, d)
    return flat[0][slots].transpose(1, 2).contiguous(), flat[1][slots].transpose(1, 2).contiguous()


def reference(batch: PagedBatch, sliding_window: int | None = None) -> torch.Tensor:
    return paged_attention_torch(batch.q.float(), batch.kv.float(), batch.meta, batch.scale, sliding_window)


# ----------------------------------------------------------------------------- correctness

def run_checks(report: Report) -> None:
    from runtime_lib.kernels.paged_attention import paged_decode_attention
    from runtime_lib.kernels.varlen_attention import paged_varlen_attention

    def record(name: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
        finite = bool(torch.isfinite(out).all())
        err = (out.float() - ref).abs().max().item() if finite else float("inf")
        report.checks.append(Check(name, err, TOL[dtype], finite and err <= TOL[dtype]))
        print(f"  {'ok  ' if report.checks[-1].passed else 'FAIL'} {name}: max abs err {err:.2e} (tol {TOL[dtype]:.0e})")

    def decode(b: PagedBatch, window=None, **kw):
        m = b.meta
        return paged_decode_attention(b.q, b.kv, m.block_tables, m.context_lens, b.scale, window,
                                      m.max_context_len, **kw)

    def varlen(b: PagedBatch, window=None):
        m = b.meta
        return paged_varlen_attention(b.q, b.kv, m.block_tables, m.context_lens, m.cu_query_lens,
                                      m.max_query_len, b.scale, window)

    gen = torch.Generator().manual_seed(1)
    ragged = torch.randint(1, 4097, (32,), generator=gen).tolist()
    print("correctness vs paged_attention_torch (fp32 reference):")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        b = make_paged_batch([1] * 32, ragged, dtype=dtype)
        ref = reference(b)
        record(f"decode 8B {str(dtype)[6:]} B=32 ragged ctx<=4096 bs16 auto-split", decode(b), ref, dtype)
        record(f"decode 8B {str(dtype)[6:]} B=32 ragged ctx<=4096 bs16 split=64", decode(b, partition_size=64),
               ref, dtype)
    for block_size in (32, 64):
        b = make_paged_batch([1] * 32, ragged, block_size=block_size)
        record(f"decode 8B bf16 B=32 ragged bs{block_size}", decode(b), reference(b), torch.bfloat16)
    b = make_paged_batch([1] * 16, ragged[:16], num_heads=16, num_kv_heads=16, head_size=64, dtype=torch.float16)
    record("decode MHA h16 d64 fp16 B=16 ragged", decode(b), reference(b), torch.float16)
    b = make_paged_batch([1] * 32, ragged)
    record("decode 8B bf16 sliding window 1000", decode(b, 1000), reference(b, 1000), torch.bfloat16)
    padded = b.meta.context_lens.clone()
    padded[-4:] = 0  # CUDA-graph padding slots
    out = paged_decode_attention(b.q, b.kv, b.meta.block_tables, padded, b.scale, None, b.meta.max_context_len)
    report.checks.append(Check("decode: context_len 0 slots give exact zeros", 0.0, 0.0,
                               bool((out[-4:] == 0).all() and torch.isfinite(out).all())))
    print(f"  {'ok  ' if report.checks[-1].passed else 'FAIL'} {report.checks[-1].name}")

    # Mixed step: two fresh prompts, a 512-token chunk on a 1500-token prefix, 8 decode tokens.
    qlens = [1000, 300, 512] + [1] * 8
    clens = [1000, 300, 2012] + ragged[:8]
    for dtype in (torch.bfloat16, torch.float32):
        b = make_paged_batch(qlens, clens, dtype=dtype)
        record(f"varlen 8B {str(dtype)[6:]} mixed prefill/chunk/decode", varlen(b), reference(b), dtype)
    b = make_paged_batch(qlens, clens)
    record("varlen 8B bf16 sliding window 256", varlen(b, 256), reference(b, 256), torch.bfloat16)
    b = make_paged_batch(qlens, clens, block_size=64)
    record("varlen 8B bf16 bs64", varlen(b), reference(b), torch.bfloat16)
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- timings

def decode_row(report: Report, B: int, ctx: int) -> DecodeRow:
    """Time one decode shape (all contexts = ctx) with the three implementations."""
    from runtime_lib.kernels.paged_attention import (
        choose_partition_size,
        device_parallelism,
        paged_decode_attention,
    )

    b = make_paged_batch([1] * B, [ctx] * B)
    m = b.meta
    out = torch.empty_like(b.q)
    k, v = contiguous_kv(b)
    q4 = b.q[:, :, None, :]                                                  # (B, h, 1, d)

    def triton_call():
        paged_decode_attention(b.q, b.kv, m.block_tables, m.context_lens, b.scale, None, ctx, out=out)

    def torch_call():
        paged_attention_torch(b.q, b.kv, m, b.scale)

    def sdpa_call():
        F.scaled_dot_product_attention(q4, k, v, scale=b.scale, enable_gqa=True)

    triton_call()
    err = (out.float() - paged_attention_torch(b.q, b.kv, m, b.scale).float()).abs().max().item()
    t_triton, t_graph, t_host = bench_us(triton_call), graph_us(triton_call), host_us(triton_call)
    t_torch, t_sdpa = bench_us(torch_call), bench_us(sdpa_call)
    kv_bytes = 2 * B * ctx * NUM_KV_HEADS * HEAD_SIZE * b.kv.element_size()
    return DecodeRow(
        batch=B, context=ctx,
        partition_size=choose_partition_size(B, NUM_KV_HEADS, ctx, device_parallelism(b.q.device), 64),
        triton_us=t_triton, triton_graph_us=t_graph, triton_host_us=t_host, torch_paged_us=t_torch,
        sdpa_contiguous_us=t_sdpa,
        kv_mbytes=kv_bytes / 1e6, triton_gbps=kv_bytes / t_triton / 1e3,
        triton_graph_gbps=kv_bytes / t_graph / 1e3,
        pct_of_copy_bw=100 * kv_bytes / t_graph / 1e3 / report.copy_gbps,
        max_abs_err_vs_torch=err)


def run_decode_bench(report: Report, batches: list[int], contexts: list[int]) -> None:
    print("\ndecode (bf16, 32/8 heads, d=128, block 16): µs per call, median")
    for B in batches:
        for ctx in contexts:
            row = decode_row(report, B, ctx)
            torch.cuda.empty_cache()
            report.decode.append(row)
            print(f"  B={B:4d} ctx={ctx:5d} split={row.partition_size:5d}  triton {row.triton_us:7.1f}  "
                  f"graph {row.triton_graph_us:7.1f}  host {row.triton_host_us:5.1f}  "
                  f"torch-paged {row.torch_paged_us:8.1f}  "
                  f"sdpa-contig {row.sdpa_contiguous_us:8.1f}  {row.triton_graph_gbps:7.0f} GB/s "
                  f"({row.pct_of_copy_bw:4.1f}% copy)  err {row.max_abs_err_vs_torch:.1e}")


def run_graph_bound_bench(report: Report, bound: int = 131072) -> None:
    """Decode inside a graph captured for `bound` tokens (a 128k-context model served with its
    default max_seq_len): the partition count is fixed by the bound. Each row now spreads its own
    context over it ("adaptive"); before, every slice had the bound's size ("fixed")."""
    from runtime_lib.kernels.paged_attention import (
        choose_partition_size,
        device_parallelism,
        paged_decode_attention,
    )

    print(f"\ndecode in a graph bound to {bound} tokens: µs per call (graph replay)")
    for B in (1, 8):
        for ctx in (256, 2048, 8192, 32768):
            b = make_paged_batch([1] * B, [ctx] * B)
            m = b.meta
            out = torch.empty_like(b.q)
            fixed = choose_partition_size(B, NUM_KV_HEADS, bound, device_parallelism(b.q.device), 64)
            times = {}
            for name, kw in (("adaptive", {}), ("fixed", {"partition_size": fixed})):
                call = functools.partial(paged_decode_attention, b.q, b.kv, m.block_tables, m.context_lens, b.scale,
                                         None, bound, out=out, **kw)
                call()
                err = (out.float() - reference(b).float()).abs().max().item()
                report.checks.append(Check(f"decode graph-bound {name} B={B} ctx={ctx}", err, TOL[torch.bfloat16],
                                           err <= TOL[torch.bfloat16]))
                times[name] = graph_us(call)
            report.graph_bound.append({"batch": B, "context": ctx, "bound": bound, "fixed_partition": fixed,
                                       "adaptive_us": times["adaptive"], "fixed_us": times["fixed"]})
            print(f"  B={B:2d} ctx={ctx:6d}  adaptive {times['adaptive']:8.1f}  fixed ({fixed}-token slices) "
                  f"{times['fixed']:8.1f}  {times['fixed'] / times['adaptive']:.2f}x")
            torch.cuda.empty_cache()


def prefill_row(name: str, qlens: list[int], clens: list[int], split_decode: bool) -> PrefillRow:
    """Time one varlen step against gather+SDPA and, for equal fresh prompts, dense flash SDPA."""
    from runtime_lib.kernels.varlen_attention import paged_varlen_attention

    b = make_paged_batch(qlens, clens)
    m = b.meta
    out = torch.empty_like(b.q)

    def triton_call():
        paged_varlen_attention(b.q, b.kv, m.block_tables, m.context_lens, m.cu_query_lens, m.max_query_len,
                               b.scale, max_context_len=m.max_context_len, split_decode=split_decode, out=out)

    def torch_call():
        paged_attention_torch(b.q, b.kv, m, b.scale)

    t_sdpa = None
    if len(set(qlens)) == 1 and qlens == clens:  # equal fresh prompts: dense causal SDPA (flash)
        k, v = contiguous_kv(b)
        q4 = b.q.view(len(qlens), qlens[0], NUM_HEADS, HEAD_SIZE).transpose(1, 2)
        t_sdpa = bench_us(lambda: F.scaled_dot_product_attention(q4, k, v, is_causal=True, scale=b.scale,
                                                                 enable_gqa=True))
    triton_call()
    err = (out.float() - paged_attention_torch(b.q, b.kv, m, b.scale).float()).abs().max().item()
    t_triton, t_graph, t_host = bench_us(triton_call), graph_us(triton_call), host_us(triton_call)
    t_torch = bench_us(torch_call)
    # Useful (causal) attention FLOPs: 4 * d per (query, visible key) pair per head.
    pairs = sum(ql * (c - ql) + ql * (ql + 1) // 2 for ql, c in zip(qlens, clens, strict=True))
    tflops = 4 * HEAD_SIZE * NUM_HEADS * pairs / t_graph / 1e6
    return PrefillRow(name, sum(qlens), t_triton, t_graph, t_host, t_torch, t_sdpa, tflops, err)


def run_prefill_bench(report: Report, quick: bool) -> None:
    mixed = ([1024, 1024] + [1] * 64, [1024, 1024] + [2048] * 64)
    cases = [("1 x 2048 prompt", [2048], [2048], True),
             ("8 x 512 prompts", [512] * 8, [512] * 8, True),
             ("4 x 512 chunk on 3584 prefix", [512] * 4, [4096] * 4, True),
             ("mixed: 2x1024 prompts + 64 decode", *mixed, True),
             ("mixed, decode rows not split off", *mixed, False)]
    print("\nprefill / varlen (bf16, 8B heads): µs per call, median")
    for name, qlens, clens, split_decode in cases[:2] if quick else cases:
        row = prefill_row(name, qlens, clens, split_decode)
        torch.cuda.empty_cache()
        report.prefill.append(row)
        sdpa_txt = f"{row.sdpa_contiguous_us:9.1f}" if row.sdpa_contiguous_us else "      n/a"
        print(f"  {name:36s} triton {row.triton_us:7.1f}  graph {row.triton_graph_us:7.1f} "
              f"({row.triton_tflops:5.1f} TFLOP/s)  host {row.triton_host_us:5.1f}  "
              f"torch-paged {row.torch_paged_us:8.1f}  sdpa-contig {sdpa_txt}  err {row.max_abs_err_vs_torch:.1e}")


def _sweep(report: Report, kernel: str, shapes: list[tuple[str, PagedBatch]], configs: list, timer, launch) -> None:
    """Time every config on every shape; rank configs by geometric-mean slowdown vs each shape's best."""
    from triton.runtime.errors import OutOfResources

    times: dict[int, dict[str, float]] = {i: {} for i in range(len(configs))}
    for name, batch in shapes:
        out = torch.empty_like(batch.q)
        for i, tuning in enumerate(configs):
            try:
                times[i][name] = timer(functools.partial(launch, batch, out, tuning))
            except (OutOfResources, RuntimeError) as exc:  # e.g. shared memory short for a big tile
                print(f"    skip {tuning} on {name}: {type(exc).__name__}")
    best = {name: min(t[name] for t in times.values() if name in t) for name, _ in shapes}
    ranked = sorted((math.exp(sum(math.log(t[n] / best[n]) for n in best) / len(best)), i)
                    for i, t in times.items() if len(t) == len(best))
    print(f"\n{kernel} launch sweep: best per shape (µs): " + ", ".join(f"{n} {us:.1f}" for n, us in best.items()))
    for slowdown, i in ranked[:5]:
        print(f"  {slowdown:5.3f}x of best  {asdict(configs[i])}  " +
              " ".join(f"{times[i][n]:.1f}" for n in best))
    report.sweep.append({"kernel": kernel, "best_us": best,
                         "ranked": [{"geomean_slowdown": sl, **asdict(configs[i]), "us": times[i]}
                                    for sl, i in ranked]})


def run_sweep(report: Report) -> None:
    from runtime_lib.kernels.paged_attention import DecodeTuning
    from runtime_lib.kernels.varlen_attention import VarlenTuning, paged_varlen_attention

    def varlen_launch(b: PagedBatch, out: torch.Tensor, tuning: VarlenTuning) -> None:
        m = b.meta
        paged_varlen_attention(b.q, b.kv, m.block_tables, m.context_lens, m.cu_query_lens, m.max_query_len,
                               b.scale, max_context_len=m.max_context_len, out=out, tuning=tuning)

    shapes = [("1x2048", make_paged_batch([2048], [2048])),
              ("8x512", make_paged_batch([512] * 8, [512] * 8)),
              ("4x512@3584", make_paged_batch([512] * 4, [4096] * 4))]
    configs = [VarlenTuning(bm, bn, w, st) for bm in (64, 128) for bn in (32, 64, 128) for w in (4, 8)
               for st in (2, 3, 4)]
    _sweep(report, "varlen", shapes, configs, graph_us, varlen_launch)
    del shapes
    torch.cuda.empty_cache()

    shapes = [(f"B{B}/{ctx}", make_paged_batch([1] * B, [ctx] * B))
              for B in (1, 8, 64, 256) for ctx in (1024, 4096)]
    configs = [DecodeTuning(bn, mp, w, st) for bn in (32, 64, 128) for mp in (512, 1024, 2048) for w in (2, 4)
               for st in (2, 3)]
    _sweep(report, "decode", shapes, configs, graph_us, _decode_launch)
    del shapes
    torch.cuda.empty_cache()


def _decode_launch(b: PagedBatch, out: torch.Tensor, tuning) -> None:
    from runtime_lib.kernels.paged_attention import paged_decode_attention

    m = b.meta
    paged_decode_attention(b.q, b.kv, m.block_tables, m.context_lens, b.scale, None, m.max_context_len,
                           out=out, tuning=tuning)


def run_offline_shapes(report: Report) -> None:
    """The offline benchmarks' big decode steps: the decode kernel's launch knobs at their
    batches and contexts (1000/1000 at batch 192-224, 128/128 at 512), and cuBLAS GEMMs of the
    8B projections at those row counts (TFLOP/s and weight GB/s; the step's two bounds)."""
    from runtime_lib.kernels.paged_attention import DecodeTuning

    shapes = [(f"B{B}/{ctx}", make_paged_batch([1] * B, [ctx] * B))
              for B, ctx in ((192, 1024), (192, 1536), (224, 2000), (512, 192))]
    for name, b in shapes:
        kv_bytes = 2 * b.meta.context_lens.sum().item() * NUM_KV_HEADS * HEAD_SIZE * b.kv.element_size()
        us = graph_us(functools.partial(_decode_launch, b, torch.empty_like(b.q), DecodeTuning()))
        print(f"  decode {name}: default {us:.1f} us, {kv_bytes / us / 1e3:.0f} GB/s "
              f"({100 * kv_bytes / us / 1e3 / report.copy_gbps:.1f}% copy)")
    configs = [DecodeTuning(bn, 2048, w, st) for bn in (32, 64, 128) for w in (2, 4, 8) for st in (2, 3, 4)]
    _sweep(report, "decode-offline", shapes, configs, graph_us, _decode_launch)
    del shapes
    torch.cuda.empty_cache()

    print("\ncuBLAS bf16 GEMMs (8B projections), graph replay")
    shapes_nk = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
    for m in (192, 224, 256, 384, 512, 1024, 8192):
        total_us = 0.0
        for name, (n, k) in shapes_nk.items():
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            us = graph_us(lambda x=x, w=w: torch.mm(x, w.t()))
            total_us += us
            tflops, gbps = 2 * m * n * k / us / 1e6, 2 * n * k / us / 1e3
            report.gemm.append({"rows": m, "matrix": name, "n": n, "k": k, "us": us, "tflops": tflops,
                                "weight_gbps": gbps})
            print(f"  M={m:5d} {name:8s} {us:8.1f} us  {tflops:6.0f} TFLOP/s  {gbps:6.0f} GB/s")
        print(f"  M={m:5d} layer total {total_us:8.1f} us -> 32 layers {32 * total_us / 1e3:.2f} ms "
              f"({32 * total_us / m:.1f} us per row)")


def run_fp8_shapes(report: Report) -> None:
    """The decode kernel over an FP8 (e4m3) cache against bf16 at the offline benchmarks' shapes:
    time and KV GB/s of each, then a launch-knob sweep for FP8 (tile, warps, stages, and whether
    the tile products run in fp16 or in q's bf16)."""
    from runtime_lib.config import FP8_KV_DTYPE
    from runtime_lib.kernels.paged_attention import DecodeTuning

    shapes = []
    for B, ctx in ((192, 1536), (512, 192), (64, 4096), (8, 8192)):
        b = make_paged_batch([1] * B, [ctx] * B)
        b8 = PagedBatch(b.q, b.kv.to(FP8_KV_DTYPE), b.meta, b.scale)
        for label, batch in (("bf16", b), ("fp8", b8)):
            kv_bytes = 2 * batch.meta.context_lens.sum().item() * NUM_KV_HEADS * HEAD_SIZE * batch.kv.element_size()
            us = graph_us(functools.partial(_decode_launch, batch, torch.empty_like(batch.q), DecodeTuning()))
            report.fp8.append({"shape": f"B{B}/{ctx}", "kv": label, "us": us, "kv_gbps": kv_bytes / us / 1e3})
            print(f"  decode B{B}/{ctx} {label} KV: {us:8.1f} us, {kv_bytes / us / 1e3:5.0f} GB/s "
                  f"({100 * kv_bytes / us / 1e3 / report.copy_gbps:.1f}% copy)")
        shapes.append((f"B{B}/{ctx}", b8))
    configs = [DecodeTuning(bn, 2048, w, st, f16) for bn in (64, 128, 256) for w in (2, 4, 8) for st in (2, 3, 4)
               for f16 in (True, False)]
    _sweep(report, "decode-fp8", shapes, configs, graph_us, _decode_launch)
    del shapes
    torch.cuda.empty_cache()


def run_fp8_gemm(report: Report) -> None:
    """The 8B projections (32 layers' worth) by row count: bf16 cuBLAS against FP8 weights
    (layers/fp8_linear.py): `_scaled_mm` alone, and the whole `Fp8Linear` (per-token activation
    quantization + GEMM) compiled as the engine compiles it. Graph replay, µs per layer set."""
    from runtime_lib.layers.fp8_linear import Fp8Linear, quantize_rows, quantize_weight

    shapes_nk = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
    print("\nbf16 cuBLAS vs FP8 (8B projections, one layer), graph replay")
    for m in (1, 16, 192, 256, 512, 1024, 8192):
        row = {"rows": m, "bf16_us": 0.0, "fp8_mm_us": 0.0, "fp8_linear_us": 0.0}
        for n, k in shapes_nk.values():
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            wq, ws = quantize_weight(w)
            xq, xs = quantize_rows(x)
            lin = Fp8Linear(k, n).cuda()
            lin.weight.copy_(wq)
            lin.weight_scale.copy_(ws)
            torch.compiler.reset()  # one compile per shape, not a recompile (8 of those fall back to eager)
            fwd = torch.compile(lin.forward, dynamic=False)
            row["bf16_us"] += graph_us(lambda x=x, w=w: torch.mm(x, w.t()))
            row["fp8_mm_us"] += graph_us(functools.partial(
                torch._scaled_mm, xq, wq.t(), scale_a=xs, scale_b=ws.view(1, -1), out_dtype=torch.bfloat16))
            row["fp8_linear_us"] += graph_us(functools.partial(fwd, x))
        flops = 2 * m * sum(n * k for n, k in shapes_nk.values())
        row["bf16_tflops"] = flops / row["bf16_us"] / 1e6
        row["fp8_linear_tflops"] = flops / row["fp8_linear_us"] / 1e6
        report.fp8_gemm.append(row)
        print(f"  M={m:5d} bf16 {row['bf16_us']:8.1f} us ({row['bf16_tflops']:4.0f} TF/s)  fp8 mm "
              f"{row['fp8_mm_us']:8.1f}  fp8 linear {row['fp8_linear_us']:8.1f} us ({row['fp8_linear_tflops']:4.0f} "
              f"TF/s)  {row['bf16_us'] / row['fp8_linear_us']:.2f}x")
    torch.cuda.empty_cache()


def run_blas(report: Report, autotune_rows: tuple[int, ...] = (512,)) -> None:
    """bf16 GEMMs of the 8B projections by row count under each BLAS library torch can pick
    (cuBLAS, cuBLASLt) and, at `autotune_rows`, Inductor's max-autotune (its Triton templates
    against ATen): is there a faster bf16 GEMM than the default for the offline steps?"""
    import torch._inductor.config as inductor_config

    shapes_nk = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
    default_lib = torch.backends.cuda.preferred_blas_library()
    mats = {name: torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for name, (n, k) in shapes_nk.items()}
    print("\nbf16 GEMMs by BLAS library (8B projections, one layer), graph replay")
    for m in (494, 512, 1024, 8192):
        row: dict = {"rows": m}
        xs = {name: torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for name, (n, k) in shapes_nk.items()}
        for lib in ("cublas", "cublaslt"):
            torch.backends.cuda.preferred_blas_library(lib)
            row[lib] = {name: graph_us(lambda x=xs[name], w=mats[name]: torch.mm(x, w.t())) for name in shapes_nk}
        torch.backends.cuda.preferred_blas_library(default_lib)
        if m in autotune_rows:
            with inductor_config.patch(max_autotune_gemm_backends="ATEN,TRITON", max_autotune=True):
                row["max_autotune"] = {}
                for name in shapes_nk:
                    torch.compiler.reset()
                    fn = torch.compile(lambda x, w: torch.mm(x, w.t()), dynamic=False)
                    row["max_autotune"][name] = graph_us(functools.partial(fn, xs[name], mats[name]))
        flops = 2 * m * sum(n * k for n, k in shapes_nk.values())
        for key in ("cublas", "cublaslt", "max_autotune"):
            if key in row:
                us = sum(row[key].values())
                row[f"{key}_us"], row[f"{key}_tflops"] = us, flops / us / 1e6
        report.blas.append(row)
        print(f"  M={m:5d} " + "  ".join(f"{key} {row[f'{key}_us']:8.1f} us ({row[f'{key}_tflops']:4.0f} TF/s)"
                                         for key in ("cublas", "cublaslt", "max_autotune") if f"{key}_us" in row)
              + "  per matrix: " + json.dumps({k: {n: round(u, 1) for n, u in v.items()} for k, v in row.items()
                                               if isinstance(v, dict)}))
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- output

def markdown(report: Report) -> str:
    lines = [f"# Triton paged attention on {report.device}",
             (f"torch {report.torch}, triton {report.triton}, python {report.python}, {report.date}; "
              f"device-to-device copy bandwidth {report.copy_gbps:.0f} GB/s")]
    if report.checks:
        lines += ["", "## Correctness vs paged_attention_torch (fp32)", "", "| check | max abs err | tol | ok |",
                  "|---|---|---|---|"]
        lines += [f"| {c.name} | {c.max_abs_err:.2e} | {c.tol:.0e} | {'yes' if c.passed else '**NO**'} |"
                  for c in report.checks]
    if report.decode:
        lines += ["", "## Decode, Llama-3.1-8B heads (32/8, d=128), bf16, block 16 — µs per call", "",
                  ("| batch | context | split | triton | triton (graph) | triton host | torch gather+SDPA | "
                   "SDPA contiguous | KV MB | GB/s (graph) | % copy BW | speedup vs torch paged | vs SDPA contiguous |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report.decode:
        lines.append(f"| {r.batch} | {r.context} | {r.partition_size} | {r.triton_us:.1f} | {r.triton_graph_us:.1f} | "
                     f"{r.triton_host_us:.1f} | {r.torch_paged_us:.1f} | {r.sdpa_contiguous_us:.1f} | {r.kv_mbytes:.1f} | "
                     f"{r.triton_graph_gbps:.0f} | {r.pct_of_copy_bw:.1f} | "
                     f"{r.torch_paged_us / r.triton_graph_us:.1f}x | {r.sdpa_contiguous_us / r.triton_graph_us:.2f}x |")
    if report.prefill:
        lines += ["", "## Prefill / varlen, bf16 — µs per call", "",
                  ("| case | tokens | triton varlen | triton (graph) | TFLOP/s (graph) | triton host | torch gather+SDPA "
                   "| SDPA contiguous (flash, causal) |"),
                  "|---|---|---|---|---|---|---|---|"]
    for r in report.prefill:
        sdpa = f"{r.sdpa_contiguous_us:.1f}" if r.sdpa_contiguous_us else "n/a"
        lines.append(f"| {r.case} | {r.tokens} | {r.triton_us:.1f} | {r.triton_graph_us:.1f} | {r.triton_tflops:.1f} "
                     f"| {r.triton_host_us:.1f} | {r.torch_paged_us:.1f} | {sdpa} |")
    if report.graph_bound:
        lines += ["", "## Decode in a graph captured for a 128k-token bound — µs per call (graph replay)", "",
                  "| batch | context | adaptive slices | fixed slices (size) | fixed / adaptive |", "|---|---|---|---|---|"]
        lines += [f"| {r['batch']} | {r['context']} | {r['adaptive_us']:.1f} | {r['fixed_us']:.1f} ({r['fixed_partition']}) "
                  f"| {r['fixed_us'] / r['adaptive_us']:.2f}x |" for r in report.graph_bound]
    if report.fp8:
        lines += ["", "## Decode over a bf16 vs an FP8 (e4m3) cache, default launch — graph replay", "",
                  "| shape | KV | µs | KV GB/s | % of copy |", "|---|---|---|---|---|"]
        lines += [f"| {r['shape']} | {r['kv']} | {r['us']:.1f} | {r['kv_gbps']:.0f} | "
                  f"{100 * r['kv_gbps'] / report.copy_gbps:.1f}% |" for r in report.fp8]
    if report.fp8_gemm:
        lines += ["", "## Llama-3.1-8B projections of one layer: bf16 cuBLAS vs FP8 weights — µs, graph replay", "",
                  "| rows | bf16 | FP8 `_scaled_mm` | FP8 linear (quantize x + GEMM, compiled) | speedup |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['rows']} | {r['bf16_us']:.1f} ({r['bf16_tflops']:.0f} TFLOP/s) | {r['fp8_mm_us']:.1f} | "
                  f"{r['fp8_linear_us']:.1f} ({r['fp8_linear_tflops']:.0f} TFLOP/s) | "
                  f"{r['bf16_us'] / r['fp8_linear_us']:.2f}x |" for r in report.fp8_gemm]
    if report.blas:
        keys = [k for k in ("cublas", "cublaslt", "max_autotune") if any(f"{k}_us" in r for r in report.blas)]
        lines += ["", "## Llama-3.1-8B projections of one layer, bf16, by GEMM library — µs (TFLOP/s), graph replay", "",
                  "| rows | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        lines += ["| " + " | ".join([str(r["rows"])] + [
            f"{r[f'{k}_us']:.1f} ({r[f'{k}_tflops']:.0f})" if f"{k}_us" in r else "-" for k in keys]) + " |"
            for r in report.blas]
    if report.sweep:
        lines += ["", "## Launch sweeps: top configs by geometric-mean slowdown vs each shape's best", ""]
        for s in report.sweep:
            lines.append(f"- {s['kernel']}, best µs per shape: {s['best_us']}")
            lines += [f"  - {r['geomean_slowdown']:.3f}x: " + " ".join(f"{k}={v}" for k, v in r.items()
                                                                     if k not in ("geomean_slowdown", "us"))
                      for r in s["ranked"][:5]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--sections", default="checks,decode,prefill",
                        help="comma list of checks,decode,prefill,sweep,graphbound,offline,fp8,gemm,blas (sweep: launch-parameter "
                             "search; graphbound: decode in a graph captured for 128k tokens; offline: decode "
                             "knobs and cuBLAS GEMMs at the offline benchmarks' batches)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_kernels: no CUDA device, skipping")
        return 0
    try:
        import triton
    except ImportError:
        print("gpu_kernels: triton is not installed, skipping")
        return 0

    torch.manual_seed(0)
    report = Report(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                    python=platform.python_version(), date=dt.datetime.now().isoformat(timespec="seconds"),
                    copy_gbps=copy_bandwidth_gbps())
    print(f"{report.device}  torch {report.torch}  triton {report.triton}  copy {report.copy_gbps:.0f} GB/s")
    sections = set(args.sections.split(","))
    if "checks" in sections:
        run_checks(report)
    if "decode" in sections:
        batches = [1, 8, 64, 256] if not args.quick else [1, 64]
        contexts = [128, 1024, 4096] if not args.quick else [1024, 4096]
        run_decode_bench(report, batches, contexts)
    if "prefill" in sections:
        run_prefill_bench(report, args.quick)
    for name, run in (("sweep", run_sweep), ("graphbound", run_graph_bound_bench), ("offline", run_offline_shapes),
                      ("fp8", run_fp8_shapes), ("gemm", run_fp8_gemm), ("blas", run_blas)):
        if name in sections:
            run(report)

    tag = "" if sections == {"checks", "decode", "prefill"} else "-" + "-".join(sorted(sections))
    stem = results_stem("gpu_kernels", report.device, report.date, tag)
    write_results(stem, asdict(report), markdown(report))
    print(f"\nwrote {stem}.json and {stem}.md")
    failed = [c.name for c in report.checks if not c.passed]
    if failed:
        print(f"FAILED checks: {failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
