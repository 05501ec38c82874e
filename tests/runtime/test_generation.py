"""Acceptance tests of the decode loop through `ModelRunner.generate` / `GenerationSession`:
every output is compared with Hugging Face `transformers` on the same tiny checkpoint (greedy,
beam search, log-probs, logits, penalties, bad words, min_length), or checked for a property
that could fail (seeded sampling, stop words, user criteria/processors, streaming).

Layout (TensorRT-LLM): `output_ids` is [batch, beams, max_input_len + max_new_tokens], each row
the prompt followed by the generated tokens, padded with `end_id`; `sequence_lengths` counts
prompt + generated tokens, an `end_id` that ended the row included (as HF's `sequences`).
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from runtime_lib.config import SamplingConfig
from runtime_lib.logits_processor import LogitsProcessor, LogitsProcessorList
from runtime_lib.model_runner import ModelRunner
from runtime_lib.stopping import StoppingCriteria, StoppingCriteriaList

FAMILIES = ("llama", "llama3", "mistral", "qwen2", "gpt2")
PAD_ID = 3
EOS_ID = 2
# Ragged on purpose: the longest is not first, and lengths cross a KV block boundary (16).
PROMPTS = ([1, 50, 60, 70], [1, 80, 90, 100, 110, 120, 130, 140, 150, 160, 170, 180, 190, 200, 210, 220, 230],
           [1, 240, 250, 260, 270, 280])
MAX_NEW = 10


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def runner_for(make_checkpoint):
    cache: dict[str, ModelRunner] = {}

    def get(family: str) -> ModelRunner:
        if family not in cache:
            cache[family] = ModelRunner.from_dir(make_checkpoint(family), device="cpu")
        return cache[family]

    return get


@pytest.fixture(scope="module")
def hf_for(make_checkpoint):
    from transformers import AutoModelForCausalLM

    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = AutoModelForCausalLM.from_pretrained(make_checkpoint(family)).eval()
        return cache[family]

    return get


@pytest.fixture(scope="module")
def runner(runner_for) -> ModelRunner:
    return runner_for("llama")


@pytest.fixture(scope="module")
def hf(hf_for):
    return hf_for("llama")


def tensors(prompts) -> list[torch.Tensor]:
    return [torch.tensor(p) for p in prompts]


@torch.no_grad()
def hf_generate(model, prompt, max_new_tokens=MAX_NEW, eos=EOS_ID, **kwargs) -> list[int]:
    """HF's generated tokens for one unpadded prompt (eos included when it ended the row)."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=PAD_ID, **kwargs)
    gen = out[0, len(prompt):].tolist()
    if eos in gen:
        gen = gen[:gen.index(eos) + 1]
    return gen


@torch.no_grad()
def hf_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].float()  # (T, V)


def generated(out_ids: torch.Tensor, seq_lens: torch.Tensor, b: int, beam: int, prompt_len: int) -> list[int]:
    return out_ids[b, beam, prompt_len:int(seq_lens[b, beam])].tolist()


def greedy(runner, prompts, **kwargs) -> dict:
    kwargs.setdefault("max_new_tokens", MAX_NEW)
    return runner.generate(tensors(prompts), end_id=kwargs.pop("end_id", EOS_ID), pad_id=PAD_ID,
                           return_dict=True, **kwargs)


def check_layout(out: dict, prompts, max_new: int, end_id: int, beams: int = 1) -> None:
    """TRT-LLM layout: [B, beams, max_prompt + max_new], prompt first, end_id padding after."""
    ids, lens = out["output_ids"], out["sequence_lengths"]
    assert ids.shape == (len(prompts), beams, max(map(len, prompts)) + max_new)
    assert lens.shape == (len(prompts), beams)
    for b, p in enumerate(prompts):
        for w in range(beams):
            n = int(lens[b, w])
            assert len(p) < n <= len(p) + max_new
            assert ids[b, w, :len(p)].tolist() == p
            assert (ids[b, w, n:] == end_id).all(), f"row {b} beam {w} is not padded with end_id after {n}"


# ------------------------------------------------------------------------------------------ greedy
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_hf_token_for_token(family, runner_for, hf_for):
    out = greedy(runner_for(family), PROMPTS)
    check_layout(out, PROMPTS, MAX_NEW, EOS_ID)
    model = hf_for(family)
    for b, p in enumerate(PROMPTS):
        want = hf_generate(model, p)
        assert generated(out["output_ids"], out["sequence_lengths"], b, 0, len(p)) == want, (family, b)
        assert int(out["sequence_lengths"][b, 0]) == len(p) + len(want)


def test_plain_call_returns_output_ids_tensor(runner):
    ids = runner.generate(tensors(PROMPTS[:1]), max_new_tokens=4, end_id=EOS_ID, pad_id=PAD_ID)
    assert isinstance(ids, torch.Tensor) and ids.shape == (1, 1, len(PROMPTS[0]) + 4)
    out = runner.generate(tensors(PROMPTS[:1]), max_new_tokens=4, end_id=EOS_ID, pad_id=PAD_ID,
                          output_sequence_lengths=True)
    assert set(out) == {"output_ids", "sequence_lengths"} and torch.equal(out["output_ids"], ids)


