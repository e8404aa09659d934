"""Registers, spills and shared memory of every attention-kernel config the launchers may pick,
compiled for a GPU target without a GPU (Triton's compiler and ptxas need none).

A config that spills registers to local memory inside the main loop runs several times slower
than one that does not, and no timing run shows *why*; this does. Every candidate of the
launchers' tables (``FWD_CONFIGS`` and ``SHORT_QUERY_CONFIGS``, ``DQ_CONFIGS``, ``DKDV_CONFIGS``: the dK/dV launch's
prefix programs at the same tiles) is
compiled under flag sets: ``plain`` (causal), ``padded`` (causal + a padding mask, the path of
every padded Hugging Face batch), ``packed`` (``prefix_attention_varlen``), what GPT-2, BLOOM and Gemma 2 add to that (``dropout``,
``alibi``, ``softcap-window``) and ``all`` (every optional feature on).

    python tests/tools/kernel_resources.py [--arch 90] [--kernels attention,mlp] [--bucket 2:128 ...]
                                           [--flags plain,padded] [--heavy-first all|first] [--check]
                                           [--markdown] [--precisions ieee,tf32x3,tf32,bf16,fp16] [--sass]

The prefix MLP's candidates (``--kernels mlp``) are checked per dot precision: the backward's
``BWD_TILES`` and two-launch tiles at each P tile (each launch's kernel), the forward's configs as
fwd_candidates leaves them for each P tile the launcher uses, and the small-GEMM configs. They are
compiled as a launch specialises them: unit inner strides, widths that are multiples of 16. There
``--check`` fails on a spill in a table's first candidate (the one used with autotuning off) or in
every candidate of one; another spilling candidate is reported, as the tuner drops it at run time
(``pick_config``).

``--kernels grid`` compiles every variant the GPU test grids (dense and packed) launch (about 1200;
a failed compile fails ``--check``, spills are reported only).
``--check`` exits non-zero if a candidate spills under ``plain`` or ``padded`` (under ``packed``:
the first candidate of a table, the one used with autotuning off; spills count only on the Triton
the tables are tuned on, ``TABLES_TUNED_ON``, and are reported elsewhere), or if a kernel's
compiled shared memory exceeds what the launchers' model (``smem_rows``) budgets for it.
Each attention candidate is compiled twice, its causal programs in launch order (``order`` in the
output) and heaviest first (``heavy``, ``HEAVY_FIRST``: what a causal launch takes where K/V fit
the L2). The heavy-first variants read their query block differently, which moves ptxas's
allocation at the edge of the register file: there only a table's first candidate must not
spill; another that does is reported, and the tuner drops it at run time.
``--sass`` adds each attention kernel's SASS instruction count and its multiply-highs (Philox's
rounds, where dropout is on), disassembled with the cuobjdump Triton ships.
Must run without TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from compile_triton_kernels import compile_kernel  # noqa: E402

FLAGS_OFF = dict(HAS_PREFIX_INDEX=False, HAS_KPM=False, HAS_ALIBI=False, HAS_POS=False, HAS_SOFTCAP=False,
                 HAS_WINDOW=False, HAS_DROPOUT=False, VARLEN=False)
FLAG_SETS = {
    "plain": FLAGS_OFF,
    "padded": dict(FLAGS_OFF, HAS_KPM=True),
    "packed": dict(FLAGS_OFF, VARLEN=True),                                         # prefix_attention_varlen
    # What the patched families add to a padded batch.
    "dropout": dict(FLAGS_OFF, HAS_KPM=True, HAS_DROPOUT=True),                    # GPT-2 training
    "alibi": dict(FLAGS_OFF, HAS_KPM=True, HAS_ALIBI=True, HAS_POS=True),           # BLOOM
    "softcap-window": dict(FLAGS_OFF, HAS_KPM=True, HAS_SOFTCAP=True, HAS_WINDOW=True),  # Gemma 2
    "all": dict({name: True for name in FLAGS_OFF}, VARLEN=False),   # packed rows take no padding mask
}
CHECKED_FLAG_SETS = ("plain", "padded", "packed")
# The Triton release the tile tables are tuned on and held to no spills (CI's). Another release's
# ptxas input differs a little, and a few candidates spill there (on 3.6 and 3.8: 4-116 B, some
# of them a table's first on 3.8, the padded 16-bit head-dim-256 forward's and dQ's): there
# ``--check`` reports spills without failing. At run time the tuner drops a spilling candidate,
# autotuning on or off (``pick_config``), so a spill costs nothing but the tile it would have been.
TABLES_TUNED_ON = (3, 9)


def holds_spills() -> bool:
    """Whether ``--check`` fails on spills: on the Triton the tables are tuned on."""
    return tuple(int(part) for part in triton.__version__.split(".")[:2]) == TABLES_TUNED_ON
POINTERS = {"lse_ptr": "*fp32", "delta_ptr": "*fp32", "prefix_index_ptr": "*i64", "kpm_ptr": "*u8",
            "slopes_ptr": "*fp32", "pos_ptr": "*fp32", "seed_ptr": "*i64", "partial_ptr": "*fp32",
            "cu_seqlens_q_ptr": "*i32", "cu_seqlens_k_ptr": "*i32"}


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers per thread, spill-store bytes) that the ptxas Triton itself uses reports."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        gpu_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"   # Triton targets sm_90a on Hopper
        try:
            ptxas = get_ptxas(arch)
        except TypeError:       # Triton 3.4/3.5: get_ptxas() takes no architecture
            ptxas = get_ptxas()
        result = subprocess.run([ptxas.path, "-v", f"--gpu-name={gpu_name}", "-o", os.devnull, f.name],
                                capture_output=True, text=True, check=True)
    report = result.stdout + result.stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = re.search(r"(\d+) bytes spill stores", report)
    return registers, int(spills.group(1)) if spills else 0


def sass_counts(cubin: bytes) -> tuple[int, int]:
    """(SASS instructions, of which 32-bit multiply-highs: ``IMAD.HI`` / ``IMAD.WIDE.U32``) of a
    compiled kernel, disassembled with the cuobjdump Triton ships: a static count (each unrolled
    copy of a loop body counted once), whose multiply-highs are mostly Philox rounds where dropout
    is on (two per round, ten rounds a draw)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    opcodes = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass)
    return len(opcodes), sum(op.startswith(("IMAD.HI", "IMAD.WIDE.U32")) for op in opcodes)


