"""BeamSearch equals Hugging Face's beam search: the HF model itself supplies the log-probs
(so only the search algorithm is under test), and `model.generate(num_beams=...)` is the oracle."""
from __future__ import annotations

import math

import pytest
import torch

from runtime_lib.beam_search import BeamSearch, EarlyStopping, validate_beam_search_params

PROMPTS = ([1, 50, 60, 70], [1, 80, 90, 100, 110, 120, 130])  # different lengths on purpose
PAD_ID = 3
MAX_NEW = 8
# The random tiny models rarely put a given token in their top beams, so the tests bias the end
# token's log-prob (HF's `sequence_bias` processor, applied after log_softmax as every processor
# in beam search) to make hypotheses finish on it at various steps.
END_BIAS = 2.0


@pytest.fixture(scope="module")
def hf_models(make_checkpoint):
    from transformers import AutoModelForCausalLM

    cache = {}

    def get(family: str):
        if family not in cache:
            model = AutoModelForCausalLM.from_pretrained(make_checkpoint(family)).eval()
            cache[family] = model
        return cache[family]

    return get


@torch.no_grad()
def hf_generate(model, prompt, *, num_beams, end_id, length_penalty=1.0, early_stopping=True,
                max_new_tokens=MAX_NEW, num_return_sequences=1, min_new_tokens=0, end_bias=0.0):
    ids = torch.tensor([prompt])
    bias = {"sequence_bias": {(end_id,): end_bias}} if end_bias else {}
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         num_beams=num_beams, length_penalty=length_penalty,
                         early_stopping=early_stopping, max_new_tokens=max_new_tokens,
                         num_return_sequences=num_return_sequences, eos_token_id=end_id,
                         pad_token_id=PAD_ID, min_new_tokens=min_new_tokens,
                         output_scores=True, return_dict_in_generate=True, **bias)
    gen = out.sequences[:, len(prompt):]                                  # (R, L)
    lengths = (out.beam_indices >= 0).sum(dim=1)                          # (R,)
    token_lp = model.compute_transition_scores(out.sequences, out.scores, out.beam_indices)
    return gen, lengths, out.sequences_scores, token_lp


@torch.no_grad()
def run_ours(model, prompts, *, num_beams, end_id, length_penalty=1.0, early_stopping=1,
             max_new_tokens=MAX_NEW, num_return_sequences=1, min_new_tokens=0,
             end_bias=0.0, compact_first_step=False):
    """Drive BeamSearch (batch = all prompts) with the HF model's log-probs, per prompt with its
    own KV cache reordered by `parent_beams`, the way a decode loop uses the API."""
    k = num_beams
    bs = BeamSearch(len(prompts), k, end_id=end_id, max_new_tokens=max_new_tokens,
                    length_penalty=length_penalty, early_stopping=early_stopping,
                    num_return_sequences=num_return_sequences, pad_id=PAD_ID)
    rows = 1 if compact_first_step else k
    caches, step_lp = [], []
    for p in prompts:
        out = model(torch.tensor([p]).repeat(rows, 1), use_cache=True)
        caches.append(out.past_key_values)
        step_lp.append(torch.log_softmax(out.logits[:, -1].float(), dim=-1))
    num_steps = 0
    while True:
        lp = torch.cat(step_lp)                                           # (B*rows, V)
        if end_id >= 0:  # the logits processors, applied after log_softmax as HF's beam search does
            lp[:, end_id] += end_bias
            if num_steps < min_new_tokens:
                lp[:, end_id] = -math.inf
        res = bs.step(lp)
        num_steps += 1
        if bs.is_done():
            return bs.finalize(), num_steps
        for b in range(len(prompts)):
            # parent_beams index the rows fed this step; prompt b fed rows [b*rows, (b+1)*rows)
            caches[b].reorder_cache(res.parent_beams[b * k:(b + 1) * k] - b * rows)
            out = model(res.next_tokens[b * k:(b + 1) * k, None], cache=caches[b], use_cache=True)
            step_lp[b] = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        rows = k


def assert_matches_hf(model, *, num_beams, end_id, length_penalty, early_stopping,
                      num_return_sequences, min_new_tokens=0, compact_first_step=False,
                      end_bias=END_BIAS):
    ours, _ = run_ours(model, PROMPTS, num_beams=num_beams, end_id=end_id, end_bias=end_bias,
                       length_penalty=length_penalty, early_stopping=early_stopping,
                       num_return_sequences=num_return_sequences, min_new_tokens=min_new_tokens,
                       compact_first_step=compact_first_step)
    hf_es = EarlyStopping.parse(early_stopping).to_hf()
    for b, prompt in enumerate(PROMPTS):
        gen, lengths, scores, token_lp = hf_generate(
            model, prompt, num_beams=num_beams, end_id=end_id, length_penalty=length_penalty,
            early_stopping=hf_es, num_return_sequences=num_return_sequences,
            min_new_tokens=min_new_tokens, end_bias=end_bias)
        ctx = f"prompt {b}"
        assert ours.sequence_lengths[b].tolist() == lengths.tolist(), ctx
        for r in range(num_return_sequences):
            n = int(lengths[r])
            assert ours.output_ids[b, r, :n].tolist() == gen[r, :n].tolist(), f"{ctx} beam {r}"
            assert (ours.output_ids[b, r, n:] == PAD_ID).all(), f"{ctx} beam {r} padding"
            torch.testing.assert_close(ours.log_probs[b, r, :n], token_lp[r, :n], atol=1e-4, rtol=0)
        torch.testing.assert_close(ours.sequences_scores[b], scores, atol=1e-4, rtol=0)
    # internal consistency: score = cum / len ** lp, cum = sum of token log-probs
    lens = ours.sequence_lengths.to(torch.float64)
    torch.testing.assert_close(ours.cum_log_probs.double(), ours.log_probs.double().sum(-1),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.sequences_scores.double(),
                               ours.cum_log_probs.double() / lens ** length_penalty, atol=1e-4, rtol=0)
    return ours


