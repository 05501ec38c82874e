"""Fused decode step for one row (batch-1 decode, Llama family on the GPU).

At batch 1 the step is bound by streaming the weights once, and what keeps it from that bound
is the number of launches between the matmuls. This forward runs each layer in four to six
Triton launches, against ~11 for the compiled step and ~60 eagerly, each launched with
programmatic dependent launch on Hopper (kernels/pdl.py: it starts fetching its weights while
its predecessor ends):

    q     = qkv_rope_kv(x, W_qkv)                               input_layernorm, RoPE, K/V write fused in
            (a large W_qkv: small_linear(x, W_qkv, prologue=RMSNorm), then rope_kv_write; see
            kernels/qkv_rope_kv.py)
    attn  = paged decode attention(q)                           in the qkv kernel's epilogue when that is
                                                                one launch and the context is short
    x     = small_linear(attn, W_o, residual=x)                 residual add fused in
    gu    = small_linear(x, W_gate_up, prologue=RMSNorm)        post_attention_layernorm fused in
    x     = small_linear(gu, W_down, prologue=SiLU*mul, residual=x)

and the logits are one more `small_linear` with the final norm fused in. In fp32 the logits match
the eager forward up to summation order; in bf16 the RMSNorm rounds at other points than eager
does (kernels/small_linear.py), within bf16 rounding of it. Larger batches take the `fallback`
forward (the compiled or eager one): from two rows on, cuBLAS's tensor-core GEMMs beat these
CUDA-core GEMVs (called with several rows, as the CPU tests do, the qkv step is `small_linear`
then `rope_kv_write`). `Session.enable_cuda_graphs` wraps
the decode forward with this when `Session.fused_decode` is on and the model is supported
(`fused_decode_unsupported_reason`); RUNTIME_LIB_FUSED_DECODE=0 turns it off.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers.attention import AttentionMetadata

# One row only: at 2-16 rows this step was slower than cuBLAS + torch.compile on an H100
# (bench/results/gpu_e2e-20261126-024029.md: ITL 7.6 ms at 2 streams against 6.6 ms).
MAX_FUSED_ROWS = 1
# Steps whose context fits this bound (their own decode graph, `DecodeGraphRunner(short_context=)`)
# attend inside the qkv kernel when it is the one-launch form: one launch fewer a layer, but one
# program per KV group reads the whole context (no split-K). Llama-3.2-1B's step on an H100
# (bench/gpu_fused_step.py): 1.043 against 1.075 ms at 192 tokens, 1.073 / 1.087 at 384, 1.101 /
# 1.094 at 512.
FUSED_ATTENTION_MAX_CONTEXT = 384
DISABLE_ENV = "RUNTIME_LIB_FUSED_DECODE"  # "0": always take the fallback forward


def fused_decode_disabled_by_env() -> bool:
    from .cuda_graph import switched_off_by_env

    return switched_off_by_env(DISABLE_ENV)


def fused_decode_unsupported_reason(model: nn.Module) -> str | None:
    """Why `llama_fused_decode_forward` cannot run this model, or None."""
    from .cuda_graph import supports_compiled_decode
    from .layers.mlp import GatedMLP

    if not supports_compiled_decode(model):
        return f"{type(model).__name__} is not a Llama-family model with static rope"
    layer = model.layers[0]
    if not isinstance(layer.mlp, GatedMLP) or layer.mlp.act is not F.silu:
        return "the MLP activation is not SiLU"
    head_size = layer.self_attn.head_size
    if not (16 <= head_size <= 256 and head_size & (head_size - 1) == 0):
        return f"head_size {head_size} is not a power of two in 16..256"
    if model.embed_tokens.weight.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {model.embed_tokens.weight.dtype} is not fp16/bf16/fp32"
    return None


def llama_fused_decode_forward(model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
                               kv_cache: torch.Tensor, meta: AttentionMetadata,
                               logits_indices: torch.Tensor) -> torch.Tensor:
    """`LlamaForCausalLM.forward` + `compute_logits` for one token per row through the
    fused kernels: input_ids/positions (B,), kv_cache (L, 2, nb, bs, kvh, d) -> logits (N, V) fp32."""
    from .kernels.paged_attention import paged_decode_attention
    from .kernels.pdl import pdl_enabled
    from .kernels.qkv_rope_kv import ONE_LAUNCH_MAX_BYTES as QKV_ONE_LAUNCH_MAX_BYTES
    from .kernels.qkv_rope_kv import DecodeAttention, qkv_rope_kv, qkv_rope_kv_attention
    from .kernels.rope_kv import rope_kv_write
    from .kernels.small_linear import small_linear

    B = input_ids.shape[0]
    # Each kernel starts streaming its weights while the previous one finishes (kernels/pdl.py).
    pdl = pdl_enabled(input_ids.device)
    def linear(x, proj, **kw):  # an FP8 projection brings its per-channel scales
        return small_linear(x, proj.weight, bias=proj.bias, weight_scale=getattr(proj, "weight_scale", None),
                            pdl=pdl, **kw)

    x = model.embed_tokens(input_ids)                                                 # (B, H)
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        kv_layer = kv_cache[i]
        norm = layer.input_layernorm
        rope = (positions, attn.rotary.cos_cache, attn.rotary.sin_cache, kv_layer, meta.slot_mapping,
                attn.num_heads, attn.num_kv_heads)
        one_launch = (B == 1 and attn.qkv_proj.weight.nbytes <= QKV_ONE_LAUNCH_MAX_BYTES
                      and attn.qkv_proj.weight.dtype == x.dtype)    # the one-launch kernels take no FP8
        if one_launch and meta.max_context_len <= FUSED_ATTENTION_MAX_CONTEXT:  # + the attention
            spec = DecodeAttention(meta.block_tables, meta.context_lens, attn.scale, attn.sliding_window)
            out = qkv_rope_kv_attention(x, attn.qkv_proj.weight, norm.weight, norm.eps, *rope, spec,
                                        bias=attn.qkv_proj.bias, pdl=pdl)                     # (1, h, d)
        else:
            if one_launch:                                                    # projection + RoPE + K/V
                q = qkv_rope_kv(x, attn.qkv_proj.weight, norm.weight, norm.eps, *rope, bias=attn.qkv_proj.bias,
                                pdl=pdl)                                                      # (1, h, d)
            else:
                qkv = linear(x, attn.qkv_proj, prologue="rmsnorm", norm_weight=norm.weight, eps=norm.eps)
                q = rope_kv_write(qkv, *rope, pdl=pdl)                                        # (B, h, d)
            out = paged_decode_attention(q, kv_layer, meta.block_tables, meta.context_lens, attn.scale,
                                         attn.sliding_window, meta.max_context_len, pdl=pdl)  # (B, h, d)
        x = linear(out.view(B, attn.q_size), attn.o_proj, residual=x)
        gate_up = linear(x, mlp.gate_up_proj, prologue="rmsnorm",
                         norm_weight=layer.post_attention_layernorm.weight,
                         eps=layer.post_attention_layernorm.eps)                         # (B, 2I)
        x = linear(gate_up, mlp.down_proj, prologue="silu_mul", residual=x)              # (B, H)
    lm_head = model.embed_tokens if model.lm_head is None else model.lm_head
    # One row with one logits row: the index can only be 0; skipping the gather keeps the lm_head
    # in the dependent-launch chain (one launch fewer).
    rows = x if B == 1 and logits_indices.shape[0] == 1 else x[logits_indices]
    return small_linear(rows, lm_head.weight, prologue="rmsnorm", norm_weight=model.norm.weight,
                        eps=model.norm.eps, out_dtype=torch.float32, pdl=pdl)           # (N, V)


def make_fused_decode_forward(model: nn.Module, fallback):
    """A `DecodeForward`: the fused step for one-row decode steps, `fallback` otherwise."""
    reason = fused_decode_unsupported_reason(model)
    if reason is not None:
        raise ValueError(f"fused decode does not support this model: {reason}")

    @torch.no_grad()
    def forward(input_ids, positions, kv_cache, meta: AttentionMetadata, logits_indices, lora_slots=None):
        if lora_slots is not None:  # the fused kernels know no adapters
            return fallback(input_ids, positions, kv_cache, meta, logits_indices, lora_slots=lora_slots)
        if input_ids.shape[0] <= MAX_FUSED_ROWS and meta.is_decode:
            return llama_fused_decode_forward(model, input_ids, positions, kv_cache, meta, logits_indices)
        return fallback(input_ids, positions, kv_cache, meta, logits_indices)

    return forward


__all__ = ["FUSED_ATTENTION_MAX_CONTEXT", "MAX_FUSED_ROWS", "fused_decode_disabled_by_env",
           "fused_decode_unsupported_reason", "llama_fused_decode_forward", "make_fused_decode_forward"]
