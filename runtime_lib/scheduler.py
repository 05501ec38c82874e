"""In-flight batching scheduler: each step, which sequences run and how many tokens each
computes, under a token budget and the KV block pool (pure Python, no model).

One step = running sequences first (decodes and unfinished prefill chunks, in order), then
new admissions from the waiting queue. Prefills are chunked to fit the budget; when blocks
run out the newest running sequence is preempted by recompute (its blocks freed, it goes
back to the front of the queue and later recomputes prompt + generated tokens).
"""
from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from runtime_lib.kv_cache import BlockCopy, BlocksManager
from runtime_lib.sequence import Sequence, SequenceStatus

PolicyKey = Callable[[Sequence], Any]


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one step. `long_prefill_token_threshold` caps the tokens one prefill may
    take per step so a long prompt cannot starve the others; `max_waiting` bounds the queue
    (a full queue rejects new requests: "server busy")."""

    max_num_seqs: int
    max_num_batched_tokens: int
    long_prefill_token_threshold: int | None = None
    max_waiting: int = 1024

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.long_prefill_token_threshold is not None and self.long_prefill_token_threshold < 1:
            raise ValueError(f"long_prefill_token_threshold must be >= 1 or None, "
                             f"got {self.long_prefill_token_threshold}")


class RequestRejectedError(Exception):
    """`Scheduler.add` refused a request; the message names the limit and the numbers."""


class QueueFullError(RequestRejectedError):
    """The waiting queue is at `max_waiting`: the server is busy, retry later."""


class RequestTooLargeError(RequestRejectedError):
    """The request could never fit in the KV pool, even running alone."""


@dataclass(slots=True)
class ScheduledSequence:
    """One sequence's share of a step: compute `token_ids[num_computed_tokens :
    num_computed_tokens + num_new_tokens]`; sample from the last logits if `needs_logits`."""

    seq: Sequence
    num_new_tokens: int
    needs_logits: bool
    block_copies: list[BlockCopy] = field(default_factory=list)
    num_computed_tokens: int = -1  # snapshot at schedule time (-1: take it from `seq`)

    def __post_init__(self) -> None:
        if self.num_computed_tokens == -1:
            self.num_computed_tokens = self.seq.num_computed_tokens

    @property
    def token_ids(self) -> list[int]:
        start = self.num_computed_tokens
        return self.seq.token_ids[start:start + self.num_new_tokens]

    @property
    def context_len(self) -> int:
        """KV length of the sequence after this step (AttentionMetadata's context_lens)."""
        return self.num_computed_tokens + self.num_new_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: list[ScheduledSequence]
    preempted: list[Sequence]
    num_batched_tokens: int

    @property
    def block_copies(self) -> list[BlockCopy]:
        """Every copy of this step, to execute before the forward: in this order or all at
        once (sources gathered first), never after any write of the step."""
        return [copy for s in self.scheduled for copy in s.block_copies]

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Decides each step's batch. Driver loop: `add` requests, `schedule()`, run the model on
    the output (block copies first), `on_step_done(output)`, append sampled tokens, `finish`
    the sequences that stopped; `abort` from anywhere between steps.

    `policy`: "fcfs" (arrival order), "priority" (lower `Sequence.priority` first, then
    arrival), or a key function (lower first) ordering both admission and preemption
    (the running sequence with the highest key is preempted first).
    """

    def __init__(self, config: SchedulerConfig, blocks: BlocksManager,
                 policy: Literal["fcfs", "priority"] | PolicyKey = "fcfs") -> None:
        self.config = config
        self.blocks = blocks
        if policy == "fcfs":
            self._key: PolicyKey | None = None
        elif policy == "priority":
            self._key = lambda s: (s.priority, s.arrival_time)
        elif callable(policy):
            self._key = policy
        else:
            raise ValueError(f"policy must be 'fcfs', 'priority' or a key function, got {policy!r}")
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # scheduling order; the last one is preempted first
        self._requests: dict[str, Sequence] = {}
        self.num_preempted_total = 0

    # --------------------------------------------------------- introspection
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def get(self, request_id: str) -> Sequence | None:
        return self._requests.get(request_id)

    # ------------------------------------------------------------ requests
    def add(self, seq: Sequence) -> None:
        """Queue a new request, or raise `RequestRejectedError` saying why it cannot be."""
        if seq.request_id in self._requests:
            raise ValueError(f"request_id {seq.request_id!r} is already scheduled")
        if seq.block_table or seq.num_computed_tokens:
            raise ValueError(f"request {seq.request_id!r} already holds KV state "
                             f"({len(seq.block_table)} blocks, {seq.num_computed_tokens} computed tokens)")
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"server busy: waiting queue is full (max_waiting="
                                 f"{self.config.max_waiting}, {len(self.running)} running); retry later")
        # The last generated token is sampled, never computed, so it needs no KV slot.
        max_kv_tokens = seq.num_prompt_tokens + seq.max_tokens - 1
        num_needed = self.blocks.num_blocks_for(max_kv_tokens)
        if num_needed > self.blocks.num_blocks:
            raise RequestTooLargeError(
                f"request {seq.request_id!r} can never fit: {seq.num_prompt_tokens} prompt tokens + "
                f"max_tokens {seq.max_tokens} need {num_needed} KV blocks of {self.blocks.block_size} "
                f"tokens, the whole pool has {self.blocks.num_blocks}")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self._requests[seq.request_id] = seq

    def fork(self, parent: Sequence, request_id: str, data: Any = None) -> Sequence:
        """A running copy of `parent` sharing all its blocks (n > 1 samples after a shared
        prefill); the first write into a shared partial block is copied on write. Counts
        toward `max_num_seqs`."""
        if parent.status is not SequenceStatus.RUNNING or self._requests.get(parent.request_id) is not parent:
            raise ValueError(f"only a running sequence can be forked; {parent.request_id!r} is "
                             f"{parent.status.value}")
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already scheduled")
        if len(self.running) >= self.config.max_num_seqs:
            raise ValueError(f"cannot fork {parent.request_id!r}: {len(self.running)} running sequences "
                             f"already reach max_num_seqs={self.config.max_num_seqs}")
        child = Sequence(request_id=request_id, token_ids=list(parent.token_ids),
                         max_tokens=parent.max_tokens, priority=parent.priority,
                         arrival_time=parent.arrival_time, cache_salt=parent.cache_salt, data=data,
                         num_prompt_tokens=parent.num_prompt_tokens,
                         num_computed_tokens=parent.num_computed_tokens,
                         num_cached_tokens=parent.num_cached_tokens,
                         block_table=self.blocks.fork(parent.block_table),
                         status=SequenceStatus.RUNNING)
        self._insert_running(child)
        self._requests[request_id] = child
        return child

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """Remove a sequence for good (stopped, length-capped, aborted) and free its blocks."""
        if not status.is_finished:
            raise ValueError(f"finish status must be a FINISHED_* status, got {status}")
        if self._requests.get(seq.request_id) is not seq:
            raise ValueError(f"request {seq.request_id!r} is not in the scheduler")
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = status
        del self._requests[seq.request_id]

    def abort(self, request_id: str) -> bool:
        """Finish a request as aborted from any state; False if it is unknown (or done)."""
        seq = self._requests.get(request_id)
        if seq is None:
            return False
        self.finish(seq, SequenceStatus.FINISHED_ABORTED)
        return True

    # ---------------------------------------------------------------- step
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        preempted: list[Sequence] = []

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = self._num_new_tokens(seq, seq.num_computed_tokens, budget)
            if num_new <= 0:  # waiting on the engine to append its sampled token
                i += 1
                continue
            copies: list[BlockCopy] = []
            while True:
                cow = self.blocks.make_last_block_writable(seq.block_table, seq.num_computed_tokens)
                if cow is not None:
                    # Kept across retries: the table already points at the copy's target.
                    copies += cow
                    if self.blocks.allocate_slots(seq.block_table, seq.num_computed_tokens,
                                                  num_new) is not None:
                        break
                victim = self.running.pop()  # never one scheduled earlier in this step
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # it preempted itself: it was the last running sequence
            scheduled.append(self._scheduled(seq, num_new, copies))
            budget -= num_new
            i += 1

        # Admitting right after preempting would only thrash (and could schedule a sequence
        # preempted in this very step): wait for blocks to come back.
        while (not preempted and self.waiting and budget > 0
               and len(self.running) < self.config.max_num_seqs):
            seq = self._next_waiting()
            matched, num_cached = self.blocks.match_prefix(seq.token_ids, seq.cache_salt,
                                                           record_stats=False)
            num_new = self._num_new_tokens(seq, num_cached, budget)
            table = list(matched)
            if self.blocks.allocate_slots(table, num_cached, num_new) is None:
                self.blocks.free(matched)  # strict order: nobody overtakes the head of the queue
                break
            self.waiting.remove(seq)
            self.blocks.record_prefix_query(seq.num_tokens, num_cached)
            seq.block_table = table
            seq.num_computed_tokens = num_cached
            seq.num_cached_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            self._insert_running(seq)
            scheduled.append(self._scheduled(seq, num_new, []))
            budget -= num_new

        return SchedulerOutput(scheduled=scheduled, preempted=preempted,
                               num_batched_tokens=self.config.max_num_batched_tokens - budget)

    def on_step_done(self, output: SchedulerOutput) -> None:
        """The driver ran `output`: advance each sequence's computed tokens and hash the
        blocks that just became full for prefix caching. Sequences finished or aborted since
        `schedule()` are skipped."""
        for s in output.scheduled:
            seq = s.seq
            if seq.status is not SequenceStatus.RUNNING or self._requests.get(seq.request_id) is not seq:
                continue
            if seq.num_computed_tokens != s.num_computed_tokens:
                raise RuntimeError(f"on_step_done for request {seq.request_id!r} does not match its "
                                   f"schedule (computed {seq.num_computed_tokens}, scheduled from "
                                   f"{s.num_computed_tokens}): called twice?")
            seq.num_computed_tokens += s.num_new_tokens
            self.blocks.register_full_blocks(seq.block_table, seq.token_ids,
                                             seq.num_computed_tokens, seq.cache_salt)

    # ------------------------------------------------------------- helpers
    def _num_new_tokens(self, seq: Sequence, num_computed: int, budget: int) -> int:
        num_new = seq.num_tokens - num_computed
        threshold = self.config.long_prefill_token_threshold
        if threshold is not None and num_new > threshold:
            num_new = threshold
        return min(num_new, budget)

    def _scheduled(self, seq: Sequence, num_new: int, copies: list[BlockCopy]) -> ScheduledSequence:
        needs_logits = seq.num_computed_tokens + num_new == seq.num_tokens
        return ScheduledSequence(seq, num_new, needs_logits, copies, seq.num_computed_tokens)

    def _next_waiting(self) -> Sequence:
        if self._key is None:
            return self.waiting[0]
        return min(self.waiting, key=self._key)

    def _insert_running(self, seq: Sequence) -> None:
        if self._key is None:
            self.running.append(seq)
        else:
            bisect.insort_right(self.running, seq, key=self._key)

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.num_computed_tokens = 0  # recompute prompt + generated tokens on resume
        seq.num_cached_tokens = 0
        seq.status = SequenceStatus.PREEMPTED
        seq.num_preemptions += 1
        self.num_preempted_total += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        seq.block_table = []


__all__ = ["QueueFullError", "RequestRejectedError", "RequestTooLargeError", "ScheduledSequence",
           "Scheduler", "SchedulerConfig", "SchedulerOutput"]
