"""The operator as the chart runs it: its own process, as uid 65532 with no passwd entry and no HOME, with
the pod name and namespace from the environment, against the real API server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.envtest import ApiServer, write_kubeconfig
from tests.operator.k8s import Kube, cpu_spec, wait_for

UID = 65532
SRC = Path(__file__).resolve().parents[2] / "src"
OPERATOR = Path(__file__).resolve().parents[2] / "operator"


@pytest.fixture
def unprivileged_dir() -> Iterator[Path]:
    """A directory the unprivileged uid can read (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="ks-uid-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _no_passwd_entry(uid: int) -> bool:
    import pwd

    try:
        pwd.getpwuid(uid)
    except KeyError:
        return True
    return False


@pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to start a process as another uid (CI runs as root)"
)
async def test_operator_runs_as_a_uid_without_a_passwd_entry(
    k8s: ApiServer, kube: Kube, unprivileged_dir: Path
) -> None:
    assert _no_passwd_entry(UID), f"uid {UID} has a passwd entry here; the test would prove nothing"
    ca = unprivileged_dir / "ca.crt"
    shutil.copy(k8s.ca_file, ca)
    ca.chmod(0o644)
    kubeconfig = write_kubeconfig(
        unprivileged_dir / "kubeconfig", k8s.url, ca, k8s.admin_token, kube.namespace
    )
    kubeconfig.chmod(0o644)
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "KUBESPEECH_OPERATOR_POD_NAME": "kubespeech-operator-7d9f-abcde",
        "KUBESPEECH_OPERATOR_POD_NAMESPACE": "kubespeech-system",
        "KUBESPEECH_OPERATOR_LOG_FORMAT": "text",
        "KUBESPEECH_OPERATOR_METRICS_PORT": str(free_port()),
    }  # no HOME, USER or LOGNAME: what a container with an arbitrary uid has

    def demote() -> None:
        os.setgid(UID)
        os.setgroups([])
        os.setuid(UID)

    # The venv's interpreter lives under root's home here, which another uid cannot enter: run the same
    # minor version from a system path over the venv's packages.
    python = shutil.which(
        f"python{sys.version_info.major}.{sys.version_info.minor}", path="/usr/local/bin:/usr/bin"
    )
    if python is None:
        pytest.skip(f"needs a system python{sys.version_info.major}.{sys.version_info.minor} the uid can run")
    site_packages = next(
        p for p in sys.path if p.endswith("site-packages") and Path(p).is_relative_to(sys.prefix)
    )
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(OPERATOR), site_packages])
    command = [python, "-m", "kubespeech.cli", "operator", "--kubeconfig", str(kubeconfig),
               "--namespace", kube.namespace, "--liveness-port", str(port), "--resync-interval", "1"]  # fmt: skip
    process = subprocess.Popen(  # noqa: ASYNC220 - only polled below, never waited on while running
        command, env=env, cwd=unprivileged_dir, preexec_fn=demote,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        started = time.monotonic()
        async with httpx.AsyncClient() as http:
            while True:
                assert process.poll() is None, process.stdout.read().decode()[-3000:]  # type: ignore[union-attr]
                try:
                    if (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() - started < 60, "operator not live after 60 s"
                await wait_for(lambda: True, timeout=1)
        await kube.create_sd("uid", cpu_spec())
        await wait_for(lambda: kube.child("Deployment", "uid-api"), timeout=20, what="children created")
        assert process.poll() is None
    finally:
        process.terminate()
        try:
            output = process.communicate(timeout=20)[0].decode()
        except subprocess.TimeoutExpired:
            process.kill()
            output = process.communicate()[0].decode()
    assert "getpwuid" not in output and "Traceback" not in output, output[-3000:]
    assert process.returncode == 0, output[-3000:]
