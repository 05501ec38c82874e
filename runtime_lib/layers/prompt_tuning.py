"""Prompt tuning (p-tuning) embeddings, TensorRT-LLM's `PromptTuningEmbedding`: prompt ids past
the vocabulary are virtual tokens whose embeddings come from a table of learned vectors, one
block of `task_vocab_size` rows per task; each sequence names its task."""
from __future__ import annotations

import torch
from torch import nn


def prompt_tuning_embeddings(embedding: nn.Embedding, input_ids: torch.Tensor, table: torch.Tensor,
                             tasks: torch.Tensor, task_vocab_size: int) -> torch.Tensor:
    """input_ids (T,); table (num_tasks * task_vocab_size, H); tasks (T,) each token's task.
    An id below the vocabulary reads `embedding`; an id v >= vocab_size reads table row
    tasks * task_vocab_size + (v - vocab_size). Returns (T, H) in the embedding's dtype, with
    no host sync (callers check the ids' range)."""
    vocab = embedding.num_embeddings
    virtual = input_ids >= vocab                                                # (T,)
    x = embedding(torch.where(virtual, 0, input_ids))                           # (T, H)
    rows = tasks.long() * task_vocab_size + (input_ids.long() - vocab)
    rows = rows.clamp(0, table.shape[0] - 1)                                    # real tokens: any row
    return torch.where(virtual[:, None], table[rows].to(x.dtype), x)


__all__ = ["prompt_tuning_embeddings"]
