"""CUDA-graph prefill and mixed steps: one captured forward per token-count bucket.

An eager prefill step of an 8B model launches ~1,300 kernels from Python (~25 ms of host time
for ~8 ms of GPU work at 128 tokens), so time to first token is host-bound. `PrefillGraphRunner`
captures the step at token buckets (16 ... 2048) and replays it for any step that fits: a
prompt, a prefill chunk, or a mixed batch of chunks and decode tokens.

A graph fixes every launch grid, so a bucket fixes the *sizes* and leaves the *split* on the
device: T_b token slots, S = max_num_seqs + 1 sequence slots, L = max_num_seqs logits rows.
A step of T tokens in b sequences fills
  - tokens [0, T) and sequences [0, b) with the real step;
  - tokens [T, T_b) as one *padding sequence* (sequence slot b, P = T_b - T tokens, context P,
    every block-table entry the scratch block): token 0 at position 0, K/V written to slot 0 of
    the scratch block that no sequence owns, attending only within the scratch block;
  - sequence slots (b, S) as empty sequences (0 query tokens, 0 context): the varlen kernel's
    spare programs and the split-K decode kernel skip them;
  - logits rows [N, L) with index 0 (computed and ignored).
`cu_query_lens` is a prefix sum computed inside the graph from the per-sequence query lengths,
so the host writes only the step's tensors. Attention runs with host bounds fixed per bucket
(`max_query_len` = T_b picks the varlen tile, `max_context_len` = the runner's bound fixes
the decode partitions).

Optionally the forward is torch.compile'd (Llama family; `make_compiled_prefill_forward`):
RMSNorm / RoPE / SiLU*mul fuse, and write-KV + varlen attention is one opaque custom op
(`runtime_lib::prefill_attention`). The token dimension is dynamic, so one compilation serves
every bucket; the compiled code is captured in the same graphs.

Steps larger than the largest bucket may run the same (compiled) forward at their own size,
without a graph (`max_unpadded_tokens`: the engine passes its step budget).

`Session.enable_cuda_graphs` builds one beside the decode runner; `Session.run` replays it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .cuda_graph import (
    DecodeForward,
    capture_buckets,
    capture_graph,
    check_graph_pool,
    choose_bucket,
    compile_per_model,
    llama_traced_forward,
    supports_compiled_decode,
    switched_off_by_env,
)
from .layers.attention import AttentionMetadata, paged_attention, write_kv

PREFILL_TOKEN_BUCKETS = (16, 32, 64, 128, 192, 256, 320, 384, 512, 640, 768, 1024, 1280, 1536, 2048)
DEFAULT_MAX_PREFILL_GRAPH_TOKENS = 2048
DISABLE_ENV = "RUNTIME_LIB_PREFILL_GRAPHS"  # "0" turns prefill/mixed graphs off (decode graphs stay)


def prefill_token_buckets(max_num_tokens: int) -> tuple[int, ...]:
    """Token buckets up to `max_num_tokens`: PREFILL_TOKEN_BUCKETS below it, then the limit
    itself. Steps are padded up to their bucket: below ~128 tokens an 8B step is bound by
    reading the weights and padding is nearly free; past that padding costs GPU time, so
    buckets grow by at most a half (a mixed step of one 128-token prompt + a few decode
    tokens lands in 192, not 256)."""
    if max_num_tokens < 1:
        raise ValueError(f"max_num_tokens must be >= 1, got {max_num_tokens}")
    return tuple([b for b in PREFILL_TOKEN_BUCKETS if b < max_num_tokens] + [max_num_tokens])


def prefill_graphs_disabled_by_env() -> bool:
    return switched_off_by_env(DISABLE_ENV)


class PrefillGraphRunner:
    """Static buffers + lazily captured graphs for prefill / mixed steps over one KV pool.

    `kv_cache`: the pool (num_layers, 2, num_blocks, block_size, kvh, d); `scratch_block`: a
    block in it that no sequence owns. `max_num_seqs`: sequences (and logits rows) per step;
    `max_seq_len`: bound on every sequence's kv length; `max_num_tokens`: the largest bucket.
    `pool`: a CUDA graph memory pool to share (the decode runner's). With
    `use_cuda_graph=False` the same padded forward runs eagerly (CPU tests).

    `max_unpadded_tokens`: steps larger than the largest bucket, up to this many tokens, run the
    same forward at their own size, without a graph (0: none; they stay the caller's). For a
    compiled forward: a step of thousands of tokens needs no graph to hide its launches, but its
    norms, RoPE and SiLU*mul run ~3x faster fused than eagerly, and a fixed `max_context_len`
    keeps the attention kernels from JIT-compiling a new variant for each step's context.
    """

    def __init__(self, forward: DecodeForward, kv_cache: torch.Tensor, *, max_num_seqs: int, max_seq_len: int,
                 scratch_block: int, max_num_tokens: int = DEFAULT_MAX_PREFILL_GRAPH_TOKENS,
                 use_cuda_graph: bool | None = None, pool: object = None, max_unpadded_tokens: int = 0) -> None:
        check_graph_pool(kv_cache, scratch_block, max_seq_len)
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_unpadded_tokens < 0:
            raise ValueError(f"max_unpadded_tokens must be >= 0, got {max_unpadded_tokens}")
        self.forward = forward
        self.kv_cache = kv_cache
        self.device = kv_cache.device
        self.block_size = block_size = kv_cache.shape[3]
        self.scratch_block = scratch_block
        self.max_seq_len = max_seq_len
        self.buckets = prefill_token_buckets(max_num_tokens)
        self.use_cuda_graph = self.device.type == "cuda" if use_cuda_graph is None else use_cuda_graph
        if self.use_cuda_graph and self.device.type != "cuda":
            raise ValueError(f"use_cuda_graph=True needs a CUDA kv_cache, got device {self.device}")
        self.max_unpadded_tokens = max_unpadded_tokens
        S, L = max_num_seqs + 1, max_num_seqs
        T = max(self.buckets[-1], max_unpadded_tokens)  # token buffers: the largest step
        # The padding sequence may hold up to T_b - 1 tokens: its table must reach that far too.
        self.max_context_len = max(max_seq_len, self.buckets[-1])
        self.max_blocks_per_seq = math.ceil(self.max_context_len / block_size)
        dev = self.device
        self.input_ids = torch.zeros(T, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(T, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((T,), self.scratch_slot, dtype=torch.int64, device=dev)
        self.seq_lens = torch.zeros(2, S, dtype=torch.int32, device=dev)  # [query_lens; context_lens]
        self.cu_query_lens = torch.zeros(S + 1, dtype=torch.int32, device=dev)
        self.block_tables = torch.full((S, self.max_blocks_per_seq), scratch_block, dtype=torch.int32, device=dev)
        self.logits_indices = torch.zeros(L, dtype=torch.int64, device=dev)
        self.lora_slots = torch.full((T,), -1, dtype=torch.int64, device=dev)  # read by steps with adapters only
        self.logits = None  # (L, V) float32, shared by every bucket's graph; made on first forward
        self._dirty_tokens = 0  # tokens [0, _dirty_tokens) may hold a real step's values
        self._dirty_seqs = 0    # sequence slots [0, _dirty_seqs) may be non-empty
        self._dirty_logits = 0
        self._graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}  # (bucket, with adapters)
        self._pool = pool if pool is not None else (torch.cuda.graph_pool_handle() if self.use_cuda_graph else None)
        self.num_replays = 0

    # ------------------------------------------------------------------ queries
    @property
    def max_num_seqs(self) -> int:
        return self.logits_indices.shape[0]

    @property
    def max_num_tokens(self) -> int:
        return self.buckets[-1]

    @property
    def scratch_slot(self) -> int:
        return self.scratch_block * self.block_size

    @property
    def captured_buckets(self) -> tuple[int, ...]:
        return tuple(sorted({bucket for bucket, _ in self._graphs}))

    def can_run(self, num_tokens: int, num_seqs: int, max_context_len: int, table_width: int,
                num_logits: int) -> bool:
        """Host-only check; a step that does not fit runs eagerly (e.g. a long prompt in one
        chunk, or context logits for every prompt token)."""
        return (0 < num_tokens <= max(self.buckets[-1], self.max_unpadded_tokens) and 0 < num_seqs <= self.max_num_seqs
                and max_context_len <= self.max_seq_len and table_width <= self.max_blocks_per_seq
                and num_logits <= self.max_num_seqs)

    # ------------------------------------------------------------------ running
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            query_lens: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor,
            logits_indices: torch.Tensor, lora_slots: torch.Tensor | None = None) -> torch.Tensor:
        """One step of T tokens in B sequences (any mix of prefill chunks and decode tokens);
        `lora_slots` (T,): each token's LoRA slot (-1: none), for a step with adapters (its own
        graphs). Returns logits (N, V) float32: a view of the graphs' static output, valid
        until the next `run` of this runner."""
        T, B, N, W = input_ids.shape[0], query_lens.shape[0], logits_indices.shape[0], block_tables.shape[1]
        bucket = choose_bucket(T, self.buckets)
        graphed = bucket is not None
        if bucket is None and T <= self.max_unpadded_tokens:
            bucket = T  # no graph, no padding: the padding sequence gets 0 tokens
        if (bucket is None or T < 1 or not 0 < B <= self.max_num_seqs or W > self.max_blocks_per_seq
                or N > self.max_num_seqs):
            raise ValueError(f"step of {T} tokens in {B} sequences, {N} logits, block table width {W} does not "
                             f"fit this runner (max {max(self.buckets[-1], self.max_unpadded_tokens)} tokens, "
                             f"{self.max_num_seqs} sequences and logits, width {self.max_blocks_per_seq})")
        graphed = graphed and self.use_cuda_graph
        key = (bucket, lora_slots is not None)
        if graphed and key not in self._graphs:
            self._capture(*key)
        self._reset(T, B, N)
        self.input_ids[:T].copy_(input_ids, non_blocking=True)
        self.positions[:T].copy_(positions, non_blocking=True)
        self.slot_mapping[:T].copy_(slot_mapping, non_blocking=True)
        self.seq_lens[0, :B].copy_(query_lens, non_blocking=True)
        self.seq_lens[1, :B].copy_(context_lens, non_blocking=True)
        self.seq_lens[:, B].fill_(bucket - T)        # the padding sequence: its tokens are its context
        self.block_tables[:B, :W].copy_(block_tables, non_blocking=True)  # columns >= W are never read
        self.logits_indices[:N].copy_(logits_indices, non_blocking=True)
        if lora_slots is not None:
            self.lora_slots[:T].copy_(lora_slots, non_blocking=True)
        self._dirty_tokens, self._dirty_seqs, self._dirty_logits = T, B + 1, N
        if graphed:
            self._graphs[key].replay()
        else:
            self._forward(*key)
        self.num_replays += 1
        return self.logits[:N]

    def capture(self, num_tokens: Sequence[int] | None = None, lora: bool = False) -> None:
        """Capture graphs now (largest first, so smaller ones reuse its pool memory) instead
        of on first use; `num_tokens` defaults to every bucket; `lora`: the graphs of steps
        with adapters."""
        if self.use_cuda_graph:
            captured = {bucket for bucket, with_lora in self._graphs if with_lora == lora}
            capture_buckets(self.buckets, captured, lambda bucket: self._capture(bucket, lora), num_tokens)

    def _reset(self, num_tokens: int, num_seqs: int, num_logits: int) -> None:
        """What a larger earlier step left beyond this step's tokens, sequences and logits goes
        back to padding; steady state (same sizes) launches nothing here."""
        if self._dirty_tokens > num_tokens:
            self.input_ids[num_tokens:self._dirty_tokens].zero_()
            self.positions[num_tokens:self._dirty_tokens].zero_()
            self.slot_mapping[num_tokens:self._dirty_tokens].fill_(self.scratch_slot)
            self.lora_slots[num_tokens:self._dirty_tokens].fill_(-1)
        if self._dirty_seqs > num_seqs:
            # Slot num_seqs becomes the padding sequence: its whole table must be scratch.
            self.seq_lens[:, num_seqs:self._dirty_seqs].zero_()
            self.block_tables[num_seqs:self._dirty_seqs].fill_(self.scratch_block)
        if self._dirty_logits > num_logits:
            self.logits_indices[num_logits:self._dirty_logits].zero_()  # stale rows may exceed a smaller bucket

    def _meta(self, bucket: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_lens=self.seq_lens[0], context_lens=self.seq_lens[1], block_tables=self.block_tables,
            slot_mapping=self.slot_mapping[:bucket], max_query_len=bucket, max_context_len=self.max_context_len,
            cu_query_lens=self.cu_query_lens, is_decode=False)

    def _forward(self, bucket: int, lora: bool) -> None:
        # Inside the graph: the split of tokens into sequences is data, not shape.
        S = self.seq_lens.shape[1]
        torch.cumsum(self.seq_lens[0], 0, dtype=torch.int32, out=self.cu_query_lens[1:S + 1])
        logits = self.forward(self.input_ids[:bucket], self.positions[:bucket], self.kv_cache,
                              self._meta(bucket), self.logits_indices,
                              **({"lora_slots": self.lora_slots[:bucket]} if lora else {}))  # (L, V)
        if self.logits is None:
            self.logits = torch.empty_like(logits)  # outside any capture: the first forward is a warm-up
        self.logits.copy_(logits)

    def _capture(self, bucket: int, lora: bool) -> None:
        # While warming up and capturing, every token belongs to the padding sequence (slot 0):
        # the eager warm-ups (Triton JIT, cuBLAS workspaces, torch.compile) write only to scratch.
        self._reset(0, 0, 0)
        self.seq_lens[:, 0].fill_(bucket)
        self._dirty_seqs = 1
        self._graphs[bucket, lora] = capture_graph(lambda: self._forward(bucket, lora), self.device, self._pool)[0]


# ----------------------------------------------------------------------------- compiled prefill
@torch.library.custom_op("runtime_lib::prefill_attention", mutates_args=("kv_cache",))
def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, layer: int,
                      slot_mapping: torch.Tensor, block_tables: torch.Tensor, query_lens: torch.Tensor,
                      context_lens: torch.Tensor, cu_query_lens: torch.Tensor, scale: float,
                      sliding_window: int | None, max_context_len: int) -> torch.Tensor:
    """Write this step's k/v (T, kvh, d) into `kv_cache[layer]` and attend q (T, h, d) causally
    over each sequence's paged context: one opaque op so torch.compile keeps the Triton kernels
    out of its trace. The token count T bounds every query length (no host int that varies)."""
    kv_layer = kv_cache[layer]
    write_kv(kv_layer, k, v, slot_mapping)
    meta = AttentionMetadata(query_lens=query_lens, context_lens=context_lens, block_tables=block_tables,
                             slot_mapping=slot_mapping, max_query_len=q.shape[0], max_context_len=max_context_len,
                             cu_query_lens=cu_query_lens, is_decode=False)
    return paged_attention(q, kv_layer, meta, scale, sliding_window).contiguous()


@prefill_attention.register_fake
def _(q, k, v, kv_cache, layer, slot_mapping, block_tables, query_lens, context_lens, cu_query_lens, scale,
      sliding_window, max_context_len):
    return torch.empty_like(q)


def llama_prefill_forward(model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
                          kv_cache: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                          query_lens: torch.Tensor, context_lens: torch.Tensor, cu_query_lens: torch.Tensor,
                          logits_indices: torch.Tensor, max_context_len: int,
                          lora_slots: torch.Tensor | None = None) -> torch.Tensor:
    """`cuda_graph.llama_traced_forward` for flattened tokens of any split, the attention behind
    `prefill_attention` (tests/runtime/test_prefill_graph.py checks parity with the model)."""
    def attend(i, q, k, v, attn):
        return prefill_attention(q, k, v, kv_cache, i, slot_mapping, block_tables, query_lens, context_lens,
                                 cu_query_lens, attn.scale, attn.sliding_window, max_context_len)

    return llama_traced_forward(model, input_ids, positions, logits_indices, attend, lora_slots)


def make_compiled_prefill_forward(model: nn.Module, *, backend: str = "inductor") -> DecodeForward:
    """A forward (same signature as TorchBackend.forward) running `llama_prefill_forward`
    through torch.compile, compiled on its first call (a runner's warm-up, outside capture).

    One compiled step per model: the token dimension is dynamic, so every bucket shares one
    compilation. The sequence and logits dimensions stay static (a dynamic one could be
    duck-sized equal to a token bucket and recompile mid-serving); a runner with another
    max_num_seqs or max_seq_len compiles once more."""
    if not supports_compiled_decode(model):
        raise ValueError(f"compiled prefill supports Llama-family models without dynamic rope, "
                         f"got {type(model).__name__}")
    def step(input_ids, positions, kv_cache, slot_mapping, block_tables, query_lens, context_lens,
             cu_query_lens, logits_indices, max_context_len: int, lora_slots):
        return llama_prefill_forward(model, input_ids, positions, kv_cache, slot_mapping, block_tables,
                                     query_lens, context_lens, cu_query_lens, logits_indices, max_context_len,
                                     lora_slots)

    compiled_step = compile_per_model(model, "_runtime_lib_compiled_prefill", "prefill_step", step, backend)

    @torch.no_grad()
    def forward(input_ids, positions, kv_cache, meta: AttentionMetadata, logits_indices, lora_slots=None):
        torch._dynamo.mark_dynamic(kv_cache, 2)  # num_blocks: any pool
        if input_ids.shape[0] > 1:
            for t in (input_ids, positions, meta.slot_mapping) + (() if lora_slots is None else (lora_slots,)):
                torch._dynamo.mark_dynamic(t, 0)
        cu = meta.cu_query_lens
        if cu is None:
            cu = torch.nn.functional.pad(torch.cumsum(meta.query_lens, 0, dtype=torch.int32), (1, 0))
        return compiled_step(input_ids, positions, kv_cache, meta.slot_mapping, meta.block_tables,
                             meta.query_lens, meta.context_lens, cu, logits_indices, meta.max_context_len,
                             lora_slots)

    return forward


__all__ = [
    "DEFAULT_MAX_PREFILL_GRAPH_TOKENS",
    "PREFILL_TOKEN_BUCKETS",
    "PrefillGraphRunner",
    "llama_prefill_forward",
    "make_compiled_prefill_forward",
    "prefill_attention",
    "prefill_graphs_disabled_by_env",
    "prefill_token_buckets",
]