def test_sampling_config_object_and_overrides(runner, hf):
    scfg = SamplingConfig(end_id=EOS_ID, pad_id=PAD_ID, max_new_tokens=3, return_dict=True)
    out = runner.generate(tensors(PROMPTS), sampling_config=scfg, max_new_tokens=6)
    assert out["output_ids"].shape[-1] == max(map(len, PROMPTS)) + 6
    assert scfg.max_new_tokens == 3, "generate must not modify the caller's SamplingConfig"
    for b, p in enumerate(PROMPTS):
        assert generated(out["output_ids"], out["sequence_lengths"], b, 0, len(p)) == \
            hf_generate(hf, p, max_new_tokens=6)


def test_end_id_stops_a_row_and_the_rest_continue(runner, hf):
    base = [hf_generate(hf, p, eos=-1) for p in PROMPTS]
    end_id = base[0][3]  # a token the model produces greedily at step 3 of row 0
    cut = base[0].index(end_id)
    out = greedy(runner, PROMPTS, end_id=end_id)
    check_layout(out, PROMPTS, MAX_NEW, end_id)
    got0 = generated(out["output_ids"], out["sequence_lengths"], 0, 0, len(PROMPTS[0]))
    assert got0 == base[0][:cut + 1] and got0[-1] == end_id
    for b, p in enumerate(PROMPTS):
        assert generated(out["output_ids"], out["sequence_lengths"], b, 0, len(p)) == \
            hf_generate(hf, p, eos=end_id)


def test_ignore_eos_generates_max_new_tokens(runner, hf):
    base = hf_generate(hf, PROMPTS[0], eos=-1)
    end_id = base[1]
    out = greedy(runner, PROMPTS[:1], end_id=end_id, ignore_eos=True)
    got = generated(out["output_ids"], out["sequence_lengths"], 0, 0, len(PROMPTS[0]))
    assert len(got) == MAX_NEW and end_id not in got


# ------------------------------------------------------------------------------------------ beams
@torch.no_grad()
def hf_beams(model, prompt, *, num_beams, end_id, length_penalty, early_stopping, num_return_sequences):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=num_beams,
                         length_penalty=length_penalty, early_stopping=early_stopping,
                         max_new_tokens=MAX_NEW, num_return_sequences=num_return_sequences,
                         eos_token_id=end_id, pad_token_id=PAD_ID, output_scores=True,
                         return_dict_in_generate=True)
    lengths = (out.beam_indices >= 0).sum(dim=1)                                   # (R,)
    gens = [out.sequences[r, len(prompt):len(prompt) + int(n)].tolist() for r, n in enumerate(lengths)]
    token_lp = model.compute_transition_scores(out.sequences, out.scores, out.beam_indices)  # (R, L)
    return gens, out.sequences_scores, token_lp


@pytest.fixture(scope="module")
def beam_end_id(hf) -> int:
    """An end token the beams actually produce, so hypotheses finish at different steps."""
    return hf_generate(hf, PROMPTS[0], eos=-1)[2]


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping,num_return", [
    (2, 1.0, 1, 2),
    (2, 0.6, 0, 1),
    (4, 1.4, 1, 3),
    (4, 0.7, 2, 4),
    (4, 1.0, 0, 2),
])
def test_beam_search_equals_hf(runner, hf, beam_end_id, num_beams, length_penalty, early_stopping, num_return):
    prompts = PROMPTS[:2]
    out = runner.generate(tensors(prompts), max_new_tokens=MAX_NEW, end_id=beam_end_id, pad_id=PAD_ID,
                          num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                          num_return_sequences=num_return, return_dict=True, output_cum_log_probs=True,
                          output_log_probs=True)
    check_layout(out, prompts, MAX_NEW, beam_end_id, beams=num_return)
    hf_stop = {0: False, 1: True, 2: "never"}[early_stopping]
    for b, p in enumerate(prompts):
        gens, scores, token_lp = hf_beams(hf, p, num_beams=num_beams, end_id=beam_end_id,
                                          length_penalty=length_penalty, early_stopping=hf_stop,
                                          num_return_sequences=num_return)
        for r in range(num_return):
            got = generated(out["output_ids"], out["sequence_lengths"], b, r, len(p))
            assert got == gens[r], (b, r)
            n = len(got)
            cum = float(out["cum_log_probs"][b, r])
            assert cum / n ** length_penalty == pytest.approx(float(scores[r]), abs=1e-4), (b, r)
            torch.testing.assert_close(out["log_probs"][b, r, :n], token_lp[r, :n].float(),
                                       atol=1e-4, rtol=1e-4)
            assert cum == pytest.approx(float(out["log_probs"][b, r, :n].sum()), abs=1e-4)


