"""End to end through the real tritonserver and real tritonclient (gRPC and HTTP): the served
text equals runtime_lib's offline generate, streams concatenate to it with exactly one final
response, every optional input is accepted, bad inputs get errors naming the field while the
server keeps serving, and cancelled requests stop and free their KV blocks."""
from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pytest
import torch
from serving_helpers import grpc_stream, tensor, texts

from client import LLMClient, LLMClientError
from runtime_lib.model_runner import ModelRunner
from runtime_lib.tokenizer import load_tokenizer

PROMPTS = ["Once upon a time", "東京は日本の首都です。 🙂", "def hello(name):", "Paged attention keeps"]
SEEDED = {"temperature": 0.9, "top_k": 20, "top_p": 0.9, "seed": 1234}
PROTOCOLS = ["grpc", "http"]


@pytest.fixture(scope="module")
def tokenizer(triton_server):
    return load_tokenizer(triton_server.model_dir)


@pytest.fixture(scope="module")
def offline(triton_server, tokenizer):
    """runtime_lib's offline API (ModelRunner.generate): generated ids and their text."""
    runner = ModelRunner.from_dir(triton_server.model_dir, device="cpu")

    def generate(prompt: str, max_tokens: int, seed: int | None = None, **sampling) -> tuple[list[int], str]:
        ids = tokenizer.encode(prompt)
        out = runner.generate([torch.tensor(ids)], max_new_tokens=max_tokens, end_id=tokenizer.end_id,
                              pad_id=tokenizer.pad_id, random_seed=seed, return_dict=True,
                              output_sequence_lengths=True, **sampling)
        n = int(out["sequence_lengths"][0, 0])
        gen = out["output_ids"][0, 0, len(ids):n].tolist()
        return gen, tokenizer.decode(gen)

    return generate


def client(server, protocol: str) -> LLMClient:
    return LLMClient(server.grpc_url if protocol == "grpc" else server.http_url, protocol)


def stream_text(llm: LLMClient, prompt: str, max_tokens: int, **params) -> tuple[list[str], list]:
    deltas = list(llm.stream(prompt, max_tokens, exclude_input_in_output=True, **params))
    return [d.text for d in deltas], deltas


# --- results equal the offline API ------------------------------------------------------------

@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_greedy_results_equal_offline_generate(triton_server, offline, protocol):
    with client(triton_server, protocol) as llm:
        for prompt in PROMPTS[:3]:
            _, expected = offline(prompt, 24)
            result = llm.generate(prompt, 24, exclude_input_in_output=True)
            assert result.text == expected
            streamed, _ = stream_text(llm, prompt, 24)
            assert "".join(streamed) == expected


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_seeded_sampling_equals_offline_generate(triton_server, offline, protocol):
    seed = SEEDED["seed"]
    sampling = {k: v for k, v in SEEDED.items() if k != "seed"}
    _, expected = offline(PROMPTS[0], 24, seed=seed, **sampling)
    _, other_seed = offline(PROMPTS[0], 24, seed=seed + 1, **sampling)
    assert expected != other_seed, "the seed should matter for this test to mean something"
    with client(triton_server, protocol) as llm:
        assert llm.generate(PROMPTS[0], 24, exclude_input_in_output=True, **SEEDED).text == expected
        streamed, _ = stream_text(llm, PROMPTS[0], 24, **SEEDED)
        assert "".join(streamed) == expected


def test_stream_deltas_are_new_text_only_and_multibyte_safe(triton_server, offline, tokenizer):
    """The demo tokenizer splits CJK/emoji across byte-level tokens: no delta may carry half a
    character (U+FFFD) unless the full text has one at that place."""
    prompt = PROMPTS[1]
    gen_ids, expected = offline(prompt, 48)
    with client(triton_server, "grpc") as llm:
        streamed, deltas = stream_text(llm, prompt, 48, return_num_output_tokens=True)
    assert "".join(streamed) == expected
    assert len([d for d in streamed if d]) > 1, "a stream of one delta proves nothing"
    if "\ufffd" not in expected:
        assert not any("\ufffd" in d for d in streamed)
    assert deltas[-1].num_output_tokens == len(gen_ids)
    assert deltas[-1].finish_reason in ("length", "stop")


