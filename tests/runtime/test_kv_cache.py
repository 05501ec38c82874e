"""BlocksManager (pool, ref counts, copy-on-write, prefix caching, LRU eviction) and the
TensorRT-LLM KVCacheManager facade (beams, step, reorder), checked against a simulated KV
store that records which token's KV sits in every slot."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from runtime_lib.kv_cache import BlockCopy, BlocksManager, GenerationSequence, KVCacheManager, OutOfBlocksError


class SimulatedKV:
    """Stands in for the KV tensor: slot (block, offset) holds the token id written there."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.slots: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]

    def copy(self, copies: list[BlockCopy]) -> None:
        for c in copies:
            self.slots[c.dst] = list(self.slots[c.src])

    def write(self, table: list[int], start: int, token_ids: list[int]) -> None:
        for k, tok in enumerate(token_ids):
            pos = start + k
            self.slots[table[pos // self.block_size]][pos % self.block_size] = tok

    def read(self, table: list[int], num_tokens: int) -> list[int | None]:
        bs = self.block_size
        return [self.slots[table[p // bs]][p % bs] for p in range(num_tokens)]


def compute(pool: BlocksManager, kv: SimulatedKV, table: list[int], token_ids: list[int],
            num_computed: int) -> bool:
    """What a driver does for one sequence: CoW, grow, write the new tokens' KV, register."""
    copies = pool.make_last_block_writable(table, num_computed)
    if copies is None or pool.allocate_slots(table, num_computed, len(token_ids) - num_computed) is None:
        return False
    kv.copy(copies)
    kv.write(table, num_computed, token_ids[num_computed:])
    pool.register_full_blocks(table, token_ids, len(token_ids))
    return True


# ------------------------------------------------------------------ pool basics
def test_allocate_hands_out_distinct_blocks_and_none_when_short():
    pool = BlocksManager(num_blocks=4, block_size=2)
    got = pool.allocate(3)
    assert sorted(got) == sorted(set(got)) and len(got) == 3
    assert (pool.num_free_blocks, pool.num_used_blocks, pool.usage) == (1, 3, 0.75)
    assert pool.allocate(2) is None
    assert pool.num_free_blocks == 1  # a failed allocation changes nothing
    pool.free(got)
    assert pool.num_free_blocks == 4 and pool.usage == 0.0


def test_double_free_and_incref_of_free_block_are_errors():
    pool = BlocksManager(num_blocks=2, block_size=2)
    (b,) = pool.allocate(1)
    pool.free([b])
    with pytest.raises(ValueError, match=f"block {b} freed with ref count 0"):
        pool.free([b])
    with pytest.raises(ValueError, match="free and holds no prefix"):
        pool.incref([b])


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_blocks=0, block_size=4), "num_blocks must be >= 1, got 0"),
    (dict(num_blocks=4, block_size=0), "block_size must be >= 1, got 0"),
])
def test_pool_validates_its_size(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BlocksManager(**kwargs)


def test_allocate_slots_grows_to_exactly_the_blocks_needed():
    pool = BlocksManager(num_blocks=4, block_size=4)
    table: list[int] = []
    assert len(pool.allocate_slots(table, 0, 5)) == 2          # 5 tokens -> 2 blocks
    assert pool.allocate_slots(table, 5, 3) == [] and len(table) == 2   # 8 tokens still fit
    assert len(pool.allocate_slots(table, 8, 1)) == 1 and len(table) == 3
    before = list(table)
    assert pool.allocate_slots(table, 9, 8) is None              # needs 2 more, 1 free
    assert table == before and pool.num_free_blocks == 1


# --------------------------------------------------------------- copy-on-write
def test_fork_shares_blocks_and_cow_gives_the_writer_a_private_copy():
    pool, kv = BlocksManager(num_blocks=8, block_size=4), SimulatedKV(8, 4)
    parent = [10, 11, 12, 13, 14, 15]                  # 1.5 blocks
    table: list[int] = []
    assert compute(pool, kv, table, parent, 0)
    child = pool.fork(table)
    assert child == table and all(pool.ref_count(b) == 2 for b in table)

    copies = pool.make_last_block_writable(child, len(parent))
    assert copies == [BlockCopy(src=table[1], dst=child[1])]
    assert child[0] == table[0] and child[1] != table[1]       # full block stays shared
    assert (pool.ref_count(table[0]), pool.ref_count(table[1]), pool.ref_count(child[1])) == (2, 1, 1)
    assert pool.make_last_block_writable(table, len(parent)) == []   # the parent is private again

    kv.copy(copies)
    kv.write(child, 6, [99])
    kv.write(table, 6, [77])
    assert kv.read(child, 7) == parent + [99]
    assert kv.read(table, 7) == parent + [77]
    pool.free(child)
    pool.free(table)
    assert pool.num_free_blocks == 8


def test_cow_needs_nothing_at_a_block_boundary_and_reports_a_full_pool():
    pool = BlocksManager(num_blocks=2, block_size=4)
    table = pool.allocate(1)
    child = pool.fork(table)
    assert pool.make_last_block_writable(child, 4) == []   # next write opens a new block
    pool.allocate(1)                                       # pool now empty
    assert pool.make_last_block_writable(child, 3) is None
    assert child == table and pool.ref_count(table[0]) == 2   # unchanged on failure


# -------------------------------------------------------------- prefix caching
def test_second_sequence_with_the_same_prefix_reuses_its_full_blocks():
    pool, kv = BlocksManager(num_blocks=16, block_size=4), SimulatedKV(16, 4)
    prompt_a = list(range(100, 114))                          # 3 full blocks + 2 tokens
    table_a: list[int] = []
    assert compute(pool, kv, table_a, prompt_a, 0)

    prompt_b = prompt_a[:12] + [7, 8, 9]
    matched, num_cached = pool.match_prefix(prompt_b)
    assert matched == table_a[:3] and num_cached == 12
    assert all(pool.ref_count(b) == 2 for b in matched)
    assert (pool.prefix_queries, pool.prefix_hits) == (15, 12)
    table_b = list(matched)
    assert compute(pool, kv, table_b, prompt_b, num_cached)
    assert kv.read(table_b, 15) == prompt_b

    # Diverging inside the second block: only the first block matches.
    diverging = prompt_a[:5] + [0] * 10
    matched_c, cached_c = pool.match_prefix(diverging)
    assert matched_c == table_a[:1] and cached_c == 4
    assert pool.hit_rate == pytest.approx((12 + 4) / (15 + 15))
    for t in (table_a, table_b, matched_c):
        pool.free(t)
    assert pool.num_free_blocks == 16


def test_match_never_covers_the_whole_prompt():
    pool, kv = BlocksManager(num_blocks=8, block_size=4), SimulatedKV(8, 4)
    prompt = list(range(8))                                   # exactly two full blocks
    table: list[int] = []
    assert compute(pool, kv, table, prompt, 0)
    matched, num_cached = pool.match_prefix(prompt)
    assert num_cached == 4 and num_cached < len(prompt)      # the last token stays to compute
    matched_longer, cached_longer = pool.match_prefix(prompt + [42])
    assert cached_longer == 8 and matched_longer == table


def test_salted_requests_do_not_share_prefixes():
    pool = BlocksManager(num_blocks=8, block_size=2)
    prompt = [5, 6, 7, 8, 9]
    table: list[int] = []
    assert pool.allocate_slots(table, 0, 5) is not None
    pool.register_full_blocks(table, prompt, 5, extra_key="lora-a")
    assert pool.match_prefix(prompt, extra_key="lora-a")[1] == 4
    assert pool.match_prefix(prompt, extra_key="lora-b") == ([], 0)
    assert pool.match_prefix(prompt) == ([], 0)


def test_freed_prefix_blocks_stay_cached_until_evicted_least_recently_freed_first():
    pool, kv = BlocksManager(num_blocks=6, block_size=2), SimulatedKV(6, 2)
    a, b = [1, 2, 3, 4, 9], [5, 6, 7, 8, 9]                   # 2 full blocks + 1 partial each
    table_a, table_b = [], []
    assert compute(pool, kv, table_a, a, 0) and compute(pool, kv, table_b, b, 0)
    pool.free(table_a)
    pool.free(table_b)
    assert pool.num_free_blocks == 6 and pool.num_cached_blocks == 4

    # The two plain free blocks (the partial ones) go first, then A's blocks, later one first.
    first = pool.allocate(2)
    assert set(first) == {table_a[2], table_b[2]} and pool.num_cached_blocks == 4
    (evicted,) = pool.allocate(1)
    assert evicted == table_a[1]
    assert pool.match_prefix(a)[1] == 2                        # A's first block survives
    assert pool.match_prefix(b)[1] == 4                        # B is whole
    pool.free(first + [evicted])
    assert pool.num_free_blocks == 6 - 3                      # the matches still hold 3 blocks


def test_matching_revives_a_cached_block_so_eviction_skips_it():
    pool, kv = BlocksManager(num_blocks=3, block_size=2), SimulatedKV(3, 2)
    a, b = [1, 2, 0], [3, 4, 0]
    table_a, table_b = [], []
    assert compute(pool, kv, table_a, a, 0)
    pool.free(table_a)
    assert compute(pool, kv, table_b, b, 0)
    pool.free(table_b)
    matched, _ = pool.match_prefix(a)                          # A's block is older, yet in use now
    assert matched == table_a[:1] and pool.num_cached_blocks == 1
    got = pool.allocate(2)
    assert table_a[0] not in got and table_b[0] in got
    assert pool.allocate(1) is None


def test_disabled_prefix_caching_never_hits_and_frees_to_the_plain_pool():
    pool, kv = BlocksManager(num_blocks=4, block_size=2, enable_prefix_caching=False), SimulatedKV(4, 2)
    table: list[int] = []
    assert compute(pool, kv, table, [1, 2, 3, 4, 5], 0)
    pool.free(table)
    assert pool.match_prefix([1, 2, 3, 4, 5]) == ([], 0)
    assert pool.num_cached_blocks == 0 and pool.hit_rate == 0.0


def test_reset_prefix_cache_forgets_cached_blocks():
    pool, kv = BlocksManager(num_blocks=4, block_size=2), SimulatedKV(4, 2)
    table: list[int] = []
    assert compute(pool, kv, table, [1, 2, 3, 4, 5], 0)
    pool.free(table)
    assert pool.reset_prefix_cache() == 2
    assert pool.num_cached_blocks == 0 and pool.num_free_blocks == 4
    assert pool.match_prefix([1, 2, 3, 4, 5]) == ([], 0)


def test_duplicate_prefix_computed_twice_serves_matches_from_the_first_copy():
    pool, kv = BlocksManager(num_blocks=8, block_size=2), SimulatedKV(8, 2)
    prompt = [1, 2, 3]
    first, second = [], []
    assert compute(pool, kv, first, prompt, 0) and compute(pool, kv, second, prompt, 0)
    assert pool.is_cached(first[0]) and not pool.is_cached(second[0])
    pool.free(second)
    assert pool.num_cached_blocks == 0                       # the duplicate went to the plain pool
    assert pool.match_prefix(prompt)[0] == first[:1]


# ------------------------------------------------ property test: BlocksManager
class BlocksMachine(RuleBasedStateMachine):
    """Random new/append/fork/free over a tiny pool; the KV each table reads must be its own."""

    @initialize(num_blocks=st.integers(3, 10), block_size=st.integers(1, 3))
    def setup(self, num_blocks: int, block_size: int) -> None:
        self.pool = BlocksManager(num_blocks, block_size)
        self.kv = SimulatedKV(num_blocks, block_size)
        self.seqs: list[tuple[list[int], list[int]]] = []   # (table, tokens with KV written)

    @rule(tokens=st.lists(st.integers(0, 2), min_size=1, max_size=8))
    def new_sequence(self, tokens: list[int]) -> None:
        matched, num_cached = self.pool.match_prefix(tokens)
        assert num_cached < len(tokens)
        table = list(matched)
        if compute(self.pool, self.kv, table, tokens, num_cached):
            self.seqs.append((table, list(tokens)))
        else:
            self.pool.free(table)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), token=st.integers(0, 2))
    def append(self, data, token: int) -> None:
        table, tokens = data.draw(st.sampled_from(self.seqs))
        if compute(self.pool, self.kv, table, tokens + [token], len(tokens)):
            tokens.append(token)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def fork(self, data) -> None:
        table, tokens = data.draw(st.sampled_from(self.seqs))
        self.seqs.append((self.pool.fork(table), list(tokens)))

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data) -> None:
        index = data.draw(st.integers(0, len(self.seqs) - 1))
        table, _ = self.seqs.pop(index)
        self.pool.free(table)

    @invariant()
    def ref_counts_match_tables_and_kv_is_intact(self) -> None:
        if not hasattr(self, "pool"):
            return
        holders = [0] * self.pool.num_blocks
        for table, tokens in self.seqs:
            for block in table:
                holders[block] += 1
            assert self.kv.read(table, len(tokens)) == tokens
        assert holders == [self.pool.ref_count(b) for b in range(self.pool.num_blocks)]
        assert self.pool.num_free_blocks == holders.count(0)
        assert self.pool.num_free_blocks + self.pool.num_used_blocks == self.pool.num_blocks

    def teardown(self) -> None:
        if hasattr(self, "pool"):
            for table, _ in self.seqs:
                self.pool.free(table)
            assert self.pool.num_free_blocks == self.pool.num_blocks


BlocksMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None,
                                           suppress_health_check=[HealthCheck.too_slow])
test_blocks_manager_properties = BlocksMachine.TestCase


# ------------------------------------------------------------- KVCacheManager
def test_static_batch_rows_get_context_blocks_and_offsets():
    mgr = KVCacheManager(num_blocks=8, tokens_per_block=4, max_blocks_per_seq=3)
    assert mgr.add_sequence(GenerationSequence(seq_idx=0, batch_idx=0), context_len=5) == []
    assert mgr.add_sequence(GenerationSequence(seq_idx=1, batch_idx=1), context_len=4) == []
    offsets = mgr.get_block_offsets(beam_width=1)
    assert offsets.shape == (2, 1, 3) and str(offsets.dtype) == "torch.int32"
    assert offsets[0, 0, :2].tolist() == mgr.get_block_table(0) and offsets[0, 0, 2] == 0
    assert offsets[1, 0, :1].tolist() == mgr.get_block_table(1)
    assert mgr.num_free_blocks == 8 - 3


def test_step_reserves_a_block_on_a_boundary_and_frees_finished_rows():
    mgr = KVCacheManager(num_blocks=8, tokens_per_block=4, max_blocks_per_seq=4)
    mgr.add_sequence(GenerationSequence(0, 0), context_len=3)
    mgr.add_sequence(GenerationSequence(1, 1), context_len=4)
    mgr.step([False, False])                        # row 0 -> 4 tokens (same block), row 1 -> 5
    assert [len(mgr.get_block_table(r)) for r in (0, 1)] == [1, 2]
    assert [mgr.sequence_length(r) for r in (0, 1)] == [4, 5]
    mgr.step([False, True])                         # row 1 finished: freed, row 0 grows a block
    assert len(mgr.get_block_table(0)) == 2 and mgr.num_free_blocks == 6
    offsets = mgr.get_block_offsets()
    assert offsets.shape[0] == 2 and offsets[1].abs().sum() == 0   # stable index, zeros when freed
    mgr.step([True, False])
    assert mgr.num_free_blocks == 8