def pick_end_id(model) -> int:
    """A token the model really produces: the 4th token of its greedy continuation of PROMPTS[0]."""
    ids = torch.tensor([PROMPTS[0]])
    greedy = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                            max_new_tokens=4, min_new_tokens=4, pad_token_id=PAD_ID)
    return int(greedy[0, len(PROMPTS[0]) + 3])


@pytest.fixture(scope="module")
def produced_end_id(hf_models):
    return pick_end_id(hf_models("llama"))


@pytest.mark.parametrize("early_stopping", [1, 0, 2], ids=["es-true", "es-false", "es-never"])
@pytest.mark.parametrize("length_penalty", [0.5, 1.0, 1.7])
@pytest.mark.parametrize("num_beams", [2, 4])
def test_llama_beam_search_equals_hf(hf_models, produced_end_id, num_beams, length_penalty,
                                     early_stopping):
    assert_matches_hf(hf_models("llama"), num_beams=num_beams, end_id=produced_end_id,
                      length_penalty=length_penalty, early_stopping=early_stopping,
                      num_return_sequences=num_beams)


def test_end_id_actually_finishes_hypotheses_early(hf_models, produced_end_id):
    ours, _ = run_ours(hf_models("llama"), PROMPTS, num_beams=4, end_id=produced_end_id,
                       num_return_sequences=4, end_bias=END_BIAS)
    ended = ours.sequence_lengths < MAX_NEW
    assert ended.any()
    last = ours.output_ids.gather(2, (ours.sequence_lengths - 1).unsqueeze(-1)).squeeze(-1)
    assert (last[ended] == produced_end_id).all(), "a hypothesis shorter than the limit ends on end_id"


@pytest.mark.parametrize("early_stopping", [1, 0, 2], ids=["es-true", "es-false", "es-never"])
@pytest.mark.parametrize("num_beams,length_penalty", [(2, 0.5), (4, 1.7)])
def test_gpt2_beam_search_equals_hf(hf_models, num_beams, length_penalty, early_stopping):
    model = hf_models("gpt2")
    assert_matches_hf(model, num_beams=num_beams, end_id=pick_end_id(model),
                      length_penalty=length_penalty, early_stopping=early_stopping,
                      num_return_sequences=2)


@pytest.mark.parametrize("num_return_sequences", [1, 2])
def test_fewer_returned_sequences_are_the_best_ones_in_hf_order(hf_models, produced_end_id,
                                                                num_return_sequences):
    assert_matches_hf(hf_models("llama"), num_beams=4, end_id=produced_end_id, length_penalty=1.7,
                      early_stopping=0, num_return_sequences=num_return_sequences)


def test_min_new_tokens_masks_end_id_like_hf(hf_models, produced_end_id):
    ours = assert_matches_hf(hf_models("llama"), num_beams=4, end_id=produced_end_id,
                             length_penalty=1.0, early_stopping=1, num_return_sequences=4,
                             min_new_tokens=5)
    assert (ours.sequence_lengths >= 5).all()


def test_without_end_token_every_hypothesis_runs_to_max_new_tokens(hf_models):
    model = hf_models("llama")
    ours, num_steps = run_ours(model, PROMPTS, num_beams=2, end_id=-1, num_return_sequences=2,
                               length_penalty=0.5)
    assert num_steps == MAX_NEW
    assert (ours.sequence_lengths == MAX_NEW).all()
    for b, prompt in enumerate(PROMPTS):
        # token 2 (the model's eos) never appears in this tiny model's beams, so HF runs to the end too
        gen, lengths, scores, _ = hf_generate(model, prompt, num_beams=2, end_id=2,
                                              num_return_sequences=2, length_penalty=0.5)
        assert lengths.tolist() == [MAX_NEW, MAX_NEW]
        assert ours.output_ids[b].tolist() == gen.tolist()
        torch.testing.assert_close(ours.sequences_scores[b], scores, atol=1e-4, rtol=0)


