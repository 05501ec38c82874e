"""runtime_lib: TensorRT-LLM's Python runtime API re-created in PyTorch, plus an in-flight
batching engine for serving. Public names mirror `tensorrt_llm.runtime`."""
from __future__ import annotations

from .config import ModelConfig, SamplingConfig
from .generation import GenerationSession
from .kv_cache import BlocksManager, GenerationSequence, KVCacheManager
from .logits_processor import LogitsProcessor, LogitsProcessorList
from .mapping import Mapping
from .model_runner import ModelRunner
from .session import Session, TensorInfo
from .stopping import StoppingCriteria, StoppingCriteriaList

__version__ = "0.1.0"

__all__ = ["BlocksManager", "GenerationSequence", "GenerationSession", "KVCacheManager", "LogitsProcessor",
           "LogitsProcessorList", "Mapping", "ModelConfig", "ModelRunner", "SamplingConfig", "Session",
           "StoppingCriteria", "StoppingCriteriaList", "TensorInfo"]
