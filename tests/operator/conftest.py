"""Fixtures for the operator tests: the real kube-apiserver with the CRD installed, a namespace per test, and
the operator running in the test's event loop (kopf as a task, not KopfRunner's thread)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubespeech_operator.cli import run_operator
from kubespeech_operator.settings import OperatorSettings
from tests.conftest import free_port
from tests.envtest import ApiServer, apply, ensure_namespace, wait_crd_established
from tests.operator.k8s import Kube

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "kubespeech.io_speechdeployments.yaml"
_namespaces = itertools.count(1)


@dataclass
class RunningOperator:
    settings: OperatorSettings
    task: asyncio.Task[None]


@pytest.fixture(scope="session")
def k8s(apiserver: ApiServer) -> ApiServer:
    """The session's API server with the SpeechDeployment CRD installed (from crds/, as a user would)."""
    crd = yaml.safe_load(CRD_FILE.read_text())
    with apiserver.client() as client:
        response = apply(client, crd, "customresourcedefinitions", manager="kubectl")
        assert response.status_code in (200, 201), response.text
        wait_crd_established(client, crd["metadata"]["name"])
    return apiserver


@pytest.fixture
def namespace(k8s: ApiServer, request: pytest.FixtureRequest) -> str:
    """A fresh namespace per test: the operator under test watches only it."""
    name = f"op-{next(_namespaces)}-{request.node.name[5:30].lower().replace('_', '-').strip('-')}"
    with k8s.client() as client:
        ensure_namespace(client, name)
    return name


@pytest.fixture
async def kube(k8s: ApiServer, namespace: str) -> AsyncIterator[Kube]:
    """An admin client for the test's own reads and writes (the operator has its own)."""
    async with Kube.admin(k8s, namespace) as client:
        yield client


@contextlib.asynccontextmanager
async def operator_running(settings: OperatorSettings) -> AsyncIterator[RunningOperator]:
    """kopf as a task in this event loop, stopped and awaited on exit."""
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run_operator(settings, stop_flag=stop, ready_flag=ready, shared_loop=True))
    done, _ = await asyncio.wait([task, asyncio.create_task(ready.wait())], timeout=20,
                                 return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
    if task in done:
        task.result()  # raises the startup error
    if not ready.is_set():
        task.cancel()
        raise AssertionError("the operator did not become ready in 20 s")
    try:
        yield RunningOperator(settings, task)
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, 20)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def settings_for(kubeconfig: Path, namespace: str, **overrides: object) -> OperatorSettings:
    values: dict[str, object] = {
        "kubeconfig": kubeconfig,
        "namespaces": namespace,
        "liveness_host": "127.0.0.1",
        "liveness_port": free_port(),
        "metrics_port": 0,  # a test that reads metrics sets one (the server cannot be stopped in-process)
        "resync_interval_s": 0.5,
        "redis_timeout_s": 1.0,
        "log_format": "text",
        "pod_name": "operator-under-test",
    }
    values.update(overrides)
    return OperatorSettings(**values)  # type: ignore[arg-type]


@pytest.fixture
def operator_settings(k8s: ApiServer, namespace: str, tmp_path: Path) -> OperatorSettings:
    return settings_for(k8s.kubeconfig(tmp_path / "kubeconfig"), namespace)


@pytest.fixture
async def operator(operator_settings: OperatorSettings) -> AsyncIterator[RunningOperator]:
    async with operator_running(operator_settings) as running:
        yield running


def _open_crd(group: str, kind: str, plural: str, version: str) -> dict[str, Any]:
    """A CRD that accepts any object of its kind (the real schema is the other project's business)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower()},
            "versions": [{"name": version, "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}],
        },
    }  # fmt: skip


@pytest.fixture
def keda_crds(k8s: ApiServer) -> Iterator[None]:
    """KEDA's ScaledObject and TriggerAuthentication kinds, removed again after the test."""
    crds = [_open_crd("keda.sh", kind, plural, "v1alpha1")
            for kind, plural in (("ScaledObject", "scaledobjects"), ("TriggerAuthentication", "triggerauthentications"))]  # fmt: skip
    with k8s.client() as client:
        for crd in crds:
            assert apply(client, crd, "customresourcedefinitions").status_code in (200, 201)
            wait_crd_established(client, crd["metadata"]["name"])
    yield
    with k8s.client() as client:
        for crd in crds:
            _delete_crd(client, crd["metadata"]["name"])


def _delete_crd(client: Any, name: str) -> None:
    path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"
    client.delete(path)
    # Gone only once its objects are cleaned up; a test that recreates it meanwhile would get the
    # terminating one, which then disappears under it.
    deadline = time.monotonic() + 30
    while client.get(path).status_code != 404:
        assert time.monotonic() < deadline, f"CRD {name} was not deleted in 30 s"
        time.sleep(0.1)


@pytest.fixture
def monitoring_crd(k8s: ApiServer) -> Iterator[None]:
    """A minimal ServiceMonitor CRD (monitoring.coreos.com/v1), as the Prometheus operator installs it."""
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
        "spec": {
            "group": "monitoring.coreos.com",
            "scope": "Namespaced",
            "names": {"kind": "ServiceMonitor", "listKind": "ServiceMonitorList", "plural": "servicemonitors",
                      "singular": "servicemonitor"},
            "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}],
        },
    }  # fmt: skip
    with k8s.client() as client:
        assert apply(client, crd, "customresourcedefinitions").status_code in (200, 201)
        wait_crd_established(client, crd["metadata"]["name"])
    yield
    with k8s.client() as client:
        _delete_crd(client, crd["metadata"]["name"])
