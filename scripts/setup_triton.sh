#!/usr/bin/env bash
# Make the tritonserver shipped in the nvidia-pytriton wheel usable with this venv's Python:
# the Python backend needs the stub built for this interpreter's version next to it.
set -euo pipefail
VPY=${1:-.venv/bin/python}
root=$("$VPY" -c 'import pathlib, pytriton; print(pathlib.Path(pytriton.__file__).parent / "tritonserver")')
ver=$("$VPY" -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')
stub="$root/python_backend_stubs/$ver/triton_python_backend_stub"
[ -f "$stub" ] || { echo "no Triton Python backend stub for Python $ver in $root" >&2; exit 1; }
install -m 755 "$stub" "$root/backends/python/triton_python_backend_stub"
