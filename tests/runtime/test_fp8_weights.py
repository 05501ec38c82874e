"""FP8 weights (`quantization="fp8"`, layers/fp8_linear.py): the layer is the dequantized
matmul, a quantized model equals transformers with the same fake quantization applied to its
linears, FP8 engines store half the bytes and serve the same tokens through ModelRunner and
LLMEngine, and bad settings fail naming the field."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_models import cache_dtype_error
from torch import nn

from runtime_lib.build import build_engine
from runtime_lib.config import ModelConfig, SamplingConfig
from runtime_lib.engine import EngineConfig, LLMEngine
from runtime_lib.layers.fp8_linear import (
    FP8_DTYPE,
    Fp8Linear,
    fp8_linear_names,
    quantize_rows,
    quantize_weight,
    swap_in_fp8_linears,
)
from runtime_lib.model_runner import ModelRunner
from runtime_lib.models import ENGINE_WEIGHTS_FILE, get_model_class, load_model

BLOCK_SIZE = 4


def test_fp8_linear_is_the_dequantized_matmul():
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 3, 64), torch.randn(48, 64) * 0.2, torch.randn(48)
    x[1, 2] = 0.0                                     # an all-zero token keeps a finite scale
    lin = Fp8Linear(64, 48, bias=True)
    q, s = quantize_weight(w)
    lin.weight.copy_(q)
    lin.weight_scale.copy_(s)
    lin.bias.data.copy_(b)
    assert q.dtype == FP8_DTYPE and s.shape == (48,) and q.float().abs().amax(dim=1).eq(448).all()
    qx, sx = quantize_rows(x.reshape(-1, 64))
    ref = ((qx.float() * sx) @ (q.float() * s[:, None]).t() + b).view(2, 3, 48)
    y = lin(x)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(y[1, 2], b)
    exact = x @ w.t() + b
    rel = float((y - exact).norm() / exact.norm())
    assert 0.005 < rel < 0.08, rel                    # e4m3 keeps 3 mantissa bits: a few percent


def qdq(t: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize each row (last dim) through e4m3 with its own scale."""
    q, s = quantize_rows(t.reshape(-1, t.shape[-1]))
    return (q.float() * s).view(t.shape)


def fake_quantize_hf(hf: nn.Module, weights: dict[str, torch.Tensor] | None = None) -> None:
    """Give every HF projection but the lm_head FP8-rounded inputs (per token) and FP8-rounded
    weights: its own rows quantize-dequantized, or `weights` (HF name -> dequantized tensor) as
    given. The same arithmetic as ours, in fp32 torch ops."""
    from transformers.pytorch_utils import Conv1D

    for name, mod in hf.named_modules():
        if name.endswith("lm_head") or not isinstance(mod, nn.Linear | Conv1D):
            continue
        with torch.no_grad():   # Conv1D stores (in, out): its output channels are columns
            if weights is not None:
                mod.weight.copy_(weights[name + ".weight"])
            else:
                mod.weight.copy_(qdq(mod.weight.t()).t() if isinstance(mod, Conv1D) else qdq(mod.weight))
        mod.register_forward_pre_hook(lambda _m, args: (qdq(args[0]),) + tuple(args[1:]))


def test_fp8_model_equals_hf_with_fake_quantized_linears(any_family_checkpoint):
    """Prefill and 4 greedy decode steps through the paged cache: within rounding of transformers
    running the same quantize-dequantize around each projection, and far from the unquantized
    model (so the quantization really happened)."""
    from transformers import AutoModelForCausalLM

    family, ckpt = any_family_checkpoint
    model = load_model(ckpt, quantization="fp8")
    assert model.config.quantization == "fp8"
    assert fp8_linear_names(model) == []                  # every projection but the lm_head is swapped
    assert sum(isinstance(m, Fp8Linear) for m in model.modules()) == 4 * model.config.num_layers
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    unquantized = cache_dtype_error(model, hf, None)
    fake_quantize_hf(hf)
    matched = cache_dtype_error(model, hf, None)
    # Prefill is bit-exact; in decode, fp32 summation-order differences (paged attention vs HF's)
    # can tip an activation across an e4m3 rounding boundary: ~0.03 measured on gpt2.
    assert matched < 0.1 < 0.3 < unquantized, (matched, unquantized)   # unquantized: 0.6-1.6


def test_fp8_needs_multiples_of_16_on_cuda():
    """`_scaled_mm` on CUDA takes dimensions that are multiples of 16: caught at load, naming
    the projection, before any weight moves."""
    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=32, num_layers=1,
                         num_heads=2, num_kv_heads=2, head_size=16, intermediate_size=40)
    with torch.device("meta"):
        model = get_model_class(config)(config)
    with pytest.raises(ValueError, match=r"multiples of 16 on CUDA; layers\.0\.mlp\.down_proj is \(32, 40\)"):
        swap_in_fp8_linears(model, cuda=True)