def test_beam_search_across_kv_block_boundaries_equals_hf(runner, hf):
    """Prompts of exactly one block (16) and one short of it, 20 new tokens: beams fork, copy and
    reorder partial and full blocks."""
    prompts = ([1] + list(range(300, 315)), [1] + list(range(200, 214)))
    out = runner.generate(tensors(prompts), max_new_tokens=20, end_id=-1, pad_id=PAD_ID, num_beams=4,
                          num_return_sequences=4, early_stopping=2, return_dict=True)
    for b, p in enumerate(prompts):
        ids = torch.tensor([p])
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=4,
                           num_return_sequences=4, max_new_tokens=20, eos_token_id=None, pad_token_id=PAD_ID,
                           early_stopping="never")
        assert out["output_ids"][b, :, :len(p) + 20].tolist() == want.tolist()


def test_beam_search_on_another_family(runner_for, hf_for):
    """qwen2 has qkv bias and untied embeddings: a second network under the same search."""
    model = hf_for("qwen2")
    end_id = hf_generate(model, PROMPTS[2], eos=-1)[1]
    out = runner_for("qwen2").generate(tensors(PROMPTS), max_new_tokens=MAX_NEW, end_id=end_id, pad_id=PAD_ID,
                                       num_beams=3, num_return_sequences=2, length_penalty=1.2,
                                       return_dict=True)
    for b, p in enumerate(PROMPTS):
        gens, _, _ = hf_beams(model, p, num_beams=3, end_id=end_id, length_penalty=1.2,
                              early_stopping=True, num_return_sequences=2)
        assert [generated(out["output_ids"], out["sequence_lengths"], b, r, len(p)) for r in range(2)] == gens


@pytest.mark.parametrize("kwargs,hf_kwargs", [
    ({"repetition_penalty": 2.5}, {"repetition_penalty": 2.5}),
    ({"no_repeat_ngram_size": 1}, {"no_repeat_ngram_size": 1}),
    ({"min_length": 7}, {"min_new_tokens": 7}),
    ("bad", "bad"),
])
def test_beam_search_applies_penalties_and_bans_as_hf(runner, hf, beam_end_id, kwargs, hf_kwargs):
    """HF's beam search runs its processors on the log-softmax; so must ours."""
    if kwargs == "bad":
        first = hf_beams(hf, PROMPTS[0], num_beams=3, end_id=beam_end_id, length_penalty=1.0,
                         early_stopping=True, num_return_sequences=1)[0][0]
        bad = [[first[0]], first[1:3]]
        kwargs, hf_kwargs = {"bad_words_list": bad}, {"bad_words_ids": bad}
    prompts = PROMPTS[:2]
    out = runner.generate(tensors(prompts), max_new_tokens=MAX_NEW, end_id=beam_end_id, pad_id=PAD_ID,
                          num_beams=3, num_return_sequences=2, return_dict=True, **kwargs)
    plain = runner.generate(tensors(prompts), max_new_tokens=MAX_NEW, end_id=beam_end_id, pad_id=PAD_ID,
                            num_beams=3, num_return_sequences=2)
    assert not torch.equal(out["output_ids"], plain), f"{kwargs} changed nothing"
    for b, p in enumerate(prompts):
        ids = torch.tensor([p])
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=3,
                           num_return_sequences=2, max_new_tokens=MAX_NEW, eos_token_id=beam_end_id,
                           pad_token_id=PAD_ID, early_stopping=True, **hf_kwargs)
        for r in range(2):
            got = generated(out["output_ids"], out["sequence_lengths"], b, r, len(p))
            ref = want[r, len(p):].tolist()
            ref = ref[:ref.index(beam_end_id) + 1] if beam_end_id in ref else ref
            assert got == ref, (kwargs, b, r)


def test_beam_search_cuts_returned_beams_at_stop_words(runner, hf, beam_end_id):
    kw = {"max_new_tokens": MAX_NEW, "end_id": beam_end_id, "pad_id": PAD_ID, "num_beams": 2, "num_return_sequences": 2,
              "return_dict": True, "output_log_probs": True, "output_cum_log_probs": True}
    plain = runner.generate(tensors(PROMPTS[:2]), **kw)
    best = generated(plain["output_ids"], plain["sequence_lengths"], 1, 0, len(PROMPTS[1]))
    stop = best[3:5]
    out = runner.generate(tensors(PROMPTS[:2]), stop_words_list=[[], [stop]], **kw)
    check_layout(out, PROMPTS[:2], MAX_NEW, beam_end_id, beams=2)
    assert torch.equal(out["output_ids"][0], plain["output_ids"][0])
    got = generated(out["output_ids"], out["sequence_lengths"], 1, 0, len(PROMPTS[1]))
    assert got == best[:3]
    assert (out["log_probs"][1, 0, 3:] == 0).all()
    assert float(out["cum_log_probs"][1, 0]) == pytest.approx(float(plain["log_probs"][1, 0, :3].sum()), abs=1e-5)
    for r in range(2):
        g = generated(out["output_ids"], out["sequence_lengths"], 1, r, len(PROMPTS[1]))
        assert not any(g[i:i + 2] == stop for i in range(len(g) - 1))


def test_num_return_sequences_larger_than_num_beams_is_rejected(runner):
    with pytest.raises(ValueError, match="num_return_sequences"):
        runner.generate(tensors(PROMPTS[:1]), end_id=EOS_ID, pad_id=PAD_ID, num_beams=2, num_return_sequences=3)


