"""Compile every Triton kernel of prefixkern for a GPU target without a GPU (Triton's compiler and
ptxas need none), over the constexpr combinations the launchers use. The interpreter that runs
the kernels on CPU tests cannot see what only the compiler rejects (non-constexpr globals, type
mismatches across branches, unsupported syntax, register/shared-memory limits); this does.

    python tests/tools/compile_triton_kernels.py [--arch 90] [--quick]

Must run without TRITON_INTERPRET (the kernels must be JITFunctions). Exits non-zero on failure.
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

FLOAT_SCALARS = {"sm_scale", "softcap", "dropout_p"}


def signature(kernel, constexprs: dict, pointer_types: dict, default_pointer: str):
    names = list(inspect.signature(kernel.fn).parameters)
    sig = {}
    for name in names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointer_types.get(name, default_pointer)
        elif name in FLOAT_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    missing = [n for n, t in sig.items() if t == "constexpr" and n not in constexprs]
    assert not missing, missing
    return names, sig


# The prefix MLP's inner strides that are 1 in every launch: its parameters, H and the dH
# partials are contiguous (the small GEMM's operands include transposed views: left general).
MLP_UNIT_STRIDES = {"stride_hk", "stride_w2k", "stride_dw2k", "stride_part_k", "stride_dzk"}
MULTIPLES_OF_16 = {"D", "HID", "N_PER_SPLIT"}


def _unit_stride(name: str) -> bool:
    # The attention kernels' head-dim strides (stride_qd, stride_kd, ...) are 1 in HF's layouts,
    # and Triton specialises a 1.
    return (name.startswith("stride") and name.endswith("d") and name != "stride_d") or name in MLP_UNIT_STRIDES


# The launchers pass an absent optional input as None (a constexpr): compile it that way too.
ABSENT_WHEN_OFF = {"HAS_PREFIX_INDEX": ("prefix_index_ptr",), "HAS_KPM": ("kpm_ptr",), "HAS_ALIBI": ("slopes_ptr",),
                   "HAS_POS": ("pos_ptr",), "HAS_DROPOUT": ("seed_ptr",),
                   "VARLEN": ("cu_seqlens_q_ptr", "cu_seqlens_k_ptr"),
                   "HAS_BIAS": ("bias_ptr", "b2_ptr", "db2_ptr", "db1_ptr"),
                   "FUSE_HIDDEN": ("e_ptr", "w1_ptr", "b1_ptr"), "HAS_B1": ("b1_ptr",),
                   # The dK/dV launch reads O and writes dQ only as the one-launch backward.
                   "WITH_DQ": ("out_ptr", "dq_ptr")}
# ... and the one-launch backward has no delta buffer (its dK/dV programs compute delta).
ABSENT_WHEN_ON = {"WITH_DQ": ("delta_ptr",)}


def _absent_inputs(kernel, constexprs: dict) -> dict:
    names = set(inspect.signature(kernel.fn).parameters)
    absent = [ptr for flag, ptrs in ABSENT_WHEN_OFF.items() if constexprs.get(flag) is False for ptr in ptrs]
    absent += [ptr for flag, ptrs in ABSENT_WHEN_ON.items() if constexprs.get(flag) is True for ptr in ptrs]
    return {ptr: None for ptr in absent if ptr in names}


def compile_kernel(kernel, constexprs, pointer_types, default_pointer, target, num_warps, num_stages):
    """Compile as a real launch would specialise it: unit innermost strides are constants and
    pointers and the other strides are known multiples of 16, so loads vectorise and the
    software pipeliner runs (without this the shared-memory figures are not a launch's).
    Returns Triton's CompiledKernel (``asm`` holds ttgir, ptx and cubin; ``metadata.shared``)."""
    from prefixkern.kernels._launch import FP_FUSION    # as launch_kernel asks for it

    constexprs = {**constexprs, **_absent_inputs(kernel, constexprs)}
    names, sig = signature(kernel, constexprs, pointer_types, default_pointer)
    ones = {n: 1 for n in names if _unit_stride(n) and n not in constexprs and sig[n] == "i32"}
    for name in ones:
        sig[name] = "constexpr"
    constants = {**constexprs, **ones}
    # Head dims 64/80/96/128/... are multiples of 16, which Triton also records for an int argument;
    # so are the prefix MLP's widths (N = 2*L*Hkv*D, its hidden size, the backward's N split).
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in constants and (n.endswith("_ptr") or n.startswith("stride") or n in MULTIPLES_OF_16)}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(k),): v for k, v in constants.items()},
                    attrs=attrs)
    return triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages,
                                                       "enable_fp_fusion": FP_FUSION})


