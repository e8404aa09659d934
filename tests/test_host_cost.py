"""benchmarks/host_cost.py and host_step.py: the launch counts the README quotes, pinned (a training
step of the 24-layer Qwen2-shaped model launches one Triton kernel per layer forward and one
backward, plus the prefix MLP's one and two, and fewer aten ops than stock PEFT + sdpa in both
directions), and both host-time tools run."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "host_cost.py"


def _run(*what: str) -> str:
    result = subprocess.run([sys.executable, str(SCRIPT), *what], capture_output=True, text=True, timeout=600,
                            cwd=SCRIPT.parent.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("args", [[], ["--autocast"], ["--model", "gpt2"]],
                         ids=["bf16_weights", "float32_weights_bf16_autocast", "gpt2_with_dropout"])
def test_launch_counts_per_training_step(args):
    """Per step of a 24-layer Qwen2-shaped model: fewer aten ops than stock PEFT + sdpa forward and
    backward, fewer in all than the no-prefix floor's besides its attention, and the Triton launches
    counted below; with float32 weights under bf16 autocast too (the prefix made in bf16 once: no
    per-layer cast), and on a GPT-2-shaped model training with its attention dropout."""
    counts = {}
    for line in _run("count", *args).splitlines():
        match = re.match(r"(\w+)\s+forward:\s+(\d+) aten ops \+\s+(\d+) Triton launches; "
                         r"backward:\s+(\d+) aten ops \+\s+(\d+) Triton launches", line)
        if match:
            counts[match[1]] = tuple(int(x) for x in match.groups()[1:])
    layers = 24
    peft_fwd, _, peft_bwd, _ = counts["peft_sdpa"]
    ours_fwd, ours_fwd_triton, ours_bwd, ours_bwd_triton = counts["prefixkern"]
    # Per layer: the forward kernel, then the backward in one launch (short rows: the dK/dV kernel
    # with the dQ programs); the MLP (a small one): one forward launch (H computed in it) and two
    # backward ones (dH and dW2; then dZ, dE, dW1 and db1).
    assert (ours_fwd_triton, ours_bwd_triton) == (layers + 1, layers + 2)
    assert ours_fwd < peft_fwd and ours_bwd < peft_bwd
    floor_fwd, floor_fwd_triton, floor_bwd, floor_bwd_triton = counts["floor_no_prefix"]
    assert floor_fwd_triton == floor_bwd_triton == 0 and ours_fwd + ours_bwd < floor_fwd + floor_bwd


def test_launcher_host_times_are_reported():
    rows = re.findall(r"^\s+([\d.]+) us\s+(.+)$", _run("launchers"), flags=re.M)
    assert [name for _, name in rows] == ["attention forward launcher", "attention backward launcher",
                                          "prefix_attention with autograd, forward"]
    assert all(float(us) > 0 for us, _ in rows)


@pytest.mark.parametrize("model", [[], ["--model", "gpt2", "--dtype", "float32"]], ids=["qwen2-bf16", "gpt2-float32"])
def test_step_host_time_through_tritons_launch_path(model):
    """host_step.py runs the steps (a Qwen2-shaped model, and a GPT-2-shaped one training with its
    attention dropout) with the patched model's kernels compiled for sm_90 and
    launched through Triton's binding and cache (a compile-only driver): the floor (SDPA computing
    on the CPU, and SDPA as one op, the row the others are compared with), stock PEFT, the patched
    step, and the patched step again with raw-pointer launches (the compiled kernel's launcher
    called directly), without launch plans and with bare attention launchers; it reports each. No compile leaves FP fusion to
    Triton's default."""
    script = SCRIPT.parent / "host_step.py"
    result = subprocess.run([sys.executable, str(script), "--layers", "2", "--steps", "2", *model],
                            capture_output=True, text=True, timeout=600, cwd=SCRIPT.parent.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = re.findall(r"^\s+([\d.]+) ms\s+(\w+)\s+\(([\d.]+)x\)$", result.stdout, flags=re.M)
    assert [name for _, name, _ in rows] == ["floor_no_prefix", "floor_sdpa_one_op", "peft_sdpa", "prefixkern",
                                             "prefixkern_raw_launch", "prefixkern_no_plans",
                                             "prefixkern_bare_attention"]
    assert all(float(ms) > 0 for ms, _, _ in rows)
    assert float(rows[1][2]) == 1.0
    # Every compile asked for FP fusion itself (launch_kernel), so Triton 3.9+ has no default to
    # warn about (its warning names this variable).
    assert "TRITON_DEFAULT_FP_FUSION" not in result.stderr


def test_op_host_times_through_tritons_launch_path():
    """host_step.py --ops times the prefix MLP at two sizes (forward; forward and backward) and the
    attention (forward and backward) alone through Triton's launch path under the raw launch (a GPU's
    default), and reports each; once warmed up, no call of them has Triton bind arguments: every
    launch is replayed raw from its launch plan (a per-call int in a launch would bind every call)."""
    script = SCRIPT.parent / "host_step.py"
    result = subprocess.run([sys.executable, str(script), "--ops"], capture_output=True, text=True, timeout=600,
                            cwd=SCRIPT.parent.parent, env={**os.environ, "PREFIXKERN_RAW_LAUNCH": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = re.findall(r"^\s+([\d.]+) us\s+(.+)$", result.stdout, flags=re.M)
    assert [name for _, name in rows] == ["prefix MLP forward, Qwen2.5-0.5B",
                                          "prefix MLP forward + backward, Qwen2.5-0.5B",
                                          "prefix MLP forward, bloomz-560m",
                                          "prefix MLP forward + backward, bloomz-560m",
                                          "prefix_attention forward + backward, seed-qwen"]
    assert all(float(us) > 0 for us, _ in rows)
    assert float(rows[1][0]) > float(rows[0][0]) and float(rows[3][0]) > float(rows[2][0])
    bindings = re.findall(r"^\s+(\d+) bindings\s+(.+)$", result.stdout, flags=re.M)
    assert [name for _, name in bindings] == [name for _, name in rows]
    assert all(count == "0" for count, _ in bindings), bindings


def test_generate_host_time_through_tritons_launch_path():
    """host_step.py --generate times stock PEFT's and the patched model's greedy generate() (the
    patched prefill and decoding steps launching through Triton's path) and reports both."""
    script = SCRIPT.parent / "host_step.py"
    result = subprocess.run([sys.executable, str(script), "--generate", "--layers", "2"], capture_output=True,
                            text=True, timeout=600, cwd=SCRIPT.parent.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = re.findall(r"^\s+(\w+)\s+1 token\s+([\d.]+) ms\s+per decoding step\s+(-?[\d.]+) ms$", result.stdout,
                      flags=re.M)
    assert [name for name, _, _ in rows] == ["peft_sdpa", "prefixkern"]
    assert all(float(first) > 0 for _, first, _ in rows)
