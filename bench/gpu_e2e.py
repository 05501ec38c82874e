"""GPU end-to-end benchmark of runtime_lib against HF transformers on the same random weights.

One command, from the repository root, on a CUDA machine:

    python3 bench/gpu_e2e.py                          # 1B and 8B: every section
    python3 bench/gpu_e2e.py --models 1b --sections bs1,correctness
    python3 bench/gpu_e2e.py --compile                # also torch.compile the captured decode step

Models are Llama-3.2-1B and Llama-3.1-8B shapes (issue 8) with random bf16 weights made on the
GPU by HF's `LlamaForCausalLM`; ours is loaded from HF's state dict through the strict HF weight
map, so both run identical weights. Sections, per model:
  bs1          decode ms/token after a 128-token prompt: ours eager / CUDA graphs (/ compiled),
               HF `generate` eager (and static cache + compile with --hf-compile); % of the HBM
               roofline = (weights + KV bytes per step) / device-to-device copy bandwidth measured
               in the same run; graph replay time vs. the whole step (host overhead); a profile
               of the eager step's kernel time by category.
  correctness  greedy tokens: our GPU path vs HF (bf16 mismatch rate), graphs vs eager, and
               (once) our GPU fp32 path vs our CPU fp32 path on the tiny demo checkpoint.
  offline      output tok/s for ISL/OSL 128/128 at several batch sizes through ModelRunner.generate
               and LLMEngine (all requests at once; --waves W: W x batch requests through an engine of
               batch rows), vs HF generate at its batch (--long: 1000/1000).
  latency      TTFT / ITL percentiles at 1, 8, 32, 128 concurrent streams through LLMEngine.
  prefill      prefill / mixed steps eager vs token-bucket CUDA graphs (vs compiled): TTFT of one
               request per prompt length, TTFT / ITL at --concurrency, staggered arrivals.
Prints a table; JSON + Markdown + a throughput-vs-concurrency PNG go to $OUT when set, else
bench/results/. Without CUDA it says so and exits 0.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import itertools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from runtime_lib.config import ModelConfig, SamplingConfig
from runtime_lib.engine import EngineConfig, LLMEngine
from runtime_lib.model_runner import ModelRunner
from runtime_lib.models import build_model
from runtime_lib.models.llama import LlamaForCausalLM as OurLlama
from runtime_lib.models.weights import convert_hf_weights
from runtime_lib.session import Session, TorchBackend

MAX_SEQ_LEN = 4096
DEVICE = "cuda"  # `--device cpu --models tiny` smoke-tests this script's logic without a GPU
SHAPES: dict[str, dict[str, Any]] = {
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
               "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "tie_word_embeddings": True, "rope_factor": 32.0},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "tie_word_embeddings": False, "rope_factor": 8.0},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512, "tie_word_embeddings": True, "rope_factor": 8.0},
}
# Issue 8's targets, printed next to the measurements.
TARGETS = {"tiny": {"bs1_pct_roofline": 0.0}, "1b": {"bs1_pct_roofline": 75.0}, "8b": {"bs1_pct_roofline": 90.0, "offline_128_tok_s": 18500.0,
                                                     "offline_1000_tok_s": 7055.0, "ratio_vs_hf": 20.0}}


# ----------------------------------------------------------------------------- helpers
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def copy_bandwidth_gbps(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy: bytes read + bytes written per second (median of 20)."""
    if DEVICE != "cuda":
        nbytes = 1 << 24
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(20):
        if DEVICE != "cuda":
            times.append(timed(lambda: dst.copy_(src)))
            continue
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return 2 * nbytes / statistics.median(times) / 1e9


@dataclass
class StateDictCheckpoint:
    """An HF state dict in memory, read through the same strict weight map as a checkpoint dir."""

    state: dict[str, torch.Tensor]
    model_dir: str = "<HF model in memory>"

    def names(self) -> set[str]:
        return set(self.state)

    def get(self, name: str) -> torch.Tensor:
        return self.state[name]


def build_models(name: str) -> tuple[Any, Session, ModelConfig]:
    """`name`: a SHAPES key, optionally with "-fp8" (our model gets FP8 weights; HF's stays bf16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    base, _, quant = name.partition("-")
    shape = dict(SHAPES[base])
    factor = shape.pop("rope_factor")
    hf_cfg = LlamaConfig(**shape, max_position_embeddings=16384, rms_norm_eps=1e-5, bos_token_id=128000,
                         eos_token_id=128001, rope_parameters={
                             "rope_type": "llama3", "rope_theta": 500000.0, "factor": factor,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192})
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEVICE):
            hf = LlamaForCausalLM(hf_cfg)
    finally:
        torch.set_default_dtype(prev)
    hf.eval().requires_grad_(False)
    hf.generation_config.pad_token_id = 0
    session, mc = session_from_hf(hf, "bfloat16", quant or "none")
    return hf, session, mc


def session_from_hf(hf, dtype: str, quantization: str = "none") -> tuple[Session, ModelConfig]:
    """Our model on HF's weights (its state dict through the strict HF weight map)."""
    raw = hf.config.to_dict()
    raw["architectures"] = ["LlamaForCausalLM"]
    mc = ModelConfig.from_hf_config(raw, dtype=dtype, max_seq_len=MAX_SEQ_LEN, max_input_len=MAX_SEQ_LEN - 1,
                                    max_batch_size=512, max_beam_width=1)
    ckpt = StateDictCheckpoint({k: v for k, v in hf.state_dict().items()})
    weights = convert_hf_weights(ckpt, OurLlama.hf_weight_map(mc), normalize=OurLlama.hf_name_normalizer(ckpt.names()),
                                 ignored=OurLlama.hf_ignored_weights(mc))
    model = build_model(mc, weights, device=DEVICE, dtype=mc.torch_dtype, quantization=quantization)
    return Session(TorchBackend(model), model.config), mc


def logits_check(hf, session: Session, prompts: list[torch.Tensor]) -> dict:
    """Last-position logits of one prefill, ours (Session.run over a paged cache) vs HF forward:
    relative L2 error, argmax agreement, and HF's top-1 minus top-2 logit margin at the rows
    where the argmax differs (near-ties flip under rounding; a real bug flips clear winners)."""
    from runtime_lib.model_step import StepRow, build_step_inputs

    bs, n = 16, len(prompts)
    nblk = math.ceil(max(len(p) for p in prompts) / bs)
    kv = session.allocate_kv_cache(n * nblk + 1, bs)
    rows = [StepRow(p.tolist(), 0, list(range(i * nblk, (i + 1) * nblk))) for i, p in enumerate(prompts)]
    inputs = build_step_inputs(rows, bs, DEVICE)
    inputs["kv_cache"] = kv
    out: dict[str, torch.Tensor] = {}
    session.run(inputs, out)
    ours = out["logits"].float()
    with torch.no_grad():
        ref = hf(input_ids=torch.stack(prompts).to(DEVICE)).logits[:, -1].float()
    top2 = ref.topk(2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1])
    differ = ours.argmax(-1) != ref.argmax(-1)
    return {"rel_l2_error": float((ours - ref).norm() / ref.norm()), "max_abs_error": float((ours - ref).abs().max()),
            "argmax_agree": f"{int((~differ).sum())}/{n}", "hf_top2_margin_median": float(margin.median()),
            "hf_top2_margin_where_argmax_differs": [round(float(m), 5) for m in margin[differ]],
            "logit_std": float(ref.std())}


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab, (length,), generator=g) for _ in range(n)]


