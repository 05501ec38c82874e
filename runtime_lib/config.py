"""Validated configuration dataclasses: `ModelConfig` (what the network is) and
`SamplingConfig` (how to decode), named and defaulted as in TensorRT-LLM's runtime."""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def str_dtype_to_torch(dtype: str | torch.dtype) -> torch.dtype:
    """'bf16' / 'bfloat16' / torch.bfloat16 -> torch.bfloat16 (TRT-LLM's helper of the same name)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}") from None


# KV cache element types: the model's own ("auto") or 8-bit float. FP8 is e4m3 stored with a
# scale of 1 (values saturate at +-448), as vLLM's kv_cache_dtype="fp8" does without calibration:
# half the bytes of a bf16 cache for decode attention to read, twice the sequences in the pool.
KV_CACHE_DTYPES = ("auto", "fp8")
FP8_DTYPE = torch.float8_e4m3fn   # e4m3, for FP8 weights (layers/fp8_linear.py) and KV caches alike
FP8_MAX = 448.0                   # e4m3's largest finite value
FP8_KV_DTYPE = FP8_DTYPE
FP8_KV_MAX = FP8_MAX


# Weight quantization of the decoder's projections (layers/fp8_linear.py): "fp8" stores them as
# e4m3 with a scale per output channel and quantizes each token's activations on the fly.
QUANTIZATIONS = ("none", "fp8")


def hf_quantization(qc: dict[str, Any] | None) -> str:
    """An HF config's `quantization_config` -> one of QUANTIZATIONS. FP8 checkpoints load as they
    are stored (AutoFP8 / `quant_method: fp8`, compressed-tensors with 8-bit float weights);
    any other method fails here, naming it, rather than as a pile of unknown weight names."""
    if not qc:
        return "none"
    method = qc.get("quant_method")
    if method == "fbgemm_fp8":   # Meta's FP8 releases: per-channel weight scales, dynamic activations
        return "fp8"
    if method == "fp8":
        if qc.get("weight_block_size"):
            raise ValueError(f"block-wise FP8 checkpoints (quantization_config.weight_block_size="
                             f"{qc['weight_block_size']}) are not supported; per-tensor and per-channel are")
        return "fp8"
    if method == "compressed-tensors":
        groups = list((qc.get("config_groups") or {}).values())
        weights = [g.get("weights") or {} for g in groups]
        if weights and all(w.get("type") == "float" and w.get("num_bits") == 8
                           and w.get("strategy") in ("tensor", "channel") for w in weights):
            return "fp8"
        raise ValueError("compressed-tensors checkpoints are supported with FP8 weights (type float, 8 bits, "
                         f"strategy tensor or channel); got {weights}")
    raise ValueError(f"quantization_config.quant_method {method!r} is not supported; supported: 'fp8', "
                     f"'fbgemm_fp8' and 'compressed-tensors' FP8 checkpoints, or quantization='fp8' over a bf16 "
                     f"checkpoint")


def kv_cache_torch_dtype(kv_cache_dtype: str | torch.dtype | None, model_dtype: torch.dtype) -> torch.dtype:
    """The KV pool's torch dtype: None / "auto" -> `model_dtype`, "fp8" -> float8_e4m3fn, or any
    model dtype ('bf16', torch.float16, ...)."""
    if kv_cache_dtype is None or kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype in ("fp8", "float8_e4m3fn", FP8_KV_DTYPE):
        return FP8_KV_DTYPE
    try:
        return str_dtype_to_torch(kv_cache_dtype)
    except ValueError:
        raise ValueError(f"kv_cache_dtype must be one of {list(KV_CACHE_DTYPES)} or a model dtype "
                         f"({sorted(_DTYPES)}), got {kv_cache_dtype!r}") from None


def torch_dtype_to_str(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]


# HF `architectures[0]` -> our model family (runtime_lib/models/<family>.py).
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "GPT2LMHeadModel": "gpt2",
}


@dataclass
class ModelConfig:
    """Architecture and build limits of one model. Built from an HF `config.json`
    (`from_hf_config`) or from an engine directory's `config.json` (`from_engine_config`)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    intermediate_size: int
    max_position_embeddings: int = 2048
    hidden_act: str = "silu"
    norm_epsilon: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    position_embedding_type: str = "rope"  # "rope" | "learned_absolute"
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    dtype: str = "float32"
    # Build / runtime limits (TRT-LLM names).
    max_batch_size: int = 64
    max_beam_width: int = 4
    max_input_len: int | None = None
    max_seq_len: int | None = None
    tokens_per_block: int = 16
    remove_input_padding: bool = True
    paged_kv_cache: bool = True
    gather_context_logits: bool = False
    gather_generation_logits: bool = False
    tp_size: int = 1
    kv_cache_dtype: str = "auto"  # "auto" (= dtype) | "fp8": the KV pool's element type (see KV_CACHE_DTYPES)
    quantization: str = "none"    # "none" | "fp8": the projections' weights (see QUANTIZATIONS)

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture {self.architecture!r} is not supported; "
                f"supported: {sorted(SUPPORTED_ARCHITECTURES)}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_size", "intermediate_size", "max_batch_size", "max_beam_width",
                     "tokens_per_block"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        self.dtype = torch_dtype_to_str(str_dtype_to_torch(self.dtype))
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {list(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {list(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.max_seq_len is None:
            self.max_seq_len = self.max_position_embeddings
        if self.max_input_len is None:
            self.max_input_len = self.max_seq_len

    @property
    def family(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @property
    def torch_dtype(self) -> torch.dtype:
        return str_dtype_to_torch(self.dtype)

    @property
    def kv_cache_torch_dtype(self) -> torch.dtype:
        return kv_cache_torch_dtype(self.kv_cache_dtype, self.torch_dtype)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], **overrides: Any) -> ModelConfig:
        archs = hf.get("architectures") or []
        if not archs:
            raise ValueError("config.json has no 'architectures' entry; cannot tell the model family")
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"architecture {arch!r} is not supported; "
                             f"supported: {sorted(SUPPORTED_ARCHITECTURES)}")
        if SUPPORTED_ARCHITECTURES[arch] == "gpt2":
            hidden = hf["n_embd"]
            heads = hf["n_head"]
            fields = dict(
                vocab_size=hf["vocab_size"], hidden_size=hidden, num_layers=hf["n_layer"],
                num_heads=heads, num_kv_heads=heads, head_size=hidden // heads,
                intermediate_size=hf.get("n_inner") or 4 * hidden,
                max_position_embeddings=hf.get("n_positions", 1024),
                hidden_act=hf.get("activation_function", "gelu_new"),
                norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
                position_embedding_type="learned_absolute", tie_word_embeddings=True,
                qkv_bias=True)
        else:
            heads = hf["num_attention_heads"]
            # transformers 5 moves rope_theta/rope_scaling into `rope_parameters`.
            rope = dict(hf.get("rope_parameters") or {})
            theta = rope.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
            scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
            if scaling is not None:
                scaling = dict(scaling)
                scaling.setdefault("rope_type", scaling.get("type", "default"))
            fields = dict(
                vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                num_layers=hf["num_hidden_layers"], num_heads=heads,
                num_kv_heads=hf.get("num_key_value_heads") or heads,
                head_size=hf.get("head_dim") or hf["hidden_size"] // heads,
                intermediate_size=hf["intermediate_size"],
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                hidden_act=hf.get("hidden_act", "silu"),
                norm_epsilon=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
                rope_scaling=scaling, tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                qkv_bias=bool(hf.get("attention_bias", False)) or SUPPORTED_ARCHITECTURES[arch] == "qwen2",
                sliding_window=hf.get("sliding_window") if hf.get("use_sliding_window", True) else None)
        eos = hf.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        dtype = overrides.pop("dtype", None) or hf.get("dtype") or hf.get("torch_dtype") or "float32"
        fields["quantization"] = hf_quantization(hf.get("quantization_config"))
        return cls(architecture=arch, bos_token_id=hf.get("bos_token_id"), eos_token_id=eos,
                   pad_token_id=hf.get("pad_token_id"), dtype=dtype, **{**fields, **overrides})

    @classmethod
    def from_engine_config(cls, cfg: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(cfg) - known
        if unknown:
            raise ValueError(f"engine config.json has unknown fields {sorted(unknown)}")
        return cls(**cfg)

    @classmethod
    def from_dir(cls, model_dir: str | Path, **overrides: Any) -> ModelConfig:
        """Read `config.json` from an engine directory (has `runtime_lib_version`) or an HF checkpoint."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in {model_dir}")
        raw = json.loads(path.read_text())
        if "runtime_lib_version" in raw:
            raw = dict(raw["model_config"])
            raw.update(overrides)
            return cls.from_engine_config(raw)
        return cls.from_hf_config(raw, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_range(name: str, value: Any, lo: float | None, hi: float | None,
                 lo_open: bool = False, hi_open: bool = False) -> None:
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        bad = ((lo is not None and (v <= lo if lo_open else v < lo))
               or (hi is not None and (v >= hi if hi_open else v > hi)))
        if bad:
            lb = "(" if lo_open else "["
            rb = ")" if hi_open else "]"
            rng = f"{lb}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{rb}"
            raise ValueError(f"{name} must be in {rng}, got {v}")


@dataclass
class SamplingConfig:
    """Decoding parameters (TRT-LLM's `SamplingConfig`). Scalar fields apply to every row;
    fields marked per-row also accept a list with one value per batch entry.

    Defaults follow TRT-LLM: `top_k=1, top_p=0.0` is greedy; `top_k=0` disables top-k;
    `top_p=0.0` disables top-p.
    """

    end_id: int
    pad_id: int
    max_new_tokens: int = 20
    num_beams: int = 1
    num_return_sequences: int | None = None
    max_attention_window_size: int | None = None
    output_sequence_lengths: bool = False
    return_dict: bool = False
    stop_words_list: Any = None  # list[list[int]] per batch, or TRT-LLM's [B, 2, L] tensor
    bad_words_list: Any = None
    # per-row fields
    temperature: float | list[float] = 1.0
    top_k: int | list[int] = 1
    top_p: float | list[float] = 0.0
    min_p: float | list[float] = 0.0
    random_seed: int | list[int] | None = None
    length_penalty: float | list[float] = 1.0
    early_stopping: int | list[int] = 1
    repetition_penalty: float | list[float] = 1.0
    presence_penalty: float | list[float] = 0.0
    frequency_penalty: float | list[float] = 0.0
    min_length: int | list[int] = 1
    no_repeat_ngram_size: int | list[int] | None = None
    # outputs
    output_log_probs: bool = False
    output_cum_log_probs: bool = False
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.max_new_tokens is None or _as_list(self.max_new_tokens) != [int(self.max_new_tokens)] \
                or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        _check_range("num_beams", self.num_beams, 1, None)
        if self.num_return_sequences is not None:
            _check_range("num_return_sequences", self.num_return_sequences, 1, None)
            if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
                raise ValueError(f"num_return_sequences ({self.num_return_sequences}) must be <= "
                                 f"num_beams ({self.num_beams}) for beam search")
        _check_range("temperature", self.temperature, 0.0, None)
        _check_range("top_k", self.top_k, 0, None)
        _check_range("top_p", self.top_p, 0.0, 1.0)
        _check_range("min_p", self.min_p, 0.0, 1.0)
        _check_range("repetition_penalty", self.repetition_penalty, 0.0, None, lo_open=True)
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_range("min_length", self.min_length, 0, None)
        _check_range("early_stopping", self.early_stopping, 0, None)
        if self.no_repeat_ngram_size is not None:
            _check_range("no_repeat_ngram_size", self.no_repeat_ngram_size, 0, None)
        if self.random_seed is not None:
            _check_range("random_seed", self.random_seed, 0, 2**64 - 1)
        _check_range("end_id", self.end_id, -1, None)
        _check_range("pad_id", self.pad_id, -1, None)

    def update(self, **kwargs: Any) -> dict[str, Any]:
        """Set known fields, validate, and return the kwargs that are not fields (as TRT-LLM)."""
        known = {f.name for f in dataclasses.fields(self)}
        unused = {k: v for k, v in kwargs.items() if k not in known}
        for k, v in kwargs.items():
            if k in known:
                setattr(self, k, v)
        self.validate()
        return unused

    def copy(self) -> SamplingConfig:
        return copy.deepcopy(self)

    def per_row(self, name: str, batch_size: int) -> list[Any]:
        """Value of a per-row field expanded to `batch_size` rows."""
        value = getattr(self, name)
        if isinstance(value, torch.Tensor):
            value = value.tolist()
        if isinstance(value, (list, tuple)):
            if len(value) == 1:
                return list(value) * batch_size
            if len(value) != batch_size:
                raise ValueError(f"{name} has {len(value)} values for a batch of {batch_size}")
            return list(value)
        return [value] * batch_size


def _as_list(v: Any) -> list[Any]:
    return list(v) if isinstance(v, (list, tuple)) else [v]


__all__ = ["ModelConfig", "SamplingConfig", "str_dtype_to_torch", "torch_dtype_to_str", "kv_cache_torch_dtype",
           "SUPPORTED_ARCHITECTURES"]
