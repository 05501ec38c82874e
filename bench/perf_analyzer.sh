#!/usr/bin/env bash
# Load-test the served `ensemble` with perf_analyzer (from the tritonclient[all] wheel) in
# streaming mode, then print requests/s, output tokens/s and TTFT / end-to-end / inter-token
# latency percentiles per concurrency level (bench/perf_analyzer_report.py).
#
#   bash bench/perf_analyzer.sh                  # against a running `make serve` (localhost:8001),
#                                                # or starts one on free ports if none answers
#   URL=host:8001 CONCURRENCY="1 4 16" MAX_TOKENS=128 PROMPT="..." bash bench/perf_analyzer.sh
#
#   CONCURRENCY  space-separated levels (default "1 4 8")
#   MAX_TOKENS   tokens per request (default 64);  PROMPT (default a short sentence)
#   REQUESTS     requests measured per level (default 8 x concurrency + 8; a fixed count rather
#                than perf_analyzer's stabilization windows, which rarely settle on a shared box)
#   PA_ARGS      extra perf_analyzer flags
#   OUT_DIR      keep the input JSON, CSV, profile export and summary here (default: a temp dir)
#
# perf_analyzer needs libb64.so.0d (Debian's libb64-0d) and libcudart.so.12 (PyPI's
# nvidia-cuda-runtime-cu12) even on CPU; both are installed here if missing.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VPY=${VPY:-$root/.venv/bin/python}
PA=$(dirname "$VPY")/perf_analyzer
URL=${URL:-localhost:8001}
CONCURRENCY=${CONCURRENCY:-1 4 8}
MAX_TOKENS=${MAX_TOKENS:-64}
PROMPT=${PROMPT:-Once upon a time there was a little model that wanted to generate text quickly.}
CUDART_PIN=nvidia-cuda-runtime-cu12==12.6.77

[ -x "$PA" ] || { echo "no perf_analyzer at $PA: run 'make setup' (tritonclient[all])" >&2; exit 1; }

# --- the two libraries perf_analyzer links against -------------------------------------------
if ! ldconfig -p | grep -q 'libb64.so.0d'; then
    echo "installing libb64-0d (apt) for perf_analyzer" >&2
    if [ "$(id -u)" = 0 ]; then apt-get install -y -q libb64-0d >&2 || { apt-get update -q >&2 && apt-get install -y -q libb64-0d >&2; }
    else sudo apt-get install -y -q libb64-0d >&2; fi
fi
cudart_dir() { "$VPY" -c 'import nvidia.cuda_runtime as m, os; print(os.path.join(os.path.dirname(m.__file__), "lib"))' 2>/dev/null; }
if ! cudart=$(cudart_dir) || [ ! -e "$cudart/libcudart.so.12" ]; then
    echo "installing $CUDART_PIN (pip) for perf_analyzer" >&2
    "$VPY" -m pip install -q "$CUDART_PIN" >&2
    cudart=$(cudart_dir)
fi
export LD_LIBRARY_PATH="$cudart${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# --- a server to measure ---------------------------------------------------------------------
server_pid=""
cleanup() {
    if [ -n "$server_pid" ]; then kill -TERM "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
}
trap cleanup EXIT
if ! "$VPY" - "$URL" <<'EOF' 2>/dev/null
import sys, tritonclient.grpc as g
sys.exit(0 if g.InferenceServerClient(sys.argv[1]).is_model_ready("ensemble") else 1)
EOF
then
    free_port() { "$VPY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
    echo "no server at $URL: starting one (scripts/serve.sh) on free ports" >&2
    grpc_port=$(free_port); URL=127.0.0.1:$grpc_port
    HOST=127.0.0.1 GRPC_PORT=$grpc_port HTTP_PORT=$(free_port) METRICS_PORT=$(free_port) \
        bash "$root/scripts/serve.sh" >"${TMPDIR:-/tmp}/perf_analyzer_server.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 300); do
        "$VPY" -c "import sys, tritonclient.grpc as g; sys.exit(0 if g.InferenceServerClient('$URL').is_model_ready('ensemble') else 1)" \
            2>/dev/null && break
        kill -0 $server_pid 2>/dev/null || { cat "${TMPDIR:-/tmp}/perf_analyzer_server.log" >&2; exit 1; }
        sleep 1
    done
fi

# --- run ---------------------------------------------------------------------------------------
out=${OUT_DIR:-$(mktemp -d)}
mkdir -p "$out"
"$VPY" - "$out/input.json" "$PROMPT" "$MAX_TOKENS" <<'EOF'
import json, sys
path, prompt, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
# The input-data file genai-perf would send: stream, exclude the prompt, count output tokens.
data = {"data": [{"text_input": [prompt], "max_tokens": [max_tokens], "stream": [True],
                  "exclude_input_in_output": [True], "return_num_output_tokens": [True]}]}
json.dump(data, open(path, "w"), indent=1)
EOF
echo "perf_analyzer: ensemble at $URL, streaming, concurrency $CONCURRENCY, $MAX_TOKENS tokens/request" >&2
profiles=()
for c in $CONCURRENCY; do
    n=${REQUESTS:-$((8 * c + 8))}
    rm -f "$out/profile-c$c.json"  # perf_analyzer refuses to overwrite it
    "$PA" -m ensemble -i grpc -u "$URL" --streaming --input-data "$out/input.json" \
        --concurrency-range "$c" --request-count "$n" \
        --profile-export-file "$out/profile-c$c.json" -f "$out/perf_analyzer-c$c.csv" \
        ${PA_ARGS:-} >"$out/perf_analyzer-c$c.log" 2>&1 || { cat "$out/perf_analyzer-c$c.log" >&2; exit 1; }
    profiles+=("$out/profile-c$c.json")
done
"$VPY" "$root/bench/perf_analyzer_report.py" "${profiles[@]}" --json "$out/summary.json"
echo "(perf_analyzer logs, CSVs, profile exports and summary.json in $out)" >&2
