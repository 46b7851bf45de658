"""Helpers that start real stack processes (workers, API) as subprocesses for integration tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from tests.conftest import free_port

KUBESPEECH = str(Path(sys.executable).with_name("kubespeech"))


def stack_env(redis_url: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"KUBESPEECH_REDIS_URL": redis_url, "HF_HUB_OFFLINE": "1", "KUBESPEECH_LOG_LEVEL": "WARNING"})
    env.update(extra or {})
    return env


def stop_process(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM, then SIGKILL if it is still running after ``timeout`` s; its exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)


class WorkerProcess:
    """A real ``kubespeech worker`` subprocess with its health port."""

    def __init__(
        self,
        redis_url: str,
        *,
        task: str,
        model: str,
        engine: str,
        max_batch_size: int = 8,
        max_wait_ms: int = 5,
        engine_options: Mapping[str, object] | None = None,
        env: Mapping[str, str] | None = None,
        log: Path | None = None,
    ) -> None:
        self.health_port = free_port()
        args = [
            KUBESPEECH, "worker", "--task", task, "--model", model, "--engine", engine,
            "--max-batch-size", str(max_batch_size), "--max-wait-ms", str(max_wait_ms),
            "--health-port", str(self.health_port),
        ]  # fmt: skip
        if engine_options:
            args += ["--engine-options", json.dumps(engine_options)]
        # With ``log``, the worker's output goes to that file (tests that read the logs), else to ours.
        out = log.open("ab") if log is not None else None
        self.proc = subprocess.Popen(args, env=stack_env(redis_url, env), stdout=out, stderr=out)
        if out is not None:
            out.close()  # the child has its own copy

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.health_port}{path}"

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url(path), timeout=2) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def wait_ready(self, timeout: float = 60.0) -> None:
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode} before becoming ready")
            try:
                if self.get("/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError("worker did not become ready")

    def stop(self, timeout: float = 10.0) -> int:
        return stop_process(self.proc, timeout)
