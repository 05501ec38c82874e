"""Deployment files parse, and every LLM_* variable they set names a real model parameter."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _generation_params() -> set[str]:
    text = (ROOT / "model_repository" / "generation" / "config.pbtxt").read_text()
    return set(re.findall(r'key:\s*"([a-z_]+)"', text))


def _llm_env_names(doc) -> set[str]:
    found = set()
    if isinstance(doc, dict):
        for k, v in doc.items():
            if isinstance(k, str) and k.startswith("LLM_"):
                found.add(k)
            if k == "name" and isinstance(v, str) and v.startswith("LLM_"):
                found.add(v)
            found |= _llm_env_names(v)
    elif isinstance(doc, list):
        for v in doc:
            found |= _llm_env_names(v)
    return found


def test_env_overrides_name_generation_parameters():
    params = _generation_params()
    docs = [yaml.safe_load((ROOT / "docker-compose.yml").read_text())]
    for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml")):
        docs += list(yaml.safe_load_all(path.read_text()))
    names = set().union(*(_llm_env_names(d) for d in docs)) - {"LLM_PYTHON_PATH"}
    assert names, "manifests should configure the model through LLM_* variables"
    unknown = {n for n in names if n[len("LLM_"):].lower() not in params}
    assert not unknown, f"{unknown} match no parameter in generation/config.pbtxt ({sorted(params)})"


def test_k8s_deployment_probes_and_gpu():
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text()))
    dep = next(d for d in docs if d["kind"] == "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert "generate" in " ".join(c["livenessProbe"]["exec"]["command"]), "liveness must send a real request"