def test_exactly_one_final_response_per_stream(triton_server):
    for stream in (False, True):
        res = grpc_stream(triton_server.grpc_url, "ensemble", [
            tensor("text_input", PROMPTS[0]), tensor("max_tokens", 12), tensor("stream", stream)])
        assert res.error is None
        assert res.num_final == 1
        if not stream:
            assert len(res.responses) == 1


def test_input_is_included_in_output_unless_excluded(triton_server, offline, tokenizer):
    gen_ids, _ = offline(PROMPTS[0], 10)
    full = tokenizer.decode(tokenizer.encode(PROMPTS[0]) + gen_ids)
    with client(triton_server, "grpc") as llm:
        assert llm.generate(PROMPTS[0], 10, exclude_input_in_output=False).text == full
        assert "".join(d.text for d in llm.stream(PROMPTS[0], 10, exclude_input_in_output=False)) == full


def test_output_shapes_are_what_tensorrtllm_clients_read(triton_server):
    res = grpc_stream(triton_server.grpc_url, "ensemble", [
        tensor("text_input", PROMPTS[0]), tensor("max_tokens", 8), tensor("return_log_probs", True),
        tensor("return_num_input_tokens", True), tensor("return_num_output_tokens", True)])
    out = res.responses[0]
    assert out["text_output"].shape == (1,) and isinstance(out["text_output"][0].decode(), str)
    assert out["batch_index"].shape == (1, 1) and out["sequence_index"].shape == (1, 1)
    assert out["num_input_tokens"].shape == (1, 1) and out["num_output_tokens"][0][0] == 8
    assert out["cum_log_probs"].shape == (1, 1)
    assert out["output_log_probs"].shape == (1, 1, 8)
    assert np.isclose(out["output_log_probs"].sum(), out["cum_log_probs"][0, 0], atol=1e-3)
    assert (out["output_log_probs"] <= 0).all()


def test_several_sequences_stream_separately_and_match_the_unstreamed_result(triton_server):
    fields = [tensor("text_input", PROMPTS[0]), tensor("max_tokens", 12), tensor("num_return_sequences", 2),
              tensor("temperature", 1.0), tensor("top_k", 50), tensor("seed", 11),
              tensor("exclude_input_in_output", True)]
    whole = grpc_stream(triton_server.grpc_url, "ensemble", fields)
    assert whole.error is None and len(whole.responses) == 1
    expected = [t.decode() for t in whole.responses[0]["text_output"]]
    assert len(expected) == 2 and expected[0] != expected[1]
    streamed = grpc_stream(triton_server.grpc_url, "ensemble", [*fields, tensor("stream", True)])
    assert streamed.error is None and streamed.num_final == 1
    by_index = {0: "", 1: ""}
    for r in streamed.responses:
        by_index[int(r["sequence_index"][0, 0])] += r["text_output"][0].decode()
    assert [by_index[0], by_index[1]] == expected


def test_beam_search_returns_the_offline_best_beam(triton_server, offline):
    _, expected = offline(PROMPTS[2], 12, num_beams=2)
    with client(triton_server, "grpc") as llm:
        assert llm.generate(PROMPTS[2], 12, beam_width=2, exclude_input_in_output=True).text == expected


# --- every input, aliases, stop words ---------------------------------------------------------

def test_every_optional_input_is_accepted(triton_server):
    inputs = [
        tensor("text_input", PROMPTS[0]), tensor("max_tokens", 8), tensor("stream", True),
        tensor("exclude_input_in_output", True), tensor("end_id", 2), tensor("pad_id", 3),
        tensor("temperature", 0.7), tensor("top_k", 10), tensor("top_p", 0.95), tensor("min_p", 0.0),
        tensor("length_penalty", 1.0), tensor("repetition_penalty", 1.1), tensor("presence_penalty", 0.1),
        tensor("frequency_penalty", 0.1), tensor("beam_width", 1), tensor("num_return_sequences", 1),
        tensor("min_tokens", 2), tensor("seed", 5), tensor("stop_words", ["zzzz"]),
        tensor("bad_words", ["qqqq"]), tensor("ignore_eos", False), tensor("return_log_probs", True),
        tensor("return_context_logits", False), tensor("return_generation_logits", False),
        tensor("return_num_input_tokens", True), tensor("return_num_output_tokens", True)]
    res = grpc_stream(triton_server.grpc_url, "ensemble", inputs)
    assert res.error is None and res.num_final == 1
    assert res.responses[-1]["num_output_tokens"][0][0] == 8


