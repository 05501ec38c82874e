#!/usr/bin/env bash
# `make serve`: start tritonserver (from the nvidia-pytriton wheel in .venv) on model_repository/.
#
#   MODEL_DIR   HF checkpoint or runtime_lib engine dir (default: build ./demo_model, a tiny random Llama)
#   HOST        address to bind (default 127.0.0.1: local only)
#   HTTP_PORT / GRPC_PORT / METRICS_PORT   (default 8000 / 8001 / 8002)
#   LLM_*       any model parameter override, e.g. LLM_DEVICE=cuda LLM_DTYPE=bf16 (see config.pbtxt)
#   TRITON_ARGS extra tritonserver arguments
#
# Nothing is written into model_repository/: the models read their settings from these variables.
# The four models are loaded explicitly, so stray directories there (e.g. __pycache__) are ignored.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VPY=${VPY:-$root/.venv/bin/python}
HOST=${HOST:-127.0.0.1}
HTTP_PORT=${HTTP_PORT:-8000}
GRPC_PORT=${GRPC_PORT:-8001}
METRICS_PORT=${METRICS_PORT:-8002}
READY_TIMEOUT_S=${READY_TIMEOUT_S:-300}

if [ -z "${MODEL_DIR:-}" ]; then
    MODEL_DIR=$root/demo_model
    if [ ! -f "$MODEL_DIR/config.json" ]; then
        echo "MODEL_DIR is unset: building a tiny demo checkpoint in $MODEL_DIR" >&2
        (cd "$root" && "$VPY" -m runtime_lib.demo --output "$MODEL_DIR" >&2)
    fi
fi
MODEL_DIR=$(cd "$MODEL_DIR" && pwd)

triton_root=$("$VPY" -c 'import pathlib, pytriton; print(pathlib.Path(pytriton.__file__).parent / "tritonserver")')
site=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
[ -x "$triton_root/backends/python/triton_python_backend_stub" ] || {
    echo "no Python backend stub in $triton_root/backends/python: run 'make setup'" >&2; exit 1; }

# The stub's interpreter is isolated (PYTHONPATH is ignored); the models read this instead.
export LLM_PYTHON_PATH="$site:$root${LLM_PYTHON_PATH:+:$LLM_PYTHON_PATH}"
export LLM_MODEL_DIR="$MODEL_DIR"
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}

"$triton_root/bin/tritonserver" \
    --model-repository="$root/model_repository" \
    --backend-directory="$triton_root/backends" \
    --model-control-mode=explicit \
    --load-model=preprocessing --load-model=generation --load-model=postprocessing --load-model=ensemble \
    --http-address="$HOST" --http-port="$HTTP_PORT" \
    --grpc-address="$HOST" --grpc-port="$GRPC_PORT" \
    --metrics-address="$HOST" --metrics-port="$METRICS_PORT" \
    --allow-cpu-metrics=false \
    ${TRITON_ARGS:-} &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server' INT TERM

deadline=$((SECONDS + READY_TIMEOUT_S))
until [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$HOST:$HTTP_PORT/v2/health/ready" || true)" = 200 ]; do
    if ! kill -0 $server 2>/dev/null; then
        wait $server; echo "tritonserver exited before becoming ready" >&2; exit 1
    fi
    if [ $SECONDS -ge $deadline ]; then
        echo "tritonserver not ready after ${READY_TIMEOUT_S}s" >&2; kill -TERM $server; exit 1
    fi
    sleep 1
done

cat >&2 <<EOF

tritonserver is ready (model: $MODEL_DIR)
  HTTP     http://$HOST:$HTTP_PORT   (e.g. POST /v2/models/ensemble/generate)
  gRPC     $HOST:$GRPC_PORT
  metrics  http://$HOST:$METRICS_PORT/metrics
  try:     $VPY -m client "Once upon a time" --max-tokens 32 --stream --url $HOST:$GRPC_PORT
EOF
wait $server
