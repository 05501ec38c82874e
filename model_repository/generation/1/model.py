"""Triton `generation` model: a thin, decoupled adapter around runtime_lib's LLMEngine.

`execute()` only validates inputs and enqueues engine requests (one per batch row). The engine
thread hands each step's output to `_on_output`, which only enqueues; a response thread sends
(coalescing several steps of one sequence into one response when they back up), and a watcher
thread polls `is_cancelled()` every `cancellation_check_period_ms` and turns it into
`engine.abort` (each poll is an IPC round trip, so never per step). A request with `stop=true`
aborts the running request that has the same request id (tensorrtllm_backend's cancel path).
Every Triton request gets exactly one response with the final flag, errors included.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
# No __pycache__ in the model repository: Triton would take it for a model. (Existing .pyc files
# elsewhere are still read, so this costs nothing after the first import.)
sys.dont_write_bytecode = True
import _llm_common  # stdlib only: must run before numpy/torch imports

_llm_common.bootstrap(__file__)

import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils
from _llm_common import InputError, ModelParameters, RequestInputs, error_response, prompt_tables, stack_logits
from _llm_metrics import EngineMetrics

from runtime_lib.config import SamplingConfig
from runtime_lib.tokenizer import from_word_list_format

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


@dataclass(eq=False)
class _Sequence:
    token_ids: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    cum_log_prob: float = 0.0
    finish_reason: str | None = None
    last_time: float | None = None
    context_logits: Any = None                      # (prompt, V) float32, until sent
    gen_logits: list[Any] = field(default_factory=list)  # (k, V) float32 blocks: the tokens' logits


@dataclass(eq=False)
class _Row:
    """One batch row of a Triton request = one engine request."""

    batch_index: int
    engine_id: str
    prompt_ids: list[int]
    num_sequences: int
    sequences: dict[int, _Sequence] = field(default_factory=dict)
    context_logits: bool = False      # return_context_logits / return_generation_logits asked
    generation_logits: bool = False

    @property
    def finished(self) -> bool:
        return (len(self.sequences) >= self.num_sequences
                and all(s.finish_reason is not None for s in self.sequences.values()))


@dataclass(eq=False)
class _Call:
    """One Triton request and where its response stream stands."""

    request: Any
    sender: Any
    request_id: str
    streaming: bool
    exclude_input: bool
    end_id: int
    outputs: frozenset[str]
    rows: dict[str, _Row] = field(default_factory=dict)
    final_sent: bool = False
    cancelled_at: float | None = None
    arrival: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        from runtime_lib.engine import EngineBusyError, EngineConfig, LLMEngine

        self.model_config = json.loads(args["model_config"])
        params = ModelParameters(self.model_config)
        device = params.str("device", "auto")
        self._busy_error = EngineBusyError
        self.engine = LLMEngine(EngineConfig(
            model_dir=params.model_dir(),
            device=None if device == "auto" else device,  # None: cuda if available
            dtype=params.str("dtype"),
            max_num_seqs=params.int("max_batch_size", 64, lo=1),
            max_num_batched_tokens=params.int("max_num_tokens", 2048, lo=1),
            block_size=params.int("tokens_per_block", 16, lo=1),
            num_kv_blocks=params.int("num_kv_blocks", None, lo=1),
            kv_cache_memory_fraction=params.float("kv_cache_free_gpu_mem_fraction", 0.9, 0.0, 1.0),
            kv_cache_dtype=params.str("kv_cache_dtype", "auto"),
            quantization=params.str("quantization", "auto"),
            lora_dir=params.str("lora_dir") or None,
            max_lora_uploads=params.int("max_lora_uploads", 64, lo=0),
            max_loras=params.int("max_loras", 4, lo=0),
            max_lora_rank=params.int("max_lora_rank", 16, lo=1),
            enable_prefix_caching=params.bool("enable_kv_cache_reuse", True),
            max_queue_size=params.int("max_queue_size", 1024, lo=1),
            max_seq_len=params.int("max_seq_len", None, lo=2),
            cuda_graphs=params.bool("cuda_graphs", True),
            compile_decode=params.bool("compile_decode", False),
            fused_decode=params.bool("fused_decode", True),
        ))
        # Ids the engine stops/pads with unless a request says otherwise; an engine directory
        # without tokenizer files serves ids only, with the checkpoint's eos/pad ids.
        tokenizer = self.engine.tokenizer
        mc = self.engine.model_config
        self.default_end_id = tokenizer.end_id if tokenizer is not None else mc.eos_token_id
        pad = tokenizer.pad_id if tokenizer is not None else mc.pad_token_id
        self.default_pad_id = pad if pad is not None else self.default_end_id
        self._poll_s = params.int("cancellation_check_period_ms", 20, lo=1) / 1000.0
        self._outputs: queue.SimpleQueue = queue.SimpleQueue()
        self._calls: dict[str, _Call] = {}  # engine request id -> call
        self._by_request_id: dict[str, list[_Call]] = {}
        self._calls_lock = threading.Lock()
        self._stopping = threading.Event()
        self._metrics = EngineMetrics(self.engine, pb_utils)
        self._threads = [threading.Thread(target=self._respond_loop, name="generation-respond", daemon=True),
                         threading.Thread(target=self._watch_loop, name="generation-watch", daemon=True)]
        for t in self._threads:
            t.start()
        pb_utils.Logger.log_info(f"generation: engine ready on {self.engine.device}, max_input_len="
                                 f"{self.engine.max_input_len}, max_seq_len={self.engine.max_seq_len}")

    # --- requests in -------------------------------------------------------------------------

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._accept(request, sender)
            except InputError as e:
                self._fail(sender, str(e), "INVALID_ARG")
            except self._busy_error as e:
                self._fail(sender, f"server busy: {e}", "UNAVAILABLE")
            except ValueError as e:  # the engine's own validation names the field too
                self._fail(sender, str(e), "INVALID_ARG")
            except Exception as e:  # noqa: BLE001 - one request's failure must never reach the stub
                pb_utils.Logger.log_error(f"generation: request failed: {e!r}")
                self._fail(sender, f"internal error: {e}", "INTERNAL")

    def _fail(self, sender: Any, message: str, code: str) -> None:
        try:
            sender.send(error_response(pb_utils, message, code), flags=FINAL)
        except Exception as e:  # noqa: BLE001
            pb_utils.Logger.log_error(f"generation: could not send error response: {e!r}")

    def _engine_healthy(self) -> bool:
        check = getattr(self.engine, "is_healthy", None)
        return check() if check is not None else True

    def _accept(self, request: Any, sender: Any) -> None:
        if not self._engine_healthy():
            raise RuntimeError("the engine stopped; the server needs a restart")
        inputs = RequestInputs(request, pb_utils)
        request_id = request.request_id() or ""
        if inputs.scalar("stop", "bool", False)[0]:
            self._stop(request_id, sender)
            return
        plan = self._parse(inputs)
        call = _Call(request=request, sender=sender, request_id=request_id,
                     streaming=plan["streaming"], exclude_input=plan["exclude_input"],
                     end_id=plan["end_id"], outputs=frozenset(request.requested_output_names()))
        for b, (prompt, sampling) in enumerate(zip(plan["prompts"], plan["samplings"])):
            engine_id = f"{request_id or 'req'}-{uuid.uuid4().hex[:12]}"
            num_sequences = sampling.num_return_sequences or 1
            call.rows[engine_id] = _Row(b, engine_id, prompt, num_sequences, context_logits=plan["context_logits"][b],
                                        generation_logits=plan["generation_logits"][b])
        with self._calls_lock:
            for engine_id in call.rows:
                self._calls[engine_id] = call
            if request_id:
                self._by_request_id.setdefault(request_id, []).append(call)
        added: list[str] = []
        try:
            for (engine_id, row), sampling, table, lora in zip(call.rows.items(), plan["samplings"],
                                                               plan["prompt_tables"], plan["lora_uids"]):
                self.engine.add_request(engine_id, row.prompt_ids, sampling, on_output=self._on_output,
                                        prompt_table=table, lora_uid=lora, return_context_logits=row.context_logits,
                                        return_generation_logits=row.generation_logits,
                                        embedding_bias=plan["embedding_bias"][row.batch_index])
                added.append(engine_id)
        except BaseException:
            for engine_id in added:
                self.engine.abort(engine_id)
            with call.lock:
                call.final_sent = True  # the caller sends the error; late outputs are dropped
            self._forget(call)
            raise
        self._metrics.on_request()

    def _parse(self, inputs: RequestInputs) -> dict[str, Any]:
        ids = inputs.required("input_ids", "iu", "INT32")
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2:
            raise InputError(f"input_ids must have shape [batch, tokens], got {list(ids.shape)}")
        batch = ids.shape[0]
        lengths = inputs.scalar("input_lengths", "int", ids.shape[1], batch, lo=1, hi=ids.shape[1])
        prompts = []
        for b in range(batch):
            prompt = ids[b, :lengths[b]].tolist()
            # Length and vocabulary limits are the engine's to check (its errors name input_ids).
            prompts.append(prompt)

        def row_values(names, kind, default, **kw):
            return inputs.scalar(names, kind, default, batch, **kw)

        max_new = row_values("request_output_len", "int", None, lo=1, required=True)
        end_ids = row_values("end_id", "int", self.default_end_id, lo=-1,
                             required=self.default_end_id is None)
        pad_ids = row_values("pad_id", "int", self.default_pad_id, lo=-1)
        beams = row_values("beam_width", "int", 1, lo=1)
        num_seqs = row_values("num_return_sequences", "int", None, lo=1)
        temperature = row_values("temperature", "float", 1.0, lo=0.0)
        top_p_sent = inputs.array("runtime_top_p") is not None
        # TensorRT-LLM's defaults: greedy unless top_k/top_p is sent; top_p alone disables top_k.
        top_k = row_values("runtime_top_k", "int", 0 if top_p_sent else 1, lo=0)
        top_p = row_values("runtime_top_p", "float", 0.0, lo=0.0, hi=1.0)
        min_p = row_values("min_p", "float", 0.0, lo=0.0, hi=1.0)
        len_penalty = row_values("len_penalty", "float", 1.0)
        early = row_values("early_stopping", "bool", True)
        rep = row_values("repetition_penalty", "float", 1.0, lo=0.0, lo_open=True)
        presence = row_values("presence_penalty", "float", 0.0, lo=-2.0, hi=2.0)
        frequency = row_values("frequency_penalty", "float", 0.0, lo=-2.0, hi=2.0)
        min_tokens = row_values(("min_tokens", "min_length"), "int", 1, lo=0)
        seeds = row_values(("seed", "random_seed"), "int", None, lo=0)
        ignore_eos = row_values("ignore_eos", "bool", False)
        log_probs = row_values("return_log_probs", "bool", False)
        stop_name, stop_arr = "stop_words_list", inputs.array("stop_words_list")
        bad_name, bad_arr = "bad_words_list", inputs.array("bad_words_list")
        samplings = []
        for b in range(batch):
            sampling_kwargs = {
                "end_id": end_ids[b], "pad_id": pad_ids[b], "max_new_tokens": max_new[b], "num_beams": beams[b],
                "num_return_sequences": num_seqs[b], "temperature": temperature[b], "top_k": top_k[b],
                "top_p": top_p[b], "min_p": min_p[b], "length_penalty": len_penalty[b],
                "early_stopping": int(early[b]), "repetition_penalty": rep[b], "presence_penalty": presence[b],
                "frequency_penalty": frequency[b], "min_length": min_tokens[b], "random_seed": seeds[b],
                "ignore_eos": ignore_eos[b], "output_log_probs": log_probs[b],
                "output_cum_log_probs": log_probs[b],
                "stop_words_list": _word_list(stop_name, stop_arr, b, batch),
                "bad_words_list": _word_list(bad_name, bad_arr, b, batch)}
            try:
                samplings.append(SamplingConfig(**sampling_kwargs))
            except ValueError as e:
                raise InputError(str(e)) from None
        return {"prompts": prompts, "samplings": samplings, "end_id": end_ids[0],
                "prompt_tables": prompt_tables(inputs, batch), "lora_uids": self._lora_uids(inputs, batch),
                "embedding_bias": _embedding_biases(inputs, batch),
                "context_logits": row_values("return_context_logits", "bool", False),
                "generation_logits": row_values("return_generation_logits", "bool", False),
                    "streaming": bool(inputs.scalar("streaming", "bool", False)[0]),
                    "exclude_input": bool(inputs.scalar("exclude_input_in_output", "bool", False)[0])}

    def _lora_uids(self, inputs: RequestInputs, batch: int) -> list[str | None]:
        """Each row's adapter, as tensorrtllm_backend does: `lora_task_id` names one loaded before
        (a directory of the `lora_dir` parameter, or one a request uploaded); `lora_weights` and
        `lora_config` with it upload (or replace) that task's adapter, kept for later requests."""
        weights, config = inputs.array("lora_weights"), inputs.array("lora_config")
        if inputs.array("lora_task_id") is None:
            if weights is not None or config is not None:
                raise InputError("lora_weights / lora_config need a lora_task_id to cache the adapter under")
            return [None] * batch
        uids = [str(t) for t in inputs.scalar("lora_task_id", "int", None, batch, lo=0)]
        if weights is not None or config is not None:
            self._upload_loras(uids, weights, config, batch)
        manager = self.engine.lora_manager
        loaded = manager.lora_uids if manager is not None else []
        unknown = sorted(set(uids) - set(loaded))
        if unknown:
            raise InputError(f"lora_task_id {unknown[0]} is not a loaded LoRA adapter; loaded: {loaded} (send "
                             f"lora_weights and lora_config with its first request, or put it in lora_dir)")
        return uids

    def _upload_loras(self, uids: list[str], weights: Any, config: Any, batch: int) -> None:
        import torch

        from runtime_lib.lora import lora_from_trtllm

        if weights is None or config is None:
            raise InputError("lora_weights and lora_config go together (tensorrtllm_backend's LoRA format)")
        if weights.ndim != 3 or config.ndim != 3 or weights.shape[0] not in (1, batch) \
                or config.shape[0] not in (1, batch):
            raise InputError(f"lora_weights must be [batch, modules x layers, r x in + out x r] and lora_config "
                             f"[batch, modules x layers, 3], got {list(weights.shape)} and {list(config.shape)}")
        if weights.dtype.kind != "f" or config.dtype.kind not in "iu":
            raise InputError(f"lora_weights must be FP16/BF16/FP32 and lora_config INT32, got {weights.dtype} "
                             f"and {config.dtype}")
        for b, uid in enumerate(uids):
            w, c = weights[b if weights.shape[0] > 1 else 0], config[b if config.shape[0] > 1 else 0]
            try:
                adapter = lora_from_trtllm(torch.from_numpy(w.astype(np.float32)), torch.from_numpy(c.astype(np.int64)),
                                           self.engine.model_config, uid, device=self.engine.device)
                self.engine.add_lora_adapter(adapter)
            except ValueError as e:
                raise InputError(str(e)) from None

    def _stop(self, request_id: str, sender: Any) -> None:
        if not request_id:
            raise InputError("stop=true needs the request id of the request to stop")
        with self._calls_lock:
            calls = list(self._by_request_id.get(request_id, ()))
        for call in calls:
            self._abort(call)
        sender.send(flags=FINAL)

    # --- engine outputs -> responses ---------------------------------------------------------

    def _on_output(self, output: Any) -> None:
        # Engine thread: only enqueue.
        self._outputs.put(output)

    def _respond_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                first = self._outputs.get(timeout=0.5)
            except queue.Empty:
                continue
            batch = [first]
            while True:  # drain what backed up: one response per sequence, several tokens each
                try:
                    batch.append(self._outputs.get_nowait())
                except queue.Empty:
                    break
            groups: dict[tuple[str, int], list[Any]] = {}
            for out in batch:
                groups.setdefault((out.request_id, out.sequence_index), []).append(out)
            for (engine_id, _), outs in groups.items():
                with self._calls_lock:
                    call = self._calls.get(engine_id)
                if call is None:
                    continue
                try:
                    self._handle(call, call.rows[engine_id], outs)
                except Exception as e:  # noqa: BLE001
                    pb_utils.Logger.log_error(f"generation: response for {engine_id} failed: {e!r}")
                    self._finish(call, error=f"internal error while responding: {e}")

    def _handle(self, call: _Call, row: _Row, outs: list[Any]) -> None:
        if call.final_sent:
            return
        errors = [o.error for o in outs if o.error]
        if errors:
            self._finish(call, error=errors[0])
            return
        last = outs[-1]
        seq = row.sequences.setdefault(last.sequence_index, _Sequence())
        new_ids = [t for o in outs for t in o.new_token_ids]
        new_lps = [lp for o in outs for lp in (o.new_log_probs or ())]
        now = time.monotonic()
        self._metrics.on_tokens(not seq.token_ids, now - (seq.last_time or call.arrival), len(new_ids))
        seq.last_time = now
        seq.token_ids += new_ids
        seq.log_probs += new_lps
        for o in outs:
            if o.context_logits is not None:
                seq.context_logits = o.context_logits.numpy()
            if o.generation_logits is not None and len(o.new_token_ids):
                seq.gen_logits.append(o.generation_logits.numpy())
        if last.cum_log_prob is not None:
            seq.cum_log_prob = last.cum_log_prob
        if last.finished:
            seq.finish_reason = last.finish_reason or "stop"
        call_done = all(r.finished for r in call.rows.values())
        if call.streaming:
            if not new_ids and not last.finished:
                return
            response = self._response(call, row, [(last.sequence_index, seq, new_ids, new_lps)], len(new_ids))
            self._send(call, response, final=call_done)
        elif row.finished:
            items = [(i, s, s.token_ids, s.log_probs) for i, s in sorted(row.sequences.items())]
            self._send(call, self._response(call, row, items, None), final=call_done)

    def _response(self, call: _Call, row: _Row, items: list[tuple[int, _Sequence, list[int], list[float]]],
                  num_new: int | None) -> Any:
        """Tensors for one batch row: `[1, num_sequences, tokens]` like tensorrtllm_backend.
        `num_new`: a streamed response's new tokens (their generation logits); None: all of them."""
        prefix = [] if (call.streaming or call.exclude_input) else row.prompt_ids
        width = max(len(prefix) + len(ids) for _, _, ids, _ in items)
        output_ids = np.full((1, len(items), width), call.end_id, dtype=np.int32)
        lengths = np.zeros((1, len(items)), dtype=np.int32)
        for k, (_, _, ids, _) in enumerate(items):
            full = prefix + ids
            output_ids[0, k, :len(full)] = full
            lengths[0, k] = len(full)
        wanted = call.outputs
        tensors = [pb_utils.Tensor("output_ids", output_ids)]
        if not wanted or "sequence_length" in wanted:
            tensors.append(pb_utils.Tensor("sequence_length", lengths))
        if not wanted or "cum_log_probs" in wanted:
            tensors.append(pb_utils.Tensor("cum_log_probs", np.array(
                [[s.cum_log_prob for _, s, _, _ in items]], dtype=np.float32)))
        if not wanted or "output_log_probs" in wanted:
            lp_width = max(len(lps) for _, _, _, lps in items)
            lps_arr = np.zeros((1, len(items), lp_width), dtype=np.float32)
            for k, (_, _, _, lps) in enumerate(items):
                lps_arr[0, k, :len(lps)] = lps
            tensors.append(pb_utils.Tensor("output_log_probs", lps_arr))
        if not wanted or "batch_index" in wanted:
            tensors.append(pb_utils.Tensor("batch_index", np.array([[row.batch_index]], dtype=np.int32)))
        if not wanted or "sequence_index" in wanted:
            tensors.append(pb_utils.Tensor("sequence_index", np.array([[items[0][0]]], dtype=np.int32)))
        if not wanted or "finish_reason" in wanted:
            reasons = [(s.finish_reason or "").encode() for _, s, _, _ in items]
            tensors.append(pb_utils.Tensor("finish_reason", np.array([reasons], dtype=np.object_)))
        tensors += _logits_tensors(row, items, num_new, wanted)
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def _send(self, call: _Call, response: Any, final: bool) -> None:
        with call.lock:
            if call.final_sent:
                return
            if final:
                call.final_sent = True
        try:
            call.sender.send(response, flags=FINAL if final else 0)
        except Exception as e:  # noqa: BLE001 - the client may be gone; never let it reach the stub
            pb_utils.Logger.log_warn(f"generation: send failed for {call.request_id!r}: {e!r}")
            if not final:
                self._abort(call)
        if final:
            self._forget(call)

    def _finish(self, call: _Call, error: str | None = None) -> None:
        """Send the final flag (with an error if given) unless already sent; abort what still runs."""
        with call.lock:
            if call.final_sent:
                return
            call.final_sent = True
        for engine_id, row in call.rows.items():
            if not row.finished:
                self.engine.abort(engine_id)
        try:
            if error is not None:
                call.sender.send(error_response(pb_utils, error, "INTERNAL"), flags=FINAL)
            else:
                call.sender.send(flags=FINAL)
        except Exception as e:  # noqa: BLE001
            pb_utils.Logger.log_warn(f"generation: final send failed for {call.request_id!r}: {e!r}")
        self._forget(call)

    def _forget(self, call: _Call) -> None:
        with self._calls_lock:
            for engine_id in call.rows:
                self._calls.pop(engine_id, None)
            same = self._by_request_id.get(call.request_id)
            if same is not None:
                same[:] = [c for c in same if c is not call]
                if not same:
                    del self._by_request_id[call.request_id]

    # --- cancellation ------------------------------------------------------------------------

    def _abort(self, call: _Call) -> None:
        if call.cancelled_at is None:
            call.cancelled_at = time.monotonic()
        for engine_id, row in call.rows.items():
            if not row.finished:
                self.engine.abort(engine_id)

    def _watch_loop(self) -> None:
        while not self._stopping.wait(self._poll_s):
            with self._calls_lock:
                calls = {id(c): c for c in self._calls.values()}.values()
            now = time.monotonic()
            healthy = self._engine_healthy()
            for call in calls:
                if not healthy:  # the engine thread died: fail what is open, never hang it
                    self._finish(call, error="the engine stopped; the server needs a restart")
                    continue
                try:
                    if call.cancelled_at is None and _is_cancelled(call):
                        self._abort(call)
                    elif call.cancelled_at is not None and now - call.cancelled_at > 10.0:
                        # The engine never confirmed the abort: don't leave the client hanging.
                        self._finish(call, error="request was cancelled")
                except Exception as e:  # noqa: BLE001
                    pb_utils.Logger.log_warn(f"generation: cancellation check failed: {e!r}")
            self._metrics.update()

    def finalize(self) -> None:
        self._stopping.set()
        with self._calls_lock:
            calls = {id(c): c for c in self._calls.values()}.values()
        for call in calls:
            self._finish(call, error="the model is being unloaded")
        try:
            self.engine.shutdown()
        except Exception as e:  # noqa: BLE001
            pb_utils.Logger.log_warn(f"generation: engine shutdown failed: {e!r}")


