"""Build tiny random checkpoints of real architectures and a locally trained tokenizer,
fully offline. Used by the tests (as the correctness oracle's input) and by `make serve`
when no MODEL_DIR is given.

    python -m runtime_lib.demo --family llama --output demo_model
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

CORPUS = Path(__file__).parent / "data" / "corpus.txt"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
UNK_ID, BOS_ID, EOS_ID, PAD_ID = range(4)
FAMILIES = ("llama", "llama3", "mistral", "qwen2", "gpt2")


def build_tokenizer(out_dir: str | Path, vocab_size: int = 400) -> int:
    """Train a byte-level BPE on the shipped corpus; write tokenizer.json and a chat-less
    tokenizer_config.json. Returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train([str(CORPUS)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(out))
    return tok.get_vocab_size()


def _hf_config(family: str, vocab_size: int, **overrides: Any):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                  pad_token_id=PAD_ID, initializer_range=0.2)
    llama_like = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      rms_norm_eps=1e-5)
    if family == "llama":
        cfg = LlamaConfig(**common, **llama_like)
    elif family == "llama3":  # Llama 3.x: llama3 rope scaling and tied embeddings
        cfg = LlamaConfig(**common, **llama_like, tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64})
    elif family == "mistral":
        cfg = MistralConfig(**common, **{**llama_like, "num_key_value_heads": 1}, sliding_window=4096)
    elif family == "qwen2":
        cfg = Qwen2Config(**common, **llama_like, tie_word_embeddings=False)
    elif family == "gpt2":
        cfg = GPT2Config(**common, n_embd=64, n_layer=2, n_head=4, n_positions=512)
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def build_checkpoint(out_dir: str | Path, family: str = "llama", seed: int = 0,
                     dtype: torch.dtype = torch.float32, **config_overrides: Any) -> Path:
    """Save a tiny random `transformers` model (safetensors) plus tokenizer into `out_dir`."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    vocab = build_tokenizer(out)
    cfg = _hf_config(family, vocab, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    model.generation_config.pad_token_id = PAD_ID
    model.save_pretrained(str(out), safe_serialization=True)
    return out


LORA_TARGETS = ("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj")  # k_proj, up_proj left out


def build_lora_adapter(out_dir: str | Path, model_dir: str | Path, seed: int = 0, r: int = 4, alpha: float = 8.0,
                       rslora: bool = False, targets: tuple[str, ...] = LORA_TARGETS,
                       **config: Any) -> dict[str, torch.Tensor]:
    """Save a random PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) for the
    Llama-family checkpoint in `model_dir`; `config` adds adapter_config.json fields. Returns
    each target weight's update (HF name -> scaling * B @ A), what merging the adapter adds."""
    import math

    from safetensors.torch import save_file

    hf = json.loads((Path(model_dir) / "config.json").read_text())
    hidden, inter = hf["hidden_size"], hf["intermediate_size"]
    head = hf.get("head_dim") or hidden // hf["num_attention_heads"]
    q = hf["num_attention_heads"] * head
    kv = (hf.get("num_key_value_heads") or hf["num_attention_heads"]) * head
    shapes = {"q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q),
              "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    g = torch.Generator().manual_seed(seed)
    scaling = alpha / math.sqrt(r) if rslora else alpha / r
    tensors, deltas = {}, {}
    for layer in range(hf["num_hidden_layers"]):
        for t in targets:
            name = f"model.layers.{layer}.{'mlp' if t in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{t}"
            n_out, n_in = shapes[t]
            a, b = torch.randn(r, n_in, generator=g) * 0.3, torch.randn(n_out, r, generator=g) * 0.3
            tensors[f"base_model.model.{name}.lora_A.weight"] = a
            tensors[f"base_model.model.{name}.lora_B.weight"] = b
            deltas[name + ".weight"] = scaling * b @ a
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(targets), "bias": "none",
           "fan_in_fan_out": False, "use_rslora": rslora, "task_type": "CAUSAL_LM", **config}
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return deltas


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="llama", choices=FAMILIES)
    ap.add_argument("--output", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    path = build_checkpoint(args.output, args.family, args.seed)
    print(json.dumps({"model_dir": str(path), "family": args.family}))


if __name__ == "__main__":
    main()
