"""Every Triton kernel compiles for an H100 (sm_90) on this GPU-less machine: Triton's compiler
and ptxas need no GPU. The interpreter runs the kernels' arithmetic on CPU but accepts code the
compiler rejects (non-constexpr globals, runtime values used as constexprs, ...): this catches it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "tools" / "compile_triton_kernels.py"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Triton compiles on Linux")
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90"], env=env, capture_output=True, text=True,
                            timeout=900, cwd=SCRIPT.parent.parent.parent)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("ok ")]
    assert len(lines) >= 20
    # The main loops must be software-pipelined (cp.async): without it the kernels stall on every
    # load. A launch-like specialisation (unit head-dim strides) is what makes this visible.
    for kernel in ("fwd bf16-D128", "bwd-dq bf16-D128", "bwd-dkdv bf16-D128", "bwd-prefix bf16-D128"):
        (line,) = [line for line in lines if kernel in line]
        assert int(line.split("async copies")[1].split()[0]) > 0, line


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Triton compiles on Linux")
def test_attention_configs_do_not_spill_registers():
    """Every bf16/fp16 head-dim-128 config the attention launchers may pick compiles for sm_90 with
    no register spills, causal with and without a padding mask and on packed rows, and within the
    shared memory the launchers budget for it (tests/tools/kernel_resources.py without --bucket
    checks every table)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = SCRIPT.parent / "kernel_resources.py"
    result = subprocess.run([sys.executable, str(script), "--check", "--kernels", "attention", "--bucket", "2:128",
                             "--flags", "plain,padded,packed"],
                            env=env, capture_output=True, text=True, timeout=900, cwd=SCRIPT.parent.parent.parent)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if "spill stores" in line]
    assert len(rows) >= 20 and all(" spill stores     0 B" in row for row in rows), rows


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Triton compiles on Linux")
def test_prefix_mlp_configs_do_not_spill_registers():
    """The prefix MLP's autotune candidates, as its launchers' candidate functions leave them,
    compile for sm_90 with no register spills under both dot precisions (PyTorch's default "ieee"
    and TF32)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = SCRIPT.parent / "kernel_resources.py"
    result = subprocess.run([sys.executable, str(script), "--check", "--kernels", "mlp"],
                            env=env, capture_output=True, text=True, timeout=900, cwd=SCRIPT.parent.parent.parent)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if "spill stores" in line]
    assert len(rows) >= 40 and all(" spill stores     0 B" in row for row in rows), rows
