"""What ships: the data-plane wheel holds no operator, benchmark or test code, and the data plane imports no
operator; the operator's own wheel holds only the operator."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def build_wheel(project: Path, out: Path) -> zipfile.ZipFile:
    # --no-build-isolation: the venv's setuptools builds it, so the test needs no network. setuptools builds
    # in the source tree: a build/ directory it creates there is removed again.
    build_dir = project / "build"
    existed = build_dir.exists()
    try:
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
             str(project)],
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip
    finally:
        if not existed:
            shutil.rmtree(build_dir, ignore_errors=True)
    (wheel,) = out.glob("*.whl")
    return zipfile.ZipFile(wheel)


@pytest.fixture(scope="module")
def data_plane_files(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return build_wheel(ROOT, tmp_path_factory.mktemp("wheel")).namelist()


def test_the_data_plane_wheel_ships_no_operator_benchmark_or_test_code(data_plane_files: list[str]) -> None:
    modules = [n for n in data_plane_files if n.endswith(".py")]
    assert "kubespeech/api/app.py" in modules and "kubespeech/worker/runtime.py" in modules
    assert "kubespeech/localrun.py" in modules  # `kubespeech dev` (it needs the operator package to run)
    shipped_by_mistake = [
        n for n in modules
        if n.startswith(("kubespeech_operator/", "kubespeech/bench/", "tests/")) or "nemo_tiny" in n or "kmock" in n
    ]  # fmt: skip
    assert shipped_by_mistake == []


def test_the_operator_wheel_ships_only_the_operator(tmp_path: Path) -> None:
    names = build_wheel(ROOT / "operator", tmp_path).namelist()
    modules = [n for n in names if n.endswith(".py")]
    assert (
        "kubespeech_operator/reconciler.py" in modules and "kubespeech_operator/builders/pools.py" in modules
    )
    assert all(n.startswith("kubespeech_operator/") for n in modules), modules
    assert not any("bench" in n or "fake" in n for n in modules)


@pytest.mark.parametrize(
    "module", ["kubespeech.worker.cli", "kubespeech.worker.runtime", "kubespeech.api.app"]
)
def test_the_data_plane_imports_nothing_of_the_operator(module: str) -> None:
    probe = (
        f"import sys, {module}; "
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('kubespeech_operator', 'kopf', 'tests')); "
        "print(leaked); sys.exit(1 if leaked else 0)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
