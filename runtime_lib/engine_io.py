"""The engine's public contracts: its configuration, what it streams back per request, its
statistics, and the errors callers handle. Kept apart from the loop in `engine.py`."""
from __future__ import annotations

import queue
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .config import KV_CACHE_DTYPES, QUANTIZATIONS


class EngineBusyError(RuntimeError):
    """The waiting queue is full: the server is busy, retry later."""


@dataclass(frozen=True)
class EngineConfig:
    model_dir: str
    device: str | None = None                 # None: cuda if available, else cpu
    dtype: str | None = None                  # None: the checkpoint's dtype
    max_num_seqs: int = 64                    # rows in one step
    max_num_batched_tokens: int = 2048        # token budget of one step (chunked prefill)
    block_size: int = 16
    num_kv_blocks: int | None = None          # None: sized from kv_cache_memory_fraction
    kv_cache_memory_fraction: float = 0.9     # of free GPU memory (CPU: of max_num_seqs x max_seq_len)
    kv_cache_dtype: str = "auto"              # "auto": the engine's (its dtype, or fp8 if built so); "fp8": e4m3,
                                              # scale 1 (half the bytes of bf16)
    quantization: str = "auto"                # "auto": the engine's (none, or fp8 if built so); "fp8": e4m3
                                              # weights, per-channel scales, per-token activations
    enable_prefix_caching: bool = True
    lora_dir: str | None = None               # a directory of PEFT LoRA adapter directories, each served under
                                              # its directory name (add_request(lora_uid=...); Llama family)
    max_lora_uploads: int = 64                # adapters add_lora_adapter keeps (requests' uploads), LRU-evicted
    max_loras: int = 4                        # adapters resident on the GPU for graph-replayed LoRA steps (a step
                                              # with more runs eagerly; 0: all LoRA steps do); each slot costs
    max_lora_rank: int = 16                   # ... this rank x every projection in memory and FLOPs, whether used
                                              # or not; adapters of a higher rank run eagerly
    max_queue_size: int = 1024
    max_seq_len: int | None = None            # None: the model's limit
    scheduling_policy: str = "fcfs"           # "fcfs" | "priority"
    cuda_graphs: bool = True                  # replay decode and small prefill/mixed steps from CUDA graphs (GPU)
    compile_decode: bool = False              # torch.compile the captured decode and prefill forwards
                                              # (Llama family; ~30-90 s of compilation, fewer kernels)
    fused_decode: bool = True                 # batch-1 decode steps through the fused Triton step (GPU,
                                              # Llama family; runtime_lib/fused_decode.py)
    capture_graphs_at_start: bool = True      # capture every graph bucket in __init__, not on first use
    async_scheduling: bool = True             # prepare step t+1 while step t runs (see module doc)
    freeze_gc: bool | None = None             # gc.freeze() the heap after start-up; None: on CUDA (LLMEngine)

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_queue_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_lora_uploads", "max_loras"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1 or None, got {self.num_kv_blocks}")
        if not 0.0 < self.kv_cache_memory_fraction <= 1.0:
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {list(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.quantization not in ("auto",) + QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {['auto', *QUANTIZATIONS]}, got {self.quantization!r}")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be 'fcfs' or 'priority', got {self.scheduling_policy!r}")


@dataclass(slots=True)
class RequestOutput:
    """New tokens of one request (one sequence of it when n > 1) since its last output.
    Read-only by convention: not frozen, because a frozen dataclass costs ~1 us more to build
    and the engine builds one per row per step."""

    request_id: str
    sequence_index: int
    new_token_ids: list[int]
    new_log_probs: list[float] | None
    cum_log_prob: float | None
    finished: bool
    finish_reason: str | None       # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int
    num_output_tokens: int
    error: str | None = None
    text: str | None = None         # new text, when the request asked the engine to detokenize
    # When asked for (add_request's return_*_logits), float32 on the CPU: the prompt's logits
    # (prompt_len, V) with the first output of sequence 0, and the logits each new token was
    # sampled from (len(new_token_ids), V), before penalties and temperature.
    context_logits: Any = None
    generation_logits: Any = None


@dataclass(frozen=True)
class EngineStats:
    num_waiting: int
    num_running: int
    num_preempted_total: int
    num_kv_blocks_total: int
    num_kv_blocks_used: int
    num_kv_blocks_free: int
    prefix_cache_hit_rate: float
    num_prompt_tokens_total: int
    num_generated_tokens_total: int
    num_steps_total: int
    num_requests_active: int
    num_computed_tokens_total: int = 0  # tokens run through the model (prefix-cache hits excluded)


class RequestStream:
    """Iterator over a request's `RequestOutput`s (for callers without a callback)."""

    def __init__(self, num_sequences: int = 1) -> None:
        self._queue: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
        self._open = num_sequences

    def put(self, out: RequestOutput) -> None:
        self._queue.put(out)

    def __iter__(self) -> Iterator[RequestOutput]:
        while self._open:
            out = self._queue.get()
            if out.finished:
                self._open -= 1
            yield out
