"""scripts/gpu_first_run.sh in dry-run mode, and the sanitizer driver's coverage of the CUDA kernels (no GPU needed).

Cost: one dry run (one Python start-up that imports torch) and the sanitizer cases on the cpp backend: ~10 s on an
idle 2-core machine.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_first_run.sh"
STEPS = ["build", "check_st", "check_dc", "pytest", "memcheck", "racecheck", "synccheck", "benchmarks"]


def _run(*args, out=None, timeout=300):
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    if out is not None:
        env["OUT"] = str(out)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def cuda_kernel_names() -> set[str]:
    """Every __global__ function defined in csrc/cuda/."""
    names = set()
    for path in (ROOT / "csrc" / "cuda").glob("*.cu"):
        text = path.read_text()
        for match in re.finditer(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(", text):
            names.add(match.group(1))
    return names


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("first-run")
    result = _run("--dry-run", out=out)
    return result, out


def test_dry_run_lays_out_every_step(dry_run):
    result, out = dry_run
    assert result.returncode == 0, result.stdout + result.stderr
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in summary] == STEPS, summary
    assert all(line.split()[1] == "DRY" for line in summary), summary
    for name in ("env.txt", "build.log", "pytest.log", "sanitize-memcheck.log", "sanitize-racecheck.log",
                 "sanitize-synccheck.log", "benchmarks.log", "sanitize-cases.txt"):
        assert (out / name).is_file(), name
    assert "torch" in (out / "env.txt").read_text()


def test_dry_run_build_is_for_one_arch_with_all_cores(dry_run):
    result, out = dry_run
    build = (out / "build.log").read_text()
    assert "FORCE_CUDA=1" in build and "build_ext --inplace" in build, build
    assert re.search(r"TORCH_CUDA_ARCH_LIST=\d+\.\d+ ", build), build  # one arch, not a list
    assert f"MAX_JOBS={os.cpu_count()}" in build, build
    assert "--tool racecheck" in (out / "sanitize-racecheck.log").read_text()
    assert "--quick --out " + str(out / "benchmarks") in (out / "benchmarks.log").read_text()


def test_sanitizer_cases_launch_every_cuda_kernel(dry_run):
    _, out = dry_run
    listed = (out / "sanitize-cases.txt").read_text()
    kernels = cuda_kernel_names()
    assert len(kernels) >= 16, kernels  # the parser found the kernels
    missing = {name for name in kernels if name not in listed}
    assert not missing, f"no sanitizer case launches {sorted(missing)}; add one to scripts/gpu_sanitize_cases.py"


def test_bad_arguments_are_refused(tmp_path):
    result = _run("--out", str(tmp_path / "x"), "--budget", "soon")
    assert result.returncode == 2 and "--budget must be a whole number" in result.stderr
    result = _run("--frobnicate")
    assert result.returncode == 2 and "unknown argument '--frobnicate'" in result.stderr


def test_sanitizer_cases_are_well_formed_calls():
    """The driver's cases, run on CPU tensors with the cpp backend: their calls and shapes are valid."""
    from torchnova import _ext

    if not _ext.HAS_CPP:
        pytest.skip(_ext.CPP_IMPORT_ERROR)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "pyext"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_sanitize_cases.py"), "--cpu-smoke"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cases ran" in result.stdout and "failed" not in result.stdout and "[FAIL]" not in result.stdout
