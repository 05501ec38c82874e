"""Batched logit operations behind `sampling.sample`: penalties, bans, top-k/top-p/min-p
filters and counter-based sampling noise. Each works on a whole (B, V) batch with per-row
parameters as tensors; none syncs with the host.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .model_step import to_device

# splitmix64 constants, as signed int64 (torch has no uint64 arithmetic on every device).
_GAMMA = 0x9E3779B97F4A7C15 - 2**64
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64
_STEP_SALT = 0x2545F4914F6CDD1D


def to_int64_seed(seed: int) -> int:
    """uint64 seed -> the int64 with the same bits."""
    return seed - 2**64 if seed >= 2**63 else seed


def _srl(z: torch.Tensor, shift: int) -> torch.Tensor:
    # Logical right shift on int64: `>>` is arithmetic, so clear the sign-extended bits.
    return (z >> shift) & ((1 << (64 - shift)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser. int64 multiply wraps mod 2**64 on CPU and CUDA alike."""
    z = (z ^ _srl(z, 30)) * _MIX1
    z = (z ^ _srl(z, 27)) * _MIX2
    return z ^ _srl(z, 31)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Uniform (0, 1) float32 numbers, a pure function of (seed, step, vocabulary id).

    seeds (S,) int64, steps (S,) int64, idx (S, K) int64 -> (S, K). The row key is
    mix(seed ^ mix(step * gamma + salt)); element k is splitmix64's output for counter
    idx + 1 on that key. 23 bits keep (k + 0.5) / 2**23 exact in float32, so u is never 0 or 1.
    """
    key = _mix64(seeds ^ _mix64(steps * _GAMMA + _STEP_SALT))  # (S,)
    z = _mix64(key[:, None] + (idx + 1) * _GAMMA)  # (S, K)
    return (_srl(z, 41).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def gumbel_noise(seeds: torch.Tensor, steps: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise -log(-log u) per (row, vocabulary id): (S,) (S,) (S, K) -> (S, K)."""
    return -torch.log(-torch.log(uniform_noise(seeds, steps, idx)))


# --------------------------------------------------------------------------- token history


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """`x.argmax(dim=-1)` for (B, V) logits; on the GPU, for a few long rows, in one Triton launch.

    torch reduces one row in one thread block: ~40 us for a 128k vocab on an H100, ~3% of a
    batch-1 1B decode step. `kernels/argmax.py` reduces slices of each row in parallel and
    merges them in the same launch (ties: the first maximal index, as torch)."""
    B, V = x.shape
    if x.device.type == "cuda" and B <= 16 and V >= 16384:
        from .kernels.argmax import argmax_rows_triton

        return argmax_rows_triton(x)
    return x.argmax(dim=-1)


def _pad_rows(rows: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    width = max([1] + [len(r) for r in rows])
    arr = np.full((len(rows), width), -1, dtype=np.int64)
    for b, r in enumerate(rows):
        arr[b, :len(r)] = r
    return to_device(torch.from_numpy(arr), device)


@dataclass(frozen=True)
class TokenHistory:
    """Every row's prompt followed by its generated tokens, padded on the sampling device."""

    token_ids: torch.Tensor  # (B, L) int64, right padded with -1, L >= 1
    lengths: torch.Tensor  # (B,) int64 prompt + output lengths
    prompt_lengths: torch.Tensor  # (B,) int64

    @classmethod
    def build(cls, prompt_ids: Any, output_ids: Any, batch_size: int,
              device: torch.device | str) -> TokenHistory:
        """`prompt_ids` / `output_ids`: per-row lists or (B, L) tensors right padded with ids < 0;
        None means empty for every row."""
        device = torch.device(device)
        for name, v in (("prompt_ids", prompt_ids), ("output_ids", output_ids)):
            if v is not None and len(v) != batch_size:
                raise ValueError(f"{name} has {len(v)} rows for a batch of {batch_size}")
        prompt_ids = [[] for _ in range(batch_size)] if prompt_ids is None else prompt_ids
        output_ids = [[] for _ in range(batch_size)] if output_ids is None else output_ids
        if not isinstance(prompt_ids, torch.Tensor) and not isinstance(output_ids, torch.Tensor):
            rows = [list(p) + list(o) for p, o in zip(prompt_ids, output_ids)]
            return cls(_pad_rows(rows, device),
                       to_device(torch.tensor([len(r) for r in rows], dtype=torch.int64), device),
                       to_device(torch.tensor([len(p) for p in prompt_ids], dtype=torch.int64), device))
        p, o = (ids.to(device, torch.int64) if isinstance(ids, torch.Tensor) else _pad_rows(ids, device)
                for ids in (prompt_ids, output_ids))
        p_len = (p >= 0).sum(dim=1)  # (B,)
        o_len = (o >= 0).sum(dim=1)
        L = max(1, p.shape[1] + o.shape[1])
        full = torch.full((batch_size, L + 1), -1, dtype=torch.int64, device=device)  # last col: pads
        pos_p = torch.arange(p.shape[1], device=device)[None]
        pos_o = torch.arange(o.shape[1], device=device)[None]
        full.scatter_(1, torch.where(p >= 0, pos_p, L), p)
        full.scatter_(1, torch.where(o >= 0, p_len[:, None] + pos_o, L), o)
        return cls(full[:, :L].contiguous(), p_len + o_len, p_len)

    def output_counts(self, vocab_size: int) -> torch.Tensor:
        """(B, V) float32: how often each token occurs among the generated tokens."""
        B, L = self.token_ids.shape
        pos = torch.arange(L, device=self.token_ids.device)[None]  # (1, L)
        is_out = (pos >= self.prompt_lengths[:, None]) & (pos < self.lengths[:, None])
        idx = torch.where(is_out, _vocab_index(self.token_ids, vocab_size), vocab_size)  # (B, L)
        counts = torch.zeros(B, vocab_size + 1, dtype=torch.float32, device=idx.device)
        return counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float32))[:, :vocab_size]


