"""Glue shared by this repository's Python-backend models: make the stub able to import the
project (path + locale bootstrap), read `config.pbtxt` parameters with environment overrides,
and read request inputs with validation errors that name the field.

Importing this module uses only the standard library: it runs before numpy is importable in
the stub (the stub's interpreter is isolated and ignores PYTHONPATH; DESIGN §9). Each model.py:

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import _llm_common
    _llm_common.bootstrap(__file__)
    import numpy as np, triton_python_backend_utils as pb_utils   # now importable
"""
from __future__ import annotations

import locale
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

ENV_PREFIX = "LLM_"
PYTHON_PATH_ENV = "LLM_PYTHON_PATH"


# --- bootstrap ---------------------------------------------------------------------------------

def bootstrap(model_file: str) -> list[str]:
    """Prepend the project's import paths to `sys.path` and switch the stub to a UTF-8 locale.

    Paths come from, in order: `$LLM_PYTHON_PATH` (os.pathsep-separated; `make serve` and the
    tests set it), the model's `python_path` config parameter (relative entries are resolved
    against the model repository), else the repository this file sits in: its parent directory
    if it holds `runtime_lib/`, and that directory's `.venv` site-packages. Returns the paths added.
    """
    here = Path(model_file).resolve()
    model_repo = here.parents[2]
    paths: list[str] = []
    env = os.environ.get(PYTHON_PATH_ENV, "")
    paths += [p for p in env.split(os.pathsep) if p]
    param = _raw_config_parameter(here.parents[1] / "config.pbtxt", "python_path")
    if param:
        paths += [str((model_repo / p).resolve()) for p in param.split(os.pathsep) if p]
    if not paths:
        paths += _paths_next_to(model_repo)
    for p in reversed(paths):
        if p in sys.path:
            sys.path.remove(p)
        sys.path.insert(0, p)
    # The stub starts in the C locale: open() would default to ASCII and torch.compile's
    # template reads fail. Environment variables cannot fix it (isolated interpreter).
    for name in ("C.UTF-8", "en_US.UTF-8"):
        try:
            locale.setlocale(locale.LC_CTYPE, name)
            break
        except locale.Error:
            continue
    _numpy_compat()
    return paths


def _numpy_compat() -> None:
    """The 2.51 stub needs numpy < 2 (DESIGN §9), but newer transformers releases (5.17 on the
    GPU host) touch `np.long`, a numpy 2 name, while importing `AutoTokenizer`. Alias it."""
    import warnings

    try:
        import numpy as np
    except ImportError:
        return
    with warnings.catch_warnings():  # numpy 1.x warns when asked about the removed names
        warnings.simplefilter("ignore", FutureWarning)
        if not hasattr(np, "long"):
            np.long = np.int64  # what numpy 2's np.long is on LP64 Linux
        if not hasattr(np, "ulong"):
            np.ulong = np.uint64


def _paths_next_to(model_repo: Path) -> list[str]:
    root = model_repo.parent
    if not (root / "runtime_lib").is_dir():
        return []
    found = [str(root)]
    venv = root / ".venv" / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    if venv.is_dir():
        found.insert(0, str(venv))
    return found


def _raw_config_parameter(config_file: Path, key: str) -> str | None:
    """Read one `parameters { key: ... value { string_value: ... } }` entry without protobuf."""
    try:
        text = config_file.read_text(encoding="utf-8")
    except OSError:
        return None
    m = re.search(r'key:\s*"' + re.escape(key) + r'"\s*value:\s*\{\s*string_value:\s*"([^"]*)"', text)
    if not m or m.group(1).startswith("${"):
        return None
    return m.group(1)


# --- configuration -----------------------------------------------------------------------------

