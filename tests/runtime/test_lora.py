"""LoRA adapters (runtime_lib/lora.py) through ModelRunner: PEFT adapter directories, one adapter
per prompt in one batch, against transformers running the base model with each adapter merged
into its weights (W + scaling * B @ A)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from runtime_lib.config import ModelConfig, SamplingConfig
from runtime_lib.lora import LoraBatch, LoraManager, load_hf_lora, lora_from_trtllm, peft_to_trtllm
from runtime_lib.model_runner import ModelRunner

PROMPTS = [[1, 17, 42, 99, 250, 7], [5, 6, 7, 8, 9, 10, 11], [300, 2, 44]]
NEW = 10


def write_adapter(out: Path, ckpt: Path, seed: int, **kw) -> dict[str, torch.Tensor]:
    """A PEFT LoRA directory for the checkpoint at `ckpt` (runtime_lib.demo.build_lora_adapter)."""
    from runtime_lib.demo import build_lora_adapter

    assert not out.exists()
    return build_lora_adapter(out, ckpt, seed, **kw)


def hf_greedy(ckpt: Path, deltas: dict[str, torch.Tensor] | None, prompt: list[int]) -> list[int]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    state = hf.state_dict()
    with torch.no_grad():
        for name, d in (deltas or {}).items():
            state[name].add_(d)
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family, rslora", [("llama", False), ("qwen2", True), ("mistral", False)])
def test_each_prompt_gets_its_adapter_in_one_batch_like_hf_with_merged_weights(make_checkpoint, tmp_path,
                                                                              family, rslora):
    ckpt = make_checkpoint(family)
    d0 = write_adapter(tmp_path / "a0", ckpt, seed=1, rslora=rslora)
    d1 = write_adapter(tmp_path / "a1", ckpt, seed=2, r=2, alpha=4.0)
    runner = ModelRunner.from_dir(ckpt, lora_dir=[str(tmp_path / "a0"), str(tmp_path / "a1")], device="cpu")
    assert runner.use_lora_plugin and runner.lora_manager.lora_uids == ["0", "1"]
    uids = ["0", "-1", "1"]
    out = runner.generate([torch.tensor(p) for p in PROMPTS], max_new_tokens=NEW, end_id=-1, pad_id=0,
                          lora_uids=uids)
    for b, (p, deltas) in enumerate(zip(PROMPTS, (d0, None, d1))):
        assert out[b, 0, len(p):len(p) + NEW].tolist() == hf_greedy(ckpt, deltas, p), (family, uids[b])
    # The adapter matters (or the comparison above would hold for a runner that ignores it).
    base = runner.generate([torch.tensor(PROMPTS[0])], max_new_tokens=NEW, end_id=-1, pad_id=0)
    assert base[0, 0].tolist() != out[0, 0].tolist()


def test_streaming_and_sampling_rows_follow_their_adapters(make_checkpoint, tmp_path):
    """Streaming ends where the unstreamed call does; seeded sampling with an adapter equals the
    same request alone (rows with other adapters in the batch change nothing)."""
    ckpt = make_checkpoint("llama")
    write_adapter(tmp_path / "a0", ckpt, seed=3)
    runner = ModelRunner.from_dir(ckpt, lora_dir=str(tmp_path / "a0"), device="cpu")
    kw = dict(max_new_tokens=NEW, end_id=-1, pad_id=0, temperature=0.8, top_k=0, top_p=0.9, random_seed=7)
    batch = runner.generate([torch.tensor(p) for p in PROMPTS[:2]], lora_uids=["0", "-1"], **kw)
    alone = runner.generate([torch.tensor(PROMPTS[0])], lora_uids=["0"], **kw)
    assert batch[0, 0, :len(PROMPTS[0]) + NEW].tolist() == alone[0, 0, :len(PROMPTS[0]) + NEW].tolist()
    *_, last = runner.generate([torch.tensor(p) for p in PROMPTS[:2]], lora_uids=["0", "-1"], streaming=True, **kw)
    assert torch.equal(last, batch)


def test_lora_batch_adds_each_adapters_update_to_its_rows_only(make_checkpoint, tmp_path):
    ckpt = make_checkpoint("llama")
    cfg = ModelConfig.from_dir(ckpt)
    write_adapter(tmp_path / "a", ckpt, seed=4, targets=("k_proj", "up_proj"))
    adapter = load_hf_lora(tmp_path / "a", cfg, "a")
    a, b = adapter.weights["layers.0.self_attn.qkv_proj"]
    q, kv = cfg.num_heads * cfg.head_size, cfg.num_kv_heads * cfg.head_size
    assert b[:q].abs().sum() == 0 and b[q + kv:].abs().sum() == 0 and b[q:q + kv].abs().sum() > 0  # k only
    batch = LoraBatch.build([None, adapter, None], [2, 3, 1], "cpu")
    x, y = torch.randn(6, cfg.hidden_size), torch.randn(6, q + 2 * kv)
    got = batch.apply("layers.0.self_attn.qkv_proj", x, y)
    assert torch.equal(got[[0, 1, 5]], y[[0, 1, 5]])
    torch.testing.assert_close(got[2:5], y[2:5] + x[2:5] @ a.t() @ b.t())
    assert LoraBatch.build([None, None], [1, 1], "cpu") is None


def test_bad_adapters_and_uids_name_the_problem(make_checkpoint, tmp_path):
    ckpt = make_checkpoint("llama")
    cfg = ModelConfig.from_dir(ckpt)
    write_adapter(tmp_path / "ok", ckpt, seed=5)
    runner = ModelRunner.from_dir(ckpt, lora_dir=str(tmp_path / "ok"), device="cpu")
    with pytest.raises(ValueError, match=r"lora_uids has '3', which is not a loaded adapter; loaded: \['0'\]"):
        runner.generate([torch.tensor(PROMPTS[0])], max_new_tokens=2, end_id=-1, pad_id=0, lora_uids=["3"])
    for name, kw, message in [
        ("dora", {"use_dora": True}, r"use_dora=True is not supported"),
        ("fifo", {"fan_in_fan_out": True}, r"fan_in_fan_out=True is not supported"),
        ("bias", {"bias": "all"}, r"bias='all' is not supported"),
    ]:
        write_adapter(tmp_path / name, ckpt, seed=6, **kw)
        with pytest.raises(ValueError, match=message):
            load_hf_lora(tmp_path / name, cfg, name)
    write_adapter(tmp_path / "wide", ckpt, seed=7)
    from safetensors.torch import load_file
    tensors = load_file(str(tmp_path / "wide" / "adapter_model.safetensors"))
    tensors["base_model.model.model.embed_tokens.lora_A.weight"] = torch.zeros(4, 8)
    save_file(tensors, str(tmp_path / "wide" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"'base_model\.model\.model\.embed_tokens\.lora_A\.weight' is not a "
                                         r"lora_A/lora_B of the decoder projections"):
        load_hf_lora(tmp_path / "wide", cfg, "wide")
    with pytest.raises(ValueError, match=r"LoRA adapters are supported for the \['llama', 'qwen2'\] families, "
                                         r"not 'gpt2'"):
        LoraManager().load_from_ckpt(str(tmp_path / "ok"), ModelConfig.from_dir(make_checkpoint("gpt2")))


# ----------------------------------------------------------------------------- LLMEngine
@pytest.fixture(scope="module")
def lora_setup(make_checkpoint, tmp_path_factory):
    """An engine serving adapters "a" and "b" from one lora_dir, and a ModelRunner with the
    same two as uids "0" and "1" (the reference)."""
    from runtime_lib.engine import EngineConfig, LLMEngine

    ckpt = make_checkpoint("llama")
    root = tmp_path_factory.mktemp("loras")
    write_adapter(root / "a", ckpt, seed=11)
    write_adapter(root / "b", ckpt, seed=12, r=2, targets=("k_proj", "up_proj", "down_proj"))
    engine = LLMEngine(EngineConfig(model_dir=str(ckpt), device="cpu", block_size=4, num_kv_blocks=128,
                                    max_num_batched_tokens=8, lora_dir=str(root)))
    runner = ModelRunner.from_dir(ckpt, lora_dir=[str(root / "a"), str(root / "b")], device="cpu")
    yield engine, runner
    engine.shutdown()


def engine_tokens(engine, rid: str, prompt: list[int], lora_uid=None, **kw):
    outs: dict[int, list[int]] = {}
    for o in engine.add_request(rid, prompt, SamplingConfig(end_id=-1, pad_id=0, max_new_tokens=NEW, **kw),
                                lora_uid=lora_uid):
        assert o.error is None, o.error
        outs.setdefault(o.sequence_index, []).extend(o.new_token_ids)
    return outs


def test_engine_batches_requests_of_different_adapters_like_model_runner(lora_setup):
    """Concurrent requests on adapters a, none, b (chunked prefill: an 8-token budget mixes
    their prompt chunks and decode rows in one step) each get ModelRunner's tokens."""
    engine, runner = lora_setup
    reqs = [(PROMPTS[0] + PROMPTS[1], "a", "0"), (PROMPTS[1], None, "-1"), (PROMPTS[2] * 3, "b", "1")]
    scfg_kw = dict(end_id=-1, pad_id=0, max_new_tokens=NEW)
    streams = [engine.add_request(f"mix{i}", p, SamplingConfig(**scfg_kw), lora_uid=u)
               for i, (p, u, _) in enumerate(reqs)]
    together = [[t for o in s for t in o.new_token_ids] for s in streams]
    for (p, _, uid), got in zip(reqs, together):
        ref = runner.generate([torch.tensor(p)], lora_uids=[uid], **scfg_kw)
        assert got == ref[0, 0, len(p):len(p) + NEW].tolist(), uid


