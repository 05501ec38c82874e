"""TensorRT-LLM's `tensorrt_llm.runtime.Session`: one built engine that runs one forward step
over a flattened batch, `run(inputs, outputs)`, plus (de)serialisation to bytes.

The work is done by a backend behind a small seam (`SessionBackend`) so a TensorRT backend
could slot in later; only the PyTorch backend ships.

Inputs of `run` (names as TRT-LLM's, tokens flattened across B sequences, T tokens in all):
    input_ids (T,) int64, position_ids (T,) int64, kv_cache (the paged pool),
    query_lengths (B,) int32 new tokens per sequence, sequence_lengths (B,) int32 kv length
    after this step, kv_cache_block_offsets (B, max_blocks) int32, logits_indices (N,) int64,
    host_max_query_length / host_max_sequence_length (Python ints: no device sync),
    optional slot_mapping (T,) int64 (derived on device when absent).
Output: logits (N, vocab) float32.

CUDA graphs: after `enable_cuda_graphs(kv_cache, ...)`, a decode-only step (one token per
sequence) over that pool replays a captured graph (runtime_lib/cuda_graph.py), and a prefill
or mixed step of up to `prefill_graph_max_tokens` tokens replays a token-bucket graph
(runtime_lib/prefill_graph.py); larger steps run the compiled prefill forward unpadded (up to
the `max_step_tokens` given, when compiled) or else eagerly. The replayed logits are a view of
the graph's static output, valid until the next `run` over the same pool.
"""
from __future__ import annotations

import contextlib
import json
import struct
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers.attention import AttentionMetadata
from .layers.prompt_tuning import prompt_tuning_embeddings
from .lora import LoraSlots, LoraSlotStep
from .models import allocate_kv_cache, build_model, is_engine_dir, load_model
from .prefill_graph import DEFAULT_MAX_PREFILL_GRAPH_TOKENS, PrefillGraphRunner

SERIALIZED_MAGIC = b"RTLLMENG"
SERIALIZED_FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIQ")  # magic, format version, config-json byte length

REQUIRED_INPUTS = ("input_ids", "position_ids", "kv_cache", "query_lengths", "sequence_lengths",
                   "kv_cache_block_offsets", "logits_indices", "host_max_query_length",
                   "host_max_sequence_length")
# Prompt tuning (TRT-LLM names): the table (num_tasks * prompt_vocab_size, H), each token's
# task (T,) and the rows per task; prompt ids >= vocab_size then read the table.
PROMPT_INPUTS = ("prompt_embedding_table", "tasks", "prompt_vocab_size")
# "lora": a lora.LoraBatch, the step's LoRA adapters and the tokens each serves (not a tensor:
# TRT-LLM passes weight pointers per layer; ours are the adapters' own tensors).
OPTIONAL_INPUTS = ("slot_mapping", "lora") + PROMPT_INPUTS


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


class SessionBackend(Protocol):
    """What a Session needs from an execution backend."""

    device: torch.device

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, logits_indices: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None, lora: Any = None,
                lora_slots: torch.Tensor | None = None) -> torch.Tensor: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...


