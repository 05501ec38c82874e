"""GPU check and benchmark of `runtime_lib.sampling.sample`.

    python3 bench/bench_sampling.py          # checks + timings (~1 min on an H100)
    python3 bench/bench_sampling.py --quick  # checks + a few timings

Checks: the counter-based noise is bit-identical on CUDA and CPU; a mixed batch (greedy, top-k,
top-p, min-p, penalties, bad words, n-grams, min_length) picks the same tokens on CUDA as on CPU;
`sample` makes no host<->device sync (torch.cuda.set_sync_debug_mode("error")) when its inputs
are device tensors. Timings: per-step milliseconds (CUDA events, median) at Llama-3 vocabulary
size for the sampling paths. Without CUDA it says so and exits 0; exit 1 when a check fails.
Results (JSON) go to $OUT when set.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from runtime_lib.sampling import SamplingParams, SamplingTensors, sample
from runtime_lib.sampling_ops import TokenHistory, uniform_noise

VOCAB = 128_256


def mixed_params() -> list[SamplingParams]:
    return [SamplingParams(),
            SamplingParams(top_k=50, temperature=0.8, seed=1),
            SamplingParams(top_k=0, top_p=0.9, seed=2, repetition_penalty=1.2),
            SamplingParams(top_k=0, top_p=1.0, min_p=0.05, seed=3, presence_penalty=0.5,
                           frequency_penalty=0.3),
            SamplingParams(top_k=0, top_p=0.95, seed=2**64 - 1, no_repeat_ngram_size=3, end_id=2,
                           min_length=4, bad_words=[[5, 6], [7]], logprobs=True),
            SamplingParams(temperature=0.0, top_k=0, top_p=0.5, seed=4)]


def check(dev: torch.device) -> list[str]:
    failures = []
    g = torch.Generator().manual_seed(0)
    seeds = torch.randint(-2**63, 2**63 - 1, (64,), generator=g)
    steps = torch.randint(0, 10_000, (64,), generator=g)
    idx = torch.randint(0, VOCAB, (64, 256), generator=g)
    cpu = uniform_noise(seeds, steps, idx)
    gpu = uniform_noise(seeds.to(dev), steps.to(dev), idx.to(dev)).cpu()
    if not torch.equal(cpu, gpu):
        failures.append(f"noise differs CPU vs CUDA at {int((cpu != gpu).sum())} of {cpu.numel()}")

    params = mixed_params()
    B, V = len(params), 512
    st_cpu, st_gpu = SamplingTensors.build(params, "cpu"), SamplingTensors.build(params, dev)
    lengths = torch.randint(1, 30, (B,), generator=g).tolist()
    prompt = [torch.randint(0, 20, (n,), generator=g).tolist() for n in lengths]
    outputs: list[list[int]] = [[] for _ in range(B)]
    mismatches = 0
    for step in range(40):
        logits = torch.randn(B, V, generator=g) * 3
        a = sample(logits, st_cpu, prompt_ids=prompt, output_ids=outputs)
        b = sample(logits.to(dev), st_gpu, prompt_ids=prompt, output_ids=outputs)
        mismatches += int((a.token_ids != b.token_ids.cpu()).sum())
        if not torch.allclose(a.logprobs, b.logprobs.cpu(), atol=1e-5):
            failures.append(f"logprobs differ at step {step}")
        for r, t in enumerate(a.token_ids.tolist()):
            outputs[r].append(t % 20)  # keep the history repetitive so n-grams/penalties bite
    if mismatches:
        failures.append(f"{mismatches} of {40 * B} tokens differ between CPU and CUDA")

    # no host sync with device-resident inputs
    hist = TokenHistory.build(prompt, outputs, B, dev)
    p_t = torch.full((B, 40), -1, dtype=torch.int64)
    o_t = torch.full((B, 50), -1, dtype=torch.int64)
    for r in range(B):
        p_t[r, :len(prompt[r])] = torch.tensor(prompt[r])
        o_t[r, :len(outputs[r])] = torch.tensor(outputs[r])
    p_t, o_t = p_t.to(dev), o_t.to(dev)
    steps_t = (o_t >= 0).sum(1)
    logits = torch.randn(B, V, device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sample(logits, st_gpu, prompt_ids=p_t, output_ids=o_t, steps=steps_t)
    except RuntimeError as e:
        failures.append(f"sample synchronised with the host: {e}")
        out = None
    finally:
        torch.cuda.set_sync_debug_mode("default")
    if out is not None:
        ref = sample(logits.cpu(), st_cpu, prompt_ids=prompt, output_ids=outputs)
        if not torch.equal(out.token_ids.cpu(), ref.token_ids):
            failures.append("tensor-history sample differs from list-history sample")
    del hist
    return failures


def time_case(dev, params, B, history_len=0, iters=30) -> dict:
    st = SamplingTensors.build(params * (B // len(params)), dev)
    g = torch.Generator(device=dev).manual_seed(0)
    logits = torch.randn(B, VOCAB, device=dev, generator=g) * 2
    kw = {}
    if history_len:
        ids = torch.randint(0, VOCAB, (B, history_len), device=dev, generator=g)
        kw = {"prompt_ids": ids[:, : history_len // 2], "output_ids": ids[:, history_len // 2:]}
    else:
        kw = {"steps": torch.zeros(B, dtype=torch.int64, device=dev)}
    for _ in range(3):
        sample(logits, st, **kw)
    torch.cuda.synchronize()
    gpu_ms, wall_ms = [], []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        s.record()
        sample(logits, st, **kw)
        e.record()
        host = time.perf_counter() - t0
        torch.cuda.synchronize()
        gpu_ms.append(s.elapsed_time(e))
        wall_ms.append(host * 1e3)
    return {"gpu_ms": round(statistics.median(gpu_ms), 3), "host_launch_ms": round(statistics.median(wall_ms), 3)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to do")
        return 0
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name()} torch {torch.__version__}")
    failures = check(dev)
    for f in failures:
        print("FAIL:", f)
    print("checks:", "ok" if not failures else f"{len(failures)} failed")
    cases = {
        "greedy": [SamplingParams()],
        "top_k=50": [SamplingParams(top_k=50, temperature=0.8, seed=1)],
        "top_p=0.9 (sort)": [SamplingParams(top_k=0, top_p=0.9, seed=1)],
        "full vocab (top_p=1)": [SamplingParams(top_k=0, top_p=1.0, seed=1)],
        "half greedy, half top_p": [SamplingParams(), SamplingParams(top_k=0, top_p=0.9, seed=1)],
        "top_p + rep/pres/freq, hist 1024": [SamplingParams(top_k=0, top_p=0.9, seed=1, repetition_penalty=1.1,
                                                            presence_penalty=0.5, frequency_penalty=0.2)],
    }
    results = []
    for B in ([64] if args.quick else [1, 64, 256]):
        for name, params in cases.items():
            if args.quick and name not in ("greedy", "top_k=50", "top_p=0.9 (sort)"):
                continue
            hist = 1024 if "hist" in name else 0
            r = {"batch": B, "case": name, "vocab": VOCAB, **time_case(dev, params, max(B, len(params)), hist)}
            results.append(r)
            print(f"B={B:4d} {name:36s} gpu {r['gpu_ms']:8.3f} ms   host {r['host_launch_ms']:7.3f} ms")
    out = os.environ.get("OUT")
    if out:
        Path(out, "bench_sampling.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name(), "failures": failures, "results": results}, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
