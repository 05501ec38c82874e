"""Batched sampling for one decode step, every row with its own parameters.

`SamplingParams` (one row) -> `SamplingTensors` (the batch, built once while the batch is
unchanged) -> `sample(logits, st, ...)` -> `SampleOutput`. The tensor math runs on the logits'
device with no host syncs and no Python loop over rows; the per-row logit operations live in
`sampling_ops.py`.
"""
from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from runtime_lib.config import SamplingConfig
from runtime_lib.model_step import to_device
from runtime_lib.sampling_ops import (
    TokenHistory,
    apply_bad_words,
    apply_frequency_presence_penalty,
    apply_no_repeat_ngram,
    apply_repetition_penalty,
    argmax_rows,
    filter_sorted,
    gumbel_noise,
    to_int64_seed,
)
from runtime_lib.stopping import normalize_word_lists

MAX_SEED = 2**64 - 1
# Rows whose top_k are all in (0, TOP_K_FAST_MAX] sample from `topk` candidates instead of a
# full vocabulary sort. The chosen token does not depend on which path runs (noise is keyed by
# vocabulary id, and filtering is by value thresholds), so batch composition cannot change it.
TOP_K_FAST_MAX = 1024


def random_seed() -> int:
    """A fresh 64-bit seed from the OS, for rows whose request gave none."""
    return secrets.randbits(64)


def _check(name: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _words(name: str, words: Any) -> tuple[tuple[int, ...], ...]:
    out = []
    for i, w in enumerate(words or ()):
        w = tuple(w)
        _check(f"{name}[{i}]", list(w), len(w) > 0 and all(_is_int(t) and t >= 0 for t in w),
               "a non-empty list of token ids >= 0")
        out.append(tuple(int(t) for t in w))
    return tuple(out)


@dataclass(frozen=True)
class SamplingParams:
    """One row's decoding parameters, with TensorRT-LLM's semantics and defaults.

    Greedy when `temperature == 0`, `top_k == 1`, or `top_k == 0 and top_p == 0` (TRT-LLM turns
    that last case into top_k=1). Otherwise `top_k=0` disables top-k and `top_p` of 0 or 1
    disables top-p; `min_p=0` disables min-p. `min_length` counts new tokens: `end_id` is
    banned until that many were generated. `ignore_eos` bans `end_id` altogether. `end_id=-1`
    means the row has no end token. `seed=None` lets `SamplingTensors` draw a random one.
    `stop_words` are carried for the driver's `StopWordsMatcher`; `sample` does not read them.
    """

    temperature: float = 1.0
    top_k: int = 1
    top_p: float = 0.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_length: int = 1
    no_repeat_ngram_size: int = 0
    seed: int | None = None
    end_id: int = -1
    ignore_eos: bool = False
    bad_words: tuple[tuple[int, ...], ...] = ()
    stop_words: tuple[tuple[int, ...], ...] = ()
    logprobs: bool = False

    def __post_init__(self) -> None:
        f = self._finite
        _check("temperature", self.temperature, f(self.temperature) and self.temperature >= 0, "in [0, inf)")
        _check("top_k", self.top_k, _is_int(self.top_k) and self.top_k >= 0, "an integer in [0, inf)")
        _check("top_p", self.top_p, f(self.top_p) and 0.0 <= self.top_p <= 1.0, "in [0.0, 1.0]")
        _check("min_p", self.min_p, f(self.min_p) and 0.0 <= self.min_p <= 1.0, "in [0.0, 1.0]")
        _check("repetition_penalty", self.repetition_penalty,
               f(self.repetition_penalty) and self.repetition_penalty > 0, "in (0, inf)")
        _check("presence_penalty", self.presence_penalty,
               f(self.presence_penalty) and -2.0 <= self.presence_penalty <= 2.0, "in [-2.0, 2.0]")
        _check("frequency_penalty", self.frequency_penalty,
               f(self.frequency_penalty) and -2.0 <= self.frequency_penalty <= 2.0, "in [-2.0, 2.0]")
        _check("min_length", self.min_length, _is_int(self.min_length) and self.min_length >= 0,
               "an integer in [0, inf)")
        _check("no_repeat_ngram_size", self.no_repeat_ngram_size,
               _is_int(self.no_repeat_ngram_size) and self.no_repeat_ngram_size >= 0, "an integer in [0, inf)")
        _check("seed", self.seed, self.seed is None or (_is_int(self.seed) and 0 <= self.seed <= MAX_SEED),
               f"None or an integer in [0, {MAX_SEED}]")
        _check("end_id", self.end_id, _is_int(self.end_id) and self.end_id >= -1, "an integer in [-1, inf)")
        object.__setattr__(self, "bad_words", _words("bad_words", self.bad_words))
        object.__setattr__(self, "stop_words", _words("stop_words", self.stop_words))

    @staticmethod
    def _finite(v: Any) -> bool:
        return isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) \
            and math.isfinite(float(v))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1 or (self.top_k == 0 and self.top_p == 0)

    @classmethod
    def list_from_config(cls, cfg: SamplingConfig, batch_size: int) -> list[SamplingParams]:
        """One `SamplingParams` per row of `cfg` (per-row fields expanded with `per_row`)."""
        _check("batch_size", batch_size, _is_int(batch_size) and batch_size >= 1, "an integer >= 1")
        rows = {name: cfg.per_row(name, batch_size) for name in (
            "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
            "frequency_penalty", "min_length")}
        seeds = cfg.per_row("random_seed", batch_size) if cfg.random_seed is not None else [None] * batch_size
        ngram = (cfg.per_row("no_repeat_ngram_size", batch_size) if cfg.no_repeat_ngram_size is not None
                 else [0] * batch_size)
        bad = normalize_word_lists(cfg.bad_words_list, batch_size, "bad_words_list")
        stop = normalize_word_lists(cfg.stop_words_list, batch_size, "stop_words_list")
        want_logprobs = bool(cfg.output_log_probs or cfg.output_cum_log_probs)
        return [cls(**{k: v[b] for k, v in rows.items()}, seed=seeds[b],
                    no_repeat_ngram_size=int(ngram[b] or 0), end_id=int(cfg.end_id),
                    ignore_eos=bool(cfg.ignore_eos), bad_words=bad[b], stop_words=stop[b],
                    logprobs=want_logprobs)
                for b in range(batch_size)]

    @classmethod
    def from_config(cls, cfg: SamplingConfig, row: int, batch_size: int) -> SamplingParams:
        _check("row", row, _is_int(row) and 0 <= row < batch_size, f"an integer in [0, {batch_size - 1}]")
        return cls.list_from_config(cfg, batch_size)[row]