def make_runner(session: Session, graphs: bool, compile_: bool = False, fused: bool = False) -> ModelRunner:
    session.compile_decode_graphs = compile_
    session.fused_decode = fused
    runner = ModelRunner.from_engine(session)
    runner.session.cuda_graphs = graphs
    return runner


def our_generate(runner: ModelRunner, prompts: list[torch.Tensor], new_tokens: int) -> torch.Tensor:
    return runner.generate(prompts, max_new_tokens=new_tokens, end_id=-1, pad_id=0)


def hf_generate(hf, prompts: list[torch.Tensor], new_tokens: int, **kw) -> torch.Tensor:
    ids = torch.stack(prompts).to(DEVICE)
    with torch.no_grad():
        return hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, **kw)


def decode_ms_per_token(gen, new_tokens: int, repeats: int = 3) -> float:
    """(time(1 + N new tokens) - time(1 new token)) / N: the prompt's prefill cancels out."""
    gen(1)
    gen(new_tokens + 1)  # warm-up: kernels, graphs
    t1 = min(timed(lambda: gen(1)) for _ in range(repeats))
    tn = min(timed(lambda: gen(new_tokens + 1)) for _ in range(repeats))
    return (tn - t1) / new_tokens * 1e3


def our_weight_bytes(session: Session) -> int:
    """What one step of our model reads: its state dict (FP8 projections count 1 byte a value)."""
    return sum(t.numel() * t.element_size() for t in session.model.state_dict().values())


def kv_bytes_per_token(mc: ModelConfig) -> int:
    return 2 * mc.num_layers * mc.num_kv_heads * mc.head_size * 2


def free_cuda() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- sections
def section_bs1(name: str, hf, session: Session, mc: ModelConfig, res: dict, args) -> None:
    prompt = random_prompts(1, 128, mc.vocab_size, seed=1)
    n = args.bs1_tokens
    bw = res["copy_bandwidth_gbps"]
    step_bytes = our_weight_bytes(session) + kv_bytes_per_token(mc) * (128 + n / 2)
    roofline_ms = step_bytes / (bw * 1e9) * 1e3
    out: dict[str, Any] = {"roofline_ms": roofline_ms, "bytes_per_step": step_bytes, "new_tokens": n, "rows": {}}
    res["bs1"] = out

    def record(label: str, ms: float, **extra) -> None:
        out["rows"][label] = {"ms_per_token": ms, "pct_roofline": 100 * roofline_ms / ms, **extra}
        log(f"{name} bs1 {label}: {ms:.3f} ms/token ({100 * roofline_ms / ms:.1f}% of roofline {roofline_ms:.3f} ms)")

    if not args.no_eager:
        eager = make_runner(session, graphs=False)
        record("ours eager", decode_ms_per_token(lambda k: our_generate(eager, prompt, k), n, repeats=1))
        out["profile_eager"] = profile_step(lambda: our_generate(eager, prompt, 17), steps=16)
        eager = None  # drop its KV pool and graphs now
    graphs = make_runner(session, graphs=True)
    ms = decode_ms_per_token(lambda k: our_generate(graphs, prompt, k), n)
    replay_ms = graph_replay_ms(graphs)
    record("ours CUDA graphs", ms, graph_replay_ms=replay_ms, host_overhead_ms=ms - replay_ms)
    out["profile_graphs"] = profile_step(lambda: our_generate(graphs, prompt, 17), steps=16)
    graphs = None  # drop its KV pool and graphs now
    if args.compile:
        t0 = time.perf_counter()
        comp = make_runner(session, graphs=True, compile_=True)
        our_generate(comp, prompt, 3)
        compile_s = time.perf_counter() - t0
        ms = decode_ms_per_token(lambda k: our_generate(comp, prompt, k), n)
        replay_ms = graph_replay_ms(comp)
        record("ours CUDA graphs + torch.compile", ms, graph_replay_ms=replay_ms, host_overhead_ms=ms - replay_ms,
               compile_s=compile_s)
        out["profile_compiled"] = profile_step(lambda: our_generate(comp, prompt, 17), steps=16)
        comp = None  # drop its KV pool and graphs now
        session.compile_decode_graphs = False
    if args.fused:
        from runtime_lib.kernels.pdl import DISABLE_ENV as PDL_ENV
        from runtime_lib.kernels.pdl import pdl_enabled

        fused = make_runner(session, graphs=True, fused=True)
        ms = decode_ms_per_token(lambda k: our_generate(fused, prompt, k), n)
        replay_ms = graph_replay_ms(fused)
        record("ours CUDA graphs + fused small-batch step", ms, graph_replay_ms=replay_ms,
               host_overhead_ms=ms - replay_ms, pdl=pdl_enabled(torch.device(args.device)))
        out["profile_fused"] = profile_step(lambda: our_generate(fused, prompt, 17), steps=16)
        fused = None
        if pdl_enabled(torch.device(args.device)):  # the same step in plain stream order, for scale
            os.environ[PDL_ENV] = "0"
            try:
                plain = make_runner(session, graphs=True, fused=True)
                ms = decode_ms_per_token(lambda k: our_generate(plain, prompt, k), n)
                record("ours CUDA graphs + fused small-batch step, PDL off", ms,
                       graph_replay_ms=graph_replay_ms(plain))
                plain = None
            finally:
                del os.environ[PDL_ENV]
    hf_n = min(n, args.hf_tokens)
    if hf_n > 0:
        record("HF generate eager", decode_ms_per_token(lambda k: hf_generate(hf, prompt, k), hf_n, repeats=1),
               new_tokens=hf_n)
    if args.hf_compile:
        try:
            ms = decode_ms_per_token(lambda k: hf_generate(hf, prompt, k, cache_implementation="static"), n, repeats=2)
            record("HF generate static cache + compile", ms)
        except Exception as e:  # noqa: BLE001 - an HF API change must not sink the rest of the run
            out["rows"]["HF generate static cache + compile"] = {"error": f"{type(e).__name__}: {e}"}
    free_cuda()


def graph_replay_ms(runner: ModelRunner, batch: int = 1) -> float:
    """GPU time of one decode-step graph replay at `batch` rows (the last step's inputs, 50 times;
    the rows' K/V land in slots their freed sequences owned, which nothing reads)."""
    from runtime_lib.cuda_graph import choose_bucket

    gr = runner.session._graph_runner
    bucket = choose_bucket(batch, gr.buckets) if gr is not None else None
    key = (bucket, gr._context_bound(bucket, int(gr.context_lens[:batch].max()))) if bucket else None
    if key not in gr._graphs:  # the graph the last step replayed (its bucket and context bound)
        return float("nan")
    graph = gr._graphs[key][0]
    graph.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(50):
        graph.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 50


