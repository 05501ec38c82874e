"""LoRA slots (runtime_lib/lora.py `LoraSlots`): adapters resident in fixed-shape device buffers,
so steps with adapters replay the same graphs every step. Checked on CPU against the eager
`LoraBatch` path: per module, through the padded decode and prefill runners (the buffers a graph
replays, `use_cuda_graph=False`) and through the compiled forward (aot_eager)."""
from __future__ import annotations

import pytest
import torch

from runtime_lib.config import ModelConfig
from runtime_lib.cuda_graph import DecodeGraphRunner, make_compiled_decode_forward
from runtime_lib.lora import LoraBatch, LoraSlots, LoraSlotStep, load_hf_lora
from runtime_lib.model_step import StepRow, build_step_inputs
from runtime_lib.models import allocate_kv_cache, load_model
from runtime_lib.prefill_graph import PrefillGraphRunner
from runtime_lib.session import Session, TorchBackend

BLOCK_SIZE, NUM_BLOCKS = 4, 24
SCRATCH = NUM_BLOCKS - 1
PROMPTS = [[1, 17, 42, 99, 250, 7], [5, 6, 7, 8, 9, 10, 11], [300, 2, 44]]
TABLES = [[1 + i + 3 * j for j in range(6)] for i in range(3)]


@pytest.fixture(scope="module")
def setup(make_checkpoint, tmp_path_factory):
    """The tiny llama (fp32), its config, and adapters a (r 4, all projections), b (r 2, k and
    up only), c (r 3), big (r 16: above the slots' rank)."""
    from runtime_lib.demo import build_lora_adapter

    ckpt = make_checkpoint("llama")
    cfg = ModelConfig.from_dir(ckpt)
    root = tmp_path_factory.mktemp("slots")
    specs = {"a": dict(seed=1), "b": dict(seed=2, r=2, targets=("k_proj", "up_proj")), "c": dict(seed=3, r=3),
             "big": dict(seed=4, r=16, targets=("o_proj",))}
    adapters = {}
    for uid, kw in specs.items():
        build_lora_adapter(root / uid, ckpt, **kw)
        adapters[uid] = load_hf_lora(root / uid, cfg, uid, dtype=torch.float32)
    return ckpt, cfg, adapters


def test_a_slot_step_adds_what_the_eager_batch_adds_on_every_module(setup):
    _, cfg, ad = setup
    slots = LoraSlots(cfg, max_loras=2, max_rank=8, device="cpu", dtype=torch.float32)
    batch = LoraBatch.build([ad["a"], None, ad["b"], ad["a"]], [2, 1, 3, 1], "cpu")
    token_slots = slots.token_slots(batch)
    assert token_slots.tolist() == [0, 0, -1, 1, 1, 1, 0]
    step = LoraSlotStep(slots, token_slots)
    g = torch.Generator().manual_seed(0)
    for name, (a_all, b_all) in slots.weights.items():
        x, y = torch.randn(7, a_all.shape[1], generator=g), torch.randn(7, b_all.shape[0], generator=g)
        got, want = step.apply(name, x, y), batch.apply(name, x, y)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)
        assert torch.equal(got[2], y[2])  # the row without an adapter is untouched


def test_slots_go_least_recently_used_first_and_steps_that_do_not_fit_get_none(setup):
    _, cfg, ad = setup
    slots = LoraSlots(cfg, max_loras=2, max_rank=8, device="cpu", dtype=torch.float32)

    def slot_of(*adapters):
        out = slots.token_slots(LoraBatch([*adapters], [1] * len(adapters), "cpu"))
        return None if out is None else out.tolist()

    assert slot_of(ad["a"]) == [0]
    assert slot_of(ad["b"]) == [1]
    assert slot_of(ad["a"]) == [0]          # a is now the most recently used: b goes next
    assert slot_of(ad["c"]) == [1]
    assert slot_of(ad["b"], ad["c"]) == [0, 1]  # b evicts a, the least recently used not in this step
    assert slot_of(ad["a"], ad["b"], ad["c"]) is None            # more adapters than slots
    assert slot_of(ad["big"]) is None                            # rank 16 > max_rank 8
    # The reloaded slot holds b alone (c's wider rows were zeroed): b's update, exactly.
    x = torch.randn(1, cfg.hidden_size)
    name = "layers.0.self_attn.qkv_proj"
    y = torch.zeros(1, slots.weights[name][1].shape[0])
    got = LoraSlotStep(slots, torch.tensor([0])).apply(name, x, y)
    torch.testing.assert_close(got, LoraBatch([ad["b"]], [1], "cpu").apply(name, x, y))
    with pytest.raises(ValueError, match="max_loras and max_lora_rank must be >= 1"):
        LoraSlots(cfg, max_loras=0, max_rank=8, device="cpu")