@dataclass(eq=False)
class SamplingTensors:
    """A batch's parameters as device tensors (one value per row), plus host-side facts that
    let `sample` skip whole stages. Build with `SamplingTensors.build(params, device)`;
    rebuild (or keep) only when the batch's rows change.

    Rows with `seed=None` get `random_seed()` here; `seeds_host` keeps what was drawn.
    """

    params: tuple[SamplingParams, ...]
    device: torch.device
    seeds_host: tuple[int, ...]
    # (B,) device tensors
    temperature: torch.Tensor  # float32; 1.0 on greedy rows (never divided by there)
    top_k: torch.Tensor  # int64; 0 = off
    top_p: torch.Tensor  # float32; inf = off
    log_min_p: torch.Tensor  # float32; -inf = off
    repetition_penalty: torch.Tensor  # float32
    presence_penalty: torch.Tensor  # float32
    frequency_penalty: torch.Tensor  # float32
    min_length: torch.Tensor  # int64; 0 on rows without end_id or with ignore_eos
    end_id: torch.Tensor  # int64; clamped to >= 0, see ban_end_always / min_length for use
    ban_end_always: torch.Tensor  # bool; ignore_eos rows with an end_id
    no_repeat_ngram_size: torch.Tensor  # int64
    seeds: torch.Tensor  # int64 holding the uint64 seed's bits
    # bad words as (row, banned last token, prefix that must end the sequence) triples
    bad_rows: torch.Tensor  # (P,) int64
    bad_last: torch.Tensor  # (P,) int64
    bad_prefix: torch.Tensor  # (P, M) int64, right padded with -1
    bad_prefix_len: torch.Tensor  # (P,) int64
    # host facts
    all_greedy: bool
    greedy_rows: torch.Tensor | None  # (G,) int64 when some but not all rows are greedy
    sample_rows: torch.Tensor | None  # (S,) int64 when some but not all rows sample
    use_topk_candidates: bool  # every sampling row has 0 < top_k <= TOP_K_FAST_MAX
    max_top_k: int
    has_top_k: bool
    has_top_p: bool
    has_min_p: bool
    has_repetition_penalty: bool
    has_frequency_presence: bool
    has_end_ban: bool
    ngram_groups: tuple[tuple[int, torch.Tensor], ...]  # (n, rows (R,) int64) per distinct n > 0
    has_bad_words: bool
    bad_words_need_history: bool
    max_token_id: int  # largest end_id / bad-word id, checked against the vocab in `sample`
    any_logprobs: bool

    @property
    def batch_size(self) -> int:
        return len(self.params)

    @property
    def needs_history(self) -> bool:
        """Whether `sample` needs the rows' prompt/output token ids."""
        return (self.has_repetition_penalty or self.has_frequency_presence or bool(self.ngram_groups)
                or self.bad_words_need_history)

    @property
    def needs_steps(self) -> bool:
        """Whether `sample` needs each row's count of generated tokens."""
        return not self.all_greedy or self.has_end_ban

    @property
    def modifies_logits(self) -> bool:
        return self.needs_history or self.has_end_ban or self.has_bad_words

    @classmethod
    def build(cls, params: Sequence[SamplingParams], device: torch.device | str = "cpu") -> SamplingTensors:
        params = tuple(params)
        if not params:
            raise ValueError("params must hold at least one SamplingParams (batch_size >= 1)")
        for i, p in enumerate(params):
            if not isinstance(p, SamplingParams):
                raise ValueError(f"params[{i}] must be a SamplingParams, got {type(p).__name__}")  # noqa: TRY004
        device = torch.device(device)
        B = len(params)
        greedy = [p.is_greedy for p in params]
        sampling = [p for p, g in zip(params, greedy) if not g]
        seeds = tuple(random_seed() if p.seed is None else p.seed for p in params)

        def t(values: list[Any], dtype: torch.dtype) -> torch.Tensor:
            # Built whenever the engine's batch changes: must not wait for the step in flight.
            return to_device(torch.tensor(values, dtype=dtype), device)

        has_end = [p.end_id >= 0 for p in params]
        # Bad words: one triple per (row, word); the prefix must match the sequence's tail.
        triples = [(b, w[-1], w[:-1]) for b, p in enumerate(params) for w in p.bad_words]
        max_prefix = max((len(pre) for _, _, pre in triples), default=0)
        prefix = np.full((len(triples), max_prefix), -1, dtype=np.int64)
        for i, (_, _, pre) in enumerate(triples):
            prefix[i, :len(pre)] = pre
        ngram_sizes = sorted({p.no_repeat_ngram_size for p in params if p.no_repeat_ngram_size > 0})
        ngram_groups = tuple(
            (n, t([b for b, p in enumerate(params) if p.no_repeat_ngram_size == n], torch.int64))
            for n in ngram_sizes)
        ids = [p.end_id for p in params] + [tok for _, tok, _ in triples] + [int(prefix.max(initial=-1))]
        some_greedy = any(greedy) and not all(greedy)
        return cls(
            params=params, device=device, seeds_host=seeds,
            temperature=t([1.0 if g else float(p.temperature) for p, g in zip(params, greedy)], torch.float32),
            top_k=t([int(p.top_k) for p in params], torch.int64),
            top_p=t([float(p.top_p) if 0.0 < p.top_p < 1.0 else math.inf for p in params], torch.float32),
            log_min_p=t([math.log(p.min_p) if p.min_p > 0 else -math.inf for p in params], torch.float32),
            repetition_penalty=t([float(p.repetition_penalty) for p in params], torch.float32),
            presence_penalty=t([float(p.presence_penalty) for p in params], torch.float32),
            frequency_penalty=t([float(p.frequency_penalty) for p in params], torch.float32),
            min_length=t([p.min_length if e and not p.ignore_eos else 0 for p, e in zip(params, has_end)],
                         torch.int64),
            end_id=t([max(p.end_id, 0) for p in params], torch.int64),
            ban_end_always=t([p.ignore_eos and e for p, e in zip(params, has_end)], torch.bool),
            no_repeat_ngram_size=t([p.no_repeat_ngram_size for p in params], torch.int64),
            seeds=t([to_int64_seed(s) for s in seeds], torch.int64),
            bad_rows=t([b for b, _, _ in triples], torch.int64),
            bad_last=t([tok for _, tok, _ in triples], torch.int64),
            bad_prefix=to_device(torch.from_numpy(prefix), device),
            bad_prefix_len=t([len(pre) for _, _, pre in triples], torch.int64),
            all_greedy=all(greedy),
            greedy_rows=t([b for b in range(B) if greedy[b]], torch.int64) if some_greedy else None,
            sample_rows=t([b for b in range(B) if not greedy[b]], torch.int64) if some_greedy else None,
            use_topk_candidates=bool(sampling) and all(0 < p.top_k <= TOP_K_FAST_MAX for p in sampling),
            max_top_k=max((p.top_k for p in sampling), default=0),
            has_top_k=any(p.top_k > 0 for p in sampling),
            has_top_p=any(0.0 < p.top_p < 1.0 for p in sampling),
            has_min_p=any(p.min_p > 0 for p in sampling),
            has_repetition_penalty=any(p.repetition_penalty != 1.0 for p in params),
            has_frequency_presence=any(p.presence_penalty != 0 or p.frequency_penalty != 0 for p in params),
            has_end_ban=any(e and (p.ignore_eos or p.min_length > 0) for p, e in zip(params, has_end)),
            ngram_groups=ngram_groups,
            has_bad_words=bool(triples),
            bad_words_need_history=max_prefix > 0,
            max_token_id=max(ids),
            any_logprobs=any(p.logprobs for p in params),
        )


