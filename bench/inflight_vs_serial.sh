#!/usr/bin/env bash
# In-flight batching vs one-at-a-time serving, same model, same load, same run: a server with
# engine max_batch_size 1, then one with 64, each driven by perf_analyzer (bench/perf_analyzer.sh,
# streaming, CONCURRENCY clients); prints both and the ratio.
#   CONCURRENCY=32 MAX_TOKENS=32 bash bench/inflight_vs_serial.sh
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VPY=${VPY:-$root/.venv/bin/python}
CONCURRENCY=${CONCURRENCY:-32}
MAX_TOKENS=${MAX_TOKENS:-32}
REQUESTS=${REQUESTS:-64}
OUT=${OUT:-$root/bench/results}
work=$(mktemp -d)
mkdir -p "$OUT"

free_port() { "$VPY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
for mode in serial inflight; do
    # No server answers on a fresh port, so perf_analyzer.sh starts one (scripts/serve.sh,
    # which passes LLM_MAX_BATCH_SIZE to the engine) and stops it when done.
    LLM_MAX_BATCH_SIZE=$([ $mode = serial ] && echo 1 || echo 64) URL=127.0.0.1:$(free_port) \
        CONCURRENCY=$CONCURRENCY MAX_TOKENS=$MAX_TOKENS REQUESTS=$REQUESTS OUT_DIR="$work/$mode" \
        bash "$root/bench/perf_analyzer.sh" >&2
done

"$VPY" - "$work" "$OUT" "$CONCURRENCY" "$MAX_TOKENS" <<'PY'
import json, sys, time
from pathlib import Path
work, out, conc, max_tokens = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
rows = {m: json.loads((work / m / "summary.json").read_text())[0] for m in ("serial", "inflight")}
lines = [f"# In-flight batching vs one at a time ({conc} streaming clients, {max_tokens} tokens each, tiny CPU model)", "",
         "| serving | requests/s | output tokens/s | TTFT p50 ms | ITL p50 ms |", "|---|---|---|---|---|"]
for m, r in rows.items():
    lines.append(f"| {m} | {r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.1f} | "
                 f"{r['ttft_ms'].get('p50', float('nan')):.1f} | {r['itl_ms'].get('p50', float('nan')):.2f} |")
ratio = rows["inflight"]["output_tokens_per_s"] / rows["serial"]["output_tokens_per_s"]
lines += ["", f"in-flight / one-at-a-time throughput: **{ratio:.2f}x** ({time.strftime('%Y-%m-%d')})"]
text = "\n".join(lines)
print(text)
(out / "inflight_vs_serial.md").write_text(text + "\n")
(out / "inflight_vs_serial.json").write_text(json.dumps({"rows": rows, "ratio": ratio}, indent=2))
PY
