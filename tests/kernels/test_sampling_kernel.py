"""The fused Gumbel-max kernel picks exactly what the torch form of `sample` picks:
argmax(vals + gumbel_noise(seed, step, id)). Run under TRITON_INTERPRET=1 (conftest.py)."""
from __future__ import annotations

import importlib

import pytest
import torch

from runtime_lib.sampling_ops import gumbel_noise


@pytest.fixture(scope="module")
def gumbel_argmax():
    from triton.runtime.interpreter import InterpretedFunction

    from runtime_lib.kernels import sampling

    if not isinstance(sampling._gumbel_argmax_kernel, InterpretedFunction):
        sampling = importlib.reload(sampling)
    return sampling.gumbel_argmax


def reference(vals, seeds, steps, idx):
    ids = torch.arange(vals.shape[1]).expand_as(vals) if idx is None else idx
    return (vals + gumbel_noise(seeds, steps, ids)).argmax(dim=-1)


@pytest.mark.parametrize("with_idx", [False, True])
@pytest.mark.parametrize("K, block", [(5, 2048), (300, 64), (1000, 128)])
def test_kernel_choice_equals_torch_noise_argmax(gumbel_argmax, with_idx, K, block):
    g = torch.Generator().manual_seed(K)
    S = 7
    vals = torch.randn(S, K, generator=g) * 2
    vals[0, 3:] = float("-inf")  # a row with only three candidates
    vals[1] = float("-inf")  # nothing allowed: position 0, as torch.argmax
    seeds = torch.tensor([0, 1, -1, 2**62, -(2**63), 12345, 2**63 - 1])  # uint64 bits as int64
    steps = torch.tensor([0, 5, 7, 2**40, 3, 1, 999])
    idx = torch.randint(0, 128_256, (S, K), generator=g) if with_idx else None
    got = gumbel_argmax(vals, seeds, steps, idx, block=block)
    assert got.tolist() == reference(vals, seeds, steps, idx).tolist()
    assert got[0] < 3 and got[1] == 0


def test_kernel_rejects_wrong_dtypes(gumbel_argmax):
    with pytest.raises(ValueError, match="float32"):
        gumbel_argmax(torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, dtype=torch.int64),
                      torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="idx must be int64"):
        gumbel_argmax(torch.zeros(2, 4), torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64),
                      torch.zeros(2, 4, dtype=torch.int32))