# ------------------------------------------------------------------------------------------ log-probs and logits
def test_log_probs_and_logits_match_hf_forward(make_checkpoint, hf):
    r = ModelRunner.from_dir(make_checkpoint("llama"), device="cpu", gather_context_logits=True,
                             gather_generation_logits=True)
    assert r.gather_context_logits and r.gather_generation_logits
    out = r.generate(tensors(PROMPTS), max_new_tokens=MAX_NEW, end_id=-1, pad_id=PAD_ID, return_dict=True,
                     output_log_probs=True, output_cum_log_probs=True)
    B, P = len(PROMPTS), max(map(len, PROMPTS))
    assert out["context_logits"].shape == (B, P, r.vocab_size)
    assert out["generation_logits"].shape == (B, 1, MAX_NEW, r.vocab_size)
    assert out["log_probs"].shape == (B, 1, MAX_NEW)
    assert out["cum_log_probs"].shape == (B, 1)
    for b, p in enumerate(PROMPTS):
        n = int(out["sequence_lengths"][b, 0])
        assert n == len(p) + MAX_NEW
        full = out["output_ids"][b, 0, :n].tolist()
        ref = hf_logits(hf, full)                                                  # (n, V)
        torch.testing.assert_close(out["context_logits"][b, :len(p)], ref[:len(p)], atol=1e-4, rtol=1e-4)
        gen_ref = ref[len(p) - 1:n - 1]                                            # (MAX_NEW, V)
        torch.testing.assert_close(out["generation_logits"][b, 0], gen_ref, atol=1e-4, rtol=1e-4)
        want_lp = torch.log_softmax(gen_ref, -1).gather(1, torch.tensor(full[len(p):])[:, None])[:, 0]
        torch.testing.assert_close(out["log_probs"][b, 0], want_lp, atol=1e-4, rtol=1e-4)
        assert float(out["cum_log_probs"][b, 0]) == pytest.approx(float(want_lp.sum()), abs=1e-3)


def test_log_probs_stop_at_the_end_token(runner, hf):
    base = hf_generate(hf, PROMPTS[0], eos=-1)
    end_id = base[4]
    cut = base.index(end_id) + 1
    out = greedy(runner, PROMPTS[:1], end_id=end_id, output_log_probs=True, output_cum_log_probs=True)
    lp = out["log_probs"][0, 0]
    assert (lp[:cut] < 0).all() and (lp[cut:] == 0).all()
    assert float(out["cum_log_probs"][0, 0]) == pytest.approx(float(lp[:cut].sum()), abs=1e-5)


def test_log_probs_are_not_returned_unless_asked(runner):
    out = greedy(runner, PROMPTS[:1], max_new_tokens=2)
    assert set(out) == {"output_ids", "sequence_lengths"}


# ------------------------------------------------------------------------------------------ sampling
SAMPLE = {"top_k": 0, "top_p": 1.0, "temperature": 1.5}


def test_top_k_1_and_temperature_0_are_greedy(runner):
    want = greedy(runner, PROMPTS)["output_ids"]
    assert torch.equal(greedy(runner, PROMPTS, top_k=1, top_p=0.9, temperature=1.7)["output_ids"], want)
    assert torch.equal(greedy(runner, PROMPTS, temperature=0.0, top_k=50, top_p=0.9,
                              random_seed=5)["output_ids"], want)


def test_same_seed_same_output_and_independent_of_batch(runner):
    alone = greedy(runner, [PROMPTS[1]], random_seed=1234, **SAMPLE)["output_ids"]
    again = greedy(runner, [PROMPTS[1]], random_seed=1234, **SAMPLE)["output_ids"]
    assert torch.equal(alone, again)
    assert not torch.equal(alone, greedy(runner, [PROMPTS[1]])["output_ids"]), "sampling equals greedy"
    batch = greedy(runner, PROMPTS, random_seed=[7, 1234, 9], **SAMPLE)["output_ids"]
    assert torch.equal(batch[1, :, :alone.shape[-1]], alone[0])
    other_seed = greedy(runner, [PROMPTS[1]], random_seed=1235, **SAMPLE)["output_ids"]
    assert not torch.equal(other_seed, alone)


def test_no_seed_gives_different_samples_across_calls(runner):
    first = greedy(runner, PROMPTS, max_new_tokens=16, end_id=-1, **SAMPLE)["output_ids"]
    second = greedy(runner, PROMPTS, max_new_tokens=16, end_id=-1, **SAMPLE)["output_ids"]
    assert not torch.equal(first, second)


def test_num_return_sequences_samples_differ_and_are_reproducible(runner):
    kw = dict(num_return_sequences=3, random_seed=42, max_new_tokens=12, end_id=-1, **SAMPLE)
    out = greedy(runner, PROMPTS[:2], **kw)
    check_layout(out, PROMPTS[:2], 12, -1, beams=3)
    for b in range(2):
        rows = {tuple(out["output_ids"][b, i].tolist()) for i in range(3)}
        assert len(rows) == 3, f"prompt {b}: samples are not distinct"
    assert torch.equal(greedy(runner, PROMPTS[:2], **kw)["output_ids"], out["output_ids"])