@dataclass(frozen=True)
class SampleOutput:
    """`token_ids`: (B,) int64 chosen tokens. `logprobs`: (B,) float32 log-probability of each
    chosen token under the *raw* model logits (log_softmax before penalties, bans, temperature
    and filters, as TRT-LLM reports them), or None when no row asked for logprobs."""

    token_ids: torch.Tensor
    logprobs: torch.Tensor | None


TokenIds = Sequence[Sequence[int]] | torch.Tensor  # per row, or (B, L) right padded with ids < 0


def sample(logits: torch.Tensor, st: SamplingTensors, *, prompt_ids: TokenIds | None = None,
           output_ids: TokenIds | None = None, steps: Sequence[int] | torch.Tensor | None = None,
           ) -> SampleOutput:
    """Choose one token per row of `logits` (B, V).

    `prompt_ids` / `output_ids`: each row's prompt and generated tokens so far, as lists or
    right-padded tensors (pad with -1). Needed only when `st.needs_history` (repetition /
    presence / frequency penalties, no_repeat_ngram_size, multi-token bad words); repetition,
    no-repeat n-grams and bad words look at prompt + output, presence/frequency at output only.
    `steps`: (B,) number of tokens each row has generated so far; defaults to the lengths of
    `output_ids`. It drives `min_length` and is the counter of the seeded noise, so the same
    (seed, step, logits, params) gives the same token whatever else is in the batch.

    Order: repetition -> presence/frequency -> min_length -> bad words -> no-repeat n-grams ->
    ignore_eos -> greedy rows take the argmax; sampling rows: temperature -> top-k -> top-p ->
    min-p -> exponential race (Gumbel-max) with counter-based noise.
    """
    if logits.dim() != 2 or logits.shape[0] != st.batch_size:
        raise ValueError(f"logits must have shape (batch_size={st.batch_size}, vocab), got {tuple(logits.shape)}")
    B, V = logits.shape
    if st.max_token_id >= V:
        raise ValueError(f"end_id / bad_words token ids must be < vocab size {V}, got {st.max_token_id}")
    device = logits.device
    history = None
    if st.needs_history:
        if output_ids is None and prompt_ids is None:
            raise ValueError("output_ids (and prompt_ids) are required: a row uses repetition/presence/"
                             "frequency penalties, no_repeat_ngram_size or multi-token bad_words")
        history = TokenHistory.build(prompt_ids, output_ids, B, device)
    steps_t = _steps(steps, output_ids, history, B, device) if st.needs_steps else None

    x = logits.to(dtype=torch.float32, copy=True) if st.modifies_logits else logits.float()  # (B, V)
    if st.has_repetition_penalty:
        x = apply_repetition_penalty(x, history.token_ids, st.repetition_penalty)
    if st.has_frequency_presence:
        x = apply_frequency_presence_penalty(x, history.output_counts(V), st.frequency_penalty,
                                             st.presence_penalty)
    if st.has_end_ban:  # min_length and ignore_eos both ban end_id; one scatter for both
        ban = st.ban_end_always | (steps_t < st.min_length)  # (B,)
        end = st.end_id[:, None]  # (B, 1)
        x.scatter_(1, end, torch.where(ban[:, None], -math.inf, x.gather(1, end)))
    if st.has_bad_words:
        x = apply_bad_words(x, st.bad_rows, st.bad_last, st.bad_prefix, st.bad_prefix_len,
                            history if st.bad_words_need_history else None)
    for n, rows in st.ngram_groups:
        x = apply_no_repeat_ngram(x, history, n, rows)

    if st.all_greedy:
        tokens = argmax_rows(x)
    else:
        rows = st.sample_rows
        xs = x if rows is None else x.index_select(0, rows)  # (S, V)
        sel = (lambda v: v) if rows is None else (lambda v: v.index_select(0, rows))
        sampled = _sample_rows(xs, st, sel(st.temperature), sel(st.top_k), sel(st.top_p),
                               sel(st.log_min_p), sel(st.seeds), sel(steps_t))
        tokens = sampled if rows is None else argmax_rows(x).index_copy_(0, rows, sampled)
    logprobs = None
    if st.any_logprobs:
        logprobs = torch.log_softmax(logits.float(), dim=-1).gather(1, tokens[:, None]).squeeze(1)
    return SampleOutput(tokens, logprobs)


