"""`LLMEngine`: in-flight batching on one engine thread.

Each iteration: take the scheduler's batch (prefill chunks and decode tokens mixed), run
the model once over it, sample every row that finished its tokens with its own parameters,
append, check stops, and hand each request its new tokens through its callback. Requests
join and leave between iterations; `abort` frees a request's blocks at once. Beam-search
requests run as their own group (a `GenerationSession` over the same weights), advanced one
step per iteration beside the batch.

Asynchronous scheduling (`EngineConfig.async_scheduling`, on by default): the host prepares
and launches step t+1 while the GPU still runs step t. A row sampled in step t gets a
placeholder token on the host; step t+1 takes its input token from step t's sampled tokens on
the device (`StepRow.feed_index`), and step t's tokens reach the host one step behind, where
they replace the placeholders and are checked for stops. A sequence that stops is thus
computed one step too many and that extra token is dropped: outputs are the same as
synchronous stepping. Steps whose sampling needs the host token history (repetition /
presence / frequency penalties, no-repeat n-grams, multi-token bad words) wait for the
previous tokens first.
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .beam_group import BeamGroup
from .config import SamplingConfig, kv_cache_torch_dtype
from .engine_io import EngineBusyError, EngineConfig, EngineStats, RequestOutput, RequestStream
from .kv_cache import BlocksManager
from .lora import LoraBatch, LoraManager
from .model_step import HostCopy, StepRow, apply_block_copies, build_step_inputs, to_device
from .sampling import SampleOutput, SamplingParams, SamplingTensors, random_seed, sample
from .scheduler import QueueFullError, RequestRejectedError, Scheduler, SchedulerConfig, SchedulerOutput
from .sequence import Sequence, SequenceStatus
from .session import Session
from .stopping import StopWordsMatcher

__all__ = ["EngineBusyError", "EngineConfig", "EngineStats", "LLMEngine", "RequestOutput", "RequestStream"]

log = logging.getLogger(__name__)
_MAX_SEED = 2**64 - 1
_PLACEHOLDER = -1  # a sampled token still on its way to the host (asynchronous scheduling)


@dataclass(slots=True)
class _RequestState:
    """Per-sequence engine state, hung on `Sequence.data`."""

    params: SamplingParams
    on_output: Callable[[RequestOutput], None]
    request_id: str
    sequence_index: int
    end_id: int
    matcher: StopWordsMatcher | None
    want_log_probs: bool
    needs_history: bool                      # sampling reads the host token history
    log_probs: list[float] = field(default_factory=list)
    num_emitted: int = 0                     # output tokens already handed out
    siblings: list[Sequence] = field(default_factory=list)  # n > 1: started once the prompt is computed
    first_token_time: float | None = None
    # >= 0: token_ids[-1] is a placeholder for the token sampled in row `pending_row` of the
    # step in flight (its device tokens feed the next step; the host value comes one step late).
    pending_row: int = -1
    detokenizer: Any = None                  # IncrementalDetokenizer when text deltas are wanted
    prompt_table: torch.Tensor | None = None  # (P, H): prompt ids V..V+P-1 read these rows
    lora: Any = None                          # the request's lora.LoraAdapter, or None
    want_context_logits: bool = False        # sequence 0 of a request that asked for them
    want_generation_logits: bool = False
    context_logits: torch.Tensor | None = None  # (prompt_len, V) float32 on the host, filled chunk by chunk
    context_sent: bool = False
    gen_logits: list[torch.Tensor] = field(default_factory=list)  # one (V,) row per output token
    embedding_bias: torch.Tensor | None = None  # (V,) on the device, added to the logits before sampling


@dataclass(slots=True)
class _InFlight:
    """A launched step whose sampled tokens are still on their way to the host."""

    sched: SchedulerOutput
    seqs: list[Sequence]                  # rows that sampled, in logits order
    tokens: torch.Tensor | None           # (N,) int64 on the device: feeds the next step
    host: HostCopy | None                 # the tokens (N,) and log probs (N,) or None, on their way
    gen_logits: list[torch.Tensor | None] | None = None  # per row: its logits on the host, if asked for

    def results(self) -> tuple[list[int], list[float] | None]:
        """Block until the step's tokens are on the host; (token ids, log probs or None)."""
        if self.host is None:
            return [], None
        tokens, lps = self.host.lists()
        return tokens, lps


