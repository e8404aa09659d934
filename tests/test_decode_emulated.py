"""The CUDA decode kernels (csrc/prefix_decode_simt.cuh, the default, and prefix_decode_mma.cuh, on
tensor cores) and the merge of their partial results (merge_attention_states.cuh) run on the CPU
against the reference.

No GPU is needed: tests/csrc_emu/cuda_emulator.h stands in for the CUDA built-ins the kernels use
(block and warp barriers, shuffles, mma.sync m16n8k16 by the PTX fragment layouts), and g++
compiles the kernels' own source with it. This checks their logic (indexing, masks, the online
softmax, the merge of the warps, the split plan); `-m gpu` runs the real thing, cp.async and all
(tests/test_decode.py)."""
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import prefixkern
from prefixkern import reference
from prefixkern.kernels._attention_common import prefix_strides

from test_decode import _inputs as decode_inputs
from test_decode import merge_in_float64

ROOT = Path(__file__).resolve().parent.parent
EMU = Path(__file__).resolve().parent / "csrc_emu"


def _cuda_include() -> Path | None:
    """A directory with cuda_bf16.h (the kernel's 16-bit conversions; header-only on the host)."""
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent / "include")
    candidates += [Path("/usr/local/cuda/include")]
    return next((path for path in candidates if (path / "cuda_bf16.h").exists()), None)


def build_emulator(directory: Path) -> Path | None:
    """Compile the decode kernels' source with the emulator into ``directory``; returns the binary,
    or None without g++ or the CUDA headers. A compiler error fails the assertion, with its output."""
    cuda_include = _cuda_include()
    if shutil.which("g++") is None or cuda_include is None:
        return None
    binary = directory / "decode_emulator"
    torch_include = Path(torch.__file__).parent / "include"
    cmd = ["g++", "-std=c++20", "-O2", "-pthread", f"-I{ROOT / 'csrc'}", f"-I{EMU}", f"-I{cuda_include}",
           f"-I{torch_include}", str(EMU / "decode_emulator.cpp"), "-o", str(binary)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return binary


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Path:
    binary = build_emulator(tmp_path_factory.mktemp("emu"))
    if binary is None:
        pytest.skip("needs g++ and the CUDA headers (cuda_bf16.h)")
    return binary


def _write_storage(path: Path, t: torch.Tensor) -> None:
    """The whole storage under ``t`` (so that its strides index it), as raw bytes."""
    assert t.storage_offset() == 0
    storage = t.untyped_storage()
    flat = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),))
    flat.numpy().tofile(path)


def _run_binary(binary: Path, workdir: Path, params: dict, timeout: int = 600) -> None:
    """Write ``params`` as the emulator's params.txt in ``workdir`` and run it there."""
    (workdir / "params.txt").write_text("".join(f"{name} {float(value)!r}\n" for name, value in params.items()))
    result = subprocess.run([str(binary), str(workdir)], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-2000:]


