"""LoRA adapters (Hugging Face PEFT checkpoints) served next to the base model, several in one
batch: TensorRT-LLM's `LoraManager` / `lora_uids` and the per-row adapters of multi-LoRA servers.

A PEFT adapter adds `scaling * B @ A` to some projections (`A` (r, in), `B` (out, r), `scaling`
= lora_alpha / r, or / sqrt(r) with rsLoRA). Our projections are fused (q|k|v, gate|up), so an
adapter is stored per fused module: the A of its parts stacked, and B block-diagonal with the
scaling folded in; a part the adapter leaves out contributes nothing. A step whose tokens use
several adapters adds, for each adapter, (x[rows] @ A.T) @ B.T to the rows that use it; the
base weights are never modified, so rows without an adapter and other adapters' rows are
untouched. Steps with adapters run eagerly (their row grouping changes every step).
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig

# PEFT target module -> (our fused module under layers.{i}, index of its part in the fusion)
_PARTS = {"q_proj": ("self_attn.qkv_proj", 0), "k_proj": ("self_attn.qkv_proj", 1), "v_proj": ("self_attn.qkv_proj", 2),
          "o_proj": ("self_attn.o_proj", 0), "gate_proj": ("mlp.gate_up_proj", 0), "up_proj": ("mlp.gate_up_proj", 1),
          "down_proj": ("mlp.down_proj", 0)}
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")
LORA_FAMILIES = ("llama", "qwen2")
NO_ADAPTER = ("-1", "None", None)  # TRT-LLM's lora_uids entry for a row without an adapter


@dataclass(frozen=True)
class LoraAdapter:
    """One adapter: our fused module name ("layers.0.self_attn.qkv_proj") -> (A (R, in),
    B (out, R) with the scaling folded in)."""

    uid: str
    rank: int
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]


def _part_sizes(config: ModelConfig) -> dict[str, list[int]]:
    q, kv = config.num_heads * config.head_size, config.num_kv_heads * config.head_size
    return {"self_attn.qkv_proj": [q, kv, kv], "self_attn.o_proj": [config.hidden_size],
            "mlp.gate_up_proj": [config.intermediate_size] * 2, "mlp.down_proj": [config.hidden_size]}


def load_hf_lora(path: str | Path, config: ModelConfig, uid: str, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None) -> LoraAdapter:
    """A PEFT LoRA directory (adapter_config.json + adapter_model.safetensors) for `config`'s model.
    Raises ValueError naming what it cannot serve (another family, DoRA, fan_in_fan_out,
    trained biases or modules_to_save, a module outside the decoder's projections)."""
    from safetensors.torch import load_file

    path = Path(path)
    if config.family not in LORA_FAMILIES:
        raise ValueError(f"LoRA adapters are supported for the {list(LORA_FAMILIES)} families, not {config.family!r}")
    cfg_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_file.is_file() or not weights_file.is_file():
        raise ValueError(f"LoRA adapter {str(path)!r} needs adapter_config.json and adapter_model.safetensors "
                         f"(a PEFT LoRA directory)")
    cfg = json.loads(cfg_file.read_text())
    for key, ok in (("peft_type", lambda v: v in (None, "LORA")), ("use_dora", lambda v: not v),
                    ("fan_in_fan_out", lambda v: not v), ("bias", lambda v: v in (None, "none")),
                    ("modules_to_save", lambda v: not v)):
        if not ok(cfg.get(key)):
            raise ValueError(f"LoRA adapter {str(path)!r}: {key}={cfg.get(key)!r} is not supported")
    r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    dtype = dtype or config.torch_dtype
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in load_file(str(weights_file)).items():
        m = _KEY.search(name)
        if m is None or m.group(2) not in _PARTS:
            raise ValueError(f"LoRA adapter {str(path)!r}: weight {name!r} is not a lora_A/lora_B of the decoder "
                             f"projections {sorted(_PARTS)}")
        layer = int(m.group(1))
        if not 0 <= layer < config.num_layers:
            raise ValueError(f"LoRA adapter {str(path)!r}: {name!r} names layer {layer}; the model has "
                             f"{config.num_layers}")
        parts.setdefault((layer, m.group(2)), {})[m.group(3)] = tensor.float()
    sizes = _part_sizes(config)
    fused: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    for (layer, part), ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"LoRA adapter {str(path)!r}: layer {layer} {part} has lora_{''.join(ab)} only")
        module, index = _PARTS[part]
        a, b = ab["A"], ab["B"]
        rows, cols = sizes[module][index], config.intermediate_size if part == "down_proj" else (
            config.num_heads * config.head_size if part == "o_proj" else config.hidden_size)
        if a.shape[1] != cols or b.shape[0] != rows or a.shape[0] != b.shape[1]:
            raise ValueError(f"LoRA adapter {str(path)!r}: layer {layer} {part} has A {tuple(a.shape)} and B "
                             f"{tuple(b.shape)}; the model needs A (r, {cols}) and B ({rows}, r)")
        fused.setdefault(f"layers.{layer}.{module}", []).append((index, a, b * scaling))
    weights = {}
    for module, items in fused.items():
        out_sizes = sizes[module.split(".", 2)[2]]
        offsets = [sum(out_sizes[:i]) for i in range(len(out_sizes))]
        a_all = torch.cat([a for _, a, _ in items])                                # (R, in)
        b_all = torch.zeros(sum(out_sizes), a_all.shape[0])                        # (out, R), block-diagonal
        col = 0
        for index, a, b in items:
            b_all[offsets[index]:offsets[index] + b.shape[0], col:col + a.shape[0]] = b
            col += a.shape[0]
        weights[module] = (a_all.to(device, dtype), b_all.to(device, dtype))
    return LoraAdapter(uid=uid, rank=r, weights=weights)