def test_each_sample_equals_its_own_seed_alone_even_when_siblings_finish(runner):
    """Sample i of a prompt uses seed + i: it must equal a 1-sample run with that seed, also when
    other samples of the same prompt ended earlier (their KV rows then idle)."""
    kw = dict(max_new_tokens=12, **SAMPLE)
    probe = greedy(runner, [PROMPTS[2]], random_seed=100, end_id=-1, **kw)
    end_id = generated(probe["output_ids"], probe["sequence_lengths"], 0, 0, len(PROMPTS[2]))[2]
    out = greedy(runner, PROMPTS[1:], random_seed=[50, 100], num_return_sequences=3, end_id=end_id, **kw)
    lens = out["sequence_lengths"]
    assert int(lens[1, 0]) <= len(PROMPTS[2]) + 3 and int(lens.max()) > int(lens[1, 0]), lens
    for b, (p, seed) in enumerate(zip(PROMPTS[1:], (50, 100))):
        for i in range(3):
            alone = greedy(runner, [p], random_seed=seed + i, end_id=end_id, **kw)
            assert generated(out["output_ids"], lens, b, i, len(p)) == \
                generated(alone["output_ids"], alone["sequence_lengths"], 0, 0, len(p)), (b, i)


def test_top_k_keeps_samples_in_the_top_k(runner, hf):
    out = greedy(runner, PROMPTS[:1], top_k=3, temperature=2.0, random_seed=3, end_id=-1)
    p = PROMPTS[0]
    full = out["output_ids"][0, 0, :int(out["sequence_lengths"][0, 0])].tolist()
    ref = hf_logits(hf, full)
    for t in range(len(p), len(full)):
        top3 = ref[t - 1].topk(3).indices.tolist()
        assert full[t] in top3, f"step {t - len(p)}: token {full[t]} outside the top 3 {top3}"


def test_top_p_samples_stay_in_the_nucleus(runner, hf):
    top_p = 0.3
    out = greedy(runner, PROMPTS, top_k=0, top_p=top_p, temperature=1.0, random_seed=[1, 2, 3], end_id=-1,
                 max_new_tokens=12)
    sampled_outside_argmax = 0
    for b, p in enumerate(PROMPTS):
        full = out["output_ids"][b, 0, :int(out["sequence_lengths"][b, 0])].tolist()
        ref = hf_logits(hf, full)
        for t in range(len(p), len(full)):
            probs, idx = ref[t - 1].softmax(-1).sort(descending=True)
            exclusive = probs.cumsum(0) - probs
            nucleus = idx[exclusive < top_p].tolist()
            assert full[t] in nucleus, f"row {b} step {t - len(p)}: {full[t]} outside the nucleus {nucleus}"
            sampled_outside_argmax += full[t] != nucleus[0]
    assert sampled_outside_argmax > 0, "top_p sampling never left the argmax: the test proves nothing"


def test_repetition_penalty_equals_hf(runner, hf):
    plain = greedy(runner, PROMPTS, max_new_tokens=16, end_id=-1)["output_ids"]
    out = greedy(runner, PROMPTS, max_new_tokens=16, end_id=-1, repetition_penalty=1.8)
    assert not torch.equal(out["output_ids"], plain), "the penalty changed nothing"
    for b, p in enumerate(PROMPTS):
        assert generated(out["output_ids"], out["sequence_lengths"], b, 0, len(p)) == \
            hf_generate(hf, p, max_new_tokens=16, eos=-1, repetition_penalty=1.8)


def test_no_repeat_ngram_equals_hf(runner, hf):
    out = greedy(runner, PROMPTS, max_new_tokens=16, end_id=-1, no_repeat_ngram_size=2)
    for b, p in enumerate(PROMPTS):
        assert generated(out["output_ids"], out["sequence_lengths"], b, 0, len(p)) == \
            hf_generate(hf, p, max_new_tokens=16, eos=-1, no_repeat_ngram_size=2)


@torch.no_grad()
def manual_greedy_with_penalties(model, prompt, steps, presence, frequency) -> list[int]:
    """Oracle: HF forward + OpenAI-style presence/frequency penalties over generated tokens."""
    ids, out = list(prompt), []
    for _ in range(steps):
        logits = hf_logits(model, ids)[-1]
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).float()
        logits = logits - frequency * counts - presence * (counts > 0).float()
        tok = int(logits.argmax())
        ids.append(tok)
        out.append(tok)
    return out


@pytest.mark.parametrize("presence,frequency", [(1.5, 0.0), (0.0, 1.2), (-0.5, 0.7)])
def test_presence_and_frequency_penalties_follow_their_definition(runner, hf, presence, frequency):
    steps = 16
    out = greedy(runner, PROMPTS[:2], max_new_tokens=steps, end_id=-1, presence_penalty=presence,
                 frequency_penalty=frequency)
    for b, p in enumerate(PROMPTS[:2]):
        assert generated(out["output_ids"], out["sequence_lengths"], b, 0, len(p)) == \
            manual_greedy_with_penalties(hf, p, steps, presence, frequency)


