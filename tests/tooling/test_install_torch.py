"""scripts/install-torch.py: it takes the CPU index only when that answers, falls back to the configured
index otherwise, and tells a CPU build from a CUDA one. Nothing here installs torch."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chart.test_chart import load_script
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "install-torch.py"


class _Index(http.server.BaseHTTPRequestHandler):
    """A package index that knows one project, torch (a PEP 503 page with no files)."""

    def do_GET(self) -> None:
        known = self.path.rstrip("/").endswith("/torch")
        self.send_response(200 if known else 404)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(b"<html><body></body></html>" if known else b"not found")

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the test output is not the place for an access log."""


@pytest.fixture
def local_index() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Index)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/whl/cpu"
    server.shutdown()
    server.server_close()


def test_an_index_that_answers_is_used(local_index: str) -> None:
    installer = load_script("install-torch")
    assert installer.cpu_index_serves_torch(local_index, 2.0) is True
    assert (
        installer.cpu_index_serves_torch(local_index.replace("/whl/cpu", "/elsewhere/nothing"), 2.0) is True
    )
    command = installer.pip_command("python", "2.13.0", local_index)
    assert command == ["python", "-m", "pip", "install", "torch==2.13.0", "--index-url", local_index]


def test_an_unreachable_index_is_given_up_quickly() -> None:
    installer = load_script("install-torch")
    closed = f"http://127.0.0.1:{free_port()}/whl/cpu"  # nothing listens there
    started = time.monotonic()
    assert installer.cpu_index_serves_torch(closed, 2.0) is False
    assert time.monotonic() - started < 2.5
    assert installer.cpu_index_serves_torch("", 2.0) is False  # KUBESPEECH_TORCH_CPU_INDEX="" skips it


def test_an_index_without_torch_is_not_used() -> None:
    installer = load_script("install-torch")

    class NoTorch(_Index):
        def do_GET(self) -> None:
            self.send_response(404)
            self.end_headers()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NoTorch)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert (
            installer.cpu_index_serves_torch(f"http://127.0.0.1:{server.server_address[1]}/whl/cpu", 2.0)
            is False
        )
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("reachable", [True, False], ids=["cpu-index", "configured-index"])
def test_the_script_chooses_the_index_it_can_reach(local_index: str, reachable: bool) -> None:
    index = local_index if reachable else f"http://127.0.0.1:{free_port()}/whl/cpu"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--cpu-index", index, "--timeout", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    command = result.stdout.strip().splitlines()[-1]
    assert "-m pip install torch==2.13.0" in command
    assert (f"--index-url {index}" in command) is reachable, result.stdout
    if not reachable:
        assert "using the configured pip index instead" in result.stdout


def test_a_cuda_build_is_told_apart_from_the_cpu_build() -> None:
    installer = load_script("install-torch")
    cpu = {"version": "2.13.0+cpu", "cuda": None}
    cuda = {"version": "2.13.0", "cuda": "12.8"}
    assert installer.is_wanted(cpu, "2.13.0") and installer.is_wanted(
        {"version": "2.13.0", "cuda": None}, "2.13.0"
    )
    assert not installer.is_wanted(cuda, "2.13.0")
    assert not installer.is_wanted({"version": "2.12.0+cpu", "cuda": None}, "2.13.0")
    assert not installer.is_wanted(None, "2.13.0")
    assert installer.cuda_warning(cpu) is None
    warning = installer.cuda_warning(cuda)
    assert warning and "CUDA 12.8 build" in warning and "KUBESPEECH_TORCH_CPU_INDEX" in warning
    # A CUDA build of the right version is replaced, keeping the dependencies that are already there.
    assert installer.pip_command("python", "2.13.0", None, replace=True)[-2:] == [
        "--force-reinstall",
        "--no-deps",
    ]


def test_the_build_is_read_from_torch_itself(tmp_path: Path) -> None:
    installer = load_script("install-torch")
    build = installer.installed_build(sys.executable)
    if build is None:
        pytest.skip("needs torch in this environment (installed by make venv)")
    import torch

    assert build == {"version": torch.__version__, "cuda": torch.version.cuda}
    # A fresh environment has no torch: the installer then installs rather than replaces.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    assert installer.installed_build(str(tmp_path / "venv" / "bin" / "python")) is None
