"""Prompt tuning (TensorRT-LLM's `prompt_table` / `prompt_tasks`): prompt ids past the vocabulary
are virtual tokens read from the caller's table of embeddings, one block of rows per task.
Oracle: Hugging Face fed the same embeddings through `inputs_embeds`."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime_lib.config import SamplingConfig
from runtime_lib.model_runner import ModelRunner

NEW = 10


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def family_runner(request, make_checkpoint):
    from transformers import AutoModelForCausalLM

    ckpt = make_checkpoint(request.param)
    runner = ModelRunner.from_dir(ckpt, device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    return runner, hf


def table_for(runner: ModelRunner, tasks: int, rows: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tasks, rows, runner.hidden_size, generator=g)  # [tasks, vocab, hidden]


def hf_greedy(hf, runner: ModelRunner, prompt: list[int], table: torch.Tensor, task: int) -> list[int]:
    """HF greedy decoding from the prompt's embeddings: virtual ids read the task's table rows."""
    V = runner.vocab_size
    emb = hf.get_input_embeddings().weight
    rows = [table[task, t - V] if t >= V else emb[t] for t in prompt]
    x = torch.stack(rows)[None]
    with torch.no_grad():
        out = hf.generate(inputs_embeds=x, attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, -NEW:].tolist()


def test_virtual_tokens_read_their_tasks_rows_like_hf_inputs_embeds(family_runner):
    runner, hf = family_runner
    V = runner.vocab_size
    table = table_for(runner, tasks=3, rows=4)
    prompts = [[V, V + 1, V + 2, 17, 42, 99], [5, V + 3, V, 300, 8], [V + 2, 250, 7]]
    tasks = [2, 0, 1]
    out = runner.generate([torch.tensor(p) for p in prompts], max_new_tokens=NEW, end_id=-1, pad_id=0,
                          prompt_table=table, prompt_tasks=",".join(map(str, tasks)))
    for b, (p, task) in enumerate(zip(prompts, tasks)):
        assert out[b, 0, :len(p)].tolist() == p                       # the prompt comes back as given
        assert out[b, 0, len(p):len(p) + NEW].tolist() == hf_greedy(hf, runner, p, table, task), b
    # The rows are really read: the same prompts with another task's rows generate otherwise.
    other = runner.generate([torch.tensor(p) for p in prompts], max_new_tokens=NEW, end_id=-1, pad_id=0,
                            prompt_table=table, prompt_tasks=[(t + 1) % 3 for t in tasks])
    assert not torch.equal(out, other)


def test_one_task_table_from_an_npy_file_and_default_task(family_runner, tmp_path):
    runner, hf = family_runner
    V = runner.vocab_size
    table = table_for(runner, tasks=1, rows=5, seed=1)[0]             # [vocab, hidden]
    path = tmp_path / "table.npy"
    np.save(path, table.numpy())
    prompt = [V + 4, V + 1, 11, 12, 13]
    out = runner.generate([torch.tensor(prompt)], max_new_tokens=NEW, end_id=-1, pad_id=0, prompt_table=str(path))
    assert out[0, 0, len(prompt):len(prompt) + NEW].tolist() == hf_greedy(hf, runner, prompt, table[None], 0)


def test_prompt_without_virtual_tokens_is_unchanged_by_a_table(family_runner):
    runner, _ = family_runner
    prompt = [torch.tensor([1, 17, 42, 99, 250, 7])]
    plain = runner.generate(prompt, max_new_tokens=NEW, end_id=-1, pad_id=0)
    tabled = runner.generate(prompt, max_new_tokens=NEW, end_id=-1, pad_id=0,
                             prompt_table=table_for(runner, 2, 3), prompt_tasks="1")
    assert torch.equal(plain, tabled)


def test_bad_prompt_tuning_inputs_name_the_argument(family_runner):
    runner, _ = family_runner
    V = runner.vocab_size
    table = table_for(runner, tasks=2, rows=3)
    ok = [torch.tensor([V, 5, 6])]
    with pytest.raises(ValueError, match=rf"outside \[0, {V + 3}\) \(vocab_size {V} \+ 3 prompt table rows"):
        runner.generate([torch.tensor([V + 3, 5])], end_id=-1, pad_id=0, prompt_table=table)
    with pytest.raises(ValueError, match=rf"outside \[0, {V}\)"):       # virtual ids need a table
        runner.generate(ok, end_id=-1, pad_id=0)
    with pytest.raises(ValueError, match=r"tasks must be in \[0, 2\)"):
        runner.generate(ok, end_id=-1, pad_id=0, prompt_table=table, prompt_tasks="2")
    with pytest.raises(ValueError, match="prompt_tasks must name one task per prompt"):
        runner.generate(ok, end_id=-1, pad_id=0, prompt_table=table, prompt_tasks="0,1")
    with pytest.raises(ValueError, match="prompt_tasks must be task numbers"):
        runner.generate(ok, end_id=-1, pad_id=0, prompt_table=table, prompt_tasks="a")
    with pytest.raises(ValueError, match="prompt_tasks needs a prompt_table"):
        runner.generate(ok, end_id=-1, pad_id=0, prompt_tasks="0")
    with pytest.raises(ValueError, match=r"prompt_table must be \[tasks, vocab, hidden="):
        runner.generate(ok, end_id=-1, pad_id=0, prompt_table=torch.zeros(2, 3, 5))


def test_streaming_beams_and_penalties_accept_virtual_prompt_ids(family_runner):
    """Sampling reads the prompt as history (repetition penalty, no-repeat n-grams): virtual ids
    are outside the logits and must be skipped, not indexed."""
    runner, _ = family_runner
    V = runner.vocab_size
    table = table_for(runner, tasks=1, rows=4)
    prompt = [torch.tensor([V, V + 1, V, V + 1, 9])]
    kw = dict(max_new_tokens=6, end_id=-1, pad_id=0, prompt_table=table)
    final = runner.generate(prompt, repetition_penalty=1.3, no_repeat_ngram_size=2, presence_penalty=0.5, **kw)
    assert final.shape[-1] == 5 + 6
    beams = runner.generate(prompt, num_beams=2, repetition_penalty=1.2, **kw)
    assert beams[0, 0, :5].tolist() == prompt[0].tolist()
    *_, last = runner.generate(prompt, streaming=True, **kw)
    assert torch.equal(last, runner.generate(prompt, **kw))


# ----------------------------------------------------------------------------- LLMEngine
@pytest.fixture(scope="module")
def llama_engine(make_checkpoint):
    from runtime_lib.engine import EngineConfig, LLMEngine
    from runtime_lib.session import Session

    ckpt = make_checkpoint("llama")
    engine = LLMEngine(EngineConfig(model_dir=str(ckpt), device="cpu", block_size=4, num_kv_blocks=96,
                                    max_num_batched_tokens=16), session=Session.from_dir(ckpt, device="cpu"))
    yield engine, ModelRunner.from_dir(ckpt, device="cpu")
    engine.shutdown()


def engine_tokens(engine, rid, prompt, table=None, **kw):
    scfg = SamplingConfig(end_id=-1, pad_id=0, max_new_tokens=NEW, **kw)
    outs = {}
    for o in engine.add_request(rid, prompt, scfg, prompt_table=table):
        outs.setdefault(o.sequence_index, []).extend(o.new_token_ids)
    return outs[0] if len(outs) == 1 else outs


def test_engine_requests_with_their_own_tables_batch_with_plain_ones(llama_engine):
    """Each request's table serves its own virtual ids, in mixed steps with other requests and
    chunked prefill (16-token budget); results equal ModelRunner with the same table."""
    engine, runner = llama_engine
    V = runner.vocab_size
    t1, t2 = table_for(runner, 1, 4, seed=1)[0], table_for(runner, 1, 6, seed=2)[0]
    reqs = [([V, V + 1, V + 2, V + 3] + list(range(20, 34)), t1), ([5, V + 5, V, 7, 8], t2),
            ([1, 17, 42, 99, 250, 7], None), ([V, V + 1, 9], t2)]
    scfg = SamplingConfig(end_id=-1, pad_id=0, max_new_tokens=NEW)
    streams = [engine.add_request(f"mix{i}", p, scfg, prompt_table=t) for i, (p, t) in enumerate(reqs)]
    together = [[tok for o in s for tok in o.new_token_ids] for s in streams]
    for (p, t), got in zip(reqs, together):
        ref = runner.generate([torch.tensor(p)], max_new_tokens=NEW, end_id=-1, pad_id=0, prompt_table=t)
        assert got == ref[0, 0, len(p):len(p) + NEW].tolist()


def test_engine_prefix_cache_keeps_tables_apart(llama_engine):
    """Same ids, other table: never served from the first table's cached blocks; same table:
    served from them."""
    engine, runner = llama_engine
    V = runner.vocab_size
    prompt = [V, V + 1, V + 2, V + 3, V, V + 1, V + 2, V + 3, 11, 12]
    a, b = table_for(runner, 1, 4, seed=3)[0], table_for(runner, 1, 4, seed=4)[0]
    def computed(table) -> tuple[list[int], int]:
        before = engine.stats().num_computed_tokens_total
        tokens = engine_tokens(engine, f"p{before}", prompt, table)
        return tokens, engine.stats().num_computed_tokens_total - before

    first, _ = computed(a)
    other, n_other = computed(b)
    again, n_again = computed(a.clone())
    ref_b = runner.generate([torch.tensor(prompt)], max_new_tokens=NEW, end_id=-1, pad_id=0, prompt_table=b)
    assert other == ref_b[0, 0, len(prompt):len(prompt) + NEW].tolist() and other != first
    assert again == first
    assert n_other >= len(prompt)            # nothing reused from table a's blocks
    assert n_again <= n_other - 8            # table a's two full 4-token blocks reused


def test_engine_n_and_beams_with_a_table(llama_engine):
    engine, runner = llama_engine
    V = runner.vocab_size
    table = table_for(runner, 1, 3, seed=5)[0]
    prompt = [V + 2, 30, V, 31, V + 1]
    beams = engine_tokens(engine, "beam", prompt, table, num_beams=2)
    ref = runner.generate([torch.tensor(prompt)], max_new_tokens=NEW, end_id=-1, pad_id=0, prompt_table=table,
                          num_beams=2)
    assert beams == ref[0, 0, len(prompt):len(prompt) + NEW].tolist()
    samples = engine_tokens(engine, "n", prompt, table, num_return_sequences=2, temperature=0.8, random_seed=7)
    alone = engine_tokens(engine, "n0", prompt, table, temperature=0.8, random_seed=7)
    assert samples[0] == alone


def test_engine_rejects_bad_tables_naming_the_field(llama_engine):
    engine, runner = llama_engine
    V, H = runner.vocab_size, runner.hidden_size
    scfg = SamplingConfig(end_id=-1, pad_id=0, max_new_tokens=2)
    with pytest.raises(ValueError, match=rf"prompt_embedding_table must be \[1, rows, {H}\]"):
        engine.add_request("bad1", [V], scfg, prompt_table=torch.zeros(3, H + 1))
    with pytest.raises(ValueError, match=rf"outside the vocabulary \[0, {V}\) and the prompt_embedding_table's rows"):
        engine.add_request("bad2", [V + 3], scfg, prompt_table=torch.zeros(3, H))
    with pytest.raises(ValueError, match=rf"outside the vocabulary \[0, {V}\)$"):
        engine.add_request("bad3", [V], scfg)
    with pytest.raises(ValueError, match="NaN"):
        engine.add_request("bad4", [V], scfg, prompt_table=torch.full((1, H), float("nan")))
