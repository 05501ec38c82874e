"""Qwen2 / Qwen2.5: Llama's architecture with a bias on q/k/v (but not on o_proj)."""
from __future__ import annotations

from ..config import ModelConfig
from .llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM


class Qwen2Attention(LlamaAttention):
    o_proj_bias_follows_qkv = False


class Qwen2DecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen2Attention


class Qwen2ForCausalLM(LlamaForCausalLM):
    layer_cls = Qwen2DecoderLayer

    def __init__(self, config: ModelConfig) -> None:
        # With use_sliding_window=true HF windows only layers >= max_window_layers, which
        # ModelConfig does not carry; refuse rather than window every layer. Released Qwen2
        # checkpoints ship use_sliding_window=false (sliding_window is then None here).
        if config.sliding_window is not None and config.sliding_window < (config.max_seq_len or 0):
            raise ValueError(f"Qwen2 with sliding_window={config.sliding_window} (< max_seq_len "
                             f"{config.max_seq_len}) is not supported; set use_sliding_window=false")
        super().__init__(config)
