"""Paged KV cache bookkeeping: which block ids each sequence owns, never the tensors.

`BlocksManager` is the pool both drivers share: ref-counted block ids, prefix caching over
chained hashes of full blocks, copy-on-write for forked sequences. `KVCacheManager` is
TensorRT-LLM's static-batch facade over it (`GenerationSession`: rows x beams).

The KV tensor lives with the model. Whenever this module hands a sequence a private copy of
a shared block it returns `BlockCopy(src, dst)`; the driver must copy block `src` into `dst`
(every layer, K and V) before the next forward. Within one step's list no copy's `dst` is
the `src` of a later copy, so the copies may run in order or all at once (gather, then
scatter); a block freed and reused as a `dst` in the same step comes after every read of it.
"Not enough memory" is a value here (`None`), never an exception: the scheduler preempts.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Key of one full block in the prefix cache: (hash of the blocks before it, its tokens).
_BlockKey = tuple[int | None, tuple[int, ...]]


@dataclass(frozen=True, slots=True)
class BlockCopy:
    """Copy KV block `src` into block `dst` (all layers, K and V) before the next forward."""

    src: int
    dst: int


class BlocksManager:
    """A preallocated pool of block ids `0..num_blocks-1` with ref counts.

    A block is either *used* (ref count > 0, in one or more block tables), *cached* (ref
    count 0 but holding a registered prefix hash: free, yet reusable by `match_prefix` until
    evicted, least recently freed first), or plain *free*. Cached blocks count as free.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._free_ids: deque[int] = deque(range(num_blocks))   # ref 0, no hash
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0, hashed; LRU first
        self._block_hash: list[int | None] = [None] * num_blocks
        self._block_key: list[_BlockKey | None] = [None] * num_blocks
        self._hash_to_block: dict[int, int] = {}
        self.prefix_queries = 0  # tokens looked up
        self.prefix_hits = 0     # of those, found in the cache

    # ----------------------------------------------------------------- stats
    @property
    def num_free_blocks(self) -> int:
        return len(self._free_ids) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Free blocks still holding a reusable prefix (evicted on demand)."""
        return len(self._evictable)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def is_cached(self, block_id: int) -> bool:
        """Whether the block is registered in the prefix cache (others may match it)."""
        h = self._block_hash[block_id]
        return h is not None and self._hash_to_block.get(h) == block_id

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------ allocate / free
    def allocate(self, num_blocks: int) -> list[int] | None:
        """`num_blocks` fresh private blocks (ref count 1), or None if the pool is short.

        Plain free blocks go first; cached ones are evicted (LRU) only when those run out."""
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        if num_blocks > self.num_free_blocks:
            return None
        out: list[int] = []
        for _ in range(num_blocks):
            if self._free_ids:
                block = self._free_ids.popleft()
            else:
                block, _ = self._evictable.popitem(last=False)
                self._forget_hash(block)
            self._ref_counts[block] = 1
            out.append(block)
        return out

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference to each block; a block reaching 0 returns to the pool.

        Walks the table backwards so a freed sequence's *later* blocks are evicted before
        its earlier ones: a prefix is only reusable from its start."""
        for block in block_ids:
            if self._ref_counts[block] <= 0:
                raise ValueError(f"block {block} freed with ref count 0 (double free)")
        for block in reversed(block_ids):
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                if self.is_cached(block):
                    self._evictable[block] = None  # most recently freed last
                else:
                    self._forget_hash(block)
                    self._free_ids.append(block)

    def incref(self, block_ids: Sequence[int]) -> None:
        """Add one reference to each block (a cached free block leaves the evictable LRU)."""
        for block in block_ids:
            if self._ref_counts[block] == 0:
                if block not in self._evictable:
                    raise ValueError(f"incref of block {block}, which is free and holds no prefix")
                del self._evictable[block]
            self._ref_counts[block] += 1

    def fork(self, block_table: Sequence[int]) -> list[int]:
        """A new table sharing every block of `block_table` (n > 1 samples, beams)."""
        self.incref(block_table)
        return list(block_table)

    def allocate_slots(self, block_table: list[int], num_computed_tokens: int,
                       num_new_tokens: int) -> list[int] | None:
        """Append the blocks `block_table` needs to hold `num_computed_tokens + num_new_tokens`
        tokens; returns the new blocks, or None (and `block_table` unchanged) if short."""
        needed = self.num_blocks_for(num_computed_tokens + num_new_tokens) - len(block_table)
        if needed <= 0:
            return []
        new = self.allocate(needed)
        if new is not None:
            block_table.extend(new)
        return new

    def make_last_block_writable(self, block_table: list[int], num_tokens: int) -> list[BlockCopy] | None:
        """Copy-on-write before writing token position `num_tokens` (the sequence holds
        `num_tokens` tokens of KV). If the partial block that position falls in is shared,
        swap in a private block and return the copy to perform; `[]` when nothing is shared
        (or the write starts a new block); None when no free block is left (table unchanged)."""
        if num_tokens % self.block_size == 0:
            return []
        index = num_tokens // self.block_size
        if index >= len(block_table):
            return []
        block = block_table[index]
        if self._ref_counts[block] == 1:
            return []
        new = self.allocate(1)
        if new is None:
            return None
        block_table[index] = new[0]
        self.free([block])  # still held by its other owners
        return [BlockCopy(src=block, dst=new[0])]

    # ------------------------------------------------------- prefix caching
    @staticmethod
    def _root_hash(extra_key: Hashable | None) -> int | None:
        return None if extra_key is None else hash(("prefix-salt", extra_key))

    def match_prefix(self, token_ids: Sequence[int], extra_key: Hashable | None = None, *,
                     record_stats: bool = True) -> tuple[list[int], int]:
        """Longest run of cached full blocks that starts `token_ids`: `(block_ids,
        num_cached_tokens)`, the blocks incref'd for the caller's table.

        The last token is never matched: the caller must compute at least one token to get
        logits. `record_stats=False` lets a caller that may still back out (the scheduler,
        short of blocks) count the query once it commits, with `record_prefix_query`."""
        if not self.enable_prefix_caching:
            return [], 0
        bs = self.block_size
        matched: list[int] = []
        parent = self._root_hash(extra_key)
        for i in range((len(token_ids) - 1) // bs):
            key: _BlockKey = (parent, tuple(token_ids[i * bs:(i + 1) * bs]))
            h = hash(key)
            block = self._hash_to_block.get(h)
            if block is None or self._block_key[block] != key:  # miss, or a hash collision
                break
            matched.append(block)
            parent = h
        self.incref(matched)
        num_cached = len(matched) * bs
        if record_stats:
            self.record_prefix_query(len(token_ids), num_cached)
        return matched, num_cached

    def record_prefix_query(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_query_tokens
        self.prefix_hits += num_hit_tokens

    def register_full_blocks(self, block_table: Sequence[int], token_ids: Sequence[int],
                             num_computed_tokens: int, extra_key: Hashable | None = None) -> int:
        """Hash the blocks of `block_table` that are full and computed and not hashed yet, so
        later sequences can match them. Returns how many were newly hashed."""
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        num_full = min(num_computed_tokens // bs, len(block_table))
        # Blocks hash in order, so only the tail after the last hashed one is new: O(1) per
        # decode step instead of re-walking the whole table.
        start = num_full
        while start > 0 and self._block_hash[block_table[start - 1]] is None:
            start -= 1
        parent = self._block_hash[block_table[start - 1]] if start else self._root_hash(extra_key)
        for i in range(start, num_full):
            block = block_table[i]
            key: _BlockKey = (parent, tuple(token_ids[i * bs:(i + 1) * bs]))
            h = hash(key)
            self._block_hash[block] = h
            self._block_key[block] = key
            # A duplicate (same prefix computed twice concurrently) stays unregistered: it is
            # freed as a plain block, and the first copy serves later matches.
            self._hash_to_block.setdefault(h, block)
            parent = h
        return max(num_full - start, 0)

    def reset_prefix_cache(self) -> int:
        """Forget every cached free block (e.g. after weights change). Returns how many."""
        count = len(self._evictable)
        while self._evictable:
            block, _ = self._evictable.popitem(last=False)
            self._forget_hash(block)
            self._free_ids.append(block)
        return count

    def _forget_hash(self, block: int) -> None:
        h = self._block_hash[block]
        if h is not None and self._hash_to_block.get(h) == block:
            del self._hash_to_block[h]
        self._block_hash[block] = None
        self._block_key[block] = None


class OutOfBlocksError(RuntimeError):
    """The static-batch facade cannot preempt: raised when the pool is too small for it."""


@dataclass(frozen=True)
class GenerationSequence:
    """TensorRT-LLM's handle of one batch row (`seq_idx` is the caller's id for it)."""

    seq_idx: int
    batch_idx: int

    def get_batch_idx(self) -> int:
        return self.batch_idx

    def get_seq_idx(self) -> int:
        return self.seq_idx


class KVCacheManager:
    """TensorRT-LLM's `KVCacheManager` for static batches: rows x beams over a `BlocksManager`.

    Lifecycle: `add_sequence(seq, context_len)` per row, then before every generation step
    `step(finished)` reserves room for one more token in each live beam, `reorder_beams`
    after beam search picks parents, `free(batch_idx)` / `free_all()` at the end.
    Differences from TRT-LLM, on purpose: batch indices are stable (finished rows are freed
    and read as zeros in `get_block_offsets`, the others keep their index), and methods
    return the `BlockCopy`s the driver must execute instead of copying themselves.
    """

    def __init__(self, *, num_blocks: int, tokens_per_block: int, max_blocks_per_seq: int,
                 beam_width: int = 1) -> None:
        if max_blocks_per_seq < 1:
            raise ValueError(f"max_blocks_per_seq must be >= 1, got {max_blocks_per_seq}")
        if beam_width < 1:
            raise ValueError(f"beam_width must be >= 1, got {beam_width}")
        # Static batches never register prefixes, so caching would only hold blocks back.
        self.blocks_manager = BlocksManager(num_blocks, tokens_per_block, enable_prefix_caching=False)
        self.tokens_per_block = tokens_per_block
        self.max_blocks_per_seq = max_blocks_per_seq
        self.beam_width = beam_width
        self._tables: dict[int, list[list[int]]] = {}  # batch_idx -> one block table per beam
        self._lens: dict[int, int] = {}                # batch_idx -> tokens with room reserved
        self._sequences: dict[int, GenerationSequence] = {}
        self._num_rows = 0

    @property
    def num_free_blocks(self) -> int:
        return self.blocks_manager.num_free_blocks

    @property
    def sequences(self) -> list[GenerationSequence]:
        return [self._sequences[i] for i in sorted(self._sequences)]

    def sequence_length(self, batch_idx: int) -> int:
        return self._lens[self._check_row(batch_idx)]

    def get_block_table(self, batch_idx: int, beam: int = 0) -> list[int]:
        return list(self._tables[self._check_row(batch_idx)][beam])

    def add_sequence(self, sequence: GenerationSequence, context_len: int,
                     always_share_across_beam: bool = False) -> list[BlockCopy]:
        """Allocate the context's blocks for one row. Beams share the full blocks; each beam
        gets a private partial last block unless `always_share_across_beam`. The context step
        writes beam 0's table; the returned copies then fan its last block out to the beams."""
        row = sequence.batch_idx
        if row < 0:
            raise ValueError(f"batch_idx must be >= 0, got {row}")
        if row in self._tables:
            raise ValueError(f"batch_idx {row} already holds a sequence; free it first")
        if context_len < 1:
            raise ValueError(f"context_len must be >= 1, got {context_len}")
        bs = self.tokens_per_block
        num_ctx_blocks = -(-context_len // bs)
        if num_ctx_blocks > self.max_blocks_per_seq:
            raise ValueError(f"context_len {context_len} needs {num_ctx_blocks} blocks of {bs} tokens, "
                             f"more than max_blocks_per_seq={self.max_blocks_per_seq}")
        private_last = context_len % bs != 0 and self.beam_width > 1 and not always_share_across_beam
        num_needed = num_ctx_blocks + (self.beam_width - 1 if private_last else 0)
        blocks = self.blocks_manager.allocate(num_needed)
        if blocks is None:
            raise OutOfBlocksError(
                f"KV cache out of blocks: context_len {context_len} x beam_width {self.beam_width} "
                f"needs {num_needed} blocks, {self.num_free_blocks} of "
                f"{self.blocks_manager.num_blocks} are free")
        shared = blocks[:num_ctx_blocks - 1] if private_last else blocks[:num_ctx_blocks]
        lasts = blocks[num_ctx_blocks - 1:] if private_last else []
        for _ in range(self.beam_width - 1):
            self.blocks_manager.incref(shared)
        self._tables[row] = [shared + lasts[b:b + 1] for b in range(self.beam_width)]
        self._lens[row] = context_len
        self._sequences[row] = sequence
        self._num_rows = max(self._num_rows, row + 1)
        return [BlockCopy(src=lasts[0], dst=dst) for dst in lasts[1:]]

    def step(self, finished: Sequence[bool]) -> list[BlockCopy]:
        """Free the rows marked finished, then reserve room for one more token in every live
        beam (a new private block on a block boundary; copy-on-write of a shared partial
        block). Call before each generation step. On OutOfBlocksError the manager stays
        consistent (free/free_all release everything) but the step is not applied."""
        if self._tables and len(finished) <= max(self._tables):
            raise ValueError(f"finished has {len(finished)} entries; live rows go up to "
                             f"batch_idx {max(self._tables)}")
        for row in [r for r in self._tables if finished[r]]:
            self.free(row)
        copies: list[BlockCopy] = []
        for row, beams in self._tables.items():
            pos = self._lens[row]
            if pos // self.tokens_per_block >= self.max_blocks_per_seq:
                raise ValueError(f"batch_idx {row} would grow past max_blocks_per_seq="
                                 f"{self.max_blocks_per_seq} ({pos + 1} tokens)")
            for table in beams:
                cow = self.blocks_manager.make_last_block_writable(table, pos)
                if cow is None or self.blocks_manager.allocate_slots(table, pos, 1) is None:
                    raise OutOfBlocksError(
                        f"KV cache out of blocks growing batch_idx {row} to {pos + 1} tokens: "
                        f"{self.num_free_blocks} of {self.blocks_manager.num_blocks} blocks free")
                copies += cow
        for row in self._tables:
            self._lens[row] += 1
        return copies

    def reorder_beams(self, batch_idx: int, parent_beam_of_each_beam: Sequence[int]) -> list[BlockCopy]:
        """Beam b takes over the cache of beam `parent_beam_of_each_beam[b]`: full blocks are
        shared, the partial last block is taken over by one child and copied for the others.
        Parents nobody picked lend their (private) last blocks as copy targets, so a reorder
        needs no free blocks; where none is left (beams that shared one partial block) the
        child shares its parent's block and `step()` copies it on write. Execute the returned
        copies before the next forward."""
        row = self._check_row(batch_idx)
        parents = list(parent_beam_of_each_beam)
        if len(parents) != self.beam_width or any(not 0 <= p < self.beam_width for p in parents):
            raise ValueError(f"parent_beam_of_each_beam must hold {self.beam_width} beam indices in "
                             f"[0, {self.beam_width - 1}], got {parents}")
        old = self._tables[row]
        if self._lens[row] % self.tokens_per_block == 0:  # all blocks full: only sharing changes
            new = [list(old[p]) for p in parents]
            for table in new:
                self.blocks_manager.incref(table)
            for table in old:
                self.blocks_manager.free(table)
            self._tables[row] = new
            return []
        # Which child keeps each picked parent's last block: the parent's own slot if it picked
        # itself, else the first child that picked it.
        keeper: dict[int, int] = {}
        for b, p in enumerate(parents):
            keeper.setdefault(p, b)
        for b, p in enumerate(parents):
            if p == b:
                keeper[p] = b
        spare = [old[p][-1] for p in range(self.beam_width)
                 if p not in keeper and self.blocks_manager.ref_count(old[p][-1]) == 1]
        new, copies, fresh = [], [], []
        for b, p in enumerate(parents):
            table = list(old[p])
            if keeper[p] != b:
                dst = spare.pop() if spare else None
                if dst is None:
                    got = self.blocks_manager.allocate(1)
                    if got is not None:
                        dst = got[0]
                        fresh.append(dst)
                if dst is not None:
                    copies.append(BlockCopy(src=table[-1], dst=dst))
                    table[-1] = dst
                # else: the child shares the parent's partial block; step() copies it on write.
            new.append(table)
        # Every block of the new tables gains a reference (fresh ones already hold theirs),
        # then the old tables drop theirs: kept and spare blocks end where they should.
        fresh_set = set(fresh)
        for table in new:
            self.blocks_manager.incref([blk for blk in table if blk not in fresh_set])
        for table in old:
            self.blocks_manager.free(table)
        self._tables[row] = new
        return copies

    def free(self, batch_idx: int) -> None:
        row = self._check_row(batch_idx)
        for table in self._tables.pop(row):
            self.blocks_manager.free(table)
        del self._lens[row], self._sequences[row]

    def free_all(self) -> None:
        for row in list(self._tables):
            self.free(row)
        self._num_rows = 0

    def get_block_offsets(self, beam_width: int | None = None) -> torch.Tensor:
        """Block ids `[batch, beam_width, max_blocks_per_seq]` int32, padded with 0; `batch`
        counts rows up to the highest batch_idx added since the last `free_all`."""
        import torch

        beams = self.beam_width if beam_width is None else beam_width
        if not 1 <= beams <= self.beam_width:
            raise ValueError(f"beam_width must be in [1, {self.beam_width}], got {beams}")
        out = torch.zeros(self._num_rows, beams, self.max_blocks_per_seq, dtype=torch.int32)
        for row, tables in self._tables.items():
            for b in range(beams):
                out[row, b, :len(tables[b])] = torch.tensor(tables[b], dtype=torch.int32)
        return out

    def _check_row(self, batch_idx: int) -> int:
        if batch_idx not in self._tables:
            raise KeyError(f"batch_idx {batch_idx} holds no sequence (live: {sorted(self._tables)})")
        return batch_idx


__all__ = ["BlockCopy", "BlocksManager", "GenerationSequence", "KVCacheManager", "OutOfBlocksError"]
