"""A small client for the `ensemble` model over Triton's gRPC or HTTP endpoint, on tritonclient.

    from client import LLMClient
    with LLMClient("localhost:8001", protocol="grpc") as llm:
        print(llm.generate("Once upon a time", max_tokens=32).text)
        for delta in llm.stream("Once upon a time", max_tokens=32, temperature=0.8, top_k=40, seed=1):
            print(delta.text, end="", flush=True)

gRPC streams through `start_stream`/`async_stream_infer` (unary ModelInfer is refused for a decoupled
model). Triton's HTTP `/infer` refuses decoupled models too, so HTTP uses Triton's generate
extension (`/generate`, `/generate_stream` with server-sent events) over tritonclient.http's
connection.
"""
from __future__ import annotations

import json
import queue
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Self

import numpy as np

# Ensemble input name -> numpy dtype (see model_repository/ensemble/config.pbtxt).
INPUT_DTYPES: dict[str, Any] = {
    "max_tokens": np.int32, "top_k": np.int32, "beam_width": np.int32, "num_return_sequences": np.int32,
    "min_tokens": np.int32, "end_id": np.int32, "pad_id": np.int32,
    "temperature": np.float32, "top_p": np.float32, "min_p": np.float32, "length_penalty": np.float32,
    "repetition_penalty": np.float32, "presence_penalty": np.float32, "frequency_penalty": np.float32,
    "seed": np.uint64, "lora_task_id": np.uint64,
    "stream": np.bool_, "exclude_input_in_output": np.bool_, "ignore_eos": np.bool_,
    "return_log_probs": np.bool_, "return_num_input_tokens": np.bool_, "return_num_output_tokens": np.bool_,
    "stop_words": np.object_, "bad_words": np.object_,
}
DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}


