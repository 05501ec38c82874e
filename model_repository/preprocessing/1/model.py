"""Triton `preprocessing` model (tensorrtllm_backend's contract): QUERY text -> INPUT_ID, stop/bad
word strings -> TensorRT-LLM `[2, L]` word-list tensors, and the end/pad ids to use. All the logic
is runtime_lib.tokenizer's; this file only moves tensors and names bad fields."""
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

from runtime_lib.tokenizer import load_tokenizer, to_word_list_format


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        params = ModelParameters(json.loads(args["model_config"]))
        self.tokenizer = load_tokenizer(params.model_dir(),
                                        add_special_tokens=params.bool("add_special_tokens", True))

    def execute(self, requests: list[Any]) -> list[Any]:
        return respond_each(pb_utils, requests, self._process, "preprocessing")

    def _process(self, inputs: RequestInputs) -> Any:
        batch = inputs.batch_size("QUERY")
        _, queries = inputs.strings("QUERY", batch)
        end_ids = inputs.scalar("END_ID", "int", self.tokenizer.end_id, batch, lo=-1)
        pad_ids = inputs.scalar("PAD_ID", "int", self.tokenizer.pad_id, batch, lo=-1)
        output_lens = inputs.scalar("REQUEST_OUTPUT_LEN", "int", None, batch, lo=1, required=True)
        ids = []
        for row in queries:
            if len(row) != 1:
                raise InputError(f"QUERY must hold one string per batch row, got {len(row)}")
            encoded = self.tokenizer.encode(row[0])
            if not encoded:
                raise InputError("QUERY must not be empty (it encodes to no tokens)")
            ids.append(encoded)
        width = max(len(x) for x in ids)
        input_id = np.full((batch, width), pad_ids[0], dtype=np.int32)
        for b, x in enumerate(ids):
            input_id[b, :len(x)] = x
        _, bad = inputs.strings("BAD_WORDS_DICT", batch)
        _, stop = inputs.strings("STOP_WORDS_DICT", batch)
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("INPUT_ID", input_id),
            pb_utils.Tensor("REQUEST_INPUT_LEN", np.array([[len(x)] for x in ids], dtype=np.int32)),
            pb_utils.Tensor("BAD_WORDS_IDS", to_word_list_format([self.tokenizer.encode_words(w) for w in bad])),
            pb_utils.Tensor("STOP_WORDS_IDS", to_word_list_format([self.tokenizer.encode_words(w) for w in stop])),
            pb_utils.Tensor("REQUEST_OUTPUT_LEN", np.array([[n] for n in output_lens], dtype=np.int32)),
            pb_utils.Tensor("OUT_END_ID", np.array([[e] for e in end_ids], dtype=np.int32)),
            pb_utils.Tensor("OUT_PAD_ID", np.array([[p] for p in pad_ids], dtype=np.int32)),
        ])
