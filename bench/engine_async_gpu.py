"""Before/after of LLMEngine's host work on the GPU, in one process on one model.

Builds the Llama-3.1-8B shape once (random bf16 weights, as bench/gpu_e2e.py does; the
compiled decode step is shared by every engine over the model), then runs engine variants
interleaved: a baseline engine module (`--baseline-engine FILE`, e.g. `git show
<commit>:runtime_lib/engine.py > FILE`), this engine with `async_scheduling=False`, and this
engine with asynchronous scheduling. Per variant: offline ISL/OSL 128/128 output tok/s at each
batch (all requests at once) and one stream's TTFT / ITL. JSON + Markdown to $OUT (else
bench/results/).

    python3 bench/engine_async_gpu.py --baseline-engine engine_old.py --compile
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_e2e as g  # noqa: E402  (the bench's model builder and engine driver)

from runtime_lib import engine as this_engine  # noqa: E402


def load_engine_module(path: str):
    """An engine.py from elsewhere, imported inside the runtime_lib package (its relative
    imports resolve to this checkout's modules)."""
    spec = importlib.util.spec_from_file_location("runtime_lib._baseline_engine", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def make_engine(mod, session, rows: int, tokens_per_seq: int, compile_: bool, extra: dict):
    blocks = rows * (math.ceil(tokens_per_seq / 16) + 1)  # every row at full length: no preemption
    return mod.LLMEngine(mod.EngineConfig(
        model_dir="<in-memory>", max_num_seqs=rows, max_num_batched_tokens=8192, block_size=16,
        num_kv_blocks=blocks, max_seq_len=g.MAX_SEQ_LEN, max_queue_size=4096, compile_decode=compile_,
        **extra), session=session)


def measure(mod, extra: dict, session, vocab: int, rows: int, n: int, compile_: bool) -> dict:
    engine = make_engine(mod, session, rows, 256, compile_, extra)
    try:
        g.run_engine(session, g.random_prompts(n, 128, vocab, seed=1003 + n), 3, engine)  # warm-up: graphs
        return g.run_engine(session, g.random_prompts(n, 128, vocab, seed=3 + n), 128, engine)
    finally:
        engine.shutdown()
        engine = None
        g.free_cuda()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="8b")
    ap.add_argument("--baseline-engine", default=None)
    ap.add_argument("--batches", default="512,256")
    ap.add_argument("--streams", default="1")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--budget-s", type=float, default=400)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu + --model tiny: smoke test
    args = ap.parse_args()
    g.DEVICE = args.device
    if args.device == "cuda" and not torch.cuda.is_available():
        print("engine_async_gpu: no CUDA device; nothing to measure")
        return 0
    t0 = time.perf_counter()
    variants: dict[str, tuple[Any, dict]] = {}
    if args.baseline_engine:
        variants["baseline"] = (load_engine_module(args.baseline_engine), {})
    variants["sync"] = (this_engine, {"async_scheduling": False})
    variants["async"] = (this_engine, {"async_scheduling": True})
    out_dir = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    report: dict[str, Any] = {"device": device_name, "torch": torch.__version__,
                              "date": dt.datetime.now().isoformat(timespec="seconds"), "model": args.model,
                              "compiled": args.compile, "command": " ".join(sys.argv), "offline": {},
                              "latency": {}, "skipped": []}

    def save() -> None:
        (out_dir / f"engine_async_gpu-{stamp}.json").write_text(json.dumps(report, indent=1, default=str))
        (out_dir / f"engine_async_gpu-{stamp}.md").write_text(markdown(report))

    hf, session, mc = g.build_models(args.model)
    del hf
    g.free_cuda()
    g.log(f"built {args.model} in {time.perf_counter() - t0:.0f} s")
    plan = [("latency", int(c)) for c in args.streams.split(",") if c] + \
           [("offline", int(b)) for b in args.batches.split(",") if b]
    for kind, n in plan:
        for name, (mod, extra) in variants.items():
            if time.perf_counter() - t0 > args.budget_s:
                report["skipped"].append(f"{kind} {n} {name}")
                continue
            rows = n if kind == "offline" else max(8, n)
            stats = measure(mod, extra, session, mc.vocab_size, rows, n, args.compile)
            report[kind].setdefault(str(n), {})[name] = stats
            g.log(f"{kind} n={n} {name}: {stats['tok_s']:,.0f} tok/s, {stats['steps_total']} steps, "
                  f"TTFT p50 {stats['ttft_ms'][50]:.1f} ms, ITL p50 {stats['itl_ms'][50]:.2f} ms "
                  f"p90 {stats['itl_ms'][90]:.2f} ms")
            save()
    save()
    print(markdown(report))
    return 0


def markdown(r: dict) -> str:
    lines = [f"# LLMEngine host work: baseline vs this engine ({r['model']}, {r['device']}, torch {r['torch']}, "
             f"{r['date']}, compiled step: {r['compiled']})", "",
             "| run | variant | output tok/s | steps | TTFT p50 ms | ITL p50 / p90 / p99 ms |",
             "|---|---|---|---|---|---|"]
    for kind in ("latency", "offline"):
        for n, by_variant in r[kind].items():
            for name, s in by_variant.items():
                label = f"{n} stream(s)" if kind == "latency" else f"offline 128/128 bs{n}"
                lines.append(f"| {label} | {name} | {s['tok_s']:,.0f} | {s['steps_total']} | {s['ttft_ms'][50]:.1f} | "
                             f"{s['itl_ms'][50]:.2f} / {s['itl_ms'][90]:.2f} / {s['itl_ms'][99]:.2f} |")
    if r["skipped"]:
        lines += ["", f"Skipped (past the time budget): {', '.join(r['skipped'])}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
