"""A/B of the fused one-row decode step's launch options, in one process on one GPU.

    python3 bench/gpu_fused_step.py --models 1b,8b

For each random-weight model of a real shape: graph-replay time of one decode step (128-token
context) for programmatic dependent launch on/off x the qkv step in one launch (`qkv_rope_kv`)
or two (`small_linear` then `rope_kv_write`), whatever size rule the step itself applies, and
% of the HBM roofline (weights + KV bytes ÷
the copy bandwidth measured in the same run). Without CUDA it prints why and exits 0. Results
(JSON + Markdown) go to $OUT when set, else bench/results/.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpu_e2e  # noqa: E402  (bench/: the model builders and timers)
from gpu_kernels import results_stem, write_results  # noqa: E402


def two_launch_qkv(x, weight, norm_weight, eps, positions, cos_cache, sin_cache, kv_layer, slot_mapping,
                   num_heads, num_kv_heads, *, bias=None, out=None, tuning=None, pdl=False):
    """What `qkv_rope_kv` replaces: the projection, then RoPE + the K/V write."""
    from runtime_lib.kernels.rope_kv import rope_kv_write
    from runtime_lib.kernels.small_linear import small_linear

    qkv = small_linear(x, weight, bias=bias, prologue="rmsnorm", norm_weight=norm_weight, eps=eps, pdl=pdl)
    return rope_kv_write(qkv, positions, cos_cache, sin_cache, kv_layer, slot_mapping, num_heads, num_kv_heads,
                         out=out, pdl=pdl)


QKV_MODES = ("one launch", "two launches")


@contextlib.contextmanager
def variant(pdl: bool, qkv: str):
    """Switches read when the step is captured: RUNTIME_LIB_PDL and the qkv kernel (the size
    rule lifted, so "one launch" means one launch for every model)."""
    from runtime_lib.kernels import pdl as pdl_mod
    from runtime_lib.kernels import qkv_rope_kv as qkv_mod

    saved_env, saved_fn, saved_max = (os.environ.get(pdl_mod.DISABLE_ENV), qkv_mod.qkv_rope_kv,
                                      qkv_mod.ONE_LAUNCH_MAX_BYTES)
    os.environ[pdl_mod.DISABLE_ENV] = "1" if pdl else "0"
    qkv_mod.ONE_LAUNCH_MAX_BYTES = 1 << 62
    if qkv == QKV_MODES[1]:
        qkv_mod.qkv_rope_kv = two_launch_qkv
    try:
        yield
    finally:
        qkv_mod.qkv_rope_kv, qkv_mod.ONE_LAUNCH_MAX_BYTES = saved_fn, saved_max
        if saved_env is None:
            del os.environ[pdl_mod.DISABLE_ENV]
        else:
            os.environ[pdl_mod.DISABLE_ENV] = saved_env


def measure(name: str, repeats: int) -> dict:
    from runtime_lib.kernels.pdl import pdl_enabled

    hf, session, mc = gpu_e2e.build_models(name)
    bw = gpu_e2e.copy_bandwidth_gbps()
    roofline_ms = (gpu_e2e.weight_bytes(hf) + gpu_e2e.kv_bytes_per_token(mc) * 160) / (bw * 1e9) * 1e3
    hf = None
    gpu_e2e.free_cuda()
    prompt = gpu_e2e.random_prompts(1, 128, mc.vocab_size, seed=1)
    pdl_options = (True, False) if pdl_enabled(torch.device("cuda")) else (False,)
    rows = []
    for rep in range(repeats):  # interleaved repeats: drift (clocks, heat) hits every variant alike
        for pdl in pdl_options:
            for qkv in QKV_MODES:
                with variant(pdl, qkv):
                    runner = gpu_e2e.make_runner(session, graphs=True, fused=True)
                    gpu_e2e.our_generate(runner, prompt, 64)
                    ms = gpu_e2e.graph_replay_ms(runner)
                    runner = None
                    gpu_e2e.free_cuda()
                rows.append({"repeat": rep, "pdl": pdl, "qkv": qkv, "graph_replay_ms": ms,
                             "pct_roofline": 100 * roofline_ms / ms})
                gpu_e2e.log(f"{name} pdl={pdl} qkv {qkv}: {ms:.3f} ms ({100 * roofline_ms / ms:.1f}%)")
    best = {}
    for r in rows:
        key = f"PDL {'on' if r['pdl'] else 'off'}, qkv {r['qkv']}"
        best[key] = min(best.get(key, float("inf")), r["graph_replay_ms"])
    return {"copy_bandwidth_gbps": bw, "roofline_ms": roofline_ms, "rows": rows, "best_ms": best}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="1b,8b")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_fused_step: no CUDA device, skipping")
        return 0
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": dt.datetime.now().isoformat(timespec="seconds"), "models": {}}
    for name in args.models.split(","):
        report["models"][name] = measure(name, args.repeats)
    lines = [f"# Fused one-row decode step: launch options ({report['device']}, torch {report['torch']}, "
             f"{report['date']})", "", "best graph replay of `--repeats` interleaved runs, ms per step", "",
             "| model | roofline ms | variant | ms | % of roofline |", "|---|---|---|---|---|"]
    for name, m in report["models"].items():
        for key, ms in m["best_ms"].items():
            lines.append(f"| {name} | {m['roofline_ms']:.3f} | {key} | {ms:.3f} | {100 * m['roofline_ms'] / ms:.1f}% |")
    md = "\n".join(lines) + "\n"
    print(md)
    stem = results_stem("gpu_fused_step", report["device"], report["date"])
    write_results(stem, report, md)
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
