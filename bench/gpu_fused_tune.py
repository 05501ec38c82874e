"""small_linear launch shapes picked inside the whole fused batch-1 step, not one kernel alone.

    python3 bench/gpu_fused_tune.py --model 1b

`bench/gpu_linear.py` times each GEMV alone in a graph; inside the fused step the kernels run
as a programmatic-dependent-launch chain (kernels/pdl.py) and the best shapes differ (on an
H100 the 1B gate_up and o_proj entries changed, 1.094 -> 1.077 ms a step). This script builds a
random-weight model, then for each candidate shape of one matrix (the rest as shipped) replays
the whole step's graph and prints ms per step, with the shipped table re-measured between
groups for drift. Candidates go through RUNTIME_LIB_SMALL_LINEAR_TABLE; merge winners into
runtime_lib/kernels/small_linear_tuning.json by hand. Results (JSON) go to $OUT, else bench/results/.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpu_e2e  # noqa: E402
from gpu_kernels import results_stem  # noqa: E402

CANDIDATES = [dict(block_n=bn, block_k=bk, num_warps=w, num_stages=st)
              for bn, bk, w, st in ((8, 2048, 8, 3), (8, 2048, 4, 3), (4, 2048, 4, 3), (4, 2048, 4, 4),
                                    (4, 2048, 8, 3), (16, 1024, 8, 3), (8, 512, 4, 4))]


def main() -> int:
    from runtime_lib.kernels.small_linear import SHIPPED_TUNING, TUNING_ENV

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="1b")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_fused_tune: no CUDA device, skipping")
        return 0
    device = torch.cuda.get_device_name()
    shipped = json.loads(SHIPPED_TUNING.read_text()).get(device, {})
    session, mc = gpu_e2e.build_models(args.model)[1:]  # the HF copy is not kept
    H, inter, V = mc.hidden_size, mc.intermediate_size, mc.vocab_size
    qkv = (mc.num_heads + 2 * mc.num_kv_heads) * mc.head_size
    shapes = {"qkv": (qkv, H), "o": (H, mc.num_heads * mc.head_size), "gate_up": (2 * inter, H),
              "down": (H, inter), "lm_head": (V, H)}   # weight (N, K) of each matrix
    prompt = gpu_e2e.random_prompts(1, 128, V, seed=1)
    workdir = Path(tempfile.mkdtemp())

    def step_ms(table: dict, tag: str) -> float:
        path = workdir / f"{tag}.json"
        path.write_text(json.dumps({device: table}))
        os.environ[TUNING_ENV] = str(path)
        runner = gpu_e2e.make_runner(session, graphs=True, fused=True)
        gpu_e2e.our_generate(runner, prompt, 32)
        ms = min(gpu_e2e.graph_replay_ms(runner) for _ in range(3))
        runner = None
        gpu_e2e.free_cuda()
        return ms

    results: dict = {"device": device, "model": args.model, "shipped": [], "candidates": []}
    for name, (n, k) in shapes.items():
        results["shipped"].append(step_ms(shipped, f"shipped-{name}"))
        print(f"shipped table: {results['shipped'][-1]:.4f} ms", flush=True)
        for i, cand in enumerate(CANDIDATES):
            table = copy.deepcopy(shipped)
            table[f"1,{n},{k}"] = cand
            ms = step_ms(table, f"{name}-{i}")
            results["candidates"].append({"matrix": name, "key": f"1,{n},{k}", **cand, "step_ms": ms})
            print(f"{name:8s} {cand} {ms:.4f} ms", flush=True)
    stem = results_stem("gpu_fused_tune", device, gpu_e2e.dt.datetime.now().isoformat(), f"-{args.model}")
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(f"wrote {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
