"""Build the Triton IR of kernels for an sm_90 target on a machine without a GPU: what the
compiler's front end (type checks, constexpr branches, shapes) rejects shows up here, not only
on the lent GPU. The interpreter (TRITON_INTERPRET) never runs these checks, so this runs in a
child process without it: `python build_ir.py` prints one line per kernel variant built.

Signatures are derived from parameter names: `*_ptr` are pointers (dtype from the table),
`eps`/`scale*` fp32, other runtime ints i32; constexprs come from each case."""
from __future__ import annotations

import sys

import triton._C.libtriton as libtriton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend

FLOATS = ("eps", "scale_log2")


def signature(fn, constexprs: dict, pointers: dict[str, str], default_ptr: str) -> dict[str, str]:
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name] = pointers.get(p.name, default_ptr)
        else:
            sig[p.name] = "fp32" if p.name in FLOATS else "i32"
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in constexprs]
    if missing:
        raise ValueError(f"{fn.__name__}: no value for constexprs {missing}")
    return sig


def build(fn, constexprs: dict, pointers: dict[str, str], *, default_ptr: str = "*bf16", num_warps: int = 4) -> int:
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    options = backend.parse_options({"num_warps": num_warps})
    ctx = libtriton.ir.context()
    libtriton.ir.load_dialects(ctx)
    backend.load_dialects(ctx)
    src = ASTSource(fn, signature(fn, constexprs, pointers, default_ptr), constexprs=constexprs)
    module = src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(), ctx)
    return len(str(module))


def cases():
    from runtime_lib.kernels import paged_attention, qkv_rope_kv, rope_kv, small_linear

    int_ptrs = {"positions_ptr": "*i64", "slot_ptr": "*i64", "block_table_ptr": "*i32", "context_lens_ptr": "*i32",
                "arrivals_ptr": "*i32", "cos_ptr": "*fp32", "sin_ptr": "*fp32"}
    fp8_cache = {"k_cache_ptr": "*fp8e4nv", "v_cache_ptr": "*fp8e4nv"}
    for attend in (False, True):
        for window in (False, True):
            for cache, ptrs in (("bf16", {}), ("fp8", fp8_cache)):
                yield (f"qkv_rope_kv attend={attend} window={window} cache={cache}", qkv_rope_kv._qkv_rope_kv_kernel,
                       dict(HAS_BIAS=False, HEAD_SIZE=64, BLOCK_SIZE=16, BLOCK_N=8, BLOCK_K=1024, DOT_UPCAST=False,
                            RNE=False, USE_PDL=True, PREFETCH_COLS=16, ATTEND=attend, GROUP=4, BLOCK_G=16,
                            ATTN_BLOCK_N=128, HAS_WINDOW=window, INPUT_PRECISION="tf32"), {**int_ptrs, **ptrs})
    yield ("rope_kv cache=fp8", rope_kv._rope_kv_kernel, dict(BLOCK_SIZE=16, HEAD_SIZE=128, USE_PDL=True),
           {**int_ptrs, **fp8_cache})
    attn_ptrs = {"part_acc_ptr": "*fp32", "part_m_ptr": "*fp32", "part_l_ptr": "*fp32", "arrivals_ptr": "*i32",
                 "block_tables_ptr": "*i32", "context_lens_ptr": "*i32", "cu_q_ptr": "*i32"}
    fp8_kv = {"k_ptr": "*fp8e4nv", "v_ptr": "*fp8e4nv"}
    for parts in (False, True):
        for mixed in (False, True):
            for cache, ptrs, fp16 in (("bf16", {}, False), ("fp8", fp8_kv, False), ("fp8", fp8_kv, True)):
                yield (f"decode partitions={parts} mixed={mixed} cache={cache} dot_fp16={fp16}",
                       paged_attention._decode_partition_kernel,
                       dict(GROUP=4, BLOCK_G=16, HEAD_SIZE=128, BLOCK_D=128, BLOCK_SIZE=16, BLOCK_N=64,
                            USE_PARTITIONS=parts, HAS_WINDOW=True, INPUT_PRECISION="tf32", DOT_UPCAST=False,
                            DOT_FP16=fp16, MIXED=mixed, USE_PDL=True), {**attn_ptrs, **ptrs})
    for rows in (1, 16):   # small_linear over FP8 weights: the GEMV and the tensor-core tile
        for prologue in (1, 2):
            yield (f"small_linear fp8 weights rows={rows} prologue={prologue}", small_linear._small_linear_kernel,
                   dict(PROLOGUE=prologue, HAS_BIAS=True, HAS_RES=True, HAS_W_SCALE=True, BLOCK_M=rows, BLOCK_N=8,
                        BLOCK_K=256, INPUT_PRECISION="tf32", DOT_UPCAST=False, RNE=False, USE_PDL=True,
                        PREFETCH_COLS=2), {"w_ptr": "*fp8e4nv", "w_scale_ptr": "*fp32"})


def main() -> int:
    for name, fn, constexprs, pointers in cases():
        print(f"{name}: {build(fn, constexprs, pointers)} chars of TTIR")
    return 0


if __name__ == "__main__":
    sys.exit(main())