def ensemble_text(server, **fields) -> str:
    res = grpc_stream(server.grpc_url, "ensemble", [tensor(k, v) for k, v in fields.items()])
    assert res.error is None, res.error
    return "".join(texts(res))


def test_random_seed_is_an_alias_of_seed(triton_server):
    base = {"text_input": PROMPTS[2], "max_tokens": 12, "temperature": 1.0, "top_k": 50}
    by_alias = ensemble_text(triton_server, **base, random_seed=99)
    assert by_alias == ensemble_text(triton_server, **base, seed=99)
    assert by_alias != ensemble_text(triton_server, **base, seed=100)


@pytest.mark.parametrize("field", ["min_tokens", "min_length"])
def test_min_tokens_and_its_alias_keep_generating_past_end_id(triton_server, offline, field):
    # With end_id = the second greedy token, generation stops after two tokens unless held open
    # (the first cannot be end_id: min_tokens defaults to 1, as in TensorRT-LLM).
    gen_ids, _ = offline(PROMPTS[0], 2)
    assert gen_ids[0] != gen_ids[1]
    base = {"text_input": PROMPTS[0], "max_tokens": 10, "end_id": gen_ids[1], "return_num_output_tokens": True}
    short = grpc_stream(triton_server.grpc_url, "ensemble", [tensor(k, v) for k, v in base.items()])
    held = grpc_stream(triton_server.grpc_url, "ensemble",
                       [tensor(k, v) for k, v in {**base, field: 5}.items()])
    assert short.responses[-1]["num_output_tokens"][0][0] == 2
    assert short.responses[-1]["finish_reason"][0] == b"stop"
    assert held.responses[-1]["num_output_tokens"][0][0] >= 5


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_stop_word_ends_generation_and_is_not_returned(triton_server, offline, tokenizer, protocol):
    """Stop words match token sequences (as in TensorRT-LLM): pick two generated tokens whose
    text encodes back to exactly them and that do not occur earlier."""
    gen_ids, _ = offline(PROMPTS[0], 24)
    for k in range(3, 20):
        stop_ids = gen_ids[k:k + 2]
        word = tokenizer.decode(stop_ids)
        earlier = any(gen_ids[j:j + 2] == stop_ids for j in range(k))
        if not earlier and "\ufffd" not in word and tokenizer.encode(word, add_special_tokens=False) == stop_ids:
            break
    else:
        pytest.skip("no clean two-token stop word in the greedy output")
    expected = tokenizer.decode(gen_ids[:k])
    with client(triton_server, protocol) as llm:
        result = llm.generate(PROMPTS[0], 24, exclude_input_in_output=True, stop_words=[word])
        streamed = "".join(d.text for d in llm.stream(PROMPTS[0], 24, exclude_input_in_output=True,
                                                       stop_words=[word]))
    assert result.finish_reason == "stop"
    assert result.text == expected
    assert streamed == expected


# --- bad inputs -------------------------------------------------------------------------------

