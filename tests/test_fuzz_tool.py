"""tests/tools/fuzz_kernels.py, the randomized differential check of the kernels against the
oracle: a few seeded cases of each kind pass (longer campaigns are run by hand), a wrong
result is reported as a failure with the case that produced it, and dropout cases check the mask
itself."""
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent / "tools" / "fuzz_kernels.py"


def _fuzz_module():
    sys.path.insert(0, str(TOOL.parent))
    try:
        import fuzz_kernels
    finally:
        sys.path.remove(str(TOOL.parent))
    return fuzz_kernels


@pytest.mark.parametrize("kind", ["attention", "varlen", "triton-decode", "mlp"])
def test_a_few_random_cases_pass(kind):
    result = subprocess.run([sys.executable, str(TOOL), kind, "--cases", "2", "--seed", "21"], capture_output=True,
                            text=True, timeout=600, cwd=TOOL.parent.parent.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{kind}: 2 cases (seed 21, from 0), 0 failed" in result.stdout


def test_a_wrong_result_is_reported(monkeypatch, capsys):
    fuzz_kernels = _fuzz_module()
    from prefixkern import reference

    oracle = reference.prefix_attention

    def off_by_a_little(*args, **kwargs):
        out = oracle(*args, **kwargs)
        return (out[0] + 0.1, *out[1:]) if isinstance(out, tuple) else out + 0.1

    monkeypatch.setattr(reference, "prefix_attention", off_by_a_little)
    assert fuzz_kernels.main(["triton-decode", "--cases", "1", "--seed", "3", "--first", "4"]) == 1
    printed = capsys.readouterr().out
    assert "FAIL triton-decode seed 3 case 4 (decode {" in printed and "1 cases (seed 3, from 4), 1 failed" in printed


def test_dropout_cases_check_the_mask_the_op_draws(monkeypatch, capsys):
    """``--dropout``: a packed case with attention dropout passes against the oracle under the mask
    its seed draws, and fails when the oracle is handed the mask of another seed (the check sees
    the mask, not only the rate)."""
    fuzz_kernels = _fuzz_module()
    monkeypatch.setattr(fuzz_kernels, "DROPOUT_PS", fuzz_kernels.DROPOUT_PS)   # (--dropout rebinds it)
    args = ["varlen", "--dropout", "--cases", "1", "--seed", "1", "--first", "0"]
    assert fuzz_kernels.main(args) == 0
    assert "dropout_p=0" not in capsys.readouterr().out
    drawn = fuzz_kernels._oracle_seed
    monkeypatch.setattr(fuzz_kernels, "_oracle_seed", lambda seed: drawn(seed + 1))
    assert fuzz_kernels.main(args) == 1
    printed = capsys.readouterr().out
    assert "FAIL varlen seed 1 case 0 (" in printed and "dropout_p=0." in printed and "1 failed" in printed
