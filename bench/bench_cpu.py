"""CPU benchmark: `ModelRunner.generate` tokens/s against Hugging Face `generate` on the same
checkpoint, same prompts, in one run (`make bench`).

    python bench/bench_cpu.py                      # tiny-but-not-trivial llama, batch 1 and 8
    python bench/bench_cpu.py --model-dir <hf_dir> --batch-sizes 1 4 --new-tokens 32

Both sides decode greedily with equal-length prompts (no padding on the HF side) and exactly
`--new-tokens` new tokens (ours: ignore_eos; HF: min_new_tokens), and the tokens are checked to
be identical. Runs of ours and HF alternate so that load from other processes hits both alike;
tokens/s is reported from the best run and from the median. `--profile` (on by default) breaks
one of our runs down with cProfile: model forward (and its paged attention part), sampling, and
the host overhead of the step loop outside the forward. Results: bench/results/bench_cpu.{json,md}.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from runtime_lib.demo import build_checkpoint
from runtime_lib.model_runner import ModelRunner

# hidden 256, 4 layers, GQA 8/4 heads, vocab 400 (the demo tokenizer's)
BENCH_MODEL = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8,
                   "num_key_value_heads": 4}
END_ID, PAD_ID = 2, 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=None, help="HF checkpoint (default: build the bench llama)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per side and batch size")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: steadier on a shared machine)")
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    for name in ("prompt_len", "new_tokens", "repeats", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(b < 1 for b in args.batch_sizes):
        ap.error(f"--batch-sizes must all be >= 1, got {args.batch_sizes}")
    return args


def time_runs(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Alternate the callables `repeats` times after one warm-up each; seconds per run."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def profile_ours(fn, num_steps: int) -> dict[str, float]:
    """Milliseconds per decode step spent in the parts of one `generate` call."""
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    stats = pstats.Stats(prof).stats  # {(file, line, func): (cc, nc, tottime, cumtime, callers)}

    def cum(file_suffix: str, func: str) -> float:
        return sum(v[3] for (f, _, name), v in stats.items() if f.endswith(file_suffix) and name == func)

    total = cum("model_runner.py", "generate")
    forward = cum("session.py", "run")
    parts = {
        "total": total,
        "model_forward": forward,
        "paged_attention": cum("attention.py", "paged_attention"),
        "linear_layers": sum(v[3] for (f, _, name), v in stats.items() if "linear" in name and f == "~"),
        "sampling": cum("sampling.py", "sample"),
        "step_inputs": cum("model_step.py", "build_step_inputs"),
        "kv_bookkeeping": sum(cum("kv_cache.py", n) for n in ("add_sequence", "step", "free_all", "reorder_beams")),
        "host_overhead_outside_forward": total - forward,
    }
    return {k: 1000.0 * v / num_steps for k, v in parts.items()}


def bench(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    tmp = None
    model_dir = args.model_dir
    if model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_cpu_")
        model_dir = build_checkpoint(Path(tmp.name) / "llama", "llama", **BENCH_MODEL)
    runner = ModelRunner.from_dir(model_dir, device="cpu", dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    n_new = args.new_tokens
    gen = torch.Generator().manual_seed(0)
    rows = []
    load_start = os.getloadavg()[0]
    for batch in args.batch_sizes:
        prompts = torch.randint(4, runner.vocab_size, (batch, args.prompt_len), generator=gen)  # (B, P)

        def ours(prompts=prompts):
            return runner.generate(list(prompts), max_new_tokens=n_new, end_id=END_ID, pad_id=PAD_ID,
                                   ignore_eos=True)  # (B, 1, P + n_new)

        @torch.no_grad()
        def theirs(prompts=prompts):
            return hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                               max_new_tokens=n_new, min_new_tokens=n_new, eos_token_id=END_ID,
                               pad_token_id=PAD_ID)  # (B, P + n_new)

        same = torch.equal(ours()[:, 0], theirs())
        times = time_runs({"ours": ours, "hf": theirs}, args.repeats)
        row = {"batch_size": batch, "prompt_len": args.prompt_len, "new_tokens": n_new, "tokens_identical": same}
        for name, ts in times.items():
            row[f"{name}_runs_s"] = [round(t, 4) for t in ts]
            row[f"{name}_tok_s_best"] = batch * n_new / min(ts)
            row[f"{name}_tok_s_median"] = batch * n_new / statistics.median(ts)
        row["ratio_best"] = row["ours_tok_s_best"] / row["hf_tok_s_best"]
        row["ratio_median"] = row["ours_tok_s_median"] / row["hf_tok_s_median"]
        if args.profile:
            row["profile_ms_per_step"] = profile_ours(ours, n_new)
        rows.append(row)
    result = {
        "benchmark": "ModelRunner.generate vs transformers generate, CPU, fp32, greedy",
        "model": {"dir": None if tmp else str(model_dir), **({} if args.model_dir else BENCH_MODEL),
                  "vocab_size": runner.vocab_size},
        "torch": torch.__version__, "threads": args.threads, "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_1min_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "rows": rows,
    }
    if tmp is not None:
        tmp.cleanup()
    return result


def to_markdown(res: dict) -> str:
    lines = [
        f"# {res['benchmark']}", "",
        f"torch {res['torch']}, {res['threads']} thread(s) on {res['cpus']} CPUs, 1-min load average "
        f"{res['loadavg_1min_start_end'][0]} -> {res['loadavg_1min_start_end'][1]}; model "
        + ", ".join(f"{k}={v}" for k, v in res["model"].items() if v is not None) + ".", "",
        ("| batch | prompt | new | ours tok/s (best / median) | HF tok/s (best / median) "
         "| ours / HF (best / median) | tokens identical |"),
        "|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in res["rows"]:
        lines.append(f"| {r['batch_size']} | {r['prompt_len']} | {r['new_tokens']} "
                     f"| {r['ours_tok_s_best']:.0f} / {r['ours_tok_s_median']:.0f} "
                     f"| {r['hf_tok_s_best']:.0f} / {r['hf_tok_s_median']:.0f} "
                     f"| {r['ratio_best']:.2f} / {r['ratio_median']:.2f} | {'yes' if r['tokens_identical'] else 'NO'} |")
    prof_rows = [r for r in res["rows"] if "profile_ms_per_step" in r]
    if prof_rows:
        keys = list(prof_rows[0]["profile_ms_per_step"])
        lines += ["", ("Where our time goes (cProfile of one run, ms per decode step; cProfile inflates "
                       "Python-heavy parts):"), "", "| part | " + " | ".join(f"batch {r['batch_size']}" for r in prof_rows) + " |",
                  "|---|" + "---:|" * len(prof_rows)]
        for k in keys:
            lines.append(f"| {k} | " + " | ".join(f"{r['profile_ms_per_step'][k]:.2f}" for r in prof_rows) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    res = bench(args)
    md = to_markdown(res)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_cpu.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "bench_cpu.md").write_text(md)
    print(f"wrote {args.out / 'bench_cpu.json'} and {args.out / 'bench_cpu.md'}")
    return 0 if all(r["tokens_identical"] for r in res["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
