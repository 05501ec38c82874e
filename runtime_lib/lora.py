"""LoRA adapters (Hugging Face PEFT checkpoints) served next to the base model, several in one
batch: TensorRT-LLM's `LoraManager` / `lora_uids` and the per-row adapters of multi-LoRA servers.

A PEFT adapter adds `scaling * B @ A` to some projections (`A` (r, in), `B` (out, r), `scaling`
= lora_alpha / r, or / sqrt(r) with rsLoRA). Our projections are fused (q|k|v, gate|up), so an
adapter is stored per fused module: the A of its parts stacked, and B block-diagonal with the
scaling folded in; a part the adapter leaves out contributes nothing. A step whose tokens use
several adapters adds, for each adapter, (x[rows] @ A.T) @ B.T to the rows that use it; the
base weights are never modified, so rows without an adapter and other adapters' rows are
untouched. That is the eager path (`LoraBatch`); steps that replay CUDA graphs read the
adapters from fixed-shape device slots instead (`LoraSlots`).
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from .config import ModelConfig

_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")
LORA_FAMILIES = ("llama", "qwen2")
NO_ADAPTER = ("-1", "None", None)  # TRT-LLM's lora_uids entry for a row without an adapter
# TensorRT-LLM's LoRA module ids (its `lora_config` rows) -> the projection part each adapts.
TRTLLM_MODULE_IDS = {0: "qkv_proj", 1: "q_proj", 2: "k_proj", 3: "v_proj", 4: "o_proj", 5: "gate_proj",
                     6: "down_proj", 7: "up_proj"}


@dataclass(frozen=True)
class LoraAdapter:
    """One adapter: our fused module name ("layers.0.self_attn.qkv_proj") -> (A (R, in),
    B (out, R) with the scaling folded in)."""

    uid: str
    rank: int
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]


def _geometry(config: ModelConfig) -> dict[str, tuple[str, int, int, int]]:
    """Each part an adapter may target -> (our fused module, its first output row, its output
    rows, its input size)."""
    H, inter = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_size, config.num_kv_heads * config.head_size
    return {"q_proj": ("self_attn.qkv_proj", 0, q, H), "k_proj": ("self_attn.qkv_proj", q, kv, H),
            "v_proj": ("self_attn.qkv_proj", q + kv, kv, H), "qkv_proj": ("self_attn.qkv_proj", 0, q + 2 * kv, H),
            "o_proj": ("self_attn.o_proj", 0, H, q), "gate_proj": ("mlp.gate_up_proj", 0, inter, H),
            "up_proj": ("mlp.gate_up_proj", inter, inter, H), "down_proj": ("mlp.down_proj", 0, H, inter)}


def module_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """Each fused module adapters act on ("self_attn.qkv_proj", ...) -> (input size, output size)."""
    H, inter = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_size, config.num_kv_heads * config.head_size
    return {"self_attn.qkv_proj": (H, q + 2 * kv), "self_attn.o_proj": (q, H), "mlp.gate_up_proj": (H, 2 * inter),
            "mlp.down_proj": (inter, H)}


def _fuse(config: ModelConfig, parts: list[tuple[int, str, torch.Tensor, torch.Tensor]], uid: str, where: str,
          device: str | torch.device, dtype: torch.dtype | None) -> LoraAdapter:
    """(layer, part, A (r, in), B (out, r) already scaled) per adapted part -> a LoraAdapter
    per fused module: A stacked, B block-diagonal (zeros where a part is not adapted)."""
    geometry, shapes = _geometry(config), module_shapes(config)
    fused: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    seen: set[tuple[int, str]] = set()
    for layer, part, a, b in parts:
        if part not in geometry:
            raise ValueError(f"{where}: {part!r} is not one of the decoder projections {sorted(geometry)}")
        if not 0 <= layer < config.num_layers:
            raise ValueError(f"{where}: layer {layer} is outside the model's {config.num_layers} layers")
        if (layer, part) in seen:
            raise ValueError(f"{where}: layer {layer} {part} is given twice")
        seen.add((layer, part))
        module, row0, rows, cols = geometry[part]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != cols or b.shape[0] != rows or a.shape[0] != b.shape[1]:
            raise ValueError(f"{where}: layer {layer} {part} has A {tuple(a.shape)} and B {tuple(b.shape)}; the "
                             f"model needs A (r, {cols}) and B ({rows}, r)")
        fused.setdefault(f"layers.{layer}.{module}", []).append((row0, a.float(), b.float()))
    dtype = dtype or config.torch_dtype
    weights = {}
    for module, items in fused.items():
        a_all = torch.cat([a for _, a, _ in items])                                # (R, in)
        b_all = torch.zeros(shapes[module.split(".", 2)[2]][1], a_all.shape[0])   # (out, R), block-diagonal
        col = 0
        for row0, a, b in items:
            b_all[row0:row0 + b.shape[0], col:col + a.shape[0]] = b
            col += a.shape[0]
        weights[module] = (a_all.to(device, dtype), b_all.to(device, dtype))
    rank = max((a.shape[0] for _, _, a, _ in parts), default=0)
    return LoraAdapter(uid=uid, rank=rank, weights=weights)


def _check_family(config: ModelConfig) -> None:
    if config.family not in LORA_FAMILIES:
        raise ValueError(f"LoRA adapters are supported for the {list(LORA_FAMILIES)} families, not {config.family!r}")


def _peft_config(path: Path) -> tuple[dict, float]:
    """A PEFT LoRA directory's adapter_config.json and the scaling its updates get."""
    if not (path / "adapter_config.json").is_file() or not (path / "adapter_model.safetensors").is_file():
        raise ValueError(f"LoRA adapter {str(path)!r} needs adapter_config.json and adapter_model.safetensors "
                         f"(a PEFT LoRA directory)")
    cfg = json.loads((path / "adapter_config.json").read_text())
    r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    return cfg, alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def _peft_parts(path: Path, scaling: float, known: Sequence[str]) -> list[tuple[int, str, torch.Tensor, torch.Tensor]]:
    """(layer, part, A (r, in), B (out, r) times `scaling`) of every adapted part in `known`,
    in (layer, part) order."""
    from safetensors.torch import load_file

    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in load_file(str(path / "adapter_model.safetensors")).items():
        m = _KEY.search(name)
        if m is None or m.group(2) not in known:
            raise ValueError(f"LoRA adapter {str(path)!r}: weight {name!r} is not a lora_A/lora_B of the decoder "
                             f"projections {sorted(known)}")
        halves.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = tensor
    parts = []
    for (layer, part), ab in sorted(halves.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"LoRA adapter {str(path)!r}: layer {layer} {part} has lora_{''.join(ab)} only")
        parts.append((layer, part, ab["A"].float(), ab["B"].float() * scaling))
    return parts


