"""User logits processors (TRT-LLM's `LogitsProcessor` / `LogitsProcessorList` API).

The decode loop calls them on each step's logits before `sampling.sample`, so anything they
ban or boost is seen by penalties, filters and the sampler alike.
"""
from __future__ import annotations

import torch


class LogitsProcessor:
    """Rewrites one step's scores. `input_ids`: (batch * beams, seq_len) token ids so far
    (prompt and generated); `scores`: (batch * beams, vocab) logits. Returns the new scores
    (same shape); it may modify `scores` in place and return it."""

    def __call__(self, step: int, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__")


class LogitsProcessorList(list, LogitsProcessor):
    """Applies its processors in order, each to the previous one's output."""

    def __call__(self, step: int, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for processor in self:
            out = processor(step, input_ids, scores)
            if not isinstance(out, torch.Tensor) or out.shape != scores.shape:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"{type(processor).__name__} returned {got}; expected a tensor "
                                 f"of shape {tuple(scores.shape)}")
            scores = out
        return scores


__all__ = ["LogitsProcessor", "LogitsProcessorList"]