def test_beams_share_full_context_blocks_and_copy_the_partial_one():
    bs, width = 4, 3
    mgr = KVCacheManager(num_blocks=16, tokens_per_block=bs, max_blocks_per_seq=4, beam_width=width)
    kv = SimulatedKV(16, bs)
    context = list(range(10))                       # 2 full blocks + 2 tokens
    copies = mgr.add_sequence(GenerationSequence(0, 0), context_len=len(context))
    tables = [mgr.get_block_table(0, b) for b in range(width)]
    assert all(t[:2] == tables[0][:2] for t in tables)
    assert len({t[2] for t in tables}) == width
    assert copies == [BlockCopy(tables[0][2], tables[b][2]) for b in (1, 2)]
    assert mgr.num_free_blocks == 16 - 2 - width
    kv.write(tables[0], 0, context)                 # the context step writes beam 0
    kv.copy(copies)
    assert all(kv.read(t, 10) == context for t in tables)


def _run_beam_step(mgr: KVCacheManager, kv: SimulatedKV, row: int, width: int,
                   beam_tokens: list[list[int]], new: list[int]) -> None:
    """Reserve a slot, write each beam's new token's KV, remember what each beam holds."""
    kv.copy(mgr.step([False] * (row + 1)))
    pos = mgr.sequence_length(row) - 1
    for b in range(width):
        kv.write(mgr.get_block_table(row, b), pos, [new[b]])
        beam_tokens[b].append(new[b])


