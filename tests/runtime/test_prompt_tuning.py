"""Prompt tuning (TensorRT-LLM's `prompt_table` / `prompt_tasks`): prompt ids past the vocabulary
are virtual tokens read from the caller's table of embeddings, one block of rows per task.
Oracle: Hugging Face fed the same embeddings through `inputs_embeds`."""
from __future__ import annotations

import numpy as np
import pytest
import torch

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