def kernel_category(name: str) -> str:
    n = name.lower()
    if "small_linear" in n:
        return "matmul (fused small_linear)"
    if "qkv_rope_kv" in n:
        return "matmul (fused qkv + rope + kv write)"
    if "rope_kv" in n:
        return "rope + kv write"
    if "decode_partition" in n or "decode_reduce" in n or "varlen" in n or "flash" in n or "attention" in n:
        return "attention"
    if any(k in n for k in ("gemm", "nvjet", "cutlass", "xmma", "cublas", "matmul", "gemv", "splitk")):
        return "matmul"
    if any(k in n for k in ("index", "scatter", "gather", "copy", "cat")):
        return "copy/index"
    if "triton" in n:
        return "fused (triton)"
    return "elementwise/other"


def kernel_totals(prof) -> tuple[dict[str, float], dict[str, int], list[tuple[float, int, str]]]:
    """GPU time (us) and launch count per `kernel_category` of a finished torch.profiler run,
    and every kernel as (us, count, name), longest first."""
    from torch.autograd import DeviceType

    cats: dict[str, float] = {}
    counts: dict[str, int] = {}
    top = []
    for evt in prof.key_averages():
        if getattr(evt, "device_type", None) != DeviceType.CUDA:
            continue
        dev_us = getattr(evt, "self_device_time_total", None)
        if dev_us is None:
            dev_us = getattr(evt, "self_cuda_time_total", 0)
        if not dev_us:
            continue
        c = kernel_category(evt.key)
        cats[c] = cats.get(c, 0.0) + dev_us
        counts[c] = counts.get(c, 0) + evt.count
        top.append((dev_us, evt.count, evt.key[:90]))
    top.sort(reverse=True)
    return cats, counts, top


def profile_step(fn, steps: int) -> dict:
    """Kernel time per decode step by category (the prefill is in the trace too: it is one
    step of 17, so divide by steps + 1 is close enough for the split; we report per-step means)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync()
    cats, counts, top = kernel_totals(prof)
    per = steps + 1
    return {"kernel_us_per_step": {c: v / per for c, v in sorted(cats.items(), key=lambda x: -x[1])},
            "kernels_per_step": {c: v / per for c, v in counts.items()},
            "total_kernel_us_per_step": sum(cats.values()) / per,
            "top_kernels": [{"us_per_step": u / per, "calls_per_step": n / per, "name": k} for u, n, k in top[:12]]}


def section_correctness(name: str, hf, session: Session, mc: ModelConfig, res: dict, args) -> None:
    out: dict[str, Any] = {}
    res["correctness"] = out
    prompts = random_prompts(8, 32, mc.vocab_size, seed=2)
    res["logits_vs_hf"] = {"bf16": logits_check(hf, session, random_prompts(32, 64, mc.vocab_size, seed=7))}
    if args.fp32_check:
        import copy

        hf32 = copy.deepcopy(hf).float()
        session32, _ = session_from_hf(hf32, "float32")
        res["logits_vs_hf"]["fp32"] = logits_check(hf32, session32, random_prompts(32, 64, mc.vocab_size, seed=7))
        del hf32, session32
        free_cuda()
    log(f"{name} logits vs HF: {res['logits_vs_hf']}")
    n = 48
    hf_ids = hf_generate(hf, prompts, n)[:, 32:].cpu()
    graphs = make_runner(session, graphs=True)
    ours_g = our_generate(graphs, prompts, n)[:, 0, 32:32 + n].cpu()
    graphs = None  # drop its KV pool and graphs now
    eager = make_runner(session, graphs=False)
    ours_e = our_generate(eager, prompts, n)[:, 0, 32:32 + n].cpu()
    eager = None  # drop its KV pool and graphs now
    out["ours_graphs_vs_hf"] = token_agreement(ours_g, hf_ids)
    out["ours_graphs_vs_ours_eager"] = token_agreement(ours_g, ours_e)
    log(f"{name} correctness: graphs vs HF {out['ours_graphs_vs_hf']}; graphs vs eager {out['ours_graphs_vs_ours_eager']}")
    if args.compile_correctness:
        comp = make_runner(session, graphs=True, compile_=True)
        ours_c = our_generate(comp, prompts, n)[:, 0, 32:32 + n].cpu()
        comp = None  # drop its KV pool and graphs now
        session.compile_decode_graphs = False
        out["ours_compiled_vs_ours_eager"] = token_agreement(ours_c, ours_e)
        log(f"{name} correctness: compiled vs eager {out['ours_compiled_vs_ours_eager']}")
    if args.fused:
        fused = make_runner(session, graphs=True, fused=True)
        ours_f = our_generate(fused, prompts, n)[:, 0, 32:32 + n].cpu()
        fused = None
        out["ours_fused_vs_ours_eager"] = token_agreement(ours_f, ours_e)
        out["ours_fused_vs_hf"] = token_agreement(ours_f, hf_ids)
        log(f"{name} correctness: fused vs eager {out['ours_fused_vs_ours_eager']}; fused vs HF {out['ours_fused_vs_hf']}")
    free_cuda()


def token_agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Greedy sequences (R, N): how many rows match exactly, mean matching-prefix fraction, and
    the positionwise mismatch rate (after a first divergence the rest differs by construction)."""
    R, N = a.shape
    prefix = []
    for r in range(R):
        diff = (a[r] != b[r]).nonzero()
        prefix.append(int(diff[0]) if diff.numel() else N)
    return {"rows": R, "tokens": N, "rows_identical": sum(p == N for p in prefix),
            "mean_matching_prefix_frac": sum(prefix) / (R * N),
            "first_divergence": prefix, "token_mismatch_rate": float((a != b).float().mean())}


def small_model_cpu_vs_gpu(res: dict) -> None:
    """Our GPU path (fp32, graphs) vs our CPU path (fp32) on the tiny demo llama: greedy tokens equal."""
    from runtime_lib.demo import build_checkpoint

    d = build_checkpoint(Path(tempfile.mkdtemp()) / "llama", "llama")
    prompts = [torch.tensor(p) for p in ([1, 17, 42, 99, 250, 7], [1, 300, 5, 5, 8, 120, 64, 33, 390], [1, 2, 3])]
    kw = {"max_new_tokens": 40, "end_id": -1, "pad_id": 3}
    cpu = ModelRunner.from_dir(d, device="cpu", dtype="float32").generate(prompts, **kw)
    gpu_runner = ModelRunner.from_dir(d, device=DEVICE, dtype="float32")
    gpu = gpu_runner.generate(prompts, **kw).cpu()
    replays = gpu_runner.session._graph_runner.num_replays if gpu_runner.session._graph_runner else 0
    bf16 = ModelRunner.from_dir(d, device=DEVICE, dtype="bfloat16").generate(prompts, **kw).cpu()
    compiled_runner = ModelRunner.from_dir(d, device=DEVICE, dtype="float32")
    compiled_runner.session.runtime.compile_decode_graphs = True
    compiled = compiled_runner.generate(prompts, **kw).cpu()
    res["small_model_cpu_fp32_vs_gpu"] = {
        "gpu_fp32_graph_replays": replays,
        "gpu_fp32_vs_cpu_fp32": token_agreement(gpu[:, 0], cpu[:, 0]),
        "gpu_fp32_compiled_vs_cpu_fp32": token_agreement(compiled[:, 0], cpu[:, 0]),
        "gpu_bf16_vs_cpu_fp32": token_agreement(bf16[:, 0], cpu[:, 0]),
    }
    log(f"small model: {res['small_model_cpu_fp32_vs_gpu']}")


