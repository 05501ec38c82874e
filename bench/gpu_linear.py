"""GPU check, launch-shape search and benchmark of `small_linear` (kernels/small_linear.py) against
cuBLAS (`F.linear`) and the unfused torch chain it replaces, on Llama-3.2-1B and Llama-3.1-8B
matrix shapes, bf16.

One command, from the repository root, on a CUDA machine:

    python3 bench/gpu_linear.py                 # checks + sweep + table (~2 min)
    python3 bench/gpu_linear.py --quick         # fewer launch shapes
    python3 bench/gpu_linear.py --fp8           # e4m3 weights with per-column scales (quantization="fp8")

Every time is the replay of a CUDA graph of 8 calls that cycle through enough weight copies to
defeat the L2 (what a captured decode step pays), per call. GB/s counts the weight bytes read.
Writes to $OUT (else bench/results/): the report (JSON + Markdown) and `small_linear_tuning.json`,
the best launch shape per (row class, N, K) for this device ("fp8:" keys for e4m3 weights), in the format
runtime_lib/kernels/small_linear.py reads (copy its entries into the shipped table, or point
RUNTIME_LIB_SMALL_LINEAR_TABLE at it). Without CUDA it prints why and exits 0; exit 1 when a
correctness check fails.
"""
from __future__ import annotations

import argparse
import datetime as dt
import functools
import itertools
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.gpu_kernels import copy_bandwidth_gbps, graph_us, results_stem, write_results  # noqa: E402

SHAPES = {  # name: (N, K) of nn.Linear weights
    "8b qkv": (6144, 4096), "8b o": (4096, 4096), "8b gate_up": (28672, 4096), "8b down": (4096, 14336),
    "8b lm_head": (128256, 4096),
    "1b qkv": (3072, 2048), "1b o": (2048, 2048), "1b gate_up": (16384, 2048), "1b down": (2048, 8192),
    "1b lm_head": (128256, 2048),
}
PROLOGUE_OF = {"qkv": "rmsnorm", "o": "none", "gate_up": "rmsnorm", "down": "silu_mul", "lm_head": "rmsnorm"}
CALLS = 8  # per graph


def graph_call_us(calls) -> float:
    """Per-call GPU time of `calls` (a list of thunks) captured in one graph and replayed."""
    return graph_us(lambda: [fn() for fn in calls], warmup_ms=10, rep_ms=40) / len(calls)