def candidates(buckets):
    """(kernel name, jit function, table bucket, config) for every entry of the launchers' tables."""
    from prefixkern.kernels import prefix_attention_bwd as bwd
    from prefixkern.kernels import prefix_attention_fwd as fwd

    short = {key: [c for c in fwd.SHORT_QUERY_CONFIGS[key] if c not in configs]
             for key, configs in fwd.FWD_CONFIGS.items()}
    # (The short-query tiles serve fewer queries than MIN_HEAVY_FIRST_QUERIES: launch order only.)
    tables = [("fwd", fwd.prefix_attention_fwd_kernel, fwd.FWD_CONFIGS, (False, True)),
              ("fwd", fwd.prefix_attention_fwd_kernel, short, (False,)),
              ("dq", bwd.prefix_attention_bwd_dq_kernel, bwd.DQ_CONFIGS, (False, True)),
              ("dkdv", bwd.prefix_attention_bwd_dkdv_kernel, bwd.DKDV_CONFIGS, (False, True)),
              # The whole backward in one launch (WITH_DQ), at its own tiles.
              ("dkdv+dq", bwd.prefix_attention_bwd_dkdv_kernel, bwd.ONE_LAUNCH_CONFIGS, (False, True))]
    seen = set()
    for name, kernel, table, orders in tables:
        for bucket in (b for b in buckets if b in table):
            for rank, config in enumerate(table[bucket]):
                if (name, bucket, config) not in seen:
                    seen.add((name, bucket, config))
                    yield name, kernel, bucket, config, set(FLAG_SETS), rank == 0, orders


def constexprs(name, config, flags, *, block_d, elem_bytes, group=4, even_d=True, causal=True, shared=None,
               prefix_block_n=None, heavy_first=None, head_splits=1):
    """The constexpr arguments of kernel ``name`` at ``config``. For dK/dV, ``shared`` (one prefix for
    the batch) defaults to "no prefix_index" and ``prefix_block_n`` (its prefix programs' key tile)
    to BLOCK_N, the most registers they can take. ``heavy_first`` defaults to ``causal`` (causal
    launches take their programs heaviest first where K/V fit the L2, as at the test grid's sizes).
    ``dkdv+dq`` is the dK/dV kernel as the one-launch backward (``WITH_DQ``)."""
    block_m, block_n, _, _ = config
    precision = "tf32" if elem_bytes == 4 else "ieee"
    consts = dict(GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, EVEN_D=even_d, CAUSAL=causal,
                  INPUT_PRECISION=precision, HEAVY_FIRST=causal if heavy_first is None else heavy_first, **flags)
    if name in ("dkdv", "dkdv+dq"):
        consts.update(SHARED=not flags["HAS_PREFIX_INDEX"] if shared is None else shared,
                      PREFIX_BLOCK_N=block_n if prefix_block_n is None else prefix_block_n, HEAD_SPLITS=head_splits,
                      WITH_DQ=name == "dkdv+dq")
    return consts


