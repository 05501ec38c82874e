"""The one-launch row argmax (`kernels/argmax.py`) is torch.argmax, ties to the first maximal
index, for any vocabulary size and slice count; its counters are left at zero for the next
launch. Runs on CPU under TRITON_INTERPRET=1 (conftest.py)."""
from __future__ import annotations

import types

import pytest
import torch


@pytest.fixture(scope="module")
def mod(interpreted) -> types.ModuleType:
    from runtime_lib.kernels import argmax

    return interpreted(argmax, "_argmax_kernel")


@pytest.mark.parametrize(("V", "chunks"), [(1000, 4), (1024, 32), (777, 8), (5, 16)])
def test_equals_torch_argmax_with_ties_to_the_first_index(mod, V, chunks):
    from runtime_lib.kernels.paged_attention import arrival_counters

    g = torch.Generator().manual_seed(V + chunks)
    # bf16-rounded logits tie often: the first maximal index must win, as with torch.argmax.
    x = torch.randn(5, V, generator=g).to(torch.bfloat16).float()
    x[1, V - 1] = x[1, min(3, V - 2)] = x[1].max() + 1      # a tie across slices
    x[2, 0] = x[2, 1] = x[2].max() + 1                      # a tie inside one slice
    x[3] = 0.0                                              # a flat row
    x[4] = float("-inf")                                    # nothing allowed: index 0, as torch
    got = mod.argmax_rows_triton(x, chunks)
    assert got.dtype == torch.int64 and torch.equal(got, x.argmax(dim=-1))
    assert not arrival_counters(x.device, 5)[:5].any()


def test_half_precision_rows_and_bad_arguments(mod):
    x = torch.randn(3, 300).to(torch.bfloat16)
    assert torch.equal(mod.argmax_rows_triton(x, 8), x.argmax(dim=-1))
    with pytest.raises(ValueError, match="chunks must be a power of two, got 6"):
        mod.argmax_rows_triton(x, 6)
    with pytest.raises(ValueError, match=r"x must be \(B, V\) float"):
        mod.argmax_rows_triton(x.long(), 8)