def run_emulated(binary: Path, workdir: Path, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, scale,
                 num_splits, tensor_cores: bool, wave: int = 0, stages: int = 1):
    """``(out_partial, lse_partial, (splits, chunk, row_blocks, rows per block), out, lse)``: the
    partial kernel's outputs and plan, and the CUDA merge's result (``out`` in q's dtype), for these
    inputs; ``wave`` stands in for the GPU's resident blocks when ``num_splits`` is 0; ``stages``:
    the tensor-core kernel's K/V stages."""
    workdir.mkdir(parents=True, exist_ok=True)
    for name, t in dict(q=q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v).items():
        _write_storage(workdir / f"{name}.bin", t)
    B, Hq, Sq, D = q.shape
    params = dict(B=B, Hq=Hq, Hkv=k.shape[1], Sq=Sq, L=k.shape[2], P=prefix_k.shape[-2], D=D,
                  half=int(q.dtype == torch.float16), num_splits=num_splits, wave=wave, scale=scale,
                  tensor_cores=int(tensor_cores), stages=stages,
                  has_index=int(prefix_index is not None), has_mask=int(key_padding_mask is not None))
    for prefix, t in (("q", q), ("k", k), ("v", v)):
        params.update({f"{prefix}_sb": t.stride(0), f"{prefix}_sh": t.stride(1), f"{prefix}_ss": t.stride(2)})
    for prefix, t in (("pk", prefix_k), ("pv", prefix_v)):   # (a shared prefix: batch stride 0)
        params.update(zip((f"{prefix}_sb", f"{prefix}_sh", f"{prefix}_ss"), prefix_strides(t)[:3]))
    params.update(kpm_sb=0, kpm_ss=0)
    if prefix_index is not None:
        _write_storage(workdir / "prefix_index.bin", prefix_index.to(torch.int64).contiguous())
    if key_padding_mask is not None:
        mask = key_padding_mask.to(torch.uint8).contiguous()
        _write_storage(workdir / "key_padding_mask.bin", mask)
        params.update(kpm_sb=mask.stride(0), kpm_ss=mask.stride(1))
    _run_binary(binary, workdir, params)
    splits, chunk, row_blocks, block_rows, stages_run = (int(x) for x in (workdir / "plan.txt").read_text().split())
    assert stages_run == (stages if tensor_cores else 1) or (tensor_cores and stages == 0 and stages_run in (1, 2))
    out = torch.from_file(str(workdir / "out_partial.bin"), size=splits * B * Hq * Sq * D, dtype=torch.float32)
    lse = torch.from_file(str(workdir / "lse_partial.bin"), size=splits * B * Hq * Sq, dtype=torch.float32)
    merged = torch.from_file(str(workdir / "out.bin"), size=B * Hq * Sq * D, dtype=q.dtype)
    merged_lse = torch.from_file(str(workdir / "lse.bin"), size=B * Hq * Sq, dtype=torch.float32)
    if splits == 1:
        # prefix_decode_attention's launch of one split writes the result itself, with no merge: what
        # the merge of its one part gives, bit for bit.
        direct = torch.from_file(str(workdir / "direct_out.bin"), size=B * Hq * Sq * D, dtype=q.dtype)
        direct_lse = torch.from_file(str(workdir / "direct_lse.bin"), size=B * Hq * Sq, dtype=torch.float32)
        assert torch.equal(direct.view(B, Hq, Sq, D), merged.view(B, Hq, Sq, D))
        assert torch.equal(direct_lse.view(B, Hq, Sq), merged_lse.view(B, Hq, Sq))
    return (out.view(splits, B, Hq, Sq, D), lse.view(splits, B, Hq, Sq), (splits, chunk, row_blocks, block_rows),
            merged.view(B, Hq, Sq, D), merged_lse.view(B, Hq, Sq))


def _inputs(B, Hq, Hkv, Sq, L, P, D, dtype, prefix, padding):
    """test_decode's inputs with the cache in HF's [B, L, H, D] memory (strided keys) and, padded,
    a second row that sees the prefix only."""
    (q, k, v, pk, pv), kw = decode_inputs(B, Hq, Hkv, Sq, L, P, D, dtype, "cpu", prefix=prefix, padding=padding)
    k = k.transpose(1, 2).contiguous().transpose(1, 2)
    mask = kw["key_padding_mask"]
    if mask is not None and B > 1:
        mask[1, :] = False
    return (q, k, v, pk, pv), kw["prefix_index"], mask


