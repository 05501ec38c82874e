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
    (`all_logits`, for context logits)."""

    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    needs_logits: bool = True
    all_logits: bool = False


def build_step_inputs(rows: Sequence[StepRow], block_size: int, device: torch.device | str) -> dict:
    """Host lists -> the named tensors `Session.run` takes. One host->device copy per tensor."""
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_lens: list[int] = []
    seq_lens: list[int] = []
    logits_indices: list[int] = []
    width = max(len(r.block_table) for r in rows)
    tables: list[list[int]] = []
    for r in rows:
        n = len(r.token_ids)
        first = len(input_ids)
        input_ids += r.token_ids
        positions += range(r.start_pos, r.start_pos + n)
        table = r.block_table
        slots += [table[p // block_size] * block_size + p % block_size
                  for p in range(r.start_pos, r.start_pos + n)]
        query_lens.append(n)
        seq_lens.append(r.start_pos + n)
        tables.append(table + [0] * (width - len(table)))
        if r.all_logits:
            logits_indices += range(first, first + n)
        elif r.needs_logits:
            logits_indices.append(first + n - 1)

    def t(values, dtype=torch.int32):
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    return {
        "input_ids": t(input_ids, torch.int64),
        "position_ids": t(positions, torch.int64),
        "query_lengths": t(query_lens),
        "sequence_lengths": t(seq_lens),
        "kv_cache_block_offsets": t(tables),
        "slot_mapping": t(slots, torch.int64),
        "logits_indices": t(logits_indices, torch.int64),
        "host_max_query_length": max(query_lens),
        "host_max_sequence_length": max(seq_lens),
    }


def apply_block_copies(kv_cache: torch.Tensor, copies: Sequence[BlockCopy]) -> None:
    """Execute copy-on-write block copies on the whole cache (all layers, K and V).

    kv_cache: (num_layers, 2, num_blocks, block_size, kvh, d). Sources are read before any
    destination is written, so chains within one batch of copies are safe."""
    if not copies:
        return
    src = torch.tensor([c.src for c in copies], device=kv_cache.device)
    dst = torch.tensor([c.dst for c in copies], device=kv_cache.device)
    kv_cache[:, :, dst] = kv_cache[:, :, src]
