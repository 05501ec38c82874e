"""runtime_lib.sampling: per-row batched sampling with TRT-LLM semantics, checked on constructed
logits (no model). HF's logits processors are the oracle for penalty and filter masks; many
seeded draws in one call (steps 0..N-1) give empirical distributions."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from runtime_lib.config import SamplingConfig
from runtime_lib.sampling import SamplingParams, SamplingTensors, sample
from runtime_lib.sampling_ops import (
    TokenHistory,
    apply_no_repeat_ngram,
    token_counts,
    top_k_top_p_min_p_mask,
    uniform_noise,
)

END = 2


def draws(logits_row: torch.Tensor, params: SamplingParams, n: int, **kw) -> torch.Tensor:
    """n draws for one row: the same params and logits in n rows, steps 0..n-1 (fresh noise)."""
    st = SamplingTensors.build([params] * n)
    return sample(logits_row.expand(n, -1).clone(), st, steps=torch.arange(n), **kw).token_ids


def probs_logits(probs: list[float], vocab: int = 32) -> torch.Tensor:
    """Logits whose softmax puts `probs` on ids 0.. and spreads the rest evenly."""
    rest = (1.0 - sum(probs)) / (vocab - len(probs))
    return torch.tensor(probs + [rest] * (vocab - len(probs))).log()


# ----------------------------------------------------------------------------- greedy


def test_top_k_1_temperature_0_and_trt_default_are_all_argmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 100, generator=g)
    variants = [SamplingParams(top_k=1, temperature=1.0, seed=5),
                SamplingParams(top_k=0, top_p=0.9, temperature=0.0, seed=6),
                SamplingParams(top_k=0, top_p=0.0, temperature=0.7),  # TRT-LLM: k=0 and p=0 -> greedy
                SamplingParams(top_k=40, top_p=0.5, temperature=0.0)]
    for p in variants:
        assert p.is_greedy
        st = SamplingTensors.build([p] * 16)
        for step in range(3):
            out = sample(logits, st, steps=[step] * 16).token_ids
            assert torch.equal(out, logits.argmax(-1))


def test_default_params_are_greedy_like_trt_llm():
    assert SamplingParams().is_greedy
    assert not SamplingParams(top_k=0, top_p=1.0).is_greedy


# ----------------------------------------------------------------------------- filters


def test_top_k_only_ever_samples_the_k_largest_and_reaches_all_of_them():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(200, generator=g)
    k = 7
    allowed = set(logits.topk(k).indices.tolist())
    got = draws(logits, SamplingParams(top_k=k, temperature=1.5, seed=11), 3000)
    assert set(got.tolist()) == allowed


def test_top_k_larger_than_fast_path_and_vocab_is_clamped():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(2))
    got = draws(logits, SamplingParams(top_k=5000, temperature=3.0, seed=1), 2000)
    assert len(set(got.tolist())) > 40  # effectively no top-k


@pytest.mark.parametrize("top_p, nucleus", [(0.75, {0, 1}), (0.85, {0, 1, 2}), (0.3, {0})])
def test_top_p_keeps_exactly_the_nucleus(top_p, nucleus):
    # probs 0.5, 0.3, 0.15, then 0.05 spread over 29 tokens: exclusive mass 0, .5, .8, .95, ...
    logits = probs_logits([0.5, 0.3, 0.15])
    got = draws(logits, SamplingParams(top_k=0, top_p=top_p, seed=3), 3000)
    assert set(got.tolist()) == nucleus


def test_top_p_is_applied_after_top_k_renormalises():
    # top_k=2 leaves 0.5/0.3 -> 0.625/0.375; top_p=0.6 keeps only the first
    logits = probs_logits([0.5, 0.3, 0.15])
    got = draws(logits, SamplingParams(top_k=2, top_p=0.6, seed=3), 500)
    assert set(got.tolist()) == {0}


def test_min_p_keeps_tokens_with_at_least_min_p_times_the_top_probability():
    logits = probs_logits([0.5, 0.3, 0.15, 0.04])  # threshold 0.25 * 0.5 = 0.125
    got = draws(logits, SamplingParams(top_k=0, top_p=1.0, min_p=0.25, seed=4), 3000)
    assert set(got.tolist()) == {0, 1, 2}


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_frequencies_follow_softmax_of_scaled_logits(temperature):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 20000
    got = draws(logits, SamplingParams(top_k=0, top_p=1.0, temperature=temperature, seed=7), n)
    freq = torch.bincount(got, minlength=6).double() / n
    expected = torch.softmax(logits.double() / temperature, -1)
    # 5 sigma of a binomial proportion at n=20000 is <= 0.018
    assert torch.allclose(freq, expected, atol=0.018), (freq, expected)


def test_lower_temperature_sharpens_the_distribution():
    logits = torch.tensor([1.0, 0.0, -0.5, -1.0])
    top_share = {t: (draws(logits, SamplingParams(top_k=0, top_p=1.0, temperature=t, seed=8), 4000) == 0)
                 .double().mean().item() for t in (0.3, 1.0, 3.0)}
    assert top_share[0.3] > top_share[1.0] > top_share[3.0]


def hf_mask(logits, k, p, m):
    scores = logits.clone()
    for warper, on in ((TopKLogitsWarper(k) if k else None, k > 0),
                       (TopPLogitsWarper(p) if 0 < p < 1 else None, 0 < p < 1),
                       (MinPLogitsWarper(m) if m > 0 else None, m > 0)):
        if on:
            scores = warper(None, scores)
    return torch.isfinite(scores)


@pytest.mark.parametrize("k, p, m", [(5, 0.0, 0.0), (0, 0.7, 0.0), (0, 0.0, 0.1), (10, 0.9, 0.0),
                                     (20, 0.8, 0.05), (0, 0.95, 0.2), (3, 1.0, 0.0), (1, 0.5, 0.5)])
def test_filter_masks_equal_hf_warpers(k, p, m):
    g = torch.Generator().manual_seed(k * 100 + int(p * 10) + int(m * 100))
    logits = torch.randn(8, 64, generator=g) * 2
    ours = top_k_top_p_min_p_mask(logits, [k] * 8, [p] * 8, [m] * 8)
    assert torch.equal(ours, hf_mask(logits, k, p, m))


def test_sampled_tokens_stay_inside_the_hf_mask_for_mixed_rows():
    g = torch.Generator().manual_seed(9)
    rows = [(5, 0.0, 0.0), (0, 0.7, 0.0), (0, 1.0, 0.1), (10, 0.9, 0.05)]
    logits = torch.randn(len(rows), 64, generator=g) * 2
    masks = [hf_mask(logits[i:i + 1] / 0.8, *r)[0] for i, r in enumerate(rows)]
    st = SamplingTensors.build([SamplingParams(top_k=k, top_p=p, min_p=m, temperature=0.8, seed=i)
                                for i, (k, p, m) in enumerate(rows)])
    seen = [set() for _ in rows]
    for step in range(400):
        out = sample(logits, st, steps=[step] * len(rows)).token_ids
        for i, t in enumerate(out.tolist()):
            assert masks[i][t], f"row {i} sampled {t} outside its mask at step {step}"
            seen[i].add(t)
    for i in range(len(rows)):
        assert seen[i] == set(masks[i].nonzero().flatten().tolist())


# ----------------------------------------------------------------------------- penalties


def test_repetition_penalty_equals_hf_over_prompt_and_output():
    g = torch.Generator().manual_seed(10)
    logits = torch.randn(4, 40, generator=g) * 3
    ids = torch.randint(0, 40, (4, 12), generator=g)
    expected = RepetitionPenaltyLogitsProcessor(1.7)(ids, logits.clone())
    prompt, output = ids[:, :7].tolist(), ids[:, 7:].tolist()
    st = SamplingTensors.build([SamplingParams(repetition_penalty=1.7)] * 4)
    # greedy argmax of the penalised logits equals HF's argmax
    out = sample(logits, st, prompt_ids=prompt, output_ids=output).token_ids
    assert torch.equal(out, expected.argmax(-1))
    from runtime_lib.sampling_ops import apply_repetition_penalty
    hist = TokenHistory.build(prompt, output, 4, "cpu")
    ours = apply_repetition_penalty(logits, hist.token_ids, torch.full((4,), 1.7))
    assert torch.allclose(ours, expected)


def test_repetition_penalty_changes_the_greedy_choice():
    logits = torch.full((1, 10), -1.0)
    logits[0, 3], logits[0, 7] = 5.0, 4.0
    base = SamplingTensors.build([SamplingParams()])
    pen = SamplingTensors.build([SamplingParams(repetition_penalty=2.0)])
    assert sample(logits, base, prompt_ids=[[3]], output_ids=[[]]).token_ids.item() == 3
    # 5 / 2 = 2.5 < 4: token 3, seen in the prompt, loses to 7
    assert sample(logits, pen, prompt_ids=[[3]], output_ids=[[]]).token_ids.item() == 7


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = torch.zeros(1, 10)
    logits[0, 3], logits[0, 7] = 5.0, 4.0
    pres = SamplingTensors.build([SamplingParams(presence_penalty=1.5)])
    freq = SamplingTensors.build([SamplingParams(frequency_penalty=0.6)])
    # token 3 only in the prompt: not penalised
    assert sample(logits, pres, prompt_ids=[[3, 3, 3]], output_ids=[[]]).token_ids.item() == 3
    # once in the output: 5 - 1.5 = 3.5 < 4
    assert sample(logits, pres, prompt_ids=[[]], output_ids=[[3]]).token_ids.item() == 7
    # frequency scales with the count: once 4.4 > 4 keeps 3, twice 3.8 < 4 does not
    assert sample(logits, freq, output_ids=[[3]]).token_ids.item() == 3
    assert sample(logits, freq, output_ids=[[3, 3]]).token_ids.item() == 7


def test_token_counts_from_lists_and_padded_tensors_agree():
    lists = [[1, 2, 2, 5], [], [4, 4, 4]]
    padded = torch.tensor([[1, 2, 2, 5], [-1, -1, -1, -1], [4, 4, 4, -1]])
    a, b = token_counts(lists, 6), token_counts(padded, 6)
    assert torch.equal(a, b)
    assert a.dtype == torch.int32 and a[0].tolist() == [0, 1, 2, 0, 0, 1] and a[2, 4] == 3


def test_token_history_from_tensors_equals_from_lists():
    prompt = [[5, 6, 7], [8], []]
    output = [[1], [2, 3, 4], [9, 9]]
    pt = torch.tensor([[5, 6, 7], [8, -1, -1], [-1, -1, -1]])
    ot = torch.tensor([[1, -1, -1], [2, 3, 4], [9, 9, -1]])
    a = TokenHistory.build(prompt, output, 3, "cpu")
    b = TokenHistory.build(pt, ot, 3, "cpu")
    assert torch.equal(a.lengths, b.lengths) and torch.equal(a.prompt_lengths, b.prompt_lengths)
    L = a.token_ids.shape[1]
    assert torch.equal(a.token_ids, b.token_ids[:, :L]) and (b.token_ids[:, L:] == -1).all()


# ----------------------------------------------------------------------------- bans


def test_min_length_bans_end_id_until_enough_new_tokens():
    logits = torch.zeros(1, 8)
    logits[0, END] = 10.0
    st = SamplingTensors.build([SamplingParams(end_id=END, min_length=3)])
    assert [sample(logits, st, steps=[s]).token_ids.item() for s in range(5)] == [0, 0, 0, END, END]


def test_ignore_eos_bans_end_id_always_and_overrides_min_length():
    logits = torch.zeros(1, 8)
    logits[0, END] = 10.0
    st = SamplingTensors.build([SamplingParams(end_id=END, min_length=2, ignore_eos=True)])
    assert all(sample(logits, st, steps=[s]).token_ids.item() != END for s in range(5))


def test_multi_token_bad_word_bans_its_last_token_only_after_its_prefix():
    logits = torch.zeros(1, 12)
    logits[0, 6], logits[0, 9], logits[0, 4] = 10.0, 9.0, 8.0
    st = SamplingTensors.build([SamplingParams(bad_words=[[5, 6], [9]])])
    # 9 is always banned; 6 only right after 5 (even when the 5 is the prompt's last token)
    assert sample(logits, st, prompt_ids=[[1]], output_ids=[[2]]).token_ids.item() == 6
    assert sample(logits, st, prompt_ids=[[1]], output_ids=[[5]]).token_ids.item() == 4
    assert sample(logits, st, prompt_ids=[[5]], output_ids=[[]]).token_ids.item() == 4
    assert sample(logits, st, prompt_ids=[[5]], output_ids=[[1]]).token_ids.item() == 6


def test_bad_words_equal_hf_on_random_sequences():
    g = torch.Generator().manual_seed(12)
    bad = [[3], [1, 2], [4, 4, 5], [0, 1, 2, 6]]
    ids = torch.randint(0, 7, (32, 9), generator=g)
    ids[::4, -3:] = torch.tensor([0, 1, 2])  # make the long words' prefixes occur
    ids[1::4, -2:] = torch.tensor([4, 4])
    logits = torch.randn(32, 7, generator=g)
    expected = torch.isinf(NoBadWordsLogitsProcessor(bad)(ids, logits.clone()))
    st = SamplingTensors.build([SamplingParams(bad_words=bad)] * 32)
    # history split into prompt / output at different points must not matter
    from runtime_lib.sampling_ops import apply_bad_words
    for cut in (0, 4, 9):
        hist = TokenHistory.build(ids[:, :cut].tolist(), ids[:, cut:].tolist(), 32, "cpu")
        got = apply_bad_words(logits.clone(), st.bad_rows, st.bad_last, st.bad_prefix,
                              st.bad_prefix_len, hist)
        assert torch.equal(torch.isinf(got), expected)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram_equals_hf(n):
    g = torch.Generator().manual_seed(20 + n)
    ids = torch.randint(0, 6, (6, 25), generator=g)  # small vocab: n-grams repeat
    logits = torch.randn(6, 6, generator=g)
    expected = NoRepeatNGramLogitsProcessor(n)(ids, logits.clone())
    hist = TokenHistory.build(ids[:, :10].tolist(), ids[:, 10:].tolist(), 6, "cpu")
    got = apply_no_repeat_ngram(logits.clone(), hist, n, torch.arange(6))
    assert torch.equal(got, expected)


def test_no_repeat_ngram_on_rows_of_different_lengths_and_sizes_equals_hf_per_row():
    g = torch.Generator().manual_seed(30)
    seqs = [torch.randint(0, 5, (L,), generator=g).tolist() for L in (1, 2, 3, 7, 15, 30)]
    sizes = [2, 2, 3, 3, 2, 4]
    logits = torch.randn(6, 5, generator=g)
    st = SamplingTensors.build([SamplingParams(no_repeat_ngram_size=n) for n in sizes])
    hist = TokenHistory.build(seqs, None, 6, "cpu")
    got = logits.clone()
    for n, rows in st.ngram_groups:
        got = apply_no_repeat_ngram(got, hist, n, rows)
    for i, (s, n) in enumerate(zip(seqs, sizes)):
        expected = NoRepeatNGramLogitsProcessor(n)(torch.tensor([s]), logits[i:i + 1].clone())
        assert torch.equal(got[i:i + 1], expected), f"row {i} (len {len(s)}, n {n})"


# ----------------------------------------------------------------------------- seeded noise


def splitmix_reference(seed: int, step: int, ids: list[int]) -> list[float]:
    M = 2**64

    def mix(z: int) -> int:
        z %= M
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % M
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % M
        return z ^ (z >> 31)

    key = mix(seed ^ mix(step * 0x9E3779B97F4A7C15 + 0x2545F4914F6CDD1D))
    return [((mix(key + (i + 1) * 0x9E3779B97F4A7C15) >> 41) + 0.5) / 2**23 for i in ids]


def test_noise_is_bit_exact_splitmix64_in_int64_torch_ops():
    seeds = [0, 1, 2**63 - 1, 2**63, 2**64 - 1, 123456789]
    steps = [0, 1, 7, 2**31, 5, 99]
    ids = torch.tensor([[0, 1, 2, 399, 128_255, 2**20]] * len(seeds))
    got = uniform_noise(torch.tensor([s - 2**64 if s >= 2**63 else s for s in seeds]),
                        torch.tensor(steps), ids)
    for r, (s, t) in enumerate(zip(seeds, steps)):
        assert got[r].tolist() == splitmix_reference(s, t, ids[r].tolist())
    assert (got > 0).all() and (got < 1).all()


def target_rows(step: int) -> torch.Tensor:
    return torch.randn(64, generator=torch.Generator().manual_seed(1000 + step)) * 2


@pytest.mark.parametrize("target", [
    SamplingParams(top_k=0, top_p=0.9, temperature=0.8, seed=1234),
    SamplingParams(top_k=5, temperature=1.3, seed=2**64 - 1),
    SamplingParams(top_k=0, top_p=1.0, min_p=0.05, seed=77, repetition_penalty=1.2),
])
def test_seeded_row_is_independent_of_position_and_batch_composition(target):
    others = [SamplingParams(), SamplingParams(top_k=0, top_p=1.0, seed=1),
              SamplingParams(top_k=3, seed=2), SamplingParams(top_k=0, top_p=0.5, temperature=2.0)]
    alone = SamplingTensors.build([target])
    mixed = SamplingTensors.build(others[:3] + [target] + others[3:])
    g = torch.Generator().manual_seed(5)
    history: list[int] = []
    for step in range(60):
        noise = torch.randn(4, 64, generator=g)
        row = target_rows(step)
        batch = torch.cat([noise[:3], row[None], noise[3:]])
        a = sample(row[None], alone, prompt_ids=[[1, 2]], output_ids=[history]).token_ids.item()
        b = sample(batch, mixed, prompt_ids=[[1, 2]] * 5,
                   output_ids=[[7] * step, [], [3], history, [4, 4]]).token_ids[3].item()
        rerun = sample(row[None], alone, prompt_ids=[[1, 2]], output_ids=[history]).token_ids.item()
        assert a == b == rerun, f"step {step}"
        history.append(a)
    assert len(set(history)) > 5  # it really sampled


def test_top_k_candidate_path_and_full_sort_path_choose_the_same_token():
    # a top_k=5 row alone uses topk candidates; next to a top_k=0 row the batch is sorted
    p = SamplingParams(top_k=5, temperature=1.0, seed=42)
    alone = SamplingTensors.build([p])
    with_full = SamplingTensors.build([SamplingParams(top_k=0, top_p=1.0, seed=1), p])
    assert alone.use_topk_candidates and not with_full.use_topk_candidates
    for step in range(200):
        row = target_rows(step)
        a = sample(row[None], alone, steps=[step]).token_ids.item()
        b = sample(torch.stack([row, row]), with_full, steps=[0, step]).token_ids[1].item()
        assert a == b


def test_unseeded_rows_get_fresh_random_seeds():
    logits = torch.zeros(8, 1000)
    p = SamplingParams(top_k=0, top_p=1.0)
    a = sample(logits, SamplingTensors.build([p] * 8), steps=[0] * 8).token_ids
    b = sample(logits, SamplingTensors.build([p] * 8), steps=[0] * 8).token_ids
    assert not torch.equal(a, b)
    assert len(set(a.tolist())) > 1  # rows in one batch differ too


def test_different_steps_give_different_noise_for_the_same_seed():
    logits = torch.zeros(1, 1000)
    st = SamplingTensors.build([SamplingParams(top_k=0, top_p=1.0, seed=3)])
    assert len({sample(logits, st, steps=[s]).token_ids.item() for s in range(20)}) > 15


# ----------------------------------------------------------------------------- mixed batch, logprobs


def test_mixed_rows_each_follow_their_own_params():
    g = torch.Generator().manual_seed(40)
    logits = torch.randn(5, 50, generator=g) * 2
    params = [SamplingParams(),  # greedy
              SamplingParams(top_k=2, seed=1),
              SamplingParams(top_k=0, top_p=1.0, min_p=0.3, seed=2),
              SamplingParams(top_k=0, top_p=1.0, temperature=0.0, seed=3),  # greedy by temperature
              SamplingParams(top_k=0, top_p=1.0, temperature=5.0, seed=4)]
    st = SamplingTensors.build(params)
    seen = [set() for _ in params]
    for step in range(500):
        for i, t in enumerate(sample(logits, st, steps=[step] * 5).token_ids.tolist()):
            seen[i].add(t)
    argmax = logits.argmax(-1).tolist()
    assert seen[0] == {argmax[0]} and seen[3] == {argmax[3]}
    assert seen[1] == set(logits[1].topk(2).indices.tolist())
    probs = logits[2].softmax(-1)
    assert seen[2] == set((probs >= 0.3 * probs.max()).nonzero().flatten().tolist())
    assert len(seen[4]) > 25  # hot temperature roams the vocabulary


def test_logprobs_are_log_softmax_of_the_raw_logits_at_the_chosen_token():
    g = torch.Generator().manual_seed(50)
    logits = torch.randn(3, 30, generator=g)
    params = [SamplingParams(logprobs=True, repetition_penalty=3.0),
              SamplingParams(logprobs=True, top_k=4, temperature=0.5, seed=9),
              SamplingParams(logprobs=True, top_k=0, top_p=0.8, bad_words=[[int(logits[2].argmax())]], seed=1)]
    out = sample(logits, SamplingTensors.build(params), prompt_ids=[[1, 2, 3]] * 3, output_ids=[[4]] * 3)
    expected = torch.log_softmax(logits, -1).gather(1, out.token_ids[:, None]).squeeze(1)
    assert torch.allclose(out.logprobs, expected)
    assert sample(logits, SamplingTensors.build([SamplingParams()] * 3)).logprobs is None


def test_sample_accepts_half_precision_logits_and_leaves_them_untouched():
    logits = torch.randn(2, 20, generator=torch.Generator().manual_seed(51)).to(torch.bfloat16)
    before = logits.clone()
    st = SamplingTensors.build([SamplingParams(end_id=int(logits[0].argmax()), min_length=5),
                                SamplingParams(top_k=3, seed=1)])
    out = sample(logits, st, steps=[0, 0]).token_ids
    assert out.dtype == torch.int64 and out[0] != int(logits[0].argmax())
    assert torch.equal(logits, before)


# ----------------------------------------------------------------------------- config, validation


def test_from_config_expands_per_row_fields_and_word_lists():
    cfg = SamplingConfig(end_id=2, pad_id=3, temperature=[0.5, 1.0], top_k=[0, 4], top_p=0.9,
                         random_seed=[7, 8], repetition_penalty=1.1, min_length=[1, 3],
                         no_repeat_ngram_size=2, bad_words_list=[[[5, 6]], [[7]]],
                         stop_words_list=[[9, 10]], output_log_probs=True)
    rows = SamplingParams.list_from_config(cfg, 2)
    assert rows[0] == SamplingParams.from_config(cfg, 0, 2)
    assert [r.temperature for r in rows] == [0.5, 1.0] and [r.top_k for r in rows] == [0, 4]
    assert [r.seed for r in rows] == [7, 8] and [r.min_length for r in rows] == [1, 3]
    assert rows[0].bad_words == ((5, 6),) and rows[1].bad_words == ((7,),)
    assert rows[0].stop_words == rows[1].stop_words == ((9, 10),)
    assert rows[1].end_id == 2 and rows[1].no_repeat_ngram_size == 2 and rows[0].logprobs


def test_from_config_reads_trt_llm_word_list_arrays():
    import numpy as np

    arr = np.array([[[5, 6, 7], [2, 3, -1]], [[8, 0, 0], [1, -1, -1]]], dtype=np.int32)
    rows = SamplingParams.list_from_config(SamplingConfig(end_id=2, pad_id=3, bad_words_list=arr), 2)
    assert rows[0].bad_words == ((5, 6), (7,)) and rows[1].bad_words == ((8,),)


@pytest.mark.parametrize("field, value, allowed", [
    ("temperature", -0.1, "[0, inf)"), ("temperature", math.nan, "[0, inf)"), ("top_k", -1, "[0, inf)"),
    ("top_k", 2.5, "integer"), ("top_p", 1.5, "[0.0, 1.0]"), ("min_p", -0.1, "[0.0, 1.0]"),
    ("repetition_penalty", 0.0, "(0, inf)"), ("presence_penalty", 2.5, "[-2.0, 2.0]"),
    ("frequency_penalty", -3.0, "[-2.0, 2.0]"), ("min_length", -1, "[0, inf)"),
    ("no_repeat_ngram_size", -2, "[0, inf)"), ("seed", -1, "2**64"), ("seed", 2**64, "18446744073709551615"),
    ("end_id", -2, "[-1, inf)"), ("bad_words", [[]], "non-empty"), ("bad_words", [[1, -3]], ">= 0"),
])
def test_invalid_params_raise_value_error_naming_field_and_range(field, value, allowed):
    with pytest.raises(ValueError) as err:
        SamplingParams(**{field: value})
    msg = str(err.value)
    assert field in msg and (allowed in msg or "18446744073709551615" in msg)


def test_sample_validates_shapes_ids_and_required_inputs():
    st = SamplingTensors.build([SamplingParams(top_k=0, top_p=1.0, seed=1)] * 2)
    with pytest.raises(ValueError, match="batch_size=2"):
        sample(torch.zeros(3, 10), st, steps=[0, 0, 0])
    with pytest.raises(ValueError, match="steps"):
        sample(torch.zeros(2, 10), st)
    with pytest.raises(ValueError, match=r"steps must have shape \(2,\)"):
        sample(torch.zeros(2, 10), st, steps=[0])
    pen = SamplingTensors.build([SamplingParams(repetition_penalty=1.2)])
    with pytest.raises(ValueError, match="output_ids"):
        sample(torch.zeros(1, 10), pen)
    big = SamplingTensors.build([SamplingParams(end_id=50)])
    with pytest.raises(ValueError, match="vocab size 10"):
        sample(torch.zeros(1, 10), big, steps=[0])
    with pytest.raises(ValueError, match="params"):
        SamplingTensors.build([])
    with pytest.raises(ValueError, match="row"):
        SamplingParams.from_config(SamplingConfig(end_id=2, pad_id=3), 2, 2)
