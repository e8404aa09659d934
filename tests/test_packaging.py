"""What ``pip install`` from a release gets: the sdist carries csrc/, and a wheel built from it (as
``python -m build`` and ``pip install prefixkern-*.tar.gz`` build one) ships the CUDA sources inside
the package, where ``prefixkern.build_cuda()`` looks for them. No compiler runs: the CUDA kernels
are built on first use."""
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC_FILES = sorted(p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".cu", ".cuh", ".cpp", ".h"))


def test_wheel_built_from_the_sdist_ships_the_cuda_sources(tmp_path):
    pytest.importorskip("build")      # (the test extra installs it)
    from prefixkern import _cuda_build

    # From a copy without build state: setuptools adds the files an existing egg-info lists to the sdist.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "*.egg-info", "build", "dist", "__pycache__",
                                                                ".*cache*", ".benchmarks", "results"))
    # python -m build: the sdist, then the wheel built from the sdist (a release's own route).
    result = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path), str(source)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (sdist,) = tmp_path.glob("prefixkern-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
    top = names[0].split("/")[0]
    assert {f"{top}/csrc/{name}" for name in CSRC_FILES} <= set(names), names
    (wheel,) = tmp_path.glob("prefixkern-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert "prefixkern/py.typed" in archive.namelist()      # PEP 561: type checkers read its annotations
        shipped = {name.split("/")[-1] for name in archive.namelist() if name.startswith("prefixkern/_csrc/")}
        packages = {name.split("/")[0] for name in archive.namelist() if not name.split("/")[0].endswith(".dist-info")}
    assert shipped == set(CSRC_FILES) and set(_cuda_build.SOURCES) <= shipped
    assert packages == {"prefixkern"}, packages


def test_import_leaves_the_hf_extra_unloaded():
    """``import prefixkern`` works without transformers and peft (the ``hf`` extra): the patch's names
    load on first use, and type checkers see them through the TYPE_CHECKING imports."""
    code = ("import sys, prefixkern; print(sorted(m for m in ('transformers', 'peft') if m in sys.modules)); "
            "print(prefixkern.patch.__module__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[:2] == ["[]", "prefixkern.integrations.hf"], result.stdout
