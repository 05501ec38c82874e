"""CUDA-graph decode: one captured forward per bucketed batch size, replayed for decode-only steps.

A decode step launches ~40 small kernels per layer; eagerly each costs ~5-10 us of host time,
replayed from a graph ~1 us. `DecodeGraphRunner` owns static input buffers sized for the
largest bucket; a step of B rows is copied into rows [0, B) and the graph of the smallest
bucket G >= B is replayed. Rows [B, G) are padding: token 0 at position 0, written to slot 0 of
a *scratch* KV block that no sequence owns (the pool is allocated with one extra block) and
attending only to it (context length 1), so they never touch live cache and stay finite.

Attention inside a graph runs with `max_context_len` fixed to the runner's `max_seq_len`, so
the split-K decode kernel's partition count is a constant of the graph; programs past a row's
own context exit at once. Logits are computed for every row of the bucket.

Optionally the decode forward of Llama-family models is `torch.compile`d first (fusing
RMSNorm, RoPE and SiLU*mul), with write-KV + paged attention as one opaque custom op so
Dynamo never traces the Triton kernel, and the compiled code is captured in the same graphs.

`Session.enable_cuda_graphs` builds a runner; `Session.run` replays it transparently.
"""
from __future__ import annotations

import math
import os
import types
from collections.abc import Callable, Container, Sequence
from typing import Any

import torch
from torch import nn

from .layers.attention import AttentionMetadata, paged_attention, write_kv
from .lora import LoraSlotStep

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
DISABLE_ENV = "RUNTIME_LIB_CUDA_GRAPHS"  # "0" turns graphs off everywhere (debugging)

# forward(input_ids (T,), positions (T,), kv_cache, meta, logits_indices (N,)[, lora_slots=(T,)])
# -> logits (N, V) fp32; `lora_slots`, each token's lora.LoraSlots slot, only in steps with adapters.
DecodeForward = Callable[..., torch.Tensor]


