"""Client for this project's Triton `ensemble` model (tritonclient gRPC/HTTP). CLI: `python -m client`."""
from __future__ import annotations

from .llm_client import GenerationResult, LLMClient, LLMClientError, TextDelta

__all__ = ["GenerationResult", "LLMClient", "LLMClientError", "TextDelta"]
