"""Raw tritonclient gRPC helpers for the serving tests: build `[1, n]` inputs and collect a
decoupled stream's responses, counting final flags."""
from __future__ import annotations

import queue
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

GRPC_DTYPES = {
    "text_input": np.object_, "stop_words": np.object_, "bad_words": np.object_,
    "max_tokens": np.int32, "top_k": np.int32, "beam_width": np.int32, "num_return_sequences": np.int32,
    "min_tokens": np.int32, "min_length": np.int32, "end_id": np.int32, "pad_id": np.int32,
    "temperature": np.float32, "top_p": np.float32, "min_p": np.float32, "length_penalty": np.float32,
    "repetition_penalty": np.float32, "presence_penalty": np.float32, "frequency_penalty": np.float32,
    "seed": np.uint64, "random_seed": np.uint64, "lora_task_id": np.uint64,
    "stream": np.bool_, "exclude_input_in_output": np.bool_, "ignore_eos": np.bool_,
    "return_log_probs": np.bool_, "return_context_logits": np.bool_, "return_generation_logits": np.bool_,
    "prompt_vocab_size": np.int32,
    "return_num_input_tokens": np.bool_, "return_num_output_tokens": np.bool_,
    # generation (tensorrtllm_backend names)
    "input_ids": np.int32, "input_lengths": np.int32, "request_output_len": np.int32,
    "runtime_top_k": np.int32, "runtime_top_p": np.float32, "streaming": np.bool_, "stop": np.bool_,
}


def tensor(name: str, value: Any, dtype: Any = None):
    """A `[1, n]` tritonclient gRPC input (strings UTF-8 encoded)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    dtype = dtype or GRPC_DTYPES[name]
    values = value if isinstance(value, (list, tuple)) else [value]
    if dtype is np.object_:
        values = [v.encode("utf-8") if isinstance(v, str) else v for v in values]
    arr = np.array([values], dtype=dtype) if not isinstance(value, np.ndarray) else value
    t = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
    t.set_data_from_numpy(arr)
    return t


@dataclass
class StreamResult:
    responses: list[dict[str, np.ndarray]]  # outputs of each response that had any
    num_final: int                            # responses flagged final
    error: str | None


def grpc_stream(url: str, model: str, inputs: list, request_id: str = "", timeout_s: float = 60.0,
                cancel_after: int | None = None, settle_s: float = 0.3) -> StreamResult:
    """Send one request over a gRPC stream and collect every response until the final flag (or an
    error), then wait `settle_s` more to catch anything sent after it. `cancel_after=n` cancels
    the stream after n responses instead."""
    import tritonclient.grpc as grpcclient

    results: queue.SimpleQueue = queue.SimpleQueue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer(model, inputs, request_id=request_id, enable_empty_final_response=True)
    responses, num_final, error = [], 0, None
    try:
        deadline = time.monotonic() + timeout_s
        done = False
        while True:
            wait = (deadline - time.monotonic()) if not done else settle_s
            try:
                result, err = results.get(timeout=max(wait, 0.01))
            except queue.Empty:
                if done:
                    break
                raise AssertionError(f"no final response from {model} within {timeout_s}s") from None
            if err is not None:
                error = err.message() if hasattr(err, "message") else str(err)
                done = True
                continue
            response = result.get_response()
            outs = {o.name: result.as_numpy(o.name) for o in response.outputs}
            if outs:
                responses.append(outs)
            if response.parameters["triton_final_response"].bool_param:
                num_final += 1
                done = True
            if cancel_after is not None and len(responses) >= cancel_after and not done:
                client.stop_stream(cancel_requests=True)
                return StreamResult(responses, num_final, error)
    finally:
        client.stop_stream()
        client.close()
    return StreamResult(responses, num_final, error)


def texts(result: StreamResult) -> list[str]:
    return [t.decode("utf-8") for r in result.responses for t in r["text_output"].reshape(-1)]