BAD_INPUTS = {
    "missing text_input": ([("max_tokens", 8)], "text_input"),
    "max_tokens = 0": ([("text_input", "hi"), ("max_tokens", 0)], "max_tokens"),
    "max_tokens < 0": ([("text_input", "hi"), ("max_tokens", -3)], "max_tokens"),
    "missing max_tokens": ([("text_input", "hi")], "max_tokens"),
    "top_p > 1": ([("text_input", "hi"), ("max_tokens", 4), ("top_p", 1.5)], "top_p"),
    "temperature < 0": ([("text_input", "hi"), ("max_tokens", 4), ("temperature", -1.0)], "temperature"),
    "wrong dtype": ([("text_input", "hi"), ("max_tokens", np.array([[4.0]], np.float32))], "max_tokens"),
    "prompt too long": ([("text_input", "fox " * 700), ("max_tokens", 4)], "text_input"),
    "unknown stop-word type": ([("text_input", "hi"), ("max_tokens", 4),
                                ("stop_words", np.array([[1, 2]], np.int32))], "stop_words"),
    "prompt_vocab_size without a table": ([("text_input", "hi"), ("max_tokens", 4),
                                           ("prompt_vocab_size", np.array([[4]], np.int32))], "prompt_vocab_size"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_names_the_field_over_grpc_and_server_keeps_serving(triton_server, case):
    fields, field_name = BAD_INPUTS[case]
    inputs = [tensor(n, v) if not isinstance(v, np.ndarray) else tensor(n, v, v.dtype.type) for n, v in fields]
    res = grpc_stream(triton_server.grpc_url, "ensemble", inputs)
    assert res.error is not None and field_name in res.error, res.error
    assert res.responses == []
    ok = grpc_stream(triton_server.grpc_url, "ensemble", [tensor("text_input", "hi"), tensor("max_tokens", 3)])
    assert ok.error is None and ok.num_final == 1


@pytest.mark.parametrize("case", ["missing text_input", "max_tokens = 0", "top_p > 1", "prompt too long"])
@pytest.mark.parametrize("stream", [False, True])
def test_bad_input_names_the_field_over_http(triton_server, case, stream):
    fields, field_name = BAD_INPUTS[case]
    params = dict(fields)
    prompt, max_tokens = params.pop("text_input", None), params.pop("max_tokens", None)
    with LLMClient(triton_server.http_url, "http") as llm:
        with pytest.raises(LLMClientError, match=field_name) as info:
            if stream:
                list(llm.stream(prompt, max_tokens, **params))
            else:
                llm.generate(prompt, max_tokens, **params)
        assert info.value.status == 400  # INVALID_ARG, not an internal error
        assert llm.generate("hi", 3).finish_reason is not None


# --- cancellation -----------------------------------------------------------------------------

def _engine_idle(server) -> None:
    server.wait_metric("llm_requests_running", lambda v: v == 0)
    server.wait_metric("llm_kv_blocks_used", lambda v: v == 0)


def test_cancelled_ensemble_stream_stops_generating_and_frees_blocks(triton_server):
    _engine_idle(triton_server)
    before = triton_server.metrics()["llm_generated_tokens_total"]
    res = grpc_stream(triton_server.grpc_url, "ensemble", [
        tensor("text_input", PROMPTS[0]), tensor("max_tokens", 480), tensor("stream", True),
        tensor("ignore_eos", True)], cancel_after=3)
    assert len(res.responses) == 3 and res.num_final == 0
    _engine_idle(triton_server)
    time.sleep(0.3)
    generated = triton_server.metrics()["llm_generated_tokens_total"] - before
    assert generated < 480, "the engine generated the whole request after the client left"


def test_cancelled_generation_stream_stops(triton_server, tokenizer):
    _engine_idle(triton_server)
    before = triton_server.metrics()["llm_generated_tokens_total"]
    ids = np.array([tokenizer.encode(PROMPTS[0])], dtype=np.int32)
    res = grpc_stream(triton_server.grpc_url, "generation", [
        tensor("input_ids", ids, np.int32), tensor("request_output_len", 480, np.int32),
        tensor("streaming", True), tensor("ignore_eos", True)], cancel_after=3)
    assert len(res.responses) == 3
    _engine_idle(triton_server)
    time.sleep(0.3)
    assert triton_server.metrics()["llm_generated_tokens_total"] - before < 480


def test_stop_input_aborts_the_running_request_with_that_id(triton_server, tokenizer):
    _engine_idle(triton_server)
    request_id = f"stop-me-{uuid.uuid4().hex[:8]}"
    ids = np.array([tokenizer.encode(PROMPTS[0])], dtype=np.int32)
    holder = {}

    def run():
        holder["res"] = grpc_stream(triton_server.grpc_url, "generation", [
            tensor("input_ids", ids, np.int32), tensor("request_output_len", 480, np.int32),
            tensor("streaming", True), tensor("ignore_eos", True)], request_id=request_id)

    t = threading.Thread(target=run)
    t.start()
    triton_server.wait_metric("llm_requests_running", lambda v: v >= 1)
    stop = grpc_stream(triton_server.grpc_url, "generation", [tensor("stop", True)], request_id=request_id)
    assert stop.error is None and stop.num_final == 1
    t.join(timeout=30)
    res = holder["res"]
    assert res.error is None and res.num_final == 1
    assert res.responses[-1]["finish_reason"].reshape(-1)[0] == b"abort"
    generated = sum(int(r["sequence_length"][0][0]) for r in res.responses)
    assert generated < 480
    _engine_idle(triton_server)


def test_engine_metrics_are_exported(triton_server):
    before = triton_server.metrics()
    with client(triton_server, "grpc") as llm:
        list(llm.stream(PROMPTS[0], 6))
    triton_server.wait_metric("llm_generated_tokens_total",
                              lambda v: v >= before.get("llm_generated_tokens_total", 0) + 6)
    after = triton_server.metrics()
    assert after["llm_requests_total"] >= before.get("llm_requests_total", 0) + 1
    assert after["llm_time_to_first_token_seconds_count"] > before.get("llm_time_to_first_token_seconds_count", 0)
    assert after["llm_inter_token_latency_seconds_count"] > 0
    assert after["llm_kv_blocks_used"] + after["llm_kv_blocks_free"] == 256  # LLM_NUM_KV_BLOCKS
    assert 0.0 <= after["llm_prefix_cache_hit_rate"] <= 1.0


# --- concurrency and the inner models ---------------------------------------------------------

def test_concurrent_clients_all_get_their_own_correct_answer(triton_server, offline):
    jobs = [(p, proto, stream) for p in PROMPTS for proto, stream in (("grpc", True), ("http", False))]
    expected = {p: offline(p, 20)[1] for p in PROMPTS}
    results: dict[int, str] = {}

    def run(i, prompt, protocol, stream):
        with client(triton_server, protocol) as llm:
            if stream:
                results[i] = "".join(d.text for d in llm.stream(prompt, 20, exclude_input_in_output=True))
            else:
                results[i] = llm.generate(prompt, 20, exclude_input_in_output=True).text

    threads = [threading.Thread(target=run, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert {i: results.get(i) for i in range(len(jobs))} == {i: expected[j[0]] for i, j in enumerate(jobs)}


def test_generation_model_speaks_tensorrtllm_names(triton_server, offline, tokenizer):
    gen_ids, _ = offline(PROMPTS[2], 10)
    prompt_ids = tokenizer.encode(PROMPTS[2])
    res = grpc_stream(triton_server.grpc_url, "generation", [
        tensor("input_ids", np.array([prompt_ids], np.int32), np.int32),
        tensor("input_lengths", len(prompt_ids), np.int32), tensor("request_output_len", 10, np.int32)])
    assert res.error is None and res.num_final == 1
    out = res.responses[0]
    n = int(out["sequence_length"][0, 0])
    assert out["output_ids"].shape[:2] == (1, 1)
    assert out["output_ids"][0, 0, :n].tolist() == prompt_ids + gen_ids


@pytest.mark.parametrize("streaming", [False, True])
def test_generation_returns_context_and_generation_logits(triton_server, tokenizer, streaming):
    """`return_context_logits` / `return_generation_logits`: `context_logits` [1, prompt, V] and
    `generation_logits` [1, sequences, tokens, V] (per streamed response: its tokens), equal to
    transformers' forward over the prompt and the generated tokens."""
    from transformers import AutoModelForCausalLM

    prompt = tokenizer.encode(PROMPTS[2])
    inputs = [tensor("input_ids", np.array([prompt], np.int32), np.int32),
              tensor("input_lengths", len(prompt), np.int32), tensor("request_output_len", 6, np.int32),
              tensor("end_id", -1, np.int32),
              tensor("exclude_input_in_output", True, np.bool_), tensor("streaming", streaming, np.bool_),
              tensor("return_context_logits", True, np.bool_), tensor("return_generation_logits", True, np.bool_)]
    res = grpc_stream(triton_server.grpc_url, "generation", inputs)
    assert res.error is None and res.num_final == 1
    tokens = [t for r in res.responses for t in r["output_ids"][0, 0, :int(r["sequence_length"][0, 0])].tolist()]
    ctx = [r["context_logits"] for r in res.responses if "context_logits" in r]
    gen = np.concatenate([r["generation_logits"][0, 0] for r in res.responses if r["generation_logits"].size])
    hf = AutoModelForCausalLM.from_pretrained(str(triton_server.model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + tokens])).logits[0].numpy()
    assert len(ctx) == 1 and ctx[0].shape == (1, len(prompt), ref.shape[1])
    np.testing.assert_allclose(ctx[0][0], ref[:len(prompt)], atol=1e-4)
    assert len(tokens) == 6 and gen.shape == (6, ref.shape[1])
    np.testing.assert_allclose(gen, ref[len(prompt) - 1:-1], atol=1e-4)
    # The ensemble passes both through (text in): the same arrays for the same prompt.
    ens = grpc_stream(triton_server.grpc_url, "ensemble", [
        tensor("text_input", PROMPTS[2]), tensor("max_tokens", 6), tensor("end_id", -1), tensor("stream", streaming),
        tensor("return_context_logits", True), tensor("return_generation_logits", True)])
    assert ens.error is None and ens.num_final == 1
    ens_ctx = [r["context_logits"] for r in ens.responses if "context_logits" in r]
    ens_gen = np.concatenate([r["generation_logits"][0, 0] for r in ens.responses
                              if r.get("generation_logits") is not None and r["generation_logits"].size])
    assert len(ens_ctx) == 1
    np.testing.assert_allclose(ens_ctx[0], ctx[0], atol=1e-5)
    np.testing.assert_allclose(ens_gen, gen, atol=1e-5)


def test_generation_takes_an_embedding_bias(triton_server, tokenizer):
    """`embedding_bias` [batch, vocab] FP32 (tensorrtllm_backend's input): a bias that favours one
    token makes greedy decoding pick it; all zeros (what its preprocessing sends without bias
    words) is no bias; a wrong size is refused naming the input."""
    runner = ModelRunner.from_dir(triton_server.model_dir, device="cpu")
    prompt = tokenizer.encode(PROMPTS[0])
    base = [tensor("input_ids", np.array([prompt], np.int32), np.int32), tensor("input_lengths", len(prompt), np.int32),
            tensor("request_output_len", 4, np.int32), tensor("end_id", -1, np.int32),
            tensor("exclude_input_in_output", True, np.bool_)]

    def tokens(bias):
        res = grpc_stream(triton_server.grpc_url, "generation", base + [tensor("embedding_bias", bias, np.float32)])
        assert res.error is None, res.error
        return res.responses[0]["output_ids"][0, 0, :4].tolist()

    favour = np.zeros((1, runner.vocab_size), np.float32)
    favour[0, 42] = 1000.0
    assert tokens(favour) == [42] * 4
    plain = runner.generate([torch.tensor(prompt)], max_new_tokens=4, end_id=-1, pad_id=0)
    assert tokens(np.zeros((1, runner.vocab_size), np.float32)) == plain[0, 0, len(prompt):len(prompt) + 4].tolist()
    wrong = tensor("embedding_bias", np.ones((1, 7), np.float32), np.float32)
    res = grpc_stream(triton_server.grpc_url, "generation", base + [wrong])
    assert res.error is not None and "embedding_bias must have shape" in res.error


def test_lora_task_id_serves_the_adapter_of_that_directory(triton_server, tokenizer):
    """`lora_task_id` (tensorrtllm_backend's input) picks an adapter of generation's lora_dir:
    the tokens equal ModelRunner with that adapter, through generation (ids) and the ensemble
    (text, client library); an unknown id and lora_weights are refused naming the input."""
    lora = triton_server.lora_dir
    runner = ModelRunner.from_dir(triton_server.model_dir, lora_dir=[str(lora / "1"), str(lora / "2")], device="cpu")
    prompt = tokenizer.encode(PROMPTS[0])

    def offline(uid: str) -> list[int]:
        out = runner.generate([torch.tensor(prompt)], max_new_tokens=8, end_id=-1, pad_id=0, lora_uids=[uid])
        return out[0, 0, len(prompt):len(prompt) + 8].tolist()

    base = [tensor("input_ids", np.array([prompt], np.int32), np.int32), tensor("input_lengths", len(prompt), np.int32),
            tensor("request_output_len", 8, np.int32), tensor("end_id", -1, np.int32),
            tensor("exclude_input_in_output", True, np.bool_)]
    refs = {}
    for task_id, uid in ((1, "0"), (2, "1")):
        res = grpc_stream(triton_server.grpc_url, "generation", base + [tensor("lora_task_id", task_id)])
        assert res.error is None and res.num_final == 1
        out = res.responses[0]
        refs[task_id] = offline(uid)
        assert out["output_ids"][0, 0, :int(out["sequence_length"][0, 0])].tolist() == refs[task_id]
    assert refs[1] != offline("-1")
    with client(triton_server, "grpc") as llm:
        result = llm.generate(PROMPTS[0], 8, exclude_input_in_output=True, ignore_eos=True, lora_task_id=1)
        assert result.text == tokenizer.decode(refs[1])
        with pytest.raises(LLMClientError, match=r"lora_task_id 7 is not a loaded LoRA adapter; loaded: \['1', '2'\]"):
            llm.generate(PROMPTS[0], 8, lora_task_id=7)
    # tensorrtllm_backend's upload: the adapter's tensors with the first request of a new task id, then
    # the id alone; what ModelRunner gives with adapter "2" (fp16 weights over the wire).
    from runtime_lib.lora import peft_to_trtllm
    w, c = peft_to_trtllm(lora / "2", dtype=torch.float16)
    upload = [tensor("lora_weights", w.numpy()[None], np.float16), tensor("lora_config", c.numpy()[None], np.int32)]
    for extra in (upload, []):
        res = grpc_stream(triton_server.grpc_url, "generation", base + [tensor("lora_task_id", 77)] + extra)
        assert res.error is None, res.error
        assert res.responses[0]["output_ids"][0, 0, :8].tolist() == refs[2]
    bad = [tensor("lora_weights", w.numpy()[None, :, :5], np.float16), tensor("lora_config", c.numpy()[None], np.int32)]
    res = grpc_stream(triton_server.grpc_url, "generation", base + [tensor("lora_task_id", 78)] + bad)
    assert res.error is not None and "lora_weights rows hold 5" in str(res.error)


def test_generation_takes_a_prompt_embedding_table_like_tensorrtllm_backend(triton_server, tokenizer):
    """Prompt tuning over the wire: `prompt_embedding_table` [1, rows, hidden] FP16 and
    `prompt_vocab_size`; prompt ids vocab_size + i read row i. Equals ModelRunner with the table
    (fp16 values), and a bad table gets an error naming the input."""
    runner = ModelRunner.from_dir(triton_server.model_dir, device="cpu")
    V, H = runner.vocab_size, runner.hidden_size
    table = np.random.default_rng(0).standard_normal((1, 4, H)).astype(np.float16)
    prompt = [V + 2, V, V + 3] + tokenizer.encode(PROMPTS[0])
    ref = runner.generate([torch.tensor(prompt)], max_new_tokens=8, end_id=-1, pad_id=0,
                          prompt_table=torch.from_numpy(table.astype(np.float32)))[0, 0, len(prompt):len(prompt) + 8]
    ref = ref.tolist()
    base = [tensor("input_ids", np.array([prompt], np.int32), np.int32), tensor("input_lengths", len(prompt), np.int32),
            tensor("request_output_len", 8, np.int32), tensor("end_id", -1, np.int32),
            tensor("exclude_input_in_output", True, np.bool_)]

    def send(*extra):
        return grpc_stream(triton_server.grpc_url, "generation", base + list(extra))

    res = send(tensor("prompt_embedding_table", table, np.float16))
    assert res.error is None and res.num_final == 1
    out = res.responses[0]
    assert out["output_ids"][0, 0, :int(out["sequence_length"][0, 0])].tolist() == ref
    # prompt_vocab_size 3 leaves row 3 out: the prompt's id V + 3 is then outside the table.
    res = send(tensor("prompt_embedding_table", table, np.float16), tensor("prompt_vocab_size", 3, np.int32))
    assert res.error is not None and "prompt_embedding_table" in str(res.error)
    res = send(tensor("prompt_embedding_table", np.zeros((1, 4, H + 1), np.float16), np.float16))
    assert res.error is not None and "prompt_embedding_table" in str(res.error)
    # Through the ensemble (text in): the table's rows become a virtual-token prefix, V + 0..3.
    text = PROMPTS[0]
    ids = [V, V + 1, V + 2, V + 3] + tokenizer.encode(text)
    soft = runner.generate([torch.tensor(ids)], max_new_tokens=8, end_id=tokenizer.end_id, pad_id=0,
                           prompt_table=torch.from_numpy(table.astype(np.float32)), return_dict=True,
                           output_sequence_lengths=True)
    gen = soft["output_ids"][0, 0, len(ids):int(soft["sequence_lengths"][0, 0])].tolist()
    ens = grpc_stream(triton_server.grpc_url, "ensemble", [
        tensor("text_input", text), tensor("max_tokens", 8), tensor("exclude_input_in_output", True),
        tensor("return_num_input_tokens", True), tensor("prompt_embedding_table", table, np.float16)])
    assert ens.error is None and ens.num_final == 1
    assert ens.responses[0]["text_output"][0].decode() == tokenizer.decode(gen)
    assert int(ens.responses[0]["num_input_tokens"][0, 0]) == len(ids)


def test_preprocessing_and_postprocessing_roundtrip(triton_server, tokenizer):
    import tritonclient.http as httpclient
    from tritonclient.utils import np_to_triton_dtype

    def inp(name, arr):
        t = httpclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        t.set_data_from_numpy(arr)
        return t

    c = httpclient.InferenceServerClient(triton_server.http_url)
    pre = c.infer("preprocessing", [
        inp("QUERY", np.array([[PROMPTS[1].encode()]], dtype=np.object_)),
        inp("REQUEST_OUTPUT_LEN", np.array([[5]], np.int32)),
        inp("STOP_WORDS_DICT", np.array([[b"fox", b"dog"]], dtype=np.object_))])
    ids = pre.as_numpy("INPUT_ID")
    assert ids[0].tolist() == tokenizer.encode(PROMPTS[1])
    assert pre.as_numpy("REQUEST_INPUT_LEN")[0, 0] == ids.shape[1]
    assert pre.as_numpy("STOP_WORDS_IDS").shape[:2] == (1, 2)
    assert pre.as_numpy("OUT_END_ID")[0, 0] == tokenizer.end_id
    post = c.infer("postprocessing", [
        inp("TOKENS_BATCH", ids[:, None, :].astype(np.int32)),
        inp("SEQUENCE_LENGTH", np.array([[ids.shape[1]]], np.int32))])
    assert post.as_numpy("OUTPUT")[0].decode() == PROMPTS[1]
    with pytest.raises(Exception, match="REQUEST_OUTPUT_LEN"):
        c.infer("preprocessing", [inp("QUERY", np.array([[b"hi"]], dtype=np.object_))])
    c.close()


def test_mixed_settings_under_load_equal_each_request_alone(triton_server):
    """Issue 5: N concurrent streams with mixed greedy / seeded-sampling settings (and LoRA
    adapters, or none) get, per request, exactly the text that request gets when sent alone."""
    rng = np.random.default_rng(5)
    jobs = []
    for i in range(16):
        prompt = PROMPTS[i % len(PROMPTS)] + " " * (i % 3)
        params = {} if i % 3 == 0 else {
            "temperature": float(rng.choice([0.7, 1.0, 1.3])), "top_k": int(rng.choice([0, 5, 40])),
            "top_p": float(rng.choice([0.8, 0.95, 1.0])), "seed": 100 + i}
        if i % 5 == 4:
            params["repetition_penalty"] = 1.3
        if i % 4:
            params["lora_task_id"] = 1 + i % 2    # the server's lora_dir adapters "1" and "2"
        jobs.append((prompt, 12 + i % 7, params))

    def run(job) -> str:
        prompt, max_tokens, params = job
        with client(triton_server, "grpc") as llm:
            return "".join(d.text for d in llm.stream(prompt, max_tokens, exclude_input_in_output=True,
                                                      **params))

    together: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i, j=j: together.__setitem__(i, run(j)))
               for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    alone = {i: run(j) for i, j in enumerate(jobs)}
    assert together == alone
    assert len(set(alone.values())) > 4, "settings should actually differ between requests"


def test_cancel_storm_through_the_server(triton_server, offline):
    """Issue 5: 200 in-flight streams through `ensemble`, half cancelled after a random number
    of responses: the others finish with the right text, and the engine ends with no running
    request and no KV block in use."""
    _engine_idle(triton_server)
    rng = np.random.default_rng(11)
    prompt, max_tokens = PROMPTS[3], 12
    _, expected = offline(prompt, max_tokens)
    cancel_after = {i: int(rng.integers(1, 4)) for i in rng.choice(200, size=100, replace=False)}
    results: dict[int, object] = {}

    def run(i: int) -> None:
        results[i] = grpc_stream(triton_server.grpc_url, "ensemble", [
            tensor("text_input", prompt), tensor("max_tokens", max_tokens), tensor("stream", True),
            tensor("exclude_input_in_output", True)], timeout_s=180, cancel_after=cancel_after.get(i),
            settle_s=0.05)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert len(results) == 200
    for i, res in results.items():
        if i in cancel_after:
            continue
        assert res.error is None and res.num_final == 1, (i, res.error)
        assert "".join(texts(res)) == expected
    _engine_idle(triton_server)
    assert triton_server.metrics()["llm_requests_waiting"] == 0