def test_engine_prefix_cache_keeps_adapters_apart_and_beams_use_theirs(lora_setup):
    """The same prompt under adapter a, then without one, then under a again: each gets its
    own model's tokens (a's cached KV is never served to the base model); a beam request uses
    its adapter like ModelRunner's beam search."""
    engine, runner = lora_setup
    prompt = list(range(20, 33))                     # 3 full blocks of 4
    ref = {uid: runner.generate([torch.tensor(prompt)], lora_uids=[uid], max_new_tokens=NEW, end_id=-1,
                                pad_id=0)[0, 0, len(prompt):len(prompt) + NEW].tolist() for uid in ("0", "-1")}
    assert ref["0"] != ref["-1"]
    assert engine_tokens(engine, "p1", prompt, "a")[0] == ref["0"]
    assert engine_tokens(engine, "p2", prompt)[0] == ref["-1"]
    assert engine_tokens(engine, "p3", prompt, "a")[0] == ref["0"]
    beams = engine_tokens(engine, "beam", prompt, "a", num_beams=2, num_return_sequences=2)
    rb = runner.generate([torch.tensor(prompt)], lora_uids=["0"], max_new_tokens=NEW, end_id=-1, pad_id=0,
                         num_beams=2, num_return_sequences=2)
    assert [beams[i] for i in (0, 1)] == [rb[0, i, len(prompt):len(prompt) + NEW].tolist() for i in (0, 1)]