def graph_batch_sizes(max_batch_size: int) -> tuple[int, ...]:
    """The buckets for batches up to `max_batch_size`: the powers of two in GRAPH_BATCH_SIZES
    below it, then `max_batch_size` itself, so every batch size has a bucket."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    sizes = [b for b in GRAPH_BATCH_SIZES if b < max_batch_size]
    return tuple(sizes + [max_batch_size])


def choose_bucket(num_rows: int, buckets: Sequence[int]) -> int | None:
    """Smallest bucket holding `num_rows` rows; None when the batch is larger than all."""
    for b in buckets:
        if b >= num_rows:
            return b
    return None


def switched_off_by_env(name: str) -> bool:
    """True when environment variable `name` is "0", "false", "off" or "no" (debug switches)."""
    return os.environ.get(name, "1").strip().lower() in ("0", "false", "off", "no")


def cuda_graphs_disabled_by_env() -> bool:
    return switched_off_by_env(DISABLE_ENV)


def graph_unsupported_reason(model: nn.Module) -> str | None:
    """Why this model's decode step cannot be captured, or None.

    Dynamic-NTK RoPE picks its frequencies from the longest sequence of the step (a host
    value that a graph would freeze), so it runs eagerly."""
    config = getattr(model, "config", None)
    scaling = getattr(config, "rope_scaling", None) or {}
    if scaling.get("rope_type", scaling.get("type")) == "dynamic":
        return "dynamic-NTK rope scaling depends on the step's longest sequence"
    return None


def capture_buckets(buckets: Sequence[int], captured: Container[int], capture: Callable[[int], None],
                    sizes: Sequence[int] | None = None) -> None:
    """Capture the buckets covering `sizes` (default: all) that are not captured yet, largest
    first so the smaller graphs reuse its pool memory."""
    wanted = sorted({choose_bucket(n, buckets) or buckets[-1] for n in (sizes or buckets)}, reverse=True)
    for bucket in wanted:
        if bucket not in captured:
            capture(bucket)


def capture_graph(forward: Callable[[], Any], device: torch.device,
                  pool: object) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Run `forward` twice on a side stream (Triton JIT, cuBLAS workspaces and torch.compile
    happen outside the capture), then capture it into a graph on `pool`: (graph, its output)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):
            forward()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph, pool=pool):
        out = forward()
    return graph, out


def check_graph_pool(kv_cache: torch.Tensor, scratch_block: int, max_seq_len: int) -> None:
    """Validate what every graph runner is built over: the KV pool, its unowned scratch block
    (padding writes there) and the bound on context lengths."""
    if kv_cache.dim() != 6 or kv_cache.shape[1] != 2:
        raise ValueError(f"kv_cache must be (num_layers, 2, num_blocks, block_size, kvh, d), "
                         f"got shape {tuple(kv_cache.shape)}")
    num_blocks = kv_cache.shape[2]
    if not 0 <= scratch_block < num_blocks:
        raise ValueError(f"scratch_block must be in [0, {num_blocks}) (the pool's blocks), got {scratch_block}")
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")


def packed_rows(n: int, *fields: torch.Tensor) -> torch.Tensor | None:
    """The (len(fields), n) view of `fields` when they are consecutive n-element runs of one
    int64 buffer (as `model_step.build_step_inputs` lays them out on CUDA), else None."""
    first = fields[0]
    if any(f.dtype != torch.int64 or f.shape != (n,) or not f.is_contiguous() for f in fields):
        return None
    storage = first.untyped_storage().data_ptr()
    for k, f in enumerate(fields):
        if f.untyped_storage().data_ptr() != storage or f.storage_offset() != first.storage_offset() + k * n:
            return None
    return first.as_strided((len(fields), n), (n, 1))


class DecodeGraphRunner:
    """Static buffers + lazily captured graphs for decode steps over one KV pool.

    `kv_cache`: the pool (num_layers, 2, num_blocks, block_size, kvh, d) the graphs write to;
    `scratch_block`: a block index in it that no sequence owns (padding rows write there).
    `max_seq_len` bounds every row's context length (it fixes the attention partitioning).
    `short_context=(rows, length)`: steps of at most `rows` rows whose contexts all fit in
    `length` tokens replay graphs captured with that bound instead (the forward sees it as
    `meta.max_context_len` and may attend in a way that only suits short contexts).
    With `use_cuda_graph=False` the same padded static-buffer forward runs eagerly: the CPU
    tests use it to check padding and bucketing without a GPU.
    """

    def __init__(self, forward: DecodeForward, kv_cache: torch.Tensor, *, max_batch_size: int,
                 max_seq_len: int, scratch_block: int, use_cuda_graph: bool | None = None,
                 short_context: tuple[int, int] | None = None) -> None:
        check_graph_pool(kv_cache, scratch_block, max_seq_len)
        if short_context is not None and (short_context[0] < 1 or short_context[1] < 1):
            raise ValueError(f"short_context must be (rows >= 1, length >= 1), got {short_context}")
        self.forward = forward
        self.kv_cache = kv_cache
        self.device = kv_cache.device
        self.block_size = kv_cache.shape[3]
        self.scratch_block = scratch_block
        self.max_seq_len = max_seq_len
        self.max_blocks_per_seq = math.ceil(max_seq_len / self.block_size)
        self.buckets = graph_batch_sizes(max_batch_size)
        self.short_context = short_context if short_context and short_context[1] < max_seq_len else None
        self.use_cuda_graph = self.device.type == "cuda" if use_cuda_graph is None else use_cuda_graph
        if self.use_cuda_graph and self.device.type != "cuda":
            raise ValueError(f"use_cuda_graph=True needs a CUDA kv_cache, got device {self.device}")
        G = self.buckets[-1]
        dev = self.device
        # The int64 inputs are rows of one buffer, in the order `build_step_inputs` packs them,
        # so a step whose inputs come packed lands with one copy instead of four (`run`).
        self._rows64 = torch.zeros(4, G, dtype=torch.int64, device=dev)
        self.input_ids, self.positions, self.slot_mapping, self.logits_indices = self._rows64.unbind(0)
        self.context_lens = torch.zeros(G, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(G, self.max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.query_lens = torch.ones(G, dtype=torch.int32, device=dev)
        self.cu_query_lens = torch.arange(G + 1, dtype=torch.int32, device=dev)
        self.lora_slots = torch.full((G,), -1, dtype=torch.int64, device=dev)  # read by steps with adapters only
        self._reset_rows(0, G)
        self._dirty_rows = 0      # rows [0, _dirty_rows) may hold a real step's values
        self._dirty_logits = 0
        # (bucket, context bound, with adapters) -> (graph, its logits)
        self._graphs: dict[tuple[int, int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_cuda_graph else None
        self.num_replays = 0

    # ------------------------------------------------------------------ queries
    @property
    def max_batch_size(self) -> int:
        return self.buckets[-1]

    @property
    def captured_batch_sizes(self) -> tuple[int, ...]:
        return tuple(sorted({bucket for bucket, _, _ in self._graphs}))

    @property
    def graph_pool(self) -> object:
        """The CUDA graph memory pool of these graphs (None off-GPU), for a runner to share."""
        return self._pool

    def can_run(self, num_rows: int, max_context_len: int, table_width: int) -> bool:
        return (num_rows <= self.buckets[-1] and max_context_len <= self.max_seq_len
                and table_width <= self.max_blocks_per_seq)

    # ------------------------------------------------------------------ running
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            context_lens: torch.Tensor, block_tables: torch.Tensor,
            logits_indices: torch.Tensor, max_context_len: int | None = None,
            lora_slots: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step of B rows (one token each); `max_context_len`: a host bound on
        `context_lens` (None: `max_seq_len`); `lora_slots` (B,): each row's LoRA slot (-1:
        none), for a step with adapters (its own graphs). Returns logits (N, V) float32: a view
        of the graph's static output, valid until the next `run` of this runner."""
        B, N, W = input_ids.shape[0], logits_indices.shape[0], block_tables.shape[1]
        bucket = choose_bucket(B, self.buckets)
        if bucket is None or W > self.max_blocks_per_seq or N > B:
            raise ValueError(f"decode step of {B} rows, {N} logits, block table width {W} does not fit this "
                             f"runner (max {self.buckets[-1]} rows, width {self.max_blocks_per_seq})")
        bound = self._context_bound(bucket, self.max_seq_len if max_context_len is None else max_context_len)
        key = (bucket, bound, lora_slots is not None)
        if self.use_cuda_graph and key not in self._graphs:
            self._capture(*key)
        # Rows a larger earlier step filled go back to padding; steady state does nothing here.
        if self._dirty_rows > B:
            self._reset_rows(B, self._dirty_rows)
        if self._dirty_logits > N:
            self.logits_indices[N:self._dirty_logits].zero_()
        self._dirty_rows, self._dirty_logits = B, N
        packed = packed_rows(B, input_ids, positions, slot_mapping, logits_indices) if N == B else None
        if packed is not None:  # each tiny copy costs the step a few us of GPU time
            self._rows64[:, :B].copy_(packed, non_blocking=True)
        else:
            self.input_ids[:B].copy_(input_ids, non_blocking=True)
            self.positions[:B].copy_(positions, non_blocking=True)
            self.slot_mapping[:B].copy_(slot_mapping, non_blocking=True)
            self.logits_indices[:N].copy_(logits_indices, non_blocking=True)
        self.context_lens[:B].copy_(context_lens, non_blocking=True)
        self.block_tables[:B, :W].copy_(block_tables, non_blocking=True)  # columns >= W are never read
        if lora_slots is not None:
            self.lora_slots[:B].copy_(lora_slots, non_blocking=True)
        if self.use_cuda_graph:
            graph, logits = self._graphs[key]
            graph.replay()
        else:
            logits = self._forward(*key)
        self.num_replays += 1
        return logits[:N]

    def capture(self, batch_sizes: Sequence[int] | None = None, lora: bool = False) -> None:
        """Capture graphs now (largest first, so later captures reuse the shared pool) instead
        of on first use; `batch_sizes` defaults to every bucket; `lora`: the graphs of steps
        with adapters."""
        if self.use_cuda_graph:
            def capture_all_bounds(bucket: int) -> None:
                for bound in {self._context_bound(bucket, 1), self.max_seq_len}:
                    if (bucket, bound, lora) not in self._graphs:
                        self._capture(bucket, bound, lora)

            full = {bucket for bucket, bound, with_lora in self._graphs
                    if bound == self.max_seq_len and with_lora == lora}
            capture_buckets(self.buckets, full, capture_all_bounds, batch_sizes)

    def _context_bound(self, bucket: int, max_context_len: int) -> int:
        """The context bound of the graph a step of `bucket` rows and that longest context replays."""
        if self.short_context is not None and bucket <= self.short_context[0] \
                and max_context_len <= self.short_context[1]:
            return self.short_context[1]
        return self.max_seq_len

    def _meta(self, bucket: int, bound: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_lens=self.query_lens[:bucket], context_lens=self.context_lens[:bucket],
            block_tables=self.block_tables[:bucket], slot_mapping=self.slot_mapping[:bucket],
            max_query_len=1, max_context_len=bound,
            cu_query_lens=self.cu_query_lens[:bucket + 1], is_decode=True)

    def _forward(self, bucket: int, bound: int, lora: bool) -> torch.Tensor:
        return self.forward(self.input_ids[:bucket], self.positions[:bucket], self.kv_cache,
                            self._meta(bucket, bound), self.logits_indices[:bucket],
                            **({"lora_slots": self.lora_slots[:bucket]} if lora else {}))

    def _capture(self, bucket: int, bound: int, lora: bool) -> None:
        # Every row is padding while warming up and capturing: the eager warm-up runs (Triton
        # JIT, cuBLAS workspaces, torch.compile) write only to the scratch block.
        self._reset_rows(0, self._dirty_rows)
        self.logits_indices[:self._dirty_logits].zero_()
        self._dirty_rows = self._dirty_logits = 0
        self._graphs[bucket, bound, lora] = capture_graph(lambda: self._forward(bucket, bound, lora), self.device,
                                                          self._pool)

    def _reset_rows(self, start: int, stop: int) -> None:
        """Rows [start, stop) become padding: token 0 at position 0 in the scratch block."""
        if stop <= start:
            return
        self.input_ids[start:stop].zero_()
        self.positions[start:stop].zero_()
        self.slot_mapping[start:stop].fill_(self.scratch_block * self.block_size)
        self.context_lens[start:stop].fill_(1)
        self.block_tables[start:stop, 0].fill_(self.scratch_block)
        self.lora_slots[start:stop].fill_(-1)