def _steps(steps: Any, output_ids: Any, history: TokenHistory | None, B: int,
           device: torch.device) -> torch.Tensor:
    if steps is not None:
        s = to_device(torch.as_tensor(steps, dtype=torch.int64), device)
        if s.shape != (B,):
            raise ValueError(f"steps must have shape ({B},), got {tuple(s.shape)}")
        return s
    if history is not None:
        return history.lengths - history.prompt_lengths
    if output_ids is None:
        raise ValueError("steps (tokens generated per row) or output_ids is required when a row "
                         "samples or uses min_length/ignore_eos")
    if isinstance(output_ids, torch.Tensor):
        return (output_ids >= 0).sum(dim=1).to(device=device, dtype=torch.int64)
    return to_device(torch.tensor([len(o) for o in output_ids], dtype=torch.int64), device)


def _sample_rows(x: torch.Tensor, st: SamplingTensors, temperature: torch.Tensor, top_k: torch.Tensor,
                 top_p: torch.Tensor, log_min_p: torch.Tensor, seeds: torch.Tensor,
                 steps: torch.Tensor) -> torch.Tensor:
    """Sample one token per row of x (S, V) among the rows' filtered candidates."""
    S, V = x.shape
    x = x / temperature[:, None]  # (S, V)
    if st.use_topk_candidates:
        vals, idx = x.topk(min(st.max_top_k, V), dim=-1)  # (S, K) sorted descending
    elif st.has_top_k or st.has_top_p:
        vals, idx = x.sort(dim=-1, descending=True)  # (S, V)
    else:  # only min-p (or nothing): no order needed
        vals, idx = x, None
    keep = filter_sorted(vals, top_k if st.has_top_k else None, top_p if st.has_top_p else None,
                         log_min_p if st.has_min_p else None, is_sorted=idx is not None)
    if keep is not None:
        vals = vals.masked_fill(~keep, -math.inf)
    # Exponential race: argmax(p_i / E_i) == argmax(logit_i + Gumbel_i); normalisation-free.
    if x.is_cuda:  # one fused pass; the torch form below materialises ~15 (S, K) temporaries
        from runtime_lib.kernels.sampling import gumbel_argmax

        choice = gumbel_argmax(vals.contiguous(), seeds, steps, None if idx is None else idx.contiguous())
        return choice if idx is None else idx.gather(1, choice[:, None]).squeeze(1)
    if idx is None:
        idx = torch.arange(V, device=x.device).expand(S, V)  # (S, V)
    choice = (vals + gumbel_noise(seeds, steps, idx)).argmax(dim=-1, keepdim=True)  # (S, 1)
    return idx.gather(1, choice).squeeze(1)


__all__ = [
    "MAX_SEED",
    "TOP_K_FAST_MAX",
    "SampleOutput",
    "SamplingParams",
    "SamplingTensors",
    "random_seed",
    "sample",
]
