"""Engine build and Session: an engine directory (and a serialized engine) runs the same
network as the HF checkpoint it came from; Session.run validates its named inputs."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime_lib.build import Engine, build, build_engine
from runtime_lib.config import ModelConfig
from runtime_lib.models import load_model
from runtime_lib.session import Session, TensorInfo

BLOCK_SIZE = 4
PROMPTS = [[1, 17, 42, 99, 250, 7], [1, 300, 5, 5, 8, 120, 64, 33, 390]]
REPO_ROOT = Path(__file__).resolve().parents[2]


def prefill_inputs(session: Session, prompts: list[list[int]], with_slot_mapping: bool = False) -> dict:
    """Session.run inputs for one prefill step of `prompts`, with interleaved block ids so
    each sequence's blocks are non-contiguous; logits wanted for every token."""
    num_blocks = [-(-len(p) // BLOCK_SIZE) for p in prompts]
    tables = [[2 * j + i + 1 for j in range(n)] for i, n in enumerate(num_blocks)]
    width = max(num_blocks)
    slots = [t[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
             for p, t in zip(prompts, tables) for pos in range(len(p))]
    total = sum(len(p) for p in prompts)
    inputs = {
        "input_ids": torch.tensor([t for p in prompts for t in p]),
        "position_ids": torch.tensor([i for p in prompts for i in range(len(p))]),
        "kv_cache": session.allocate_kv_cache(2 * width + 2, BLOCK_SIZE),
        "query_lengths": torch.tensor([len(p) for p in prompts], dtype=torch.int32),
        "sequence_lengths": torch.tensor([len(p) for p in prompts], dtype=torch.int32),
        "kv_cache_block_offsets": torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        "logits_indices": torch.arange(total),
        "host_max_query_length": max(len(p) for p in prompts),
        "host_max_sequence_length": max(len(p) for p in prompts),
    }
    if with_slot_mapping:
        inputs["slot_mapping"] = torch.tensor(slots)
    return inputs


def session_logits(session: Session, prompts=PROMPTS) -> torch.Tensor:
    outputs: dict[str, torch.Tensor] = {}
    assert session.run(prefill_inputs(session, prompts), outputs) is True
    return outputs["logits"]


@pytest.fixture(scope="module")
def engine_dir(llama_dir, tmp_path_factory) -> Path:
    return build_engine(llama_dir, tmp_path_factory.mktemp("engine") / "llama", max_batch_size=8,
                        max_seq_len=256, max_input_len=128, tokens_per_block=BLOCK_SIZE)


def test_engine_directory_layout(engine_dir, llama_dir):
    cfg = json.loads((engine_dir / "config.json").read_text())
    assert set(cfg) == {"runtime_lib_version", "model_config", "build_config"}
    assert cfg["build_config"] == {"max_batch_size": 8, "max_beam_width": 4, "max_input_len": 128,
                                   "max_seq_len": 256, "tokens_per_block": BLOCK_SIZE, "tp_size": 1,
                                   "dtype": "float32", "kv_cache_dtype": "auto", "quantization": "none"}
    mc = ModelConfig.from_dir(engine_dir)
    assert (mc.max_seq_len, mc.max_input_len, mc.max_batch_size) == (256, 128, 8)
    for name in ("rank0.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (engine_dir / name).is_file(), name
    from safetensors import safe_open
    with safe_open(str(engine_dir / "rank0.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "layers.0.self_attn.qkv_proj.weight" in names and "layers.1.mlp.gate_up_proj.weight" in names


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_engine_gives_the_same_logits_as_the_checkpoint(family, make_checkpoint, tmp_path):
    ckpt = make_checkpoint(family)
    engine = build_engine(ckpt, tmp_path / "engine")
    a = session_logits(Session.from_dir(ckpt))
    b = session_logits(Session.from_engine(engine))
    assert torch.equal(a, b)
    model_a, model_b = load_model(ckpt), load_model(engine)
    sa, sb = model_a.state_dict(), model_b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_session_logits_match_hf(llama_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32).eval()
    logits = session_logits(Session.from_dir(llama_dir))
    with torch.no_grad():
        ref = torch.cat([hf(torch.tensor([p])).logits[0] for p in PROMPTS])
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)


def test_engine_weights_are_loaded_strictly(engine_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(engine_dir, broken)
    weights = load_file(str(broken / "rank0.safetensors"))
    del weights["layers.1.self_attn.o_proj.weight"]
    weights["layers.0.mlp.extra.weight"] = torch.zeros(3)
    save_file(weights, str(broken / "rank0.safetensors"))
    with pytest.raises(ValueError, match=r"missing weights \['layers\.1\.self_attn\.o_proj\.weight'\]; "
                                         r"unexpected weights \['layers\.0\.mlp\.extra\.weight'\]"):
        load_model(broken)


def test_serialized_engine_round_trips_exactly(engine_dir):
    session = Session.from_engine(engine_dir)
    blob = session.serialize()
    restored = Session.from_serialized_engine(blob)
    assert restored.serialize() == blob
    assert restored.model_config == session.model_config
    assert restored.build_config == session.build_config
    assert torch.equal(session_logits(restored), session_logits(session))


def test_in_memory_engine_and_bf16_build(llama_dir, tmp_path):
    engine = build(llama_dir, dtype="bf16")
    assert isinstance(engine, Engine)
    assert all(t.dtype == torch.bfloat16 for t in engine.weights.values())
    session = Session.from_engine(engine)
    assert session.model_config.dtype == "bfloat16"
    assert session.allocate_kv_cache(2, BLOCK_SIZE).dtype == torch.bfloat16
    fp32 = session_logits(Session.from_dir(llama_dir))
    bf16 = session_logits(session)
    assert bf16.dtype == torch.float32
    assert (bf16 - fp32).abs().max() < 0.05 * fp32.abs().max()
    saved = Engine.from_dir(engine.save(tmp_path / "bf16"))
    assert saved.config == engine.config


def test_run_writes_logits_in_place_and_derives_slots(llama_dir):
    session = Session.from_dir(llama_dir)
    inputs = prefill_inputs(session, PROMPTS)
    [info] = session.infer_shapes([TensorInfo(n, t.dtype, tuple(t.shape))
                                   for n, t in inputs.items() if isinstance(t, torch.Tensor)])
    assert info == TensorInfo("logits", torch.float32, (sum(map(len, PROMPTS)), 400))
    out = torch.full(info.shape, float("nan"))
    session.run(inputs, {"logits": out})
    # Same result when the driver passes its own host-computed slot mapping.
    given = {}
    session.run(prefill_inputs(session, PROMPTS, with_slot_mapping=True), given)
    assert torch.equal(out, given["logits"])
    # Decode one token for sequence 1 only, through the cache written above.
    cache = inputs["kv_cache"]
    seq = PROMPTS[1] + [17]
    step = {**prefill_inputs(session, [seq]), "kv_cache": cache}
    step.update(input_ids=torch.tensor([17]), position_ids=torch.tensor([len(seq) - 1]),
                query_lengths=torch.tensor([1], dtype=torch.int32),
                sequence_lengths=torch.tensor([len(seq)], dtype=torch.int32),
                kv_cache_block_offsets=inputs["kv_cache_block_offsets"][1:],
                logits_indices=torch.tensor([0]), host_max_query_length=1, host_max_sequence_length=len(seq))
    decoded = {}
    session.run(step, decoded)
    full = session_logits(session, [seq])
    torch.testing.assert_close(decoded["logits"][0], full[-1], atol=1e-5, rtol=0)


def test_run_names_missing_and_unknown_inputs(llama_dir):
    session = Session.from_dir(llama_dir)
    inputs = prefill_inputs(session, PROMPTS)
    del inputs["sequence_lengths"]
    inputs["seq_lens"] = torch.tensor([1])
    with pytest.raises(ValueError, match=r"missing inputs \['sequence_lengths'\]; unknown inputs \['seq_lens'\]"):
        session.run(inputs, {})
    with pytest.raises(ValueError, match="logits_indices"):
        session.infer_shapes([TensorInfo("input_ids", torch.int64, (3,))])


def test_from_serialized_engine_rejects_garbage():
    with pytest.raises(ValueError, match="magic"):
        Session.from_serialized_engine(b"NOTANENGINE" + bytes(32))


@pytest.mark.parametrize("kwargs, message", [
    ({"dtype": "int8"}, "dtype must be one of"),
    ({"tp_size": 2}, "tp_size > 1 is not supported yet"),
    ({"max_batch_size": 0}, "max_batch_size must be an integer >= 1, got 0"),
    ({"max_input_len": 300, "max_seq_len": 200}, r"max_input_len \(300\) must be <= max_seq_len \(200\)"),
    ({"max_tokens": 5}, r"unknown build option\(s\) \['max_tokens'\]"),
    ({"kv_cache_dtype": "int8"}, r"kv_cache_dtype must be one of \['auto', 'fp8'\], got 'int8'"),
])
def test_build_rejects_bad_arguments(llama_dir, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_engine(llama_dir, tmp_path / "e", **kwargs)
    assert not (tmp_path / "e" / "config.json").exists()


def test_fp8_kv_cache_engine_is_used_by_model_runner_and_llm_engine(llama_dir, tmp_path):
    """`--kv-cache-dtype fp8` is part of the engine (as in TensorRT-LLM): ModelRunner's
    GenerationSession and LLMEngine both allocate an e4m3 pool for it, and both generate the
    same greedy tokens from it; EngineConfig.kv_cache_dtype="fp8" does the same for any model."""
    from runtime_lib.config import FP8_KV_DTYPE, SamplingConfig
    from runtime_lib.engine import EngineConfig, LLMEngine
    from runtime_lib.model_runner import ModelRunner

    engine_dir = build_engine(llama_dir, tmp_path / "fp8", kv_cache_dtype="fp8", tokens_per_block=BLOCK_SIZE)
    assert json.loads((engine_dir / "config.json").read_text())["build_config"]["kv_cache_dtype"] == "fp8"
    assert ModelConfig.from_dir(engine_dir).kv_cache_dtype == "fp8"
    runner = ModelRunner.from_dir(engine_dir, device="cpu")
    prompt = [1, 17, 42, 99, 250, 7]
    out = runner.generate([torch.tensor(prompt)], max_new_tokens=8, end_id=-1, pad_id=0)
    assert runner.session._kv_cache.dtype == FP8_KV_DTYPE
    greedy = out[0, 0, len(prompt):len(prompt) + 8].tolist()
    beams = runner.generate([torch.tensor(prompt)], max_new_tokens=8, end_id=-1, pad_id=0, num_beams=3,
                            num_return_sequences=3)
    assert beams.shape[1] == 3   # beam search forks blocks: byte copies inside the FP8 pool
    engine = LLMEngine(EngineConfig(model_dir=str(engine_dir), device="cpu", num_kv_blocks=32,
                                    block_size=BLOCK_SIZE))
    try:
        assert engine.kv_cache.dtype == FP8_KV_DTYPE
        stream = engine.add_request("r", prompt, SamplingConfig(end_id=-1, pad_id=0, max_new_tokens=8))
        assert [t for o in stream for t in o.new_token_ids] == greedy
    finally:
        engine.shutdown()


def test_build_rejects_missing_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        build_engine(tmp_path / "nope", tmp_path / "e")


def test_gpt2_max_seq_len_is_bounded_by_learned_positions(make_checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"max_seq_len \(1024\) must be <= max_position_embeddings \(512\)"):
        build_engine(make_checkpoint("gpt2"), tmp_path / "e", max_seq_len=1024)


def test_cli_builds_an_engine(llama_dir, tmp_path):
    out = tmp_path / "cli-engine"
    proc = subprocess.run(
        [sys.executable, "-m", "runtime_lib.build", "--checkpoint", str(llama_dir), "--output", str(out),
         "--dtype", "bf16", "--max-batch-size", "4", "--max-seq-len", "64", "--tokens-per-block", "8"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["engine_dir"] == str(out)
    mc = ModelConfig.from_dir(out)
    assert (mc.dtype, mc.max_batch_size, mc.max_seq_len, mc.tokens_per_block) == ("bfloat16", 4, 64, 8)

    bad = subprocess.run([sys.executable, "-m", "runtime_lib.build", "--checkpoint", str(llama_dir),
                          "--output", str(tmp_path / "x"), "--tp-size", "2"],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert bad.returncode == 2 and "tp_size > 1 is not supported yet" in bad.stderr
