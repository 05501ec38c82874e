"""Model families and loading: `config.family` -> network class, HF checkpoint or engine
directory -> a ready `nn.Module` on the requested device and dtype.

Every model implements
    forward(input_ids (T,), positions (T,), kv_cache, meta: AttentionMetadata) -> hidden (T, H)
    compute_logits(hidden (N, H)) -> logits (N, V) float32
over tokens flattened across sequences, writing each layer's new K/V into `kv_cache[layer]`
(see runtime_lib/layers/attention.py for the paged layout).
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig, kv_cache_torch_dtype, str_dtype_to_torch, torch_dtype_to_str
from ..layers.fp8_linear import FP8_DTYPE, quantize_weight, swap_in_fp8_linears
from .gpt2 import GPT2LMHeadModel
from .llama import LlamaForCausalLM
from .qwen2 import Qwen2ForCausalLM
from .weights import ENGINE_WEIGHTS_FILE, HFCheckpoint, convert_hf_weights, read_engine_weights

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,   # Llama 2/3.x and Mistral
    "qwen2": Qwen2ForCausalLM,
    "gpt2": GPT2LMHeadModel,
}


def get_model_class(config: ModelConfig) -> type[nn.Module]:
    try:
        return MODEL_CLASSES[config.family]
    except KeyError:
        raise ValueError(f"model family {config.family!r} (architecture {config.architecture!r}) has no "
                         f"implementation; implemented: {sorted(MODEL_CLASSES)}") from None


def is_engine_dir(model_dir: str | Path) -> bool:
    """An engine directory (written by runtime_lib.build) has `runtime_lib_version` in config.json."""
    path = Path(model_dir) / "config.json"
    return path.is_file() and "runtime_lib_version" in json.loads(path.read_text())


def convert_checkpoint(model_dir: str | Path, config: ModelConfig) -> Iterable[tuple[str, torch.Tensor]]:
    """Lazily yield (our_name, tensor) from an HF checkpoint, fused and transposed, not yet cast.
    Raises ValueError naming missing/unexpected weights before any tensor is read."""
    cls = get_model_class(config)
    ckpt = HFCheckpoint.open(model_dir)
    return convert_hf_weights(ckpt, cls.hf_weight_map(config),
                              normalize=cls.hf_name_normalizer(ckpt.names()),
                              ignored=cls.hf_ignored_weights(config))


def build_model(config: ModelConfig, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                quantization: str | None = None) -> nn.Module:
    """Instantiate the network for `config` and load `weights` (our names) strictly.

    The module is built on the meta device and the weights are assigned, so no random init
    runs and a large model is never materialised twice. `quantization`: None / "auto" (the
    config's) or one of `QUANTIZATIONS`; with "fp8" the projections are `Fp8Linear`s and
    unquantized weights are quantized as they load, while an FP8 engine's are taken as stored."""
    torch_dtype = str_dtype_to_torch(dtype) if dtype is not None else config.torch_dtype
    quant = {} if quantization in (None, "auto") else {"quantization": quantization}
    config = dataclasses.replace(config, dtype=torch_dtype_to_str(torch_dtype), **quant)
    with torch.device("meta"):
        model = get_model_class(config)(config)
        if config.quantization == "fp8":
            swap_in_fp8_linears(model, cuda=torch.device(device).type == "cuda")
    expected = model.state_dict()
    items = weights.items() if isinstance(weights, Mapping) else weights
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for name, tensor in items:
        if name not in expected:
            unexpected.append(name)
            continue
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(expected[name].shape)}")
        want = expected[name].dtype
        if want == FP8_DTYPE and tensor.dtype != FP8_DTYPE:
            state[name], state[name + "_scale"] = quantize_weight(tensor.to(device))
        elif want == FP8_DTYPE or name.endswith(".weight_scale"):
            state[name] = tensor.to(device=device, dtype=want)
        elif tensor.dtype == FP8_DTYPE:
            raise ValueError(f"weight {name!r} is FP8 (an FP8 checkpoint, or an engine built with --quantization "
                             f"fp8): load it with quantization 'auto' or 'fp8', not {config.quantization!r}")
        else:
            state[name] = tensor.to(device=device, dtype=torch_dtype)
    missing = sorted(set(expected) - set(state))
    if missing or unexpected:
        parts = ([f"missing weights {missing}"] if missing else []) + \
                ([f"unexpected weights {sorted(unexpected)}"] if unexpected else [])
        raise ValueError(f"weights do not match {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True, assign=True)
    model.to(device)  # non-persistent buffers (RoPE tables) were built on CPU
    model.requires_grad_(False)
    return model.eval()


def load_model(model_dir: str | Path, config: ModelConfig | None = None, device: str | torch.device = "cpu",
               dtype: str | torch.dtype | None = None, quantization: str | None = None) -> nn.Module:
    """Load an HF checkpoint directory or an engine directory (runtime_lib.build) into our network.
    `dtype` and `quantization` default to the config's; the returned module's `.config` carries
    the ones used."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"model_dir {str(model_dir)!r} is not a directory")
    config = config or ModelConfig.from_dir(model_dir)
    if is_engine_dir(model_dir):
        weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]] = read_engine_weights(model_dir)
    else:
        weights = convert_checkpoint(model_dir, config)
    return build_model(config, weights, device=device, dtype=dtype, quantization=quantization)


def allocate_kv_cache(config: ModelConfig, num_blocks: int, block_size: int,
                      device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None) -> torch.Tensor:
    """Zeroed paged KV pool (num_layers, 2, num_blocks, block_size, num_kv_heads, head_size).
    Zeros, not empty: attention multiplies masked-out slots by 0, and 0 * NaN garbage is NaN.
    `dtype`: None / "auto" (the config's kv_cache_dtype), "fp8" (config.KV_CACHE_DTYPES) or a model dtype."""
    for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    torch_dtype = kv_cache_torch_dtype(dtype, config.kv_cache_torch_dtype)
    return torch.zeros(config.num_layers, 2, num_blocks, block_size, config.num_kv_heads, config.head_size,
                       device=device, dtype=torch_dtype)


__all__ = ["get_model_class", "load_model", "build_model", "convert_checkpoint", "allocate_kv_cache",
           "is_engine_dir", "MODEL_CLASSES", "ENGINE_WEIGHTS_FILE"]
