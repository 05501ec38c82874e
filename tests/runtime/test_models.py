"""Model families against transformers: the same logits from our flattened, paged forward as
from HF's plain forward, for prefill, step-by-step decode through the paged cache and chunked
prefill; strict weight maps; dtype casting."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime_lib.config import ModelConfig
from runtime_lib.demo import build_checkpoint
from runtime_lib.layers.attention import AttentionMetadata
from runtime_lib.layers.rotary import compute_inv_freq
from runtime_lib.models import allocate_kv_cache, get_model_class, load_model

BLOCK_SIZE = 4
NUM_BLOCKS = 32
ATOL = 1e-4


@pytest.fixture(scope="module")
def hf_models():
    """HF reference models, loaded once per checkpoint directory."""
    from transformers import AutoModelForCausalLM

    cache: dict[tuple[Path, torch.dtype], torch.nn.Module] = {}

    def get(model_dir: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        key = (Path(model_dir), dtype)
        if key not in cache:
            cache[key] = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
        return cache[key]

    return get


def hf_logits(hf_model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """HF's logits for every position of one unpadded sequence: (len(ids), V) float32."""
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()


class PagedRunner:
    """Drives one of our models step by step: each sequence owns a list of non-contiguous
    blocks (drawn from a shuffled pool) and a kv length, as the engines do."""

    def __init__(self, model: torch.nn.Module, seed: int = 0, kv_cache_dtype: str | None = None) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.kv_cache = allocate_kv_cache(model.config, NUM_BLOCKS, BLOCK_SIZE, device=self.device,
                                          dtype=kv_cache_dtype)
        self.free_blocks = list(range(NUM_BLOCKS))
        random.Random(seed).shuffle(self.free_blocks)
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}

    def step(self, chunks: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        """Run one step with `chunks[seq_id]` new tokens per sequence; returns each
        sequence's logits for its new tokens, (len(chunk), V)."""
        input_ids, positions, query_lens, context_lens, tables = [], [], [], [], []
        for seq_id, chunk in chunks.items():
            start = self.lengths.get(seq_id, 0)
            end = start + len(chunk)
            table = self.tables.setdefault(seq_id, [])
            while len(table) * BLOCK_SIZE < end:
                table.append(self.free_blocks.pop())
            self.lengths[seq_id] = end
            input_ids += chunk
            positions += list(range(start, end))
            query_lens.append(len(chunk))
            context_lens.append(end)
            tables.append(list(table))
        meta = AttentionMetadata.build(query_lens, context_lens, tables, BLOCK_SIZE, device=self.device)
        with torch.no_grad():
            hidden = self.model(torch.tensor(input_ids, device=self.device),
                                torch.tensor(positions, device=self.device), self.kv_cache, meta)
            logits = self.model.compute_logits(hidden)                      # (T, V)
        assert logits.dtype == torch.float32
        return dict(zip(chunks, logits.split(query_lens)))


PROMPTS = [[1, 17, 42, 99, 250, 7], [1, 300, 5, 5, 8, 120, 64, 33, 390, 11, 12], [1, 77, 200]]


def test_prefill_then_paged_decode_matches_hf(any_family_checkpoint, hf_models):
    family, ckpt = any_family_checkpoint
    model, hf = load_model(ckpt), hf_models(ckpt)
    runner = PagedRunner(model)

    # One prefill step over three ragged prompts, flattened.
    out = runner.step(dict(enumerate(PROMPTS)))
    seqs = [list(p) for p in PROMPTS]
    for i, ids in enumerate(seqs):
        torch.testing.assert_close(out[i], hf_logits(hf, ids), atol=ATOL, rtol=0,
                                   msg=lambda m, i=i: f"{family} prefill of sequence {i}: {m}")

    # Five decode steps, one token per sequence, crossing block boundaries.
    for step in range(5):
        for i, ids in enumerate(seqs):
            ids.append(int(out[i][-1].argmax()) if step % 2 else 4 + (37 * step + i) % 390)
        out = runner.step({i: [ids[-1]] for i, ids in enumerate(seqs)})
        for i, ids in enumerate(seqs):
            torch.testing.assert_close(out[i][0], hf_logits(hf, ids)[-1], atol=ATOL, rtol=0,
                                       msg=lambda m, i=i, step=step: f"{family} decode step {step}, sequence {i}: {m}")
    assert all(len(runner.tables[i]) > 1 for i in range(3))


def cache_dtype_error(model, hf, kv_cache_dtype: str) -> float:
    """Largest |our logits - HF's| / std(HF's) over a prefill and 4 greedy decode steps."""
    runner = PagedRunner(model, kv_cache_dtype=kv_cache_dtype)
    seqs = [list(p) for p in PROMPTS]
    out = runner.step(dict(enumerate(PROMPTS)))
    errors = []
    for _ in range(4):
        for i, ids in enumerate(seqs):
            ref = hf_logits(hf, ids)[-1]
            errors.append(float((out[i][-1] - ref).abs().max() / ref.std()))
            ids.append(int(ref.argmax()))
        out = runner.step({i: [ids[-1]] for i, ids in enumerate(seqs)})
    return max(errors)


def test_fp8_kv_cache_error_is_bounded_and_above_bf16s(any_family_checkpoint, hf_models):
    """An e4m3 cache keeps 3 mantissa bits of K/V (bf16: 7): the logits move by more than a
    bf16 cache moves them, ~20x in these random models whose weights amplify every rounding,
    yet stay far from what a misread cache gives (errors of several logit spreads)."""
    family, ckpt = any_family_checkpoint
    model, hf = load_model(ckpt), hf_models(ckpt)
    bf16, fp8 = cache_dtype_error(model, hf, "bf16"), cache_dtype_error(model, hf, "fp8")
    assert 4 * bf16 < fp8 < 1.0, (bf16, fp8)  # measured: bf16 0.018-0.036, fp8 0.28-0.55


def test_chunked_prefill_matches_hf(any_family_checkpoint, hf_models):
    family, ckpt = any_family_checkpoint
    model, hf = load_model(ckpt), hf_models(ckpt)
    runner = PagedRunner(model, seed=1)
    long_prompt, short_prompt = PROMPTS[1], PROMPTS[0]
    # Step 1: first 7 tokens of the long prompt beside the whole short prompt.
    out1 = runner.step({0: long_prompt[:7], 1: short_prompt})
    # Step 2: the rest of the long prompt beside a decode token of the short one.
    out2 = runner.step({0: long_prompt[7:], 1: [9]})
    torch.testing.assert_close(torch.cat([out1[0], out2[0]]), hf_logits(hf, long_prompt), atol=ATOL, rtol=0)
    torch.testing.assert_close(out2[1][0], hf_logits(hf, short_prompt + [9])[-1], atol=ATOL, rtol=0)


def test_mistral_sliding_window_matches_hf(make_checkpoint, hf_models):
    ckpt = make_checkpoint("mistral", sliding_window=3)
    model, hf = load_model(ckpt), hf_models(ckpt)
    assert model.config.sliding_window == 3
    runner = PagedRunner(model)
    ids = list(PROMPTS[1])
    out = runner.step({0: ids})
    torch.testing.assert_close(out[0], hf_logits(hf, ids), atol=ATOL, rtol=0)
    for token in (5, 6, 7):
        ids.append(token)
        out = runner.step({0: [token]})
        torch.testing.assert_close(out[0][0], hf_logits(hf, ids)[-1], atol=ATOL, rtol=0)
    # The window must actually change the result, or this test proves nothing.
    full = load_model(ckpt, ModelConfig.from_dir(ckpt, sliding_window=None))
    unwindowed = PagedRunner(full).step({0: ids})[0]
    assert (unwindowed[-1] - hf_logits(hf, ids)[-1]).abs().max() > 1e-3


@pytest.mark.parametrize("max_positions, rope", [
    # 16-token prompts past max_position_embeddings=12: linear's stretch and dynamic NTK's
    # recomputed base are both exercised. llama3 configs already state the extended length.
    (12, {"rope_type": "linear", "factor": 2.0}),
    (12, {"rope_type": "dynamic", "factor": 2.0}),
    (64, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8}),
])
def test_rope_scaling_prefill_matches_hf(hf_models, tmp_path, max_positions, rope):
    ckpt = build_checkpoint(tmp_path, "llama", max_position_embeddings=max_positions,
                            rope_parameters={"rope_theta": 10000.0, **rope})
    model, hf = load_model(ckpt), hf_models(ckpt)
    assert model.config.rope_scaling["rope_type"] == rope["rope_type"]
    ids = (PROMPTS[1] + PROMPTS[0])[:16]
    out = PagedRunner(model).step({0: ids})
    torch.testing.assert_close(out[0], hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_inv_freq_equals_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    hf_cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters=rope)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    ours = compute_inv_freq(128, 500000.0, rope, 131072)
    assert torch.equal(ours, expected)