def _is_cancelled(call: _Call) -> bool:
    # Under the call's lock, and only before its final response: once the final flag is sent,
    # Triton frees the request's response factory and is_cancelled() would touch freed memory
    # (measured: the server segfaults in TRITONBACKEND_ResponseFactoryIsCancelled).
    with call.lock:
        return not call.final_sent and call.request.is_cancelled()


def _logits_tensors(row: _Row, items: list[tuple[int, _Sequence, list[int], list[float]]], num_new: int | None,
                    wanted: frozenset[str]) -> list[Any]:
    """`context_logits` [1, prompt, V] (once, with sequence 0's first response) and
    `generation_logits` [1, sequences, tokens, V] (the response's tokens), when asked for."""
    tensors = []
    seq0 = next((s for i, s, _, _ in items if i == 0), None)
    if row.context_logits and seq0 is not None and seq0.context_logits is not None \
            and (not wanted or "context_logits" in wanted):
        tensors.append(pb_utils.Tensor("context_logits", seq0.context_logits[None].astype(np.float32)))
        seq0.context_logits = None
    if row.generation_logits and (not wanted or "generation_logits" in wanted):
        blocks = []
        for _, s, _, _ in items:
            rows = np.concatenate(s.gen_logits) if s.gen_logits else np.zeros((0, 0), np.float32)
            blocks.append(rows[len(rows) - num_new:] if num_new is not None else rows)
            if num_new is not None:
                s.gen_logits = []  # streamed: sent with this response
        tensors.append(pb_utils.Tensor("generation_logits", stack_logits(blocks)))
    return tensors


def _embedding_biases(inputs: RequestInputs, batch: int) -> list[Any]:
    """Each row's `embedding_bias` [vocab] (one row broadcasts) or None; the engine checks the size."""
    arr = inputs.array("embedding_bias")
    if arr is None:
        return [None] * batch
    if arr.dtype.kind != "f":
        raise InputError(f"embedding_bias must be FP32, got {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[0] not in (1, batch):
        raise InputError(f"embedding_bias must have shape [batch, vocab], got {list(arr.shape)}")
    return [arr[b if arr.shape[0] > 1 else 0] for b in range(batch)]


def _word_list(name: str, arr: Any, row: int, batch: int) -> list[list[int]] | None:
    if arr is None or arr.size == 0:
        return None
    if arr.dtype.kind not in "iu":
        raise InputError(f"{name} must be INT32, got {arr.dtype}")
    if arr.ndim != 3 or arr.shape[0] not in (1, batch):
        raise InputError(f"{name} must have shape [batch, 2, L], got {list(arr.shape)}")
    try:
        words = from_word_list_format(arr[row if arr.shape[0] > 1 else 0], field=name)
    except ValueError as e:
        raise InputError(str(e)) from None
    return words or None
