"""Host cost of the in-flight engine per step and per row, on any machine (no GPU needed).

    python3 bench/engine_host.py --batches 256,512,768,1024

On a GPU the engine overlaps step t+1's host work with step t's forward (async scheduling);
once the host work of a step is longer than the GPU's, the GPU idles and throughput falls with
batch size. This runs `LLMEngine` on CPU with the tiny demo Llama (its forward is a small
share of each step), all requests submitted at once (ISL/OSL 128/128, greedy), and reports the
engine thread's wall time per step minus the time inside `Session.run` and sampling (the
model), per step and per row; with `--profile`, also the top functions of a cProfile of the
engine thread (a second run: cProfile roughly doubles the host time it measures). Results
(JSON + Markdown) go to $OUT when set, else bench/results/.
"""
from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import io
import pstats
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_kernels import results_stem, write_results  # noqa: E402

from runtime_lib.config import SamplingConfig  # noqa: E402
from runtime_lib.demo import build_checkpoint  # noqa: E402
from runtime_lib.engine import LLMEngine  # noqa: E402
from runtime_lib.engine_io import EngineConfig  # noqa: E402


def profiled_loop(profiles: list[cProfile.Profile]):
    original = LLMEngine._loop

    def loop(self) -> None:
        prof = cProfile.Profile()
        profiles.append(prof)
        prof.enable()
        try:
            original(self)
        finally:
            prof.disable()

    return loop


def timed(fn, total: list[float]):
    """`fn`, adding the seconds each call takes to total[0]."""
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            total[0] += time.perf_counter() - t

    return wrapper


def measure(model_dir: str, batch: int, isl: int, osl: int, profile: bool) -> dict:
    import random

    profiles: list[cProfile.Profile] = []
    saved = LLMEngine._loop
    if profile:
        LLMEngine._loop = profiled_loop(profiles)
    try:
        engine = LLMEngine(EngineConfig(model_dir=model_dir, device="cpu", dtype="float32", max_num_seqs=batch,
                                        max_num_batched_tokens=8192, num_kv_blocks=batch * ((isl + osl) // 16 + 2),
                                        max_seq_len=isl + osl + 16, max_queue_size=4 * batch))
    finally:
        LLMEngine._loop = saved
    model_s = [0.0]  # time in the forward and the sampling: the model's, not the host's
    engine.session.run = timed(engine.session.run, model_s)
    engine._sample = timed(engine._sample, model_s)
    rng = random.Random(batch)
    vocab = engine.model_config.vocab_size
    done = threading.Event()
    left = [batch]
    lock = threading.Lock()

    def on_output(o) -> None:
        if o.finished:
            with lock:
                left[0] -= 1
                if not left[0]:
                    done.set()

    scfg = SamplingConfig(end_id=-1, pad_id=0, max_new_tokens=osl)
    t0 = time.perf_counter()
    for i in range(batch):
        engine.add_request(f"r{i}", [rng.randrange(4, vocab) for _ in range(isl)], scfg, on_output=on_output)
    done.wait()
    wall = time.perf_counter() - t0
    steps = engine.stats().num_steps_total
    engine.shutdown()
    host_ms = (wall - model_s[0]) / steps * 1e3
    out = {"batch": batch, "steps": steps, "wall_s": wall, "model_s": model_s[0], "host_ms_per_step": host_ms,
           "host_us_per_row": host_ms * 1e3 / batch, "profiled": profile}
    if profile:
        buf = io.StringIO()
        pstats.Stats(profiles[0], stream=buf).sort_stats("tottime").print_stats(18)
        out["top_tottime"] = buf.getvalue().splitlines()[:40]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="256,512,768")
    ap.add_argument("--isl", type=int, default=128)
    ap.add_argument("--osl", type=int, default=128)
    ap.add_argument("--profile", action="store_true", help="also a cProfiled run of the largest batch")
    args = ap.parse_args()
    model_dir = build_checkpoint(Path(tempfile.mkdtemp()) / "llama", "llama")
    report = {"device": "cpu", "date": dt.datetime.now().isoformat(timespec="seconds"), "isl": args.isl,
              "osl": args.osl, "rows": []}
    batches = [int(x) for x in args.batches.split(",")]
    for b in batches:
        r = measure(str(model_dir), b, args.isl, args.osl, profile=False)
        report["rows"].append(r)
        print(f"batch {b}: {r['steps']} steps, {r['wall_s']:.2f} s, model {r['model_s']:.2f} s, "
              f"host {r['host_ms_per_step']:.2f} ms/step", flush=True)
    lines = [f"# Engine host cost per step (CPU, tiny Llama, ISL/OSL {args.isl}/{args.osl}, {report['date']})", "",
             "| batch | steps | wall s | model s | host ms/step | host us/row |", "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['batch']} | {r['steps']} | {r['wall_s']:.2f} | {r['model_s']:.2f} | "
                     f"{r['host_ms_per_step']:.2f} | {r['host_us_per_row']:.1f} |")
    if args.profile:
        r = measure(str(model_dir), batches[-1], args.isl, args.osl, profile=True)
        report["profiled"] = r
        lines += ["", f"cProfile of the engine thread at batch {r['batch']} (tottime; the profiler roughly doubles "
                  f"the host time: {r['host_ms_per_step']:.2f} ms/step under it):", "", "```", *r["top_tottime"], "```"]
    md = "\n".join(lines) + "\n"
    print(md)
    stem = results_stem("engine_host", "cpu", report["date"])
    write_results(stem, report, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