class ModelParameters:
    """`config.pbtxt` parameters, each overridable by the environment variable `LLM_<KEY>`
    (e.g. `model_dir` <- `$LLM_MODEL_DIR`). Empty values and `${...}` placeholders count as unset."""

    def __init__(self, model_config: dict[str, Any]) -> None:
        self._params = {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}

    def raw(self, key: str) -> str | None:
        env = os.environ.get(ENV_PREFIX + key.upper())
        if env:
            return env
        value = self._params.get(key, "")
        if not value or value.startswith("${"):
            return None
        return value

    def str(self, key: str, default: str | None = None) -> str | None:
        value = self.raw(key)
        return default if value is None else value

    def int(self, key: str, default: int | None, lo: int | None = None) -> int | None:
        value = self.raw(key)
        if value is None:
            return default
        try:
            out = int(value)
        except ValueError:
            raise ValueError(f"parameter {key} must be an integer, got {value!r}") from None
        if lo is not None and out < lo:
            raise ValueError(f"parameter {key} must be >= {lo}, got {out}")
        return out

    def float(self, key: str, default: float, lo: float, hi: float) -> float:
        value = self.raw(key)
        if value is None:
            return default
        try:
            out = float(value)
        except ValueError:
            raise ValueError(f"parameter {key} must be a number, got {value!r}") from None
        if not lo <= out <= hi:
            raise ValueError(f"parameter {key} must be in [{lo}, {hi}], got {out}")
        return out

    def bool(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is None:
            return default
        low = value.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"parameter {key} must be true or false, got {value!r}")

    def model_dir(self) -> str:
        value = self.raw("model_dir")
        if value is None:
            raise ValueError("parameter model_dir is not set: set it in config.pbtxt or export "
                             "LLM_MODEL_DIR=<checkpoint or engine directory>")
        if not Path(value).is_dir():
            raise ValueError(f"parameter model_dir {value!r} is not a directory")
        return value


# --- request inputs ----------------------------------------------------------------------------

class InputError(ValueError):
    """A request input is missing or invalid; the message names the field and what is allowed."""


_KIND_DTYPES = {"int": "iu", "uint": "u", "float": "f", "bool": "b"}
_KIND_NAMES = {"int": "an integer type (INT32)", "uint": "UINT64", "float": "FP32", "bool": "BOOL"}


class RequestInputs:
    """Validated access to one Triton request's input tensors (batch dimension first)."""

    def __init__(self, request: Any, pb_utils: Any) -> None:
        self._request = request
        self._pb = pb_utils

    def array(self, name: str) -> Any:
        """The input as a numpy array, or None when the client did not send it."""
        tensor = self._pb.get_input_tensor_by_name(self._request, name)
        return None if tensor is None else tensor.as_numpy()

    def required(self, name: str, kinds: str, type_name: str) -> Any:
        """The input as a numpy array; an InputError names it when it is absent or its dtype
        kind is not one of `kinds` (numpy kind letters; `type_name` is what the error says)."""
        arr = self.array(name)
        if arr is None:
            raise InputError(f"{name} is required")
        if arr.dtype.kind not in kinds:
            raise InputError(f"{name} must be {type_name}, got {arr.dtype}")
        return arr

    def first(self, *names: str) -> tuple[str, Any]:
        """The first of `names` (a field and its aliases) that was sent: (name, array)."""
        for name in names:
            arr = self.array(name)
            if arr is not None:
                return name, arr
        return names[0], None

    def batch_size(self, name: str, required: bool = True) -> int:
        arr = self.array(name)
        if arr is None:
            if required:
                raise InputError(f"{name} is required")
            return 1
        if arr.ndim == 0 or arr.shape[0] < 1:
            raise InputError(f"{name} must have a batch dimension of at least 1, got shape {list(arr.shape)}")
        return int(arr.shape[0])

    def scalar(self, names: str | tuple[str, ...], kind: str, default: Any, batch_size: int = 1,
               lo: float | None = None, hi: float | None = None, lo_open: bool = False,
               required: bool = False) -> list[Any]:
        """One value per batch row of a `[batch, 1]` input (a single row is broadcast).
        `names` may list aliases; the first one sent is used and named in errors."""
        name, arr = self.first(*((names,) if isinstance(names, str) else names))
        if arr is None:
            if required:
                raise InputError(f"{name} is required")
            return [default] * batch_size
        if arr.dtype.kind not in _KIND_DTYPES[kind]:
            raise InputError(f"{name} must be {_KIND_NAMES[kind]}, got {arr.dtype}")
        flat = arr.reshape(arr.shape[0] if arr.ndim else 1, -1)
        if flat.shape[1] != 1:
            raise InputError(f"{name} must hold one value per batch row, got shape {list(arr.shape)}")
        if flat.shape[0] not in (1, batch_size):
            raise InputError(f"{name} has {flat.shape[0]} rows for a batch of {batch_size}")
        values = [v.item() for v in flat[:, 0]]
        if len(values) == 1 and batch_size > 1:
            values = values * batch_size
        for v in values:
            _check_range(name, v, lo, hi, lo_open)
        return values

    def strings(self, names: str | tuple[str, ...], batch_size: int = 1) -> tuple[str, list[list[str]]]:
        """A `[batch, n]` STRING input as lists of str per row (empty lists when absent)."""
        name, arr = self.first(*((names,) if isinstance(names, str) else names))
        if arr is None:
            return name, [[] for _ in range(batch_size)]
        if arr.dtype.kind not in "OSU":
            raise InputError(f"{name} must be STRING (BYTES), got {arr.dtype}")
        rows = arr.reshape(arr.shape[0] if arr.ndim else 1, -1)
        if rows.shape[0] not in (1, batch_size):
            raise InputError(f"{name} has {rows.shape[0]} rows for a batch of {batch_size}")
        out = []
        for row in rows:
            words = []
            for w in row:
                try:
                    words.append(w.decode("utf-8") if isinstance(w, bytes) else str(w))
                except UnicodeDecodeError:
                    raise InputError(f"{name} must be UTF-8 text") from None
            out.append(words)
        if len(out) == 1 and batch_size > 1:
            out = out * batch_size
        return name, out

    def reject_if_set(self, name: str, why: str) -> None:
        """Optional features this engine does not implement: fail loudly when actually used."""
        arr = self.array(name)
        if arr is None or arr.size == 0:
            return
        if arr.dtype.kind == "b" and not arr.any():
            return
        raise InputError(f"{name} is not supported: {why}")