class LLMClientError(RuntimeError):
    """The server rejected or failed the request; the message is the server's (it names the field).
    `status` is the HTTP status over HTTP (400 for a bad input); None over gRPC streams, which
    carry only the message."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class TextDelta:
    """One streamed piece of text (only the new text) of one returned sequence."""

    text: str
    sequence_index: int = 0
    finish_reason: str | None = None
    num_output_tokens: int | None = None


@dataclass(frozen=True)
class GenerationResult:
    texts: list[str]                       # one per returned sequence
    finish_reasons: list[str | None]
    num_input_tokens: int | None = None
    num_output_tokens: list[int] | None = None
    cum_log_probs: list[float] | None = None

    @property
    def text(self) -> str:
        return self.texts[0] if self.texts else ""

    @property
    def finish_reason(self) -> str | None:
        return self.finish_reasons[0] if self.finish_reasons else None


class LLMClient:
    def __init__(self, url: str | None = None, protocol: str = "grpc", model: str = "ensemble",
                 timeout_s: float = 300.0) -> None:
        if protocol not in DEFAULT_URLS:
            raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
        self.protocol = protocol
        self.url = url or DEFAULT_URLS[protocol]
        self.model = model
        self.timeout_s = timeout_s
        self._http = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    # --- public API --------------------------------------------------------------------------

    def generate(self, prompt: str | None, max_tokens: int | None = 64, **params: Any) -> GenerationResult:
        """The whole result in one response. `params` are ensemble inputs (temperature, top_k,
        top_p, seed, stop_words, min_tokens, exclude_input_in_output, ...)."""
        fields = self._fields(prompt, max_tokens, params, stream=False)
        events = self._grpc(fields) if self.protocol == "grpc" else self._http_events(fields, stream=False)
        responses = list(events)
        if not responses:
            raise LLMClientError("the server sent no result")
        out = responses[0]
        texts = [_text(t) for t in np.asarray(out["text_output"]).reshape(-1)]
        reasons = [_text(r) or None for r in np.asarray(out.get("finish_reason", [""] * len(texts))).reshape(-1)]
        num_out = out.get("num_output_tokens")
        cum = out.get("cum_log_probs")
        num_in = out.get("num_input_tokens")
        return GenerationResult(
            texts=texts, finish_reasons=reasons,
            num_input_tokens=int(np.asarray(num_in).reshape(-1)[0]) if num_in is not None else None,
            num_output_tokens=[int(x) for x in np.asarray(num_out).reshape(-1)] if num_out is not None else None,
            cum_log_probs=[float(x) for x in np.asarray(cum).reshape(-1)] if cum is not None else None)

    def stream(self, prompt: str | None, max_tokens: int | None = 64, **params: Any) -> Iterator[TextDelta]:
        """Yield text deltas as the server makes them. Closing the iterator early cancels the
        request on the server (it stops generating)."""
        fields = self._fields(prompt, max_tokens, params, stream=True)
        events = self._grpc(fields) if self.protocol == "grpc" else self._http_events(fields, stream=True)
        for out in events:
            if "text_output" not in out:
                continue
            num_out = out.get("num_output_tokens")
            for text in np.asarray(out["text_output"]).reshape(-1):
                yield TextDelta(
                    text=_text(text),
                    sequence_index=int(np.asarray(out.get("sequence_index", 0)).reshape(-1)[0]),
                    finish_reason=_text(np.asarray(out.get("finish_reason", "")).reshape(-1)[0]) or None,
                    num_output_tokens=int(np.asarray(num_out).reshape(-1)[0]) if num_out is not None else None)

    # --- request building --------------------------------------------------------------------

    @staticmethod
    def _fields(prompt: str | None, max_tokens: int | None, params: dict[str, Any], stream: bool) -> dict[str, Any]:
        # None leaves a field out (the server then names it in its error).
        fields: dict[str, Any] = {"stream": stream}
        if prompt is not None:
            fields["text_input"] = prompt
        if max_tokens is not None:
            fields["max_tokens"] = max_tokens
        for name, value in params.items():
            if value is None:
                continue
            if name not in INPUT_DTYPES:
                raise ValueError(f"unknown parameter {name!r}; known: {sorted(INPUT_DTYPES)}")
            fields[name] = value
        return fields

    # --- gRPC --------------------------------------------------------------------------------

    def _grpc(self, fields: dict[str, Any]) -> Iterator[dict[str, Any]]:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import np_to_triton_dtype

        inputs = []
        for name, value in fields.items():
            if name == "text_input":
                arr = np.array([[value.encode("utf-8")]], dtype=np.object_)
            elif INPUT_DTYPES[name] is np.object_:
                words = [value] if isinstance(value, str) else list(value)
                arr = np.array([[w.encode("utf-8") for w in words]], dtype=np.object_)
            else:
                arr = np.array([[value]], dtype=INPUT_DTYPES[name])
            tensor = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
            tensor.set_data_from_numpy(arr)
            inputs.append(tensor)
        results: queue.SimpleQueue = queue.SimpleQueue()
        client = grpcclient.InferenceServerClient(self.url)
        finished = False
        try:
            client.start_stream(callback=lambda result, error: results.put((result, error)),
                                stream_timeout=self.timeout_s)
            client.async_stream_infer(self.model, inputs, enable_empty_final_response=True)
            while True:
                try:
                    result, error = results.get(timeout=self.timeout_s)
                except queue.Empty:
                    raise LLMClientError(f"no response within {self.timeout_s}s") from None
                if error is not None:
                    finished = True
                    raise LLMClientError(_grpc_message(error))
                response = result.get_response()
                out = {o.name: result.as_numpy(o.name) for o in response.outputs}
                if out:
                    yield out
                if response.parameters["triton_final_response"].bool_param:
                    finished = True
                    return
        finally:
            # Not finished: the consumer stopped early. Cancelling the stream cancels the request.
            client.stop_stream(cancel_requests=not finished)
            client.close()

    # --- HTTP --------------------------------------------------------------------------------

    def _http_client(self) -> Any:
        if self._http is None:
            import tritonclient.http as httpclient
            self._http = httpclient.InferenceServerClient(
                self.url, connection_timeout=self.timeout_s, network_timeout=self.timeout_s)
        return self._http

    def _http_events(self, fields: dict[str, Any], stream: bool) -> Iterator[dict[str, Any]]:
        body = dict(fields)
        for name in ("stop_words", "bad_words"):
            if name in body and isinstance(body[name], str):
                body[name] = [body[name]]
        endpoint = "generate_stream" if stream else "generate"
        # tritonclient.http has no generate() helper; its connection's POST is the transport.
        response = self._http_client()._post(
            request_uri=f"v2/models/{self.model}/{endpoint}", request_body=json.dumps(body),
            headers={"Content-Type": "application/json"}, query_params=None)
        try:
            if not stream:
                payload = json.loads(bytes(response.read()).decode("utf-8"))
                if response.status_code != 200 or "error" in payload:
                    raise LLMClientError(payload.get("error", f"HTTP {response.status_code}"),
                                         response.status_code)
                yield payload
                return
            while True:
                event = bytes(response.readline(sep=b"\n\n"))
                if not event:
                    return
                for line in event.decode("utf-8").splitlines():
                    if not line.startswith("data:"):
                        continue
                    payload = json.loads(line[5:])
                    if "error" in payload:
                        raise LLMClientError(payload["error"], response.status_code)
                    yield payload
        finally:
            response.release()


def _text(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, (bytes, bytearray)) else str(value)


def _grpc_message(error: Any) -> str:
    message = error.message() if hasattr(error, "message") and callable(error.message) else str(error)
    return message