def _vocab_index(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    # Pads (< 0) and ids the logits cannot hold go to a spare column `vocab_size`.
    return torch.where((ids >= 0) & (ids < vocab_size), ids, vocab_size)


def token_counts(token_ids: Any, vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-row lists (or a (B, L) tensor padded with ids < 0) -> (B, V) int32 occurrence counts."""
    hist = TokenHistory.build(None, token_ids, len(token_ids), device)
    return hist.output_counts(vocab_size).to(torch.int32)


# --------------------------------------------------------------------------- penalties, bans


def apply_repetition_penalty(x: torch.Tensor, token_ids: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """HF/TRT-LLM multiplicative penalty on every token present in `token_ids` (B, L) (pad < 0):
    positive logits are divided by the row's penalty (B,), negative ones multiplied."""
    B, V = x.shape
    seen = torch.zeros(B, V + 1, dtype=torch.bool, device=x.device)
    seen = seen.scatter_(1, _vocab_index(token_ids, V), True)[:, :V]  # (B, V)
    p = penalty[:, None]
    return torch.where(seen, torch.where(x < 0, x * p, x / p), x)


def apply_frequency_presence_penalty(x: torch.Tensor, counts: torch.Tensor, frequency: torch.Tensor,
                                     presence: torch.Tensor) -> torch.Tensor:
    """OpenAI/vLLM additive penalties: x - frequency * count - presence * (count > 0)."""
    return x - frequency[:, None] * counts - presence[:, None] * (counts > 0).to(x.dtype)


def apply_bad_words(x: torch.Tensor, rows: torch.Tensor, last: torch.Tensor, prefix: torch.Tensor,
                    prefix_len: torch.Tensor, history: TokenHistory | None) -> torch.Tensor:
    """Ban `last[i]` in row `rows[i]` when the row's sequence ends with `prefix[i, :prefix_len[i]]`
    (an empty prefix always matches). Modifies `x` in place and returns it.

    rows, last, prefix_len: (P,) int64; prefix: (P, M) int64. `history` may be None only if M == 0.
    """
    if prefix.shape[1] == 0:
        match = torch.ones_like(rows, dtype=torch.bool)
    else:
        seq = history.token_ids.index_select(0, rows)  # (P, L)
        lens = history.lengths.index_select(0, rows)  # (P,)
        j = torch.arange(prefix.shape[1], device=x.device)[None]  # (1, M)
        pos = lens[:, None] - prefix_len[:, None] + j  # (P, M) where prefix token j must sit
        tok = seq.gather(1, pos.clamp(0, seq.shape[1] - 1))
        in_word = j < prefix_len[:, None]
        match = (~in_word | ((pos >= 0) & (tok == prefix))).all(dim=1)  # (P,)
    # accumulate: two words of one row may ban the same token, matched or not
    penalty = torch.where(match, -math.inf, 0.0).to(x.dtype)
    return x.index_put_((rows, last), penalty, accumulate=True)


def apply_no_repeat_ngram(x: torch.Tensor, history: TokenHistory, n: int, rows: torch.Tensor) -> torch.Tensor:
    """HF's NoRepeatNGramLogitsProcessor for the rows `rows` (R,), all with size `n`: ban every
    token that would complete an n-gram already present in prompt + output. In place on `x`."""
    seq = history.token_ids.index_select(0, rows)  # (R, L)
    lens = history.lengths.index_select(0, rows)  # (R,)
    L = seq.shape[1]
    V = x.shape[1]
    if L < n:
        return x
    windows = seq.unfold(1, n, 1)  # (R, W, n), W = L - n + 1, window w covers [w, w + n)
    start = torch.arange(L - n + 1, device=x.device)[None]  # (1, W)
    match = start + n <= lens[:, None]  # (R, W) window lies inside the sequence
    if n > 1:
        pos = lens[:, None] - (n - 1) + torch.arange(n - 1, device=x.device)[None]  # (R, n-1)
        tail = seq.gather(1, pos.clamp(min=0))  # last n-1 tokens (only used where windows exist)
        match = match & (windows[:, :, :-1] == tail[:, None, :]).all(dim=-1)
    banned = torch.where(match, _vocab_index(windows[:, :, -1], V), V)  # (R, W)
    mask = torch.zeros(rows.shape[0], V + 1, dtype=torch.bool, device=x.device)
    mask = mask.scatter_(1, banned, True)[:, :V]  # (R, V)
    return x.index_copy_(0, rows, x.index_select(0, rows).masked_fill(mask, -math.inf))


# --------------------------------------------------------------------------- filters


def filter_sorted(vals: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
                  log_min_p: torch.Tensor | None, is_sorted: bool = True) -> torch.Tensor | None:
    """Keep mask (S, K) over candidate logits `vals` (S, K), sorted descending per row when
    top-k/top-p are given (they need the order; min-p does not). None means keep all.

    top_k (S,) int64, 0 = off: keep values >= the k-th largest (ties kept, as HF).
    top_p (S,) float32, inf = off: keep the smallest prefix whose probability mass (after top-k)
    reaches top_p, i.e. tokens whose exclusive cumulative mass is < top_p (as HF and TRT-LLM).
    log_min_p (S,) float32, -inf = off: keep p >= min_p * p_max, i.e. logit >= max + log(min_p).
    """
    keep = None
    if top_k is not None:
        k = top_k.clamp(max=vals.shape[1])[:, None]  # (S, 1)
        kth = vals.gather(1, (k - 1).clamp(min=0))  # (S, 1)
        keep = (vals >= kth) | (k == 0)
    if top_p is not None:
        masked = vals if keep is None else vals.masked_fill(~keep, -math.inf)
        probs = masked.softmax(dim=-1)  # (S, K)
        exclusive = probs.cumsum(dim=-1) - probs  # first entry is exactly 0: always kept
        kp = exclusive < top_p[:, None]
        keep = kp if keep is None else keep & kp
    if log_min_p is not None:
        vmax = vals[:, :1] if is_sorted else vals.amax(dim=-1, keepdim=True)  # (S, 1)
        km = vals >= vmax + log_min_p[:, None]
        keep = km if keep is None else keep & km
    return keep


def top_k_top_p_min_p_mask(logits: torch.Tensor, top_k: Sequence[int] | torch.Tensor,
                           top_p: Sequence[float] | torch.Tensor,
                           min_p: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Full-vocabulary keep mask (B, V) for per-row top_k (0 = off), top_p (0 or 1 = off) and
    min_p (0 = off), applied in that order on `logits` (already temperature-scaled)."""
    device = logits.device
    k = torch.as_tensor(top_k, dtype=torch.int64).to(device)
    p = torch.as_tensor(top_p, dtype=torch.float32).to(device)
    m = torch.as_tensor(min_p, dtype=torch.float32).to(device)
    p = torch.where((p > 0) & (p < 1), p, math.inf)
    vals, idx = logits.float().sort(dim=-1, descending=True)  # (B, V)
    keep = filter_sorted(vals, k, p, torch.log(m))
    return torch.zeros_like(keep).scatter_(1, idx, keep)


__all__ = [
    "TokenHistory",
    "apply_bad_words",
    "apply_frequency_presence_penalty",
    "apply_no_repeat_ngram",
    "apply_repetition_penalty",
    "filter_sorted",
    "gumbel_noise",
    "to_int64_seed",
    "token_counts",
    "top_k_top_p_min_p_mask",
    "uniform_noise",
]
