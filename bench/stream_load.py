"""Streaming load against a running tritonserver: N concurrent gRPC streams, each sending
requests back to back; prints time to first token, inter-token latency and throughput.

    python bench/stream_load.py --url localhost:8001 --model ensemble --concurrency 1,8,32 \
        --prompt-len 128 --max-tokens 128 --requests-per-stream 4

`--model generation` talks to the engine model directly (token ids in and out), so the
difference between the two is what the ensemble's tokenize/BLS/detokenize costs.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import random
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient


@dataclass
class RequestTiming:
    start: float
    arrivals: list[float]
    num_tokens: int
    error: str | None = None


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, int(round(q / 100 * (len(values) - 1)))))
    return values[k]


def _inputs(model: str, prompt_ids: list[int], text: str, max_tokens: int) -> list:
    def tensor(name, value, dtype):
        arr = np.array(value, dtype=np.object_ if dtype == "BYTES" else None)
        if dtype != "BYTES":
            arr = arr.astype({"INT32": np.int32, "BOOL": np.bool_, "UINT64": np.uint64}[dtype])
        t = grpcclient.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        return t

    if model == "generation":
        return [tensor("input_ids", [prompt_ids], "INT32"), tensor("input_lengths", [[len(prompt_ids)]], "INT32"),
                tensor("request_output_len", [[max_tokens]], "INT32"), tensor("streaming", [[True]], "BOOL"),
                tensor("ignore_eos", [[True]], "BOOL")]
    return [tensor("text_input", [[text.encode()]], "BYTES"), tensor("max_tokens", [[max_tokens]], "INT32"),
            tensor("stream", [[True]], "BOOL"), tensor("exclude_input_in_output", [[True]], "BOOL"),
            tensor("ignore_eos", [[True]], "BOOL")]


def _stream_worker(url: str, model: str, jobs: list[tuple[list[int], str]], max_tokens: int,
                   results: list[RequestTiming]) -> None:
    client = grpcclient.InferenceServerClient(url)
    events: queue.SimpleQueue = queue.SimpleQueue()

    def callback(result, error):
        events.put((time.perf_counter(), result, error))

    client.start_stream(callback=callback)
    try:
        for i, (ids, text) in enumerate(jobs):
            timing = RequestTiming(time.perf_counter(), [], 0)
            client.async_stream_infer(model, _inputs(model, ids, text, max_tokens), request_id=f"{id(jobs)}-{i}",
                                      enable_empty_final_response=True)
            while True:
                t, result, error = events.get()
                if error is not None:
                    timing.error = str(error)
                    break
                resp = result.get_response()
                final = resp.parameters.get("triton_final_response")
                is_final = bool(final and final.bool_param)
                if resp.outputs:
                    n = _num_new_tokens(model, result)
                    if n:
                        timing.arrivals.append(t)
                        timing.num_tokens += n
                if is_final:
                    break
            results.append(timing)
    finally:
        client.stop_stream()
        client.close()


def _num_new_tokens(model: str, result) -> int:
    if model == "generation":
        ids = result.as_numpy("output_ids")
        return 0 if ids is None else int(ids.shape[-1])
    text = result.as_numpy("text_output")
    return 1 if text is not None and len(text) and text.reshape(-1)[0] else 0


def run_level(url: str, model: str, concurrency: int, requests_per_stream: int, prompt_len: int,
              max_tokens: int, vocab: int, seed: int, text_mode: str = "words") -> dict:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "stream", "token", "model", "serve", "batch", "cache"]
    results: list[RequestTiming] = []
    threads = []
    for _ in range(concurrency):
        jobs = []
        for _ in range(requests_per_stream):
            ids = [rng.randrange(4, vocab) for _ in range(prompt_len)]
            # "ids": the word-level tokenizer of bench/make_random_checkpoint.py reads "t<id>"
            text = " ".join(f"t{i}" for i in ids) if text_mode == "ids" else \
                " ".join(rng.choice(words) for _ in range(prompt_len))
            jobs.append((ids, text))
        threads.append(threading.Thread(target=_stream_worker, args=(url, model, jobs, max_tokens, results)))
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if r.error is None and r.arrivals]
    ttft = [(r.arrivals[0] - r.start) * 1e3 for r in ok]
    itl = [(b - a) * 1e3 / 1 for r in ok for a, b in zip(r.arrivals, r.arrivals[1:])]
    tokens = sum(r.num_tokens for r in ok)
    return {
        "model": model, "concurrency": concurrency, "requests": len(results),
        "errors": len(results) - len(ok), "first_error": next((r.error for r in results if r.error), None),
        "ttft_ms_p50": _percentile(ttft, 50), "ttft_ms_p90": _percentile(ttft, 90), "ttft_ms_p99": _percentile(ttft, 99),
        "itl_ms_p50": _percentile(itl, 50), "itl_ms_p90": _percentile(itl, 90), "itl_ms_p99": _percentile(itl, 99),
        "itl_ms_mean": statistics.fmean(itl) if itl else float("nan"),
        "output_tokens_per_s": tokens / wall, "requests_per_s": len(ok) / wall, "wall_s": wall,
    }


def print_table(rows: list[dict]) -> str:
    cols = ["model", "concurrency", "requests", "errors", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50",
            "itl_ms_p90", "itl_ms_p99", "output_tokens_per_s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    table = "\n".join(lines)
    print(table, flush=True)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="localhost:8001")
    ap.add_argument("--model", default="ensemble", choices=["ensemble", "generation"])
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests-per-stream", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=128, help="tokens (generation) or words (ensemble)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=400, help="upper bound for random prompt ids (generation)")
    ap.add_argument("--text-mode", choices=["words", "ids"], default="words",
                    help='ensemble prompts: English words, or "t<id>" words for random-shape checkpoints')
    ap.add_argument("--warmup", type=int, default=1, help="requests per stream sent at the highest concurrency before measuring")
    ap.add_argument("--label", default="")
    ap.add_argument("--output", default=os.environ.get("OUT", ""), help="folder for JSON/Markdown results")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.warmup:  # first use of each batch shape compiles kernels: keep that out of the numbers
        run_level(args.url, args.model, max(levels), args.warmup, args.prompt_len, min(args.max_tokens, 8),
                  args.vocab, 0, args.text_mode)
    rows = [run_level(args.url, args.model, c, args.requests_per_stream, args.prompt_len, args.max_tokens,
                      args.vocab, seed=i + 1, text_mode=args.text_mode)
            for i, c in enumerate(levels)]
    table = print_table(rows)
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"stream_load_{args.model}{('_' + args.label) if args.label else ''}"
        args_record = {k: v for k, v in vars(args).items() if k != "output"}  # no machine paths in results
        meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "args": args_record}
        (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        (out / f"{stem}.md").write_text(f"# {stem}\n\n{json.dumps(meta)}\n\n{table}\n")


if __name__ == "__main__":
    main()