class LoraManager:
    """The adapters a runner serves, by uid (TensorRT-LLM's LoraManager: `load_from_ckpt` names
    the adapters of `model_dirs` "0", "1", ... unless given `uids`)."""

    def __init__(self) -> None:
        self._adapters: dict[str, LoraAdapter] = {}

    def load_from_ckpt(self, model_dirs: str | Path | Sequence[str | Path], model_config: ModelConfig,
                       runtime_mapping: object = None, uids: Sequence[str] | None = None,
                       ckpt_source: str = "hf", device: str | torch.device = "cpu",
                       dtype: torch.dtype | None = None) -> list[str]:
        if ckpt_source != "hf":
            raise ValueError(f"ckpt_source must be 'hf' (PEFT adapter directories), got {ckpt_source!r}")
        dirs = [model_dirs] if isinstance(model_dirs, str | Path) else list(model_dirs)
        uids = [str(len(self._adapters) + i) for i in range(len(dirs))] if uids is None else [str(u) for u in uids]
        if len(uids) != len(dirs) or any(u in NO_ADAPTER or u in self._adapters for u in uids):
            raise ValueError(f"uids must be one new id per adapter directory ({len(dirs)}), not '-1', got {uids}")
        for uid, d in zip(uids, dirs):
            self._adapters[uid] = load_hf_lora(d, model_config, uid, device, dtype)
        return uids

    @property
    def lora_uids(self) -> list[str]:
        return list(self._adapters)

    def adapters_for(self, lora_uids: Sequence[str | int | None], batch_size: int) -> list[LoraAdapter | None]:
        """One adapter (or None: '-1') per prompt; errors name the unknown uid."""
        if len(lora_uids) != batch_size:
            raise ValueError(f"lora_uids must have one entry per prompt ({batch_size}), got {len(lora_uids)}")
        out = []
        for u in lora_uids:
            key = None if u is None else str(u)
            if key in NO_ADAPTER:
                out.append(None)
            elif key in self._adapters:
                out.append(self._adapters[key])
            else:
                raise ValueError(f"lora_uids has {key!r}, which is not a loaded adapter; loaded: {self.lora_uids} "
                                 f"('-1': none)")
        return out


@dataclass
class LoraBatch:
    """One step's adapters: for each adapter in use, the flattened token indices that use it."""

    groups: list[tuple[LoraAdapter, torch.Tensor]]

    @classmethod
    def build(cls, row_adapters: Sequence[LoraAdapter | None], row_tokens: Sequence[int],
              device: str | torch.device) -> LoraBatch | None:
        """`row_adapters[i]` serves the `row_tokens[i]` tokens of step row i (rows in step order);
        None when no row has an adapter."""
        index: dict[str, tuple[LoraAdapter, list[int]]] = {}
        start = 0
        for adapter, n in zip(row_adapters, row_tokens):
            if adapter is not None:
                index.setdefault(adapter.uid, (adapter, []))[1].extend(range(start, start + n))
            start += n
        if not index:
            return None
        return cls([(a, torch.tensor(rows, dtype=torch.long, device=device)) for a, rows in index.values()])

    def apply(self, module: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (T, out) of `module` over x (T, in), plus each adapter's update on its rows."""
        for adapter, rows in self.groups:
            ab = adapter.weights.get(module)
            if ab is not None:
                a, b = ab
                y = y.index_add(0, rows, (x.index_select(0, rows) @ a.t()) @ b.t())
        return y


__all__ = ["LoraAdapter", "LoraBatch", "LoraManager", "load_hf_lora", "LORA_FAMILIES", "NO_ADAPTER"]
