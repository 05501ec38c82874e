"""FP8 (e4m3) weights for the decoder's projections (`quantization="fp8"`).

Each weight row (output channel) is stored as e4m3 with one fp32 scale, set once at load time;
each activation row (token) gets its own scale from its absolute maximum at run time ("dynamic",
no calibration), and one `torch._scaled_mm` multiplies the two on FP8 tensor cores, applying
both scales in its epilogue. This is vLLM's `quantization="fp8"` / TensorRT-LLM's FP8 with
per-channel weight and per-token activation scales. On an H100 FP8 tensor cores do twice the
FLOPs of bf16 and the weights are half the bytes, which is what a compute-bound offline step or
a bandwidth-bound batch-1 step needs. The embedding and the lm_head stay in the model dtype.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import FP8_DTYPE, FP8_MAX

_MIN_SCALE = 1e-12                 # an all-zero row keeps a finite scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (q (M, K) e4m3, scale (M, 1) fp32) with x ~= q * scale, one scale per row:
    the row's absolute maximum maps to 448, e4m3's largest value."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=_MIN_SCALE)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


class Fp8Linear(nn.Module):
    """y = x @ W.T (+ bias) with W (out, in) stored as e4m3 rows and `weight_scale` (out,) fp32.
    State-dict names `weight`, `weight_scale`, `bias`, as vLLM's and compressed-tensors' FP8
    checkpoints name them."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8_DTYPE))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        q, scale = quantize_rows(x.reshape(-1, self.in_features))
        if x.is_cuda:  # row-wise scales need a bf16 output there
            y = torch._scaled_mm(q, self.weight.t(), scale_a=scale, scale_b=self.weight_scale.view(1, -1),
                                 out_dtype=torch.bfloat16).to(x.dtype)                # (M, out)
        else:          # the same products in fp32 (CPU _scaled_mm takes row-wise scales only from torch 2.13)
            y = torch.mm(q.float() * scale, self.dequantized_weight().t()).to(x.dtype)  # (M, out)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the e4m3 rows and their scales stand for, (out, in) fp32."""
        return self.weight.float() * self.weight_scale[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An nn.Linear weight (out, in), any float dtype -> (e4m3 (out, in), scale (out,) fp32)."""
    q, scale = quantize_rows(weight)
    return q, scale.view(-1)


def fp8_linear_names(model: nn.Module) -> list[str]:
    """The nn.Linear modules `quantization="fp8"` replaces: every one but the lm_head."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "lm_head"]


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


def swap_in_fp8_linears(model: nn.Module, cuda: bool = False) -> None:
    """Replace `fp8_linear_names(model)` by empty `Fp8Linear`s of the same shapes (on the meta
    device, before the weights are assigned). `cuda`: check what `_scaled_mm` needs there."""
    for name in fp8_linear_names(model):
        old: nn.Linear = model.get_submodule(name)
        if cuda and (old.in_features % 16 or old.out_features % 16):
            raise ValueError(f"quantization='fp8' needs the dimensions of every projection to be multiples "
                             f"of 16 on CUDA; {name} is ({old.out_features}, {old.in_features})")
        _replace(model, name, Fp8Linear(old.in_features, old.out_features, old.bias is not None, old.weight.dtype))


def dequantize_model(model: nn.Module) -> nn.Module:
    """A copy of an FP8-weight model whose projections are plain nn.Linears holding the
    dequantized weights in the model dtype, its config saying "none". The
    reference for paths that stream FP8 weights but keep activations unquantized (the fused
    batch-1 step), and a way to measure what activation quantization alone costs."""
    import copy
    import dataclasses

    plain = copy.deepcopy(model)
    dtype = plain.config.torch_dtype if hasattr(plain, "config") else torch.float32
    for name, mod in list(plain.named_modules()):
        if isinstance(mod, Fp8Linear):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                            device=mod.weight.device, dtype=dtype)
            lin.weight.data = mod.dequantized_weight().to(lin.weight.dtype)
            if mod.bias is not None:
                lin.bias.data = mod.bias.data.clone()
            _replace(plain, name, lin)
    if hasattr(plain, "config"):
        plain.config = dataclasses.replace(plain.config, quantization="none")
    return plain.requires_grad_(False)


__all__ = ["FP8_DTYPE", "FP8_MAX", "Fp8Linear", "quantize_rows", "quantize_weight",
           "fp8_linear_names", "swap_in_fp8_linears", "dequantize_model"]
