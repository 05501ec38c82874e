"""Batched beam search that reproduces Hugging Face transformers 5.x `_beam_search` step for step
(candidates, scores, length normalisation, tie-breaking, early stopping); the decode loop calls
`BeamSearch.step` once per generated token when `num_beams > 1`.

How a caller drives it (static batch, `B` prompts, `k = num_beams`):

1. Prefill each prompt. Feed the first step either `B` rows (one per prompt) or `B * k` rows
   (each prompt repeated `k` times, as HF does). Only beam 0 of each prompt is alive at first
   (the other beams start at -1e9, as in HF), so the copies never win.
2. `out = bs.step(log_probs)` with `log_probs` as HF computes them in beam search:
   `log_softmax(logits.float())` *then* the logits processors (min_length, repetition
   penalty, ...). HF applies processors after the log-softmax here, without renormalising.
3. Reorder the per-beam state (KV cache, processors' history) with
   `state.index_select(0, out.parent_beams)`: `parent_beams[i]` indexes the rows fed to this
   step. Then run the model on `out.next_tokens` (one token per row, `B * k` rows).
4. Stop when `bs.is_done()`; `bs.finalize()` gives the `num_return_sequences` best hypotheses
   per prompt. A prompt whose `batch_done` flag is set can no longer change its result, but its
   rows must still be fed (any finite values) until the whole batch is done.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch
from torch import Tensor

# HF's "minus infinity" for beams that must not be chosen; kept identical so sums round the same.
_NEG = -1.0e9


class EarlyStopping(enum.IntEnum):
    """HF's `early_stopping` values under TensorRT-LLM's integer encoding."""

    HEURISTIC = 0  # HF False: stop when the best running beam, at its current length, can't win
    ON = 1         # HF True: stop as soon as `num_beams` hypotheses are finished
    NEVER = 2      # HF "never": canonical beam search, stop only when no improvement is possible

    @classmethod
    def parse(cls, value: int | bool | str, field: str = "early_stopping") -> EarlyStopping:
        """TRT-LLM int (0, 1, >1), HF bool or "never" -> EarlyStopping."""
        if isinstance(value, str):
            if value.lower() == "never":
                return cls.NEVER
            raise ValueError(f"{field} must be an int >= 0, a bool or 'never', got {value!r}")
        if isinstance(value, Tensor):
            value = value.item()
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{field} must be an int >= 0 (0 = heuristic, 1 = stop when num_beams "
                             f"hypotheses are done, >1 = never), a bool or 'never', got {value!r}")
        return cls(min(int(value), 2))

    def to_hf(self) -> bool | str:
        return {EarlyStopping.HEURISTIC: False, EarlyStopping.ON: True, EarlyStopping.NEVER: "never"}[self]


def _per_row(field: str, value, batch_size: int) -> list:
    if isinstance(value, Tensor):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            return list(value) * batch_size
        if len(value) != batch_size:
            raise ValueError(f"{field} has {len(value)} values for a batch of {batch_size}; "
                             f"give one value or one per batch entry")
        return list(value)
    return [value] * batch_size


def validate_beam_search_params(
    *, batch_size: int, num_beams: int, max_new_tokens: int,
    length_penalty: float | list[float] = 1.0, early_stopping: int | bool | str | list = 1,
    num_return_sequences: int = 1,
) -> tuple[list[float], list[EarlyStopping]]:
    """Check beam-search arguments once, at the edge. Returns `length_penalty` and
    `early_stopping` expanded to one value per batch entry; raises ValueError naming the field."""
    for name, value, lo in (("batch_size", batch_size, 1), ("num_beams", num_beams, 1),
                            ("max_new_tokens", max_new_tokens, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    if isinstance(num_return_sequences, bool) or not isinstance(num_return_sequences, int) \
            or not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"num_return_sequences must be an integer in [1, num_beams={num_beams}], "
                         f"got {num_return_sequences!r}")
    penalties = []
    for v in _per_row("length_penalty", length_penalty, batch_size):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"length_penalty must be a finite float (>1 favours longer, <1 shorter "
                             f"hypotheses), got {v!r}")
        penalties.append(float(v))
    modes = [EarlyStopping.parse(v) for v in _per_row("early_stopping", early_stopping, batch_size)]
    return penalties, modes


@dataclass(frozen=True)
class BeamStepOutput:
    next_tokens: Tensor      # (B*k,) int64: token each surviving beam feeds to the next step
    parent_beams: Tensor     # (B*k,) int64: row of this step's input that each beam continues
    cum_log_probs: Tensor    # (B*k,) float32: running beams' summed log-probs (HF's running scores)
    batch_done: Tensor       # (B,) bool: this prompt's finished hypotheses can no longer change


@dataclass(frozen=True)
class BeamSearchResult:
    output_ids: Tensor        # (B, R, max_new_tokens) int64, generated tokens only, padded with pad_id;
                              # a hypothesis that ended on end_id includes it (as HF's `sequences`)
    sequence_lengths: Tensor  # (B, R) int64: generated tokens per hypothesis, end_id included
    sequences_scores: Tensor  # (B, R) float32: cum_log_probs / sequence_lengths ** length_penalty
    cum_log_probs: Tensor     # (B, R) float32: summed log-probs of the hypothesis' tokens
    log_probs: Tensor         # (B, R, max_new_tokens) float32: per-token log-probs (0 past the end)


def _gather_beams(x: Tensor, idx: Tensor) -> Tensor:
    """x: (B, N, ...), idx: (B, M) -> (B, M, ...) (HF's `_gather_beams`)."""
    while idx.dim() < x.dim():
        idx = idx.unsqueeze(-1)
    return torch.take_along_dim(x, idx, dim=1)


class BeamSearch:
    """One static batch's beam search state. Scores, ordering and stopping equal HF's
    `generate(num_beams=k, do_sample=False, ...)`; per-batch-entry length_penalty and
    early_stopping are allowed (HF takes one value for the batch)."""

    def __init__(self, batch_size: int, num_beams: int, *, end_id: int, max_new_tokens: int,
                 length_penalty: float | list[float] = 1.0, early_stopping: int | list[int] = 1,
                 num_return_sequences: int = 1, pad_id: int | None = None,
                 device: str | torch.device = "cpu") -> None:
        penalties, modes = validate_beam_search_params(
            batch_size=batch_size, num_beams=num_beams, max_new_tokens=max_new_tokens,
            length_penalty=length_penalty, early_stopping=early_stopping,
            num_return_sequences=num_return_sequences)
        self.batch_size = B = batch_size
        self.num_beams = k = num_beams
        self.end_id = int(end_id)  # < 0: no end token (ignore_eos); only max_new_tokens stops
        self.max_new_tokens = T = max_new_tokens
        self.num_return_sequences = num_return_sequences
        self.pad_id = self.end_id if pad_id is None else int(pad_id)
        self.device = dev = torch.device(device)
        # HF keeps (1 + number of eos tokens) * k candidates, at least 2k, so that k of them
        # are still running even when every beam picked eos.
        self.num_candidates = 2 * k

        # Length-normalisation denominators, computed on the host in double precision as HF's
        # `n ** length_penalty` (Python floats), so the float32 division rounds identically.
        # denom[b, n-1] = n ** lp_b scores a hypothesis of n generated tokens; heur[b, n-1] is the
        # best length `_check_early_stop_heuristic` assumes after n tokens.
        self._denom = torch.tensor([[n ** lp for n in range(1, T + 1)] for lp in penalties],
                                   dtype=torch.float32, device=dev)  # (B, T)
        self._heur_denom = torch.tensor(
            [[(T if (m is EarlyStopping.NEVER and lp > 0.0) else n) ** lp for n in range(1, T + 1)]
             for lp, m in zip(penalties, modes)], dtype=torch.float32, device=dev)  # (B, T)
        self._stop_when_full = torch.tensor([m is EarlyStopping.ON for m in modes],
                                            device=dev).view(B, 1)  # (B, 1)
        self._top_k_mask = torch.arange(self.num_candidates, device=dev) < k  # (2k,)
        self._batch_offsets = torch.arange(B, device=dev).view(B, 1)  # (B, 1)

        # Running beams. Only beam 0 is alive at the start (HF: -1e9 for the others).
        self._run_ids = torch.full((B, k, T), self.pad_id, dtype=torch.int64, device=dev)
        self._run_token_lp = torch.zeros((B, k, T), dtype=torch.float32, device=dev)
        self._run_scores = torch.zeros((B, k), dtype=torch.float32, device=dev)
        self._run_scores[:, 1:] = _NEG
        # Finished hypotheses, kept sorted by normalised score (best first).
        self._fin_ids = self._run_ids.clone()
        self._fin_token_lp = self._run_token_lp.clone()
        self._fin_scores = torch.full((B, k), _NEG, dtype=torch.float32, device=dev)
        self._fin_cum = torch.zeros((B, k), dtype=torch.float32, device=dev)
        self._fin_lengths = torch.zeros((B, k), dtype=torch.int64, device=dev)
        self._is_fin = torch.zeros((B, k), dtype=torch.bool, device=dev)
        # HF's `is_early_stop_heuristic_unsatisfied`: could a running beam still beat the worst
        # finished one? Once False for a prompt it stays False.
        self._improvable = torch.ones((B, 1), dtype=torch.bool, device=dev)
        self._batch_done = torch.zeros((B,), dtype=torch.bool, device=dev)
        self.num_generated = 0

    def step(self, log_probs: Tensor) -> BeamStepOutput:
        """Advance every prompt by one token. `log_probs`: (B*k, V), or (B, V) on the first step."""
        B, k, T, n = self.batch_size, self.num_beams, self.max_new_tokens, self.num_generated
        if n >= T:
            raise RuntimeError(f"beam search already generated max_new_tokens={T} tokens")
        rows = log_probs.shape[0]
        if log_probs.dim() != 2 or rows not in ((B * k, B) if n == 0 else (B * k,)):
            allowed = f"({B * k}, vocab)" + (f" or ({B}, vocab)" if n == 0 else "")
            raise ValueError(f"log_probs must have shape {allowed}, got {tuple(log_probs.shape)}")
        V = log_probs.shape[1]
        if V < 2:  # 2k candidates must exist among k * V continuations
            raise ValueError(f"log_probs must have a vocab dimension >= 2, got {V}")
        rows_per_prompt = rows // B
        lp = log_probs.to(device=self.device, dtype=torch.float32)
        if rows_per_prompt == 1:  # first step from one prefill row per prompt
            lp = lp.repeat_interleave(k, dim=0)
        token_lp = lp.view(B, k * V)                                              # (B, k*V)
        acc = (lp.view(B, k, V) + self._run_scores[:, :, None]).view(B, k * V)    # (B, k*V)

        # c. best 2k continuations over all beams (HF `_get_top_k_continuations`)
        cand_lp, cand_idx = torch.topk(acc, k=self.num_candidates)                # (B, 2k)
        cand_beam = cand_idx // V                                                 # (B, 2k)
        cand_tok = cand_idx % V                                                   # (B, 2k)
        cand_ids = _gather_beams(self._run_ids, cand_beam)                        # (B, 2k, T)
        cand_ids[:, :, n] = cand_tok
        cand_token_lp = _gather_beams(self._run_token_lp, cand_beam)              # (B, 2k, T)
        cand_token_lp[:, :, n] = token_lp.gather(1, cand_idx)

        # d. which candidates end here: end token, or max_new_tokens reached
        if n + 1 >= T:
            hits = torch.ones_like(cand_tok, dtype=torch.bool)                    # (B, 2k)
        elif self.end_id >= 0:
            hits = cand_tok == self.end_id
        else:
            hits = torch.zeros_like(cand_tok, dtype=torch.bool)

        # e. next running beams: best k candidates that did not end
        run_lp = cand_lp + hits.to(torch.float32) * _NEG                          # (B, 2k)
        keep = torch.topk(run_lp, k=k)[1]                                         # (B, k)
        self._run_ids = _gather_beams(cand_ids, keep)                             # (B, k, T)
        self._run_token_lp = _gather_beams(cand_token_lp, keep)
        self._run_scores = _gather_beams(run_lp, keep)                            # (B, k)
        parent = _gather_beams(cand_beam, keep) + self._batch_offsets * rows_per_prompt  # (B, k)

        # f. merge candidates that ended among the top k into the finished hypotheses
        just_done = hits & self._top_k_mask[None, :]                              # (B, 2k)
        fin_lp = cand_lp / self._denom[:, n:n + 1]                                # (B, 2k)
        full = self._is_fin.all(dim=-1, keepdim=True) & self._stop_when_full      # (B, 1)
        fin_lp += full.to(torch.float32) * _NEG
        fin_lp += (~self._improvable).to(torch.float32) * _NEG
        fin_lp += (~just_done) * _NEG
        merged = torch.cat((self._fin_scores, fin_lp), dim=1)                     # (B, 3k)
        best = torch.topk(merged, k=k)[1]                                         # (B, k)
        self._fin_scores = _gather_beams(merged, best)
        self._fin_ids = _gather_beams(torch.cat((self._fin_ids, cand_ids), dim=1), best)
        self._fin_token_lp = _gather_beams(torch.cat((self._fin_token_lp, cand_token_lp), dim=1), best)
        self._fin_cum = _gather_beams(torch.cat((self._fin_cum, cand_lp), dim=1), best)
        self._fin_lengths = _gather_beams(
            torch.cat((self._fin_lengths, torch.full_like(cand_idx, n + 1)), dim=1), best)
        self._is_fin = _gather_beams(torch.cat((self._is_fin, just_done), dim=1), best)

        # g. can a running beam still improve on the finished ones? (HF `_check_early_stop_heuristic`)
        self.num_generated = n = n + 1
        best_running = self._run_scores[:, :1] / self._heur_denom[:, n - 1:n]     # (B, 1)
        worst_finished = torch.where(self._is_fin, self._fin_scores.min(dim=1, keepdim=True)[0], _NEG)
        self._improvable = self._improvable & (best_running > worst_finished).any(dim=-1, keepdim=True)
        full = self._is_fin.all(dim=-1, keepdim=True) & self._stop_when_full
        # HF stops the whole batch only when every prompt is done; a done prompt's finished set is
        # frozen by the masks above, so ending it early gives the same result.
        self._batch_done = (self._batch_done | ~self._improvable[:, 0] | full[:, 0]
                            | hits.all(dim=-1))
        return BeamStepOutput(
            next_tokens=self._run_ids[:, :, n - 1].reshape(B * k),
            parent_beams=parent.reshape(B * k),
            cum_log_probs=self._run_scores.reshape(B * k),
            batch_done=self._batch_done.clone())

    def is_done(self) -> bool:
        """True when no prompt's result can change any more (one host sync)."""
        return self.num_generated >= self.max_new_tokens or bool(self._batch_done.all())

    def finalize(self) -> BeamSearchResult:
        """Best `num_return_sequences` hypotheses per prompt, best first.

        Called before `is_done()` (cancellation, stop words), the running beams of prompts that
        are not done are scored at their current length and merged in, as HF does when
        max_length is reached; that path has no HF reference to match."""
        n, k, R = self.num_generated, self.num_beams, self.num_return_sequences
        if n == 0:
            raise RuntimeError("finalize() called before any step(); nothing was generated")
        fin_scores, fin_ids, fin_token_lp = self._fin_scores, self._fin_ids, self._fin_token_lp
        fin_cum, fin_lengths = self._fin_cum, self._fin_lengths
        if not self.is_done():
            run_lp = self._run_scores / self._denom[:, n - 1:n]                   # (B, k)
            run_lp = run_lp + self._batch_done[:, None].to(torch.float32) * _NEG
            merged = torch.cat((fin_scores, run_lp), dim=1)                       # (B, 2k)
            best = torch.topk(merged, k=k)[1]
            fin_scores = _gather_beams(merged, best)
            fin_ids = _gather_beams(torch.cat((fin_ids, self._run_ids), dim=1), best)
            fin_token_lp = _gather_beams(torch.cat((fin_token_lp, self._run_token_lp), dim=1), best)
            fin_cum = _gather_beams(torch.cat((fin_cum, self._run_scores), dim=1), best)
            fin_lengths = _gather_beams(
                torch.cat((fin_lengths, torch.full_like(fin_lengths, n)), dim=1), best)
        return BeamSearchResult(
            output_ids=fin_ids[:, :R].clone(), sequence_lengths=fin_lengths[:, :R].clone(),
            sequences_scores=fin_scores[:, :R].clone(), cum_log_probs=fin_cum[:, :R].clone(),
            log_probs=fin_token_lp[:, :R].clone())


__all__ = ["BeamSearch", "BeamStepOutput", "BeamSearchResult", "EarlyStopping",
           "validate_beam_search_params"]
