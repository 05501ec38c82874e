"""LLMEngine's return_context_logits / return_generation_logits (tensorrtllm_backend's outputs of
the same names): the prompt's logits and each new token's equal transformers' forward over the
same tokens, through chunked prefill, batching, preemption, prefix caching, stop words and n > 1."""
from __future__ import annotations

import pytest
import torch

from runtime_lib.config import SamplingConfig
from runtime_lib.engine import EngineConfig, LLMEngine
from runtime_lib.session import Session

PROMPTS = [[1, 17, 42, 99, 250, 7, 8, 9, 10, 11, 12], [5, 6, 7], [300, 2, 44, 45, 46, 47]]
NEW = 6


@pytest.fixture(scope="module")
def setup(llama_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32).eval()
    engine = LLMEngine(EngineConfig(model_dir=str(llama_dir), device="cpu", block_size=4, num_kv_blocks=22,
                                    max_num_batched_tokens=8), session=Session.from_dir(llama_dir, device="cpu"))
    yield engine, hf
    engine.shutdown()


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


def run(engine, rid, prompt, **kw):
    """{sequence_index: (tokens, context logits or None, generation logits rows)}"""
    scfg = SamplingConfig(end_id=-1, pad_id=0, max_new_tokens=kw.pop("max_new_tokens", NEW), **kw.pop("sampling", {}))
    res: dict[int, list] = {}
    for out in engine.add_request(rid, prompt, scfg, **kw):
        assert out.error is None, out.error
        toks, ctx, gen = res.setdefault(out.sequence_index, [[], None, []])
        toks += out.new_token_ids
        if out.context_logits is not None:
            assert res[out.sequence_index][1] is None, "context logits come once"
            res[out.sequence_index][1] = out.context_logits
        if out.generation_logits is not None:
            assert out.generation_logits.shape[0] == len(out.new_token_ids)
            gen += list(out.generation_logits)
    return res


def test_logits_equal_transformers_through_chunked_prefill_and_batching(setup):
    engine, hf = setup
    streams = {}
    for i, p in enumerate(PROMPTS):   # concurrent: 8-token steps mix prompt chunks and decode rows
        streams[i] = engine.add_request(f"c{i}", p, SamplingConfig(end_id=-1, pad_id=0, max_new_tokens=NEW),
                                        return_context_logits=i != 1, return_generation_logits=True)
    for i, p in enumerate(PROMPTS):
        toks, ctx, gen = [], None, []
        for out in streams[i]:
            toks += out.new_token_ids
            ctx = out.context_logits if out.context_logits is not None else ctx
            gen += list(out.generation_logits)
        ref = hf_logits(hf, p + toks)
        if i == 1:
            assert ctx is None
        else:
            torch.testing.assert_close(ctx, ref[:len(p)], atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.stack(gen), ref[len(p) - 1:len(p) - 1 + NEW], atol=1e-4, rtol=0)
        assert [int(g.argmax()) for g in gen] == toks            # greedy: each token is its row's argmax


def test_prefix_cache_and_preemption_still_give_every_prompt_row(setup):
    """A prompt served from the prefix cache would skip computing it: a context-logits request
    computes its whole prompt anyway. Under a tight pool (preemption, recompute) the rows are
    still the prompt's."""
    engine, hf = setup
    long = list(range(20, 44))                                   # 6 blocks of 4
    first = run(engine, "warm", long, max_new_tokens=2)            # caches the prompt's blocks
    again = run(engine, "again", long, max_new_tokens=2, return_context_logits=True)
    assert again[0][0] == first[0][0]
    torch.testing.assert_close(again[0][1], hf_logits(hf, long), atol=1e-4, rtol=0)
    streams = [engine.add_request(f"p{i}", long[i:] + [7] * i, SamplingConfig(end_id=-1, pad_id=0, max_new_tokens=12),
                                  return_context_logits=True) for i in range(3)]
    for i, s in enumerate(streams):
        outs = list(s)
        ctx = [o.context_logits for o in outs if o.context_logits is not None]
        assert len(ctx) == 1
        torch.testing.assert_close(ctx[0], hf_logits(hf, long[i:] + [7] * i), atol=1e-4, rtol=0)
    assert engine.stats().num_preempted_total > 0


def test_stop_words_and_n_keep_rows_aligned_with_tokens(setup):
    engine, hf = setup
    p = PROMPTS[0]
    plain = run(engine, "plain", p, max_new_tokens=8)[0][0]
    stop = plain[3:5]                                             # ends the output before its 4th token
    res = run(engine, "stop", p, max_new_tokens=8, sampling={"stop_words_list": [stop]},
              return_generation_logits=True)[0]
    assert res[0] == plain[:3] and len(res[2]) == 3
    two = run(engine, "n2", p, sampling={"num_return_sequences": 2, "temperature": 1.0, "top_k": 0, "random_seed": 3},
              return_context_logits=True, return_generation_logits=True)
    assert two[0][1] is not None and two[1][1] is None            # the prompt's logits: once, on sequence 0
    for toks, _, gen in two.values():
        torch.testing.assert_close(torch.stack(gen), hf_logits(hf, p + toks)[len(p) - 1:-1], atol=1e-4, rtol=0)


def test_beams_with_logits_are_refused(setup):
    engine, _ = setup
    with pytest.raises(ValueError, match=r"not supported with beam search \(num_beams=2\)"):
        engine.add_request("b", PROMPTS[0], SamplingConfig(end_id=-1, pad_id=0, max_new_tokens=2, num_beams=2),
                           return_generation_logits=True)


def test_embedding_bias_is_added_before_sampling_per_request(setup, llama_dir):
    """A request's embedding_bias [V] shifts its logits before sampling (tokens equal ModelRunner
    with a processor adding the same bias); other requests in the batch are untouched, an
    all-zero bias is no bias, and a bias of the wrong size names the field."""
    from runtime_lib.model_runner import ModelRunner

    engine, _ = setup
    V = engine.model_config.vocab_size
    bias = torch.randn(V, generator=torch.Generator().manual_seed(0)) * 5.0
    runner = ModelRunner.from_dir(llama_dir, device="cpu")

    def add_bias(step, ids, logits):
        return logits + bias

    ref = runner.generate([torch.tensor(PROMPTS[0])], max_new_tokens=NEW, end_id=-1, pad_id=0,
                          logits_processor=add_bias)[0, 0, len(PROMPTS[0]):len(PROMPTS[0]) + NEW].tolist()
    plain = runner.generate([torch.tensor(PROMPTS[1])], max_new_tokens=NEW, end_id=-1, pad_id=0)
    scfg = SamplingConfig(end_id=-1, pad_id=0, max_new_tokens=NEW)
    a = engine.add_request("bias", PROMPTS[0], scfg, embedding_bias=bias)
    b = engine.add_request("nobias", PROMPTS[1], scfg, embedding_bias=torch.zeros(1, V))
    assert [t for o in a for t in o.new_token_ids] == ref
    assert [t for o in b for t in o.new_token_ids] == plain[0, 0, len(PROMPTS[1]):len(PROMPTS[1]) + NEW].tolist()
    assert ref != runner.generate([torch.tensor(PROMPTS[0])], max_new_tokens=NEW, end_id=-1, pad_id=0)[
        0, 0, len(PROMPTS[0]):len(PROMPTS[0]) + NEW].tolist()
    with pytest.raises(ValueError, match=rf"embedding_bias must have shape \[{V}\] \(the vocabulary\), got \[7\]"):
        engine.add_request("bad", PROMPTS[0], scfg, embedding_bias=torch.ones(7))
