"""Triton `ensemble` model: the text-in/text-out entry point clients call (tensorrtllm_backend's
ensemble contract), composed in Python rather than by Triton's ensemble scheduler.

Per request: validate the inputs (errors name the field), tokenize in-process, stream from the
`generation` model through BLS, and detokenize each sequence in-process with
`IncrementalDetokenizer`, so every streamed `text_output` carries only new text and the deltas
concatenate to exactly the non-streamed text. A watcher thread polls `is_cancelled()` every
`cancellation_check_period_ms`; when a client goes away it sends `generation` a `stop` for the
running request, which ends the engine's work within a step (a platform ensemble cannot: DESIGN §9).
`execute()` returns at once; each request streams on its own thread and always ends with exactly
one final response.
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
import re
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils
from _llm_common import InputError, ModelParameters, RequestInputs, error_response, prompt_tables, stack_logits

from runtime_lib.config import ModelConfig
from runtime_lib.tokenizer import IncrementalDetokenizer, load_tokenizer, to_word_list_format

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL

# (ensemble names, first one preferred; generation's name; kind; dtype sent to generation; range)
_FORWARDED: list[tuple[tuple[str, ...], str, str, Any, dict[str, Any]]] = [
    (("end_id",), "end_id", "int", np.int32, {"lo": -1}),
    (("pad_id",), "pad_id", "int", np.int32, {"lo": -1}),
    (("temperature",), "temperature", "float", np.float32, {"lo": 0.0}),
    (("top_k",), "runtime_top_k", "int", np.int32, {"lo": 0}),
    (("top_p",), "runtime_top_p", "float", np.float32, {"lo": 0.0, "hi": 1.0}),
    (("min_p",), "min_p", "float", np.float32, {"lo": 0.0, "hi": 1.0}),
    (("length_penalty",), "len_penalty", "float", np.float32, {}),
    (("repetition_penalty",), "repetition_penalty", "float", np.float32, {"lo": 0.0, "lo_open": True}),
    (("presence_penalty",), "presence_penalty", "float", np.float32, {"lo": -2.0, "hi": 2.0}),
    (("frequency_penalty",), "frequency_penalty", "float", np.float32, {"lo": -2.0, "hi": 2.0}),
    (("beam_width",), "beam_width", "int", np.int32, {"lo": 1}),
    (("num_return_sequences",), "num_return_sequences", "int", np.int32, {"lo": 1}),
    (("min_tokens", "min_length"), "min_tokens", "int", np.int32, {"lo": 0}),
    (("seed", "random_seed"), "seed", "int", np.uint64, {"lo": 0}),
    (("ignore_eos",), "ignore_eos", "bool", np.bool_, {}),
    (("return_log_probs",), "return_log_probs", "bool", np.bool_, {}),
    (("lora_task_id",), "lora_task_id", "int", np.uint64, {"lo": 0}),
    (("return_context_logits",), "return_context_logits", "bool", np.bool_, {}),
    (("return_generation_logits",), "return_generation_logits", "bool", np.bool_, {}),
]
_UNSUPPORTED: dict[str, str] = {}
# generation / SamplingConfig field names -> the names this model's clients sent.
_FIELD_NAMES = {
    "input_ids": "text_input", "request_output_len": "max_tokens", "max_new_tokens": "max_tokens",
    "runtime_top_k": "top_k", "runtime_top_p": "top_p", "len_penalty": "length_penalty",
    "stop_words_list": "stop_words", "bad_words_list": "bad_words", "num_beams": "beam_width",
    "min_length": "min_tokens", "random_seed": "seed",
}
_FIELD_RE = re.compile(r"\b(" + "|".join(map(re.escape, _FIELD_NAMES)) + r")\b")


@dataclass(eq=False)
class _Job:
    """One client request being served."""

    request: Any
    sender: Any
    generation_id: str
    prompt_ids: list[int]
    inputs: list[Any]
    streaming: bool
    exclude_input: bool
    num_sequences: int
    want_log_probs: bool
    want_num_input: bool
    want_num_output: bool
    want_context_logits: bool = False
    want_generation_logits: bool = False
    context_logits: Any = None        # [1, prompt, V] from generation, until sent
    num_virtual: int = 0              # prompt tuning's virtual tokens before the prompt
    cancelled: bool = False
    final_sent: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(eq=False)
class _SequenceText:
    detok: IncrementalDetokenizer
    num_tokens: int = 0
    cum_log_prob: float = 0.0
    log_probs: list[float] = field(default_factory=list)
    finish_reason: str = ""
    pending_prefix: str = ""  # prompt text, sent with this sequence's first delta
    gen_logits: list[Any] = field(default_factory=list)  # (k, V) blocks not sent yet


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        self.model_config = json.loads(args["model_config"])
        params = ModelParameters(self.model_config)
        self.tokenizer = load_tokenizer(params.model_dir(),
                                        add_special_tokens=params.bool("add_special_tokens", True))
        # Prompt tuning: a table's rows become virtual ids from the model's vocab_size on.
        self.vocab_size = ModelConfig.from_dir(params.model_dir()).vocab_size
        self.generation_model = params.str("generation_model", "generation")
        self._poll_s = params.int("cancellation_check_period_ms", 20, lo=1) / 1000.0
        # Streams composed at once. Past a few dozen concurrent BLS streams, each also sending
        # decoupled responses, the 2.51 Python backend's IPC can stall every stream for good
        # (measured: 200 concurrent streams, all threads parked in response_sender.send and
        # in the BLS iterator). Requests beyond the cap wait for a slot.
        self._slots = threading.BoundedSemaphore(params.int("max_active_streams", 32, lo=1))
        self._jobs: dict[int, _Job] = {}
        self._jobs_lock = threading.Lock()
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch_loop, name="ensemble-watch", daemon=True)
        self._watcher.start()

    # --- requests in -------------------------------------------------------------------------

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                job = self._prepare(request, sender)
            except InputError as e:
                self._send_error(sender, str(e), "INVALID_ARG")
                continue
            except Exception as e:  # noqa: BLE001 - one request's failure must never reach the stub
                pb_utils.Logger.log_error(f"ensemble: request failed: {e!r}")
                self._send_error(sender, f"internal error: {e}", "INTERNAL")
                continue
            with self._jobs_lock:
                self._jobs[id(job)] = job
            threading.Thread(target=self._run, args=(job,), name="ensemble-stream", daemon=True).start()

    def _send_error(self, sender: Any, message: str, code: str) -> None:
        try:
            sender.send(error_response(pb_utils, message, code), flags=FINAL)
        except Exception as e:  # noqa: BLE001
            pb_utils.Logger.log_error(f"ensemble: could not send error response: {e!r}")

    def _prepare(self, request: Any, sender: Any) -> _Job:
        inputs = RequestInputs(request, pb_utils)
        for name, why in _UNSUPPORTED.items():
            inputs.reject_if_set(name, why)
        text = inputs.required("text_input", "OSU", "STRING (BYTES)")
        if text.size != 1:
            raise InputError(f"text_input must hold exactly one prompt (batch size 1), got shape {list(text.shape)}")
        raw = text.reshape(-1)[0]
        try:
            prompt = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError:
            raise InputError("text_input must be UTF-8 text") from None
        prompt_ids = self.tokenizer.encode(prompt)
        if not prompt_ids:
            raise InputError("text_input must not be empty (it encodes to no tokens)")
        max_tokens = inputs.scalar("max_tokens", "int", None, lo=1, required=True)[0]
        streaming = bool(inputs.scalar("stream", "bool", False)[0])
        exclude = bool(inputs.scalar("exclude_input_in_output", "bool", False)[0])
        want_num_input = bool(inputs.scalar("return_num_input_tokens", "bool", False)[0])
        want_num_output = bool(inputs.scalar("return_num_output_tokens", "bool", False)[0])

        virtual, table_inputs = self._prompt_table(inputs)
        model_ids = virtual + prompt_ids
        gen_inputs = [
            pb_utils.Tensor("input_ids", np.array([model_ids], dtype=np.int32)),
            pb_utils.Tensor("input_lengths", np.array([[len(model_ids)]], dtype=np.int32)),
            pb_utils.Tensor("request_output_len", np.array([[max_tokens]], dtype=np.int32)),
            pb_utils.Tensor("streaming", np.array([[streaming]], dtype=np.bool_)),
            pb_utils.Tensor("exclude_input_in_output", np.array([[True]], dtype=np.bool_)),
        ] + table_inputs
        sent: dict[str, Any] = {}
        for names, gen_name, kind, dtype, bounds in _FORWARDED:
            if inputs.first(*names)[1] is None:
                continue  # unsent: generation applies TensorRT-LLM's defaults
            value = inputs.scalar(names, kind, None, **bounds)[0]
            sent[gen_name] = value
            gen_inputs.append(pb_utils.Tensor(gen_name, np.array([[value]], dtype=dtype)))
        for names, gen_name in ((("stop_words",), "stop_words_list"), (("bad_words",), "bad_words_list")):
            name, rows = inputs.strings(names)
            words = self.tokenizer.encode_words(rows[0])
            if words:
                gen_inputs.append(pb_utils.Tensor(gen_name, to_word_list_format([words])))
        for name in ("lora_weights", "lora_config"):  # an uploaded adapter: generation checks it
            arr = inputs.array(name)
            if arr is not None:
                gen_inputs.append(pb_utils.Tensor(name, np.ascontiguousarray(arr)))
        beams = sent.get("beam_width", 1)
        num_sequences = sent.get("num_return_sequences") or 1
        if beams > 1 and num_sequences > beams:
            raise InputError(f"num_return_sequences ({num_sequences}) must be <= beam_width ({beams})")
        return _Job(request=request, sender=sender, generation_id=f"ens-{uuid.uuid4().hex}",
                    prompt_ids=prompt_ids, inputs=gen_inputs, streaming=streaming, exclude_input=exclude,
                    num_sequences=num_sequences, want_log_probs=bool(sent.get("return_log_probs")),
                    want_num_input=want_num_input, want_num_output=want_num_output,
                    want_context_logits=bool(sent.get("return_context_logits")),
                    want_generation_logits=bool(sent.get("return_generation_logits")), num_virtual=len(virtual))

    # --- streaming from generation -----------------------------------------------------------

    def _run(self, job: _Job) -> None:
        with self._slots:
            if job.cancelled:  # the client left while the request waited for a slot
                self._finish(job)
                with self._jobs_lock:
                    self._jobs.pop(id(job), None)
                return
            self._compose(job)

    def _compose(self, job: _Job) -> None:
        sequences: dict[int, _SequenceText] = {}
        try:
            outputs = ["output_ids", "sequence_length", "sequence_index", "finish_reason"]
            if job.want_log_probs:
                outputs += ["cum_log_probs", "output_log_probs"]
            outputs += ["context_logits"] if job.want_context_logits else []
            outputs += ["generation_logits"] if job.want_generation_logits else []
            gen_request = pb_utils.InferenceRequest(
                model_name=self.generation_model, inputs=job.inputs, request_id=job.generation_id,
                requested_output_names=outputs)
            for response in gen_request.exec(decoupled=True):
                if job.final_sent:
                    continue  # drain: generation still sends its final flag
                if response.has_error():
                    err = response.error()
                    code = err.code() if callable(getattr(err, "code", None)) else "INTERNAL"
                    self._finish(job, error=_rename_fields(err.message()), code=code)
                    continue
                if not response.output_tensors():
                    continue  # generation's flag-only final response
                self._on_generation_response(job, sequences, response)
            if not job.final_sent:
                self._finish(job, sequences=sequences)
        except Exception as e:  # noqa: BLE001
            pb_utils.Logger.log_error(f"ensemble: stream {job.generation_id} failed: {e!r}")
            self._finish(job, error=f"internal error: {e}", code="INTERNAL")
        finally:
            if not job.final_sent:
                self._finish(job, error="internal error: stream ended without a result", code="INTERNAL")
            with self._jobs_lock:
                self._jobs.pop(id(job), None)

    def _prompt_table(self, inputs: RequestInputs) -> tuple[list[int], list[Any]]:
        """Prompt tuning through text: the table's rows (its first `prompt_vocab_size`) become a
        prefix of virtual tokens before the prompt, ids vocab_size + 0, 1, ... (the soft prompt of
        p-tuning); generation checks the table. ([], []) without a table."""
        table = prompt_tables(inputs, 1)[0]   # (rows, hidden) float32: its first prompt_vocab_size
        if table is None:
            return [], []
        rows = table.shape[0]
        tensors = [pb_utils.Tensor("prompt_embedding_table", table[None].astype(np.float16)),  # the input's FP16
                   pb_utils.Tensor("prompt_vocab_size", np.array([[rows]], dtype=np.int32))]
        return [self.vocab_size + i for i in range(rows)], tensors

    def _sequence(self, job: _Job, sequences: dict[int, _SequenceText], index: int) -> _SequenceText:
        seq = sequences.get(index)
        if seq is None:
            seq = sequences[index] = _SequenceText(self.tokenizer.incremental())
            if not job.exclude_input:
                seq.pending_prefix = seq.detok.add(job.prompt_ids)
        return seq

    def _on_generation_response(self, job: _Job, sequences: dict[int, _SequenceText], response: Any) -> None:
        out_ids = pb_utils.get_output_tensor_by_name(response, "output_ids").as_numpy()  # [1, S, T]
        lengths = pb_utils.get_output_tensor_by_name(response, "sequence_length").as_numpy()  # [1, S]
        first_index = int(pb_utils.get_output_tensor_by_name(response, "sequence_index").as_numpy().reshape(-1)[0])
        reasons = pb_utils.get_output_tensor_by_name(response, "finish_reason").as_numpy().reshape(-1)
        cum = lps = None
        if job.want_log_probs:
            cum = pb_utils.get_output_tensor_by_name(response, "cum_log_probs").as_numpy().reshape(-1)
            lps = pb_utils.get_output_tensor_by_name(response, "output_log_probs").as_numpy()
        ctx = _optional_output(response, "context_logits") if job.want_context_logits else None
        if ctx is not None:
            job.context_logits = ctx
        gen = _optional_output(response, "generation_logits") if job.want_generation_logits else None
        for k in range(out_ids.shape[1]):
            # Streaming: one sequence per response (its index given); otherwise all of them, in order.
            index = first_index if job.streaming else k
            seq = self._sequence(job, sequences, index)
            n = int(lengths[0, k])
            new_ids = out_ids[0, k, :n].tolist()
            delta = seq.pending_prefix + seq.detok.add(new_ids)
            seq.pending_prefix = ""
            seq.num_tokens += n
            if gen is not None and gen.size:
                seq.gen_logits.append(gen[0, k, :n])
            reason = reasons[k].decode() if isinstance(reasons[k], bytes) else str(reasons[k])
            if cum is not None:
                seq.cum_log_prob = float(cum[k])
                seq.log_probs += lps[0, k, :n].tolist()
            if reason:
                seq.finish_reason = reason
                delta += seq.detok.finish()
            if job.streaming:
                done = (len(sequences) >= job.num_sequences
                        and all(s.finish_reason for s in sequences.values()))
                if delta or done or reason:
                    self._send(job, self._response(job, [(index, seq, delta, lps[0, k, :n].tolist()
                                                          if lps is not None else [])]), final=done)

    def _response(self, job: _Job, items: list[tuple[int, _SequenceText, str, list[float]]]) -> Any:
        tensors = [pb_utils.Tensor("text_output", np.array([t.encode("utf-8") for _, _, t, _ in items],
                                                           dtype=np.object_))]
        tensors.append(pb_utils.Tensor("batch_index", np.zeros((1, 1), dtype=np.int32)))
        tensors.append(pb_utils.Tensor("sequence_index", np.array([[items[0][0]]], dtype=np.int32)))
        reasons = [s.finish_reason.encode() for _, s, _, _ in items]
        tensors.append(pb_utils.Tensor("finish_reason", np.array(reasons, dtype=np.object_)))
        if job.want_log_probs:
            tensors.append(pb_utils.Tensor("cum_log_probs", np.array(
                [[s.cum_log_prob for _, s, _, _ in items]], dtype=np.float32)))
            width = max(len(lp) for _, _, _, lp in items)
            arr = np.zeros((1, len(items), width), dtype=np.float32)
            for k, (_, _, _, lp) in enumerate(items):
                arr[0, k, :len(lp)] = lp
            tensors.append(pb_utils.Tensor("output_log_probs", arr))
        if job.want_num_input:
            tensors.append(pb_utils.Tensor("num_input_tokens", np.array([[len(job.prompt_ids) + job.num_virtual]],
                                                                           dtype=np.int32)))
        if job.want_num_output:
            tensors.append(pb_utils.Tensor("num_output_tokens", np.array(
                [[s.num_tokens for _, s, _, _ in items]], dtype=np.int32)))
        if job.want_context_logits and job.context_logits is not None:
            tensors.append(pb_utils.Tensor("context_logits", np.ascontiguousarray(job.context_logits)))
            job.context_logits = None
        if job.want_generation_logits:
            tensors.append(pb_utils.Tensor("generation_logits", _take_generation_logits([s for _, s, _, _ in items])))
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def _send(self, job: _Job, response: Any, final: bool) -> None:
        with job.lock:
            if job.final_sent:
                return
            job.final_sent = final
        try:
            job.sender.send(response, flags=FINAL if final else 0)
        except Exception as e:  # noqa: BLE001 - the client is gone: stop generating for it
            pb_utils.Logger.log_warn(f"ensemble: send failed for {job.generation_id}: {e!r}")
            self._cancel(job)

    def _finish(self, job: _Job, error: str | None = None,
                sequences: dict[int, _SequenceText] | None = None, code: Any = "INVALID_ARG") -> None:
        """The request's one final response: an error, the whole result (non-streaming), or
        whatever text is still held back (streaming; flag-only if there is none)."""
        with job.lock:
            if job.final_sent:
                return
            job.final_sent = True
        try:
            if error is not None:
                job.sender.send(error_response(pb_utils, error, code), flags=FINAL)
                return
            items = []
            for index, seq in sorted((sequences or {}).items()):
                tail = seq.pending_prefix + seq.detok.finish()
                text = tail if job.streaming else seq.detok.text
                items.append((index, seq, text, [] if job.streaming else seq.log_probs))
            if job.cancelled or (job.streaming and not any(t for _, _, t, _ in items)) or not items:
                job.sender.send(flags=FINAL)
            else:
                job.sender.send(self._response(job, items), flags=FINAL)
        except Exception as e:  # noqa: BLE001
            pb_utils.Logger.log_warn(f"ensemble: final send failed for {job.generation_id}: {e!r}")

    # --- cancellation ------------------------------------------------------------------------

    def _cancel(self, job: _Job) -> None:
        if job.cancelled:
            return
        job.cancelled = True
        try:
            stop = pb_utils.InferenceRequest(
                model_name=self.generation_model, request_id=job.generation_id,
                inputs=[pb_utils.Tensor("stop", np.array([[True]], dtype=np.bool_))],
                requested_output_names=[])
            for response in stop.exec(decoupled=True):
                if response.has_error():
                    pb_utils.Logger.log_warn(f"ensemble: stop failed: {response.error().message()}")
        except Exception as e:  # noqa: BLE001
            pb_utils.Logger.log_warn(f"ensemble: stop for {job.generation_id} failed: {e!r}")

    def _watch_loop(self) -> None:
        while not self._stopping.wait(self._poll_s):
            with self._jobs_lock:
                jobs = list(self._jobs.values())
            for job in jobs:
                try:
                    if not job.cancelled and self._is_cancelled(job):
                        self._cancel(job)
                except Exception as e:  # noqa: BLE001
                    pb_utils.Logger.log_warn(f"ensemble: cancellation check failed: {e!r}")

    @staticmethod
    def _is_cancelled(job: _Job) -> bool:
        # Under the job's lock, and only before its final response: once the final flag is sent,
        # Triton frees the request's response factory and is_cancelled() would touch freed memory
        # (measured: the server segfaults in TRITONBACKEND_ResponseFactoryIsCancelled).
        with job.lock:
            return not job.final_sent and job.request.is_cancelled()

    def finalize(self) -> None:
        self._stopping.set()


def _optional_output(response: Any, name: str) -> Any:
    tensor = pb_utils.get_output_tensor_by_name(response, name)
    return None if tensor is None else tensor.as_numpy()


def _take_generation_logits(seqs: list[_SequenceText]) -> Any:
    """[1, sequences, tokens, V]: each sequence's logits not sent yet (then forgotten)."""
    blocks = [np.concatenate(s.gen_logits) if s.gen_logits else np.zeros((0, 0), np.float32) for s in seqs]
    for s in seqs:
        s.gen_logits = []
    return stack_logits(blocks)


def _rename_fields(message: str) -> str:
    """Name the fields this model's client sent, not generation's, in a forwarded error."""
    return _FIELD_RE.sub(lambda m: _FIELD_NAMES[m.group(1)], message)
