"""Feed-forward blocks: the gated MLP of Llama/Mistral/Qwen2 (one fused gate_up_proj) and
GPT-2's two-layer MLP, plus the activation functions named by HF's `hidden_act`."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from ..lora import LoraUpdate


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    # transformers' NewGELUActivation formula, spelled out so fp32 results match it exactly.
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": gelu_new,
    "gelu_fast": gelu_new,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"hidden_act {name!r} is not supported; supported: {sorted(ACTIVATIONS)}") from None


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate and up fused into one matmul. `lora_prefix`: the
    name LoRA adapters give this block's projections (runtime_lib/lora.py)."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "silu",
                 lora_prefix: str = "mlp") -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act = get_activation(hidden_act)
        self.lora_prefix = lora_prefix

    def forward(self, x: torch.Tensor, lora: LoraUpdate | None = None) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)                                 # (T, 2*I)
        if lora is not None:
            gate_up = lora.apply(f"{self.lora_prefix}.gate_up_proj", x, gate_up)
        gate, up = gate_up.split(self.intermediate_size, dim=-1)       # (T, I) each
        h = self.act(gate) * up
        y = self.down_proj(h)                                          # (T, H)
        return y if lora is None else lora.apply(f"{self.lora_prefix}.down_proj", h, y)


class MLP(nn.Module):
    """fc -> act -> proj, both with bias (GPT-2)."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "gelu_new") -> None:
        super().__init__()
        self.fc = nn.Linear(hidden_size, intermediate_size)
        self.proj = nn.Linear(intermediate_size, hidden_size)
        self.act = get_activation(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))                          # (T, I) -> (T, H)


__all__ = ["GatedMLP", "MLP", "get_activation", "gelu_new", "ACTIVATIONS"]