MLP_PRECISIONS = ("ieee", "tf32x3", "tf32", "bf16", "fp16")


def mlp_candidates(precisions=MLP_PRECISIONS):
    """(label, jit function, constexprs, pointer types, warps, stages, first) of the prefix MLP's
    autotune candidates as its launchers' candidate functions leave them, per dot precision (of
    ``precisions``) and P tile; ``first``: the candidate used with autotuning off."""
    from prefixkern.kernels import prefix_mlp as mlp

    # "bf16" / "fp16": float32 parameters under autocast (products rounded on load), or 16-bit ones.
    for precision in precisions:
        for block_p in (16, 32, 64):   # the launcher's P tiles (bwd_block_p)
            if block_p != mlp.bwd_block_p(block_p, precision):
                continue
            # (a W2 large enough that the two-launch candidates are timed too)
            for i, tile in enumerate(mlp.bwd_candidates(block_p, precision, mlp.BWD_TWO_LAUNCH_MIN_W2)):
                dw_roles = "dw2_strip" if tile.dw_strips else "dw2"
                launches = [("both", tile.num_warps, tile.num_stages)] if not tile.dw_num_warps else \
                    [("dh", tile.num_warps, tile.num_stages), (dw_roles, tile.dw_num_warps, tile.dw_num_stages)]
                for roles, warps, stages in launches:
                    # (the dH programs computing dH^T = W2^T G^T: their own label, as the tuner drops
                    # a spilling candidate per launch kind)
                    kind = "dh-w2lhs" if roles == "dh" and tile.dh_w2_lhs else roles
                    yield (f"mlp-bwd {kind} {precision} P{block_p}", mlp.prefix_mlp_bwd_kernel,
                           dict(HAS_BIAS=True, PRECISION=precision, ROLES=roles, DH_BLOCK_P=block_p,
                                DH_BLOCK_N=tile.dh_block_n, DH_BLOCK_K=tile.dh_block_k,
                                DW_BLOCK_P=block_p if tile.dw_strips else mlp.bwd_dw_block_p(block_p),
                                DW_BLOCK_N=tile.dw_block_n, DW_BLOCK_K=tile.dw_block_k, D_TILE=128,
                                DH_W2_LHS=tile.dh_w2_lhs),
                           {"g_ptr": "*bf16"}, warps, stages, i == 0)
        for block_p in (16, 32, 64):   # the launcher's P tiles (MAX_BLOCK_P_FWD)
            for i, (block_n, block_k, warps, stages) in enumerate(mlp.fwd_candidates(block_p, 1 << 20, precision)):
                yield (f"mlp-fwd {precision} P{block_p}", mlp.prefix_mlp_fwd_kernel,
                       dict(HAS_BIAS=True, HAS_DROPOUT=False, PRECISION=precision, BLOCK_P=block_p,
                            BLOCK_N=block_n, BLOCK_K=block_k, FUSE_HIDDEN=False, HAS_B1=False, BLOCK_D=16,
                            W2_LHS=False),
                       {"out_ptr": "*bf16", "seed_ptr": "*i64"}, warps, stages, i == 0)
            # The transposed product's tiles (tensor-core products only), a kind of their own.
            lhs_tiles = mlp.fwd_candidates(block_p, 1 << 20, precision, mlp.W2_LHS_FWD_TILES) if precision != "ieee" else ()
            for block_n, block_k, warps, stages in lhs_tiles:
                yield (f"mlp-fwd-w2lhs {precision} P{block_p}", mlp.prefix_mlp_fwd_kernel,
                       dict(HAS_BIAS=True, HAS_DROPOUT=False, PRECISION=precision, BLOCK_P=block_p,
                            BLOCK_N=block_n, BLOCK_K=block_k, FUSE_HIDDEN=False, HAS_B1=False, BLOCK_D=16,
                            W2_LHS=True),
                       {"out_ptr": "*bf16", "seed_ptr": "*i64"}, warps, stages, False)
            # The one-launch forward (small MLPs only) launches the first candidate, untuned.
            fused = block_p <= mlp.fused_max_rows(precision)
            for i, (block_n, block_k, warps, stages) in enumerate(mlp.fwd_candidates(block_p, 6144, precision)[:1]
                                                                  if fused else ()):
                yield (f"mlp-fwd-fused {precision} P{block_p}", mlp.prefix_mlp_fwd_kernel,
                       dict(HAS_BIAS=True, HAS_DROPOUT=False, PRECISION=precision, BLOCK_P=block_p,
                            BLOCK_N=block_n, BLOCK_K=block_k, FUSE_HIDDEN=True, HAS_B1=True,
                            BLOCK_D=mlp.FUSED_BLOCK_D, W2_LHS=False),
                       {"out_ptr": "*bf16", "seed_ptr": "*i64"}, warps, stages, i == 0)
        # A small MLP's first-Linear backward launches one tile, untuned.
        block_m, block_n, block_k, warps, stages = mlp.BWD_FIRST_TILE
        yield (f"mlp-bwd-first {precision}", mlp.prefix_mlp_bwd_first_kernel,
               dict(HAS_BIAS=True, PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k),
               {"de_ptr": "*fp32", "dw1_ptr": "*fp32", "db1_ptr": "*fp32"}, warps, stages, True)
        for i, (block_m, block_n, block_k, warps, stages) in enumerate(mlp.MATMUL_TILES):
            yield (f"mlp-matmul {precision}", mlp.prefix_mlp_matmul_kernel,
                   dict(HAS_BIAS=True, APPLY_TANH=True, PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n,
                        BLOCK_K=block_k), {"c_ptr": "*fp32"}, warps, stages, i == 0)
        for i, (block_m, block_n, block_k, warps, stages) in enumerate(mlp.MATMUL_PAIR_TILES):
            yield (f"mlp-matmul-pair {precision}", mlp.prefix_mlp_matmul_pair_kernel,
                   dict(PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k),
                   {"c1_ptr": "*fp32", "c2_ptr": "*fp32"}, warps, stages, i == 0)