def test_first_step_accepts_one_row_per_prompt(hf_models, produced_end_id):
    """Prefilling one row per prompt (parent_beams then index those B rows) gives HF's result."""
    assert_matches_hf(hf_models("llama"), num_beams=4, end_id=produced_end_id, length_penalty=1.0,
                      early_stopping=1, num_return_sequences=4, compact_first_step=True)


def test_parent_beams_index_the_rows_fed_to_the_step():
    bs = BeamSearch(2, 2, end_id=-1, max_new_tokens=4)
    first = torch.log_softmax(torch.randn(2, 16), dim=-1)                # (B, V): compact prefill
    out = bs.step(first)
    assert out.parent_beams.tolist() == [0, 0, 1, 1]
    # the two beams of each prompt continue with its two best tokens, best first
    assert out.next_tokens.view(2, 2).tolist() == first.topk(2).indices.tolist()
    torch.testing.assert_close(out.cum_log_probs.view(2, 2), first.topk(2).values)
    lp = torch.full((4, 16), -10.0)
    lp[1, 5] = -0.1   # beam 1 of prompt 0 extends best
    lp[1, 6] = -0.2
    lp[2, 7] = -0.1   # beam 0 of prompt 1
    lp[2, 8] = -0.3
    out = bs.step(lp)
    assert out.parent_beams.tolist() == [1, 1, 2, 2]
    assert out.next_tokens.tolist() == [5, 6, 7, 8]


def test_per_row_penalties_equal_separate_scalar_runs():
    torch.manual_seed(0)
    steps = [torch.log_softmax(torch.randn(6, 12) * 3, dim=-1) for _ in range(6)]

    def run(batch_rows, lp, es):
        bs = BeamSearch(len(batch_rows), 3, end_id=4, max_new_tokens=6, length_penalty=lp,
                        early_stopping=es, num_return_sequences=3)
        for s in steps:
            rows = torch.cat([s[3 * b:3 * b + 3] for b in batch_rows])
            bs.step(rows)
            if bs.is_done():
                break
        return bs.finalize()

    both = run([0, 1], [0.5, 2.0], [0, 2])
    for b, (lp, es) in enumerate([(0.5, 0), (2.0, 2)]):
        alone = run([b], lp, es)
        assert both.output_ids[b].tolist() == alone.output_ids[0].tolist()
        torch.testing.assert_close(both.sequences_scores[b], alone.sequences_scores[0])


def test_finalize_before_done_scores_running_beams_at_current_length():
    torch.manual_seed(1)
    bs = BeamSearch(1, 2, end_id=-1, max_new_tokens=10, length_penalty=2.0, num_return_sequences=2)
    for _ in range(3):
        bs.step(torch.log_softmax(torch.randn(2, 8), dim=-1))
    assert not bs.is_done()
    res = bs.finalize()
    assert res.sequence_lengths.tolist() == [[3, 3]]
    assert res.sequences_scores[0, 0] >= res.sequences_scores[0, 1]
    torch.testing.assert_close(res.sequences_scores, res.cum_log_probs / 3 ** 2.0)


def test_step_rejects_wrong_shapes_and_steps_past_the_limit():
    bs = BeamSearch(2, 2, end_id=-1, max_new_tokens=1)
    with pytest.raises(ValueError, match=r"log_probs must have shape \(4, vocab\) or \(2, vocab\)"):
        bs.step(torch.zeros(3, 8))
    bs.step(torch.log_softmax(torch.randn(4, 8), dim=-1))
    assert bs.is_done()
    with pytest.raises(RuntimeError, match="max_new_tokens=1"):
        bs.step(torch.zeros(4, 8))


@pytest.mark.parametrize("kwargs,field", [
    (dict(length_penalty=float("nan")), "length_penalty"),
    (dict(length_penalty="long"), "length_penalty"),
    (dict(length_penalty=[1.0, 2.0, 3.0]), "length_penalty has 3 values for a batch of 2"),
    (dict(early_stopping=-1), "early_stopping"),
    (dict(early_stopping="sometimes"), "early_stopping"),
    (dict(num_return_sequences=5), r"num_return_sequences must be an integer in \[1, num_beams=4\]"),
    (dict(num_beams=0), "num_beams"),
    (dict(max_new_tokens=0), "max_new_tokens"),
])
def test_validation_names_the_field(kwargs, field):
    args = dict(batch_size=2, num_beams=4, max_new_tokens=8, length_penalty=1.0, early_stopping=1,
                num_return_sequences=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        validate_beam_search_params(**args)


def test_early_stopping_accepts_trt_llm_ints_and_hf_values():
    assert [EarlyStopping.parse(v) for v in (0, 1, 2, 7, True, False, "never")] == [
        EarlyStopping.HEURISTIC, EarlyStopping.ON, EarlyStopping.NEVER, EarlyStopping.NEVER,
        EarlyStopping.ON, EarlyStopping.HEURISTIC, EarlyStopping.NEVER]
    lp, es = validate_beam_search_params(batch_size=2, num_beams=2, max_new_tokens=4,
                                         length_penalty=[0.5], early_stopping=[0, 3])
    assert lp == [0.5, 0.5] and es == [EarlyStopping.HEURISTIC, EarlyStopping.NEVER]
