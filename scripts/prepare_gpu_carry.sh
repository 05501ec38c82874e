#!/usr/bin/env bash
# Build, on this (CPU) machine, what an end-to-end Triton run on the lent GPU host needs and
# cannot install there: the tritonserver from the nvidia-pytriton wheel trimmed to the Python
# 3.12 stub, the Python part of tritonclient, and cp312 wheels of numpy 1.26.4 (the 2.51
# Python backend needs numpy < 2) and python-rapidjson. Output: .cache/gpu_carry/ (~60 MB),
# carried with `run(carry=[".cache/gpu_carry"])`; bench/gpu_triton.sh unpacks it there.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=$root/.cache/gpu_carry
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    -d "$out" numpy==1.26.4 python-rapidjson==1.20
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_35_x86_64 \
    -d "$work" nvidia-pytriton==0.7.0
mkdir "$work/stage"
(cd "$work/stage" && unzip -q "$work"/nvidia_pytriton-0.7.0-*.whl 'pytriton/tritonserver/*' 'nvidia_pytriton.libs/*')
stubs=$work/stage/pytriton/tritonserver/python_backend_stubs
find "$stubs" -mindepth 1 -maxdepth 1 ! -name 3.12 -exec rm -rf {} +
rm -rf "$work/stage/pytriton/tritonserver/caches" "$work"/stage/nvidia_pytriton.libs/libpython3*
cp "$stubs/3.12/triton_python_backend_stub" "$work/stage/pytriton/tritonserver/backends/python/"
site=$("$root/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cp -r "$site/tritonclient" "$work/stage/"
rm -rf "$work"/stage/tritonclient/__pycache__
tar czf "$out/triton_gpu.tgz" -C "$work/stage" .
du -sh "$out"