def make_engine(session: Session, max_num_seqs: int, tokens_per_seq: int, compile_: bool,
                fused: bool = False, kv_cache_dtype: str = "auto", **config) -> LLMEngine:
    """An engine whose KV pool holds `max_num_seqs` sequences of `tokens_per_seq` (no preemption);
    `config`: more EngineConfig fields."""
    blocks = max_num_seqs * (math.ceil(tokens_per_seq / 16) + 1)
    return LLMEngine(EngineConfig(model_dir="<in-memory>", max_num_seqs=max_num_seqs, max_num_batched_tokens=8192,
                                  block_size=16, num_kv_blocks=blocks, max_seq_len=MAX_SEQ_LEN, max_queue_size=8192,
                                  compile_decode=compile_, fused_decode=fused, kv_cache_dtype=kv_cache_dtype,
                                  **config),
                     session=session)


def step_phases(steps: list[tuple[float, int, int]], t0: float) -> dict:
    """Where an engine run's time went, from (launch time, tokens, rows) per step: time from
    the start to the first launch, then steps with prompt tokens (prefill/mixed) against
    decode-only steps (each step's share: the time to the next launch)."""
    out = {"to_first_launch_s": steps[0][0] - t0 if steps else 0.0}
    for kind in ("mixed", "decode"):
        out[kind] = {"steps": 0, "s": 0.0, "tokens": 0}
    decode_ms = []
    for (t, tokens, rows), (t_next, _, _) in itertools.pairwise(steps):
        kind = out["mixed" if tokens > rows else "decode"]
        kind["steps"] += 1
        kind["s"] += t_next - t
        kind["tokens"] += tokens
        if tokens == rows:
            decode_ms.append(1e3 * (t_next - t))
    d = out["decode"]
    d["ms_per_step"] = 1e3 * d["s"] / max(d["steps"], 1)
    d["rows_per_step"] = d["tokens"] / max(d["steps"], 1)
    d["step_ms_pcts"] = {q: pct(decode_ms, q) for q in (10, 50, 90, 100)} if decode_ms else {}
    out["steps"] = [(round(1e3 * (t - t0), 2), tokens, rows) for t, tokens, rows in steps]  # launch ms, tokens, rows
    return out


def run_engine(session: Session, prompts: list[torch.Tensor], osl: int, engine: LLMEngine,
               gap_s: float = 0.0, tokens: list[list[int]] | None = None,
               lora_uids: list[str | None] | None = None) -> dict:
    """Submit every prompt at once (or one every `gap_s` seconds); per request the submit time
    and (time, n tokens) arrivals. `tokens`: filled with each request's output token ids.
    `lora_uids`: each request's LoRA adapter (bench/gpu_lora.py).
    Also the split of the run's time between mixed and decode-only steps (`step_phases`)."""
    steps: list[tuple[float, int, int]] = []
    on_step_done = engine.scheduler.on_step_done

    def record_step(sched) -> None:  # called by the engine thread right after it launched a step
        steps.append((time.perf_counter(), sched.num_batched_tokens, len(sched.scheduled)))
        on_step_done(sched)

    engine.scheduler.on_step_done = record_step
    gc_pauses: list[float] = []  # the interpreter's garbage collections during the run (any thread)
    gc_start = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gc_start[0] = time.perf_counter()
        elif info.get("generation") == 2 or time.perf_counter() - gc_start[0] > 1e-3:
            gc_pauses.append(time.perf_counter() - gc_start[0])

    gc.callbacks.append(on_gc)
    arrivals: dict[str, list[tuple[float, int]]] = {}
    submit: dict[str, float] = {}
    done = threading.Event()
    remaining = [len(prompts)]
    lock = threading.Lock()
    out_ids: dict[str, list[int]] = {}

    def on_output(o) -> None:
        arrivals[o.request_id].append((time.perf_counter(), len(o.new_token_ids)))
        out_ids[o.request_id] += o.new_token_ids
        if o.finished:
            with lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    done.set()

    scfg = SamplingConfig(end_id=-1, pad_id=0, max_new_tokens=osl)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        rid = f"r{i}-{t0}"
        arrivals[rid], out_ids[rid] = [], []
        if gap_s and i:
            time.sleep(gap_s)
        submit[rid] = time.perf_counter()
        engine.add_request(rid, p.tolist(), scfg, on_output=on_output,
                           lora_uid=lora_uids[i] if lora_uids is not None else None)
    done.wait()
    if tokens is not None:
        tokens += [out_ids[f"r{i}-{t0}"] for i in range(len(prompts))]
    t_end = max(t for a in arrivals.values() for t, _ in a)
    n_out = sum(k for a in arrivals.values() for _, k in a)
    ttft = [(a[0][0] - submit[r]) * 1e3 for r, a in arrivals.items() if a]
    itl = []
    for a in arrivals.values():
        for (t_prev, _), (t, k) in itertools.pairwise(a):
            if k:
                itl += [(t - t_prev) * 1e3 / k] * k
    st = engine.stats()
    engine.scheduler.on_step_done = on_step_done
    gc.callbacks.remove(on_gc)
    return {"requests": len(prompts), "output_tokens": n_out, "wall_s": t_end - t0, "tok_s": n_out / (t_end - t0),
            "phases": step_phases(steps + [(t_end, 0, 0)], t0),
            "gc_pauses_over_1ms_or_gen2": {"count": len(gc_pauses), "total_s": sum(gc_pauses),
                                           "max_ms": 1e3 * max(gc_pauses, default=0.0)},
            "ttft_ms": {q: pct(ttft, q) for q in (50, 90, 99)}, "itl_ms": {q: pct(itl, q) for q in (50, 90, 99)},
            "preempted_total": st.num_preempted_total, "steps_total": st.num_steps_total}


