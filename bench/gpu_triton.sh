#!/usr/bin/env bash
# End-to-end on the lent GPU host: tritonserver (from .cache/gpu_carry, see
# scripts/prepare_gpu_carry.sh) serving a random-weight model of a real shape; streaming load
# at several concurrencies straight to `generation` and through `ensemble`.
#   SHAPE=llama-3.1-8b CONCURRENCY=1,8,32 bash bench/gpu_triton.sh
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SHAPE=${SHAPE:-llama-3.1-8b}
CONCURRENCY=${CONCURRENCY:-1,8,32}
PROMPT_LEN=${PROMPT_LEN:-128}
MAX_TOKENS=${MAX_TOKENS:-128}
REQS=${REQS:-3}
MODELS=${MODELS:-generation ensemble}
ENSEMBLE_INSTANCES=${ENSEMBLE_INSTANCES:-}   # instances of the ensemble's stub process (default: its config's)
OUT=${OUT:-$root/bench/results}
carry=$root/.cache/gpu_carry
work=${WORK:-${TMPDIR:-/tmp}/gpu_triton}
mkdir -p "$work" "$OUT"

[ -d "$work/tri" ] || { mkdir -p "$work/tri"; tar xzf "$carry/triton_gpu.tgz" -C "$work/tri"; }
[ -d "$work/py/numpy" ] || python3 -m pip install -q --no-deps --target "$work/py" "$carry"/*.whl
cp -r "$work/tri/tritonclient" "$work/py/" 2>/dev/null || true
model=$work/model_$SHAPE
[ -f "$model/config.json" ] || python3 "$root/bench/make_random_checkpoint.py" --shape "$SHAPE" --output "$model"

# A clean copy of the model repository (no __pycache__ that Triton would take for a model).
repo=$work/model_repository
rm -rf "$repo"; cp -r "$root/model_repository" "$repo"; find "$repo" -name __pycache__ -prune -exec rm -rf {} +
[ -z "$ENSEMBLE_INSTANCES" ] || sed -i "s/{ count: [0-9]* kind: KIND_CPU }/{ count: $ENSEMBLE_INSTANCES kind: KIND_CPU }/" \
    "$repo/ensemble/config.pbtxt"

export LLM_PYTHON_PATH="$work/py:$root"
export LLM_MODEL_DIR=$model LLM_DEVICE=cuda LLM_DTYPE=${LLM_DTYPE:-bfloat16}
export LLM_MAX_BATCH_SIZE=${LLM_MAX_BATCH_SIZE:-128}
export LLM_MAX_SEQ_LEN=${LLM_MAX_SEQ_LEN:-4096}
export LLM_COMPILE_DECODE=${LLM_COMPILE_DECODE:-true}
export TOKENIZERS_PARALLELISM=false
tri=$work/tri/pytriton/tritonserver
"$tri/bin/tritonserver" --model-repository="$repo" --backend-directory="$tri/backends" \
    --http-port=18000 --grpc-port=18001 --metrics-port=18002 --log-verbose=0 > "$OUT/tritonserver_$SHAPE.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null || true; wait $server 2>/dev/null || true' EXIT
t0=$SECONDS
until curl -fs localhost:18000/v2/health/ready >/dev/null 2>&1; do
    kill -0 $server 2>/dev/null || { tail -50 "$OUT/tritonserver_$SHAPE.log"; exit 1; }
    [ $((SECONDS - t0)) -lt 600 ] || { echo "server not ready"; tail -50 "$OUT/tritonserver_$SHAPE.log"; exit 1; }
    sleep 2
done
echo "server ready after $((SECONDS - t0)) s"
export PYTHONPATH="$work/py:$root"
for m in $MODELS; do
    python3 "$root/bench/stream_load.py" --url localhost:18001 --model $m --concurrency "$CONCURRENCY" \
        --prompt-len "$PROMPT_LEN" --max-tokens "$MAX_TOKENS" --requests-per-stream "$REQS" \
        --vocab 128000 --text-mode ids --label "$SHAPE" --output "$OUT"
done
curl -fs localhost:18002/metrics | grep -E '^llm_' | head -20 || true