def weight_copies(n: int, k: int) -> list[torch.Tensor]:
    """Enough (N, K) bf16 weights that 8 calls cycling through them read ~>= 256 MB (no L2 hits)."""
    nbytes = n * k * 2
    count = max(1, min(CALLS, -(-(256 << 20) // nbytes)))
    return [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(count)]


def candidates(m_class: int, quick: bool) -> list:
    """Launch shapes to try: the one-row GEMV keeps its fp32 accumulator at <= 64 registers a
    thread; the 16-row tensor-core class tries tile widths and depths."""
    from runtime_lib.kernels.small_linear import LinearTuning

    if m_class == 1:
        grid = itertools.product([1, 2, 4, 8] if not quick else [4], [512, 1024, 2048, 4096] if not quick else [1024],
                                 [4, 8], [1, 3] if not quick else [1])
        return [LinearTuning(bn, bk, w, s) for bn, bk, w, s in grid if bn * bk <= 2048 * w]
    grid = itertools.product([16, 32, 64], [64, 128, 256] if not quick else [128], [4], [3, 4])
    return [LinearTuning(bn, bk, w, s) for bn, bk, w, s in grid]


def run(args) -> dict:
    import triton

    from runtime_lib.kernels.small_linear import choose_tuning, row_class, small_linear, small_linear_torch

    device_name = torch.cuda.get_device_name()
    report: dict = {"device": device_name, "torch": torch.__version__, "triton": triton.__version__,
                    "python": platform.python_version(), "date": dt.datetime.now().isoformat(timespec="seconds"),
                    "copy_gbps": copy_bandwidth_gbps(), "checks": [], "rows": []}
    print(f"{device_name}  torch {report['torch']}  triton {report['triton']}  copy {report['copy_gbps']:.0f} GB/s",
          flush=True)
    table: dict[str, dict] = {}
    torch.manual_seed(0)
    for name, (n, k) in SHAPES.items():
        if args.models and name.split()[0] not in args.models:
            continue
        prologue = PROLOGUE_OF[name.split()[1]]
        weights = weight_copies(n, k)
        fp8 = args.fp8 and not name.endswith("lm_head")   # the lm_head stays bf16 (layers/fp8_linear.py)
        if fp8:
            from runtime_lib.layers.fp8_linear import quantize_weight
            weights = [quantize_weight(w) for w in weights]
        else:
            weights = [(w, None) for w in weights]
        norm_w = (torch.rand(k, device="cuda") + 0.5).to(torch.bfloat16)
        for m in args.rows:
            xk = 2 * k if prologue == "silu_mul" else k
            x = torch.randn(m, xk, device="cuda", dtype=torch.bfloat16)
            res = torch.randn(m, n, device="cuda", dtype=torch.bfloat16) if name.endswith((" o", " down")) else None
            kw = dict(prologue=prologue, norm_weight=norm_w if prologue == "rmsnorm" else None, residual=res)
            # correctness: against the eager torch chain, same rounding points
            w0, s0 = weights[0]
            ref = small_linear_torch(x, w0, weight_scale=s0, **kw).float()
            got = small_linear(x, w0, weight_scale=s0, **kw).float()
            err = ((got - ref).norm() / ref.norm()).item()
            report["checks"].append({"shape": name, "rows": m, "rel_err": err, "passed": err < 1e-2})
            # cuBLAS alone, and the torch chain the fused call replaces
            # cuBLAS over bf16 weights (what the step without the fused kernels runs at batch 1)
            bf16 = [w if s is None else w.to(torch.bfloat16) for w, s in weights]
            cublas = graph_call_us([functools.partial(torch.nn.functional.linear, x if prologue != "silu_mul"
                                                      else x[:, :k].contiguous(), w)
                                    for w in itertools.islice(itertools.cycle(bf16), CALLS)])
            chain = graph_call_us([functools.partial(small_linear_torch, x, w, **kw)
                                   for w in itertools.islice(itertools.cycle(bf16), CALLS)])
            del bf16

            def fused_calls(tuning, x=x, kw=kw, weights=weights):
                return [functools.partial(small_linear, x, w, weight_scale=s, tuning=tuning, **kw)
                        for w, s in itertools.islice(itertools.cycle(weights), CALLS)]
            m_class = row_class(m)
            best = None
            for tuning in candidates(m_class, args.quick):
                try:
                    us = graph_call_us(fused_calls(tuning))
                except Exception as e:  # noqa: BLE001 - a launch shape that does not compile is skipped
                    print(f"  skip {tuning}: {type(e).__name__}: {str(e)[:80]}")
                    continue
                if best is None or us < best[0]:
                    best = (us, tuning)
            default = choose_tuning(m, n, k, x.device, fp8)
            default_us = graph_call_us(fused_calls(default))
            gbytes = n * k * (1 if fp8 else 2) / 1e9
            row = {"shape": name, "n": n, "k": k, "rows": m, "prologue": prologue, "residual": res is not None,
                   "weights": "fp8" if fp8 else "bf16",
                   "cublas_us": cublas, "torch_chain_us": chain, "fused_default_us": default_us,
                   "fused_best_us": best[0], "best": vars(best[1]),
                   "cublas_gbps": gbytes / cublas * 1e6, "fused_best_gbps": gbytes / best[0] * 1e6}
            report["rows"].append(row)
            key = ("fp8:" if fp8 else "") + f"{m_class},{n},{k}"
            if m == m_class or m == args.tune_rows or key not in table:
                table[key] = vars(best[1])
            print(f"{name:12s} M={m:2d} {prologue:8s} cuBLAS {cublas:7.1f} us ({row['cublas_gbps']:5.0f} GB/s)  "
                  f"torch chain {chain:7.1f}  fused default {default_us:7.1f}  best {best[0]:7.1f} us "
                  f"({row['fused_best_gbps']:5.0f} GB/s) {vars(best[1])}  err {err:.1e}", flush=True)
        del weights
        torch.cuda.empty_cache()
    report["tuning_table"] = {device_name: table}
    return report


def markdown(report: dict) -> str:
    lines = [f"# small_linear vs cuBLAS — {report['device']}", "",
             f"torch {report['torch']}, triton {report['triton']}, {report['date']}; copy bandwidth "
             f"{report['copy_gbps']:.0f} GB/s (read + write). Per-call GPU time inside a CUDA graph, bf16.", "",
             "| shape | rows | prologue / residual | cuBLAS µs (GB/s) | torch chain µs | fused default µs "
             "| fused best µs (GB/s) | best launch |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['shape']} ({r['n']}x{r['k']}){' fp8' if r.get('weights') == 'fp8' else ''} | {r['rows']} | {r['prologue']}{' + res' if r['residual'] else ''} "
                     f"| {r['cublas_us']:.1f} ({r['cublas_gbps']:.0f}) | {r['torch_chain_us']:.1f} "
                     f"| {r['fused_default_us']:.1f} | {r['fused_best_us']:.1f} ({r['fused_best_gbps']:.0f}) "
                     f"| {r['best']} |")
    bad = [c for c in report["checks"] if not c["passed"]]
    lines += ["", f"Checks: {len(report['checks']) - len(bad)}/{len(report['checks'])} within 1e-2 relative "
              "of the eager torch chain."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rows", default="1,2,4,8,16", help="row counts to time")
    ap.add_argument("--tune-rows", type=int, default=16, help="row count whose best shape its class keeps")
    ap.add_argument("--models", default="1b,8b")
    ap.add_argument("--fp8", action="store_true", help="e4m3 weights + per-column scales (the lm_head stays bf16)")
    args = ap.parse_args()
    args.rows = [int(r) for r in args.rows.split(",")]
    args.models = set(args.models.split(","))
    if not torch.cuda.is_available():
        print("gpu_linear: no CUDA device, skipping")
        return 0
    report = run(args)
    stem = results_stem("gpu_linear", report["device"], report["date"], "-fp8" if args.fp8 else "")
    write_results(stem, report, markdown(report))
    stem.with_name("small_linear_tuning.json").write_text(json.dumps(report["tuning_table"], indent=2))
    print(markdown(report))
    failed = [c for c in report["checks"] if not c["passed"]]
    if failed:
        print(f"FAILED checks: {failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