def load_hf_lora(path: str | Path, config: ModelConfig, uid: str, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None) -> LoraAdapter:
    """A PEFT LoRA directory (adapter_config.json + adapter_model.safetensors) for `config`'s model.
    Raises ValueError naming what it cannot serve (another family, DoRA, fan_in_fan_out,
    trained biases or modules_to_save, a module outside the decoder's projections)."""
    path = Path(path)
    _check_family(config)
    cfg, scaling = _peft_config(path)
    for key, ok in (("peft_type", lambda v: v in (None, "LORA")), ("use_dora", lambda v: not v),
                    ("fan_in_fan_out", lambda v: not v), ("bias", lambda v: v in (None, "none")),
                    ("modules_to_save", lambda v: not v)):
        if not ok(cfg.get(key)):
            raise ValueError(f"LoRA adapter {str(path)!r}: {key}={cfg.get(key)!r} is not supported")
    parts = _peft_parts(path, scaling, list(_geometry(config)))
    return _fuse(config, parts, uid, f"LoRA adapter {str(path)!r}", device, dtype)


def lora_from_trtllm(weights: torch.Tensor, lora_config: torch.Tensor, config: ModelConfig, uid: str,
                     device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> LoraAdapter:
    """An adapter in TensorRT-LLM's request format (tensorrtllm_backend's `lora_weights` /
    `lora_config`, as `hf_lora_convert.py` writes them): config rows [module_id, layer, r], and
    weight rows holding A (r, in) then B (out, r) (scaling folded in) flattened, zero-padded."""
    where = f"LoRA task {uid}"
    _check_family(config)
    if (lora_config.dim() != 2 or lora_config.shape[1] not in (3, 4) or weights.dim() != 2
            or weights.shape[0] != lora_config.shape[0]):
        raise ValueError(f"{where}: lora_config must be [modules x layers, 3] and lora_weights [the same rows, "
                         f"r x in + out x r], got {list(lora_config.shape)} and {list(weights.shape)}")
    if lora_config.shape[1] == 4 and bool(lora_config[:, 3].any()):
        raise ValueError(f"{where}: DoRA adapters (lora_config's is_dora column) are not supported")
    geometry = _geometry(config)
    parts = []
    for i, (module_id, layer, r) in enumerate(lora_config[:, :3].tolist()):
        part = TRTLLM_MODULE_IDS.get(int(module_id))
        if part is None:
            raise ValueError(f"{where}: lora_config row {i} has module id {module_id}; supported: {TRTLLM_MODULE_IDS}")
        _, _, rows, cols = geometry[part]
        need = r * cols + rows * r
        if r < 1 or need > weights.shape[1]:
            raise ValueError(f"{where}: lora_config row {i} ({part}, layer {layer}, r={r}) needs {need} weight "
                             f"values; lora_weights rows hold {weights.shape[1]}")
        row = weights[i].float()
        parts.append((int(layer), part, row[:r * cols].view(r, cols), row[r * cols:need].view(rows, r)))
    return _fuse(config, parts, uid, where, device, dtype)


def peft_to_trtllm(path: str | Path, dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """A PEFT LoRA directory as TensorRT-LLM's request tensors (what its `hf_lora_convert.py`
    writes, without the leading batch dimension): `lora_weights` (rows, r x in + out x r) and
    `lora_config` (rows, 3) int32, one row per adapted (module, layer). For clients that upload
    an adapter with its first request."""
    path = Path(path)
    _, scaling = _peft_config(path)
    module_ids = {part: i for i, part in TRTLLM_MODULE_IDS.items()}
    rows, config = [], []
    for layer, part, a, b in _peft_parts(path, scaling, list(module_ids)):
        rows.append(torch.cat([a.flatten(), b.flatten()]))
        config.append([module_ids[part], layer, a.shape[0]])
    width = max(t.numel() for t in rows)
    weights = torch.stack([torch.nn.functional.pad(t, (0, width - t.numel())) for t in rows]).to(dtype)
    return weights, torch.tensor(config, dtype=torch.int32)


class LoraManager:
    """The adapters a runner serves, by uid (TensorRT-LLM's LoraManager: `load_from_ckpt` names
    the adapters of `model_dirs` "0", "1", ... unless given `uids`). Adapters `add`ed at run time
    (uploaded with requests) are kept up to `max_added`, least recently used evicted first, as
    TensorRT-LLM's LoRA cache does; loaded directories stay."""

    def __init__(self, max_added: int = 64) -> None:
        if max_added < 0:
            raise ValueError(f"max_added must be >= 0, got {max_added}")
        self._adapters: dict[str, LoraAdapter] = {}
        self._added: dict[str, None] = {}   # uids of added adapters, least recently used first
        self.max_added = max_added

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

    def add(self, adapter: LoraAdapter) -> None:
        """Serve `adapter` under its uid (replacing one of the same uid); may evict the least
        recently used added adapter (requests running on it keep their reference)."""
        if adapter.uid in NO_ADAPTER:
            raise ValueError(f"an adapter's uid must not be {adapter.uid!r} (that means 'no adapter')")
        if self.max_added == 0:
            raise ValueError("this server takes no LoRA uploads (max_lora_uploads=0); use preloaded adapters")
        if adapter.uid in self._adapters and adapter.uid not in self._added:
            raise ValueError(f"LoRA {adapter.uid!r} is a preloaded adapter; it cannot be replaced by an upload")
        self._added.pop(adapter.uid, None)
        self._added[adapter.uid] = None
        self._adapters[adapter.uid] = adapter
        while len(self._added) > self.max_added:
            oldest = next(iter(self._added))
            del self._added[oldest], self._adapters[oldest]

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
                if key in self._added:   # recently used: evicted last
                    self._added[key] = self._added.pop(key)
            else:
                raise ValueError(f"lora_uids has {key!r}, which is not a loaded adapter; loaded: {self.lora_uids} "
                                 f"('-1': none)")
        return out


class LoraUpdate(Protocol):
    """What a model's projections call with a step's adapters (LoraBatch, LoraSlotStep)."""

    def apply(self, module: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (T, out) of `module` (e.g. "layers.0.self_attn.qkv_proj") over x (T, in), plus the updates."""
        ...


class LoraBatch:
    """One step's adapters: step row i (rows in step order) serves `row_tokens[i]` tokens with
    `row_adapters[i]` (or none). The eager forward adds each adapter's update to its rows
    (`apply`); graph-replayed steps take the same batch as one slot id per token (`LoraSlots`)."""

    def __init__(self, row_adapters: Sequence[LoraAdapter | None], row_tokens: Sequence[int],
                 device: str | torch.device) -> None:
        self.row_adapters, self.row_tokens, self.device = list(row_adapters), list(row_tokens), device
        self._groups: list[tuple[LoraAdapter, torch.Tensor]] | None = None

    @classmethod
    def build(cls, row_adapters: Sequence[LoraAdapter | None], row_tokens: Sequence[int],
              device: str | torch.device) -> LoraBatch | None:
        """The step's batch; None when no row has an adapter."""
        if all(a is None for a in row_adapters):
            return None
        return cls(row_adapters, row_tokens, device)

    @property
    def adapters(self) -> list[LoraAdapter]:
        """The distinct adapters of the step, in first-use order."""
        return list({id(a): a for a in self.row_adapters if a is not None}.values())

    @property
    def groups(self) -> list[tuple[LoraAdapter, torch.Tensor]]:
        """(adapter, the flattened token indices that use it) per adapter in use; built once."""
        if self._groups is None:
            index: dict[int, tuple[LoraAdapter, list[int]]] = {}
            start = 0
            for adapter, n in zip(self.row_adapters, self.row_tokens):
                if adapter is not None:
                    index.setdefault(id(adapter), (adapter, []))[1].extend(range(start, start + n))
                start += n
            self._groups = [(a, torch.tensor(rows, dtype=torch.long, device=self.device))
                            for a, rows in index.values()]
        return self._groups

    def apply(self, module: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (T, out) of `module` over x (T, in), plus each adapter's update on its rows."""
        for adapter, rows in self.groups:
            ab = adapter.weights.get(module)
            if ab is not None:
                a, b = ab
                y = y.index_add(0, rows, (x.index_select(0, rows) @ a.t()) @ b.t())
        return y


# Each fused module -> the parts its slot holds (q|k|v: 3 ranks wide, gate|up: 2).
SLOT_PARTS = {"self_attn.qkv_proj": 3, "self_attn.o_proj": 1, "mlp.gate_up_proj": 2, "mlp.down_proj": 1}


class LoraSlots:
    """Adapters resident on the device for graph-replayed steps: `max_loras` slots, each up to
    `max_rank` per projection part. Per fused module, A of every slot stacked (S x W, in) and B
    side by side (out, S x W), W = parts x max_rank; a slot holds an adapter's fused A / B in
    its first rows / columns and zeros after them.

    A step gives each token a slot id (-1: none) in a static buffer; `LoraSlotStep.apply` adds
    ((x @ A_all.T) * mask) @ B_all.T, the mask keeping each token's own slot's columns. Shapes
    never depend on which adapters a step uses, so such steps replay CUDA graphs; the price is
    that every LoRA step computes all S slots (S x W extra columns a projection: with 4 slots of
    rank 16, ~8% of the 8B projections' FLOPs, 3% of their bytes). Adapters move in and out of
    slots least recently used first; a step that needs more adapters than slots, or an adapter
    of a higher rank, runs eagerly (`LoraBatch`)."""

    def __init__(self, config: ModelConfig, max_loras: int, max_rank: int, device: str | torch.device,
                 dtype: torch.dtype | None = None) -> None:
        if max_loras < 1 or max_rank < 1:
            raise ValueError(f"max_loras and max_lora_rank must be >= 1, got {max_loras} and {max_rank}")
        _check_family(config)
        self.max_loras, self.max_rank = max_loras, max_rank
        self.device, self.dtype = torch.device(device), dtype or config.torch_dtype
        io = module_shapes(config)
        self.width: dict[str, int] = {}
        self.weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in range(config.num_layers):
            for module, parts in SLOT_PARTS.items():
                name, (n_in, n_out), W = f"layers.{layer}.{module}", io[module], parts * max_rank
                self.width[name] = W
                self.weights[name] = (torch.zeros(max_loras * W, n_in, device=device, dtype=self.dtype),
                                      torch.zeros(n_out, max_loras * W, device=device, dtype=self.dtype))
        # Column c of a module of width W belongs to slot c // W.
        self.column_slot = {W: torch.arange(max_loras * W, device=device) // W for W in set(self.width.values())}
        self._held: dict[int, tuple[int, LoraAdapter]] = {}  # id(adapter) -> (slot, adapter), LRU first

    def fits(self, adapter: LoraAdapter) -> bool:
        return all(name in self.width and a.shape[0] <= self.width[name] for name, (a, _) in adapter.weights.items())

    def token_slots(self, batch: LoraBatch) -> torch.Tensor | None:
        """Each token's slot (T,) int64 on the device (-1: none), loading the step's adapters
        into slots (on the current stream, so ordered after steps still in flight); None when
        they do not fit (more adapters than slots, or a rank above max_rank)."""
        adapters = batch.adapters
        if len(adapters) > self.max_loras or not all(self.fits(a) for a in adapters):
            return None
        needed = {id(a) for a in adapters}
        free = sorted(set(range(self.max_loras)) - {slot for slot, _ in self._held.values()})
        for adapter in adapters:
            key = id(adapter)
            if key in self._held:
                self._held[key] = self._held.pop(key)  # most recently used
                continue
            if free:
                slot = free.pop(0)
            else:
                victim = next(k for k in self._held if k not in needed)
                slot = self._held.pop(victim)[0]
            self._load(slot, adapter)
            self._held[key] = (slot, adapter)  # holding the adapter keeps its id from being reused
        slots = []
        for adapter, n in zip(batch.row_adapters, batch.row_tokens):
            slots += [-1 if adapter is None else self._held[id(adapter)][0]] * n
        host = torch.tensor(slots, dtype=torch.int64)
        if self.device.type == "cuda":
            host = host.pin_memory()
        return host.to(self.device, non_blocking=True)

    def _load(self, slot: int, adapter: LoraAdapter) -> None:
        for name, (a_all, b_all) in self.weights.items():
            W = self.width[name]
            cols = slice(slot * W, (slot + 1) * W)
            a_all[cols].zero_()
            b_all[:, cols].zero_()
            ab = adapter.weights.get(name)
            if ab is not None:
                R = ab[0].shape[0]
                a_all[slot * W:slot * W + R].copy_(ab[0])
                b_all[:, slot * W:slot * W + R].copy_(ab[1])


class LoraSlotStep:
    """A step's view of `LoraSlots`: `token_slots` (T,) the static buffer the graph reads. Same
    `apply` as LoraBatch, built inside the (captured or compiled) forward."""

    def __init__(self, slots: LoraSlots, token_slots: torch.Tensor) -> None:
        self.slots = slots
        self._masks = {W: (col[None, :] == token_slots[:, None]).to(slots.dtype)        # (T, S x W)
                       for W, col in slots.column_slot.items()}

    def apply(self, module: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a, b = self.slots.weights[module]
        mask = self._masks[self.slots.width[module]]
        return y + ((x @ a.t()) * mask) @ b.t()


__all__ = ["LoraAdapter", "LoraBatch", "LoraManager", "LoraSlotStep", "LoraSlots", "LoraUpdate", "load_hf_lora",
           "lora_from_trtllm", "module_shapes", "peft_to_trtllm", "LORA_FAMILIES", "NO_ADAPTER", "SLOT_PARTS",
           "TRTLLM_MODULE_IDS"]
