"""TensorRT-LLM's `GenerationSession`: static-batch decoding over the paged KV cache.

`setup()` sizes the cache for a batch, `decode()` runs it to the end (`decode_regular`) or
yields after every step (`decode_stream`). Rows of the batch are prompts x beams (or x
`num_return_sequences` when sampling); finished rows leave the forward, beams stay until
their prompt's search is done. Shares the forward (`model_step`), the block manager, the
sampling, beam search and stopping code with `LLMEngine`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .beam_search import BeamSearch
from .config import ModelConfig, SamplingConfig
from .kv_cache import GenerationSequence, KVCacheManager
from .logits_processor import LogitsProcessor
from .lora import LoraBatch
from .mapping import Mapping
from .model_step import HostCopy, StepRow, apply_block_copies, build_step_inputs
from .sampling import SamplingParams, SamplingTensors, random_seed, sample
from .sampling_ops import (
    TokenHistory,
    apply_bad_words,
    apply_frequency_presence_penalty,
    apply_no_repeat_ngram,
    apply_repetition_penalty,
)
from .session import Session
from .stopping import StoppingCriteria, StopWordsMatcher, strip_stop_words

_MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class _DecodePlan:
    """What `setup()` decided, captured when `decode()` is called: a stream is lazy, and a later
    `setup()` for another batch must not change the shapes or the KV pool under it."""

    batch_size: int
    max_new_tokens: int
    beam_width: int
    max_blocks_per_seq: int
    kv_cache: torch.Tensor
    prompt_inputs: dict[str, torch.Tensor] | None = None  # prompt tuning inputs of the prefill step
    lora_rows: list | None = None  # each prompt's lora.LoraAdapter (or None), from setup's lora_uids


@dataclass
class _Row:
    """One decoding row (a prompt's beam or sample): its tokens and stop state."""

    batch_idx: int
    beam: int
    prompt_len: int
    output_ids: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    finished: bool = False
    matcher: StopWordsMatcher | None = None


def _append_token(r: _Row, tok: int, log_prob: float | None, *, end_id: int, max_new_tokens: int) -> None:
    """Record one sampled token and decide whether the row is finished. A matched stop
    sequence is removed from the output (DESIGN §6); `end_id` stays, as TRT-LLM."""
    r.output_ids.append(tok)
    if log_prob is not None:
        r.log_probs.append(log_prob)
    if tok == end_id:
        r.finished = True
    elif r.matcher is not None and (check := r.matcher.push(tok)).matched:
        del r.output_ids[len(r.output_ids) - check.num_stop_tokens:]
        del r.log_probs[len(r.output_ids):]
        r.finished = True
    elif len(r.output_ids) >= max_new_tokens:
        r.finished = True


class GenerationSession:
    """Static-batch generation with TensorRT-LLM's names and output shapes.

    `engine` is a `Session` (or the bytes of a serialized one)."""

    def __init__(self, model_config: ModelConfig, engine: Session | bytes, mapping: Mapping | None = None,
                 debug_mode: bool = False, stream: object = None, cuda_graphs: bool = True) -> None:
        self.runtime = engine if isinstance(engine, Session) else Session.from_serialized_engine(engine)
        # Decode steps replay CUDA graphs on GPU (runtime_lib/cuda_graph.py); the runner is
        # kept here because the Session only holds it weakly.
        self.cuda_graphs = cuda_graphs
        self._graph_runner = None
        self._lora_rows = None  # setup()'s lora_uids as adapters, one per prompt
        self.model_config = model_config
        self.mapping = mapping or Mapping()
        self.debug_mode = debug_mode
        self.device = self.runtime.device
        self._kv_cache: torch.Tensor | None = None
        # The last decode's block bookkeeping (TRT-LLM's attribute name); every block is free
        # again once that decode finished, failed or its stream was closed.
        self.kv_cache_manager: KVCacheManager | None = None
        # One decode at a time: two interleaved streams would write the same KV blocks.
        self._decoding = False
        self.batch_size = 0
        self.max_context_length = 0
        self.max_new_tokens = 0
        self.beam_width = 1

    # TRT-LLM's read-only properties
    vocab_size = property(lambda self: self.model_config.vocab_size)
    num_layers = property(lambda self: self.model_config.num_layers)
    num_heads = property(lambda self: self.model_config.num_heads)
    hidden_size = property(lambda self: self.model_config.hidden_size)
    head_size = property(lambda self: self.model_config.head_size)
    dtype = property(lambda self: self.model_config.torch_dtype)
    remove_input_padding = property(lambda self: self.model_config.remove_input_padding)
    paged_kv_cache = property(lambda self: True)
    tokens_per_block = property(lambda self: self.model_config.tokens_per_block)
    max_seq_len = property(lambda self: self.model_config.max_seq_len)
    gather_context_logits = property(lambda self: self.model_config.gather_context_logits)
    gather_generation_logits = property(lambda self: self.model_config.gather_generation_logits)

    def setup(self, batch_size: int, max_context_length: int, max_new_tokens: int, beam_width: int = 1,
              max_attention_window_size: int | None = None, sink_token_length: int | None = None,
              lora_manager: object = None, lora_uids: list[str] | None = None, **_unused: object) -> None:
        """Check the batch against the build limits and size the KV cache for it. `lora_manager`
        (lora.LoraManager) and `lora_uids` (one per prompt, "-1": none): each prompt's adapter."""
        self._check_idle("setup()")
        cfg = self.model_config
        if not 1 <= batch_size <= cfg.max_batch_size:
            raise ValueError(f"batch_size must be in [1, {cfg.max_batch_size}] (max_batch_size), got {batch_size}")
        if not 1 <= max_context_length <= cfg.max_input_len:
            raise ValueError(f"max_context_length must be in [1, {cfg.max_input_len}] (max_input_len), "
                             f"got {max_context_length}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if max_context_length + max_new_tokens > cfg.max_seq_len:
            raise ValueError(f"max_context_length + max_new_tokens ({max_context_length} + {max_new_tokens}) "
                             f"must be <= max_seq_len ({cfg.max_seq_len})")
        if not 1 <= beam_width <= max(cfg.max_beam_width, 1):
            raise ValueError(f"beam_width must be in [1, {cfg.max_beam_width}] (max_beam_width), got {beam_width}")
        if lora_uids is not None and lora_manager is None:
            raise ValueError("lora_uids need a lora_manager (ModelRunner: load adapters with lora_dir)")
        self._lora_rows = None
        if lora_uids is not None:
            rows = lora_manager.adapters_for(list(lora_uids), batch_size)
            self._lora_rows = rows if any(a is not None for a in rows) else None
        self.batch_size, self.max_context_length = batch_size, max_context_length
        self.max_new_tokens, self.beam_width = max_new_tokens, beam_width
        bs = cfg.tokens_per_block
        self.max_blocks_per_seq = -(-(max_context_length + max_new_tokens) // bs)
        # Every beam may own all its blocks, plus one spare per beam for copy-on-write.
        num_blocks = batch_size * beam_width * (self.max_blocks_per_seq + 1)
        # + 1: the last block belongs to no sequence; CUDA-graph padding rows write there.
        if self._kv_cache is None or self._kv_cache.shape[2] < num_blocks + 1:
            self._kv_cache = self.runtime.allocate_kv_cache(num_blocks + 1, bs)
            self._graph_runner = None
        # Sized by the build limits, not this batch: later setups reuse the runner and its graphs.
        self._setup_cuda_graphs(cfg.max_batch_size * max(cfg.max_beam_width, 1), cfg.max_seq_len)

    def _setup_cuda_graphs(self, num_rows: int, max_seq_len: int) -> None:
        """(Re)build the decode graph runner over the KV pool when this batch outgrows it."""
        runner = self._graph_runner
        if not self.cuda_graphs or (runner is not None and runner.max_batch_size >= num_rows
                                    and runner.max_seq_len >= max_seq_len):
            return
        if runner is not None:
            self.runtime.disable_cuda_graphs(self._kv_cache)
        self._graph_runner = self.runtime.enable_cuda_graphs(
            self._kv_cache, max_batch_size=num_rows, max_seq_len=max_seq_len,
            scratch_block=self._kv_cache.shape[2] - 1)

    # ------------------------------------------------------------------ decode
    def decode(self, input_ids: torch.Tensor, context_lengths: torch.Tensor, sampling_config: SamplingConfig,
               prompt_embedding_table: torch.Tensor | None = None, tasks: torch.Tensor | None = None,
               prompt_vocab_size: torch.Tensor | None = None, stop_words_list: object = None,
               bad_words_list: object = None, streaming: bool = False, output_sequence_lengths: bool = False,
               output_generation_logits: bool = False, return_dict: bool = False,
               stopping_criteria: StoppingCriteria | None = None,
               logits_processor: LogitsProcessor | None = None, **_unused: object):
        """Generate for a batch. `input_ids` is packed (1-D, or [1, total]) when
        `remove_input_padding`, else padded [batch, max_context_length]."""
        self._check_idle("decode()")
        if self._kv_cache is None:
            raise RuntimeError("call setup(batch_size, max_context_length, max_new_tokens, ...) before decode()")
        scfg = sampling_config.copy()
        if stop_words_list is not None:
            scfg.stop_words_list = stop_words_list
        if bad_words_list is not None:
            scfg.bad_words_list = bad_words_list
        prompts = self._split_prompts(input_ids, context_lengths)
        prompt_inputs = None
        if prompt_embedding_table is not None or tasks is not None or prompt_vocab_size is not None:
            prompt_inputs = self._prompt_inputs(prompts, prompt_embedding_table, tasks, prompt_vocab_size)
        plan = _DecodePlan(self.batch_size, self.max_new_tokens, self.beam_width, self.max_blocks_per_seq,
                           self._kv_cache, prompt_inputs, self._lora_rows)
        kwargs = dict(plan=plan, output_sequence_lengths=output_sequence_lengths or scfg.output_sequence_lengths,
                      return_dict=return_dict or scfg.return_dict,
                      output_generation_logits=output_generation_logits or self.gather_generation_logits,
                      stopping_criteria=stopping_criteria, logits_processor=logits_processor)
        if streaming:
            return self.decode_stream(prompts, scfg, **kwargs)
        return self.decode_regular(prompts, scfg, **kwargs)

    def _prompt_inputs(self, prompts: list[list[int]], table: torch.Tensor | None, tasks: Any,
                       prompt_vocab_size: Any) -> dict[str, torch.Tensor]:
        """Validated prompt tuning inputs of the prefill step (TRT-LLM's `decode` arguments):
        `table` (num_tasks * prompt_vocab_size, H); `tasks` (batch,) each prompt's task, default
        0; `prompt_vocab_size` (1,) the table rows per task. Prompt ids in [vocab_size,
        vocab_size + prompt_vocab_size) are the virtual tokens."""
        hidden = self.model_config.hidden_size
        if table is None:
            raise ValueError("tasks / prompt_vocab_size need a prompt_embedding_table")
        table = torch.as_tensor(table)
        if table.dim() != 2 or table.shape[1] != hidden or table.shape[0] == 0:
            raise ValueError(f"prompt_embedding_table must be (num_tasks * prompt_vocab_size, hidden={hidden}), "
                             f"got shape {tuple(table.shape)}")
        vocab = int(torch.as_tensor(prompt_vocab_size).reshape(-1)[0]) if prompt_vocab_size is not None \
            else table.shape[0]
        if vocab < 1 or table.shape[0] % vocab:
            raise ValueError(f"prompt_vocab_size must be >= 1 and divide the table's {table.shape[0]} rows, "
                             f"got {vocab}")
        num_tasks = table.shape[0] // vocab
        B = len(prompts)
        task_ids = [0] * B if tasks is None else [int(t) for t in torch.as_tensor(tasks).reshape(-1).tolist()]
        if len(task_ids) != B:
            raise ValueError(f"tasks must name one task per prompt ({B}), got {len(task_ids)}")
        bad = [t for t in task_ids if not 0 <= t < num_tasks]
        if bad:
            raise ValueError(f"tasks must be in [0, {num_tasks}) (the table's tasks), got {bad[:5]}")
        # The lookup clamps rows, so an id past the table would read a wrong row silently.
        limit = self.vocab_size + vocab
        for b, p in enumerate(prompts):
            bad = [t for t in p if not 0 <= t < limit]
            if bad:
                raise ValueError(f"prompt {b} has token ids {bad[:5]} outside [0, {limit})")
        per_token = torch.tensor([t for t, p in zip(task_ids, prompts) for _ in p], dtype=torch.int32)
        return {"prompt_embedding_table": table.to(self.device, self.model_config.torch_dtype),
                "tasks": per_token.to(self.device), "prompt_vocab_size": torch.tensor([vocab], dtype=torch.int32)}

    def _check_idle(self, what: str) -> None:
        if self._decoding:
            raise RuntimeError(f"{what} while another decode of this GenerationSession is still running "
                               f"(an unfinished stream?): exhaust or close() that stream first")

    def decode_regular(self, prompts: list[list[int]], scfg: SamplingConfig, **kwargs):
        *_, final = self._generate(prompts, scfg, **kwargs)  # the last yield is the result
        return final

    def decode_stream(self, prompts: list[list[int]], scfg: SamplingConfig, **kwargs) -> Iterator:
        yield from self._generate(prompts, scfg, stream=True, **kwargs)

    def _split_prompts(self, input_ids: torch.Tensor, context_lengths: torch.Tensor) -> list[list[int]]:
        lengths = [int(x) for x in torch.as_tensor(context_lengths).flatten().tolist()]
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 2 and ids.shape[0] == len(lengths) and not (ids.shape[0] == 1 and len(lengths) > 1):
            prompts = [ids[b, :n].tolist() for b, n in enumerate(lengths)]
        else:
            flat = ids.flatten().tolist()
            if len(flat) != sum(lengths):
                raise ValueError(f"input_ids holds {len(flat)} tokens but context_lengths sum to {sum(lengths)}")
            prompts, start = [], 0
            for n in lengths:
                prompts.append(flat[start:start + n])
                start += n
        if len(prompts) != self.batch_size:
            raise ValueError(f"got {len(prompts)} prompts but setup() was called with batch_size={self.batch_size}")
        for b, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {b} is empty: context_lengths must be >= 1")
            if len(p) > self.max_context_length:
                raise ValueError(f"prompt {b} has {len(p)} tokens, more than max_context_length="
                                 f"{self.max_context_length} given to setup()")
        return prompts

    def _generate(self, prompts: list[list[int]], scfg: SamplingConfig, *, plan: _DecodePlan,
                  stream: bool = False, output_sequence_lengths: bool, return_dict: bool,
                  output_generation_logits: bool, stopping_criteria: StoppingCriteria | None,
                  logits_processor: LogitsProcessor | None):
        # Checked again here: a stream's body starts at its first next(), maybe after another began.
        self._check_idle("decode()")
        self._decoding = True
        try:
            yield from self._generate_steps(prompts, scfg, plan, stream, output_sequence_lengths, return_dict,
                                            output_generation_logits, stopping_criteria, logits_processor)
        finally:
            self._decoding = False

    def _generate_steps(self, prompts, scfg, plan, stream, output_sequence_lengths, return_dict,
                        output_generation_logits, stopping_criteria, logits_processor):
        B = len(prompts)
        V = self.vocab_size
        use_beams = scfg.num_beams > 1
        W = scfg.num_beams if use_beams else (scfg.num_return_sequences or 1)
        if W > plan.beam_width:
            raise ValueError(f"{'num_beams' if use_beams else 'num_return_sequences'}={W} exceeds the "
                             f"beam_width={plan.beam_width} given to setup()")
        max_new = min(scfg.max_new_tokens, plan.max_new_tokens)
        bs = self.tokens_per_block
        device = self.device
        max_prompt = max(len(p) for p in prompts)
        S = max_prompt + max_new  # output width, as TRT-LLM: max_context_length + max_new_tokens
        end_id = scfg.end_id

        params = SamplingParams.list_from_config(scfg, B)
        row_params = [self._row_params(params[b], i) for b in range(B) for i in range(W)]
        rows = [_Row(b, i, len(prompts[b]),
                     matcher=StopWordsMatcher(row_params[b * W + i].stop_words)
                     if row_params[b * W + i].stop_words else None)
                for b in range(B) for i in range(W)]
        # Beams use its penalties and bans (applied to log-probs, as HF's beam search does).
        st = SamplingTensors.build(row_params, device)
        if st.max_token_id >= V:
            raise ValueError(f"end_id / bad_words token ids must be < vocab_size {V}, got {st.max_token_id}")
        beams = None
        if use_beams:
            beams = BeamSearch(B, W, end_id=end_id if not scfg.ignore_eos else -1, max_new_tokens=max_new,
                               length_penalty=scfg.length_penalty, early_stopping=scfg.early_stopping,
                               num_return_sequences=scfg.num_return_sequences or 1, pad_id=end_id,
                               device=device)
        # Token history per row, [R, S], padded with end_id: what logits processors and
        # stopping criteria see (TRT-LLM passes its output_ids buffer, batch*beams rows).
        ids_buf = torch.full((B * W, S), end_id, dtype=torch.int64, device=device)
        for b, p in enumerate(prompts):
            ids_buf[b * W:(b + 1) * W, :len(p)] = torch.tensor(p, device=device)
        # Beam search does not end hypotheses on stop words; returned beams are cut before the
        # first one instead, so stop text never reaches the caller (DESIGN §6).
        beam_stop_words = [row_params[b * W].stop_words for b in range(B)] if use_beams else None
        prompt_lens = torch.tensor([r.prompt_len for r in rows], device=device)  # (B*W,)
        gen_logits: list[torch.Tensor] = []

        kv_cache = plan.kv_cache
        kv = KVCacheManager(num_blocks=kv_cache.shape[2] - 1, tokens_per_block=bs,  # last: scratch
                            max_blocks_per_seq=plan.max_blocks_per_seq, beam_width=W)
        self.kv_cache_manager = kv
        try:
            copies = []
            for b, p in enumerate(prompts):
                copies += kv.add_sequence(GenerationSequence(b, b), len(p))
            want_ctx = self.gather_context_logits
            logits = self._forward([StepRow(p, 0, kv.get_block_table(b, 0), all_logits=want_ctx)
                                    for b, p in enumerate(prompts)], kv_cache, extra=plan.prompt_inputs,
                                   lora=self._lora_batch(plan, range(B), [len(p) for p in prompts]))
            apply_block_copies(kv_cache, copies)
            context_logits = None
            if want_ctx:
                context_logits = torch.zeros(B, max_prompt, V, device=device)
                start = 0
                for b, p in enumerate(prompts):
                    context_logits[b, :len(p)] = logits[start:start + len(p)]
                    start += len(p)
                last = torch.tensor([sum(len(q) for q in prompts[:b + 1]) - 1 for b in range(B)], device=device)
                logits = logits[last]
            # (B, V) -> one row per beam / sample
            logits = logits.repeat_interleave(W, dim=0) if W > 1 else logits
            # Queue step t+1 on step t's tokens while they are still on the device, then read
            # them: the host's work of a step overlaps the next forward instead of idling the
            # GPU (a row that finishes on its token gets one step it discards). Processors and
            # criteria see the token history first, so with them each step waits.
            ahead = not use_beams and logits_processor is None and stopping_criteria is None

            for step in range(max_new):
                if output_generation_logits:
                    step_logits = logits.float().clone()
                    ended = [i for i, r in enumerate(rows) if r.finished]
                    if ended and ahead:  # a row fed one step past its end reads as not fed: zeros
                        step_logits[ended] = 0.0
                    gen_logits.append(step_logits)
                if logits_processor is not None:
                    logits = logits_processor(step, ids_buf, logits)
                if use_beams:
                    tokens, parents = self._beam_step(beams, logits, st, ids_buf, prompt_lens, step)
                    ids_buf = ids_buf[parents]
                    for b in range(B):
                        local = [int(p) - b * W for p in parents[b * W:(b + 1) * W].tolist()]
                        apply_block_copies(kv_cache, kv.reorder_beams(b, local))
                    for r, tok in zip(rows, tokens.tolist()):
                        r.output_ids.append(tok)
                    positions = torch.tensor([r.prompt_len + step for r in rows], device=device)
                    ids_buf[torch.arange(B * W, device=device), positions] = tokens
                    done = beams.is_done()
                else:
                    steps = [len(r.output_ids) for r in rows]
                    history = dict(prompt_ids=[prompts[r.batch_idx] for r in rows],
                                   output_ids=[r.output_ids for r in rows]) if st.needs_history else {}
                    out = sample(logits, st, steps=steps, **history)
                    host = HostCopy(out.token_ids, out.logprobs)
                    next_logits = None
                    if ahead and step < max_new - 1:
                        next_logits = self._next_logits(kv, kv_cache, rows, use_beams, W, feed=out.token_ids,
                                                        plan=plan)
                    tok_list, lp_list = host.lists()
                    written, cols = [], []
                    for i, (r, tok) in enumerate(zip(rows, tok_list)):
                        if not r.finished:
                            written.append(i)
                            cols.append(r.prompt_len + len(r.output_ids))
                            _append_token(r, tok, None if lp_list is None else lp_list[i],
                                          end_id=-1 if scfg.ignore_eos else end_id, max_new_tokens=max_new)
                    # ids_buf is read only by processors / criteria: one indexed write, not one per row.
                    if written and (logits_processor is not None or stopping_criteria is not None):
                        idx = torch.tensor(written, device=device)
                        ids_buf[idx, torch.tensor(cols, device=device)] = out.token_ids[idx]
                    done = all(r.finished for r in rows)
                if stopping_criteria is not None and stopping_criteria(step, ids_buf, logits):
                    done = True
                if done or step == max_new - 1:
                    break
                if stream:
                    yield self._outputs(prompts, rows, beams, S, end_id, return_dict, output_sequence_lengths,
                                        context_logits, gen_logits, scfg, beam_stop_words)
                logits = next_logits if ahead else self._next_logits(kv, kv_cache, rows, use_beams, W, plan=plan)
            yield self._outputs(prompts, rows, beams, S, end_id, return_dict, output_sequence_lengths,
                                context_logits, gen_logits, scfg, beam_stop_words)
        finally:
            kv.free_all()

    def _next_logits(self, kv: KVCacheManager, kv_cache: torch.Tensor, rows: list[_Row], use_beams: bool,
                     W: int, feed: torch.Tensor | None = None, plan: _DecodePlan | None = None) -> torch.Tensor:
        """Run the next decode step. Beams: every row until the search is done (BeamSearch
        wants all rows). Otherwise only unfinished rows; finished rows get zero logits.
        `feed` (rows,): the last sampled tokens, on the device and not yet appended to the
        rows: each unfinished row's input is taken from it there (no host sync)."""
        finished_batch = [all(r.finished for r in rows[b * W:(b + 1) * W]) and not use_beams
                          for b in range(len(rows) // W)]
        apply_block_copies(kv_cache, kv.step(finished_batch))
        fed = [i for i, r in enumerate(rows) if use_beams or not finished_batch[r.batch_idx]]
        # Rows of one prompt advance in lockstep in the cache; a finished sample of a prompt
        # whose other samples still run is fed a filler token (its output is already final).
        fed_live = feed is not None
        logits = self._forward([StepRow([rows[i].output_ids[-1] if not (rows[i].finished or fed_live) else 0],
                                        kv.sequence_length(rows[i].batch_idx) - 1,
                                        kv.get_block_table(rows[i].batch_idx, rows[i].beam),
                                        feed_index=i if fed_live and not rows[i].finished else -1) for i in fed],
                               kv_cache, feed,
                               lora=self._lora_batch(plan, [rows[i].batch_idx for i in fed], [1] * len(fed)))
        if len(fed) == len(rows):
            return logits
        full = logits.new_zeros(len(rows), logits.shape[1])
        full[torch.tensor(fed, device=logits.device)] = logits
        return full

    def _row_params(self, p: SamplingParams, i: int) -> SamplingParams:
        """Per-sample params: `num_return_sequences` samples of one prompt need distinct noise,
        so sample i uses seed + i (a prompt without a seed gets one random seed)."""
        seed = p.seed if p.seed is not None else random_seed()
        return dataclasses.replace(p, seed=(seed + i) & _MAX_SEED)

    def _beam_step(self, beams: BeamSearch, logits: torch.Tensor, st: SamplingTensors, ids_buf: torch.Tensor,
                   prompt_lens: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One beam-search step. As HF's beam search, the processors (repetition penalty, no-repeat
        n-grams, bad words, min_length) act on the log-softmax, not on the raw logits."""
        x = torch.log_softmax(logits.float(), dim=-1)                            # (B*W, V)
        if st.needs_history:
            # ids_buf rows are already reordered to the current beams: prompt, then `step` tokens.
            lengths = prompt_lens + step                                          # (B*W,)
            width = int(prompt_lens.max()) + step
            pos = torch.arange(width, device=x.device)[None]                      # (1, L)
            hist_ids = torch.where(pos < lengths[:, None], ids_buf[:, :width], -1)
            history = TokenHistory(hist_ids, lengths, prompt_lens)
            if st.has_repetition_penalty:
                x = apply_repetition_penalty(x, history.token_ids, st.repetition_penalty)
            if st.has_frequency_presence:
                x = apply_frequency_presence_penalty(x, history.output_counts(x.shape[1]), st.frequency_penalty,
                                                     st.presence_penalty)
            for n, rows in st.ngram_groups:
                x = apply_no_repeat_ngram(x, history, n, rows)
        else:
            history = None
        if st.has_bad_words:
            x = apply_bad_words(x, st.bad_rows, st.bad_last, st.bad_prefix, st.bad_prefix_len, history)
        if st.has_end_ban:  # min_length and ignore_eos
            ban = st.ban_end_always | (step < st.min_length)                      # (B*W,)
            end = st.end_id[:, None]                                              # (B*W, 1)
            x.scatter_(1, end, torch.where(ban[:, None], float("-inf"), x.gather(1, end)))
        out = beams.step(x)
        return out.next_tokens, out.parent_beams

    def _lora_batch(self, plan: _DecodePlan | None, prompt_of_row, tokens_of_row: list[int]):
        """The step's lora.LoraBatch: step row i belongs to prompt `prompt_of_row[i]`; None without adapters."""
        if plan is None or plan.lora_rows is None:
            return None
        return LoraBatch.build([plan.lora_rows[b] for b in prompt_of_row], tokens_of_row, self.device)

    def _forward(self, step_rows: list[StepRow], kv_cache: torch.Tensor,
                 feed_tokens: torch.Tensor | None = None, extra: dict[str, torch.Tensor] | None = None,
                 lora=None) -> torch.Tensor:
        inputs = build_step_inputs(step_rows, self.tokens_per_block, self.device, feed_tokens=feed_tokens)
        inputs["kv_cache"] = kv_cache
        inputs.update(extra or {})
        if lora is not None:
            inputs["lora"] = lora
        outputs: dict[str, torch.Tensor] = {}
        self.runtime.run(inputs, outputs)
        return outputs["logits"]

    def _outputs(self, prompts, rows, beams, S, end_id, return_dict, output_sequence_lengths,
                 context_logits, gen_logits, scfg, beam_stop_words):
        B = len(prompts)
        device = self.device
        if beams is not None:
            res = beams.finalize()
            R = res.output_ids.shape[1]
            out_ids = torch.full((B, R, S), end_id, dtype=torch.int64, device=device)
            seq_lens = torch.zeros(B, R, dtype=torch.int32, device=device)
            log_probs, cum = res.log_probs, res.cum_log_probs  # (B, R, max_new), (B, R)
            for b, p in enumerate(prompts):
                for r in range(R):
                    gen = res.output_ids[b, r, :int(res.sequence_lengths[b, r])]
                    if beam_stop_words[b]:
                        kept, hit = strip_stop_words(gen.tolist(), beam_stop_words[b])
                        if hit:
                            gen = gen[:len(kept)]
                            log_probs[b, r, len(kept):] = 0.0
                            cum[b, r] = log_probs[b, r].sum()
                    out_ids[b, r, :len(p)] = torch.tensor(p, device=device)
                    out_ids[b, r, len(p):len(p) + len(gen)] = gen
                    seq_lens[b, r] = len(p) + len(gen)
        else:
            W = len(rows) // B
            out_ids = torch.full((B, W, S), end_id, dtype=torch.int64, device=device)
            seq_lens = torch.zeros(B, W, dtype=torch.int32, device=device)
            log_probs = torch.zeros(B, W, S - max(len(p) for p in prompts), device=device)
            for r in rows:
                ids = prompts[r.batch_idx] + r.output_ids
                out_ids[r.batch_idx, r.beam, :len(ids)] = torch.tensor(ids, device=device)
                seq_lens[r.batch_idx, r.beam] = len(ids)
                if r.log_probs:
                    n = min(len(r.log_probs), log_probs.shape[2])
                    log_probs[r.batch_idx, r.beam, :n] = torch.tensor(r.log_probs[:n], device=device)
            cum = log_probs.sum(-1)
        if not (return_dict or output_sequence_lengths):
            return out_ids
        result = {"output_ids": out_ids, "sequence_lengths": seq_lens}
        if return_dict:
            if scfg.output_log_probs:
                result["log_probs"] = log_probs
            if scfg.output_cum_log_probs:
                result["cum_log_probs"] = cum
            if context_logits is not None:
                result["context_logits"] = context_logits
            if gen_logits:
                g = torch.stack(gen_logits, dim=1)  # (B*W, steps, V)
                result["generation_logits"] = g.view(B, -1, g.shape[1], g.shape[2])
        return result