# (dtype, D, B, Hq, Hkv, Sq, L, P, prefix, padding, splits, wave): every head dim and both dtypes;
# GQA groups of 4 and 7 (7 x 3 query positions: two or three blocks of rows, the last one short);
# every CUDA-core block size (4, 8, 16 rows) with its query tile in float32 and in the input dtype,
# blocks with rows to spare (7 rows in 8, 12 in 16);
# one prefix key and one cache key; several K/V tiles per chunk (the online softmax rescales) and
# chunks that cut the prefix and the cache mid-tile; splits picked from the GPU's wave (splits 0);
# shared, per-row and per-task prefixes; padding, with a row that sees the prefix only (or, with
# no prefix, nothing: output 0, LSE -inf).
CASES = [
    (torch.bfloat16, 128, 2, 8, 2, 1, 150, 30, "shared", True, 1, 0),
    (torch.bfloat16, 128, 2, 8, 2, 1, 150, 30, "shared", True, 0, 8),
    (torch.bfloat16, 128, 1, 4, 1, 1, 1, 1, "shared", False, 0, 0),
    (torch.float16, 64, 2, 14, 2, 3, 70, 7, "per_task", True, 2, 0),
    (torch.bfloat16, 256, 1, 4, 1, 2, 90, 20, "per_row", False, 3, 0),
    (torch.float16, 128, 3, 2, 2, 8, 40, 64, "per_task", False, 1, 0),
    # No prefix keys: the cache part prefix_gemm=True hands the kernel (its prefix part is a GEMM).
    (torch.bfloat16, 64, 2, 8, 2, 1, 100, 0, "shared", True, 2, 0),
    (torch.bfloat16, 64, 2, 14, 2, 1, 90, 20, "shared", True, 0, 8),
    (torch.float16, 256, 1, 8, 2, 3, 60, 10, "per_row", True, 2, 0),
    (torch.bfloat16, 256, 2, 4, 1, 1, 70, 9, "per_task", True, 0, 8),
]
# The CUDA-core kernel, and the tensor-core one with one K/V stage, with two (the next tile's copies
# issued before this one's products: the emulator copies at once, so this checks the stage indexing
# and the tile order, not the asynchrony), and with the launcher's choice (the default; the plan it
# picks with, its stages' wave standing in for both).
KERNELS = {"simt": dict(tensor_cores=False), "mma": dict(tensor_cores=True), "mma2": dict(tensor_cores=True, stages=2),
           "mma_auto": dict(tensor_cores=True, stages=0)}


def emulated_plan(binary: Path, workdir: Path, *, B, Hq, Hkv, Sq, L, P, D, wave, wave2, two_stages_fit=True,
                  num_splits=0, stages=0) -> tuple[int, int, int]:
    """``(stages, splits, chunk)`` the tensor-core launcher plans for a shape (no kernel run), with
    ``wave`` / ``wave2`` standing in for the one- and two-stage blocks the GPU holds."""
    workdir.mkdir(parents=True, exist_ok=True)
    params = dict(B=B, Hq=Hq, Hkv=Hkv, Sq=Sq, L=L, P=P, D=D, half=0, num_splits=num_splits, wave=wave, wave2=wave2,
                  two_stages_fit=int(two_stages_fit), tensor_cores=1, stages=stages, plan_only=1)
    _run_binary(binary, workdir, params, timeout=60)
    splits, chunk, _row_blocks, _rows, chosen = (int(x) for x in (workdir / "plan.txt").read_text().split())
    return chosen, splits, chunk


# The tensor-core launcher's choice of K/V stages (stages=0, the default) at the eighth run's decode
# points on the H100 (132 SMs; blocks an SM holds, from the sm_90 build's registers and shared
# memory: head dim 64 8 and 5, 128 6 and 3 (Nsight Compute read 6), 256 3 and 1, one and two stages),
# and what the run timed there (two-stage time over one-stage): the rule picks two stages exactly
# where they won.
H100_STAGE_POINTS = [
    # (name, Hq, Hkv, D, B, L, P, two-stage/one-stage time, stages the rule picks)
    ("P30-L4096-B8", 32, 8, 128, 8, 4096, 30, 0.959, 2),
    ("P128-L512-B1", 32, 8, 128, 1, 512, 128, 1.19, 1),       # one K/V tile a block
    ("P30-L32768-B1", 32, 8, 128, 1, 32768, 30, 0.914, 2),
    ("P30-L512-B64", 32, 8, 128, 64, 512, 30, 1.06, 1),       # 512 blocks, more than a two-stage wave
    ("qwen-heads-P30-L4096-B8", 14, 2, 64, 8, 4096, 30, 0.905, 2),
    ("d256-heads-P30-L4096-B8", 8, 4, 256, 8, 4096, 30, 0.929, 2),
]
H100_BLOCKS_PER_SM = {64: (8, 5), 128: (6, 3), 256: (3, 1)}


