"""HF checkpoint -> engine directory (TensorRT-LLM's `trtllm-build`, DESIGN §5).

    python -m runtime_lib.build --checkpoint <hf_dir> --output <engine_dir> [--dtype bf16]
        [--max-batch-size N] [--max-input-len N] [--max-seq-len N] [--tokens-per-block N] [--tp-size 1]
        [--kv-cache-dtype fp8] [--quantization fp8]

An engine directory holds `config.json` ({"runtime_lib_version", "model_config", "build_config"}),
`rank0.safetensors` (weights already in our names: fused, transposed, cast) and the tokenizer
files, so loading it is a strict read with no conversion.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import KV_CACHE_DTYPES, QUANTIZATIONS, ModelConfig, str_dtype_to_torch, torch_dtype_to_str
from .models import ENGINE_WEIGHTS_FILE, build_model, convert_checkpoint, is_engine_dir, read_engine_weights

RUNTIME_LIB_VERSION = "0.1.0"
# Build limits a caller may set; each is a ModelConfig field of the same name.
BUILD_LIMITS = ("max_batch_size", "max_beam_width", "max_input_len", "max_seq_len", "tokens_per_block", "tp_size")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


@dataclass
class Engine:
    """A built engine in memory: the config.json contents and the rank-0 weights (our names)."""

    config: dict[str, Any]
    weights: dict[str, torch.Tensor]

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_engine_config(dict(self.config["model_config"]))

    @property
    def build_config(self) -> dict[str, Any]:
        return dict(self.config.get("build_config", {}))

    def save(self, engine_dir: str | Path) -> Path:
        from safetensors.torch import save_file

        out = Path(engine_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file(self.weights, str(out / ENGINE_WEIGHTS_FILE), metadata={"format": "pt"})
        # config.json last: its presence is what marks a complete engine directory.
        (out / "config.json").write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        return out

    @classmethod
    def from_dir(cls, engine_dir: str | Path) -> Engine:
        engine_dir = Path(engine_dir)
        if not is_engine_dir(engine_dir):
            raise ValueError(f"{engine_dir} is not an engine directory (config.json without "
                             f"'runtime_lib_version'); build one with `python -m runtime_lib.build`")
        config = json.loads((engine_dir / "config.json").read_text())
        return cls(config, read_engine_weights(engine_dir))


def _validate_limits(config: ModelConfig, limits: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(limits) - set(BUILD_LIMITS))
    if unknown:
        raise ValueError(f"unknown build option(s) {unknown}; allowed: {list(BUILD_LIMITS)}")
    limits = {k: v for k, v in limits.items() if v is not None}
    for name, value in limits.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if limits.get("tp_size", 1) != 1:
        raise ValueError(f"tp_size > 1 is not supported yet (got tp_size={limits['tp_size']})")
    max_seq_len = limits.get("max_seq_len", config.max_seq_len)
    max_input_len = limits.get("max_input_len", min(config.max_input_len, max_seq_len))
    if max_input_len > max_seq_len:
        raise ValueError(f"max_input_len ({max_input_len}) must be <= max_seq_len ({max_seq_len})")
    if config.position_embedding_type == "learned_absolute" and max_seq_len > config.max_position_embeddings:
        raise ValueError(f"max_seq_len ({max_seq_len}) must be <= max_position_embeddings "
                         f"({config.max_position_embeddings}) for learned position embeddings")
    return {**limits, "max_seq_len": max_seq_len, "max_input_len": max_input_len}


def build(checkpoint_dir: str | Path, dtype: str | torch.dtype | None = None, kv_cache_dtype: str = "auto",
          quantization: str | None = None, **limits: Any) -> Engine:
    """Convert an HF checkpoint into an in-memory `Engine` (TRT-LLM's `tensorrt_llm.build`).
    `kv_cache_dtype="fp8"`: the engine's KV cache is e4m3 (TRT-LLM's `--kv_cache_dtype fp8`).
    `quantization="fp8"`: the projections are stored as e4m3 with per-channel scales, half the
    bytes (TRT-LLM's FP8 `quant_algo`; layers/fp8_linear.py); None: the checkpoint's (an FP8
    checkpoint stays FP8)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / "config.json").is_file():
        raise ValueError(f"checkpoint {str(checkpoint_dir)!r} is not a checkpoint directory (no config.json)")
    if is_engine_dir(checkpoint_dir):
        raise ValueError(f"checkpoint {str(checkpoint_dir)!r} is already an engine directory")
    hf_config = ModelConfig.from_dir(checkpoint_dir)
    torch_dtype = str_dtype_to_torch(dtype) if dtype is not None else hf_config.torch_dtype
    limits = _validate_limits(hf_config, limits)
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {list(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
    quantization = quantization or hf_config.quantization
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {list(QUANTIZATIONS)}, got {quantization!r}")
    if hf_config.quantization != "none" and quantization != hf_config.quantization:
        raise ValueError(f"checkpoint {str(checkpoint_dir)!r} is {hf_config.quantization}-quantized; build it with "
                         f"quantization {hf_config.quantization!r} (or leave it unset), not {quantization!r}")
    config = dataclasses.replace(hf_config, dtype=torch_dtype_to_str(torch_dtype), kv_cache_dtype=kv_cache_dtype,
                                 quantization=quantization, **limits)
    if quantization == "none":
        weights = {name: t.to(torch_dtype).contiguous() for name, t in convert_checkpoint(checkpoint_dir, config)}
    else:  # the loader quantizes as it assigns; its state dict is what an FP8 engine stores
        model = build_model(config, convert_checkpoint(checkpoint_dir, config), dtype=torch_dtype)
        weights = {name: t.contiguous() for name, t in model.state_dict().items()}
    build_config = {name: getattr(config, name) for name in BUILD_LIMITS}
    return Engine({"runtime_lib_version": RUNTIME_LIB_VERSION, "model_config": config.to_dict(),
                   "build_config": {**build_config, "dtype": config.dtype, "kv_cache_dtype": kv_cache_dtype,
                                    "quantization": quantization}},
                  weights)


def build_engine(checkpoint_dir: str | Path, output_dir: str | Path, dtype: str | torch.dtype | None = None,
                 kv_cache_dtype: str = "auto", quantization: str | None = None, **limits: Any) -> Path:
    """Build and write an engine directory (config.json, rank0.safetensors, tokenizer files)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise ValueError(f"checkpoint {str(checkpoint_dir)!r} does not exist or is not a directory")
    engine = build(checkpoint_dir, dtype, kv_cache_dtype, quantization, **limits)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (checkpoint_dir / name).is_file():
            shutil.copy2(checkpoint_dir / name, out / name)
    return engine.save(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m runtime_lib.build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="HF checkpoint directory (safetensors)")
    ap.add_argument("--output", required=True, help="engine directory to write")
    ap.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: the checkpoint's)")
    for name in BUILD_LIMITS:
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    ap.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                    help="auto: the weights' dtype; fp8: an e4m3 KV cache (scale 1, half the bytes)")
    ap.add_argument("--quantization", default=None, choices=QUANTIZATIONS,
                    help="fp8: e4m3 projection weights with per-channel scales, per-token activation scales "
                         "(default: the checkpoint's; an FP8 checkpoint stays FP8)")
    args = ap.parse_args(argv)
    limits = {name: getattr(args, name) for name in BUILD_LIMITS}
    try:
        out = build_engine(args.checkpoint, args.output, args.dtype, args.kv_cache_dtype, args.quantization,
                           **limits)
    except ValueError as exc:
        ap.error(str(exc))
    cfg = json.loads((out / "config.json").read_text())
    print(json.dumps({"engine_dir": str(out), **cfg["build_config"]}))


if __name__ == "__main__":
    main()