def grid_variants():
    """(label, jit function, constexprs, pointer type, config) of every distinct attention-kernel
    variant the GPU test grid (tests/test_prefix_attention.py, ``-m gpu``) launches with autotuning
    off: about 1200 compiles, so a GPU run is not the first to meet one that fails."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    # (their conftest turns the interpreter on without a GPU)
    from test_prefix_attention import _gpu_packed_grid, gpu_grid_backward_modes

    os.environ.pop("TRITON_INTERPRET", None)

    from prefixkern.kernels import prefix_attention_bwd as bwd
    from prefixkern.kernels import prefix_attention_fwd as fwd
    from prefixkern.kernels._attention_common import MIN_HEAVY_FIRST_QUERIES, config_bucket

    variants = {}
    dense = [(case, case.S, case.padding != "none", False, one_launch) for case, one_launch in gpu_grid_backward_modes()]
    packed = [(case, max(case.lens_q), False, True, True) for case in _gpu_packed_grid()]
    for case, seq_len_q, padded, varlen, one_launch in dense + packed:
        block_d = max(16, triton.next_power_of_2(case.D))
        bucket = config_bucket(block_d, case.dtype.itemsize)
        pointer = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}[case.dtype]
        flags = dict(FLAGS_OFF, HAS_PREFIX_INDEX=case.prefix == "per_task", HAS_KPM=padded,
                     HAS_ALIBI=case.alibi, HAS_POS=case.alibi and padded,
                     HAS_SOFTCAP=case.softcap is not None, HAS_WINDOW=case.window is not None, VARLEN=varlen)
        tiles = {"fwd": fwd._configs(block_d, seq_len_q, case.dtype)[0], "dq": bwd.DQ_CONFIGS[bucket][0],
                 "dkdv": bwd.DKDV_CONFIGS[bucket][0]}
        launches = [("fwd", fwd.prefix_attention_fwd_kernel)]
        with bwd.one_launch_backward(one_launch):
            rows = len(case.lens_q) if varlen else case.B
            keys = max(case.lens_kv) if varlen else case.S_kv
            if bwd.backward_in_one_launch(seq_len_q, rows * case.Hq * seq_len_q * (case.P + keys) * case.D, bucket):
                tiles["dkdv+dq"] = bwd.ONE_LAUNCH_CONFIGS[bucket][0]
                launches.append(("dkdv+dq", bwd.prefix_attention_bwd_dkdv_kernel))
            else:
                launches += [("dq", bwd.prefix_attention_bwd_dq_kernel), ("dkdv", bwd.prefix_attention_bwd_dkdv_kernel)]
        for name, kernel in launches:
            config = tiles[name]
            consts = constexprs(name, config, flags, block_d=block_d, elem_bytes=case.dtype.itemsize,
                                group=case.Hq // case.Hkv, even_d=block_d == case.D, causal=case.causal,
                                shared=case.prefix == "shared",
                                prefix_block_n=min(config[1], max(16, triton.next_power_of_2(case.P))),
                                heavy_first=case.causal and seq_len_q >= MIN_HEAVY_FIRST_QUERIES)
            variants[(name, pointer, tuple(sorted(consts.items())), config)] = (name, kernel, consts, pointer, config)
    return [variants[key] for key in sorted(variants, key=str)]


def main(argv=None) -> int:
    from prefixkern.kernels import prefix_attention_fwd as fwd
    from prefixkern.kernels._attention_common import smem_rows

    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--bucket", action="append", default=None,
                        help="ELEM_BYTES:HEAD_DIM_BLOCK, e.g. 2:128 (default: every bucket of the tables)")
    parser.add_argument("--flags", default=",".join(FLAG_SETS), help="comma-separated flag sets")
    parser.add_argument("--kernels", default="attention,mlp",
                        help="attention, mlp, or grid: every variant the GPU test grid launches (compiled, "
                             "reported, spills not checked: ~10 min on 2 cores)")
    parser.add_argument("--heavy-first", choices=("all", "first"), default="all",
                        help="compile the heavy-first variant of every attention candidate (reported), or only "
                             "of each table's first (the ones --check holds to no spills)")
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--precisions", default=",".join(MLP_PRECISIONS),
                        help="--kernels mlp: the dot precisions whose candidates to compile (the test splits "
                             "them over its cases, so pytest's workers share the compiles)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table at the end")
    parser.add_argument("--sass", action="store_true",
                        help="attention: also count each compiled kernel's SASS instructions and multiply-highs "
                             "(sass_counts; what dropout's Philox draws cost, statically)")
    args = parser.parse_args(argv)
    buckets = ([tuple(int(x) for x in b.split(":")) for b in args.bucket] if args.bucket
               else sorted(fwd.FWD_CONFIGS))
    flag_sets = args.flags.split(",")
    kernels = args.kernels.split(",")
    target = GPUTarget("cuda", args.arch, 32)
    strict = holds_spills()
    print(f"triton {triton.__version__}, sm_{args.arch}, --check "
          + ("fails on spills" if strict else
             f"reports spills only (the tables are tuned on Triton {'.'.join(map(str, TABLES_TUNED_ON))})"))
    problems, rows = [], []
    for name, kernel, bucket, config, serves, first, orders in (candidates(buckets) if "attention" in kernels
                                                                 else ()):
        elem_bytes, block_d = bucket
        pointer = "*fp32" if elem_bytes == 4 else "*bf16"
        if not first and args.heavy_first == "first":
            orders = (False,)
        # dK/dV's first candidate also with its GQA group shared out between programs (float32
        # dK/dV partials, heaviest first: the long causal rows where the launcher splits).
        splits_variant = ((("plain", True, 2),) if name == "dkdv" and first and "plain" in flag_sets else ())
        for flag_set, heavy, head_splits in tuple((f, heavy, 1) for f in flag_sets if f in serves
                                                  for heavy in orders) + splits_variant:
            start = time.time()
            consts = constexprs(name, config, FLAG_SETS[flag_set], block_d=block_d, elem_bytes=elem_bytes,
                                heavy_first=heavy, head_splits=head_splits)
            pointers = dict(POINTERS, dk_ptr="*fp32", dv_ptr="*fp32") if head_splits > 1 else POINTERS
            compiled = compile_kernel(kernel, consts, pointers, pointer, target, config[2], config[3])
            registers, spills = ptxas_usage(compiled.asm["ptx"], args.arch)
            smem = compiled.metadata.shared
            order = ("heavy" if heavy else "order") + (f" splits{head_splits}" if head_splits > 1 else "")
            rows.append((name, f"{'fp32' if elem_bytes == 4 else '16-bit'} D{block_d}", config,
                         f"{flag_set} {order}", registers, spills, smem))
            sass = "  sass {:5d} (mul-hi {:4d})".format(*sass_counts(compiled.asm["cubin"])) if args.sass else ""
            print(f"{name:12s} {pointer[1:]:4s} D{block_d:<3d} {str(config):18s} {flag_set:14s} {order} "
                  f"regs {registers:3d}  spill stores {spills:5d} B  smem {smem:6d} B{sass}  "
                  f"{time.time() - start:4.1f} s", flush=True)
            # Packed rows, and heavy-first ones: the first candidate (autotuning off) must not spill;
            # the tuner drops any other that spills on the GPU at hand.
            if flag_set in CHECKED_FLAG_SETS and spills and (flag_set != "packed" and not heavy or first
                                                             or head_splits > 1) and strict:
                problems.append(f"{name} {bucket} {config} {flag_set} {order}: {spills} B of spill stores")
            elif spills:
                print("  (spills: the tuner drops it on a GPU where it spills while a spill-free candidate remains)")
            if flag_set == "plain" and not heavy and head_splits == 1:
                model = smem_rows(name, config) * block_d * elem_bytes
                # The model is exact for the large tiles and an upper bound where the compiler
                # keeps a small tile out of the pipeline; reductions may add a little scratch.
                if smem > model + 4096:
                    problems.append(f"{name} {bucket} {config}: compiled shared memory {smem} B, model {model} B")
    mlp_spills = []
    mlp_configs = mlp_candidates(args.precisions.split(",")) if "mlp" in kernels else ()
    for label, kernel, consts, pointers, warps, stages, first in mlp_configs:
        start = time.time()
        compiled = compile_kernel(kernel, consts, pointers, "*fp32", target, warps, stages)
        registers, spills = ptxas_usage(compiled.asm["ptx"], args.arch)
        smem = compiled.metadata.shared
        tiles = tuple(consts[k] for k in ("BLOCK_M", "BLOCK_P", "BLOCK_N", "BLOCK_K", "DH_BLOCK_N", "DH_BLOCK_K",
                                          "DW_BLOCK_N", "DW_BLOCK_K") if k in consts)
        config = tiles + (warps, stages)
        rows.append((label.split()[0], label.split(" ", 1)[1], config, "-", registers, spills, smem))
        print(f"{label:24s} {str(config):22s} regs {registers:3d}  spill stores {spills:5d} B  smem {smem:6d} B  "
              f"{time.time() - start:4.1f} s", flush=True)
        mlp_spills.append((label, spills))
        if spills and first and strict:
            problems.append(f"{label} {config}: {spills} B of spill stores, and it is the candidate used with "
                            "autotuning off")
        elif spills:
            print("  (spills: the tuner drops it on a GPU where it spills while a spill-free candidate remains)")
    for label in {label for label, _ in mlp_spills}:
        if strict and all(spills for other, spills in mlp_spills if other == label):
            problems.append(f"{label}: every candidate spills")
    for name, kernel, consts, pointer, config in (grid_variants() if "grid" in kernels else ()):
        start = time.time()
        try:
            compiled = compile_kernel(kernel, consts, POINTERS, pointer, target, config[2], config[3])
        except Exception as exc:
            problems.append(f"grid {name} {pointer} {config} {consts}: {type(exc).__name__}: {str(exc)[:300]}")
            continue
        registers, spills = ptxas_usage(compiled.asm["ptx"], args.arch)
        print(f"grid {name:12s} {pointer[1:]:4s} {str(config):18s} regs {registers:3d}  spill stores {spills:5d} B  "
              f"{time.time() - start:4.1f} s", flush=True)
    if args.markdown:
        print("\n| kernel | inputs | config | flags | registers | spill stores (B) | shared memory (B) |\n"
              "| --- | --- | --- | --- | --- | --- | --- |")
        for name, inputs, config, flag_set, registers, spills, smem in rows:
            print(f"| {name} | {inputs} | {config} | {flag_set} | {registers} | {spills} | {smem} |")
    for problem in problems:
        print("PROBLEM", problem)
    return 1 if args.check and problems else 0


if __name__ == "__main__":
    sys.exit(main())