def compile_one(kernel, constexprs, pointer_types, default_pointer, target, num_warps, num_stages):
    """(shared memory bytes, number of async copies in the TTGIR) of one compile."""
    compiled = compile_kernel(kernel, constexprs, pointer_types, default_pointer, target, num_warps, num_stages)
    return compiled.metadata.shared, compiled.asm.get("ttgir", "").count("async_copy_global_to_local")


def cases(quick: bool):
    from prefixkern.kernels import _attention_common as common
    from prefixkern.kernels import prefix_attention_bwd as bwd
    from prefixkern.kernels import prefix_attention_fwd as fwd
    from prefixkern.kernels import prefix_decode as dec
    from prefixkern.kernels import prefix_mlp as mlp

    flags_off = dict(HAS_PREFIX_INDEX=False, HAS_KPM=False, HAS_ALIBI=False, HAS_POS=False, HAS_SOFTCAP=False,
                     HAS_WINDOW=False, HAS_DROPOUT=False, VARLEN=False)
    flags_on = dict({k: True for k in flags_off}, VARLEN=False)   # packed rows take no padding mask
    flags_packed = dict(flags_on, HAS_KPM=False, HAS_POS=False, VARLEN=True)
    attn_ptrs = {"lse_ptr": "*fp32", "delta_ptr": "*fp32", "prefix_index_ptr": "*i64", "kpm_ptr": "*u8",
                 "slopes_ptr": "*fp32", "pos_ptr": "*fp32", "seed_ptr": "*i64", "cu_seqlens_q_ptr": "*i32",
                 "cu_seqlens_k_ptr": "*i32"}
    # (pointer type, head dim, its block, flags, causal, dot precision); each kernel at the first
    # config of its launcher's table, i.e. what runs when autotuning is off.
    variants = [("*bf16", 128, 128, flags_off, True, "ieee"),
                ("*fp16", 80, 128, flags_on, False, "ieee"),
                ("*fp32", 64, 64, flags_on, True, "tf32"),
                ("*bf16", 256, 256, dict(flags_off, HAS_KPM=True), True, "ieee"),
                ("*bf16", 96, 128, flags_packed, True, "ieee")]
    if quick:
        variants = variants[:2]
    for ptr, head_dim, block_d, flags, causal, precision in variants:
        kind = "packed" if flags["VARLEN"] else "flags" if flags["HAS_DROPOUT"] else "plain"
        tag = f"{ptr[1:]}-D{head_dim}-{kind}-{precision}"
        bucket = common.config_bucket(block_d, 4 if ptr == "*fp32" else 2)
        even = block_d == head_dim
        common_c = dict(GROUP=4, BLOCK_D=block_d, EVEN_D=even, CAUSAL=causal, INPUT_PRECISION=precision,
                        HEAVY_FIRST=causal)
        bm, bn, w, st = fwd.FWD_CONFIGS[bucket][0]
        yield (f"fwd {tag}", fwd.prefix_attention_fwd_kernel, dict(common_c, BLOCK_M=bm, BLOCK_N=bn, **flags),
               attn_ptrs, ptr, w, st)
        bm, bn, w, st = bwd.DQ_CONFIGS[bucket][0]
        yield (f"bwd-dq {tag}", bwd.prefix_attention_bwd_dq_kernel, dict(common_c, BLOCK_M=bm, BLOCK_N=bn, **flags),
               attn_ptrs, ptr, w, st)
        bm, bn, w, st = bwd.DKDV_CONFIGS[bucket][0]
        dkdv_c = dict(common_c, BLOCK_M=bm, BLOCK_N=bn, PREFIX_BLOCK_N=min(bn, 32),
                      SHARED=not flags["HAS_PREFIX_INDEX"], **flags)
        yield (f"bwd-dkdv {tag}", bwd.prefix_attention_bwd_dkdv_kernel, dict(dkdv_c, HEAD_SPLITS=1, WITH_DQ=False),
               dict(attn_ptrs, partial_ptr="*fp32"), ptr, w, st)
        # The GQA group's heads shared out between programs (float32 dK/dV partials).
        yield (f"bwd-dkdv-splits {tag}", bwd.prefix_attention_bwd_dkdv_kernel,
               dict(dkdv_c, HEAD_SPLITS=2, WITH_DQ=False),
               dict(attn_ptrs, partial_ptr="*fp32", dk_ptr="*fp32", dv_ptr="*fp32"), ptr, w, st)
        # The whole backward in one launch (the dQ programs after the dK/dV ones), at its own tiles.
        if bucket in bwd.ONE_LAUNCH_CONFIGS:
            bm, bn, w, st = bwd.ONE_LAUNCH_CONFIGS[bucket][0]
            yield (f"bwd-one-launch {tag}", bwd.prefix_attention_bwd_dkdv_kernel,
                   dict(dkdv_c, BLOCK_M=bm, BLOCK_N=bn, PREFIX_BLOCK_N=min(bn, 32), HEAD_SPLITS=1, WITH_DQ=True),
                   dict(attn_ptrs, partial_ptr="*fp32"), ptr, w, st)
    # The decode kernel at its launcher's first config: GQA 4 x 1 position (a 16-row tile), padding
    # and per-task prefixes on and off, 16-bit and float32.
    for ptr, head_dim, flags_on_off, precision in (("*bf16", 128, False, "ieee"), ("*fp16", 64, True, "ieee"),
                                                   ("*fp32", 128, True, "tf32"), ("*bf16", 256, True, "ieee")):
        block_d = max(64, head_dim)
        bn, w, st = dec.DECODE_CONFIGS[(4 if ptr == "*fp32" else 2, block_d)][0]
        yield (f"decode {ptr[1:]}-D{head_dim}-{'flags' if flags_on_off else 'plain'}-{precision}",
               dec.prefix_decode_partial_kernel,
               dict(GROUP=4, BLOCK_M=16, BLOCK_N=bn, BLOCK_D=block_d, EVEN_D=True, HAS_PREFIX_INDEX=flags_on_off,
                    HAS_KPM=flags_on_off, INPUT_PRECISION=precision),
               dict(attn_ptrs, out_ptr="*fp32"), ptr, w, st)
    # Its merge of the key chunks, at the launcher's rows per program for each head-dim block.
    for out_ptr, block_d in (("*bf16", 128), ("*fp16", 64), ("*fp32", 256)):
        yield (f"decode-merge {out_ptr[1:]}-D{block_d}", dec.prefix_decode_merge_kernel,
               dict(BLOCK_R=max(1, min(64, 4096 // block_d)), BLOCK_D=block_d),
               {"out_ptr": out_ptr}, "*fp32", 4, 1)
    yield ("dropout-mask", common.dropout_keep_mask_kernel, dict(BLOCK_M=32, BLOCK_N=64),
           {"seed_ptr": "*i64", "keep_ptr": "*i8"}, "*fp32", 4, 1)
    # (output / gradient pointer, the first GEMMs' precision, the second GEMM's): float32 parameters
    # exactly (FMA or 3xTF32 products) and with TF32, and under bf16 and fp16 autocast (16-bit products).
    for out_ptr, first, second in (("*bf16", "ieee", "tf32"), ("*fp32", "ieee", "tf32"), ("*bf16", "tf32x3", "tf32x3"),
                                   ("*bf16", "bf16", "bf16"), ("*fp16", "fp16", "fp16")):
        yield (f"mlp-matmul {out_ptr} {first}", mlp.prefix_mlp_matmul_kernel,
               dict(HAS_BIAS=True, APPLY_TANH=True, PRECISION=first, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64),
               {"c_ptr": "*fp32"}, "*fp32", 4, 3)
        yield (f"mlp-matmul-pair {out_ptr} {first}", mlp.prefix_mlp_matmul_pair_kernel,
               dict(PRECISION=first, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64), {"c1_ptr": "*fp32", "c2_ptr": "*fp32"},
               "*fp32", 4, 3)
        yield (f"mlp-fwd {out_ptr} {second}", mlp.prefix_mlp_fwd_kernel,
               dict(HAS_BIAS=True, HAS_DROPOUT=True, PRECISION=second, BLOCK_P=32, BLOCK_N=64, BLOCK_K=32,
                    FUSE_HIDDEN=False, HAS_B1=False, BLOCK_D=16, W2_LHS=False),
               {"out_ptr": out_ptr, "seed_ptr": "*i64"}, "*fp32", 4, 3)
        yield (f"mlp-bwd-first {out_ptr} {first}", mlp.prefix_mlp_bwd_first_kernel,
               dict(HAS_BIAS=True, PRECISION=first, **dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), mlp.BWD_FIRST_TILE))),
               {"de_ptr": "*fp32", "dw1_ptr": "*fp32", "db1_ptr": "*fp32"}, "*fp32", *mlp.BWD_FIRST_TILE[3:])
        # The one-launch forward of small MLPs (H computed in the kernel).
        yield (f"mlp-fwd-fused {out_ptr} {second}", mlp.prefix_mlp_fwd_kernel,
               dict(HAS_BIAS=True, HAS_DROPOUT=True, PRECISION=second, BLOCK_P=32, BLOCK_N=64, BLOCK_K=32,
                    FUSE_HIDDEN=True, HAS_B1=True, BLOCK_D=mlp.FUSED_BLOCK_D, W2_LHS=False),
               {"out_ptr": out_ptr, "seed_ptr": "*i64"}, "*fp32", 4, 3)
        bp = mlp.bwd_block_p(64, first)
        table = mlp.BWD_TWO_LAUNCH_TILES[mlp._bwd_table(first)]     # (first's table, as the launcher)
        two_launch, strips = table[0], next(t for t in table if t.dw_strips)
        for roles, tile in (("both", mlp.bwd_candidates(64, first)[0]), ("dh", two_launch), ("dw2", two_launch),
                            ("dw2_strip", strips)):
            warps, stages = (tile.dw_num_warps, tile.dw_num_stages) if roles.startswith("dw2") else (tile.num_warps,
                                                                                                     tile.num_stages)
            yield (f"mlp-bwd {roles} {out_ptr} {first}", mlp.prefix_mlp_bwd_kernel,
                   dict(HAS_BIAS=True, PRECISION=first, ROLES=roles, DH_BLOCK_P=bp, DH_BLOCK_N=tile.dh_block_n,
                        DH_BLOCK_K=tile.dh_block_k, DW_BLOCK_P=bp if roles == "dw2_strip" else mlp.bwd_dw_block_p(bp),
                        DW_BLOCK_N=tile.dw_block_n, DW_BLOCK_K=tile.dw_block_k, D_TILE=128,
                        DH_W2_LHS=tile.dh_w2_lhs), {"g_ptr": out_ptr}, "*fp32", warps,
                   stages)
    yield ("mlp-bwd-hidden", mlp.prefix_mlp_bwd_hidden_kernel, dict(HAS_BIAS=True, BLOCK_P=32, BLOCK_K=64),
           {}, "*fp32", 4, 1)
    yield ("mlp-kv-copy", mlp.prefix_kv_copy_kernel, dict(HAS_DROPOUT=True, BLOCK_P=32, BLOCK_N=128),
           {"dst_ptr": "*bf16", "seed_ptr": "*i64"}, "*fp32", 4, 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    failures = []
    for name, kernel, constexprs, ptrs, default_ptr, warps, stages in cases(args.quick):
        start = time.time()
        try:
            smem, async_copies = compile_one(kernel, constexprs, ptrs, default_ptr, target, warps, stages)
            print(f"ok   {name:45s} smem {smem:6d} B  async copies {async_copies:3d}  {time.time() - start:5.1f} s",
                  flush=True)
        except Exception as exc:   # report every failure, then fail
            failures.append(name)
            print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:3000]}", flush=True)
    if failures:
        print(f"{len(failures)} kernel(s) failed to compile: {failures}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
