"""Run the Triton kernels on CPU through Triton's interpreter (TRITON_INTERPRET=1).

`triton.jit` picks interpreter or compiler when a kernel is *decorated*, i.e. when the kernel
module is imported, so the variable is set here, before any test module imports them; the
`kernels` fixture reloads them if something imported them earlier without it."""
from __future__ import annotations

import importlib
import os
import types

os.environ["TRITON_INTERPRET"] = "1"

import pytest

triton = pytest.importorskip("triton")


@pytest.fixture(scope="session")
def kernels() -> types.SimpleNamespace:
    from triton.runtime.interpreter import InterpretedFunction

    from runtime_lib.kernels import attention_dispatch, paged_attention, varlen_attention

    if not isinstance(paged_attention._decode_partition_kernel, InterpretedFunction):
        paged_attention = importlib.reload(paged_attention)
        varlen_attention = importlib.reload(varlen_attention)
        attention_dispatch = importlib.reload(attention_dispatch)
    assert isinstance(paged_attention._decode_partition_kernel, InterpretedFunction)
    assert isinstance(varlen_attention._varlen_kernel, InterpretedFunction)
    return types.SimpleNamespace(decode=paged_attention.paged_decode_attention,
                                 varlen=varlen_attention.paged_varlen_attention,
                                 choose_partition_size=paged_attention.choose_partition_size,
                                 DecodeTuning=paged_attention.DecodeTuning,
                                 dispatch=attention_dispatch.paged_attention_triton)


@pytest.fixture(scope="session")
def interpreted():
    """`interpreted(module, kernel_name)`: the kernel module with that kernel interpreted,
    reloaded if something imported it compiled before this conftest set TRITON_INTERPRET.
    Reload dependencies first (a module keeps the functions it imported from another)."""
    from triton.runtime.interpreter import InterpretedFunction

    def reload_if_compiled(module: types.ModuleType, kernel: str) -> types.ModuleType:
        if not isinstance(getattr(module, kernel), InterpretedFunction):
            module = importlib.reload(module)
        assert isinstance(getattr(module, kernel), InterpretedFunction)
        return module

    return reload_if_compiled