def section_offline(name: str, hf, session: Session, mc: ModelConfig, res: dict, args) -> None:
    out: dict[str, Any] = {"runner": {}, "engine": {}, "hf": {}, "compiled": bool(args.compile)}
    res["offline"] = out
    configs = ([(128, 128, b, w, kv) for b in args.batches for w in args.waves for kv in args.kv_cache_dtypes]
               + [(1000, 1000, args.long_batch, 1, kv) for kv in args.kv_cache_dtypes if args.long])
    for isl, osl, batch, waves, kv_dtype in configs:
        prompts = random_prompts(batch * waves, isl, mc.vocab_size, seed=3)
        while True:
            key = (f"{isl}/{osl} bs{batch}" + (f" x{waves} requests" if waves > 1 else "")
                   + (f" {kv_dtype} KV" if kv_dtype != "auto" else ""))
            try:
                offline_one(name, session, prompts, isl, osl, batch, key, out, args, mc.vocab_size, kv_dtype)
                break
            except torch.OutOfMemoryError as e:
                out["runner"].setdefault(key, {"error": f"OOM: {str(e)[:150]}"})
                free_cuda()
                if isl < 1000 or batch <= 32:
                    break
                batch //= 2  # the long run: retry at half the batch on a smaller card
                prompts = prompts[:batch]
    for batch in args.hf_batches:
        prompts = random_prompts(batch, 128, mc.vocab_size, seed=3)
        try:
            hf_generate(hf, prompts, 2)
            t = timed(lambda p=prompts: hf_generate(hf, p, args.hf_osl))
            out["hf"][f"128/{args.hf_osl} bs{batch}"] = {"tok_s": batch * args.hf_osl / t, "wall_s": t}
            log(f"{name} offline HF bs{batch} 128/{args.hf_osl}: {batch * args.hf_osl / t:,.0f} tok/s")
        except torch.OutOfMemoryError as e:
            out["hf"][f"bs{batch}"] = {"error": f"OOM: {e}"[:200]}
        free_cuda()


def offline_runner(name: str, session: Session, prompts: list[torch.Tensor], osl: int, batch: int, key: str,
                   out: dict, args) -> None:
    runner = make_runner(session, graphs=True, compile_=args.compile)
    our_generate(runner, prompts, 3)  # warm-up: prefill kernels, the bucket's graph (and its compile)
    t3 = timed(lambda: our_generate(runner, prompts, 3))
    t = timed(lambda: our_generate(runner, prompts, osl))
    step_ms = (t - t3) / (osl - 3) * 1e3
    replay_ms = graph_replay_ms(runner, batch)
    out["runner"][key] = {"tok_s": batch * osl / t, "wall_s": t, "prefill_plus_2_steps_s": t3,
                          "decode_step_ms": step_ms, "graph_replay_ms": replay_ms,
                          "host_ms_per_step": step_ms - replay_ms}
    log(f"{name} offline runner {key}: {batch * osl / t:,.0f} tok/s ({t:.2f} s; prefill+2 steps {t3:.2f} s; "
        f"decode step {step_ms:.2f} ms of which graph replay {replay_ms:.2f} ms)")


def offline_one(name: str, session: Session, prompts: list[torch.Tensor], isl: int, osl: int, batch: int,
                key: str, out: dict, args, vocab: int, kv_cache_dtype: str = "auto") -> None:
    try:
        # ModelRunner: a static batch (one wave), its cache in the model's dtype.
        if not args.engine_only and len(prompts) == batch and kv_cache_dtype == "auto":
            offline_runner(name, session, prompts, osl, batch, key, out, args)
    except torch.OutOfMemoryError as e:
        # ModelRunner prefills the whole batch in one pass (1000-token prompts x 128+ rows
        # overflow an 80 GB card); the engine's chunked prefill still runs at this batch.
        out["runner"][key] = {"error": f"OOM: {str(e)[:150]}"}
        log(f"{name} offline runner {key}: out of memory; engine only")
    except ValueError as e:  # e.g. more rows than the runner's max_batch_size
        out["runner"][key] = {"error": str(e)[:150]}
        log(f"{name} offline runner {key}: {e}; engine only")
    session.compile_decode_graphs = False
    free_cuda()
    engine = make_engine(session, batch, isl + osl, args.compile, args.fused, kv_cache_dtype)
    try:
        run_engine(session, random_prompts(batch, isl, vocab, seed=1003), 3, engine)  # warm-up
        window = None
        delays = [float(d) for d in args.profile_offline.split(",") if d] if args.profile_offline else []
        if delays:
            window = threading.Thread(target=profile_engine_windows, args=(engine, delays, out, key,
                                                                          0.5 if isl < 1000 else 1.0), daemon=True)
            window.start()
        stats = run_engine(session, prompts, osl, engine)
        if window is not None:
            window.join()
    finally:
        engine.shutdown()
    engine = None  # drop its KV pool and graphs now
    free_cuda()
    out["engine"][key] = stats
    ph = stats["phases"]
    log(f"{name} offline engine {key}: {stats['tok_s']:,.0f} tok/s ({stats['wall_s']:.2f} s, "
        f"{stats['steps_total']} steps, {stats['preempted_total']} preemptions); first launch after "
        f"{ph['to_first_launch_s']:.3f} s, {ph['mixed']['steps']} mixed steps {ph['mixed']['s']:.2f} s "
        f"({ph['mixed']['tokens']} tokens), {ph['decode']['steps']} decode steps {ph['decode']['s']:.2f} s "
        f"({ph['decode']['ms_per_step']:.1f} ms/step, {ph['decode']['rows_per_step']:.0f} rows; p10/50/90/max "
        f"{'/'.join(f'{v:.1f}' for v in ph['decode']['step_ms_pcts'].values())} ms); gc "
        f"{stats['gc_pauses_over_1ms_or_gen2']}")


def profile_engine_windows(engine: LLMEngine, delays_s: list[float], out: dict, key: str, window_s: float) -> None:
    """`profile_engine_window` at each of `delays_s` seconds after the run starts (in order)."""
    t0 = time.perf_counter()
    for delay in sorted(delays_s):
        time.sleep(max(0.0, t0 + delay - time.perf_counter()))
        profile_engine_window(engine, 0.0, out, f"{key} @{delay:g}s", window_s)


def profile_engine_window(engine: LLMEngine, delay_s: float, out: dict, key: str, window_s: float = 1.0) -> None:
    """Kernel time by category over `window_s` of a running engine, `delay_s` after it starts
    (CUPTI sees the engine thread's launches): per step, and the GPU's busy fraction (kernel
    time / wall time; under 100% means the host or the scheduler leaves the GPU idle); then
    where the engine thread spends the next `window_s`."""
    from torch.profiler import ProfilerActivity, profile

    time.sleep(delay_s)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        # Steps and wall time are read inside the window: leaving `profile` processes the trace
        # (~0.4 s) while the engine keeps stepping, and those steps have no recorded kernels.
        steps0, t0 = engine.stats().num_steps_total, time.perf_counter()
        time.sleep(window_s)
        torch.cuda.synchronize()
        steps = max(1, engine.stats().num_steps_total - steps0)
        wall_us = (time.perf_counter() - t0) * 1e6
    cats, _, top = kernel_totals(prof)
    stacks = sample_thread_stacks(engine._thread, window_s)  # the next window_s of the same run
    out.setdefault("engine_profile", {})[key] = {
        "steps": steps, "wall_ms_per_step": wall_us / steps / 1e3, "gpu_busy_pct": 100 * sum(cats.values()) / wall_us,
        "kernel_ms_per_step": {c: v / steps / 1e3 for c, v in sorted(cats.items(), key=lambda x: -x[1])},
        "top_kernels_ms_per_step": [(round(us / steps / 1e3, 3), n, name) for us, n, name in top[:25]],
        "engine_thread_samples": stacks}
    log(f"engine profile {key}: {out['engine_profile'][key]}")


