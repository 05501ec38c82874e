"""One forward step over a flattened batch, shared by both drivers (GenerationSession and
LLMEngine): turn per-row token slices + block tables into `Session.run` inputs, run, and
return the logits rows that were asked for."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .kv_cache import BlockCopy


@dataclass(slots=True)
class StepRow:
    """Compute `token_ids` at positions `start_pos ...` of one sequence whose KV lives in
    `block_table`; return logits of its last token (`needs_logits`) or of every token
    (`all_logits`, for context logits).

    `feed_index >= 0`: the row's last token is still on the device, sampled by the previous
    step (asynchronous scheduling): it is taken from `feed_tokens[feed_index]` of
    `build_step_inputs`, and the host value in `token_ids` is ignored."""

    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    needs_logits: bool = True
    all_logits: bool = False
    feed_index: int = -1


def to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`host` on `device`. To CUDA from CPU it goes through pinned memory without blocking: a
    copy from pageable memory waits for the work already queued on the stream (a step in
    flight), which would stall a driver that prepares the next step meanwhile."""
    device = torch.device(device)
    if device.type != "cuda" or host.device.type != "cpu":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class HostCopy:
    """Device tensors on their way to the host. On CUDA the copies into pinned memory are
    queued when this is made, so a driver makes it before it queues the next step (a copy
    queued after that step would wait for it), and `lists()` waits only for them."""

    __slots__ = ("_host", "_ready")

    def __init__(self, *tensors: torch.Tensor | None) -> None:
        self._ready = None
        self._host = list(tensors)
        if any(t is not None and t.device.type == "cuda" for t in tensors):
            self._host = [None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                          .copy_(t, non_blocking=True) for t in tensors]
            self._ready = torch.cuda.Event()
            self._ready.record()

    def lists(self) -> list[list | None]:
        """Block until the copies are done; each tensor as a list (None stays None)."""
        if self._ready is not None:
            self._ready.synchronize()
        return [None if t is None else t.tolist() for t in self._host]


def _is_run(values: list[int]) -> bool:
    """values == range(values[0], values[0] + len(values))."""
    return all(b - a == 1 for a, b in zip(values, values[1:]))


