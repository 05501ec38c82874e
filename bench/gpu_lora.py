"""LoRA serving cost: LLMEngine with requests spread over 1 or more random adapters (rank r on
all seven projections of every layer) against the same engine and prompts without adapters,
measured in one run, at several concurrencies.

    python3 bench/gpu_lora.py --model 8b --adapters 0,1,4 --concurrency 1,8,32 --max-loras 0,4 --compile
    python3 bench/gpu_lora.py --device cpu --model tiny --concurrency 2 --osl 8   # smoke run

`--max-loras`: the engine's LoRA slots (runtime_lib/lora.py `LoraSlots`); steps with adapters
replay CUDA graphs when theirs fit the slots, and run eagerly with 0. Prints a Markdown table;
writes JSON + Markdown to $OUT (else bench/results/). Without CUDA (and no --device cpu) it says
so and exits 0.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import bench.gpu_e2e as e2e  # noqa: E402
from runtime_lib.lora import SLOT_PARTS, LoraAdapter, module_shapes  # noqa: E402


def random_adapter(mc, uid: str, rank: int, device, dtype: torch.dtype, seed: int) -> LoraAdapter:
    """An adapter on q, k, v, o, gate, up and down of every layer (A scaled to keep the update small)."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(mc.num_layers):
        for module, (n_in, n_out) in module_shapes(mc).items():
            parts = SLOT_PARTS[module]
            a = torch.randn(rank * parts, n_in, generator=g) * n_in ** -0.5
            b = torch.randn(n_out, rank * parts, generator=g) * 0.01
            weights[f"layers.{layer}.{module}"] = (a.to(device, dtype), b.to(device, dtype))
    return LoraAdapter(uid, rank, weights)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="8b", help="a bench/gpu_e2e.py shape: 1b, 8b (tiny for --device cpu)")
    ap.add_argument("--adapters", default="0,1,4", help="distinct adapters the requests use; 0 = none (baseline)")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--max-loras", default="0,4", help="the engine's LoRA slots per run (0: eager LoRA steps)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--isl", type=int, default=128)
    ap.add_argument("--osl", type=int, default=64)
    ap.add_argument("--compile", action="store_true", help="torch.compile the engine's graph-replayed steps")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_lora: no CUDA device; nothing to measure (run this on a GPU machine)")
        return 0
    e2e.DEVICE = args.device
    adapters = [int(x) for x in args.adapters.split(",") if x]
    concurrency = [int(x) for x in args.concurrency.split(",") if x]
    max_loras = [int(x) for x in args.max_loras.split(",") if x]
    _, session, mc = e2e.build_models(args.model)
    rows = []
    for c in concurrency:
        prompts = e2e.random_prompts(c, args.isl, mc.vocab_size, seed=c)
        warm = e2e.random_prompts(c, args.isl, mc.vocab_size, seed=c + 1000)  # no prefix hits on the measured run
        base = None
        for n, slots in [(a, m) for a in adapters for m in (max_loras if a else max_loras[:1])]:
            session.model.lora_slots = None  # each engine makes its own (EngineConfig.max_loras)
            engine = e2e.make_engine(session, c, args.isl + args.osl, args.compile, max_loras=slots,
                                     max_lora_rank=args.rank)
            try:
                for i in range(n):
                    engine.add_lora_adapter(random_adapter(mc, str(i), args.rank, session.device,
                                                           mc.torch_dtype, seed=i))
                uids = [str(i % n) if n else None for i in range(c)]
                e2e.run_engine(session, warm, 4, engine, lora_uids=uids)  # captures (and compiles) this shape's graphs
                stats = e2e.run_engine(session, prompts, args.osl, engine, lora_uids=uids)
            finally:
                engine.shutdown()
            engine = None
            e2e.free_cuda()
            row = {"concurrency": c, "adapters": n, "max_loras": slots if n else None, "tok_s": stats["tok_s"],
                   "itl_ms": stats["itl_ms"], "ttft_ms": stats["ttft_ms"]}
            base = row if n == 0 else base
            row["vs_no_adapters"] = row["tok_s"] / base["tok_s"] if base else None
            rows.append(row)
            e2e.log(f"c={c} adapters={n} max_loras={slots}: {row['tok_s']:,.0f} tok/s, "
                    f"ITL p50 {row['itl_ms'][50]:.2f} ms")
    device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    lines = [f"# LoRA serving cost, {args.model}, {device}", "",
             f"torch {torch.__version__}; rank {args.rank} on all projections; ISL/OSL {args.isl}/{args.osl}; "
             f"compiled: {args.compile}", "",
             "| concurrency | adapters | LoRA slots (0: eager steps) | output tok/s | vs no adapters | "
             "ITL p50 / p90 ms | TTFT p50 ms |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['vs_no_adapters']:.2f}x" if r["vs_no_adapters"] is not None else "-"
        slots = "-" if r["max_loras"] is None else r["max_loras"]
        lines.append(f"| {r['concurrency']} | {r['adapters']} | {slots} | {r['tok_s']:,.0f} | {ratio} | "
                     f"{r['itl_ms'][50]:.2f} / {r['itl_ms'][90]:.2f} | {r['ttft_ms'][50]:.1f} |")
    md = "\n".join(lines) + "\n"
    print(md)
    out = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"gpu_lora-{args.model}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    stem.with_suffix(".json").write_text(json.dumps({"device": device, "args": vars(args), "rows": rows}, indent=1))
    stem.with_suffix(".md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