def test_penalties_change_the_chosen_token_on_a_constructed_case(runner, hf):
    """A repeated greedy token is banned by a large presence penalty at the step it would repeat."""
    base = hf_generate(hf, PROMPTS[1], max_new_tokens=16, eos=-1)
    repeats = [i for i, t in enumerate(base) if t in base[:i]]
    assert repeats, f"the tiny model never repeats a token in {base}; pick another prompt"
    first = repeats[0]
    out = greedy(runner, [PROMPTS[1]], max_new_tokens=16, end_id=-1, presence_penalty=2.0)
    got = generated(out["output_ids"], out["sequence_lengths"], 0, 0, len(PROMPTS[1]))
    assert got[:first] == base[:first]
    assert got[first] != base[first]


# ------------------------------------------------------------------------------------------ words and lengths
def test_bad_words_are_never_produced_and_equal_hf(runner, hf):
    base = [hf_generate(hf, p, eos=-1) for p in PROMPTS]
    single = base[0][1]
    multi = base[1][2:4]  # a two-token word: its last token is banned only after its first
    bad = [[single], multi]
    out = greedy(runner, PROMPTS, end_id=-1, bad_words_list=bad)
    for b, p in enumerate(PROMPTS):
        got = generated(out["output_ids"], out["sequence_lengths"], b, 0, len(p))
        assert single not in got
        assert not any(got[i:i + 2] == multi for i in range(len(got) - 1))
        assert got == hf_generate(hf, p, eos=-1, bad_words_ids=bad)


def test_stop_words_end_the_row_and_are_removed(runner, hf):
    base = [hf_generate(hf, p, eos=-1) for p in PROMPTS]
    stop = base[0][4:6]  # two tokens; they must not occur earlier in the row
    assert not any(base[0][i:i + 2] == stop for i in range(4)), "pick a stop word that occurs once"
    out = greedy(runner, PROMPTS, end_id=EOS_ID, stop_words_list=[[stop], [], [[999 % 400, 5]]])
    check_layout(out, PROMPTS, MAX_NEW, EOS_ID)
    assert generated(out["output_ids"], out["sequence_lengths"], 0, 0, len(PROMPTS[0])) == base[0][:4]
    assert int(out["sequence_lengths"][0, 0]) == len(PROMPTS[0]) + 4
    for b in (1, 2):  # other rows' stop words never match: full length
        assert generated(out["output_ids"], out["sequence_lengths"], b, 0, len(PROMPTS[b])) == \
            hf_generate(hf, PROMPTS[b])


def test_stop_words_in_trt_llm_array_format(runner, hf):
    from runtime_lib.stopping import ids_to_word_list_format

    base = hf_generate(hf, PROMPTS[2], eos=-1)
    stop = base[3:6]
    arr = ids_to_word_list_format([[stop, [7, 8]]])  # [1, 2, L]: applies to every row
    assert arr.shape[:2] == (1, 2)
    out = greedy(runner, [PROMPTS[2]], end_id=-1, stop_words_list=arr)
    assert generated(out["output_ids"], out["sequence_lengths"], 0, 0, len(PROMPTS[2])) == base[:3]


def test_min_length_bans_the_end_token_and_equals_hf(runner, hf):
    base = hf_generate(hf, PROMPTS[0], eos=-1)
    end_id = base[1]
    short = greedy(runner, PROMPTS[:1], end_id=end_id)
    assert int(short["sequence_lengths"][0, 0]) == len(PROMPTS[0]) + base.index(end_id) + 1
    out = greedy(runner, PROMPTS, end_id=end_id, min_length=6)
    for b, p in enumerate(PROMPTS):
        got = generated(out["output_ids"], out["sequence_lengths"], b, 0, len(p))
        assert end_id not in got[:6]
        assert got == hf_generate(hf, p, eos=end_id, min_new_tokens=6)


# ------------------------------------------------------------------------------------------ user hooks
class StopAfter(StoppingCriteria):
    def __init__(self, num_steps: int) -> None:
        self.num_steps = num_steps
        self.calls: list[tuple[int, tuple[int, ...], tuple[int, ...]]] = []

    def __call__(self, step, input_ids, scores):
        self.calls.append((step, tuple(input_ids.shape), tuple(scores.shape)))
        return step + 1 >= self.num_steps


class ForceToken(LogitsProcessor):
    """Forces `token` at every step in `steps` for every row."""

    def __init__(self, token: int, steps: set[int]) -> None:
        self.token, self.steps = token, steps

    def __call__(self, step, input_ids, scores):
        if step in self.steps:
            scores[:] = -math.inf
            scores[:, self.token] = 0.0
        return scores


def test_custom_stopping_criteria_stops_early(runner, hf):
    crit = StopAfter(3)
    out = greedy(runner, PROMPTS, stopping_criteria=crit)
    assert [c[0] for c in crit.calls] == [0, 1, 2]
    assert crit.calls[0][1][0] == len(PROMPTS) and crit.calls[0][2] == (len(PROMPTS), runner.vocab_size)
    for b, p in enumerate(PROMPTS):
        assert generated(out["output_ids"], out["sequence_lengths"], b, 0, len(p)) == hf_generate(hf, p)[:3]


