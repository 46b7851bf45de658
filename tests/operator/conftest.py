"""Fixtures for the operator tests: KMock over real HTTP, and the operator running in the test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import kmock
import pytest

from kubespeech_operator.cli import run_operator
from kubespeech_operator.settings import OperatorSettings
from tests.conftest import free_port
from tests.operator.kmock_cluster import Emulator, declare_resources, write_kubeconfig


@dataclass
class Cluster:
    """A running KMock API server and a kubeconfig pointing at it."""

    api: Emulator
    url: str
    kubeconfig: Path


@dataclass
class RunningOperator:
    settings: OperatorSettings
    task: asyncio.Task[None]


@pytest.fixture
async def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Cluster]:
    monitoring = bool(request.node.get_closest_marker("monitoring"))
    async with Emulator() as api, kmock.Server(api) as server:
        declare_resources(api, monitoring=monitoring)
        url = str(server.url)
        yield Cluster(api, url, write_kubeconfig(tmp_path / "kubeconfig", url))


@contextlib.asynccontextmanager
async def operator_running(settings: OperatorSettings) -> AsyncIterator[RunningOperator]:
    """kopf as a task in this event loop (not KopfRunner's thread), stopped and awaited on exit."""
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run_operator(settings, stop_flag=stop, ready_flag=ready, shared_loop=True))
    done, _ = await asyncio.wait([task, asyncio.create_task(ready.wait())], timeout=15,
                                 return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
    if task in done:
        task.result()  # raises the startup error
    if not ready.is_set():
        task.cancel()
        raise AssertionError("the operator did not become ready in 15 s")
    try:
        yield RunningOperator(settings, task)
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, 15)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@pytest.fixture
def operator_settings(cluster: Cluster) -> OperatorSettings:
    return OperatorSettings(
        kubeconfig=cluster.kubeconfig,
        namespaces="",
        liveness_host="127.0.0.1",
        liveness_port=free_port(),
        resync_interval_s=0.5,
        redis_timeout_s=0.3,
        log_format="text",
    )


@pytest.fixture
async def operator(operator_settings: OperatorSettings) -> AsyncIterator[RunningOperator]:
    async with operator_running(operator_settings) as running:
        yield running


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "monitoring: declare the monitoring.coreos.com ServiceMonitor API in KMock"
    )
