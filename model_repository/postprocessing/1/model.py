"""Triton `postprocessing` model (tensorrtllm_backend's contract): TOKENS_BATCH `[batch, beams,
tokens]` (+ SEQUENCE_LENGTH `[batch, beams]`) -> OUTPUT, one string per beam, flattened to
`[batch * beams]` as tensorrtllm_backend returns it. Decoding is runtime_lib.tokenizer's."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
# No __pycache__ in the model repository: Triton would take it for a model. (Existing .pyc files
# elsewhere are still read, so this costs nothing after the first import.)
sys.dont_write_bytecode = True
import _llm_common  # stdlib only: must run before numpy/torch imports

_llm_common.bootstrap(__file__)

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils
from _llm_common import InputError, ModelParameters, RequestInputs, respond_each

from runtime_lib.tokenizer import load_tokenizer


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        params = ModelParameters(json.loads(args["model_config"]))
        self.tokenizer = load_tokenizer(params.model_dir())
        self.skip_special_tokens = params.bool("skip_special_tokens", True)

    def execute(self, requests: list[Any]) -> list[Any]:
        return respond_each(pb_utils, requests, self._process, "postprocessing")

    def _process(self, inputs: RequestInputs) -> Any:
        tokens = inputs.required("TOKENS_BATCH", "iu", "INT32")
        if tokens.ndim == 2:
            tokens = tokens[:, None, :]
        if tokens.ndim != 3:
            raise InputError(f"TOKENS_BATCH must have shape [batch, beams, tokens], got {list(tokens.shape)}")
        lengths = inputs.array("SEQUENCE_LENGTH")
        if lengths is None:
            lengths = np.full(tokens.shape[:2], tokens.shape[2], dtype=np.int32)
        lengths = lengths.reshape(tokens.shape[0], -1)
        if lengths.shape[1] != tokens.shape[1]:
            raise InputError(f"SEQUENCE_LENGTH must have shape [batch, beams] = {list(tokens.shape[:2])}, "
                             f"got {list(lengths.shape)}")
        texts = []
        for b in range(tokens.shape[0]):
            for k in range(tokens.shape[1]):
                n = int(lengths[b, k])
                if not 0 <= n <= tokens.shape[2]:
                    raise InputError(f"SEQUENCE_LENGTH must be in [0, {tokens.shape[2]}], got {n}")
                texts.append(self.tokenizer.decode(tokens[b, k, :n].tolist(), self.skip_special_tokens)
                             .encode("utf-8"))
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("OUTPUT", np.array(texts, dtype=np.object_))])