def test_reorder_beams_gives_each_beam_its_parents_cache_without_extra_blocks():
    bs, width = 4, 3
    mgr = KVCacheManager(num_blocks=16, tokens_per_block=bs, max_blocks_per_seq=4, beam_width=width)
    kv = SimulatedKV(16, bs)
    context = [1, 2, 3, 4, 5]
    copies = mgr.add_sequence(GenerationSequence(0, 0), context_len=5)
    kv.write(mgr.get_block_table(0, 0), 0, context)
    kv.copy(copies)
    beams = [list(context) for _ in range(width)]
    _run_beam_step(mgr, kv, 0, width, beams, [10, 20, 30])
    free_before = mgr.num_free_blocks

    parents = [0, 0, 2]                              # beam 1 dropped, beam 0 doubled
    copies = mgr.reorder_beams(0, parents)
    kv.copy(copies)
    beams = [list(beams[p]) for p in parents]
    assert len(copies) == 1 and mgr.num_free_blocks == free_before
    for b in range(width):
        assert kv.read(mgr.get_block_table(0, b), 6) == beams[b]
    # Beams diverge again without disturbing each other.
    _run_beam_step(mgr, kv, 0, width, beams, [11, 12, 13])
    for b in range(width):
        assert kv.read(mgr.get_block_table(0, b), 7) == beams[b]
    mgr.free_all()
    assert mgr.num_free_blocks == 16