def sample_thread_stacks(thread: threading.Thread, seconds: float, interval_s: float = 0.0005) -> dict:
    """Where a thread spends its time: sample its stack every `interval_s` for `seconds`; the
    share of samples per innermost runtime_lib / torch frame and per innermost engine.py frame."""
    import collections

    inner: collections.Counter = collections.Counter()
    engine_frames: collections.Counter = collections.Counter()
    n = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        frame = sys._current_frames().get(thread.ident)
        if frame is not None:
            n += 1
            inner[f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}:{frame.f_lineno}"] += 1
            f = frame
            while f is not None and not f.f_code.co_filename.endswith("runtime_lib/engine.py"):
                f = f.f_back
            if f is not None:
                engine_frames[f"engine.py:{f.f_code.co_name}:{f.f_lineno}"] += 1
        time.sleep(interval_s)
    return {"samples": n,
            "innermost": {k: round(100 * v / max(n, 1), 1) for k, v in inner.most_common(15)},
            "engine_py": {k: round(100 * v / max(n, 1), 1) for k, v in engine_frames.most_common(15)}}


def section_latency(name: str, hf, session: Session, mc: ModelConfig, res: dict, args) -> None:
    out: dict[str, Any] = {"compiled": bool(args.compile)}
    res["latency"] = out
    engine = make_engine(session, max(args.concurrency), 128 + 128, args.compile, args.fused)
    try:
        for c in args.concurrency:
            prompts = random_prompts(c, 128, mc.vocab_size, seed=4 + c)
            warm_prompts = random_prompts(c, 128, mc.vocab_size, seed=2004 + c)  # no prefix-cache hits later
            run_engine(session, warm_prompts, 3, engine)  # warm-up at this concurrency: the bucket's graph
            window = None
            if args.profile_latency and c == args.concurrency[0]:
                window = threading.Thread(target=profile_engine_window, daemon=True,
                                          args=(engine, args.profile_latency, out, f"c={c}", 0.08))
                window.start()
            stats = run_engine(session, prompts, 128, engine)
            if window is not None:
                window.join()
            out[str(c)] = stats
            log(f"{name} latency c={c}: TTFT p50 {stats['ttft_ms'][50]:.1f} ms p99 {stats['ttft_ms'][99]:.1f}; "
                f"ITL p50 {stats['itl_ms'][50]:.2f} ms p90 {stats['itl_ms'][90]:.2f} p99 {stats['itl_ms'][99]:.2f}; "
                f"{stats['tok_s']:,.0f} tok/s; {stats['preempted_total']} preemptions")
    finally:
        engine.shutdown()
    engine = None  # drop its KV pool and graphs now
    free_cuda()


PREFILL_MODES = {  # mode -> (Session.prefill_graph_max_tokens, Session.compile_prefill_graphs)
    "eager": (0, False),        # prefill / mixed steps run eagerly (the decode step still replays graphs)
    "graphs": (2048, False),    # token-bucket CUDA graphs of the eager forward
    "compiled": (2048, True),   # token-bucket CUDA graphs of the torch.compile'd forward
}


def section_prefill(name: str, hf, session: Session, mc: ModelConfig, res: dict, args) -> None:
    """Prefill and mixed steps eager vs. replayed from token-bucket CUDA graphs (runtime_lib/
    prefill_graph.py), one engine per mode, same settings and prompts: TTFT of one request at
    several prompt lengths (fresh prompts: no prefix-cache hits), TTFT / ITL at the --concurrency
    levels (ISL/OSL 128/128, all at once), 8 streams arriving 15 ms apart (mixed steps), and
    greedy-token agreement with the first mode."""
    out: dict[str, Any] = {"compiled_decode": bool(args.compile)}
    res["prefill_graphs"] = out
    saved = session.prefill_graph_max_tokens, session.compile_prefill_graphs
    first_tokens: list[list[int]] | None = None
    try:
        for mode in args.prefill_modes:
            session.prefill_graph_max_tokens, session.compile_prefill_graphs = PREFILL_MODES[mode]
            m: dict[str, Any] = {"ttft_single_ms": {}}
            out[mode] = m
            engine = make_engine(session, max(args.concurrency), 2048 + 128, args.compile, args.fused)
            try:
                t0 = time.perf_counter()
                seed = 7000
                for isl in args.prefill_lens:  # warm-up: captures (and compiles) the buckets
                    seed += 1
                    run_engine(session, random_prompts(1, isl, mc.vocab_size, seed=seed), 3, engine)
                m["warmup_s"] = time.perf_counter() - t0
                for isl in args.prefill_lens:
                    ttfts = []
                    for _ in range(5):
                        seed += 1
                        st = run_engine(session, random_prompts(1, isl, mc.vocab_size, seed=seed), 2, engine)
                        ttfts.append(st["ttft_ms"][50])
                    m["ttft_single_ms"][str(isl)] = statistics.median(ttfts)
                    log(f"{name} prefill[{mode}] 1 request ISL {isl}: TTFT median {statistics.median(ttfts):.2f} ms "
                        f"(min {min(ttfts):.2f})")
                for c in args.concurrency:
                    run_engine(session, random_prompts(c, 128, mc.vocab_size, seed=2004 + c), 3, engine)  # warm-up
                    toks: list[list[int]] = []
                    st = run_engine(session, random_prompts(c, 128, mc.vocab_size, seed=4 + c), 128, engine,
                                    tokens=toks)
                    m[str(c)] = st
                    if c == max(args.concurrency):
                        m["tokens"] = toks
                    log(f"{name} prefill[{mode}] c={c}: TTFT p50 {st['ttft_ms'][50]:.1f} ms p99 "
                        f"{st['ttft_ms'][99]:.1f}; ITL p50 {st['itl_ms'][50]:.2f} p90 {st['itl_ms'][90]:.2f} "
                        f"p99 {st['itl_ms'][99]:.2f} ms; {st['tok_s']:,.0f} tok/s")
                run_engine(session, random_prompts(8, 128, mc.vocab_size, seed=3000), 3, engine, gap_s=0.015)
                st = run_engine(session, random_prompts(8, 128, mc.vocab_size, seed=3001), 128, engine, gap_s=0.015)
                m["staggered_8"] = st
                log(f"{name} prefill[{mode}] 8 streams 15 ms apart: TTFT p50 {st['ttft_ms'][50]:.1f} p99 "
                    f"{st['ttft_ms'][99]:.1f} ms; ITL p50 {st['itl_ms'][50]:.2f} p90 {st['itl_ms'][90]:.2f} "
                    f"p99 {st['itl_ms'][99]:.2f} ms")
                prefill = session.prefill_graph_runner(engine.kv_cache)
                m["prefill_replays"] = prefill.num_replays if prefill is not None else 0
                m["captured_buckets"] = list(prefill.captured_buckets) if prefill is not None else []
                toks = m.pop("tokens", None)
                if toks is not None:
                    if first_tokens is None:
                        first_tokens = toks
                    else:
                        same = sum(a == b for a, b in zip(toks, first_tokens))
                        prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
                                  for a, b in zip(toks, first_tokens)]
                        m["greedy_vs_first_mode"] = {"rows_identical": same, "rows": len(toks),
                                                     "mean_matching_prefix": statistics.mean(prefix)}
                log(f"{name} prefill[{mode}]: {m['prefill_replays']} prefill replays, buckets "
                    f"{m['captured_buckets']}, warm-up {m['warmup_s']:.1f} s, "
                    f"greedy vs first mode {m.get('greedy_vs_first_mode')}")
            finally:
                engine.shutdown()
            engine = None
            free_cuda()
    finally:
        session.prefill_graph_max_tokens, session.compile_prefill_graphs = saved