def _check_range(name: str, v: Any, lo: float | None, hi: float | None, lo_open: bool) -> None:
    if isinstance(v, float) and math.isnan(v):
        raise InputError(f"{name} must be a number, got NaN")
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        lb = "(" if lo_open else "["
        lo_s = "-inf" if lo is None else lo
        hi_s = "inf" if hi is None else hi
        raise InputError(f"{name} must be in {lb}{lo_s}, {hi_s}], got {v}")


def respond_each(pb_utils: Any, requests: list[Any], process: Any, model: str) -> list[Any]:
    """One response per request of a non-decoupled model from `process(RequestInputs)`: a bad
    field becomes an INVALID_ARG error naming it, any other failure an INTERNAL one (logged);
    one request's failure never reaches the stub or the other requests."""
    responses = []
    for request in requests:
        try:
            responses.append(process(RequestInputs(request, pb_utils)))
        except InputError as e:
            responses.append(error_response(pb_utils, str(e)))
        except Exception as e:  # noqa: BLE001
            pb_utils.Logger.log_error(f"{model}: request failed: {e!r}")
            responses.append(error_response(pb_utils, f"internal error: {e}", "INTERNAL"))
    return responses


def prompt_tables(inputs: RequestInputs, batch: int) -> list[Any]:
    """Each row's prompt tuning table (rows, hidden) or None: `prompt_embedding_table`
    [batch, rows, hidden] (one row broadcasts), its first `prompt_vocab_size` rows (default: all).
    Prompt ids vocab_size + i read row i; the engine checks the hidden size and the ids."""
    import numpy as np

    arr = inputs.array("prompt_embedding_table")
    if arr is None:
        if inputs.array("prompt_vocab_size") is not None:
            raise InputError("prompt_vocab_size needs a prompt_embedding_table")
        return [None] * batch
    if arr.dtype.kind != "f":
        raise InputError(f"prompt_embedding_table must be FP16 or FP32, got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[0] not in (1, batch) or 0 in arr.shape:
        raise InputError(f"prompt_embedding_table must have shape [batch, rows, hidden], got {list(arr.shape)}")
    rows = inputs.scalar("prompt_vocab_size", "int", arr.shape[1], batch, lo=1, hi=arr.shape[1])
    return [np.ascontiguousarray(arr[b if arr.shape[0] > 1 else 0, :rows[b]], dtype=np.float32)
            for b in range(batch)]


def stack_logits(blocks: list[Any]) -> Any:
    """Per-sequence (tokens, vocab) float32 blocks -> `[1, sequences, tokens, vocab]`, zero-padded
    to the longest (tensorrtllm_backend's `generation_logits`)."""
    import numpy as np

    steps = max(len(b) for b in blocks)
    vocab = max((b.shape[1] for b in blocks if len(b)), default=0)
    arr = np.zeros((1, len(blocks), steps, vocab), dtype=np.float32)
    for k, b in enumerate(blocks):
        arr[0, k, :len(b)] = b
    return arr


def error_response(pb_utils: Any, message: str, code: Any = "INVALID_ARG") -> Any:
    """An error response; `code` is a `TritonError` code name ("INVALID_ARG", "UNAVAILABLE",
    "INTERNAL", ...) or a code value taken from another error. Uses Triton's error codes when
    this backend version has them."""
    code_value = getattr(pb_utils.TritonError, code, None) if isinstance(code, str) else code
    if code_value is None:
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code_value))