@pytest.mark.parametrize("point", H100_STAGE_POINTS, ids=lambda p: p[0])
def test_launcher_picks_two_stages_where_they_won(emulator, tmp_path, point):
    name, hq, hkv, d, batch, cache, prefix, measured, want = point
    one, two = H100_BLOCKS_PER_SM[d]
    shape = dict(B=batch, Hq=hq, Hkv=hkv, Sq=1, L=cache, P=prefix, D=d, wave=132 * one, wave2=132 * two)
    stages, splits, chunk = emulated_plan(emulator, tmp_path, **shape)
    assert stages == want and (stages == 2) == (measured < 1), (name, stages, splits, chunk)
    if stages == 2:
        assert splits * batch * hkv <= 132 * two and chunk >= 128
    # Forced stages and a GPU without the shared memory for two: the rule does not override either.
    assert emulated_plan(emulator, tmp_path, **shape, stages=1)[0] == 1
    assert emulated_plan(emulator, tmp_path, **shape, stages=2)[0] == 2
    assert emulated_plan(emulator, tmp_path, **shape, two_stages_fit=False)[0] == 1


def _block_rows(kernel: str, rows: int) -> int:
    """Query rows per block: 8 on tensor cores; on CUDA cores the smallest of 4, 8, 16 holding the
    group's rows (simt_rows in csrc/prefix_decode_simt.cuh)."""
    if kernel.startswith("mma"):
        return 8
    return 4 if rows <= 4 else 8 if rows <= 8 else 16


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_decode_kernel_against_the_reference(emulator, tmp_path, case, kernel):
    dtype, D, B, Hq, Hkv, Sq, L, P, prefix, padding, splits, wave = case
    (q, k, v, pk, pv), index, mask = _inputs(B, Hq, Hkv, Sq, L, P, D, dtype, prefix, padding)
    scale = D ** -0.5
    out_partial, lse_partial, (got_splits, chunk, row_blocks, block_rows), merged, merged_lse = run_emulated(
        emulator, tmp_path, q, k, v, pk, pv, index, mask, scale, splits, wave=wave, **KERNELS[kernel])
    # The launcher's plan: blocks of rows, chunks of whole tiles covering [prefix ; cache] (64-key
    # tiles on tensor cores, 8192 / D on CUDA cores), no more chunks than asked for or than one wave holds.
    assert block_rows == _block_rows(kernel, Hq // Hkv * Sq)
    assert row_blocks == -(-(Hq // Hkv) * Sq // block_rows)
    tile = 64 if kernel.startswith("mma") else 8192 // D
    assert chunk % tile == 0 and (got_splits - 1) * chunk < P + L <= got_splits * chunk
    assert got_splits <= max(1, splits or wave // (B * Hkv * row_blocks))
    assert_emulated_matches_reference(q, k, v, pk, pv, index, mask, scale, kernel.startswith("mma"), out_partial,
                                      lse_partial, merged, merged_lse)


def assert_emulated_matches_reference(q, k, v, pk, pv, index, mask, scale, tensor_cores: bool, out_partial,
                                      lse_partial, merged, merged_lse):
    """``run_emulated``'s results against the reference: every partial row written, the partials
    merged in Python, and the CUDA merge."""
    assert not out_partial.isnan().any() and not lse_partial.isnan().any(), "a partial row was never written"
    out, lse = prefixkern.merge_attention_states(out_partial, lse_partial, torch.float32)
    want, want_lse = reference.prefix_attention(q.float(), k.float(), v.float(), pk.float(), pv.float(), causal=True,
                                                softmax_scale=scale, key_padding_mask=mask, prefix_index=index,
                                                return_lse=True)
    # On tensor cores the probabilities enter P @ V rounded to the input dtype (as in flash
    # attention's kernels); the CUDA-core kernel keeps them in float32.
    tol = 2e-2 if tensor_cores else 1e-5
    torch.testing.assert_close(out, want, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, want_lse, atol=1e-4, rtol=1e-4)
    # The CUDA merge kernel (what decoding runs): the Python merge's result, rounded to q's dtype.
    torch.testing.assert_close(merged_lse, lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged, out.to(q.dtype), atol=1e-2, rtol=1e-2)


def run_merge_emulated(binary: Path, workdir: Path, out_partial: torch.Tensor, lse_partial: torch.Tensor,
                       out_dtype: torch.dtype, offset: int = 0):
    """The CUDA merge kernel alone on ``out_partial`` [splits, rows, D] and ``lse_partial`` [splits,
    rows] (float32): ``(out [rows, D] in out_dtype, lse [rows])``. ``offset`` floats of slack before
    the partials start them off 16-byte alignment (the kernel's per-column path)."""
    workdir.mkdir(parents=True, exist_ok=True)
    splits, rows, head_dim = out_partial.shape
    torch.cat([torch.zeros(offset), out_partial.flatten()]).numpy().tofile(workdir / "out_partial.bin")
    lse_partial.contiguous().numpy().tofile(workdir / "lse_partial.bin")
    params = dict(merge_only=1, half=int(out_dtype == torch.float16), splits=splits, rows=rows, D=head_dim,
                  offset=offset)
    _run_binary(binary, workdir, params)
    out = torch.from_file(str(workdir / "out.bin"), size=rows * head_dim, dtype=out_dtype).view(rows, head_dim)
    lse = torch.from_file(str(workdir / "lse.bin"), size=rows, dtype=torch.float32)
    return out, lse


# (splits, rows, head dim, offset): the head dims the decode kernels produce (float4 columns over
# 8, 4 and 2 groups of threads); one split; more splits than threads (each thread reads several
# LSEs) and than the shared-memory weights hold (1100 > kMergeSmemSplits: the rest recomputed);
# head dims the float4 path does not take (6: not a multiple of 4; 520: past 4 x 128 columns) and
# an unaligned start, a thread per column.
MERGE_CASES = [(5, 3, 64, 0), (7, 2, 128, 0), (3, 2, 256, 0), (1, 2, 128, 0), (130, 2, 128, 0),
               (1100, 1, 64, 0), (9, 2, 6, 0), (4, 1, 520, 0), (6, 2, 128, 1)]


@pytest.mark.parametrize("case", MERGE_CASES, ids=lambda c: "splits{}-rows{}-D{}-offset{}".format(*c))
def test_merge_kernel_against_the_reference(emulator, tmp_path, case):
    splits, rows, head_dim, offset = case
    gen = torch.Generator().manual_seed(splits * 1000 + head_dim)
    out_partial = torch.randn(splits, rows, head_dim, generator=gen)
    lse_partial = torch.randn(splits, rows, generator=gen) * 4
    if splits > 1:
        # Parts that saw no key (LSE -inf, output 0 as the partial kernels write it, or garbage:
        # never read), and a row no part saw (output 0, LSE -inf).
        lse_partial[1::3, 0] = -torch.inf
        out_partial[1::3, 0] = torch.nan
        if rows > 1:
            lse_partial[:, -1] = -torch.inf
            out_partial[:, -1] = 0.0
    for dtype in (torch.bfloat16, torch.float16):
        out, lse = run_merge_emulated(emulator, tmp_path / str(dtype), out_partial, lse_partial, dtype, offset)
        want, want_lse = merge_in_float64(out_partial, lse_partial)
        assert not out.isnan().any()
        torch.testing.assert_close(lse, want_lse.float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.float(), want.float(), atol=1e-2, rtol=1e-2)
        if splits > 1 and rows > 1:
            assert (out[-1] == 0).all() and lse[-1] == -torch.inf