# ----------------------------------------------------------------------------- compiled decode
@torch.library.custom_op("runtime_lib::decode_attention", mutates_args=("kv_cache",))
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, layer: int,
                     slot_mapping: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                     query_lens: torch.Tensor, cu_query_lens: torch.Tensor,
                     scale: float, sliding_window: int | None, max_context_len: int) -> torch.Tensor:
    """Write this step's k/v (B, kvh, d) into `kv_cache[layer]` and attend q (B, h, d) over each
    row's paged context: one opaque op so torch.compile keeps the Triton kernel out of its trace.
    query_lens (B,) ones and cu_query_lens (B+1,) 0..B come in (the runner's static buffers):
    made here they were two tiny kernels a layer in every captured step."""
    kv_layer = kv_cache[layer]
    write_kv(kv_layer, k, v, slot_mapping)
    meta = AttentionMetadata(query_lens=query_lens, context_lens=context_lens, block_tables=block_tables,
                             slot_mapping=slot_mapping, max_query_len=1, max_context_len=max_context_len,
                             cu_query_lens=cu_query_lens, is_decode=True)
    return paged_attention(q, kv_layer, meta, scale, sliding_window).contiguous()


@decode_attention.register_fake
def _(q, k, v, kv_cache, layer, slot_mapping, block_tables, context_lens, query_lens, cu_query_lens, scale,
      sliding_window, max_context_len):
    return torch.empty_like(q)


