"""Qwen2: Llama's architecture with a bias on q/k/v (but not on o_proj)."""
from __future__ import annotations

from .llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM


class Qwen2Attention(LlamaAttention):
    o_proj_bias_follows_qkv = False


class Qwen2DecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen2Attention


class Qwen2ForCausalLM(LlamaForCausalLM):
    layer_cls = Qwen2DecoderLayer
