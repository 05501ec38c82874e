"""Normalisation layers: RMSNorm (Llama, Mistral, Qwen2) and LayerNorm (GPT-2), with the
same arithmetic as transformers so logits match it bit-for-bit in fp32."""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32 (bf16 squares overflow / lose precision), then back to the
        # input dtype *before* the weight multiply, exactly as transformers does.
        dtype = x.dtype
        xf = x.float()                                                  # (T, H)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` with weight and bias (GPT-2's ln_1 / ln_2 / ln_f)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__(hidden_size, eps=eps)


__all__ = ["RMSNorm", "LayerNorm"]
