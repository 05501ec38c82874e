"""Shared fixtures: tiny random checkpoints of real architectures, built offline once per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from runtime_lib.demo import FAMILIES, build_checkpoint

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """`make_checkpoint(family, **config_overrides) -> Path`, cached per argument set."""
    cache: dict[tuple, Path] = {}

    def make(family: str = "llama", **overrides) -> Path:
        key = (family, tuple(sorted(overrides.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"ckpt-{family}")
            cache[key] = build_checkpoint(out, family, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session", params=FAMILIES)
def any_family_checkpoint(request, make_checkpoint) -> tuple[str, Path]:
    return request.param, make_checkpoint(request.param)


@pytest.fixture(scope="session")
def llama_dir(make_checkpoint) -> Path:
    return make_checkpoint("llama")
