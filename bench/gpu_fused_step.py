"""A/B of the fused one-row decode step's launch options, in one process on one GPU.

    python3 bench/gpu_fused_step.py --models 1b,8b

For each random-weight model of a real shape and each context length (`--contexts`): graph-replay
time of one decode step for these variants, whatever size rule the step itself applies:
programmatic dependent launch on/off, the qkv step in one launch (`qkv_rope_kv`) or two
(`small_linear` then `rope_kv_write`), the decode attention in the one-launch qkv kernel's
epilogue (`qkv_rope_kv_attention`) or its own launch; and % of the HBM roofline (weights + KV
bytes ÷ the copy bandwidth measured in the same run). Without CUDA it prints why and exits 0. Results
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


# (PDL, qkv form, attention in the qkv kernel: K/V tile tokens, 0 for its own launch)
VARIANTS = ((True, "one launch", 128), (True, "one launch", 256), (True, "one launch", 0),
            (True, "two launches", 0), (False, "one launch", 128))


def variant_name(pdl: bool, qkv: str, attend: int) -> str:
    return f"PDL {'on' if pdl else 'off'}, qkv {qkv}{f' + attention/{attend}' if attend else ''}"


@contextlib.contextmanager
def variant(pdl: bool, qkv: str, attend: int):
    """Switches read when the step is captured: RUNTIME_LIB_PDL, the qkv kernel (the size
    rule lifted, so "one launch" means one launch for every model), the context bound up to
    which the attention runs in its epilogue (0: never; else every context of the run) and
    that attention's tile."""
    from runtime_lib import fused_decode
    from runtime_lib.kernels import pdl as pdl_mod
    from runtime_lib.kernels import qkv_rope_kv as qkv_mod

    saved_env, saved_fn, saved_max, saved_ctx, saved_block_n = (
        os.environ.get(pdl_mod.DISABLE_ENV), qkv_mod.qkv_rope_kv, qkv_mod.ONE_LAUNCH_MAX_BYTES,
        fused_decode.FUSED_ATTENTION_MAX_CONTEXT, qkv_mod.ATTENTION_BLOCK_N)
    os.environ[pdl_mod.DISABLE_ENV] = "1" if pdl else "0"
    qkv_mod.ONE_LAUNCH_MAX_BYTES = 1 << 62
    fused_decode.FUSED_ATTENTION_MAX_CONTEXT = 1 << 20 if attend else 0
    qkv_mod.ATTENTION_BLOCK_N = attend or saved_block_n
    if qkv == "two launches":
        qkv_mod.qkv_rope_kv = two_launch_qkv
    try:
        yield
    finally:
        qkv_mod.qkv_rope_kv, qkv_mod.ONE_LAUNCH_MAX_BYTES = saved_fn, saved_max
        fused_decode.FUSED_ATTENTION_MAX_CONTEXT, qkv_mod.ATTENTION_BLOCK_N = saved_ctx, saved_block_n
        if saved_env is None:
            del os.environ[pdl_mod.DISABLE_ENV]
        else:
            os.environ[pdl_mod.DISABLE_ENV] = saved_env


def measure(name: str, repeats: int, contexts: list[int]) -> dict:
    from runtime_lib.kernels.pdl import pdl_enabled

    hf, session, mc = gpu_e2e.build_models(name)
    bw = gpu_e2e.copy_bandwidth_gbps()
    weights = gpu_e2e.weight_bytes(hf)
    hf = None
    gpu_e2e.free_cuda()
    variants = [v for v in VARIANTS if v[0] is False or pdl_enabled(torch.device("cuda"))]
    rows = []
    for rep in range(repeats):  # interleaved repeats: drift (clocks, heat) hits every variant alike
        for ctx in contexts:    # the last step's context: a prompt of ctx - 64 tokens, 64 generated
            roofline_ms = (weights + gpu_e2e.kv_bytes_per_token(mc) * ctx) / (bw * 1e9) * 1e3
            prompt = gpu_e2e.random_prompts(1, ctx - 64, mc.vocab_size, seed=1)
            for pdl, qkv, attend in variants:
                with variant(pdl, qkv, attend):
                    runner = gpu_e2e.make_runner(session, graphs=True, fused=True)
                    gpu_e2e.our_generate(runner, prompt, 64)
                    ms = gpu_e2e.graph_replay_ms(runner)
                    runner = None
                    gpu_e2e.free_cuda()
                key = variant_name(pdl, qkv, attend)
                rows.append({"repeat": rep, "context": ctx, "variant": key, "graph_replay_ms": ms,
                             "roofline_ms": roofline_ms, "pct_roofline": 100 * roofline_ms / ms})
                gpu_e2e.log(f"{name} ctx {ctx} {key}: {ms:.3f} ms ({100 * roofline_ms / ms:.1f}%)")
    best: dict[str, dict] = {}
    for r in rows:
        key = f"{r['context']}|{r['variant']}"
        if key not in best or r["graph_replay_ms"] < best[key]["graph_replay_ms"]:
            best[key] = r
    return {"copy_bandwidth_gbps": bw, "rows": rows, "best": list(best.values())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="1b,8b")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--contexts", default="192", help="comma-separated context lengths of the timed step")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_fused_step: no CUDA device, skipping")
        return 0
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": dt.datetime.now().isoformat(timespec="seconds"), "models": {}}
    for name in args.models.split(","):
        report["models"][name] = measure(name, args.repeats, [int(c) for c in args.contexts.split(",")])
    lines = [f"# Fused one-row decode step: launch options ({report['device']}, torch {report['torch']}, "
             f"{report['date']})", "", "best graph replay of `--repeats` interleaved runs, ms per step", "",
             "| model | context | roofline ms | variant | ms | % of roofline |", "|---|---|---|---|---|---|"]
    for name, m in report["models"].items():
        for r in m["best"]:
            lines.append(f"| {name} | {r['context']} | {r['roofline_ms']:.3f} | {r['variant']} | "
                         f"{r['graph_replay_ms']:.3f} | {r['pct_roofline']:.1f}% |")
    md = "\n".join(lines) + "\n"
    print(md)
    stem = results_stem("gpu_fused_step", report["device"], report["date"])
    write_results(stem, report, md)
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