class LLMEngine:
    def __init__(self, config: EngineConfig, session: Session | None = None) -> None:
        self.config = config
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.session = session or Session.from_dir(config.model_dir, device=device, dtype=config.dtype,
                                                    quantization=config.quantization)
        self.model_config = mc = self.session.model_config
        self.device = self.session.device
        self.max_seq_len = min(config.max_seq_len or mc.max_seq_len, mc.max_seq_len)
        self.max_input_len = min(mc.max_input_len, self.max_seq_len - 1)
        self.tokenizer = _try_load_tokenizer(config.model_dir)
        self.lora_manager = self._load_lora_adapters(config.lora_dir)  # before the pool takes the memory
        if self.lora_manager is not None:
            self._enable_lora_slots()
        num_blocks = config.num_kv_blocks or self._default_num_blocks()
        # One block more than the manager hands out: CUDA-graph padding rows write there.
        self.kv_cache = self.session.allocate_kv_cache(num_blocks + 1, config.block_size, config.kv_cache_dtype)
        self.blocks = BlocksManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self._graph_runner = self.session.enable_cuda_graphs(
            self.kv_cache, max_batch_size=config.max_num_seqs, max_seq_len=self.max_seq_len,
            scratch_block=num_blocks, compile=config.compile_decode, fused=config.fused_decode,
            max_step_tokens=config.max_num_batched_tokens) if config.cuda_graphs else None
        if self._graph_runner is not None and config.capture_graphs_at_start:
            # Pay graph captures (and compilation) now, not in the first requests' latency.
            prefill_runner = self.session.prefill_graph_runner(self.kv_cache)
            for lora in (False, True) if self.session.lora_slots is not None else (False,):
                self._graph_runner.capture(lora=lora)
                if prefill_runner is not None:
                    prefill_runner.capture(lora=lora)
        # SamplingTensors of the last sampled batch, reused while its sequences are unchanged.
        self._sampling_cache: tuple[list[Sequence], SamplingTensors] | None = None
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_seqs=config.max_num_seqs,
                            max_num_batched_tokens=max(config.max_num_batched_tokens, 1),
                            max_waiting=config.max_queue_size),
            self.blocks, policy=config.scheduling_policy)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._beam_groups: list[BeamGroup] = []
        self._active: dict[str, list[Sequence]] = {}  # request id -> its unfinished sequences
        self._stopped = False
        self._num_prompt_tokens = 0
        self._num_generated = 0
        self._num_steps = 0
        self._num_computed_tokens = 0  # tokens run through the model (prefix hits and forks excluded)
        # A full collection walks every tracked object, and a process holding a model, its
        # compiled code and graphs has millions: one took 1.2 s in the middle of an 8B offline
        # run on an H100 (768 rows; bench/gpu_e2e.py logs the pauses). What exists now lives as
        # long as the engine: frozen, collections only walk what serving allocates.
        self._froze_gc = config.freeze_gc if config.freeze_gc is not None else self.device.type == "cuda"
        if self._froze_gc:
            gc.collect()
            gc.freeze()
        self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ API
    def add_request(self, request_id: str, prompt_ids: list[int], sampling: SamplingConfig, *,
                    on_output: Callable[[RequestOutput], None] | None = None,
                    priority: int = 0, detokenize: bool = False,
                    prompt_table: torch.Tensor | None = None, lora_uid: str | None = None,
                    return_context_logits: bool = False,
                    return_generation_logits: bool = False,
                    embedding_bias: torch.Tensor | None = None) -> RequestStream | None:
        """Queue a request. Raises ValueError (bad input, naming the field) or EngineBusyError.
        Outputs go to `on_output` (called on the engine thread: only enqueue there), or, without
        it, to the returned `RequestStream`. `detokenize=True` adds each output's text delta
        (`RequestOutput.text`; the deltas concatenate to the decoded output) using the
        tokenizer found in the model directory; servers that detokenize elsewhere leave it off.
        `prompt_table` (P, hidden) (or (1, P, hidden)): prompt tuning, prompt id vocab_size + i
        reads row i (tensorrtllm_backend's `prompt_embedding_table`). `lora_uid`: the LoRA
        adapter of `EngineConfig.lora_dir` to serve the request with (None or "-1": none).
        `return_context_logits` / `return_generation_logits`: RequestOutput carries the prompt's
        logits and each new token's (float32, host; each costs the step a device->host copy, and
        context logits compute the whole prompt: no prefix-cache hit). `embedding_bias` (V,):
        added to the logits before sampling (tensorrtllm_backend's input; all zeros: none)."""
        if (return_context_logits or return_generation_logits) and sampling.num_beams > 1:
            raise ValueError("return_context_logits / return_generation_logits are not supported with beam search "
                             f"(num_beams={sampling.num_beams})")
        bias = self._check_embedding_bias(embedding_bias, sampling)
        table, salt = self._check_prompt_table(prompt_table)
        lora = self._lora_adapter(lora_uid)
        if lora is not None:  # its KV differs from the base model's: its own prefix-cache namespace
            salt = ("lora", lora.uid) if salt is None else (salt, ("lora", lora.uid))
        if return_context_logits:  # every prompt token must be computed: never a prefix-cache hit
            salt = (salt, ("context_logits", os.urandom(8)))
        prompt = self._check_prompt(prompt_ids, sampling, 0 if table is None else table.shape[0])
        if detokenize and self.tokenizer is None:
            raise ValueError("detokenize=True needs tokenizer files in the model directory; none were found")
        n = 1 if sampling.num_beams > 1 else (sampling.num_return_sequences or 1)
        stream = None
        if on_output is None:
            stream = RequestStream(n if sampling.num_beams == 1 else (sampling.num_return_sequences or 1))
            on_output = stream.put
        if sampling.num_beams > 1:
            self._add_beam_request(request_id, prompt, sampling, on_output,
                                   self.tokenizer if detokenize else None, table, lora)
            return stream
        params = SamplingParams.list_from_config(sampling, 1)[0]
        base_seed = params.seed if params.seed is not None else random_seed()
        seqs = []
        for i in range(n):
            p = dataclasses.replace(params, seed=(base_seed + i) & _MAX_SEED)
            seq = Sequence(request_id if n == 1 else f"{request_id}#{i}", list(prompt),
                           max_tokens=sampling.max_new_tokens, priority=priority, cache_salt=salt)
            seq.data = _RequestState(
                params=p, on_output=on_output, request_id=request_id, sequence_index=i,
                end_id=-1 if sampling.ignore_eos else sampling.end_id,
                matcher=StopWordsMatcher(p.stop_words) if p.stop_words else None,
                want_log_probs=bool(sampling.output_log_probs or sampling.output_cum_log_probs),
                needs_history=_needs_history(p),
                detokenizer=self.tokenizer.incremental() if detokenize else None, prompt_table=table, lora=lora,
                want_context_logits=return_context_logits and i == 0,
                want_generation_logits=return_generation_logits, embedding_bias=bias)
            seqs.append(seq)
        seqs[0].data.siblings = seqs[1:]
        with self._lock:
            if self._stopped:
                raise RuntimeError("engine is shut down")
            if request_id in self._active or any(g.request_id == request_id for g in self._beam_groups):
                raise ValueError(f"request_id {request_id!r} is already in flight")
            try:
                self.scheduler.add(seqs[0])
            except QueueFullError as e:
                raise EngineBusyError(str(e)) from None
            except RequestRejectedError as e:
                raise ValueError(str(e)) from None
            self._active[request_id] = seqs
            self._num_prompt_tokens += len(prompt) * n
            self._wake.notify()
        return stream

    def abort(self, request_id: str) -> bool:
        """Stop a request (all its sequences) and free its blocks; it gets a final output with
        finish_reason "abort". False if unknown or already finished."""
        outputs = []
        with self._lock:
            seqs = self._active.pop(request_id, [])
            found = bool(seqs)
            for seq in seqs:  # n > 1 siblings not yet admitted are in this list too
                self.scheduler.abort(seq.request_id)
                seq.data.siblings = []
                outputs.append(self._final_output(seq, "abort"))
            for group in self._beam_groups:
                if group.request_id == request_id:
                    group.aborted = True
                    found = True
        self._emit(outputs)
        return found

    def shutdown(self) -> None:
        with self._lock:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=10)
        if self._froze_gc:  # the engine's objects (and any others frozen with them) can go again
            self._froze_gc = False
            gc.unfreeze()

    def stats(self) -> EngineStats:
        with self._lock:
            b = self.blocks
            return EngineStats(
                num_waiting=self.scheduler.num_waiting, num_running=self.scheduler.num_running,
                num_preempted_total=self.scheduler.num_preempted_total,
                num_kv_blocks_total=b.num_blocks, num_kv_blocks_used=b.num_used_blocks,
                num_kv_blocks_free=b.num_free_blocks, prefix_cache_hit_rate=b.hit_rate,
                num_prompt_tokens_total=self._num_prompt_tokens,
                num_generated_tokens_total=self._num_generated, num_steps_total=self._num_steps,
                num_computed_tokens_total=self._num_computed_tokens,
                num_requests_active=len(self._active) + len(self._beam_groups))

    def is_healthy(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    # ------------------------------------------------------------- helpers
    def _default_num_blocks(self) -> int:
        mc, cfg = self.model_config, self.config
        kv_dtype = kv_cache_torch_dtype(cfg.kv_cache_dtype, mc.kv_cache_torch_dtype)
        bytes_per_block = (2 * mc.num_layers * cfg.block_size * mc.num_kv_heads * mc.head_size
                           * torch.finfo(kv_dtype).bits // 8)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return max(1, int(free * cfg.kv_cache_memory_fraction) // bytes_per_block - 1)
        # CPU: room for every row at full length, scaled by the fraction, but never more than
        # that fraction of the memory available now (a 128k-context model would ask for TBs).
        per_seq = -(-self.max_seq_len // cfg.block_size)
        wanted = max(per_seq, int(cfg.max_num_seqs * per_seq * cfg.kv_cache_memory_fraction))
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        return max(1, min(wanted, int(available * cfg.kv_cache_memory_fraction) // bytes_per_block))

    def _check_embedding_bias(self, bias: Any, sampling: SamplingConfig) -> torch.Tensor | None:
        if bias is None:
            return None
        V = self.model_config.vocab_size
        bias = torch.as_tensor(bias, dtype=torch.float32)
        if bias.dim() == 2 and bias.shape[0] == 1:
            bias = bias[0]
        if bias.shape != (V,):
            raise ValueError(f"embedding_bias must have shape [{V}] (the vocabulary), got {list(bias.shape)}")
        if not torch.isfinite(bias).all():
            raise ValueError("embedding_bias has NaN or infinite values")
        if not bias.any():
            return None  # tensorrtllm_backend's preprocessing sends zeros when there is no bias
        if sampling.num_beams > 1:
            raise ValueError(f"embedding_bias is not supported with beam search (num_beams={sampling.num_beams})")
        return bias.to(self.device)

    def _load_lora_adapters(self, lora_dir: str | None) -> Any:
        """A lora.LoraManager with every adapter directory under `lora_dir`, by directory name."""
        if lora_dir is None:
            return None
        root = Path(lora_dir)
        dirs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        if not dirs:
            raise ValueError(f"lora_dir {lora_dir!r} must be a directory of LoRA adapter directories (one per "
                             f"adapter, named by its uid / lora_task_id); found none")
        manager = LoraManager(self.config.max_lora_uploads)
        manager.load_from_ckpt(dirs, self.model_config, uids=[p.name for p in dirs], device=self.device)
        return manager

    def add_lora_adapter(self, adapter: Any) -> None:
        """Serve a lora.LoraAdapter (e.g. one a request uploaded, lora.lora_from_trtllm) under its
        uid from now on; requests already running keep the adapter they started with."""
        with self._lock:
            if self.lora_manager is None:
                self.lora_manager = LoraManager(self.config.max_lora_uploads)
                self._enable_lora_slots()
            self.lora_manager.add(adapter)

    def _enable_lora_slots(self) -> None:
        """Device slots for adapters (lora.LoraSlots), so that steps with adapters replay CUDA
        graphs too; on CUDA with graphs and max_loras > 0 only. Without them (or out of
        memory for them: the first upload comes after the KV pool) such steps run eagerly."""
        cfg = self.config
        if cfg.max_loras == 0 or not cfg.cuda_graphs or self.device.type != "cuda" \
                or self.session.lora_slots is not None:
            return
        try:
            self.session.enable_lora_slots(cfg.max_loras, cfg.max_lora_rank)
        except torch.OutOfMemoryError:
            log.warning("no GPU memory for %d LoRA slots of rank %d: steps with adapters run eagerly",
                        cfg.max_loras, cfg.max_lora_rank)

    def _lora_adapter(self, lora_uid: Any) -> Any:
        if lora_uid is None or str(lora_uid) == "-1":
            return None
        if self.lora_manager is None:
            raise ValueError(f"lora_uid {str(lora_uid)!r}: this engine serves no LoRA adapters (set lora_dir)")
        return self.lora_manager.adapters_for([str(lora_uid)], 1)[0]

    def _check_prompt_table(self, table: Any) -> tuple[torch.Tensor | None, Hashable | None]:
        """(the table on the device in the model's dtype, its prefix-cache salt) or (None, None):
        the KV of a virtual token depends on the table, so equal tables share cached blocks and
        other tables never do."""
        if table is None:
            return None, None
        table = torch.as_tensor(table)
        H = self.model_config.hidden_size
        if table.dim() == 3 and table.shape[0] == 1:
            table = table[0]
        if table.dim() != 2 or table.shape[1] != H or table.shape[0] == 0:
            raise ValueError(f"prompt_embedding_table must be [1, rows, {H}] or [rows, {H}] (hidden size {H}), "
                             f"got shape {tuple(table.shape)}")
        if not torch.isfinite(table).all():
            raise ValueError("prompt_embedding_table has NaN or infinite values")
        digest = hashlib.blake2b(table.float().contiguous().cpu().numpy().tobytes(), digest_size=16).digest()
        return table.to(self.device, self.model_config.torch_dtype), ("prompt_table", digest)

    def _check_prompt(self, prompt_ids: list[int], sampling: SamplingConfig, virtual_tokens: int = 0) -> list[int]:
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("input_ids is empty: a prompt needs at least one token")
        V = self.model_config.vocab_size
        limit = V + virtual_tokens
        bad = [t for t in prompt if not 0 <= t < limit]
        if bad:
            raise ValueError(f"input_ids has token ids {bad[:5]} outside the vocabulary [0, {V})"
                             + (f" and the prompt_embedding_table's rows [{V}, {limit})" if virtual_tokens else ""))
        if len(prompt) > self.max_input_len:
            raise ValueError(f"input_ids has {len(prompt)} tokens, more than the limit of "
                             f"{self.max_input_len} (max_input_len)")
        if len(prompt) + sampling.max_new_tokens > self.max_seq_len:
            raise ValueError(f"request_output_len: {len(prompt)} prompt tokens + {sampling.max_new_tokens} "
                             f"new tokens exceed max_seq_len={self.max_seq_len}")
        if not -1 <= sampling.end_id < V:
            raise ValueError(f"end_id must be in [-1, {V}), got {sampling.end_id}")
        return prompt

    def _final_output(self, seq: Sequence, reason: str, error: str | None = None) -> tuple:
        st: _RequestState = seq.data
        if st.pending_row >= 0:  # finished (aborted, failed) before its last token arrived
            del seq.token_ids[-1]
            st.pending_row = -1
        new = seq.token_ids[seq.num_prompt_tokens + st.num_emitted:] if reason != "abort" else []
        st.num_emitted += len(new)
        lps = st.log_probs[len(st.log_probs) - len(new):] if st.want_log_probs and new else (
            [] if st.want_log_probs else None)
        text = st.detokenizer.add(new) + st.detokenizer.finish() if st.detokenizer is not None else None
        out = RequestOutput(
            request_id=st.request_id, sequence_index=st.sequence_index, new_token_ids=new,
            new_log_probs=lps, cum_log_prob=sum(st.log_probs) if st.want_log_probs else None,
            finished=True, finish_reason=reason, num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens, error=error, text=text)
        if (st.want_context_logits or st.want_generation_logits) and reason not in ("abort", "error"):
            self._attach_logits(st, out, len(st.gen_logits) - len(new), len(st.gen_logits))
        return st.on_output, out

    @staticmethod
    def _emit(outputs: list[tuple]) -> None:
        for callback, out in outputs:
            try:
                callback(out)
            except Exception:  # a consumer's failure must not stop the engine
                log.exception("on_output callback failed for request %s", out.request_id)

    # ---------------------------------------------------------------- loop
    def _loop(self) -> None:
        prev: _InFlight | None = None  # the step in flight whose tokens are not on the host yet
        while True:
            with self._lock:
                while (not self._stopped and prev is None and not self.scheduler.has_unfinished()
                       and not self._beam_groups):
                    self._wake.wait()
                if self._stopped:
                    outputs = []
                    for seqs in list(self._active.values()):
                        for seq in seqs:
                            self.scheduler.abort(seq.request_id)
                            outputs.append(self._final_output(seq, "abort"))
                    self._active.clear()
                    break
                sched = self.scheduler.schedule()
                # Take the previous tokens first when sampling reads the host token history, or
                # when this step runs eagerly (a prefill chunk in it): its launch is long host
                # work that would delay the previous step's outputs (TTFT), and the GPU starts
                # on its first kernels anyway.
                sync_first = prev is not None and not sched.is_empty and (
                    sched.num_batched_tokens > len(sched.scheduled) or any(
                        s.needs_logits and s.seq.data.needs_history for s in sched.scheduled))
            outputs = []
            had_prev = prev is not None
            if sync_first:
                outputs += self._complete(prev)
                prev = None
            launched = None
            if not sched.is_empty:
                try:
                    launched = self._launch(sched, prev)
                except Exception as e:  # fail this step's requests, keep serving the rest
                    log.exception("engine step failed")
                    if prev is not None:
                        outputs += self._complete(prev)
                        prev = None
                    outputs += self._fail_step(sched, e)
            if prev is not None:  # step t+1 is queued behind it: now wait for step t's tokens
                outputs += self._complete(prev)
                prev = None
            if launched is not None:
                with self._lock:
                    self._num_steps += 1
                    self._num_computed_tokens += sched.num_batched_tokens
                    self.scheduler.on_step_done(sched)
                    deferred = self.config.async_scheduling and self._defer(launched)
                if deferred:
                    prev = launched
                else:
                    outputs += self._complete(launched)
            if self._beam_groups:
                outputs += self._advance_beam_groups()
            self._emit(outputs)
            if sched.is_empty and not had_prev and not self._beam_groups:
                time.sleep(0.001)  # nothing fits right now (blocks held elsewhere): don't spin
        self._emit(outputs)

    def _launch(self, sched: SchedulerOutput, prev: _InFlight | None) -> _InFlight:
        """Queue the step's forward and sampling on the device, and the copy of its sampled
        tokens to the host; no host sync (on CUDA)."""
        apply_block_copies(self.kv_cache, sched.block_copies)
        with self._lock:  # abort() edits block tables and placeholders from other threads
            # Rows finished since `schedule()` (aborted, or a stop seen in the previous step's
            # late tokens) hold no blocks any more: leave them out.
            live = [s for s in sched.scheduled if not s.seq.status.is_finished]
            if not live:
                return _InFlight(sched, [], None, None)
            rows = [StepRow(s.token_ids, s.num_computed_tokens, s.seq.block_table, s.needs_logits,
                            feed_index=s.seq.data.pending_row, all_logits=self._prompt_logits_wanted(s))
                    for s in live]
            inputs = build_step_inputs(rows, self.config.block_size, self.device,
                                       feed_tokens=prev.tokens if prev is not None else None)
            inputs.update(self._prompt_inputs(live))
            if any(s.seq.data.lora is not None for s in live):
                inputs["lora"] = LoraBatch.build([s.seq.data.lora for s in live], [len(s.token_ids) for s in live],
                                                 self.device)
        inputs["kv_cache"] = self.kv_cache
        out: dict[str, torch.Tensor] = {}
        self.session.run(inputs, out)
        logits = out["logits"]
        if any(r.all_logits for r in rows):
            logits = self._take_context_logits(logits, live, rows)
        sampled = [s.seq for s in live if s.needs_logits]
        if not sampled:
            return _InFlight(sched, [], None, None)
        res = self._sample(logits, sampled)
        gen = None
        wanted = [i for i, seq in enumerate(sampled) if seq.data.want_generation_logits]
        if wanted:  # one device->host copy of the rows asked for, only when asked
            rows = iter(logits[torch.tensor(wanted, device=logits.device)].float().cpu())
            gen = [next(rows) if seq.data.want_generation_logits else None for seq in sampled]
        return _InFlight(sched, sampled, res.token_ids, HostCopy(res.token_ids, res.logprobs), gen)

    @staticmethod
    def _prompt_logits_wanted(s: Any) -> bool:
        """A prompt chunk of a sequence whose request asked for context logits not yet sent."""
        st = s.seq.data
        return st.want_context_logits and not st.context_sent and s.num_computed_tokens < s.seq.num_prompt_tokens

    def _take_context_logits(self, logits: torch.Tensor, live: list, rows: list[StepRow]) -> torch.Tensor:
        """Copy the prompt rows of the steps' all-logits rows to their requests (a recomputed
        prompt after preemption overwrites the same positions); return one row per sampled
        sequence, as sampling expects."""
        keep, i = [], 0
        for s, r in zip(live, rows):
            n = len(s.token_ids) if r.all_logits else int(s.needs_logits)
            if r.all_logits:
                seq, st = s.seq, s.seq.data
                P, start = seq.num_prompt_tokens, s.num_computed_tokens
                if st.context_logits is None:
                    st.context_logits = torch.zeros(P, logits.shape[1])
                end = min(start + n, P)
                st.context_logits[start:end] = logits[i:i + end - start].float().cpu()
            if s.needs_logits:
                keep.append(i + n - 1)
            i += n
        return logits[torch.tensor(keep, dtype=torch.long, device=logits.device)]

    def _prompt_inputs(self, live: list) -> dict[str, torch.Tensor]:
        """Session.run's prompt tuning inputs when a prompt chunk of this step holds virtual
        tokens: the tables of those requests stacked as tasks (padded to the longest), each
        token's task. Empty otherwise (the step keeps its CUDA graph)."""
        if all(s.seq.data.prompt_table is None for s in live):
            return {}
        V = self.model_config.vocab_size
        tables: list[torch.Tensor] = []
        tasks: list[int] = []
        for s in live:
            table = s.seq.data.prompt_table
            task = 0
            if table is not None and any(t >= V for t in s.token_ids):
                tables.append(table)
                task = len(tables) - 1
            tasks += [task] * len(s.token_ids)
        if not tables:
            return {}
        rows = max(t.shape[0] for t in tables)
        stacked = tables[0].new_zeros(len(tables) * rows, tables[0].shape[1])
        for i, t in enumerate(tables):
            stacked[i * rows:i * rows + t.shape[0]] = t
        return {"prompt_embedding_table": stacked, "tasks": to_device(torch.tensor(tasks, dtype=torch.int32),
                                                                       self.device),
                "prompt_vocab_size": torch.tensor([rows], dtype=torch.int32)}

    def _defer(self, step: _InFlight) -> bool:
        """Give every row of `step` that will go on a placeholder token, so the scheduler runs
        it again before its token is on the host. Caller holds the lock."""
        for i, seq in enumerate(step.seqs):
            # A row whose next token reaches max_tokens finishes whatever it is: no extra step.
            if seq.status is SequenceStatus.RUNNING and seq.num_output_tokens + 1 < seq.max_tokens:
                seq.token_ids.append(_PLACEHOLDER)
                seq.data.pending_row = i
        return bool(step.seqs)

    def _complete(self, step: _InFlight) -> list[tuple]:
        """Wait for a launched step's tokens; append them, check stops, build the outputs."""
        try:
            tokens, logprobs = step.results()
        except Exception as e:
            log.exception("engine step failed")
            return self._fail_step(step.sched, e)
        outputs: list[tuple] = []
        with self._lock:
            for i, seq in enumerate(step.seqs):
                if seq.status.is_finished:
                    continue  # aborted (or failed) while the step ran
                outputs += self._append(seq, tokens[i], None if logprobs is None else logprobs[i],
                                        None if step.gen_logits is None else step.gen_logits[i])
        return outputs

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleOutput:
        cached = self._sampling_cache
        if cached is not None and len(cached[0]) == len(seqs) and all(a is b for a, b in zip(cached[0], seqs)):
            st = cached[1]  # steady decode: same rows as last step, skip ~20 host->device copies
        else:
            st = SamplingTensors.build([s.data.params for s in seqs], self.device)
            self._sampling_cache = (list(seqs), st)
        steps = None
        if st.needs_steps:  # counts include placeholders: the tokens generated so far
            steps = torch.tensor([s.num_output_tokens for s in seqs], dtype=torch.int64)
        history = dict(prompt_ids=[s.prompt_token_ids for s in seqs],
                       output_ids=[s.output_token_ids for s in seqs]) if st.needs_history else {}
        biased = [i for i, s in enumerate(seqs) if s.data.embedding_bias is not None]
        if biased:  # out of place: the logits may be a graph's output, read again for generation_logits
            rows = torch.tensor(biased, dtype=torch.long, device=logits.device)
            logits = logits.index_add(0, rows, torch.stack([seqs[i].data.embedding_bias for i in biased]))
        return sample(logits, st, steps=steps, **history)

    def _append(self, seq: Sequence, tok: int, log_prob: float | None,
                gen_logits: torch.Tensor | None = None) -> list[tuple]:
        """Append one sampled token (or fill its placeholder); finish or stream it. Caller
        holds the lock."""
        st: _RequestState = seq.data
        token_ids = seq.token_ids
        if st.pending_row >= 0:
            token_ids[-1] = tok
            st.pending_row = -1
        else:
            token_ids.append(tok)
        self._num_generated += 1
        if st.want_log_probs:
            st.log_probs.append(float(log_prob) if log_prob is not None else 0.0)
        if st.want_generation_logits:
            st.gen_logits.append(gen_logits)
        outputs: list[tuple] = []
        if st.first_token_time is None:
            st.first_token_time = time.monotonic()
            if st.siblings:  # n > 1: the prompt is computed: start the others on its blocks
                for sib in st.siblings:
                    try:
                        self._start_sibling(seq, sib)
                    except RequestRejectedError as e:
                        self._active[st.request_id].remove(sib)
                        outputs.append(self._final_output(sib, "error", error=str(e)))
                st.siblings = []
        reason = None
        num_held = 0
        num_prompt = seq.num_prompt_tokens
        if tok == st.end_id:
            reason = "stop"
        elif st.matcher is not None:
            check = st.matcher.push(tok)
            if check.matched:
                del token_ids[len(token_ids) - check.num_stop_tokens:]
                if st.want_log_probs:
                    del st.log_probs[len(token_ids) - num_prompt:]
                if st.want_generation_logits:
                    del st.gen_logits[len(token_ids) - num_prompt:]
                reason = "stop"
            num_held = check.num_held
        num_out = len(token_ids) - num_prompt
        if reason is None and num_out >= seq.max_tokens:
            reason = "length"
        if reason is not None:
            self._finish(seq, SequenceStatus.FINISHED_STOPPED if reason == "stop"
                         else SequenceStatus.FINISHED_LENGTH_CAPPED)
            outputs.append(self._final_output(seq, reason))
            return outputs
        ready = num_out - num_held
        if ready > st.num_emitted:
            new = token_ids[num_prompt + st.num_emitted:num_prompt + ready]
            lps = st.log_probs[st.num_emitted:ready] if st.want_log_probs else None
            st.num_emitted = ready
            out = RequestOutput(
                st.request_id, st.sequence_index, new, lps,
                sum(st.log_probs[:ready]) if st.want_log_probs else None,
                False, None, num_prompt, ready, None,
                st.detokenizer.add(new) if st.detokenizer is not None else None)
            if st.want_context_logits or st.want_generation_logits:
                self._attach_logits(st, out, ready - len(new), ready)
            outputs.append((st.on_output, out))
        return outputs

    @staticmethod
    def _attach_logits(st: _RequestState, out: RequestOutput, first: int, end: int) -> None:
        """The prompt's logits (once), and output tokens [first, end)'s."""
        if st.want_context_logits and not st.context_sent and st.context_logits is not None:
            out.context_logits, st.context_sent = st.context_logits, True
            st.context_logits = None
        if st.want_generation_logits:
            rows = st.gen_logits[first:end]
            out.generation_logits = torch.stack(rows) if rows else torch.zeros(0, 0)

    def _start_sibling(self, parent: Sequence, sib: Sequence) -> None:
        """n > 1: sequence `sib` shares the blocks `parent` computed for the prompt (copy on
        write) and recomputes only the last prompt token, whose logits give its own first
        token under its own seed. Past `max_num_seqs` it queues instead (prefix cache)."""
        try:
            child = self.scheduler.fork(parent, sib.request_id, data=sib.data)
        except ValueError:
            self.scheduler.add(sib)
            return
        del child.token_ids[parent.num_prompt_tokens:]  # the parent's own tokens
        child.num_computed_tokens = parent.num_prompt_tokens - 1
        # Keep only the blocks of the computed prompt: the parent's table may already reach
        # past it (a step launched ahead), and the child's writes must land in copies.
        keep = self.blocks.num_blocks_for(child.num_computed_tokens)
        self.blocks.free(child.block_table[keep:])
        del child.block_table[keep:]
        active = self._active[sib.data.request_id]
        active[active.index(sib)] = child

    def _finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """Remove a sequence from the scheduler (freeing its blocks) and from its request."""
        self.scheduler.finish(seq, status)
        seqs = self._active.get(seq.data.request_id, [])
        if seq in seqs:
            seqs.remove(seq)
        if not seqs:
            self._active.pop(seq.data.request_id, None)

    def _fail_step(self, sched: SchedulerOutput, error: Exception) -> list[tuple]:
        outputs = []
        with self._lock:
            for s in sched.scheduled:
                seq = s.seq
                if self.scheduler.get(seq.request_id) is seq:
                    self._finish(seq, SequenceStatus.FINISHED_ABORTED)
                    outputs.append(self._final_output(seq, "error", error=f"{type(error).__name__}: {error}"))
        return outputs

    # ------------------------------------------------------------ beam groups
    def _add_beam_request(self, request_id: str, prompt: list[int], sampling: SamplingConfig,
                          on_output: Callable[[RequestOutput], None], tokenizer: Any = None,
                          prompt_table: torch.Tensor | None = None, lora: Any = None) -> None:
        group = BeamGroup.start(self.session, self.model_config, request_id, prompt, sampling, on_output,
                                tokenizer, prompt_table, (self.lora_manager, lora.uid) if lora is not None else None)
        with self._lock:
            if any(g.request_id == request_id for g in self._beam_groups):
                group.close()
                raise ValueError(f"request_id {request_id!r} is already in flight")
            self._beam_groups.append(group)
            self._num_prompt_tokens += len(prompt)
            self._wake.notify()

    def _advance_beam_groups(self) -> list[tuple]:
        outputs = []
        for group in list(self._beam_groups):
            try:
                done = group.advance()
            except Exception as e:
                log.exception("beam request %s failed", group.request_id)
                outputs += group.final(error=f"{type(e).__name__}: {e}")
                self._remove_group(group)
                continue
            if done:
                final = group.final()
                outputs += final
                with self._lock:
                    self._num_generated += sum(len(o.new_token_ids) for _, o in final)
                self._remove_group(group)
        return outputs

    def _remove_group(self, group: BeamGroup) -> None:
        with self._lock:
            self._beam_groups.remove(group)
        group.close()


def _needs_history(p: SamplingParams) -> bool:
    """Whether sampling this row reads its prompt / output tokens on the host (`sample`'s
    TokenHistory): then the engine cannot sample it before the previous token is known."""
    return (p.repetition_penalty != 1.0 or p.presence_penalty != 0 or p.frequency_penalty != 0
            or p.no_repeat_ngram_size > 0 or any(len(w) > 1 for w in p.bad_words))


def _try_load_tokenizer(model_dir: str):
    try:
        from .tokenizer import load_tokenizer
        return load_tokenizer(model_dir)
    except Exception:  # engines without tokenizer files serve ids only
        return None
