"""TensorRT-LLM's `ModelRunner`: the high-level offline API over `GenerationSession`.

    runner = ModelRunner.from_dir("engine_or_hf_checkpoint_dir")
    out = runner.generate([torch.tensor(ids)], max_new_tokens=32, end_id=2, pad_id=2)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig, SamplingConfig
from .generation import GenerationSession
from .logits_processor import LogitsProcessor
from .mapping import Mapping
from .session import Session
from .stopping import StoppingCriteria


class ModelRunner:
    def __init__(self, session: GenerationSession, max_batch_size: int, max_input_len: int,
                 max_seq_len: int, max_beam_width: int, lora_manager: Any = None) -> None:
        self.session = session
        self.max_batch_size = max_batch_size
        self.max_input_len = max_input_len
        self.max_seq_len = max_seq_len
        self.max_beam_width = max_beam_width
        self.lora_manager = lora_manager
        self.mapping = session.mapping

    # ------------------------------------------------------------ constructors
    @classmethod
    def from_engine(cls, engine: Session | str | Path, lora_dir: str | list[str] | None = None, rank: int = 0,
                    debug_mode: bool = False, stream: Any = None, device: str | None = None,
                    gather_context_logits: bool | None = None, gather_generation_logits: bool | None = None,
                    **_unused: Any) -> ModelRunner:
        """From a `Session` (or an engine directory written by `runtime_lib.build`).

        `gather_context_logits` / `gather_generation_logits` (TRT-LLM's build flags of the same
        names) override the engine's: with them on, `generate(..., return_dict=True)` also
        returns `context_logits` [batch, max_input_len, vocab] / `generation_logits`
        [batch, beams, steps, vocab].

        `lora_dir`: one PEFT LoRA adapter directory or a list of them, served as uids "0", "1",
        ... (`generate(lora_uids=[...])` picks one per prompt; Llama-family models)."""
        if rank != 0:
            raise ValueError(f"rank must be 0 (tensor parallelism is not supported yet), got {rank}")
        session = engine if isinstance(engine, Session) else Session.from_engine(
            engine, device=device or _default_device())
        cfg = session.model_config
        if gather_context_logits is not None:
            cfg.gather_context_logits = bool(gather_context_logits)
        if gather_generation_logits is not None:
            cfg.gather_generation_logits = bool(gather_generation_logits)
        lora_manager = None
        if lora_dir is not None:
            from .lora import LoraManager

            lora_manager = LoraManager()
            lora_manager.load_from_ckpt(lora_dir, cfg, device=session.device)
        gen = GenerationSession(cfg, session, Mapping(), debug_mode=debug_mode, stream=stream)
        return cls(gen, cfg.max_batch_size, cfg.max_input_len, cfg.max_seq_len, cfg.max_beam_width, lora_manager)

    @classmethod
    def from_dir(cls, engine_dir: str | Path, lora_dir: str | list[str] | None = None, rank: int = 0,
                 debug_mode: bool = False, stream: Any = None, device: str | None = None,
                 dtype: str | None = None, gather_context_logits: bool | None = None,
                 gather_generation_logits: bool | None = None, **_unused: Any) -> ModelRunner:
        """From an engine directory or a plain Hugging Face checkpoint directory (`lora_dir`: see from_engine)."""
        if not Path(engine_dir).is_dir():
            raise FileNotFoundError(f"engine_dir {str(engine_dir)!r} is not a directory")
        session = Session.from_dir(engine_dir, device=device or _default_device(), dtype=dtype)
        return cls.from_engine(session, lora_dir=lora_dir, rank=rank, debug_mode=debug_mode, stream=stream,
                               gather_context_logits=gather_context_logits,
                               gather_generation_logits=gather_generation_logits)

    # -------------------------------------------------------------- properties
    @property
    def model_config(self) -> ModelConfig:
        return self.session.model_config

    dtype = property(lambda self: self.model_config.torch_dtype)
    vocab_size = property(lambda self: self.model_config.vocab_size)
    vocab_size_padded = property(lambda self: self.model_config.vocab_size)
    hidden_size = property(lambda self: self.model_config.hidden_size)
    num_heads = property(lambda self: self.model_config.num_heads)
    num_layers = property(lambda self: self.model_config.num_layers)
    max_sequence_length = property(lambda self: self.model_config.max_seq_len)
    remove_input_padding = property(lambda self: self.model_config.remove_input_padding)
    use_lora_plugin = property(lambda self: self.lora_manager is not None)
    # No build-time table size: as many virtual tokens as one batch of prompts can hold.
    max_prompt_embedding_table_size = property(lambda self: self.max_batch_size * self.max_input_len)
    gather_context_logits = property(lambda self: self.model_config.gather_context_logits)
    gather_generation_logits = property(lambda self: self.model_config.gather_generation_logits)

    # ---------------------------------------------------------------- generate
    def generate(self, batch_input_ids: list[torch.Tensor], position_ids: Any = None,
                 sampling_config: SamplingConfig | None = None, prompt_table: Any = None,
                 prompt_tasks: Any = None, lora_uids: list[str] | None = None, streaming: bool = False,
                 stopping_criteria: StoppingCriteria | None = None,
                 logits_processor: LogitsProcessor | None = None, **kwargs: Any):
        """Generate for a list of 1-D prompt tensors. Returns `output_ids` [batch, beams,
        max_input_len + max_new_tokens] padded with end_id, or a dict when `return_dict` /
        `output_sequence_lengths`; with `streaming=True` a generator of those, one per step."""
        ptuning = self._prepare_ptuning(prompt_table, prompt_tasks, len(batch_input_ids))
        if lora_uids is not None and len(lora_uids) != len(batch_input_ids):
            raise ValueError(f"lora_uids must have one entry per prompt ({len(batch_input_ids)}), got {len(lora_uids)}")
        if lora_uids is not None and self.lora_manager is None:
            if any(str(u) not in ("-1", "None") for u in lora_uids):
                raise ValueError("lora_uids name adapters, but none are loaded: pass lora_dir to "
                                 "from_dir / from_engine")
            lora_uids = None
        if position_ids is not None:
            raise NotImplementedError("custom position_ids are not supported")
        scfg = self._sampling_config(sampling_config, kwargs)
        virtual = int(ptuning["prompt_vocab_size"][0]) if ptuning else 0
        prompts = self._check_inputs(batch_input_ids, scfg, virtual)
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int32)
        packed = torch.tensor([t for p in prompts for t in p], dtype=torch.int32)
        beam_width = max(scfg.num_beams, scfg.num_return_sequences or 1)
        self.session.setup(len(prompts), int(lengths.max()), scfg.max_new_tokens, beam_width,
                           lora_manager=self.lora_manager, lora_uids=lora_uids)
        return self.session.decode(packed, lengths, scfg, **ptuning, streaming=streaming,
                                   stopping_criteria=stopping_criteria, logits_processor=logits_processor,
                                   return_dict=scfg.return_dict,
                                   output_sequence_lengths=scfg.output_sequence_lengths)

    def _sampling_config(self, sampling_config: SamplingConfig | None, kwargs: dict) -> SamplingConfig:
        if sampling_config is None:
            cfg = self.model_config
            end_id = kwargs.pop("end_id", cfg.eos_token_id)
            pad_id = kwargs.pop("pad_id", cfg.pad_token_id if cfg.pad_token_id is not None else end_id)
            if end_id is None:
                raise ValueError("end_id is required: pass it (or a sampling_config); the model config has "
                                 "no eos_token_id")
            sampling_config = SamplingConfig(end_id=end_id, pad_id=pad_id)
        else:
            sampling_config = sampling_config.copy()
        unused = sampling_config.update(**kwargs)
        if unused:
            raise ValueError(f"unknown sampling arguments {sorted(unused)}")
        return sampling_config

    def _check_inputs(self, batch_input_ids: list[torch.Tensor], scfg: SamplingConfig,
                      virtual_tokens: int = 0) -> list[list[int]]:
        """Prompts as lists; ids below vocab_size + `virtual_tokens` (a prompt table's rows per task)."""
        if isinstance(batch_input_ids, torch.Tensor):
            batch_input_ids = list(batch_input_ids) if batch_input_ids.dim() == 2 else [batch_input_ids]
        if not batch_input_ids:
            raise ValueError("batch_input_ids is empty: pass at least one prompt")
        if len(batch_input_ids) > self.max_batch_size:
            raise ValueError(f"batch of {len(batch_input_ids)} prompts exceeds max_batch_size={self.max_batch_size}")
        prompts = []
        for b, ids in enumerate(batch_input_ids):
            ids = torch.as_tensor(ids)
            if ids.dim() != 1:
                raise ValueError(f"batch_input_ids[{b}] must be 1-D, got shape {tuple(ids.shape)}")
            if ids.numel() == 0:
                raise ValueError(f"batch_input_ids[{b}] is empty: prompts need at least one token")
            if ids.numel() > self.max_input_len:
                raise ValueError(f"batch_input_ids[{b}] has {ids.numel()} tokens, more than "
                                 f"max_input_len={self.max_input_len}")
            lst = ids.tolist()
            limit = self.vocab_size + virtual_tokens
            bad = [t for t in lst if not 0 <= t < limit]
            if bad:
                raise ValueError(f"batch_input_ids[{b}] has token ids {bad[:5]} outside [0, {limit})"
                                 + (f" (vocab_size {self.vocab_size} + {virtual_tokens} prompt table rows per task)"
                                    if virtual_tokens else ""))
            if len(lst) + scfg.max_new_tokens > self.max_seq_len:
                raise ValueError(f"batch_input_ids[{b}] has {len(lst)} tokens; with max_new_tokens="
                                 f"{scfg.max_new_tokens} that exceeds max_seq_len={self.max_seq_len}")
            prompts.append(lst)
        if max(scfg.num_beams, scfg.num_return_sequences or 1) > self.max_beam_width:
            raise ValueError(f"num_beams / num_return_sequences must be <= max_beam_width={self.max_beam_width}")
        return prompts

    def _prepare_ptuning(self, prompt_table: Any, prompt_tasks: Any, batch_size: int) -> dict[str, torch.Tensor]:
        """TensorRT-LLM's prompt tuning arguments -> GenerationSession.decode's: `prompt_table`
        [tasks, vocab, hidden] (or [vocab, hidden]: one task), a tensor or a .npy path;
        `prompt_tasks` each prompt's task as "0,1,0" or a sequence (default: task 0). Prompt ids
        vocab_size + i read row i of the prompt's task."""
        if prompt_table is None:
            if prompt_tasks is not None:
                raise ValueError("prompt_tasks needs a prompt_table")
            return {}
        if isinstance(prompt_table, (str, Path)):
            import numpy as np

            prompt_table = torch.from_numpy(np.load(prompt_table))
        table = torch.as_tensor(prompt_table)
        if table.dim() == 2:
            table = table[None]
        if table.dim() != 3 or table.shape[-1] != self.hidden_size or 0 in table.shape:
            raise ValueError(f"prompt_table must be [tasks, vocab, hidden={self.hidden_size}] or "
                             f"[vocab, hidden], got shape {tuple(torch.as_tensor(prompt_table).shape)}")
        if prompt_tasks is None:
            tasks = [0] * batch_size
        else:
            items = prompt_tasks.split(",") if isinstance(prompt_tasks, str) else torch.as_tensor(prompt_tasks).tolist()
            try:
                tasks = [int(t) for t in items]
            except (TypeError, ValueError):
                raise ValueError(f"prompt_tasks must be task numbers like '0,1', got {prompt_tasks!r}") from None
        if len(tasks) != batch_size:
            raise ValueError(f"prompt_tasks must name one task per prompt ({batch_size}), got {len(tasks)}")
        return {"prompt_embedding_table": table.reshape(-1, table.shape[-1]),
                "tasks": torch.tensor(tasks, dtype=torch.int32),
                "prompt_vocab_size": torch.tensor([table.shape[1]], dtype=torch.int32)}


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
