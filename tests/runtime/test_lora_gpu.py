"""LoRA adapters on the GPU: steps with adapters replay CUDA graphs through the engine's LoRA
slots (or run eagerly: max_loras=0, or more adapters in a step than slots) and give the tokens
of eager CPU fp32 steps on the same adapters."""
from __future__ import annotations

import pytest
import torch

from runtime_lib.config import SamplingConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
PROMPTS = [[1, 17, 42, 99, 250, 7], [5, 6, 7, 8, 9, 10, 11], [300, 2, 44]]


def serve(ckpt, loras, device: str, **config) -> tuple[list[list[int]], object]:
    from runtime_lib.engine import EngineConfig, LLMEngine

    scfg = SamplingConfig(end_id=-1, pad_id=0, max_new_tokens=16)
    engine = LLMEngine(EngineConfig(model_dir=str(ckpt), device=device, dtype="float32", num_kv_blocks=64,
                                    max_num_seqs=4, lora_dir=str(loras), **config))
    try:
        streams = [engine.add_request(f"r{i}", p, scfg, lora_uid=u)
                   for i, (p, u) in enumerate(zip(PROMPTS, ("a", None, "b")))]
        return [[t for o in s for t in o.new_token_ids] for s in streams], engine
    finally:
        engine.shutdown()


@pytest.mark.parametrize("config", [dict(max_loras=4), dict(max_loras=4, compile_decode=True), dict(max_loras=1),
                                    dict(max_loras=0)], ids=["slots", "slots-compiled", "one-slot", "eager"])
def test_engine_on_cuda_serves_adapters_like_the_cpu_engine(make_checkpoint, tmp_path, config):
    from runtime_lib.demo import build_lora_adapter

    ckpt = make_checkpoint("llama")
    build_lora_adapter(tmp_path / "loras" / "a", ckpt, seed=1)
    build_lora_adapter(tmp_path / "loras" / "b", ckpt, seed=2, r=2, targets=("k_proj", "up_proj"))
    want, _ = serve(ckpt, tmp_path / "loras", "cpu")
    got, engine = serve(ckpt, tmp_path / "loras", "cuda", capture_graphs_at_start=False, **config)
    assert got == want
    # Graphs are captured on first use here: steps with adapters replayed some iff both fit the slots.
    with_lora = {key for key in engine._graph_runner._graphs if key[2]}   # (bucket, bound, with adapters)
    assert bool(with_lora) == (config["max_loras"] >= 2), with_lora
