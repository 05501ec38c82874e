"""Rotary position embeddings (RoPE) for flattened tokens at absolute positions.

`inv_freq` is computed exactly as transformers' `modeling_rope_utils` does for the
`rope_type`s we support (default, linear, dynamic NTK, llama3), so fp32 logits match HF.
cos/sin for every position up to the model's limit are precomputed once (fp32) and indexed
by position: a decode step is one gather, with no host sync and a static shape.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


def _base_inv_freq(theta: float, dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))  # (d/2,)


def compute_inv_freq(head_size: int, rope_theta: float, rope_scaling: dict[str, Any] | None,
                     max_position_embeddings: int, seq_len: int | None = None) -> torch.Tensor:
    """Inverse frequencies (head_size/2,) fp32 on CPU. `seq_len` only matters for dynamic NTK."""
    scaling = rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_scaling.rope_type {rope_type!r} is not supported; "
                         f"supported: {list(SUPPORTED_ROPE_TYPES)}")
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"rope_scaling.partial_rotary_factor must be 1.0, "
                         f"got {scaling['partial_rotary_factor']}")
    dim = head_size
    if rope_type == "default":
        return _base_inv_freq(rope_theta, dim)
    factor = float(scaling["factor"])
    if rope_type == "linear":
        return _base_inv_freq(rope_theta, dim) / factor
    if rope_type == "dynamic":
        # NTK-aware base stretch once the sequence outgrows the trained context.
        seq_len = max(seq_len or max_position_embeddings, max_position_embeddings)
        base = rope_theta * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim)
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    inv_freq = _base_inv_freq(rope_theta, dim)
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (T, heads, d); cos/sin: (T, d/2) in x's dtype. HF's rotate_half convention."""
    x1, x2 = x.chunk(2, dim=-1)                                        # (T, heads, d/2) each
    cos, sin = cos[:, None, :], sin[:, None, :]                        # (T, 1, d/2)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_size: int, max_position_embeddings: int, rope_theta: float = 10000.0,
                 rope_scaling: dict[str, Any] | None = None, max_seq_len: int | None = None) -> None:
        super().__init__()
        if head_size % 2:
            raise ValueError(f"head_size must be even for rotary embeddings, got {head_size}")
        self.head_size = head_size
        self.rope_theta = rope_theta
        self.rope_scaling = dict(rope_scaling) if rope_scaling else None
        self.max_position_embeddings = max_position_embeddings
        scaling = self.rope_scaling or {}
        self.is_dynamic = scaling.get("rope_type", scaling.get("type")) == "dynamic"
        inv_freq = compute_inv_freq(head_size, rope_theta, self.rope_scaling, max_position_embeddings)
        # The cache is built on CPU explicitly so the module can be constructed under
        # `torch.device("meta")` (weights loaded later with assign=True) and moved with `.to`.
        # Linear scaling exists to run past the trained context, so cover factor x that.
        stretch = float(scaling.get("factor", 1.0)) if scaling.get("rope_type") == "linear" else 1.0
        num_positions = max(int(max_position_embeddings * stretch), max_seq_len or 0)
        freqs = torch.outer(torch.arange(num_positions, device="cpu").float(), inv_freq)  # (P, d/2)
        self.register_buffer("cos_cache", freqs.cos(), persistent=False)
        self.register_buffer("sin_cache", freqs.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                max_seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (T,) absolute; q: (T, h, d), k: (T, kvh, d). `max_seq_len` (a host int,
        the longest kv length this step) selects the dynamic-NTK frequencies."""
        if self.is_dynamic and max_seq_len is not None and max_seq_len > self.max_position_embeddings:
            # As transformers: frequencies follow the longest sequence in this forward.
            inv_freq = compute_inv_freq(self.head_size, self.rope_theta, self.rope_scaling,
                                        self.max_position_embeddings, seq_len=max_seq_len)
            freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]  # (T, d/2)
            cos, sin = freqs.cos(), freqs.sin()
        else:
            cos, sin = self.cos_cache[positions], self.sin_cache[positions]       # (T, d/2)
        # HF casts cos/sin to the activation dtype before rotating; do the same for parity.
        return (apply_rotary(q, cos.to(q.dtype), sin.to(q.dtype)),
                apply_rotary(k, cos.to(k.dtype), sin.to(k.dtype)))


__all__ = ["RotaryEmbedding", "compute_inv_freq", "apply_rotary", "SUPPORTED_ROPE_TYPES"]
