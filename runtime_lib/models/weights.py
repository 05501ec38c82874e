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

from ..config import FP8_DTYPE

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
    Raises ValueError naming every missing and every unexpected weight before reading any.

    FP8 checkpoints (AutoFP8's `quant_method: fp8`, fbgemm_fp8, compressed-tensors, ModelOpt) store a
    projection's `weight` as e4m3 next to its `weight_scale`, one scalar per tensor or one per
    output channel: the fused weight is yielded as e4m3 with `<name>_scale`, one fp32 scale per
    row (what layers/fp8_linear.Fp8Linear holds). Static `input_scale`s and KV-cache scales are
    not used: activations are scaled per token at run time and the FP8 KV cache uses scale 1."""
    normalize = normalize or {}
    available = {normalize.get(n, n): n for n in ckpt.names()}
    required = {src for spec in weight_map.values() for src in spec.sources}
    fp8 = {src for src in required if src.endswith(".weight") and src + "_scale" in available}
    required |= {src + "_scale" for src in fp8}
    ignored = tuple(ignored) + ((r"\.(input_scale|input_scale_ub|k_scale|v_scale|kv_scale)$",) if fp8 else ())
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
        if any(src in fp8 for src in spec.sources):
            yield from _fp8_weight_and_scale(ckpt, available, name, spec, fp8)
            continue
        tensors = [ckpt.get(available[src]) for src in spec.sources]
        if spec.transpose:
            tensors = [t.t() for t in tensors]
        yield name, (tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)).contiguous()


def _fp8_weight_and_scale(ckpt: HFCheckpoint, available: dict[str, str], name: str, spec: WeightSpec,
                          fp8: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """One fused FP8 projection: its e4m3 rows concatenated, and every row's scale."""
    if spec.transpose or not all(src in fp8 for src in spec.sources):
        raise ValueError(f"{name}: FP8 checkpoints are supported for untransposed projections whose parts are "
                         f"all FP8 with a weight_scale; got {list(spec.sources)}")
    weights, scales = [], []
    for src in spec.sources:
        w, s = ckpt.get(available[src]), ckpt.get(available[src + "_scale"]).float().reshape(-1)
        if w.dtype != FP8_DTYPE:
            raise ValueError(f"{src} has a weight_scale but is {w.dtype}, not float8_e4m3fn")
        if s.numel() not in (1, w.shape[0]):
            raise ValueError(f"{src}_scale has {s.numel()} values; supported: one per tensor or one per output "
                             f"channel ({w.shape[0]}), not block-wise scales")
        weights.append(w.view(torch.uint8))
        scales.append(s.expand(w.shape[0]))
    yield name, torch.cat(weights, dim=0).view(FP8_DTYPE).contiguous()
    yield name + "_scale", torch.cat(scales).contiguous()


def read_engine_weights(engine_dir: str | Path) -> dict[str, torch.Tensor]:
    path = Path(engine_dir) / ENGINE_WEIGHTS_FILE
    if not path.is_file():
        raise ValueError(f"engine directory {engine_dir} has no {ENGINE_WEIGHTS_FILE}")
    from safetensors.torch import load_file

    return load_file(str(path))


__all__ = ["WeightSpec", "HFCheckpoint", "convert_hf_weights", "read_engine_weights",
           "ENGINE_WEIGHTS_FILE"]