def test_reorder_with_only_full_blocks_just_shares():
    mgr = KVCacheManager(num_blocks=8, tokens_per_block=2, max_blocks_per_seq=4, beam_width=2)
    mgr.add_sequence(GenerationSequence(0, 0), context_len=4)
    assert mgr.reorder_beams(0, [1, 1]) == []
    assert mgr.get_block_table(0, 0) == mgr.get_block_table(0, 1)
    with pytest.raises(ValueError, match=r"parent_beam_of_each_beam must hold 2 beam indices in \[0, 1\]"):
        mgr.reorder_beams(0, [0, 2])
    mgr.free(0)
    assert mgr.num_free_blocks == 8


def test_static_manager_limits_name_the_numbers():
    mgr = KVCacheManager(num_blocks=4, tokens_per_block=4, max_blocks_per_seq=2, beam_width=2)
    with pytest.raises(ValueError, match="context_len 9 needs 3 blocks of 4 tokens, more than "
                                         "max_blocks_per_seq=2"):
        mgr.add_sequence(GenerationSequence(0, 0), 9)
    mgr.add_sequence(GenerationSequence(0, 0), 5)             # 1 shared + 2 private = 3 blocks
    with pytest.raises(OutOfBlocksError, match="needs 3 blocks, 1 of 4 are free"):
        mgr.add_sequence(GenerationSequence(1, 1), 5)
    with pytest.raises(ValueError, match="batch_idx 0 already holds a sequence"):
        mgr.add_sequence(GenerationSequence(2, 0), 1)
    assert mgr.num_free_blocks == 1
    for _ in range(3):
        mgr.step([False])                                     # 8 tokens: still 2 blocks per beam
    with pytest.raises(ValueError, match="would grow past max_blocks_per_seq=2"):
        mgr.step([False])
    mgr.free_all()
    assert mgr.num_free_blocks == 4


