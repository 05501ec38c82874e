"""In-flight batching scheduler: admission under the token budget, chunked prefill,
preemption by recompute, prefix-cache hits, rejections, and a property test of random
interleavings. A simulated engine stands in for the model: it executes block copies, writes
each computed token's id into a simulated KV store, and samples a token that depends only
on the sequence's content, so any schedule must end with the same tokens."""
from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from runtime_lib.kv_cache import BlocksManager
from runtime_lib.scheduler import QueueFullError, RequestTooLargeError, Scheduler, SchedulerConfig, SchedulerOutput
from runtime_lib.sequence import Sequence, SequenceStatus

_ids = itertools.count()


def make_seq(prompt: int | list[int], max_tokens: int = 4, request_id: str | None = None,
             **kwargs) -> Sequence:
    token_ids = list(range(1, prompt + 1)) if isinstance(prompt, int) else prompt
    return Sequence(request_id=request_id or f"req-{next(_ids)}", token_ids=token_ids,
                    max_tokens=max_tokens, **kwargs)


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8,
                   max_num_batched_tokens: int = 64, policy="fcfs", **config) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs,
                                     max_num_batched_tokens=max_num_batched_tokens, **config),
                     BlocksManager(num_blocks, block_size), policy=policy)


def next_token(seq: Sequence) -> int:
    """A 'model' whose output depends only on the tokens so far (and a per-sequence offset in
    `seq.data`, so forked samples diverge)."""
    return (sum(seq.token_ids[-3:]) * 7 + len(seq.token_ids) + (seq.data or 0)) % 5