class TorchBackend:
    """Runs one of runtime_lib.models' networks eagerly."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.device = next(model.parameters()).device

    @torch.no_grad()  # not inference_mode: callers edit the returned logits in place
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, logits_indices: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None, lora: Any = None,
                lora_slots: torch.Tensor | None = None) -> torch.Tensor:
        """`lora`: a lora.LoraBatch; `lora_slots` (T,): each token's slot of the model's
        lora.LoraSlots instead (what graph runners pass)."""
        kw: dict[str, Any] = {} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
        if lora_slots is not None:
            lora = LoraSlotStep(self.model.lora_slots, lora_slots)
        if lora is not None:
            kw["lora"] = lora
        hidden = self.model(input_ids, positions, kv_cache, meta, **kw)         # (T, H)
        return self.model.compute_logits(hidden[logits_indices])                # (N, V) fp32

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}


class Session:
    def __init__(self, backend: SessionBackend, model_config: ModelConfig,
                 build_config: dict[str, Any] | None = None) -> None:
        self._backend = backend
        self._model_config = model_config
        self._build_config = dict(build_config or {})
        # Runners are owned by whoever owns their KV pool (engine, GenerationSession); the
        # Session only looks them up, so a dropped owner frees its graphs and pool.
        # Each decode runner maps to the prefill/mixed-step runner over the same pool (or None).
        self._graph_runners: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.compile_decode_graphs = False  # torch.compile the captured decode step (Llama family)
        # One-row decode steps run the fused-kernel step (runtime_lib/fused_decode.py).
        self.fused_decode = True
        # Prefill / mixed steps up to this many tokens replay token-bucket graphs (0: eager).
        self.prefill_graph_max_tokens = DEFAULT_MAX_PREFILL_GRAPH_TOKENS
        # torch.compile the captured prefill step too; None: whenever the decode step is.
        self.compile_prefill_graphs: bool | None = None

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def from_engine(cls, engine: Any, device: str | torch.device = "cpu",
                    dtype: str | torch.dtype | None = None, quantization: str | None = None) -> Session:
        """`engine`: an engine directory (runtime_lib.build) or an in-memory `build.Engine`.
        `quantization`: None / "auto" (the engine's) or "fp8" (config.QUANTIZATIONS)."""
        from .build import Engine

        if isinstance(engine, Engine):
            model = build_model(engine.model_config, engine.weights, device=device, dtype=dtype,
                                quantization=quantization)
            return cls(TorchBackend(model), model.config, engine.build_config)
        engine_dir = Path(engine)
        if not is_engine_dir(engine_dir):
            raise ValueError(f"{engine_dir} is not an engine directory; build one with "
                             f"`python -m runtime_lib.build` or use Session.from_dir")
        return cls.from_dir(engine_dir, device=device, dtype=dtype, quantization=quantization)

    @classmethod
    def from_dir(cls, model_dir: str | Path, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype | None = None, quantization: str | None = None) -> Session:
        """An engine directory or a plain HF checkpoint directory; `quantization` as in from_engine."""
        model = load_model(model_dir, device=device, dtype=dtype, quantization=quantization)
        build_config: dict[str, Any] = {}
        if is_engine_dir(model_dir):
            build_config = json.loads((Path(model_dir) / "config.json").read_text()).get("build_config", {})
        return cls(TorchBackend(model), model.config, build_config)

    @classmethod
    def from_serialized_engine(cls, engine_bytes: bytes, device: str | torch.device = "cpu") -> Session:
        from safetensors.torch import load as load_safetensors

        view = memoryview(engine_bytes)
        if len(view) < _HEADER.size:
            raise ValueError(f"serialized engine is {len(view)} bytes, shorter than its {_HEADER.size}-byte header")
        magic, version, config_len = _HEADER.unpack_from(view)
        if magic != SERIALIZED_MAGIC:
            raise ValueError(f"serialized engine has magic {magic!r}, expected {SERIALIZED_MAGIC!r}")
        if version != SERIALIZED_FORMAT_VERSION:
            raise ValueError(f"serialized engine format version {version} is not supported "
                             f"(supported: {SERIALIZED_FORMAT_VERSION})")
        start = _HEADER.size
        config = json.loads(bytes(view[start:start + config_len]))
        weights = load_safetensors(bytes(view[start + config_len:]))
        model_config = ModelConfig.from_engine_config(dict(config["model_config"]))
        model = build_model(model_config, weights, device=device)
        return cls(TorchBackend(model), model.config, config.get("build_config", {}))

    def serialize(self) -> bytes:
        """Header + engine config JSON + safetensors weights; `from_serialized_engine` inverts it."""
        from safetensors.torch import save as save_safetensors

        from .build import RUNTIME_LIB_VERSION

        config = json.dumps({"runtime_lib_version": RUNTIME_LIB_VERSION,
                             "model_config": self._model_config.to_dict(),
                             "build_config": self._build_config}, sort_keys=True).encode()
        weights = save_safetensors(self._backend.state_dict(), metadata={"format": "pt"})
        return _HEADER.pack(SERIALIZED_MAGIC, SERIALIZED_FORMAT_VERSION, len(config)) + config + weights

    # --- properties -------------------------------------------------------------------------
    @property
    def model_config(self) -> ModelConfig:
        return self._model_config

    @property
    def build_config(self) -> dict[str, Any]:
        return dict(self._build_config)

    @property
    def model(self) -> nn.Module | None:
        return getattr(self._backend, "model", None)

    @property
    def device(self) -> torch.device:
        return self._backend.device

    def allocate_kv_cache(self, num_blocks: int, block_size: int,
                          dtype: str | torch.dtype | None = None) -> torch.Tensor:
        """A zeroed KV pool on this session's device, in the config's `kv_cache_dtype` (the
        model's dtype, or FP8 for an engine built with --kv-cache-dtype fp8) unless told."""
        return allocate_kv_cache(self._model_config, num_blocks, block_size, self.device, dtype)

    # --- CUDA graphs ------------------------------------------------------------------------
    def enable_cuda_graphs(self, kv_cache: torch.Tensor, *, max_batch_size: int, max_seq_len: int,
                           scratch_block: int, compile: bool | None = None, fused: bool | None = None,
                           max_step_tokens: int = 0):
        """Replay decode steps over `kv_cache` from CUDA graphs (captured lazily per bucket).

        `scratch_block`: a block of the pool no sequence owns (allocate one extra). Returns the
        `DecodeGraphRunner`, which the caller must keep alive for as long as graphs should be
        used (the Session holds it weakly), or None when graphs do not apply: not on CUDA, a
        model whose step cannot be captured, or RUNTIME_LIB_CUDA_GRAPHS=0. Prefill and mixed
        steps of up to `prefill_graph_max_tokens` tokens get a `PrefillGraphRunner` beside it
        (`max_batch_size` sequences per step; RUNTIME_LIB_PREFILL_GRAPHS=0 turns it off), alive
        as long as the decode runner is. One-row decode steps of supported models run the fused
        Triton step (`fused_decode.py`) when `fused` (default: `self.fused_decode`) is on
        (RUNTIME_LIB_FUSED_DECODE=0: off); larger ones the compiled (`compile`) or eager forward.
        With a compiled prefill forward, steps past the largest token bucket and up to
        `max_step_tokens` (the caller's step budget) run it unpadded, without a graph."""
        from .cuda_graph import (
            DecodeGraphRunner,
            cuda_graphs_disabled_by_env,
            graph_unsupported_reason,
            make_compiled_decode_forward,
            supports_compiled_decode,
        )
        from .fused_decode import (
            FUSED_ATTENTION_MAX_CONTEXT,
            MAX_FUSED_ROWS,
            fused_decode_disabled_by_env,
            fused_decode_unsupported_reason,
            make_fused_decode_forward,
        )
        from .prefill_graph import PrefillGraphRunner, make_compiled_prefill_forward, prefill_graphs_disabled_by_env

        model = self.model
        if (kv_cache.device.type != "cuda" or self.device.type != "cuda" or model is None
                or cuda_graphs_disabled_by_env() or graph_unsupported_reason(model) is not None):
            return None
        self.disable_cuda_graphs(kv_cache)
        compile = self.compile_decode_graphs if compile is None else compile
        forward = self._backend.forward
        if compile and supports_compiled_decode(model):
            forward = make_compiled_decode_forward(model)
        fused = self.fused_decode if fused is None else fused
        short_context = None
        if (fused and not fused_decode_disabled_by_env()
                and fused_decode_unsupported_reason(model) is None):
            forward = make_fused_decode_forward(model, forward)
            # Short one-row steps get their own graphs: there the fused step attends inside its
            # qkv kernel (one launch fewer a layer).
            short_context = (MAX_FUSED_ROWS, FUSED_ATTENTION_MAX_CONTEXT) if FUSED_ATTENTION_MAX_CONTEXT else None
        runner = DecodeGraphRunner(forward, kv_cache, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                                   scratch_block=scratch_block, short_context=short_context)
        prefill = None
        if self.prefill_graph_max_tokens > 0 and not prefill_graphs_disabled_by_env():
            compile_prefill = compile if self.compile_prefill_graphs is None else self.compile_prefill_graphs
            prefill_forward, unpadded = self._backend.forward, 0
            if compile_prefill and supports_compiled_decode(model):
                prefill_forward, unpadded = make_compiled_prefill_forward(model), max_step_tokens
            # One memory pool for both: graphs replay one at a time on one stream.
            prefill = PrefillGraphRunner(prefill_forward, kv_cache, max_num_seqs=max_batch_size,
                                         max_seq_len=max_seq_len, scratch_block=scratch_block,
                                         max_num_tokens=self.prefill_graph_max_tokens, pool=runner.graph_pool,
                                         max_unpadded_tokens=unpadded)
        self._graph_runners[runner] = prefill
        return runner

    def enable_lora_slots(self, max_loras: int, max_rank: int) -> LoraSlots:
        """Give the model `max_loras` device-resident LoRA slots of rank <= `max_rank`
        (lora.LoraSlots), so that steps with adapters replay CUDA graphs too; without them
        (or when a step's adapters do not fit) such steps run eagerly."""
        model = self.model
        if model is None:
            raise ValueError("this backend has no model to give LoRA slots")
        model.lora_slots = LoraSlots(self._model_config, max_loras, max_rank, self.device,
                                     model.get_input_embeddings().weight.dtype)
        return model.lora_slots

    @property
    def lora_slots(self) -> LoraSlots | None:
        return getattr(self.model, "lora_slots", None)

    def prefill_graph_runner(self, kv_cache: torch.Tensor):
        """The `PrefillGraphRunner` replaying prefill / mixed steps over `kv_cache`, or None."""
        for runner, prefill in list(self._graph_runners.items()):
            if runner.kv_cache is kv_cache:
                return prefill
        return None

    def disable_cuda_graphs(self, kv_cache: torch.Tensor | None = None) -> None:
        """Stop replaying graphs over `kv_cache` (every pool when None)."""
        for runner in list(self._graph_runners):
            if kv_cache is None or runner.kv_cache is kv_cache:
                self._graph_runners.pop(runner, None)

    def _graph_runner_for(self, inputs: dict[str, torch.Tensor | int]):
        """The runner that can replay this step, or None (host-side checks only, no sync):
        the decode runner for a decode-only step, else the prefill/mixed-step runner."""
        if not self._graph_runners:
            return None
        kv_cache = inputs["kv_cache"]
        num_rows, num_tokens = inputs["query_lengths"].shape[0], inputs["input_ids"].shape[0]
        max_context_len = int(inputs["host_max_sequence_length"])
        width = inputs["kv_cache_block_offsets"].shape[1]
        is_decode = int(inputs["host_max_query_length"]) == 1 and num_tokens == num_rows
        for runner, prefill in list(self._graph_runners.items()):
            if runner.kv_cache is not kv_cache:
                continue
            if is_decode and runner.can_run(num_rows, max_context_len, width):
                return runner
            if prefill is not None and prefill.can_run(num_tokens, num_rows, max_context_len, width,
                                                       inputs["logits_indices"].shape[0]):
                return prefill
        return None

    # --- execution --------------------------------------------------------------------------
    def infer_shapes(self, inputs: list[TensorInfo]) -> list[TensorInfo]:
        """Output shapes for the given input shapes: logits (N, vocab_size) float32."""
        by_name = {info.name: info for info in inputs}
        if "logits_indices" not in by_name:
            raise ValueError(f"infer_shapes needs 'logits_indices'; got {sorted(by_name)}")
        shape = tuple(by_name["logits_indices"].shape)
        if len(shape) != 1:
            raise ValueError(f"logits_indices must be 1-D (N,), got shape {shape}")
        return [TensorInfo("logits", torch.float32, (shape[0], self._model_config.vocab_size))]

    def run(self, inputs: dict[str, torch.Tensor | int], outputs: dict[str, torch.Tensor],
            stream: Any = None) -> bool:
        """One forward step; writes `outputs["logits"]` (N, V) float32 (in place if present)."""
        missing = [n for n in REQUIRED_INPUTS if n not in inputs]
        unknown = sorted(set(inputs) - set(REQUIRED_INPUTS) - set(OPTIONAL_INPUTS))
        if missing or unknown:
            parts = ([f"missing inputs {missing}"] if missing else []) + \
                    ([f"unknown inputs {unknown}"] if unknown else [])
            raise ValueError("Session.run: " + "; ".join(parts) +
                             f"; expected {list(REQUIRED_INPUTS)} (+ optional {list(OPTIONAL_INPUTS)})")
        ctx = torch.cuda.stream(stream) if stream is not None and self.device.type == "cuda" \
            else contextlib.nullcontext()
        with ctx:
            embeds = self._prompt_embeddings(inputs)
            lora = inputs.get("lora")
            # Graphs take ids only; a step with adapters replays them only through LoRA slots.
            runner = self._graph_runner_for(inputs) if embeds is None else None
            token_slots = None
            if runner is not None and lora is not None:
                slots = self.lora_slots
                token_slots = slots.token_slots(lora) if slots is not None else None
                runner = runner if token_slots is not None else None
            if runner is not None:
                slot_mapping = inputs.get("slot_mapping")
                if slot_mapping is None:
                    slot_mapping = self._metadata(inputs).slot_mapping
                if isinstance(runner, PrefillGraphRunner):
                    logits = runner.run(inputs["input_ids"], inputs["position_ids"], slot_mapping,
                                        inputs["query_lengths"], inputs["sequence_lengths"],
                                        inputs["kv_cache_block_offsets"], inputs["logits_indices"],
                                        lora_slots=token_slots)
                else:
                    logits = runner.run(inputs["input_ids"], inputs["position_ids"], slot_mapping,
                                        inputs["sequence_lengths"].to(torch.int32),
                                        inputs["kv_cache_block_offsets"].to(torch.int32), inputs["logits_indices"],
                                        max_context_len=int(inputs["host_max_sequence_length"]),
                                        lora_slots=token_slots)
            else:
                meta = self._metadata(inputs)
                logits = self._backend.forward(inputs["input_ids"], inputs["position_ids"], inputs["kv_cache"],
                                               meta, inputs["logits_indices"], inputs_embeds=embeds,
                                               **({} if lora is None else {"lora": lora}))
            out = outputs.get("logits")
            if out is None:
                outputs["logits"] = logits
            else:
                if tuple(out.shape) != tuple(logits.shape):
                    raise ValueError(f"outputs['logits'] has shape {tuple(out.shape)}, "
                                     f"expected {tuple(logits.shape)}")
                out.copy_(logits)
        return True

    def _prompt_embeddings(self, inputs: dict[str, torch.Tensor | int]) -> torch.Tensor | None:
        """Token embeddings with virtual tokens looked up in the prompt table, or None without one."""
        table = inputs.get("prompt_embedding_table")
        if table is None:
            return None
        missing = [n for n in PROMPT_INPUTS if inputs.get(n) is None]
        if missing:
            raise ValueError(f"Session.run: prompt_embedding_table needs {missing} too")
        ids, tasks = inputs["input_ids"], inputs["tasks"]
        model = self.model
        if model is None or not hasattr(model, "get_input_embeddings"):
            raise ValueError("Session.run: this backend does not take prompt embedding tables")
        if table.dim() != 2 or table.shape[1] != self._model_config.hidden_size:
            raise ValueError(f"prompt_embedding_table must be (rows, hidden={self._model_config.hidden_size}), "
                             f"got shape {tuple(table.shape)}")
        if tasks.shape != ids.shape:
            raise ValueError(f"tasks must give each of the {ids.shape[0]} tokens its task, got shape "
                             f"{tuple(tasks.shape)}")
        vocab_size = int(torch.as_tensor(inputs["prompt_vocab_size"]).reshape(-1)[0])
        return prompt_tuning_embeddings(model.get_input_embeddings(), ids, table.to(ids.device), tasks.to(ids.device),
                                        vocab_size)

    @staticmethod
    def _metadata(inputs: dict[str, torch.Tensor | int]) -> AttentionMetadata:
        """Tensors -> AttentionMetadata without a host sync: slot mapping derived on device."""
        kv_cache = inputs["kv_cache"]
        block_size = kv_cache.shape[3]
        query_lens = inputs["query_lengths"]                                  # (B,)
        seq_lens = inputs["sequence_lengths"]                                 # (B,)
        block_tables = inputs["kv_cache_block_offsets"]                       # (B, max_blocks)
        num_tokens = inputs["input_ids"].shape[0]
        cu = F.pad(torch.cumsum(query_lens, 0), (1, 0)).to(torch.int32)       # (B+1,)
        slot_mapping = inputs.get("slot_mapping")
        if slot_mapping is None:
            batch = torch.arange(query_lens.shape[0], device=query_lens.device)
            seq_of_token = torch.repeat_interleave(batch, query_lens.long(), output_size=num_tokens)  # (T,)
            offset = torch.arange(num_tokens, device=query_lens.device) - cu[seq_of_token]
            kv_pos = (seq_lens - query_lens).long()[seq_of_token] + offset    # (T,) absolute kv position
            block = block_tables.long()[seq_of_token, kv_pos // block_size]   # (T,)
            slot_mapping = block * block_size + kv_pos % block_size
        max_query_len = int(inputs["host_max_query_length"])
        return AttentionMetadata(
            query_lens=query_lens.to(torch.int32), context_lens=seq_lens.to(torch.int32),
            block_tables=block_tables.to(torch.int32), slot_mapping=slot_mapping.long(),
            max_query_len=max_query_len, max_context_len=int(inputs["host_max_sequence_length"]),
            cu_query_lens=cu, is_decode=max_query_len == 1)


__all__ = ["Session", "TensorInfo", "SessionBackend", "TorchBackend", "REQUIRED_INPUTS"]