def supports_compiled_decode(model: nn.Module) -> bool:
    """The compiled decode forward mirrors `LlamaForCausalLM` (Llama, Mistral, Qwen2)."""
    from .models.llama import LlamaForCausalLM

    return isinstance(model, LlamaForCausalLM) and graph_unsupported_reason(model) is None


def llama_traced_forward(model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
                         logits_indices: torch.Tensor, attend, lora_slots: torch.Tensor | None = None) -> torch.Tensor:
    """`LlamaForCausalLM.forward` + `compute_logits` for flattened tokens, written for Dynamo:
    plain tensors in, the attention (which also writes K/V) behind an opaque custom op called as
    `attend(layer_index, q, k, v, layer.self_attn)` -> (T, h, d). `lora_slots` (T,): each
    token's slot of `model.lora_slots` (lora.LoraSlots; -1: none), or None for a step without
    adapters. Must stay in step with models/llama.py (tests/runtime/test_cuda_graph.py,
    test_prefill_graph.py and test_lora.py check parity)."""
    T = input_ids.shape[0]
    lora = None if lora_slots is None else LoraSlotStep(model.lora_slots, lora_slots)
    x = model.embed_tokens(input_ids)                                           # (T, H)
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        qkv = attn.qkv_proj(h)                                                  # (T, q + 2kv)
        if lora is not None:
            qkv = lora.apply(f"{attn.lora_prefix}.qkv_proj", h, qkv)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q = q.view(T, attn.num_heads, attn.head_size)                           # (T, h, d)
        k = k.view(T, attn.num_kv_heads, attn.head_size)                        # (T, kvh, d)
        v = v.view(T, attn.num_kv_heads, attn.head_size)
        q, k = attn.rotary(positions, q, k)
        out = attend(i, q, k, v, attn).reshape(T, attn.q_size)                 # (T, q)
        y = attn.o_proj(out)                                                    # (T, H)
        x = x + (y if lora is None else lora.apply(f"{attn.lora_prefix}.o_proj", out, y))
        x = x + layer.mlp(layer.post_attention_layernorm(x), lora)              # (T, H)
    return model.compute_logits(model.norm(x)[logits_indices])                 # (N, V) fp32