def test_stopping_criteria_list_any_stops(runner):
    out = greedy(runner, PROMPTS[:1], stopping_criteria=StoppingCriteriaList([StopAfter(50), StopAfter(2)]))
    assert int(out["sequence_lengths"][0, 0]) == len(PROMPTS[0]) + 2


def test_custom_logits_processor_forces_tokens(runner, hf):
    forced = 123
    out = greedy(runner, PROMPTS, end_id=-1, logits_processor=LogitsProcessorList([ForceToken(forced, {0, 3})]))
    for b, p in enumerate(PROMPTS):
        got = generated(out["output_ids"], out["sequence_lengths"], b, 0, len(p))
        assert got[0] == forced and got[3] == forced
        # the rest is greedy given the forced history
        ids = list(p)
        for t in range(len(got)):
            if t not in (0, 3):
                assert got[t] == int(hf_logits(hf, ids)[-1].argmax()), (b, t)
            ids.append(got[t])


def test_logits_processor_sees_the_token_history(runner):
    seen: list[torch.Tensor] = []

    class Record(LogitsProcessor):
        def __call__(self, step, input_ids, scores):
            seen.append(input_ids.clone())
            return scores

    out = greedy(runner, PROMPTS[:2], max_new_tokens=3, end_id=-1, logits_processor=Record())
    assert len(seen) == 3
    for step, ids in enumerate(seen):
        for b, p in enumerate(PROMPTS[:2]):
            n = len(p) + step
            assert ids[b, :n].tolist() == out["output_ids"][b, 0, :n].tolist()


# ------------------------------------------------------------------------------------------ streaming
@pytest.mark.parametrize("kwargs", [
    {},
    {"num_beams": 2, "num_return_sequences": 2},
    dict(num_return_sequences=2, random_seed=11, **SAMPLE),
])
def test_streaming_extends_and_ends_at_the_regular_result(runner, kwargs):
    regular = greedy(runner, PROMPTS, output_log_probs=True, **kwargs)
    chunks = list(runner.generate(tensors(PROMPTS), max_new_tokens=MAX_NEW, end_id=EOS_ID, pad_id=PAD_ID,
                                  return_dict=True, output_log_probs=True, streaming=True, **kwargs))
    assert len(chunks) >= 2
    beams = "num_beams" in kwargs
    assert all(c["output_ids"].shape == regular["output_ids"].shape for c in chunks)
    for prev, c in itertools.pairwise(chunks):
        if beams:  # beams may be replaced by better ones; samples only grow
            continue
        assert (c["sequence_lengths"] >= prev["sequence_lengths"]).all()
        for b in range(len(PROMPTS)):
            for w in range(c["sequence_lengths"].shape[1]):
                n = int(prev["sequence_lengths"][b, w])
                assert torch.equal(c["output_ids"][b, w, :n], prev["output_ids"][b, w, :n])
    assert torch.equal(chunks[-1]["output_ids"], regular["output_ids"])
    assert torch.equal(chunks[-1]["sequence_lengths"], regular["sequence_lengths"])
    torch.testing.assert_close(chunks[-1]["log_probs"], regular["log_probs"])


def test_streaming_yields_once_per_step(runner):
    chunks = list(runner.generate(tensors(PROMPTS[:1]), max_new_tokens=5, end_id=-1, pad_id=PAD_ID,
                                  streaming=True, output_sequence_lengths=True))
    assert [int(c["sequence_lengths"][0, 0]) - len(PROMPTS[0]) for c in chunks] == [1, 2, 3, 4, 5]


def test_streaming_holds_back_nothing_after_a_stop_word(runner, hf):
    base = hf_generate(hf, PROMPTS[0], eos=-1)
    stop = base[4:6]
    chunks = list(runner.generate(tensors(PROMPTS[:1]), max_new_tokens=MAX_NEW, end_id=EOS_ID, pad_id=PAD_ID,
                                  stop_words_list=[[stop]], streaming=True, output_sequence_lengths=True))
    final = chunks[-1]
    assert generated(final["output_ids"], final["sequence_lengths"], 0, 0, len(PROMPTS[0])) == base[:4]


# ------------------------------------------------------------------------------------------ session API
def test_generation_session_decode_with_padded_and_packed_inputs(runner, hf):
    sess = runner.session
    lengths = torch.tensor([len(p) for p in PROMPTS], dtype=torch.int32)
    padded = torch.full((len(PROMPTS), int(lengths.max())), PAD_ID)
    for b, p in enumerate(PROMPTS):
        padded[b, :len(p)] = torch.tensor(p)
    packed = torch.tensor([t for p in PROMPTS for t in p])
    scfg = SamplingConfig(end_id=EOS_ID, pad_id=PAD_ID, max_new_tokens=MAX_NEW)
    results = []
    for ids in (padded, packed, packed[None]):
        sess.setup(len(PROMPTS), int(lengths.max()), MAX_NEW)
        results.append(sess.decode(ids, lengths, scfg, output_sequence_lengths=True))
    for r in results[1:]:
        assert torch.equal(r["output_ids"], results[0]["output_ids"])
    for b, p in enumerate(PROMPTS):
        assert generated(results[0]["output_ids"], results[0]["sequence_lengths"], b, 0, len(p)) == \
            hf_generate(hf, p)


