"""Llama 2 / Llama 3.x / Mistral: pre-RMSNorm decoder with RoPE, grouped-query attention
(fused qkv_proj), SiLU-gated MLP (fused gate_up_proj) and an optional sliding window."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..layers.attention import AttentionMetadata, paged_attention, write_kv
from ..layers.mlp import GatedMLP
from ..layers.norms import RMSNorm
from ..layers.rotary import RotaryEmbedding
from .weights import WeightSpec

if TYPE_CHECKING:
    from ..lora import LoraUpdate


class LlamaAttention(nn.Module):
    # Llama's `attention_bias` puts a bias on q/k/v *and* o_proj; Qwen2 only on q/k/v.
    o_proj_bias_follows_qkv = True

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_size = config.head_size
        self.q_size = self.num_heads * self.head_size
        self.kv_size = self.num_kv_heads * self.head_size
        self.scale = self.head_size ** -0.5
        self.sliding_window = config.sliding_window
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size,
                                bias=config.qkv_bias and self.o_proj_bias_follows_qkv)
        self.rotary = RotaryEmbedding(self.head_size, config.max_position_embeddings, config.rope_theta,
                                      config.rope_scaling, config.max_seq_len)
        self.lora_prefix = f"layers.{layer_idx}.self_attn"   # LoRA adapters' name for these projections

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_layer: torch.Tensor,
                meta: AttentionMetadata, lora: LoraUpdate | None = None) -> torch.Tensor:
        T = x.shape[0]
        qkv = self.qkv_proj(x)                                                  # (T, q + 2kv)
        if lora is not None:
            qkv = lora.apply(f"{self.lora_prefix}.qkv_proj", x, qkv)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_size)                           # (T, h, d)
        k = k.view(T, self.num_kv_heads, self.head_size)                        # (T, kvh, d)
        v = v.view(T, self.num_kv_heads, self.head_size)                        # (T, kvh, d)
        q, k = self.rotary(positions, q, k, meta.max_context_len)
        write_kv(kv_layer, k, v, meta.slot_mapping)
        out = paged_attention(q, kv_layer, meta, self.scale, self.sliding_window)  # (T, h, d)
        out = out.reshape(T, self.q_size)
        y = self.o_proj(out)                                                    # (T, H)
        return y if lora is None else lora.apply(f"{self.lora_prefix}.o_proj", out, y)


class LlamaDecoderLayer(nn.Module):
    attention_cls: type[LlamaAttention] = LlamaAttention

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_epsilon)
        self.self_attn = self.attention_cls(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_epsilon)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                            lora_prefix=f"layers.{layer_idx}.mlp")

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_layer: torch.Tensor,
                meta: AttentionMetadata, lora: LoraUpdate | None = None) -> torch.Tensor:
        x = x + self.self_attn(positions, self.input_layernorm(x), kv_layer, meta, lora)   # (T, H)
        return x + self.mlp(self.post_attention_layernorm(x), lora)                        # (T, H)


class LlamaForCausalLM(nn.Module):
    """Our names: embed_tokens, layers.{i}.{input_layernorm, self_attn.{qkv_proj, o_proj},
    post_attention_layernorm, mlp.{gate_up_proj, down_proj}}, norm, lm_head (absent if tied)."""

    layer_cls: type[LlamaDecoderLayer] = LlamaDecoderLayer

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self.layer_cls(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_epsilon)
        self.lm_head = None if config.tie_word_embeddings else \
            nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, inputs_embeds: torch.Tensor | None = None,
                lora: LoraUpdate | None = None) -> torch.Tensor:
        """input_ids, positions: (T,) flattened over sequences; kv_cache: (L, 2, nb, bs, kvh, d).
        `inputs_embeds` (T, H): token embeddings to use instead of `embed_tokens(input_ids)`.
        `lora`: this step's LoRA adapters and the tokens each one serves (runtime_lib/lora.py)."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (T, H)
        for i, layer in enumerate(self.layers):
            x = layer(positions, x, kv_cache[i], meta, lora)
        return self.norm(x)                                                     # (T, H)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()                                 # (N, V)

    # --- strict HF weight map -------------------------------------------------------------
    hf_ignored: tuple[str, ...] = (r"rotary_emb\.inv_freq$",)

    @classmethod
    def hf_weight_map(cls, config: ModelConfig) -> dict[str, WeightSpec]:
        m: dict[str, WeightSpec] = {"embed_tokens.weight": WeightSpec(("model.embed_tokens.weight",))}
        for i in range(config.num_layers):
            hf, ours = f"model.layers.{i}", f"layers.{i}"
            attn = f"{hf}.self_attn"
            m[f"{ours}.input_layernorm.weight"] = WeightSpec((f"{hf}.input_layernorm.weight",))
            m[f"{ours}.self_attn.qkv_proj.weight"] = WeightSpec(
                (f"{attn}.q_proj.weight", f"{attn}.k_proj.weight", f"{attn}.v_proj.weight"))
            if config.qkv_bias:
                m[f"{ours}.self_attn.qkv_proj.bias"] = WeightSpec(
                    (f"{attn}.q_proj.bias", f"{attn}.k_proj.bias", f"{attn}.v_proj.bias"))
            m[f"{ours}.self_attn.o_proj.weight"] = WeightSpec((f"{attn}.o_proj.weight",))
            if config.qkv_bias and cls.layer_cls.attention_cls.o_proj_bias_follows_qkv:
                m[f"{ours}.self_attn.o_proj.bias"] = WeightSpec((f"{attn}.o_proj.bias",))
            m[f"{ours}.post_attention_layernorm.weight"] = WeightSpec(
                (f"{hf}.post_attention_layernorm.weight",))
            m[f"{ours}.mlp.gate_up_proj.weight"] = WeightSpec(
                (f"{hf}.mlp.gate_proj.weight", f"{hf}.mlp.up_proj.weight"))
            m[f"{ours}.mlp.down_proj.weight"] = WeightSpec((f"{hf}.mlp.down_proj.weight",))
        m["norm.weight"] = WeightSpec(("model.norm.weight",))
        if not config.tie_word_embeddings:
            m["lm_head.weight"] = WeightSpec(("lm_head.weight",))
        return m

    @classmethod
    def hf_ignored_weights(cls, config: ModelConfig) -> tuple[str, ...]:
        # Some tied checkpoints still store the lm_head copy; the embedding is authoritative.
        return cls.hf_ignored + ((r"^lm_head\.weight$",) if config.tie_word_embeddings else ())

    @classmethod
    def hf_name_normalizer(cls, names: set[str]) -> dict[str, str]:
        return {}
