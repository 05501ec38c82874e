"""The Triton paged-attention kernels equal the plain-torch reference (`paged_attention_torch`).

Run on CPU under TRITON_INTERPRET=1 (see conftest.py) on tiny shapes. Every case uses a shuffled
(non-contiguous) block table, and the kernels read a cache whose every slot that holds no
context token is NaN: one read outside a sequence's context would poison the output. The
reference reads a clean copy of the same cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from runtime_lib.config import FP8_KV_DTYPE
from runtime_lib.layers.attention import AttentionMetadata, paged_attention_torch

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@dataclass
class PagedCase:
    q: torch.Tensor              # (T, h, d)
    kv_clean: torch.Tensor       # (2, num_blocks, block_size, kvh, d), zeros outside contexts
    kv_poisoned: torch.Tensor    # same, NaN outside contexts
    meta: AttentionMetadata
    scale: float

    def reference(self, sliding_window: int | None = None) -> torch.Tensor:
        """fp32 ground truth from the torch path."""
        return paged_attention_torch(self.q.float(), self.kv_clean.float(), self.meta, self.scale,
                                     sliding_window)


def make_case(query_lens: list[int], context_lens: list[int], *, num_heads: int = 4, num_kv_heads: int = 2,
              head_size: int = 64, block_size: int = 16, dtype: torch.dtype = torch.float32,
              spare_blocks: int = 3, seed: int = 0) -> PagedCase:
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks + 1
    # Block 0 stays unused so the zero padding of block tables points at a real (NaN) block.
    order = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    tables, used = [], 0
    for n in blocks_per_seq:
        tables.append(order[used:used + n])
        used += n
    kv_clean = torch.zeros(2, num_blocks, block_size, num_kv_heads, head_size, dtype=dtype)
    kv_poisoned = torch.full_like(kv_clean, float("nan"))
    for table, ctx in zip(tables, context_lens):
        for pos in range(ctx):
            block, slot = table[pos // block_size], pos % block_size
            kv_clean[:, block, slot] = torch.randn(2, num_kv_heads, head_size, generator=gen).to(dtype)
            kv_poisoned[:, block, slot] = kv_clean[:, block, slot]
    meta = AttentionMetadata.build(query_lens, context_lens, tables, block_size)
    q = torch.randn(sum(query_lens), num_heads, head_size, generator=gen).to(dtype)
    return PagedCase(q, kv_clean, kv_poisoned, meta, head_size ** -0.5)


def run_decode(kernels, case: PagedCase, sliding_window: int | None = None, **kw) -> torch.Tensor:
    m = case.meta
    return kernels.decode(case.q, case.kv_poisoned, m.block_tables, m.context_lens, case.scale,
                          sliding_window, m.max_context_len, **kw)


def run_varlen(kernels, case: PagedCase, sliding_window: int | None = None, **kw) -> torch.Tensor:
    m = case.meta
    return kernels.varlen(case.q, case.kv_poisoned, m.block_tables, m.context_lens, m.cu_query_lens,
                          m.max_query_len, case.scale, sliding_window, max_context_len=m.max_context_len, **kw)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype
    assert torch.isfinite(out).all(), "kernel read a slot outside a sequence's context"
    torch.testing.assert_close(out.float(), ref, atol=TOL[dtype], rtol=TOL[dtype])


# Ragged lengths on both sides of block boundaries (block_size 16): 1, 15, 16, 17, 33, 70.
RAGGED = [1, 15, 16, 17, 33, 70]


class TestDecode:
    @pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (4, 2), (8, 2)])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    def test_matches_reference_for_gqa_ratios_and_dtypes(self, kernels, num_heads, num_kv_heads, dtype):
        case = make_case([1] * len(RAGGED), RAGGED, num_heads=num_heads, num_kv_heads=num_kv_heads, dtype=dtype)
        assert_close(run_decode(kernels, case), case.reference(), dtype)

    @pytest.mark.parametrize("partition_size", [16, 32, 64])
    def test_split_k_partials_merge_to_the_single_pass_result(self, kernels, partition_size):
        case = make_case([1] * len(RAGGED), RAGGED, num_heads=8, num_kv_heads=2)
        assert_close(run_decode(kernels, case, partition_size=partition_size), case.reference(), torch.float32)

    @pytest.mark.parametrize("max_partition_size", [128, 2048])
    def test_rows_far_shorter_than_a_graphs_bound_split_their_own_context(self, kernels, max_partition_size):
        # A graph fixes the partition count from its bound (4096 here); each row cuts its own
        # context into slices (the 300-token row: 3 capped at 128 tokens, or 2 of 192), and the
        # merge still matches.
        case = make_case([1, 1, 1], [5, 300, 40], num_heads=8, num_kv_heads=2)
        m = case.meta
        out = kernels.decode(case.q, case.kv_poisoned, m.block_tables, m.context_lens, case.scale,
                             max_context_len=4096, tuning=kernels.DecodeTuning(max_partition_size=max_partition_size))
        assert_close(out, case.reference(), torch.float32)

    def test_many_partitions_merge_in_one_launch_and_leave_the_arrival_counters_at_zero(self, kernels):
        # 300 tokens / 16 per partition = 19 partitions; the last to arrive merges them and
        # resets its counter, so the next launch (or graph replay) starts from zero.
        import sys

        arrivals = sys.modules[kernels.decode.__module__].arrival_counters
        case = make_case([1, 1], [300, 150], num_heads=4, num_kv_heads=4, block_size=32)
        for _ in range(2):
            assert_close(run_decode(kernels, case, partition_size=16), case.reference(), torch.float32)
            assert not arrivals(case.q.device, 8).any()

    @pytest.mark.parametrize("block_size,head_size", [(16, 128), (32, 64), (64, 128)])
    def test_block_and_head_sizes(self, kernels, block_size, head_size):
        case = make_case([1, 1, 1], [block_size - 1, block_size + 1, 3 * block_size],
                         head_size=head_size, block_size=block_size, dtype=torch.bfloat16)
        assert_close(run_decode(kernels, case), case.reference(), torch.bfloat16)
        assert_close(run_decode(kernels, case, partition_size=32), case.reference(), torch.bfloat16)

    @pytest.mark.parametrize("window", [1, 5, 16, 40, 1000])
    @pytest.mark.parametrize("partition_size", [None, 16])
    def test_sliding_window_including_partitions_left_empty(self, kernels, window, partition_size):
        case = make_case([1] * len(RAGGED), RAGGED)
        out = run_decode(kernels, case, sliding_window=window, partition_size=partition_size)
        assert_close(out, case.reference(window), torch.float32)

    @pytest.mark.parametrize("partition_size", [None, 16])
    def test_padded_slot_with_empty_context_outputs_zeros(self, kernels, partition_size):
        case = make_case([1, 1], [20, 7])
        m = case.meta
        context_lens = torch.tensor([20, 0], dtype=torch.int32)  # slot 1 is CUDA-graph padding
        out = kernels.decode(case.q[:2], case.kv_poisoned, m.block_tables, context_lens, case.scale,
                             max_context_len=20, partition_size=partition_size)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        torch.testing.assert_close(out[0], case.reference()[0], atol=2e-5, rtol=2e-5)

    def test_max_context_len_defaults_to_block_table_capacity(self, kernels):
        # No host int given: the bound is max_blocks * block_size and the result is unchanged.
        case = make_case([1] * 3, [5, 40, 70])
        m = case.meta
        out = kernels.decode(case.q, case.kv_poisoned, m.block_tables, m.context_lens, case.scale)
        assert_close(out, case.reference(), torch.float32)

    def test_query_view_of_a_fused_qkv_projection(self, kernels):
        # q sliced out of a (B, (h + 2 kvh) * d) qkv tensor: row stride larger than h * d.
        case = make_case([1] * 3, [9, 33, 50], num_heads=4, num_kv_heads=2)
        B, h, d = case.q.shape
        qkv = torch.randn(B, (h + 4) * d)
        qkv[:, : h * d] = case.q.reshape(B, h * d)
        q_view = qkv[:, : h * d].view(B, h, d)
        assert not q_view.is_contiguous()
        m = case.meta
        out = kernels.decode(q_view, case.kv_poisoned, m.block_tables, m.context_lens, case.scale,
                             max_context_len=m.max_context_len)
        assert_close(out, case.reference(), torch.float32)

    def test_partition_size_grows_with_batch_and_shrinks_for_a_lone_long_sequence(self, kernels):
        choose = kernels.choose_partition_size
        lone = choose(num_seqs=1, num_kv_heads=8, max_context_len=4096, parallelism=132, block_n=64,
                      max_partition_size=2048)
        many = choose(num_seqs=256, num_kv_heads=8, max_context_len=4096, parallelism=132, block_n=64,
                      max_partition_size=2048)
        assert lone < many == 2048
        assert 1 * 8 * (4096 // lone) >= 132  # a single sequence still fills the device

    def test_rejects_bad_inputs_naming_the_field(self, kernels):
        case = make_case([1], [10])
        m = case.meta
        with pytest.raises(ValueError, match="block_tables/context_lens must be int32"):
            kernels.decode(case.q, case.kv_poisoned, m.block_tables.long(), m.context_lens, case.scale)
        with pytest.raises(ValueError, match="partition_size must be a power of two"):
            run_decode(kernels, case, partition_size=24)
        with pytest.raises(ValueError, match="sliding_window must be a positive int"):
            run_decode(kernels, case, sliding_window=0)
        with pytest.raises(ValueError, match=r"one token per sequence: q.shape\[0\]=2"):
            kernels.decode(torch.cat([case.q, case.q]), case.kv_poisoned, m.block_tables, m.context_lens,
                           case.scale)
        with pytest.raises(ValueError, match="num_heads=3 must be a multiple of num_kv_heads=2"):
            kernels.decode(case.q[:, :3], case.kv_poisoned, m.block_tables, m.context_lens, case.scale)


class TestVarlen:
    @pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (4, 2), (8, 2)])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    def test_mixed_prefill_chunked_prefill_and_decode(self, kernels, num_heads, num_kv_heads, dtype):
        # Fresh prompt, chunk on top of a cached prefix crossing blocks, decode tokens, 1-token prompt.
        query_lens, context_lens = [12, 9, 1, 1, 20], [12, 41, 17, 70, 20 + 13]
        case = make_case(query_lens, context_lens, num_heads=num_heads, num_kv_heads=num_kv_heads, dtype=dtype)
        assert_close(run_varlen(kernels, case), case.reference(), dtype)

    @pytest.mark.parametrize("window", [None, 5])
    def test_decode_rows_in_one_launch_or_split_off_agree(self, kernels, window):
        # split_decode=False: one-token sequences run as (mostly idle) varlen tiles; True: through
        # the split-K decode kernel writing into the same output rows (forced into 3 partitions).
        case = make_case([1, 30, 1, 1, 4], [70, 45, 1, 33, 4], num_heads=8, num_kv_heads=2)
        ref = case.reference(window)
        assert_close(run_varlen(kernels, case, window, split_decode=False), ref, torch.float32)
        assert_close(run_varlen(kernels, case, window, decode_tuning=kernels.DecodeTuning(max_partition_size=32)),
                     ref, torch.float32)

    @pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (8, 2)])
    def test_long_prompt_spans_several_query_tiles(self, kernels, num_heads, num_kv_heads):
        # 150 queries: several BLOCK_Q tiles per sequence for both group sizes; 2nd seq has a prefix.
        case = make_case([150, 37], [150, 37 + 50], num_heads=num_heads, num_kv_heads=num_kv_heads,
                         head_size=32, block_size=32)
        assert_close(run_varlen(kernels, case), case.reference(), torch.float32)

    @pytest.mark.parametrize("window", [1, 4, 16, 50])
    def test_sliding_window(self, kernels, window):
        case = make_case([20, 1, 7], [20, 45, 7 + 30], num_heads=4, num_kv_heads=1)
        assert_close(run_varlen(kernels, case, sliding_window=window), case.reference(window), torch.float32)

    @pytest.mark.parametrize("block_size,head_size", [(32, 128), (64, 64)])
    def test_block_and_head_sizes(self, kernels, block_size, head_size):
        case = make_case([5, 30], [5 + block_size, 30], head_size=head_size, block_size=block_size,
                         dtype=torch.bfloat16)
        assert_close(run_varlen(kernels, case), case.reference(), torch.bfloat16)

    def test_all_decode_batch_equals_the_decode_kernel(self, kernels):
        case = make_case([1] * len(RAGGED), RAGGED, num_heads=8, num_kv_heads=2)
        torch.testing.assert_close(run_varlen(kernels, case), run_decode(kernels, case), atol=2e-5, rtol=2e-5)

    def test_rejects_a_head_size_that_is_not_a_power_of_two(self, kernels):
        case = make_case([3], [3], head_size=48)
        with pytest.raises(ValueError, match="head_size must be a power of two >= 16 for the varlen kernel, got 48"):
            run_varlen(kernels, case)

    def test_rejects_cu_query_lens_of_the_wrong_shape(self, kernels):
        case = make_case([3, 2], [3, 2])
        m = case.meta
        with pytest.raises(ValueError, match=r"cu_query_lens must be int32 of shape \(B\+1,\)=\(3,\)"):
            kernels.varlen(case.q, case.kv_poisoned, m.block_tables, m.context_lens, m.cu_query_lens[:2],
                           m.max_query_len, case.scale)


class TestFp8Cache:
    """An FP8 (e4m3) cache: the kernels cast each K/V tile to q's dtype after the load, so they
    equal the torch path over the same FP8 values (NaN outside the contexts stays NaN in FP8)."""

    @staticmethod
    def fp8(case: PagedCase) -> PagedCase:
        return PagedCase(case.q, case.kv_clean.to(FP8_KV_DTYPE), case.kv_poisoned.to(FP8_KV_DTYPE), case.meta,
                         case.scale)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_decode(self, kernels, dtype):
        case = self.fp8(make_case([1] * len(RAGGED), RAGGED, num_heads=8, num_kv_heads=2, dtype=dtype))
        assert torch.isnan(case.kv_poisoned.float()).any()
        assert_close(run_decode(kernels, case), case.reference(), dtype)
        assert_close(run_decode(kernels, case, partition_size=16), case.reference(), dtype)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_varlen_mixed_step(self, kernels, dtype):
        case = self.fp8(make_case([12, 9, 1, 1, 20], [12, 41, 17, 70, 33], dtype=dtype))
        assert_close(run_varlen(kernels, case), case.reference(), dtype)
        assert_close(kernels.dispatch(case.q, case.kv_poisoned, case.meta, case.scale), case.reference(), dtype)

    def test_fp8_rounding_is_what_the_reference_reads(self):
        # Guard for the two tests above: the FP8 cache really differs from the bf16 one.
        case = make_case([1, 1], [20, 33], dtype=torch.bfloat16)
        assert not torch.equal(self.fp8(case).kv_clean.float(), case.kv_clean.float())


class TestDispatch:
    """`paged_attention_triton` is what `layers.attention.paged_attention` calls on CUDA tensors."""

    @pytest.mark.parametrize("query_lens,context_lens", [([1, 1, 1], [5, 40, 70]), ([1, 12, 1], [33, 20, 3])],
                             ids=["decode", "mixed"])
    def test_decode_and_mixed_steps_match_the_torch_path(self, kernels, query_lens, context_lens):
        case = make_case(query_lens, context_lens, num_heads=4, num_kv_heads=2)
        assert case.meta.is_decode == (max(query_lens) == 1)
        out = kernels.dispatch(case.q, case.kv_poisoned, case.meta, case.scale, 9)
        assert_close(out, case.reference(9), torch.float32)

    def test_metadata_without_cu_query_lens(self, kernels):
        case = make_case([4, 1], [10, 30])
        case.meta.cu_query_lens = None
        assert_close(kernels.dispatch(case.q, case.kv_poisoned, case.meta, case.scale), case.reference(),
                     torch.float32)

    def test_head_size_outside_the_kernels_falls_back_to_torch(self, kernels):
        case = make_case([3, 1], [3, 20], head_size=48)
        out = kernels.dispatch(case.q, case.kv_clean, case.meta, case.scale)
        torch.testing.assert_close(out, case.reference())
