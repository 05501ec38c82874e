"""One request's token stream and its place in the KV cache: the record the scheduler,
the block manager and the engine share (no torch here).

The rule both drivers follow: a step computes `token_ids[num_computed_tokens :
num_computed_tokens + n]`. When that reaches `len(token_ids)`, the step's last logits are
sampled and the engine appends the new token, so a decode step is simply n=1 and a
sequence resumed after preemption recomputes prompt + generated tokens the same way.
"""
from __future__ import annotations

import enum
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any


class SequenceStatus(enum.Enum):
    WAITING = "waiting"                  # queued, holds no blocks
    RUNNING = "running"                  # holds blocks, scheduled every step it fits
    PREEMPTED = "preempted"              # blocks taken back; waits to be recomputed
    FINISHED_STOPPED = "stopped"         # end id or a stop sequence
    FINISHED_LENGTH_CAPPED = "length"    # reached max_tokens (or the model's limit)
    FINISHED_ABORTED = "aborted"         # cancelled by the client or failed in the engine
    FINISHED_IGNORED = "ignored"         # rejected before it ever ran

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        """OpenAI-style reason ("stop", "length", "abort"), None while unfinished."""
        return _FINISH_REASONS.get(self)


_FINISHED = frozenset({SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH_CAPPED,
                       SequenceStatus.FINISHED_ABORTED, SequenceStatus.FINISHED_IGNORED})
_FINISH_REASONS = {SequenceStatus.FINISHED_STOPPED: "stop",
                   SequenceStatus.FINISHED_LENGTH_CAPPED: "length",
                   SequenceStatus.FINISHED_ABORTED: "abort",
                   SequenceStatus.FINISHED_IGNORED: "abort"}


@dataclass(slots=True)
class Sequence:
    """A prompt plus the tokens generated so far, and its KV bookkeeping.

    `cache_salt` separates prefix-cache namespaces: requests whose KV differs for the same
    tokens (another LoRA adapter, a prompt-embedding table) must carry different salts.
    `data` is an opaque slot for the engine's per-request state (sampling, stop words, ...).
    """

    request_id: str
    token_ids: list[int]
    max_tokens: int
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    cache_salt: Hashable | None = None
    data: Any = None
    num_prompt_tokens: int = -1          # -1: all of `token_ids` given at construction
    num_computed_tokens: int = 0         # tokens whose KV is in the cache
    num_cached_tokens: int = 0           # of those, taken from the prefix cache at admission
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        self.token_ids = list(self.token_ids)
        if self.num_prompt_tokens == -1:
            self.num_prompt_tokens = len(self.token_ids)
        if self.num_prompt_tokens < 1 or self.num_prompt_tokens > len(self.token_ids):
            raise ValueError(f"num_prompt_tokens must be in [1, {len(self.token_ids)}] for request "
                             f"{self.request_id!r}, got {self.num_prompt_tokens} (is the prompt empty?)")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 for request {self.request_id!r}, "
                             f"got {self.max_tokens}")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens the next steps must still run through the model (>= 1 while running)."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)


__all__ = ["Sequence", "SequenceStatus"]
