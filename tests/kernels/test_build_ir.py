"""The kernels' Triton front end (type checks, constexpr branches) accepts them for an sm_90
target: errors that the interpreter never raises and that otherwise first show on the GPU.
Runs build_ir.py in a child process without TRITON_INTERPRET (conftest.py sets it here)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_kernel_variants_build_their_ir_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("build_ir.py"))], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    # qkv_rope_kv: attend x window x cache dtype; rope_kv into FP8; decode: partitions x mixed x
    # (bf16, FP8, FP8 with fp16 products); small_linear over FP8 weights: rows x prologue.
    assert len(lines) == 8 + 1 + 12 + 4 and all("chars of TTIR" in line for line in lines), proc.stdout