def test_engine_rejects_unknown_adapters_naming_them(lora_setup, make_checkpoint):
    from runtime_lib.engine import EngineConfig, LLMEngine

    engine, _ = lora_setup
    scfg = SamplingConfig(end_id=-1, pad_id=0, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"lora_uids has 'c', which is not a loaded adapter; loaded: \['a', 'b'\]"):
        engine.add_request("bad", PROMPTS[0], scfg, lora_uid="c")
    assert engine_tokens(engine, "after", PROMPTS[0], "b")[0]      # the engine keeps serving
    plain = LLMEngine(EngineConfig(model_dir=str(make_checkpoint("llama")), device="cpu", num_kv_blocks=16))
    try:
        with pytest.raises(ValueError, match=r"lora_uid 'a': this engine serves no LoRA adapters \(set lora_dir\)"):
            plain.add_request("x", PROMPTS[0], scfg, lora_uid="a")
    finally:
        plain.shutdown()


def test_tensorrt_llm_request_format_is_the_same_adapter(make_checkpoint, tmp_path):
    """tensorrtllm_backend's lora_weights / lora_config (hf_lora_convert.py's layout: per row A
    then scaled B, flattened and zero-padded; [module_id, layer, r]) give the adapter that the
    PEFT directory gives; malformed tensors name the problem."""
    ckpt = make_checkpoint("qwen2")
    cfg = ModelConfig.from_dir(ckpt)
    write_adapter(tmp_path / "a", ckpt, seed=8, rslora=True,
                  targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    weights, config = peft_to_trtllm(tmp_path / "a", dtype=torch.float32)
    assert config.shape == (7 * cfg.num_layers, 3) and sorted(set(config[:, 0].tolist())) == [1, 2, 3, 4, 5, 6, 7]
    ours, theirs = load_hf_lora(tmp_path / "a", cfg, "a"), lora_from_trtllm(weights, config, cfg, "a")
    assert ours.weights.keys() == theirs.weights.keys()
    for module, (a, b) in ours.weights.items():
        ta, tb = theirs.weights[module]
        # Rows of A (and columns of B) may come in another order; the update they make is the same.
        torch.testing.assert_close(tb @ ta, b @ a, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"module id 18; supported"):
        lora_from_trtllm(weights, torch.tensor([[18, 0, 4]] + config[1:].tolist()), cfg, "a")
    with pytest.raises(ValueError, match=r"lora_config row 0 \(q_proj, layer 0, r=64\) needs"):
        lora_from_trtllm(weights, torch.tensor([[1, 0, 64]] + config[1:].tolist()), cfg, "a")
    with pytest.raises(ValueError, match=r"lora_config must be \[modules x layers, 3\]"):
        lora_from_trtllm(weights[:3], config, cfg, "a")
    with pytest.raises(ValueError, match=r"DoRA"):
        lora_from_trtllm(weights, torch.cat([config, torch.ones(len(config), 1, dtype=torch.int32)], 1), cfg, "a")


def test_uploaded_adapters_are_bounded_least_recently_used_first(make_checkpoint, tmp_path):
    """Uploads (add) are kept up to max_added, the least recently used evicted first; preloaded
    adapters are never evicted nor replaced; an adapter already handed out stays usable."""
    ckpt = make_checkpoint("llama")
    cfg = ModelConfig.from_dir(ckpt)
    write_adapter(tmp_path / "d", ckpt, seed=9)
    manager = LoraManager(max_added=2)
    manager.load_from_ckpt([str(tmp_path / "d")], cfg, uids=["pre"])
    weights, config = peft_to_trtllm(tmp_path / "d", dtype=torch.float32)
    for uid in ("u1", "u2"):
        manager.add(lora_from_trtllm(weights, config, cfg, uid))
    held = manager.adapters_for(["u1"], 1)[0]          # u1 used: u2 is now the oldest
    manager.add(lora_from_trtllm(weights, config, cfg, "u3"))
    assert manager.lora_uids == ["pre", "u1", "u3"] and held.weights
    with pytest.raises(ValueError, match=r"'pre' is a preloaded adapter; it cannot be replaced"):
        manager.add(lora_from_trtllm(weights, config, cfg, "pre"))
    with pytest.raises(ValueError, match=r"takes no LoRA uploads \(max_lora_uploads=0\)"):
        LoraManager(max_added=0).add(lora_from_trtllm(weights, config, cfg, "x"))


def test_adapters_run_over_fp8_weights(make_checkpoint, tmp_path):
    """An FP8 model (quantization="fp8") takes adapters too: their update is added to the FP8
    projection's output in the model dtype; rows without one are the plain FP8 model's."""
    from runtime_lib.session import Session

    ckpt = make_checkpoint("llama")
    write_adapter(tmp_path / "a", ckpt, seed=10)
    session = Session.from_dir(ckpt, device="cpu", quantization="fp8")
    runner = ModelRunner.from_engine(session, lora_dir=str(tmp_path / "a"))
    kw = dict(max_new_tokens=NEW, end_id=-1, pad_id=0)
    both = runner.generate([torch.tensor(PROMPTS[0])] * 2, lora_uids=["0", "-1"], **kw)
    plain = ModelRunner.from_engine(session).generate([torch.tensor(PROMPTS[0])], **kw)
    assert torch.equal(both[1], plain[0]) and not torch.equal(both[0], plain[0])
