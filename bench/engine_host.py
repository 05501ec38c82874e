"""Host overhead of the LLMEngine step loop, measured on CPU with a tiny model and many rows.

The model is the demo llama (hidden 64, 2 layers), so the forward is cheap and what remains is
the engine's own per-step Python: scheduling, step inputs, sampling set-up, appending tokens,
RequestOutputs. Prints tok/s, ms per step and the forward's share, and (with --profile) the
top cProfile entries of the engine thread.

    python bench/engine_host.py --rows 512 --osl 64 [--profile] [--sync]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import tempfile
import threading
import time

import torch

from runtime_lib.config import SamplingConfig
from runtime_lib.demo import build_checkpoint
from runtime_lib.engine import EngineConfig, LLMEngine
from runtime_lib.session import Session


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=512)
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
    extra = {} if not args.sync else {"async_scheduling": False}
    try:
        cfg = EngineConfig(model_dir=str(ckpt), device="cpu", max_num_seqs=args.rows,
                           max_num_batched_tokens=max(8192, args.rows * args.isl), block_size=16,
                           num_kv_blocks=args.rows * ((args.isl + args.osl) // 16 + 2), **extra)
    except TypeError:
        cfg = EngineConfig(model_dir=str(ckpt), device="cpu", max_num_seqs=args.rows,
                           max_num_batched_tokens=max(8192, args.rows * args.isl), block_size=16,
                           num_kv_blocks=args.rows * ((args.isl + args.osl) // 16 + 2))
    prof = cProfile.Profile() if args.profile else None
    if prof is not None:
        orig = LLMEngine._loop

        def loop(self):
            prof.enable()
            try:
                orig(self)
            finally:
                prof.disable()

        LLMEngine._loop = loop
    engine = LLMEngine(cfg, session=session)
    rng = random.Random(0)
    prompts = [[rng.randrange(4, 400) for _ in range(args.isl)] for _ in range(args.rows)]
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
    print(f"rows={args.rows} isl={args.isl} osl={args.osl}: {ntok / wall:,.0f} tok/s, {steps} steps, "
          f"{wall / steps * 1e3:.2f} ms/step, forward {forward_s[0] / steps * 1e3:.2f} ms/step, "
          f"host {host / steps * 1e3:.2f} ms/step ({host / steps / args.rows * 1e6:.2f} us/row)")
    if prof is not None:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(args.top)
        print(s.getvalue())


if __name__ == "__main__":
    main()