SECTIONS = {"bs1": section_bs1, "correctness": section_correctness, "offline": section_offline,
            "latency": section_latency, "prefill": section_prefill}


# ----------------------------------------------------------------------------- report
def markdown(report: dict) -> str:
    lines = ["# runtime_lib GPU end-to-end benchmark", "",
             (f"{report['device']} · torch {report['torch']} · transformers {report['transformers']} · "
             f"{report['date']}"), "", f"command: `{report['command']}`", ""]
    small = report.get("small_model_cpu_fp32_vs_gpu")
    if small:
        lines += [(f"Tiny demo llama, greedy 40 tokens x 3 prompts: GPU fp32 (graphs) vs CPU fp32 "
                  f"{small['gpu_fp32_vs_cpu_fp32']['rows_identical']}/3 identical; GPU fp32 compiled step vs CPU "
                  f"fp32 {small.get('gpu_fp32_compiled_vs_cpu_fp32', {}).get('rows_identical')}/3; GPU bf16 vs CPU fp32 "
                  f"{small['gpu_bf16_vs_cpu_fp32']['rows_identical']}/3 identical."), ""]
    for name, res in report["models"].items():
        lines += [f"## {name.upper()}", "", f"copy bandwidth {res.get('copy_bandwidth_gbps', 0):,.0f} GB/s", ""]
        if "bs1" in res:
            b = res["bs1"]
            lines += [(f"### bs1 decode (128-token prompt, {b['new_tokens']} new tokens); roofline "
                      f"{b['roofline_ms']:.3f} ms/token; target {TARGETS[name.partition('-')[0]]['bs1_pct_roofline']:.0f}%"), "",
                      "| implementation | ms/token | % of roofline | graph replay ms | host ms/step |",
                      "|---|---|---|---|---|"]
            for label, row in b["rows"].items():
                if "error" in row:
                    lines.append(f"| {label} | error: {row['error'][:80]} | | | |")
                    continue
                lines.append(f"| {label} | {row['ms_per_token']:.3f} | {row['pct_roofline']:.1f}% | "
                             f"{row.get('graph_replay_ms', float('nan')):.3f} | "
                             f"{row.get('host_overhead_ms', float('nan')):.3f} |")
            for key in ("profile_eager", "profile_graphs", "profile_compiled"):
                if key in b:
                    p = b[key]
                    split = ", ".join(f"{c} {v:.0f} us ({p['kernels_per_step'].get(c, 0):.0f} kernels)"
                                      for c, v in p["kernel_us_per_step"].items())
                    lines += ["", f"{key}: {p['total_kernel_us_per_step']:.0f} us of kernels per step: {split}"]
            lines.append("")
        for dtype, chk in res.get("logits_vs_hf", {}).items():
            lines += [(f"Last-position prefill logits vs HF ({dtype}, 32 prompts x 64 tokens): rel. L2 error "
                      f"{chk['rel_l2_error']:.2e}, argmax agree {chk['argmax_agree']}, HF top-1/top-2 margin median "
                      f"{chk['hf_top2_margin_median']:.4f} (logit std {chk['logit_std']:.3f}), margins where the "
                      f"argmax differs {chk['hf_top2_margin_where_argmax_differs']}"), ""]
        if "correctness" in res:
            lines += ["### correctness (greedy, 8 prompts x 48 tokens, bf16)", ""]
            for k, v in res["correctness"].items():
                lines.append(f"- {k}: {v['rows_identical']}/{v['rows']} rows identical, mean matching prefix "
                             f"{100 * v['mean_matching_prefix_frac']:.0f}%, first divergence {v['first_divergence']}")
            lines.append("")
        if "offline" in res:
            o = res["offline"]
            lines += [f"### offline throughput (output tok/s){' (compiled decode step)' if o.get('compiled') else ''}",
                      "", ("| config | ModelRunner.generate | decode step ms (graph replay ms) | LLMEngine | "
                           "engine decode step ms (rows) |"),
                      "|---|---|---|---|---|"]
            for key in sorted(set(o["runner"]) | set(o["engine"]), key=lambda k: (len(k), k)):
                r, e = o["runner"].get(key, {}), o["engine"].get(key, {})
                nan = float("nan")
                runner = (f"{r['tok_s']:,.0f} | {r.get('decode_step_ms', nan):.2f} ({r.get('graph_replay_ms', nan):.2f})"
                          if "tok_s" in r else f"{r.get('error', '-')[:60]} | -")
                d = e.get("phases", {}).get("decode", {})
                engine = (f"{e['tok_s']:,.0f} | " + (f"{d['ms_per_step']:.1f} ({d['rows_per_step']:.0f})" if d else "-")
                          if "tok_s" in e else "- | -")
                lines.append(f"| {key} | {runner} | {engine} |")
            for key, h in o["hf"].items():
                lines.append(f"| HF generate {key} | {h.get('tok_s', float('nan')):,.0f} | | | |")
            lines.append("")
        if "latency" in res:
            lines += ["### LLMEngine latency, ISL/OSL 128/128, all streams submitted at once", "",
                      "| streams | TTFT p50 / p90 / p99 ms | ITL p50 / p90 / p99 ms | output tok/s |", "|---|---|---|---|"]
            for c, s in res["latency"].items():
                if not c.isdigit():  # "compiled", "engine_profile"
                    continue
                lines.append(f"| {c} | {s['ttft_ms'][50]:.1f} / {s['ttft_ms'][90]:.1f} / {s['ttft_ms'][99]:.1f} | "
                             f"{s['itl_ms'][50]:.2f} / {s['itl_ms'][90]:.2f} / {s['itl_ms'][99]:.2f} | "
                             f"{s['tok_s']:,.0f} |")
            lines.append("")
        if "prefill_graphs" in res:
            pg = res["prefill_graphs"]
            modes = [k for k in pg if isinstance(pg[k], dict)]
            lines += [f"### prefill / mixed steps: eager vs token-bucket CUDA graphs (LLMEngine"
                      f"{', compiled decode step' if pg.get('compiled_decode') else ''})", "",
                      "| measurement | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
            nan = float("nan")
            lens = sorted({k for mode in modes for k in pg[mode].get("ttft_single_ms", {})}, key=int)
            for isl in lens:
                lines.append(f"| TTFT ms, 1 request, ISL {isl} | " + " | ".join(
                    f"{pg[mode]['ttft_single_ms'].get(isl, nan):.2f}" for mode in modes) + " |")
            keys = [k for k in pg[modes[0]] if k.isdigit()] + ["staggered_8"] if modes else []
            for k in keys:
                label = f"{k} streams" if k.isdigit() else "8 streams 15 ms apart"
                for what, q in (("TTFT", 50), ("TTFT", 99), ("ITL", 50), ("ITL", 99)):
                    field = "ttft_ms" if what == "TTFT" else "itl_ms"
                    lines.append(f"| {what} p{q} ms, {label} | " + " | ".join(
                        f"{pg[mode].get(k, {}).get(field, {}).get(q, nan):.2f}" for mode in modes) + " |")
            lines.append("| prefill graph replays / buckets | " + " | ".join(
                f"{pg[mode].get('prefill_replays')} / {pg[mode].get('captured_buckets')}" for mode in modes) + " |")
            lines.append("| greedy tokens vs first mode (rows identical) | " + " | ".join(
                str(pg[mode].get("greedy_vs_first_mode", {}).get("rows_identical", "-")) for mode in modes) + " |")
            lines.append("")
        if res.get("errors"):
            lines += ["### errors", ""] + [f"- {e}" for e in res["errors"]] + [""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, res in report["models"].items():
        if "latency" in res:
            xs = [int(c) for c in res["latency"] if c.isdigit()]
            ax.plot(xs, [res["latency"][str(c)]["tok_s"] for c in xs], "o-", label=f"{name} LLMEngine")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent streams (ISL/OSL 128/128)")
    ax.set_ylabel("output tokens/s")
    ax.set_title(report["device"])
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="1b,8b", help="of 1b, 8b; a -fp8 suffix (8b-fp8) gives our model FP8 weights")
    ap.add_argument("--sections", default="correctness,bs1,offline,latency")
    ap.add_argument("--compile", action="store_true", help="also measure the torch.compiled decode step")
    ap.add_argument("--compile-correctness", action="store_true",
                    help="also compare the compiled step's greedy tokens (compiles for batch > 1 too)")
    ap.add_argument("--fp32-check", action="store_true", help="also compare fp32 logits with HF (a copy in fp32)")
    ap.add_argument("--profile-offline", default="", metavar="DELAY_S[,DELAY_S...]",
                    help="profile each offline engine run (1 s windows for 1000/1000, 0.5 s for 128/128) "
                         "DELAY_S after it starts")
    ap.add_argument("--engine-only", action="store_true", help="offline: the engine only, not ModelRunner.generate")
    ap.add_argument("--profile-latency", type=float, default=0.0, metavar="DELAY_S",
                    help="profile 80 ms of the first --concurrency level's latency run, DELAY_S after it starts")
    ap.add_argument("--fused", action="store_true", help="also the fused small-batch decode step (bs1 section)")
    ap.add_argument("--hf-compile", action="store_true", help="also HF generate with static cache + compile")
    ap.add_argument("--long", action="store_true", help="also ISL/OSL 1000/1000 (ours)")
    ap.add_argument("--long-batch", type=int, default=128)
    ap.add_argument("--batches", default="64,128,256")
    ap.add_argument("--waves", default="1", metavar="W[,W...]",
                    help="offline 128/128: submit W x batch requests at once to an engine of max_num_seqs=batch "
                         "(steady-state in-flight batching, as trtllm-bench and vLLM's benchmark_throughput "
                         "measure); 1 = one static batch")
    ap.add_argument("--kv-cache-dtypes", default="auto", metavar="D[,D...]",
                    help="offline: the engine's KV cache dtypes to measure (auto = the model's, fp8)")
    ap.add_argument("--hf-batches", default="256")
    ap.add_argument("--hf-osl", type=int, default=128)
    ap.add_argument("--bs1-tokens", type=int, default=128)
    ap.add_argument("--no-eager", action="store_true", help="skip our eager (no graphs) bs1 row")
    ap.add_argument("--hf-tokens", type=int, default=32)
    ap.add_argument("--concurrency", default="1,8,32,128")
    ap.add_argument("--budget-s", type=float, default=540, help="skip sections that start after this")
    ap.add_argument("--prefill-modes", default="eager,graphs,compiled",
                    help=f"prefill section: modes to compare, of {list(PREFILL_MODES)}")
    ap.add_argument("--prefill-lens", default="16,128,512,2000", help="prefill section: single-request ISLs")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    args.batches = [int(x) for x in args.batches.split(",") if x]
    args.waves = [int(x) for x in args.waves.split(",") if x]
    args.kv_cache_dtypes = [x for x in args.kv_cache_dtypes.split(",") if x]
    args.hf_batches = [int(x) for x in args.hf_batches.split(",") if x]
    args.concurrency = [int(x) for x in args.concurrency.split(",") if x]
    args.prefill_modes = [x for x in args.prefill_modes.split(",") if x]
    args.prefill_lens = [int(x) for x in args.prefill_lens.split(",") if x]
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("gpu_e2e: no CUDA device; nothing to measure (run this on a GPU machine)")
        return 0
    import transformers

    t_start = time.perf_counter()
    out_dir = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE, "torch": torch.__version__,
                              "transformers": transformers.__version__, "python": platform.python_version(),
                              "date": dt.datetime.now().isoformat(timespec="seconds"),
                              "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "models": {}}
    json_path, md_path = out_dir / f"gpu_e2e-{stamp}.json", out_dir / f"gpu_e2e-{stamp}.md"

    def save() -> None:
        json_path.write_text(json.dumps(report, indent=1, default=str))
        md_path.write_text(markdown(report))

    sections = [s for s in args.sections.split(",") if s]
    if "correctness" in sections:
        try:
            small_model_cpu_vs_gpu(report)
        except Exception as e:  # noqa: BLE001 - report it, run the rest
            report["small_model_error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        save()
    for name in [m for m in args.models.split(",") if m]:
        log(f"building {name}")
        hf, session, mc = build_models(name)
        res: dict[str, Any] = {"copy_bandwidth_gbps": copy_bandwidth_gbps(), "errors": []}
        report["models"][name] = res
        log(f"{name}: {our_weight_bytes(session) / 1e9:.2f} GB of weights, copy bandwidth {res['copy_bandwidth_gbps']:,.0f} GB/s")
        for s in sections:
            if time.perf_counter() - t_start > args.budget_s:
                res["errors"].append(f"{s}: skipped, past the {args.budget_s:.0f} s budget")
                continue
            try:
                SECTIONS[s](name, hf, session, mc, res, args)
            except Exception as e:  # noqa: BLE001 - one section failing must not sink the others
                traceback.print_exc()
                res["errors"].append(f"{s}: {type(e).__name__}: {str(e)[:300]}")
                free_cuda()
            save()
        del hf, session
        free_cuda()
    if plot(report, out_dir / f"gpu_e2e-{stamp}.png"):
        report["plot"] = f"gpu_e2e-{stamp}.png"
    save()
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