class SimulatedEngine:
    """Drives a scheduler the way LLMEngine does, with a simulated KV store in place of a model."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        bs = scheduler.blocks.block_size
        self.slots = [[None] * bs for _ in range(scheduler.blocks.num_blocks)]
        self.finished: dict[str, list[int]] = {}

    def read(self, seq: Sequence) -> list[int | None]:
        bs = self.scheduler.blocks.block_size
        return [self.slots[seq.block_table[p // bs]][p % bs] for p in range(seq.num_computed_tokens)]

    def step(self) -> SchedulerOutput:
        out = self.scheduler.schedule()
        bs = self.scheduler.blocks.block_size
        for copy in out.block_copies:
            self.slots[copy.dst] = list(self.slots[copy.src])
        for s in out.scheduled:
            for k, tok in enumerate(s.token_ids):
                pos = s.num_computed_tokens + k
                self.slots[s.seq.block_table[pos // bs]][pos % bs] = tok
        self.scheduler.on_step_done(out)
        for s in out.scheduled:
            seq = s.seq
            assert self.read(seq) == seq.token_ids[:seq.num_computed_tokens]
            if s.needs_logits:
                seq.append_token(next_token(seq))
                if seq.num_output_tokens >= seq.max_tokens:
                    self.finished[seq.request_id] = list(seq.token_ids)
                    self.scheduler.finish(seq, SequenceStatus.FINISHED_LENGTH_CAPPED)
        return out

    def run(self, max_steps: int = 200) -> list[SchedulerOutput]:
        outputs = []
        while self.scheduler.has_unfinished():
            outputs.append(self.step())
            assert len(outputs) < max_steps, "scheduler made no progress"
        return outputs


def finish_alone(seq: Sequence) -> list[int]:
    """The tokens `seq` ends with when it decodes from where it is, with nothing beside it."""
    ghost = make_seq(list(seq.token_ids), seq.max_tokens, data=seq.data,
                     num_prompt_tokens=seq.num_prompt_tokens)
    while ghost.num_output_tokens < ghost.max_tokens:
        ghost.append_token(next_token(ghost))
    return ghost.token_ids


def reference_tokens(prompt: list[int], max_tokens: int) -> list[int]:
    return finish_alone(make_seq(list(prompt), max_tokens))


# ------------------------------------------------------------------ admission
def test_admission_fills_the_token_budget_and_chunks_the_last_prompt():
    sched = make_scheduler(max_num_batched_tokens=10)
    seqs = [make_seq(4) for _ in range(3)]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    assert [(s.seq, s.num_new_tokens, s.needs_logits) for s in out.scheduled] == [
        (seqs[0], 4, True), (seqs[1], 4, True), (seqs[2], 2, False)]
    assert out.num_batched_tokens == 10 and out.preempted == []
    assert (sched.num_running, sched.num_waiting) == (3, 0)


def test_admission_stops_at_max_num_seqs():
    sched = make_scheduler(max_num_seqs=2)
    for _ in range(3):
        sched.add(make_seq(3))
    out = sched.schedule()
    assert len(out.scheduled) == 2 and (sched.num_running, sched.num_waiting) == (2, 1)


def test_long_prompt_is_prefilled_in_chunks_while_decodes_keep_running():
    sched = make_scheduler(max_num_batched_tokens=8)
    engine = SimulatedEngine(sched)
    short = make_seq(3, max_tokens=10)
    sched.add(short)
    engine.step()                                           # short: prefill done, first token out
    long = make_seq(list(range(100, 120)), max_tokens=2)    # 20 tokens
    sched.add(long)
    chunks = []
    for _ in range(3):
        out = engine.step()
        by_seq = {s.seq.request_id: s for s in out.scheduled}
        assert by_seq[short.request_id].num_new_tokens == 1   # a decode every step
        chunks.append((by_seq[long.request_id].num_new_tokens, by_seq[long.request_id].needs_logits))
        assert out.num_batched_tokens <= 8
    assert chunks == [(7, False), (7, False), (6, True)]
    assert long.num_output_tokens == 1 and short.num_output_tokens == 4


def test_long_prefill_token_threshold_caps_each_chunk():
    sched = make_scheduler(max_num_batched_tokens=64, long_prefill_token_threshold=5)
    seq = make_seq(12)
    sched.add(seq)
    assert [sched_step(sched) for _ in range(3)] == [[5], [5], [2]]


def sched_step(sched: Scheduler) -> list[int]:
    out = sched.schedule()
    sched.on_step_done(out)
    return [s.num_new_tokens for s in out.scheduled]


# ----------------------------------------------------------------- preemption
def test_preemption_recomputes_and_ends_with_the_same_tokens():
    # 6 blocks of 2 tokens: two sequences of 4 + 6 tokens cannot both finish side by side.
    sched = make_scheduler(num_blocks=6, block_size=2, max_num_batched_tokens=16)
    engine = SimulatedEngine(sched)
    first, second = make_seq([1, 2, 3, 4], max_tokens=6), make_seq([5, 6, 7, 8], max_tokens=6)
    sched.add(first)
    sched.add(second)
    outputs = engine.run()
    preempted = [seq for out in outputs for seq in out.preempted]
    assert preempted and all(seq is second for seq in preempted)   # the newest goes first
    assert sched.num_preempted_total == len(preempted) and second.num_preemptions == len(preempted)
    assert engine.finished[first.request_id] == reference_tokens([1, 2, 3, 4], 6)
    assert engine.finished[second.request_id] == reference_tokens([5, 6, 7, 8], 6)
    assert sched.blocks.num_free_blocks == 6


def test_preempted_sequence_frees_its_blocks_and_waits_at_the_front():
    sched = make_scheduler(num_blocks=4, block_size=2, max_num_batched_tokens=16, max_num_seqs=4)
    engine = SimulatedEngine(sched)
    a, b = make_seq(4, max_tokens=4), make_seq(3, max_tokens=4)
    sched.add(a)
    sched.add(b)
    engine.step()                                  # a: 2 blocks, b: 2 blocks -> pool full
    late = make_seq(2)
    sched.add(late)
    out = engine.step()                            # a needs a third block: b is preempted
    assert out.preempted == [b]
    assert b.status is SequenceStatus.PREEMPTED and b.block_table == [] and b.num_computed_tokens == 0
    assert list(sched.waiting) == [b, late]
    assert [s.seq for s in out.scheduled] == [a]   # no admission in a step that preempted


def test_a_sequence_never_runs_twice_in_one_step():
    sched = make_scheduler(num_blocks=3, block_size=2, max_num_batched_tokens=32)
    engine = SimulatedEngine(sched)
    for _ in range(3):
        sched.add(make_seq(2, max_tokens=4))
    for out in engine.run():
        ids = [s.seq.request_id for s in out.scheduled]
        assert len(ids) == len(set(ids))
        assert not set(ids) & {s.request_id for s in out.preempted}


# --------------------------------------------------------------- prefix cache
def test_second_request_with_the_same_prefix_hits_the_cache():
    sched = make_scheduler(num_blocks=32, block_size=4)
    engine = SimulatedEngine(sched)
    shared = list(range(50, 62))                               # 3 full blocks
    a = make_seq(shared + [1, 2], max_tokens=5)
    sched.add(a)
    engine.step()
    b = make_seq(shared + [3], max_tokens=2)
    sched.add(b)
    out = engine.step()
    (scheduled_b,) = [s for s in out.scheduled if s.seq is b]
    assert b.num_cached_tokens == 12 and scheduled_b.num_computed_tokens == 12
    assert scheduled_b.num_new_tokens == 1 and scheduled_b.needs_logits
    assert b.block_table[:3] == a.block_table[:3]
    assert sched.blocks.prefix_hits == 12 and sched.blocks.prefix_queries == 14 + 13


def test_an_identical_prompt_still_computes_its_last_token():
    sched = make_scheduler(num_blocks=32, block_size=4)
    engine = SimulatedEngine(sched)
    prompt = list(range(8))                                    # exactly 2 full blocks
    first = make_seq(prompt, max_tokens=1)
    sched.add(first)
    engine.run()
    again = make_seq(prompt, max_tokens=1)
    sched.add(again)
    out = engine.step()
    assert again.num_cached_tokens == 4
    assert out.scheduled[0].num_new_tokens == 4 and out.scheduled[0].needs_logits
    assert engine.finished[again.request_id] == engine.finished[first.request_id]


def test_resumed_sequence_reuses_its_own_cached_blocks():
    sched = make_scheduler(num_blocks=5, block_size=2, max_num_batched_tokens=16)
    engine = SimulatedEngine(sched)
    a, b = make_seq([1, 2, 3], max_tokens=4), make_seq([7, 8, 9, 9], max_tokens=3)
    sched.add(a)
    sched.add(b)
    engine.step()
    engine.step()                                # pool full; b has 2 full blocks registered
    assert engine.step().preempted == [b]        # a grows: b's full blocks stay cached
    engine.run()
    assert b.num_preemptions == 1 and b.num_cached_tokens == 4   # recompute found its own blocks
    assert engine.finished[b.request_id] == reference_tokens([7, 8, 9, 9], 3)


# ---------------------------------------------------------------------- fork
def test_forked_samples_share_blocks_until_they_write_then_diverge():
    sched = make_scheduler(num_blocks=8, block_size=4)
    engine = SimulatedEngine(sched)
    parent = make_seq([1, 2, 3, 4, 5], max_tokens=4, data=0)
    sched.add(parent)
    engine.step()                                            # prefill + first token: 6 tokens
    child = sched.fork(parent, "child", data=1)
    expected_child = finish_alone(child)
    assert child.block_table == parent.block_table and child.status is SequenceStatus.RUNNING
    assert all(sched.blocks.ref_count(b) == 2 for b in parent.block_table)
    out = engine.step()                                      # both write into the partial block
    (copy,) = out.block_copies
    assert copy.src in child.block_table and copy.dst in parent.block_table
    assert parent.block_table[0] == child.block_table[0]     # the full block stays shared
    engine.run()
    assert engine.finished["child"] != engine.finished[parent.request_id]
    assert engine.finished["child"] == expected_child
    assert sched.blocks.num_free_blocks == 8


def test_copy_on_write_survives_a_preemption_retry():
    # The parent's copy-on-write takes the last free block, its next chunk still needs one:
    # the child is preempted (freeing the copy's source) and the retry must keep the copy.
    sched = make_scheduler(num_blocks=4, block_size=2, long_prefill_token_threshold=3)
    engine = SimulatedEngine(sched)
    parent, filler = make_seq([1, 2, 3, 4, 5, 6, 7], max_tokens=1), make_seq([9, 9], max_tokens=2)
    sched.add(parent)
    sched.add(filler)
    engine.step()                          # parent: 3 tokens in 2 blocks, filler: 1 block
    child = sched.fork(parent, "child")
    shared_partial = parent.block_table[1]
    out = engine.step()                    # the engine checks the parent's KV after the step
    assert child in out.preempted
    (scheduled_parent,) = [s for s in out.scheduled if s.seq is parent]
    assert [c.src for c in scheduled_parent.block_copies] == [shared_partial]
    assert parent.num_computed_tokens == 6


def test_fork_respects_max_num_seqs_and_needs_a_running_parent():
    sched = make_scheduler(max_num_seqs=1)
    seq = make_seq(3)
    sched.add(seq)
    with pytest.raises(ValueError, match="only a running sequence can be forked; 'req-.*' is waiting"):
        sched.fork(seq, "c")
    sched.schedule()
    with pytest.raises(ValueError, match="1 running sequences already reach max_num_seqs=1"):
        sched.fork(seq, "c")


# -------------------------------------------------------------------- policy
@pytest.mark.parametrize("policy, victim", [("fcfs", "newer"), ("priority", "older")])
def test_fcfs_preempts_the_newest_and_priority_the_least_important(policy, victim):
    sched = make_scheduler(num_blocks=4, block_size=2, max_num_batched_tokens=16, policy=policy)
    engine = SimulatedEngine(sched)
    older = make_seq(3, max_tokens=5, priority=1)
    sched.add(older)
    engine.step()
    newer = make_seq([7, 8, 9], max_tokens=5, priority=0)
    sched.add(newer)
    engine.step()                              # pool full: 2 blocks each
    out = engine.step()                        # `older` reaches a block boundary
    assert out.preempted == [older if victim == "older" else newer]


def test_priority_policy_admits_lower_values_first():
    sched = make_scheduler(num_blocks=4, block_size=2, max_num_batched_tokens=3, policy="priority")
    low, high = make_seq([5, 6, 7], priority=5), make_seq([1, 2, 3], priority=0)
    sched.add(low)
    sched.add(high)
    out = sched.schedule()
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(high, 3)]
    sched.on_step_done(out)
    high.append_token(1)
    out = sched.schedule()
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(high, 1), (low, 2)]
    sched.on_step_done(out)
    assert sched.running == [high, low]


def test_custom_policy_key_orders_admission():
    sched = make_scheduler(max_num_seqs=1, policy=lambda s: -len(s.token_ids))   # longest first
    short, long = make_seq(2), make_seq(5)
    sched.add(short)
    sched.add(long)
    assert sched.schedule().scheduled[0].seq is long


# ---------------------------------------------------- rejection, finish, abort
def test_full_waiting_queue_rejects_with_the_limit():
    sched = make_scheduler(max_waiting=2)
    sched.add(make_seq(2))
    sched.add(make_seq(2))
    with pytest.raises(QueueFullError, match=r"server busy: waiting queue is full \(max_waiting=2"):
        sched.add(make_seq(2))


def test_request_that_can_never_fit_is_rejected_with_the_numbers():
    sched = make_scheduler(num_blocks=4, block_size=4)         # 16 tokens of KV in all
    sched.add(make_seq(10, max_tokens=7))                       # 10 + 7 - 1 = 16 tokens: fits
    with pytest.raises(RequestTooLargeError,
                       match=r"10 prompt tokens \+ max_tokens 8 need 5 KV blocks of 4 tokens, "
                             r"the whole pool has 4"):
        sched.add(make_seq(10, max_tokens=8))


def test_duplicate_request_id_is_refused():
    sched = make_scheduler()
    sched.add(make_seq(2, request_id="x"))
    with pytest.raises(ValueError, match="request_id 'x' is already scheduled"):
        sched.add(make_seq(2, request_id="x"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_num_seqs=0, max_num_batched_tokens=8), "max_num_seqs must be >= 1, got 0"),
    (dict(max_num_seqs=1, max_num_batched_tokens=-1), "max_num_batched_tokens must be >= 1, got -1"),
    (dict(max_num_seqs=1, max_num_batched_tokens=8, max_waiting=0), "max_waiting must be >= 1, got 0"),
    (dict(max_num_seqs=1, max_num_batched_tokens=8, long_prefill_token_threshold=0),
     "long_prefill_token_threshold must be >= 1 or None, got 0"),
])
def test_scheduler_config_validation_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SchedulerConfig(**kwargs)


def test_abort_works_from_waiting_running_and_preempted():
    sched = make_scheduler(num_blocks=4, block_size=2, max_num_batched_tokens=16)
    engine = SimulatedEngine(sched)
    a, b, c = make_seq(4, max_tokens=4), make_seq(3, max_tokens=4), make_seq(2)
    for s in (a, b):
        sched.add(s)
    engine.step()
    sched.add(c)
    engine.step()
    assert (a.status, b.status, c.status) == (SequenceStatus.RUNNING, SequenceStatus.PREEMPTED,
                                              SequenceStatus.WAITING)
    for seq in (a, b, c):
        assert sched.abort(seq.request_id)
        assert seq.status is SequenceStatus.FINISHED_ABORTED and seq.block_table == []
    assert not sched.abort(a.request_id) and not sched.abort("nobody")
    assert not sched.has_unfinished() and sched.get(a.request_id) is None
    assert sched.blocks.num_free_blocks == 4


def test_on_step_done_twice_is_an_error_and_finished_sequences_are_skipped():
    sched = make_scheduler()
    seq, other = make_seq(3), make_seq(3)
    sched.add(seq)
    sched.add(other)
    out = sched.schedule()
    sched.abort(other.request_id)
    sched.on_step_done(out)
    assert seq.num_computed_tokens == 3 and other.num_computed_tokens == 0
    with pytest.raises(RuntimeError, match="called twice"):
        sched.on_step_done(out)


# ------------------------------------------------------------ property test
class SchedulerMachine(RuleBasedStateMachine):
    """Random adds, steps, early stops and aborts over a tiny pool (preemption pressure):
    every step keeps the pool's books straight and every sequence's KV intact."""

    @initialize(num_blocks=st.integers(3, 12), block_size=st.integers(1, 4),
                max_num_seqs=st.integers(1, 4), budget=st.integers(1, 12),
                threshold=st.none() | st.integers(1, 6), policy=st.sampled_from(["fcfs", "priority"]))
    def setup(self, num_blocks, block_size, max_num_seqs, budget, threshold, policy) -> None:
        config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                                 long_prefill_token_threshold=threshold, max_waiting=4)
        self.sched = Scheduler(config, BlocksManager(num_blocks, block_size), policy=policy)
        self.engine = SimulatedEngine(self.sched)
        self.expected: dict[str, list[int]] = {}
        self.aborted: set[str] = set()
        self.num_forks = 0
        # Request ids from this case's own counter: ids from the module's shared counter change
        # between a case and its replay (the shrinker's), and ids order ties, so the replay
        # would take other branches (hypothesis: FlakyStrategyDefinition).
        self.num_added = 0

    @rule(prefix=st.sampled_from([[], [1, 2, 3, 4], [1, 2, 3, 4, 1, 2]]),
          suffix=st.lists(st.integers(0, 4), min_size=1, max_size=6),
          max_tokens=st.integers(1, 6), priority=st.integers(0, 2))
    def add(self, prefix, suffix, max_tokens, priority) -> None:
        self.num_added += 1
        seq = make_seq(prefix + suffix, max_tokens=max_tokens, priority=priority, request_id=f"r{self.num_added:03d}")
        pool = self.sched.blocks
        queue_full = self.sched.num_waiting >= self.sched.config.max_waiting
        too_large = pool.num_blocks_for(len(seq.token_ids) + max_tokens - 1) > pool.num_blocks
        try:
            self.sched.add(seq)
        except QueueFullError:
            assert queue_full
            return
        except RequestTooLargeError:
            assert too_large and not queue_full
            return
        assert not (queue_full or too_large)
        self.expected[seq.request_id] = reference_tokens(seq.token_ids, max_tokens)

    @precondition(lambda self: self.sched.has_unfinished())
    @rule()
    def step(self) -> None:
        config = self.sched.config
        out = self.engine.step()
        assert out.scheduled, "unfinished requests but nothing scheduled"
        assert out.num_batched_tokens == sum(s.num_new_tokens for s in out.scheduled)
        assert out.num_batched_tokens <= config.max_num_batched_tokens
        ids = [s.seq.request_id for s in out.scheduled]
        assert len(ids) == len(set(ids)) and len(ids) <= config.max_num_seqs
        assert not set(ids) & {s.request_id for s in out.preempted}
        if config.long_prefill_token_threshold is not None:
            assert all(s.num_new_tokens <= config.long_prefill_token_threshold for s in out.scheduled)

    @precondition(lambda self: self.sched.running)
    @rule(data=st.data())
    def fork(self, data) -> None:
        parent = data.draw(st.sampled_from(self.sched.running))
        if self.sched.num_running >= self.sched.config.max_num_seqs:
            return
        self.num_forks += 1
        child = self.sched.fork(parent, f"{parent.request_id}/{self.num_forks}", data=self.num_forks)
        # The child continues from the parent's tokens with its own sampling offset.
        self.expected[child.request_id] = finish_alone(child)

    @precondition(lambda self: self.sched.running)
    @rule(data=st.data())
    def stop_early(self, data) -> None:
        seq = data.draw(st.sampled_from(self.sched.running))
        if seq.num_output_tokens:
            self.expected[seq.request_id] = self.expected[seq.request_id][:seq.num_tokens]
            self.engine.finished[seq.request_id] = list(seq.token_ids)
            self.sched.finish(seq, SequenceStatus.FINISHED_STOPPED)

    @precondition(lambda self: self.sched.has_unfinished())
    @rule(data=st.data())
    def abort(self, data) -> None:
        live = [seq.request_id for seq in self.sched.running + list(self.sched.waiting)]
        request_id = data.draw(st.sampled_from(sorted(live)))
        assert self.sched.abort(request_id)
        self.aborted.add(request_id)

    @invariant()
    def books_balance(self) -> None:
        if not hasattr(self, "sched"):
            return
        pool = self.sched.blocks
        holders = [0] * pool.num_blocks
        for seq in self.sched.running:
            assert len(seq.block_table) == len(set(seq.block_table))
            for block in seq.block_table:
                holders[block] += 1
            assert self.engine.read(seq) == seq.token_ids[:seq.num_computed_tokens]
        for seq in self.sched.waiting:
            assert seq.block_table == [] and seq.num_computed_tokens == 0
        assert holders == [pool.ref_count(b) for b in range(pool.num_blocks)]
        # Blocks past a sequence's write frontier are private: a shared block is either full or
        # the partial one the next write copies on write.
        for seq in self.sched.running:
            for index, block in enumerate(seq.block_table):
                if holders[block] > 1:
                    assert index <= seq.num_computed_tokens // pool.block_size
        assert pool.num_free_blocks == holders.count(0)
        assert pool.num_free_blocks + pool.num_used_blocks == pool.num_blocks
        assert self.sched.num_running <= self.sched.config.max_num_seqs
        for request_id, tokens in self.engine.finished.items():
            assert tokens == self.expected[request_id]

    def teardown(self) -> None:
        if not hasattr(self, "sched"):
            return
        for _ in range(300):
            if not self.sched.has_unfinished():
                break
            self.engine.step()
        assert not self.sched.has_unfinished()
        for request_id, tokens in self.engine.finished.items():
            assert tokens == self.expected[request_id]
        assert set(self.expected) == set(self.engine.finished) | self.aborted
        assert self.sched.blocks.num_free_blocks == self.sched.blocks.num_blocks


SchedulerMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=40, deadline=None,
                                              suppress_health_check=[HealthCheck.too_slow])
test_scheduler_properties = SchedulerMachine.TestCase
