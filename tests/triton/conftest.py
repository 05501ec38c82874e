"""A real tritonserver (from the nvidia-pytriton wheel) on this repository's model_repository/,
started once per session on free localhost ports with a tiny Llama checkpoint, and helpers to
talk to it through real tritonclient gRPC/HTTP."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("preprocessing", "generation", "postprocessing", "ensemble")
# Small engine limits so the tests also see the pool drain back; plenty for the tiny model.
ENGINE_ENV = {"LLM_MAX_BATCH_SIZE": "8", "LLM_NUM_KV_BLOCKS": "256", "LLM_TOKENS_PER_BLOCK": "16",
              "LLM_DEVICE": "cpu", "LLM_CANCELLATION_CHECK_PERIOD_MS": "20"}


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.triton)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    model_dir: Path
    http_url: str
    grpc_url: str
    metrics_url: str
    log_path: Path
    lora_dir: Path | None = None   # generation's lora_dir: adapters "1" and "2" (lora_task_id)

    def metrics(self) -> dict[str, float]:
        """Triton's Prometheus metrics (name{labels} -> value), unlabelled names for ours."""
        text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        out = {}
        for line in text.splitlines():
            m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$", line)
            if m:
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
        return {k.removesuffix("{}"): v for k, v in out.items()}

    def wait_metric(self, name: str, predicate, timeout_s: float = 5.0) -> float:
        deadline = time.monotonic() + timeout_s
        value = None
        while time.monotonic() < deadline:
            value = self.metrics().get(name)
            if value is not None and predicate(value):
                return value
            time.sleep(0.05)
        raise AssertionError(f"metric {name} = {value} did not reach the expected value in {timeout_s}s")


@pytest.fixture(scope="session")
def triton_server(make_checkpoint, tmp_path_factory):
    try:
        import pytriton
    except ImportError:
        pytest.skip("nvidia-pytriton (tritonserver) is not installed")
    triton_root = Path(pytriton.__file__).parent / "tritonserver"
    binary = triton_root / "bin" / "tritonserver"
    if not (triton_root / "backends" / "python" / "triton_python_backend_stub").exists():
        pytest.skip("the Triton Python backend stub is not installed (run `make setup`)")
    from runtime_lib.demo import build_lora_adapter

    model_dir = make_checkpoint("llama")
    lora_dir = tmp_path_factory.mktemp("loras")
    build_lora_adapter(lora_dir / "1", model_dir, seed=1)
    build_lora_adapter(lora_dir / "2", model_dir, seed=2, r=2, targets=("k_proj", "up_proj", "down_proj"))
    ports = {name: _free_port() for name in ("http", "grpc", "metrics")}
    log_path = tmp_path_factory.mktemp("tritonserver") / "server.log"
    env = dict(os.environ, **ENGINE_ENV)
    env["LLM_PYTHON_PATH"] = os.pathsep.join([sysconfig.get_paths()["purelib"], str(ROOT)])
    env["LLM_MODEL_DIR"] = str(model_dir)
    env["LLM_LORA_DIR"] = str(lora_dir)
    env["TOKENIZERS_PARALLELISM"] = "false"
    cmd = [str(binary), f"--model-repository={ROOT / 'model_repository'}",
           f"--backend-directory={triton_root / 'backends'}",
           "--model-control-mode=explicit", *[f"--load-model={m}" for m in MODELS],
           "--http-address=127.0.0.1", f"--http-port={ports['http']}",
           "--grpc-address=127.0.0.1", f"--grpc-port={ports['grpc']}",
           "--metrics-address=127.0.0.1", f"--metrics-port={ports['metrics']}",
           "--allow-cpu-metrics=false", "--exit-timeout-secs=5"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(model_dir, f"127.0.0.1:{ports['http']}", f"127.0.0.1:{ports['grpc']}",
                    f"http://127.0.0.1:{ports['metrics']}/metrics", log_path, lora_dir)
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited ({proc.returncode}):\n{log_path.read_text()[-4000:]}")
            try:
                if urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"tritonserver not ready in 240 s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        try:  # stubs outlive a server that crashed: they share its process group, end them too
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if proc.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL):
            print(f"tritonserver exited with {proc.returncode}; log at {log_path}", file=sys.stderr)