def _prefilled(model, batch: LoraBatch) -> tuple[torch.Tensor, dict]:
    """A KV pool with the prompts prefilled eagerly through `batch`, and the next decode step."""
    kv = allocate_kv_cache(model.config, NUM_BLOCKS, BLOCK_SIZE)
    inputs = build_step_inputs([StepRow(p, 0, t) for p, t in zip(PROMPTS, TABLES)], BLOCK_SIZE, "cpu")
    meta = Session._metadata({**inputs, "kv_cache": kv})
    TorchBackend(model).forward(inputs["input_ids"], inputs["position_ids"], kv, meta, inputs["logits_indices"],
                                lora=batch)
    step = build_step_inputs([StepRow([t], len(p), tab) for t, p, tab in zip((3, 4, 5), PROMPTS, TABLES)],
                             BLOCK_SIZE, "cpu")
    return kv, step


@pytest.mark.parametrize("compiled", [False, True])
def test_decode_runner_with_slots_equals_the_eager_lora_step(setup, compiled):
    ckpt, cfg, ad = setup
    model = load_model(ckpt, dtype="float32")
    model.lora_slots = LoraSlots(cfg, max_loras=2, max_rank=8, device="cpu", dtype=torch.float32)
    rows = [ad["a"], None, ad["b"]]
    prompt_batch = LoraBatch(rows, [len(p) for p in PROMPTS], "cpu")
    kv, step = _prefilled(model, prompt_batch)
    decode_batch = LoraBatch(rows, [1, 1, 1], "cpu")
    want_kv = kv.clone()
    want = TorchBackend(model).forward(step["input_ids"], step["position_ids"], want_kv,
                                       Session._metadata({**step, "kv_cache": want_kv}), step["logits_indices"],
                                       lora=decode_batch)
    forward = make_compiled_decode_forward(model, backend="aot_eager") if compiled else TorchBackend(model).forward
    runner = DecodeGraphRunner(forward, kv, max_batch_size=4, max_seq_len=24, scratch_block=SCRATCH,
                               use_cuda_graph=False)
    got = runner.run(step["input_ids"], step["position_ids"], step["slot_mapping"], step["sequence_lengths"],
                     step["kv_cache_block_offsets"], step["logits_indices"],
                     lora_slots=model.lora_slots.token_slots(decode_batch))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # Without slots the same runner serves the base model: the adapters' rows differ, the other does not.
    base = runner.run(step["input_ids"], step["position_ids"], step["slot_mapping"], step["sequence_lengths"],
                      step["kv_cache_block_offsets"], step["logits_indices"])
    assert not torch.allclose(base[0], want[0], atol=1e-3) and torch.allclose(base[1], want[1], atol=1e-4)


def test_prefill_runner_with_slots_equals_the_eager_lora_prefill(setup):
    ckpt, cfg, ad = setup
    model = load_model(ckpt, dtype="float32")
    model.lora_slots = LoraSlots(cfg, max_loras=2, max_rank=8, device="cpu", dtype=torch.float32)
    batch = LoraBatch([ad["c"], ad["a"], None], [len(p) for p in PROMPTS], "cpu")
    inputs = build_step_inputs([StepRow(p, 0, t) for p, t in zip(PROMPTS, TABLES)], BLOCK_SIZE, "cpu")
    kv, want_kv = allocate_kv_cache(cfg, NUM_BLOCKS, BLOCK_SIZE), allocate_kv_cache(cfg, NUM_BLOCKS, BLOCK_SIZE)
    want = TorchBackend(model).forward(inputs["input_ids"], inputs["position_ids"], want_kv,
                                       Session._metadata({**inputs, "kv_cache": want_kv}), inputs["logits_indices"],
                                       lora=batch)
    runner = PrefillGraphRunner(TorchBackend(model).forward, kv, max_num_seqs=4, max_seq_len=24,
                                scratch_block=SCRATCH, max_num_tokens=32, use_cuda_graph=False)
    got = runner.run(inputs["input_ids"], inputs["position_ids"], inputs["slot_mapping"], inputs["query_lengths"],
                     inputs["sequence_lengths"], inputs["kv_cache_block_offsets"], inputs["logits_indices"],
                     lora_slots=model.lora_slots.token_slots(batch))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
