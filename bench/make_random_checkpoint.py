"""Write a random-weight Hugging Face checkpoint of a real model shape, plus a word-level
tokenizer covering its whole vocabulary, so servers and benchmarks run real shapes offline.

    python bench/make_random_checkpoint.py --shape llama-3.1-8b --output llama8b --device cuda

Weights are drawn on `--device` (fast on a GPU) in `--dtype` and saved as safetensors.
Detokenized text reads "t17 t2048 ...": one word per id, so any sampled id decodes.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

SHAPES = {
    # Llama-3.2-1B: hidden 2048, 16 layers, 32/8 heads, vocab 128256, tied embeddings
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    # Llama-3.1-8B: hidden 4096, 32 layers, 32/8 heads, intermediate 14336, vocab 128256
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    # small, for CPU smoke runs
    "llama-tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
}
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def write_word_tokenizer(out: Path, vocab_size: int) -> None:
    """ids 0..3 are <unk>, <s>, </s>, <pad>; id i >= 4 is the word "t{i}"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"t{i}": i for i in range(len(specials), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(out))


def make_checkpoint(shape: str, output: str | Path, dtype: torch.dtype = torch.bfloat16,
                    device: str = "cpu", vocab_size: int = 128256, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=16384, rms_norm_eps=1e-5,
                      bos_token_id=1, eos_token_id=2, pad_token_id=3, rope_parameters=dict(LLAMA3_ROPE),
                      dtype=str(dtype).removeprefix("torch."), **SHAPES[shape])
    cfg.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    gen = torch.Generator(device=device).manual_seed(seed)
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.save_pretrained(str(out), safe_serialization=True)
    write_word_tokenizer(out, vocab_size)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    ap.add_argument("--output", required=True)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--vocab-size", type=int, default=128256)
    args = ap.parse_args()
    t0 = time.perf_counter()
    path = make_checkpoint(args.shape, args.output, getattr(torch, args.dtype), args.device, args.vocab_size)
    print(json.dumps({"model_dir": str(path), "shape": args.shape, "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