def build_step_inputs(rows: Sequence[StepRow], block_size: int, device: torch.device | str,
                      feed_tokens: torch.Tensor | None = None) -> dict:
    """Host lists -> the named tensors `Session.run` takes.

    On CUDA every field travels in one pinned host buffer (one asynchronous host->device copy
    per step; the tensors are views of it, the int64 fields first, in the order input_ids,
    position_ids, slot_mapping, logits_indices that `cuda_graph.packed_rows` recognises);
    elsewhere one tensor per field. `feed_tokens` (N,) int64 on `device`: the previous step's
    sampled tokens, copied device-side into the input slots of rows with `feed_index >= 0` (no
    host sync; one copy when those slots and tokens are both runs, as in a steady decode)."""
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_lens: list[int] = []
    seq_lens: list[int] = []
    logits_indices: list[int] = []
    width = max(len(r.block_table) for r in rows)
    tables: list[int] = []  # (B * width) row-major, padded with block 0
    feed_dst: list[int] = []  # input slot <- feed_tokens[feed_src]
    feed_src: list[int] = []
    for r in rows:
        n = len(r.token_ids)
        first = len(input_ids)
        input_ids += r.token_ids
        if r.feed_index >= 0:
            feed_dst.append(first + n - 1)
            feed_src.append(r.feed_index)
        table = r.block_table
        if n == 1:  # decode row: skip the range/comprehension machinery
            p = r.start_pos
            positions.append(p)
            slots.append(table[p // block_size] * block_size + p % block_size)
        else:
            positions += range(r.start_pos, r.start_pos + n)
            slots += [table[p // block_size] * block_size + p % block_size
                      for p in range(r.start_pos, r.start_pos + n)]
        query_lens.append(n)
        seq_lens.append(r.start_pos + n)
        tables += table
        if len(table) < width:
            tables += [0] * (width - len(table))
        if r.all_logits:
            logits_indices += range(first, first + n)
        elif r.needs_logits:
            logits_indices.append(first + n - 1)

    T, B, N, F = len(input_ids), len(rows), len(logits_indices), len(feed_dst)
    if F and feed_tokens is None:
        raise ValueError(f"{F} rows have feed_index >= 0 but feed_tokens is None")
    device = torch.device(device)
    if device.type == "cuda":
        values64 = input_ids + positions + slots + logits_indices + feed_dst + feed_src
        values32 = query_lens + seq_lens + tables
        n64 = len(values64)
        host = torch.empty(8 * n64 + 4 * len(values32), dtype=torch.uint8, pin_memory=True)
        host[:8 * n64].view(torch.int64).copy_(torch.tensor(values64, dtype=torch.int64))
        host[8 * n64:].view(torch.int32).copy_(torch.tensor(values32, dtype=torch.int32))
        dev = host.to(device, non_blocking=True)
        dev64, dev32 = dev[:8 * n64].view(torch.int64), dev[8 * n64:].view(torch.int32)
        fields = {
            "input_ids": dev64[:T], "position_ids": dev64[T:2 * T], "slot_mapping": dev64[2 * T:3 * T],
            "logits_indices": dev64[3 * T:3 * T + N], "query_lengths": dev32[:B],
            "sequence_lengths": dev32[B:2 * B], "kv_cache_block_offsets": dev32[2 * B:].view(B, width),
        }
        if F:
            if _is_run(feed_dst) and _is_run(feed_src):  # e.g. a steady decode: one copy
                d, s0 = feed_dst[0], feed_src[0]
                fields["input_ids"][d:d + F].copy_(feed_tokens[s0:s0 + F])
            else:
                end = 3 * T + N
                dst, src = dev64[end:end + F], dev64[end + F:end + 2 * F]
                fields["input_ids"].index_copy_(0, dst, feed_tokens.index_select(0, src))  # (F,)
    else:
        fields = {
            "input_ids": torch.tensor(input_ids, dtype=torch.int64, device=device),
            "position_ids": torch.tensor(positions, dtype=torch.int64, device=device),
            "query_lengths": torch.tensor(query_lens, dtype=torch.int32, device=device),
            "sequence_lengths": torch.tensor(seq_lens, dtype=torch.int32, device=device),
            "kv_cache_block_offsets": torch.tensor(tables, dtype=torch.int32, device=device).view(B, width),
            "slot_mapping": torch.tensor(slots, dtype=torch.int64, device=device),
            "logits_indices": torch.tensor(logits_indices, dtype=torch.int64, device=device),
        }
        if F:
            dst = torch.tensor(feed_dst, dtype=torch.int64, device=device)
            src = torch.tensor(feed_src, dtype=torch.int64, device=device)
            fields["input_ids"].index_copy_(0, dst, feed_tokens.to(device).index_select(0, src))  # (F,)
    fields["host_max_query_length"] = max(query_lens)
    fields["host_max_sequence_length"] = max(seq_lens)
    return fields


def apply_block_copies(kv_cache: torch.Tensor, copies: Sequence[BlockCopy]) -> None:
    """Execute copy-on-write block copies on the whole cache (all layers, K and V).

    kv_cache: (num_layers, 2, num_blocks, block_size, kvh, d). Sources are read before any
    destination is written, so chains within one batch of copies are safe."""
    if not copies:
        return
    src = torch.tensor([c.src for c in copies], device=kv_cache.device)
    dst = torch.tensor([c.dst for c in copies], device=kv_cache.device)
    if kv_cache.element_size() == 1:  # FP8: copy the bytes (indexing kernels may lack float8)
        kv_cache = kv_cache.view(torch.uint8)
    kv_cache[:, :, dst] = kv_cache[:, :, src]
