"""Host overhead of the LLMEngine step loop, measured on CPU with a tiny model and many rows.

The model is the demo llama (hidden 64, 2 layers), so the forward is cheap and what remains is
the engine's own per-step Python: scheduling, step inputs, sampling set-up, appending tokens,
RequestOutputs. Prints tok/s, ms per step and the forward's share for each row count, and (with
--profile) the top cProfile entries of the engine thread in one more run at the last count
(cProfile about doubles the host time, so that run is not in the table). The table (JSON +
Markdown) goes to $OUT when set, else bench/results/.

    python bench/engine_host.py --rows 256,512,1024 --isl 128 --osl 128 [--profile] [--sync]
"""
from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import io
import pstats
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_kernels import results_stem, write_results  # noqa: E402

from runtime_lib.config import SamplingConfig  # noqa: E402
from runtime_lib.demo import build_checkpoint  # noqa: E402
from runtime_lib.engine import EngineConfig, LLMEngine  # noqa: E402
from runtime_lib.session import Session  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="512", help="comma-separated row counts, one engine each")
    ap.add_argument("--isl", type=int, default=16)
    ap.add_argument("--osl", type=int, default=64)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--sync", action="store_true", help="EngineConfig(async_scheduling=False)")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ckpt = build_checkpoint(tempfile.mkdtemp(prefix="engine-host-"), "llama")
    session = Session.from_dir(ckpt, device="cpu")
    forward_s = [0.0]
    backend = session._backend
    inner = backend.forward

    def timed_forward(*a, **kw):  # the model's own time, to subtract from the step
        t = time.perf_counter()
        out = inner(*a, **kw)
        forward_s[0] += time.perf_counter() - t
        return out

    backend.forward = timed_forward
    row_counts = [int(r) for r in args.rows.split(",")]
    report = {"device": "cpu", "date": dt.datetime.now().isoformat(timespec="seconds"), "isl": args.isl,
              "osl": args.osl, "sync": args.sync, "rows": []}
    for rows in row_counts:
        r, _ = measure(session, ckpt, rows, args, forward_s, profile=False)
        report["rows"].append(r)
        print(f"rows={rows} isl={args.isl} osl={args.osl}: {r['tok_s']:,.0f} tok/s, {r['steps']} steps, "
              f"{r['ms_per_step']:.2f} ms/step, forward {r['forward_ms_per_step']:.2f} ms/step, "
              f"host {r['host_ms_per_step']:.2f} ms/step ({r['host_us_per_row']:.2f} us/row)", flush=True)
    lines = [f"# Engine host cost per step (CPU, tiny Llama, ISL/OSL {args.isl}/{args.osl}"
             f"{', synchronous' if args.sync else ''}, {report['date']})", "",
             "| rows | steps | tok/s | ms/step | forward ms/step | host ms/step | host us/row |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['rows']} | {r['steps']} | {r['tok_s']:,.0f} | {r['ms_per_step']:.2f} | "
                     f"{r['forward_ms_per_step']:.2f} | {r['host_ms_per_step']:.2f} | {r['host_us_per_row']:.2f} |")
    if args.profile:
        _, prof = measure(session, ckpt, row_counts[-1], args, forward_s, profile=True)
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.top)
        report["profile"] = out.getvalue().splitlines()
        lines += ["", f"cProfile of the engine thread at {row_counts[-1]} rows (tottime):", "", "```",
                  *report["profile"], "```"]
    md = "\n".join(lines) + "\n"
    print(md)
    write_results(results_stem("engine_host", "cpu", report["date"]), report, md)


def measure(session: Session, ckpt, rows: int, args, forward_s: list[float],
            profile: bool) -> tuple[dict, cProfile.Profile | None]:
    """One engine of `rows` rows: a warm-up run, then a timed run of `rows` requests at once."""
    extra = {} if not args.sync else {"async_scheduling": False}
    cfg = EngineConfig(model_dir=str(ckpt), device="cpu", max_num_seqs=rows,
                       max_num_batched_tokens=max(8192, rows * args.isl), block_size=16,
                       num_kv_blocks=rows * ((args.isl + args.osl) // 16 + 2), **extra)
    prof = cProfile.Profile() if profile else None
    orig = LLMEngine._loop
    if prof is not None:
        def loop(self):
            prof.enable()
            try:
                orig(self)
            finally:
                prof.disable()

        LLMEngine._loop = loop
    try:
        engine = LLMEngine(cfg, session=session)
    finally:
        LLMEngine._loop = orig
    rng = random.Random(0)
    prompts = [[rng.randrange(4, 400) for _ in range(args.isl)] for _ in range(rows)]
    scfg = SamplingConfig(end_id=-1, pad_id=0, max_new_tokens=args.osl)

    def run() -> tuple[float, int, int]:
        done = threading.Event()
        left = [len(prompts)]
        n = [0]
        lock = threading.Lock()

        def on_output(o):
            n[0] += len(o.new_token_ids)
            if o.finished:
                with lock:
                    left[0] -= 1
                    if not left[0]:
                        done.set()

        steps0 = engine.stats().num_steps_total
        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}-{t0}", p, scfg, on_output=on_output)
        done.wait()
        return time.perf_counter() - t0, n[0], engine.stats().num_steps_total - steps0

    run()  # warm-up
    forward_s[0] = 0.0
    if prof is not None:
        prof.clear() if hasattr(prof, "clear") else None
    wall, ntok, steps = run()
    engine.shutdown()
    host = wall - forward_s[0]
    return {"rows": rows, "steps": steps, "tok_s": ntok / wall, "ms_per_step": wall / steps * 1e3,
            "forward_ms_per_step": forward_s[0] / steps * 1e3, "host_ms_per_step": host / steps * 1e3,
            "host_us_per_row": host / steps / rows * 1e6}, prof


if __name__ == "__main__":
    main()
