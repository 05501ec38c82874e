"""`python -m client "prompt" --max-tokens 64 --stream --protocol grpc|http --url ...`: generate
text with the served `ensemble` model and print it as it arrives."""
from __future__ import annotations

import argparse
import sys
import time

from .llm_client import DEFAULT_URLS, LLMClient, LLMClientError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m client", description=__doc__)
    ap.add_argument("prompt")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--stream", action="store_true", help="print text as it is generated")
    ap.add_argument("--protocol", choices=sorted(DEFAULT_URLS), default="grpc")
    ap.add_argument("--url", default=None, help="host:port (default localhost:8001 for grpc, :8000 for http)")
    ap.add_argument("--model", default="ensemble")
    ap.add_argument("--temperature", type=float)
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--min-p", type=float)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--lora-task-id", type=int, help="serve with this LoRA adapter (the server's lora_dir)")
    ap.add_argument("--min-tokens", type=int)
    ap.add_argument("--repetition-penalty", type=float)
    ap.add_argument("--presence-penalty", type=float)
    ap.add_argument("--frequency-penalty", type=float)
    ap.add_argument("--stop", action="append", default=None, help="stop word (repeatable)")
    ap.add_argument("--include-prompt", action="store_true", help="echo the prompt before the output")
    ap.add_argument("--stats", action="store_true", help="print token counts and timings to stderr")
    args = ap.parse_args(argv)

    params = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
                  "seed": args.seed, "lora_task_id": args.lora_task_id, "min_tokens": args.min_tokens,
                  "repetition_penalty": args.repetition_penalty,
                  "presence_penalty": args.presence_penalty, "frequency_penalty": args.frequency_penalty,
                  "stop_words": args.stop, "exclude_input_in_output": not args.include_prompt,
                  "return_num_input_tokens": True, "return_num_output_tokens": True}
    start = time.perf_counter()
    first = None
    num_tokens = None
    try:
        with LLMClient(args.url, args.protocol, args.model) as llm:
            if args.stream:
                for delta in llm.stream(args.prompt, args.max_tokens, **params):
                    if first is None and delta.text:
                        first = time.perf_counter()
                    sys.stdout.write(delta.text)
                    sys.stdout.flush()
                    num_tokens = delta.num_output_tokens or num_tokens
            else:
                result = llm.generate(args.prompt, args.max_tokens, **params)
                sys.stdout.write(result.text)
                num_tokens = result.num_output_tokens[0] if result.num_output_tokens else None
    except LLMClientError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # leaving the stream cancels the request on the server
        print("\n[cancelled]", file=sys.stderr)
        return 130
    sys.stdout.write("\n")
    if args.stats:
        total = time.perf_counter() - start
        ttft = f", first text after {1000 * (first - start):.0f} ms" if first is not None else ""
        print(f"[{num_tokens} tokens in {total:.2f} s{ttft}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