def llama_decode_forward(model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
                         kv_cache: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                         context_lens: torch.Tensor, query_lens: torch.Tensor, cu_query_lens: torch.Tensor,
                         logits_indices: torch.Tensor, max_context_len: int,
                         lora_slots: torch.Tensor | None = None) -> torch.Tensor:
    """`llama_traced_forward` for one token per row, the attention behind `decode_attention`."""
    def attend(i, q, k, v, attn):
        return decode_attention(q, k, v, kv_cache, i, slot_mapping, block_tables, context_lens, query_lens,
                                cu_query_lens, attn.scale, attn.sliding_window, max_context_len)

    return llama_traced_forward(model, input_ids, positions, logits_indices, attend, lora_slots)


def compile_per_model(model: nn.Module, attr: str, name: str, fn, backend: str):
    """`torch.compile(fn)` once per model, cached on the model as `attr` (recompiled only for
    another backend). Each model gets its own code object, named `<name>_<id>`, so the compile
    caches of two models in one process never count against each other's recompile limit; the
    model <-> closure cycle is collected with the model, not kept alive by a global cache."""
    cached = getattr(model, attr, None)
    if cached is None or cached[0] != backend:
        code = fn.__code__.replace(co_name=f"{name}_{id(model):x}")
        fn = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
        cached = (backend, torch.compile(fn, backend=backend, dynamic=False, fullgraph=True))
        object.__setattr__(model, attr, cached)
    return cached[1]


def make_compiled_decode_forward(model: nn.Module, *, backend: str = "inductor") -> DecodeForward:
    """A `DecodeForward` running `llama_decode_forward` through torch.compile, compiled on the
    first call (the runner's warm-up, outside graph capture).

    One compiled step per model, shared by every runner over it: Dynamo compiles once for one
    row and once for any larger batch (the row dimension and the pool's block count are marked
    dynamic, so a new KV pool or bucket does not recompile; the layer count and head shapes
    stay static). Each model gets its own code object, so the compile caches of two models
    (a 1B and an 8B in one process) never count against each other's recompile limit."""
    if not supports_compiled_decode(model):
        raise ValueError(f"compiled decode supports Llama-family models without dynamic rope, "
                         f"got {type(model).__name__}")
    def step(input_ids, positions, kv_cache, slot_mapping, block_tables, context_lens, query_lens, cu_query_lens,
             logits_indices, max_context_len: int, lora_slots):
        return llama_decode_forward(model, input_ids, positions, kv_cache, slot_mapping, block_tables,
                                    context_lens, query_lens, cu_query_lens, logits_indices, max_context_len,
                                    lora_slots)

    compiled_step = compile_per_model(model, "_runtime_lib_compiled_decode", "decode_step", step, backend)

    @torch.no_grad()
    def forward(input_ids, positions, kv_cache, meta: AttentionMetadata, logits_indices, lora_slots=None):
        torch._dynamo.mark_dynamic(kv_cache, 2)  # num_blocks: any pool
        B = input_ids.shape[0]
        cu = meta.cu_query_lens
        if cu is None:
            cu = torch.arange(B + 1, dtype=torch.int32, device=input_ids.device)
        if B > 1:
            for t in (input_ids, positions, meta.slot_mapping, meta.block_tables, meta.context_lens,
                      meta.query_lens, cu, logits_indices) + (() if lora_slots is None else (lora_slots,)):
                torch._dynamo.mark_dynamic(t, 0)
        return compiled_step(input_ids, positions, kv_cache, meta.slot_mapping, meta.block_tables,
                             meta.context_lens, meta.query_lens, cu, logits_indices, meta.max_context_len,
                             lora_slots)

    return forward


__all__ = [
    "GRAPH_BATCH_SIZES",
    "DecodeGraphRunner",
    "capture_buckets",
    "capture_graph",
    "choose_bucket",
    "compile_per_model",
    "cuda_graphs_disabled_by_env",
    "decode_attention",
    "graph_batch_sizes",
    "graph_unsupported_reason",
    "llama_decode_forward",
    "llama_traced_forward",
    "packed_rows",
    "make_compiled_decode_forward",
    "supports_compiled_decode",
    "switched_off_by_env",
]
