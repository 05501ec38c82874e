"""Host cost of the in-flight engine per step and per row, on any machine (no GPU needed).

    python3 bench/engine_host.py --batches 256,512,768,1024

On a GPU the engine overlaps step t+1's host work with step t's forward (async scheduling);
once the host work of a step is longer than the GPU's, the GPU idles and throughput falls with
batch size. This runs `LLMEngine` on CPU with the tiny demo Llama (its forward is a small
share of each step), all requests submitted at once (ISL/OSL 128/128, greedy), and reports the
engine thread's wall time per decode-phase step, minus the time inside `Session.run` and
sampling (the model), per step and per row, with the top functions of a cProfile of the
engine thread. Results (JSON + Markdown) go to $OUT when set, else bench/results/.
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

MODEL_FUNCS = ("run", "_sample")  # Session.run and LLMEngine._sample: the model, not the host


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


def measure(model_dir: str, batch: int, isl: int, osl: int) -> dict:
    import random

    profiles: list[cProfile.Profile] = []
    saved = LLMEngine._loop
    LLMEngine._loop = profiled_loop(profiles)
    try:
        engine = LLMEngine(EngineConfig(model_dir=model_dir, device="cpu", dtype="float32", max_num_seqs=batch,
                                        max_num_batched_tokens=8192, num_kv_blocks=batch * ((isl + osl) // 16 + 2),
                                        max_seq_len=isl + osl + 16, max_queue_size=4 * batch))
    finally:
        LLMEngine._loop = saved
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
    prof = profiles[0]
    stats = pstats.Stats(prof)
    model_s = sum(v[3] for k, v in stats.stats.items() if k[2] in MODEL_FUNCS and k[0].endswith(("session.py", "engine.py")))
    total_s = sum(v[2] for v in stats.stats.values())  # tottime: every function's own time
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(18)
    host_ms = (wall - model_s) / steps * 1e3
    return {"batch": batch, "steps": steps, "wall_s": wall, "model_s": model_s, "profiled_total_s": total_s,
            "host_ms_per_step": host_ms, "host_us_per_row_step": host_ms * 1e3 * steps / (batch * (osl + isl / 64)),
            "top_tottime": buf.getvalue().splitlines()[:40]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="256,512,768")
    ap.add_argument("--isl", type=int, default=128)
    ap.add_argument("--osl", type=int, default=128)
    args = ap.parse_args()
    model_dir = build_checkpoint(Path(tempfile.mkdtemp()) / "llama", "llama")
    report = {"device": "cpu", "date": dt.datetime.now().isoformat(timespec="seconds"), "isl": args.isl,
              "osl": args.osl, "rows": []}
    for b in (int(x) for x in args.batches.split(",")):
        r = measure(str(model_dir), b, args.isl, args.osl)
        report["rows"].append(r)
        print(f"batch {b}: {r['steps']} steps, {r['wall_s']:.2f} s, model {r['model_s']:.2f} s, "
              f"host {r['host_ms_per_step']:.2f} ms/step", flush=True)
    lines = [f"# Engine host cost per step (CPU, tiny Llama, ISL/OSL {args.isl}/{args.osl}, {report['date']})", "",
             "| batch | steps | wall s | model s | host ms/step |", "|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['batch']} | {r['steps']} | {r['wall_s']:.2f} | {r['model_s']:.2f} | "
                     f"{r['host_ms_per_step']:.2f} |")
    lines += ["", f"cProfile of the engine thread at batch {report['rows'][-1]['batch']} (tottime):", "", "```",
              *report["rows"][-1]["top_tottime"], "```"]
    md = "\n".join(lines) + "\n"
    print(md)
    stem = results_stem("engine_host", "cpu", report["date"])
    write_results(stem, report, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