def test_bf16_load_is_close_to_fp32(llama_dir, hf_models):
    model = load_model(llama_dir, dtype="bf16")
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.config.dtype == "bfloat16"
    out = PagedRunner(model).step({0: PROMPTS[1]})[0]
    assert out.dtype == torch.float32
    ref = hf_logits(hf_models(llama_dir), PROMPTS[1])
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_sharded_checkpoint_loads_the_same(llama_dir, hf_models, tmp_path):
    hf = hf_models(llama_dir)
    hf.save_pretrained(str(tmp_path), max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    a = PagedRunner(load_model(llama_dir)).step({0: PROMPTS[0]})[0]
    b = PagedRunner(load_model(tmp_path)).step({0: PROMPTS[0]})[0]
    assert torch.equal(a, b)


def _copy_with_weights(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    edit(weights)
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_missing_weight_is_named(llama_dir, tmp_path):
    ckpt = _copy_with_weights(llama_dir, tmp_path / "m",
                              lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing weights \['model\.layers\.1\.mlp\.up_proj\.weight'\]"):
        load_model(ckpt)


def test_unexpected_weight_is_named(llama_dir, tmp_path):
    ckpt = _copy_with_weights(llama_dir, tmp_path / "u",
                              lambda w: w.update({"model.layers.0.self_attn.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected weights \['model\.layers\.0\.self_attn\.extra\.weight'\]"):
        load_model(ckpt)


def test_unknown_architecture_is_rejected(llama_dir, tmp_path):
    ckpt = tmp_path / "falcon"
    shutil.copytree(llama_dir, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="FalconForCausalLM"):
        load_model(ckpt)


def test_model_classes_per_family(any_family_checkpoint):
    family, ckpt = any_family_checkpoint
    cls = get_model_class(ModelConfig.from_dir(ckpt))
    expected = {"llama": "LlamaForCausalLM", "llama3": "LlamaForCausalLM", "mistral": "LlamaForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel"}[family]
    assert cls.__name__ == expected


def test_kv_cache_layout(llama_dir):
    config = ModelConfig.from_dir(llama_dir)
    kv = allocate_kv_cache(config, num_blocks=5, block_size=4, dtype="bf16")
    assert kv.shape == (config.num_layers, 2, 5, 4, config.num_kv_heads, config.head_size)
    assert kv.dtype == torch.bfloat16 and not kv.any()
    with pytest.raises(ValueError, match="num_blocks must be >= 1, got 0"):
        allocate_kv_cache(config, num_blocks=0, block_size=4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(any_family_checkpoint):
    family, ckpt = any_family_checkpoint
    torch.backends.cuda.matmul.allow_tf32 = False
    prompts = dict(enumerate(PROMPTS))
    cpu = PagedRunner(load_model(ckpt)).step(prompts)
    gpu_runner = PagedRunner(load_model(ckpt, device="cuda"))
    gpu = gpu_runner.step(prompts)
    assert gpu_runner.kv_cache.is_cuda and gpu[0].is_cuda
    for i in prompts:
        torch.testing.assert_close(gpu[i].cpu(), cpu[i], atol=1e-3, rtol=0)
    bf16 = PagedRunner(load_model(ckpt, device="cuda", dtype="bf16")).step(prompts)
    for i in prompts:
        assert (bf16[i].cpu() - cpu[i]).abs().max() < 0.05 * cpu[i].abs().max()
