"""LoRA adapters on the GPU (written without a GPU run; see bench/results/gpu_e2e-notes.md):
steps with adapters run eagerly beside graph-replayed steps without them, and give the tokens
of eager CPU fp32 steps on the same adapters."""
from __future__ import annotations

import pytest
import torch

from runtime_lib.config import SamplingConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
PROMPTS = [[1, 17, 42, 99, 250, 7], [5, 6, 7, 8, 9, 10, 11], [300, 2, 44]]


def test_engine_on_cuda_serves_adapters_like_the_cpu_engine(make_checkpoint, tmp_path):
    from runtime_lib.demo import build_lora_adapter
    from runtime_lib.engine import EngineConfig, LLMEngine

    ckpt = make_checkpoint("llama")
    build_lora_adapter(tmp_path / "loras" / "a", ckpt, seed=1)
    build_lora_adapter(tmp_path / "loras" / "b", ckpt, seed=2, r=2, targets=("k_proj", "up_proj"))
    scfg = SamplingConfig(end_id=-1, pad_id=0, max_new_tokens=16)
    results = []
    for device in ("cpu", "cuda"):
        engine = LLMEngine(EngineConfig(model_dir=str(ckpt), device=device, dtype="float32", num_kv_blocks=64,
                                        max_num_seqs=4, lora_dir=str(tmp_path / "loras")))
        try:
            streams = [engine.add_request(f"r{i}", p, scfg, lora_uid=u)
                       for i, (p, u) in enumerate(zip(PROMPTS, ("a", None, "b")))]
            results.append([[t for o in s for t in o.new_token_ids] for s in streams])
        finally:
            engine.shutdown()
    assert results[0] == results[1]
