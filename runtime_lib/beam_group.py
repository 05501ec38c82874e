"""A beam-search request inside `LLMEngine`: it runs as its own group, a `GenerationSession`
over the engine's weights advanced one step per engine iteration, and answers once at the end
(beams are only final then) with one `RequestOutput` per returned beam."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .config import ModelConfig, SamplingConfig
from .engine_io import RequestOutput
from .session import Session


@dataclass
class BeamGroup:
    """One beam-search request and the decode stream of its own `GenerationSession`."""

    request_id: str
    num_prompt_tokens: int
    steps: Iterator
    on_output: Callable[[RequestOutput], None]
    num_return: int
    end_id: int
    tokenizer: Any = None                   # set when the request asked for text
    last: dict | None = None
    aborted: bool = False

    @classmethod
    def start(cls, session: Session, model_config: ModelConfig, request_id: str, prompt: list[int],
              sampling: SamplingConfig, on_output: Callable[[RequestOutput], None],
              tokenizer: Any = None, prompt_table: torch.Tensor | None = None,
              lora: tuple[Any, str] | None = None) -> BeamGroup:
        """Set up the group's session and stream (nothing runs until `advance`). `lora`: the
        engine's lora.LoraManager and the request's adapter uid."""
        from .generation import GenerationSession  # generation imports the engine's peers

        if sampling.num_beams > model_config.max_beam_width:
            raise ValueError(f"beam_width must be in [1, {model_config.max_beam_width}], got {sampling.num_beams}")
        gen = GenerationSession(model_config, session, cuda_graphs=False)  # a graph set per request: too costly
        gen.setup(1, len(prompt), sampling.max_new_tokens, sampling.num_beams,
                  **({} if lora is None else {"lora_manager": lora[0], "lora_uids": [lora[1]]}))
        scfg = sampling.copy()
        scfg.update(return_dict=True, output_sequence_lengths=True, output_cum_log_probs=True,
                    output_log_probs=True)
        steps = gen.decode(torch.tensor(prompt), torch.tensor([len(prompt)]), scfg, streaming=True,
                           prompt_embedding_table=prompt_table)  # one task: all its rows
        return cls(request_id, len(prompt), steps, on_output, sampling.num_return_sequences or 1,
                   sampling.end_id, tokenizer)

    def advance(self) -> bool:
        """Run one decode step; True when the search is over (or the request was aborted).
        Exceptions propagate: the engine answers the request with an error."""
        if self.aborted:
            return True
        try:
            self.last = next(self.steps)
        except StopIteration:
            return True
        return False

    def close(self) -> None:
        self.steps.close()  # frees the group's KV blocks (GenerationSession's finally)

    def final(self, error: str | None = None) -> list[tuple]:
        if self.aborted or self.last is None or error:
            reason = "error" if error else "abort"
            return [(self.on_output, RequestOutput(self.request_id, i, [], None, None, True, reason,
                                                   self.num_prompt_tokens, 0, error))
                    for i in range(self.num_return)]
        ids, lens = self.last["output_ids"][0], self.last["sequence_lengths"][0]  # (R, S), (R,)
        cum = self.last.get("cum_log_probs")
        lps = self.last.get("log_probs")
        outs = []
        for i in range(self.num_return):
            n = int(lens[i]) - self.num_prompt_tokens
            toks = ids[i, self.num_prompt_tokens:self.num_prompt_tokens + n].tolist()
            outs.append((self.on_output, RequestOutput(
                self.request_id, i, toks, lps[0, i, :n].tolist() if lps is not None else None,
                float(cum[0, i]) if cum is not None else None, True,
                "stop" if toks and toks[-1] == self.end_id else "length", self.num_prompt_tokens, n,
                None, self.tokenizer.decode(toks) if self.tokenizer is not None else None)))
        return outs
