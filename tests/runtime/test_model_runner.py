"""ModelRunner as a TensorRT-LLM user meets it: constructed from an HF checkpoint, a built
engine directory or a serialized engine (all give the same tokens), honouring the engine's
build limits, returning every KV block after any run, and rejecting bad inputs with a
ValueError that names the field."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from runtime_lib.build import build_engine
from runtime_lib.logits_processor import LogitsProcessor
from runtime_lib.model_runner import ModelRunner
from runtime_lib.session import Session
from runtime_lib.stopping import StoppingCriteria

PAD_ID = 3
EOS_ID = 2
PROMPTS = ([1, 50, 60, 70], [1, 80, 90, 100, 110, 120, 130, 140, 150, 160, 170], [1, 240, 250])
MAX_NEW = 8
# Build limits of the test engine, small so that every limit is reachable.
MAX_BATCH, MAX_INPUT, MAX_SEQ, BLOCK = 4, 24, 40, 8


@pytest.fixture(scope="module")
def hf_runner(llama_dir) -> ModelRunner:
    return ModelRunner.from_dir(llama_dir, device="cpu")


@pytest.fixture(scope="module")
def engine_dir(llama_dir, tmp_path_factory) -> Path:
    return build_engine(llama_dir, tmp_path_factory.mktemp("engine") / "llama", max_batch_size=MAX_BATCH,
                        max_input_len=MAX_INPUT, max_seq_len=MAX_SEQ, tokens_per_block=BLOCK)


@pytest.fixture(scope="module")
def engine_runner(engine_dir) -> ModelRunner:
    return ModelRunner.from_engine(str(engine_dir), device="cpu")


def tensors(prompts) -> list[torch.Tensor]:
    return [torch.tensor(p) for p in prompts]


def run(runner: ModelRunner, prompts=PROMPTS, **kwargs) -> dict:
    kwargs.setdefault("max_new_tokens", MAX_NEW)
    kwargs.setdefault("end_id", EOS_ID)
    return runner.generate(tensors(prompts), pad_id=PAD_ID, return_dict=True, **kwargs)


def assert_all_blocks_free(runner: ModelRunner) -> None:
    kv = runner.session.kv_cache_manager
    assert kv is not None, "no decode ran"
    assert kv.num_free_blocks == kv.blocks_manager.num_blocks, \
        f"{kv.blocks_manager.num_blocks - kv.num_free_blocks} KV blocks leaked"
    assert kv.sequences == []


# ------------------------------------------------------------------------------------------ engines
SETTINGS = [
    {},
    {"num_beams": 3, "num_return_sequences": 2, "length_penalty": 1.3},
    {"top_k": 0, "top_p": 0.9, "temperature": 1.3, "random_seed": [3, 4, 5], "num_return_sequences": 2},
]


@pytest.mark.parametrize("kwargs", SETTINGS)
def test_from_engine_gives_the_same_tokens_as_from_dir(hf_runner, engine_runner, kwargs):
    want = run(hf_runner, output_log_probs=True, **kwargs)
    got = run(engine_runner, output_log_probs=True, **kwargs)
    assert torch.equal(got["output_ids"], want["output_ids"])
    assert torch.equal(got["sequence_lengths"], want["sequence_lengths"])
    torch.testing.assert_close(got["log_probs"], want["log_probs"], atol=1e-5, rtol=1e-5)


def test_from_dir_on_an_engine_directory_equals_from_engine(engine_dir, engine_runner):
    runner = ModelRunner.from_dir(engine_dir, device="cpu")
    assert runner.max_batch_size == MAX_BATCH and runner.max_input_len == MAX_INPUT
    assert torch.equal(run(runner)["output_ids"], run(engine_runner)["output_ids"])


def test_serialized_engine_round_trip_gives_the_same_tokens(engine_dir, engine_runner):
    blob = Session.from_engine(engine_dir).serialize()
    assert isinstance(blob, bytes)
    session = Session.from_serialized_engine(blob)
    runner = ModelRunner.from_engine(session)
    assert runner.max_seq_len == MAX_SEQ and runner.session.tokens_per_block == BLOCK
    for kwargs in SETTINGS[:2]:
        assert torch.equal(run(runner, **kwargs)["output_ids"], run(engine_runner, **kwargs)["output_ids"])
    # a serialized engine's bytes are a fixed point of deserialise + serialise
    assert session.serialize() == blob


def test_runner_properties_describe_the_engine(engine_runner, llama_dir):
    hf = json.loads((llama_dir / "config.json").read_text())
    r = engine_runner
    assert r.vocab_size == r.vocab_size_padded == hf["vocab_size"]
    assert r.hidden_size == hf["hidden_size"]
    assert r.num_heads == hf["num_attention_heads"]
    assert r.num_layers == hf["num_hidden_layers"]
    assert r.max_sequence_length == MAX_SEQ
    assert r.remove_input_padding is True
    assert r.dtype == torch.float32
    assert r.gather_context_logits is False and r.gather_generation_logits is False


def test_bf16_engine_runs_and_mostly_agrees(llama_dir, tmp_path, hf_runner):
    engine = build_engine(llama_dir, tmp_path / "bf16", dtype="bf16", max_batch_size=MAX_BATCH,
                          max_input_len=MAX_INPUT, max_seq_len=MAX_SEQ)
    runner = ModelRunner.from_dir(engine, device="cpu")
    assert runner.dtype == torch.bfloat16
    got = run(runner, end_id=-1, max_new_tokens=3)["output_ids"]
    want = run(hf_runner, end_id=-1, max_new_tokens=3)["output_ids"]
    assert got.shape == want.shape
    first = [int(got[b, 0, len(p)] == want[b, 0, len(p)]) for b, p in enumerate(PROMPTS)]
    assert sum(first) >= 2, "bf16 changed the first greedy token of most prompts"


# ------------------------------------------------------------------------------------------ build limits
def test_engine_build_limits_are_enforced(engine_runner):
    with pytest.raises(ValueError, match="max_batch_size"):
        run(engine_runner, prompts=[[1, 5]] * (MAX_BATCH + 1))
    with pytest.raises(ValueError, match="max_input_len"):
        run(engine_runner, prompts=[[1] + [7] * MAX_INPUT])
    with pytest.raises(ValueError, match="max_seq_len"):
        run(engine_runner, prompts=[[1] + [7] * (MAX_INPUT - 1)], max_new_tokens=MAX_SEQ - MAX_INPUT + 1)
    with pytest.raises(ValueError, match="max_beam_width"):
        run(engine_runner, num_beams=engine_runner.max_beam_width + 1)
    # exactly at the limits is fine
    out = run(engine_runner, prompts=[[1] + [7] * (MAX_INPUT - 1)] * MAX_BATCH, end_id=-1,
              max_new_tokens=MAX_SEQ - MAX_INPUT)
    assert out["output_ids"].shape == (MAX_BATCH, 1, MAX_SEQ)
    assert (out["sequence_lengths"] == MAX_SEQ).all()


# ------------------------------------------------------------------------------------------ KV blocks
class RaiseAt(LogitsProcessor):
    def __init__(self, step: int) -> None:
        self.step = step

    def __call__(self, step, input_ids, scores):
        if step == self.step:
            raise RuntimeError(f"processor failed at step {step}")
        return scores


class StopAt(StoppingCriteria):
    def __init__(self, step: int) -> None:
        self.step = step

    def __call__(self, step, input_ids, scores):
        return step >= self.step


@pytest.mark.parametrize("kwargs", [
    {},
    {"end_id": -1},
    {"stop_words_list": [[[60, 70]]], "min_length": 2},
    {"stopping_criteria": StopAt(2)},
    {"num_beams": 4, "num_return_sequences": 2},
    {"num_beams": 2, "stopping_criteria": StopAt(1)},
    {"num_return_sequences": 3, "top_k": 5, "random_seed": 1},
], ids=["finished", "full-length", "stop-words", "criteria", "beams", "beams-stopped", "samples"])
def test_every_block_is_free_after_a_run(engine_runner, kwargs):
    run(engine_runner, **kwargs)
    assert_all_blocks_free(engine_runner)


@pytest.mark.parametrize("kwargs", [{}, {"num_beams": 2}, {"num_return_sequences": 2, "top_k": 4}])
def test_every_block_is_free_after_a_failed_run_and_the_runner_still_works(engine_runner, kwargs):
    want = run(engine_runner, **kwargs)["output_ids"]
    with pytest.raises(RuntimeError, match="processor failed at step 2"):
        run(engine_runner, logits_processor=RaiseAt(2), **{**kwargs, "random_seed": 1})
    assert_all_blocks_free(engine_runner)
    if "top_k" not in kwargs:
        assert torch.equal(run(engine_runner, **kwargs)["output_ids"], want)


def test_every_block_is_free_after_a_stream_is_closed_early(engine_runner):
    stream = engine_runner.generate(tensors(PROMPTS), max_new_tokens=MAX_NEW, end_id=-1, pad_id=PAD_ID,
                                    streaming=True, output_sequence_lengths=True)
    next(stream)
    next(stream)
    kv = engine_runner.session.kv_cache_manager
    assert kv.num_free_blocks < kv.blocks_manager.num_blocks, "a running stream holds blocks"
    stream.close()
    assert_all_blocks_free(engine_runner)
    run(engine_runner)  # the session is usable again


def test_a_failing_stream_frees_its_blocks(engine_runner):
    stream = engine_runner.generate(tensors(PROMPTS), max_new_tokens=MAX_NEW, end_id=-1, pad_id=PAD_ID,
                                    streaming=True, logits_processor=RaiseAt(3), output_sequence_lengths=True)
    got = []
    with pytest.raises(RuntimeError, match="step 3"):
        for chunk in stream:
            got.append(chunk)  # noqa: PERF402 (the stream raises part-way)
    assert len(got) == 3
    assert_all_blocks_free(engine_runner)


# ------------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("prompts,kwargs,match", [
    ([[]], {}, r"batch_input_ids\[0\] is empty"),
    ([[1, 2], []], {}, r"batch_input_ids\[1\] is empty"),
    ([], {}, "batch_input_ids is empty"),
    ([[1, 2, 400]], {}, r"batch_input_ids\[0\] has token ids \[400\] outside \[0, 400\)"),
    ([[1, -5]], {}, r"token ids \[-5\]"),
    ([[1, 2]], {"top_p": 1.5}, r"top_p must be in \[0.0, 1.0\], got 1.5"),
    ([[1, 2]], {"temperature": -0.1}, r"temperature must be in \[0.0, inf\], got -0.1"),
    ([[1, 2]], {"top_k": -1}, "top_k"),
    ([[1, 2]], {"repetition_penalty": 0.0}, "repetition_penalty"),
    ([[1, 2]], {"presence_penalty": 3.0}, "presence_penalty"),
    ([[1, 2]], {"max_new_tokens": 0}, "max_new_tokens"),
    ([[1, 2]], {"num_beams": 0}, "num_beams"),
    ([[1, 2]], {"min_length": -1}, "min_length"),
    ([[1, 2]], {"random_seed": -1}, "random_seed"),
    ([[1, 2]], {"end_id": 400}, "end_id"),
    ([[1, 2]], {"bad_words_list": [[[5, 999]]]}, "bad_words"),
    ([[1, 2]], {"top_k": 2, "temprature": 0.5}, "unknown sampling arguments"),
    ([[1, 2], [3, 4]], {"random_seed": [1, 2, 3]}, "random_seed has 3 values for a batch of 2"),
])
def test_bad_inputs_raise_a_value_error_naming_the_field(engine_runner, prompts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(engine_runner, prompts=prompts, **kwargs)


def test_a_two_dimensional_prompt_is_rejected(engine_runner):
    with pytest.raises(ValueError, match=r"batch_input_ids\[0\] must be 1-D"):
        engine_runner.generate([torch.tensor([[1, 2], [3, 4]])], end_id=EOS_ID, pad_id=PAD_ID)


def test_unknown_architecture_is_named(llama_dir, tmp_path):
    ckpt = tmp_path / "foo"
    shutil.copytree(llama_dir, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["FooForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="FooForCausalLM"):
        ModelRunner.from_dir(ckpt, device="cpu")


def test_missing_weight_is_named(llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "missing"
    shutil.copytree(llama_dir, ckpt)
    path = ckpt / "model.safetensors"
    weights = load_file(str(path))
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        ModelRunner.from_dir(ckpt, device="cpu")


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        ModelRunner.from_dir(tmp_path / "nope")


def test_unsupported_arguments_fail_instead_of_being_ignored(engine_runner, tmp_path):
    with pytest.raises(ValueError, match="lora_uids name adapters, but none are loaded: pass lora_dir"):
        engine_runner.generate(tensors(PROMPTS[:1]), end_id=EOS_ID, pad_id=PAD_ID, lora_uids=["7"])
    with pytest.raises(ValueError, match="lora_uids must have one entry per prompt"):
        engine_runner.generate(tensors(PROMPTS[:2]), end_id=EOS_ID, pad_id=PAD_ID, lora_uids=["-1"])
    with pytest.raises(ValueError, match="prompt_table"):
        engine_runner.generate(tensors(PROMPTS[:1]), end_id=EOS_ID, pad_id=PAD_ID, prompt_table=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="needs adapter_config.json and adapter_model.safetensors"):
        ModelRunner.from_engine(engine_runner.session.runtime, lora_dir=str(tmp_path))


def test_end_id_defaults_to_the_checkpoint_eos(engine_runner):
    implicit = engine_runner.generate(tensors(PROMPTS), max_new_tokens=MAX_NEW)
    explicit = engine_runner.generate(tensors(PROMPTS), max_new_tokens=MAX_NEW, end_id=EOS_ID, pad_id=PAD_ID)
    assert torch.equal(implicit, explicit)