@pytest.fixture(scope="module")
def fp8_engine_dir(llama_dir, tmp_path_factory):
    return build_engine(llama_dir, tmp_path_factory.mktemp("fp8w"), quantization="fp8", tokens_per_block=BLOCK_SIZE)


def test_fp8_engine_stores_quantized_weights_and_loads_as_runtime_quantization(llama_dir, fp8_engine_dir, tmp_path):
    """`build --quantization fp8` writes e4m3 projections with their scales (the lm_head and
    embeddings stay in the model dtype), about half the bytes; loading it gives the model that
    quantizing the checkpoint at load gives, bit for bit."""
    cfg = json.loads((fp8_engine_dir / "config.json").read_text())
    assert cfg["build_config"]["quantization"] == "fp8" and cfg["model_config"]["quantization"] == "fp8"
    with safe_open(str(fp8_engine_dir / ENGINE_WEIGHTS_FILE), framework="pt") as f:
        dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes["layers.0.self_attn.qkv_proj.weight"] == "F8_E4M3"
    assert dtypes["layers.0.self_attn.qkv_proj.weight_scale"] == "F32"
    assert dtypes["embed_tokens.weight"] == "F32"
    plain = build_engine(llama_dir, tmp_path / "plain", tokens_per_block=BLOCK_SIZE)
    fp8_bytes = (fp8_engine_dir / ENGINE_WEIGHTS_FILE).stat().st_size
    plain_bytes = (plain / ENGINE_WEIGHTS_FILE).stat().st_size
    assert fp8_bytes < 0.8 * plain_bytes
    stored, runtime = load_model(fp8_engine_dir), load_model(llama_dir, quantization="fp8")
    for (name, a), (_, b) in zip(stored.state_dict().items(), runtime.state_dict().items(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if a.dtype == FP8_DTYPE else a,
                                                  b.view(torch.uint8) if b.dtype == FP8_DTYPE else b), name


def test_fp8_engine_serves_the_same_tokens_through_model_runner_and_llm_engine(llama_dir, fp8_engine_dir):
    """ModelRunner follows the engine's quantization, LLMEngine too ("auto") or when asked for it
    on a plain checkpoint; requests batched together get what they get alone, and the tokens
    differ from the unquantized model's somewhere (the test would pass vacuously otherwise)."""
    prompts = [[1, 17, 42, 99, 250, 7], [5, 6, 7, 8, 9, 10, 11, 12, 13], [300, 2, 44]]
    runner = ModelRunner.from_dir(fp8_engine_dir, device="cpu")
    assert isinstance(runner.session.runtime.model.layers[0].mlp.down_proj, Fp8Linear)

    def greedy(r: ModelRunner) -> list[list[int]]:
        outs = [r.generate([torch.tensor(p)], max_new_tokens=10, end_id=-1, pad_id=0) for p in prompts]
        return [o[0, 0, len(p):len(p) + 10].tolist() for o, p in zip(outs, prompts)]

    ref = greedy(runner)
    assert ref != greedy(ModelRunner.from_dir(llama_dir, device="cpu"))
    scfg = SamplingConfig(end_id=-1, pad_id=0, max_new_tokens=10)
    for model_dir, quantization in ((fp8_engine_dir, "auto"), (llama_dir, "fp8")):
        engine = LLMEngine(EngineConfig(model_dir=str(model_dir), device="cpu", num_kv_blocks=64,
                                        block_size=BLOCK_SIZE, max_num_batched_tokens=8, quantization=quantization))
        try:
            streams = [engine.add_request(f"r{i}", p, scfg) for i, p in enumerate(prompts)]
            assert [[t for o in s for t in o.new_token_ids] for s in streams] == ref
            assert engine.stats().num_kv_blocks_used == 0
        finally:
            engine.shutdown()


def test_bad_quantization_settings_name_the_field(llama_dir, fp8_engine_dir, tmp_path):
    with pytest.raises(ValueError, match=r"quantization must be one of \['auto', 'none', 'fp8'\], got 'int4'"):
        EngineConfig(model_dir="x", quantization="int4")
    with pytest.raises(ValueError, match=r"quantization must be one of \['none', 'fp8'\], got 'int8'"):
        build_engine(llama_dir, tmp_path / "e", quantization="int8")
    with pytest.raises(ValueError, match=r"quantization must be one of \['none', 'fp8'\], got 'w4a16'"):
        ModelConfig.from_dir(llama_dir, quantization="w4a16")
    message = (r"weight 'layers\.0\.\S+\.weight' is FP8 \(an FP8 checkpoint, or an engine built with "
               r"--quantization fp8\): load it with quantization 'auto' or 'fp8', not 'none'")
    with pytest.raises(ValueError, match=message):
        load_model(fp8_engine_dir, quantization="none")


# ----------------------------------------------------------------------------- FP8 checkpoints
PROJECTION = r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$"


def write_fp8_checkpoint(src: Path, out: Path, strategy: str, fmt: str) -> dict[str, torch.Tensor]:
    """An FP8 checkpoint as AutoFP8 (`quant_method: fp8`, per-tensor scales and static input
    scales), llm-compressor (`compressed-tensors`, per-channel (out, 1) scales) or fbgemm
    (`fbgemm_fp8`, per-channel scales and an activation bound) write it, from
    a tiny fp32 one. Returns the dequantized projections (HF names), the oracle's weights."""
    import re
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    state = load_file(str(out / "model.safetensors"))
    dequantized = {}
    for name in [n for n in state if re.search(PROJECTION, n)]:
        w = state[name].float()
        amax = w.abs().amax() if strategy == "tensor" else w.abs().amax(dim=1, keepdim=True)
        scale = (amax / 448.0).clamp(min=1e-12)
        q = (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        state[name], state[name + "_scale"] = q, scale.float()
        if fmt == "fp8":
            state[name[:-len("weight")] + "input_scale"] = torch.tensor(0.05)  # static: not used
        if fmt == "fbgemm_fp8":
            state[name[:-len("weight")] + "input_scale_ub"] = torch.tensor([1200.0])  # activation clamp: not used
        dequantized[name] = q.float() * scale
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = (
        {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]} if fmt == "fp8" else
        {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": ["lm_head"]}
        if fmt == "fbgemm_fp8" else
        {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
         "config_groups": {"group_0": {"targets": ["Linear"],
                                       "weights": {"num_bits": 8, "type": "float", "strategy": strategy},
                                       "input_activations": {"num_bits": 8, "type": "float", "dynamic": True,
                                                             "strategy": "token"}}}})
    (out / "config.json").write_text(json.dumps(cfg))
    return dequantized


@pytest.mark.parametrize("family, strategy, fmt", [("llama", "tensor", "fp8"),
                                                   ("qwen2", "channel", "compressed-tensors"),
                                                   ("mistral", "channel", "fbgemm_fp8")])
def test_fp8_checkpoint_loads_as_stored_and_equals_hf_with_those_weights(make_checkpoint, tmp_path, family,
                                                                         strategy, fmt):
    """The e4m3 weights and scales are used as stored (per-tensor scales become every row's):
    the model equals transformers over the dequantized weights with per-token activation
    rounding; the static input scales are not used (activations are scaled per token)."""
    from transformers import AutoModelForCausalLM

    src = make_checkpoint(family)
    dequantized = write_fp8_checkpoint(src, tmp_path / "fp8", strategy, fmt)
    assert ModelConfig.from_dir(tmp_path / "fp8").quantization == "fp8"
    model = load_model(tmp_path / "fp8")
    qkv = model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, Fp8Linear)
    q_rows = model.config.num_heads * model.config.head_size
    stored = dequantized["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(qkv.weight[:q_rows].float() * qkv.weight_scale[:q_rows, None], stored)
    hf = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    plain = cache_dtype_error(model, hf, None)
    fake_quantize_hf(hf, dequantized)
    matched = cache_dtype_error(model, hf, None)
    assert matched < 0.1 < 0.3 < plain, (matched, plain)


def test_fp8_checkpoint_builds_an_fp8_engine_and_serves(make_checkpoint, tmp_path):
    src = make_checkpoint("llama")
    write_fp8_checkpoint(src, tmp_path / "fp8", "tensor", "fp8")
    engine_dir = build_engine(tmp_path / "fp8", tmp_path / "engine", tokens_per_block=BLOCK_SIZE)
    assert json.loads((engine_dir / "config.json").read_text())["build_config"]["quantization"] == "fp8"
    with pytest.raises(ValueError, match=r"is fp8-quantized; build it with quantization 'fp8' \(or leave it "
                                         r"unset\), not 'none'"):
        build_engine(tmp_path / "fp8", tmp_path / "e2", quantization="none")
    prompt = [1, 17, 42, 99, 250, 7]
    ref = ModelRunner.from_dir(tmp_path / "fp8", device="cpu").generate(
        [torch.tensor(prompt)], max_new_tokens=8, end_id=-1, pad_id=0)[0, 0, len(prompt):len(prompt) + 8].tolist()
    engine = LLMEngine(EngineConfig(model_dir=str(engine_dir), device="cpu", num_kv_blocks=32, block_size=BLOCK_SIZE))
    try:
        stream = engine.add_request("r", prompt, SamplingConfig(end_id=-1, pad_id=0, max_new_tokens=8))
        assert [t for o in stream for t in o.new_token_ids] == ref
    finally:
        engine.shutdown()


@pytest.mark.parametrize("qc, message", [
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, r"block-wise FP8 checkpoints"),
    ({"quant_method": "gptq", "bits": 4}, r"quant_method 'gptq' is not supported"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int"}}}},
     r"compressed-tensors checkpoints are supported with FP8 weights"),
])
def test_unsupported_quantized_checkpoints_fail_naming_the_method(llama_dir, tmp_path, qc, message):
    import shutil

    shutil.copytree(llama_dir, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    (tmp_path / "q" / "config.json").write_text(json.dumps({**cfg, "quantization_config": qc}))
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dir(tmp_path / "q")
