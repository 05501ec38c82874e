"""Summarize a perf_analyzer `--profile-export-file` of streaming runs against `ensemble`:
per concurrency level, requests/s, output tokens/s, and percentiles of time to first response,
end-to-end latency and inter-token latency. Output tokens come from the `num_output_tokens`
output (the input data asks for it), so coalesced responses still count every token.

    python bench/perf_analyzer_report.py profile.json [more.json ...] [--json out.json]
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class LevelSummary:
    concurrency: int
    num_requests: int
    requests_per_s: float
    output_tokens_per_s: float
    responses_per_s: float
    mean_output_tokens: float
    ttft_ms: dict[str, float]
    e2e_ms: dict[str, float]
    itl_ms: dict[str, float]


def percentiles(values: list[float], qs: tuple[int, ...] = (50, 90, 95, 99)) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)
    out = {f"p{q}": s[min(len(s) - 1, max(0, round(q / 100 * len(s)) - 1))] for q in qs}
    out["mean"] = sum(s) / len(s)
    return out


def _parse(value: Any) -> Any:
    # perf_analyzer 2.51 writes these fields as Python-literal strings in some builds.
    return ast.literal_eval(value) if isinstance(value, str) else value


def summarize(profile: dict[str, Any]) -> list[LevelSummary]:
    levels = []
    for exp in profile["experiments"]:
        level = int(exp["experiment"].get("value", 0))
        ttft, e2e, itl = [], [], []
        num_tokens = num_responses = 0
        starts, ends = [], []
        requests = exp["requests"]
        for req in requests:
            t0 = int(req["timestamp"])
            stamps = [int(t) for t in _parse(req["response_timestamps"])]
            outputs = _parse(req.get("response_outputs", [])) or []
            if not stamps:
                continue
            tokens = 0
            for out in outputs:
                tokens = max(tokens, int(out.get("num_output_tokens", 0) or 0))
            tokens = tokens or len(stamps)
            starts.append(t0)
            ends.append(stamps[-1])
            ttft.append((stamps[0] - t0) / 1e6)
            e2e.append((stamps[-1] - t0) / 1e6)
            if tokens > 1:
                itl.append((stamps[-1] - stamps[0]) / 1e6 / (tokens - 1))
            num_tokens += tokens
            num_responses += len(stamps)
        span_s = (max(ends) - min(starts)) / 1e9 if starts else 0.0
        n = len(starts)
        levels.append(LevelSummary(
            concurrency=level, num_requests=n,
            requests_per_s=n / span_s if span_s else 0.0,
            output_tokens_per_s=num_tokens / span_s if span_s else 0.0,
            responses_per_s=num_responses / span_s if span_s else 0.0,
            mean_output_tokens=num_tokens / n if n else 0.0,
            ttft_ms=percentiles(ttft), e2e_ms=percentiles(e2e), itl_ms=percentiles(itl)))
    return levels


def render(levels: list[LevelSummary]) -> str:
    head = (f"{'conc':>4} {'req/s':>7} {'tok/s':>8} {'resp/s':>8} {'tok/req':>7} | "
            f"{'TTFT p50':>8} {'p90':>7} {'p99':>7} | {'E2E p50':>8} {'p90':>8} {'p99':>8} | "
            f"{'ITL p50':>7} {'p90':>6} {'p99':>6}  (ms)")
    rows = [head, "-" * len(head)]
    for lv in levels:
        t, e, i = lv.ttft_ms, lv.e2e_ms, lv.itl_ms
        rows.append(
            f"{lv.concurrency:>4} {lv.requests_per_s:>7.2f} {lv.output_tokens_per_s:>8.1f} "
            f"{lv.responses_per_s:>8.1f} {lv.mean_output_tokens:>7.1f} | "
            f"{t.get('p50', 0):>8.1f} {t.get('p90', 0):>7.1f} {t.get('p99', 0):>7.1f} | "
            f"{e.get('p50', 0):>8.1f} {e.get('p90', 0):>8.1f} {e.get('p99', 0):>8.1f} | "
            f"{i.get('p50', 0):>7.2f} {i.get('p90', 0):>6.2f} {i.get('p99', 0):>6.2f}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profiles", type=Path, nargs="+")
    ap.add_argument("--json", type=Path, help="also write the summary here")
    args = ap.parse_args(argv)
    levels = [lv for path in args.profiles for lv in summarize(json.loads(path.read_text()))]
    print(render(levels))
    if args.json:
        args.json.write_text(json.dumps([asdict(lv) for lv in levels], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
