"""GPT-2: learned absolute position embeddings, pre-LayerNorm blocks, fused c_attn (our
qkv_proj, with bias), gelu_new MLP, lm_head tied to the token embedding. HF's Conv1D stores
weights as (in, out); they are transposed at load into nn.Linear's (out, in)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..layers.attention import AttentionMetadata, paged_attention, write_kv
from ..layers.mlp import MLP
from ..layers.norms import LayerNorm
from .weights import WeightSpec


class GPT2Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.head_size = config.head_size
        self.scale = self.head_size ** -0.5
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        T, H = x.shape
        q, k, v = self.qkv_proj(x).view(T, 3, self.num_heads, self.head_size).unbind(1)  # (T, h, d) each
        write_kv(kv_layer, k, v, meta.slot_mapping)
        out = paged_attention(q, kv_layer, meta, self.scale)                # (T, h, d)
        return self.o_proj(out.reshape(T, H))                               # (T, H)


class GPT2Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.hidden_size, config.norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = LayerNorm(config.hidden_size, config.norm_epsilon)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_layer, meta)                     # (T, H)
        return x + self.mlp(self.ln_2(x))                                   # (T, H)


class GPT2LMHeadModel(nn.Module):
    """Our names: wte, wpe, layers.{i}.{ln_1, attn.{qkv_proj, o_proj}, ln_2, mlp.{fc, proj}}, ln_f."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(GPT2Block(config, i) for i in range(config.num_layers))
        self.ln_f = LayerNorm(config.hidden_size, config.norm_epsilon)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """`inputs_embeds` (T, H): token embeddings to use instead of `wte(input_ids)` (prompt tuning)."""
        tokens = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        x = tokens + self.wpe(positions)                                    # (T, H)
        for i, layer in enumerate(self.layers):
            x = layer(x, kv_cache[i], meta)
        return self.ln_f(x)                                                 # (T, H)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.wte.weight).float()                    # (N, V), tied head

    # --- strict HF weight map -------------------------------------------------------------
    @classmethod
    def hf_weight_map(cls, config: ModelConfig) -> dict[str, WeightSpec]:
        m: dict[str, WeightSpec] = {
            "wte.weight": WeightSpec(("transformer.wte.weight",)),
            "wpe.weight": WeightSpec(("transformer.wpe.weight",)),
        }
        for i in range(config.num_layers):
            hf, ours = f"transformer.h.{i}", f"layers.{i}"
            for part in ("ln_1", "ln_2"):
                m[f"{ours}.{part}.weight"] = WeightSpec((f"{hf}.{part}.weight",))
                m[f"{ours}.{part}.bias"] = WeightSpec((f"{hf}.{part}.bias",))
            for theirs, mine in (("attn.c_attn", "attn.qkv_proj"), ("attn.c_proj", "attn.o_proj"),
                                 ("mlp.c_fc", "mlp.fc"), ("mlp.c_proj", "mlp.proj")):
                m[f"{ours}.{mine}.weight"] = WeightSpec((f"{hf}.{theirs}.weight",), transpose=True)
                m[f"{ours}.{mine}.bias"] = WeightSpec((f"{hf}.{theirs}.bias",))
        m["ln_f.weight"] = WeightSpec(("transformer.ln_f.weight",))
        m["ln_f.bias"] = WeightSpec(("transformer.ln_f.bias",))
        return m

    @classmethod
    def hf_ignored_weights(cls, config: ModelConfig) -> tuple[str, ...]:
        # Old checkpoints store the causal-mask buffers (attn.bias / attn.masked_bias) and
        # sometimes a copy of the tied lm_head.
        return (r"\.attn\.(masked_)?bias$", r"^lm_head\.weight$")

    @classmethod
    def hf_name_normalizer(cls, names: set[str]) -> dict[str, str]:
        # The original `gpt2` checkpoints name weights without the `transformer.` prefix.
        return {n: f"transformer.{n}" for n in names
                if not n.startswith(("transformer.", "lm_head."))}
