"""Prompt tuning on the GPU: the engine (CUDA graphs for decode, a graph runner for prefill that
table steps bypass) gives what ModelRunner's eager prefill gives with the same tables, next to
plain requests that keep their graphs."""
from __future__ import annotations

import pytest
import torch

from runtime_lib.config import SamplingConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_engine_with_tables_equals_model_runner_on_cuda(llama_dir):
    from runtime_lib.engine import EngineConfig, LLMEngine
    from runtime_lib.model_runner import ModelRunner
    from runtime_lib.session import Session

    runner = ModelRunner.from_dir(llama_dir, device="cuda", dtype="float32")
    V, H = runner.vocab_size, runner.hidden_size
    g = torch.Generator().manual_seed(0)
    t1, t2 = torch.randn(4, H, generator=g), torch.randn(6, H, generator=g)
    reqs = [([V, V + 1, V + 2, V + 3] + list(range(20, 40)), t1), ([5, V + 5, V, 7, 8], t2),
            ([1, 17, 42, 99, 250, 7], None)]
    engine = LLMEngine(EngineConfig(model_dir=str(llama_dir), max_num_seqs=4, num_kv_blocks=64,
                                    max_num_batched_tokens=16),
                       session=Session.from_dir(llama_dir, device="cuda", dtype="float32"))
    try:
        scfg = SamplingConfig(end_id=-1, pad_id=0, max_new_tokens=12)
        streams = [engine.add_request(f"r{i}", p, scfg, prompt_table=t) for i, (p, t) in enumerate(reqs)]
        got = [[tok for o in s for tok in o.new_token_ids] for s in streams]
    finally:
        engine.shutdown()
    for (p, t), tokens in zip(reqs, got):
        ref = runner.generate([torch.tensor(p)], max_new_tokens=12, end_id=-1, pad_id=0, prompt_table=t)
        assert tokens == ref[0, 0, len(p):len(p) + 12].tolist()