def test_generation_session_checks_decode_against_setup(runner):
    sess = runner.session
    sess.setup(2, 5, 4)
    scfg = SamplingConfig(end_id=EOS_ID, pad_id=PAD_ID, max_new_tokens=4)
    with pytest.raises(ValueError, match="batch_size=2"):
        sess.decode(torch.tensor([1, 2, 3]), torch.tensor([3]), scfg)
    with pytest.raises(ValueError, match="max_context_length"):
        sess.decode(torch.tensor([1] * 9), torch.tensor([3, 6]), scfg)
    with pytest.raises(ValueError, match="context_lengths"):
        sess.decode(torch.tensor([1, 2, 3]), torch.tensor([3, 0]), scfg)
    with pytest.raises(ValueError, match="max_batch_size"):
        sess.setup(runner.max_batch_size + 1, 5, 4)


def test_interleaved_streams_on_one_session_fail_loudly(runner):
    """Two streams of one session would share its KV pool: the second must refuse, not corrupt."""
    kw = {"max_new_tokens": 4, "end_id": -1, "pad_id": PAD_ID, "streaming": True, "output_sequence_lengths": True}
    first = runner.generate(tensors(PROMPTS[:1]), **kw)
    next(first)
    with pytest.raises(RuntimeError, match="still running"):
        runner.generate(tensors(PROMPTS[1:]), **kw)
    rest = list(first)
    assert int(rest[-1]["sequence_lengths"][0, 0]) == len(PROMPTS[0]) + 4
    runner.generate(tensors(PROMPTS[1:]), **{**kw, "streaming": False})  # idle again


def test_a_stream_created_before_another_setup_keeps_its_own_shapes(runner, hf):
    """Streams are lazy; a later generate() for another batch must not change an earlier one."""
    kw = {"end_id": EOS_ID, "pad_id": PAD_ID, "streaming": True, "output_sequence_lengths": True}
    first = runner.generate(tensors(PROMPTS), max_new_tokens=MAX_NEW, **kw)
    second = runner.generate(tensors(PROMPTS[:1]), max_new_tokens=2, **kw)
    a, b = list(first)[-1], list(second)[-1]
    assert a["output_ids"].shape == (3, 1, len(PROMPTS[1]) + MAX_NEW)
    for i, p in enumerate(PROMPTS):
        assert generated(a["output_ids"], a["sequence_lengths"], i, 0, len(p)) == hf_generate(hf, p)
    assert generated(b["output_ids"], b["sequence_lengths"], 0, 0, len(PROMPTS[0])) == \
        hf_generate(hf, PROMPTS[0], max_new_tokens=2)


class NeverStop(StoppingCriteria):
    def __call__(self, step, input_ids, scores):
        return False


@pytest.mark.parametrize("kw", [
    dict(),                                                                         # greedy, end_id ends rows
    dict(temperature=0.8, top_k=20, random_seed=5, num_return_sequences=2),        # sampling, W > 1
    dict(stop_words_list=[[250, 260]], output_log_probs=True),                     # stop words, log-probs
])
def test_queueing_the_next_step_before_reading_tokens_changes_no_output(make_checkpoint, kw):
    """Without processors or criteria the loop queues step t+1 on step t's device tokens before
    it reads them; a criterion that never stops makes every step wait instead. Ids and lengths
    are the same either way, log-probs and generation logits (zeros past a row's end) too, up to
    float rounding: a row that just ended runs one more step with the others, and a forward over
    another number of rows may round differently."""
    runner = ModelRunner.from_dir(make_checkpoint("llama"), device="cpu", gather_generation_logits=True)
    prompts = [torch.tensor(p) for p in PROMPTS]
    # A token the tiny model emits early ends some rows mid-run: an end_id hit must not leak.
    first = runner.generate(prompts, max_new_tokens=MAX_NEW, end_id=-1, pad_id=PAD_ID)[:, 0]
    end_id = int(first[0, len(PROMPTS[0]) + 2])
    args = dict(max_new_tokens=MAX_NEW, end_id=end_id, pad_id=PAD_ID, return_dict=True,
                output_sequence_lengths=True, **kw)
    ahead = runner.generate(prompts, **args)
    waiting = runner.generate(prompts, stopping_criteria=NeverStop(), **args)
    assert set(ahead) == set(waiting)
    for key in ahead:
        if isinstance(ahead[key], torch.Tensor) and ahead[key].is_floating_point():
            torch.testing.assert_close(ahead[key], waiting[key], rtol=1e-5, atol=1e-5, msg=key)
            assert torch.equal(ahead[key] == 0, waiting[key] == 0), key
        elif isinstance(ahead[key], torch.Tensor):
            assert torch.equal(ahead[key], waiting[key]), key
    assert (ahead["sequence_lengths"] < max(map(len, PROMPTS)) + MAX_NEW).any()  # some row ended early