class StaticBatchMachine(RuleBasedStateMachine):
    """Rows come and go, beams step and reorder, some allocations fail: every beam reads its
    own history, and the pool is whole again once every row is freed."""

    @initialize(num_blocks=st.integers(4, 14), bs=st.integers(1, 3), width=st.integers(1, 3))
    def setup(self, num_blocks: int, bs: int, width: int) -> None:
        self.mgr = KVCacheManager(num_blocks=num_blocks, tokens_per_block=bs, max_blocks_per_seq=6,
                                  beam_width=width)
        self.kv = SimulatedKV(num_blocks, bs)
        self.width = width
        self.history: dict[int, list[list[int]]] = {}
        self.next_token = 100

    def _token(self) -> int:
        self.next_token += 1
        return self.next_token

    @rule(row=st.integers(0, 3), context_len=st.integers(1, 7), share=st.booleans())
    def add(self, row: int, context_len: int, share: bool) -> None:
        if row in self.history:
            return
        try:
            copies = self.mgr.add_sequence(GenerationSequence(row, row), context_len,
                                           always_share_across_beam=share)
        except (OutOfBlocksError, ValueError):
            return
        context = [self._token() for _ in range(context_len)]
        self.kv.write(self.mgr.get_block_table(row, 0), 0, context)
        self.kv.copy(copies)
        self.history[row] = [list(context) for _ in range(self.width)]

    @precondition(lambda self: self.history)
    @rule(data=st.data())
    def step(self, data) -> None:
        finished = [data.draw(st.booleans()) if r in self.history else False for r in range(4)]
        finished = [f and data.draw(st.integers(0, 3)) == 0 for f in finished]
        try:
            copies = self.mgr.step(finished)
        except (OutOfBlocksError, ValueError):
            self.mgr.free_all()  # a static batch that cannot grow is abandoned as a whole
            self.history.clear()
            return
        self.kv.copy(copies)
        for row in [r for r in self.history if finished[r]]:
            del self.history[row]
        for row, beams in self.history.items():
            pos = self.mgr.sequence_length(row) - 1
            for b in range(self.width):
                tok = self._token()
                self.kv.write(self.mgr.get_block_table(row, b), pos, [tok])
                beams[b].append(tok)

    @precondition(lambda self: self.history)
    @rule(data=st.data())
    def reorder(self, data) -> None:
        row = data.draw(st.sampled_from(sorted(self.history)))
        parents = data.draw(st.lists(st.integers(0, self.width - 1), min_size=self.width,
                                     max_size=self.width))
        self.kv.copy(self.mgr.reorder_beams(row, parents))
        self.history[row] = [list(self.history[row][p]) for p in parents]

    @invariant()
    def every_beam_reads_its_own_history(self) -> None:
        if not hasattr(self, "mgr"):
            return
        for row, beams in self.history.items():
            for b, tokens in enumerate(beams):
                assert self.kv.read(self.mgr.get_block_table(row, b), len(tokens)) == tokens

    def teardown(self) -> None:
        if hasattr(self, "mgr"):
            self.mgr.free_all()
            assert self.mgr.num_free_blocks == self.mgr.blocks_manager.num_blocks


StaticBatchMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=25, deadline=None,
                                                suppress_health_check=[HealthCheck.too_slow])
test_kv_cache_manager_properties = StaticBatchMachine.TestCase
