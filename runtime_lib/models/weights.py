"""Reading checkpoints and converting HF weight names to ours through a strict, explicit map.

Every model family declares `hf_weight_map(config) -> {our_name: WeightSpec}`; conversion
fails loudly on any HF weight the map does not consume and on any it needs but cannot find.
Tensors are read lazily (one at a time) so a large checkpoint is never held twice in memory.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

ENGINE_WEIGHTS_FILE = "rank0.safetensors"


@dataclass(frozen=True)
class WeightSpec:
    """One of our tensors = the HF `sources`, each optionally transposed (GPT-2's Conv1D
    stores (in, out)), concatenated along dim 0 (q|k|v, gate|up)."""

    sources: tuple[str, ...]
    transpose: bool = False


@dataclass
class HFCheckpoint:
    """The safetensors files of one HF checkpoint directory: name -> file, opened lazily."""

    model_dir: Path
    files: dict[str, Path] = field(default_factory=dict)  # tensor name -> file holding it

    @classmethod
    def open(cls, model_dir: str | Path) -> HFCheckpoint:
        model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {name: model_dir / fname for name, fname in weight_map.items()}
            for f in sorted(set(files.values())):
                if not f.is_file():
                    raise ValueError(f"{index.name} names shard {f.name}, which is missing from {model_dir}")
            return cls(model_dir, files)
        shards = sorted(model_dir.glob("*.safetensors"))
        if not shards:
            raise ValueError(f"no *.safetensors weights in {model_dir} (only safetensors checkpoints "
                             f"are supported; re-save .bin checkpoints with safe_serialization=True)")
        files: dict[str, Path] = {}
        for shard in shards:
            with safe_open(str(shard), framework="pt") as f:
                files.update({name: shard for name in f.keys()})
        return cls(model_dir, files)

    def names(self) -> set[str]:
        return set(self.files)

    def get(self, name: str) -> torch.Tensor:
        with safe_open(str(self.files[name]), framework="pt") as f:
            return f.get_tensor(name)


def convert_hf_weights(ckpt: HFCheckpoint, weight_map: dict[str, WeightSpec],
                       normalize: dict[str, str] | None = None,
                       ignored: tuple[str, ...] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (our_name, tensor) for every entry of `weight_map`, reading HF tensors lazily.

    `normalize` maps checkpoint names to the names the map uses (e.g. GPT-2 files that lack
    the `transformer.` prefix); `ignored` are regexes of checkpoint entries that are not
    weights (old rotary `inv_freq` buffers, GPT-2's causal-mask buffers, a tied lm_head copy).
    Raises ValueError naming every missing and every unexpected weight before reading any."""
    normalize = normalize or {}
    available = {normalize.get(n, n): n for n in ckpt.names()}
    required = {src for spec in weight_map.values() for src in spec.sources}
    missing = sorted(required - set(available))
    patterns = [re.compile(p) for p in ignored]
    unexpected = sorted(n for n in set(available) - required if not any(p.search(n) for p in patterns))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing weights {missing}")
        if unexpected:
            parts.append(f"unexpected weights {unexpected}")
        raise ValueError(f"checkpoint {ckpt.model_dir} does not match the model: " + "; ".join(parts))
    for name, spec in weight_map.items():
        tensors = [ckpt.get(available[src]) for src in spec.sources]
        if spec.transpose:
            tensors = [t.t() for t in tensors]
        yield name, (tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)).contiguous()


def read_engine_weights(engine_dir: str | Path) -> dict[str, torch.Tensor]:
    path = Path(engine_dir) / ENGINE_WEIGHTS_FILE
    if not path.is_file():
        raise ValueError(f"engine directory {engine_dir} has no {ENGINE_WEIGHTS_FILE}")
    from safetensors.torch import load_file

    return load_file(str(path))


__all__ = ["WeightSpec", "HFCheckpoint", "convert_hf_weights", "read_engine_weights",
           "ENGINE_WEIGHTS_FILE"]
