"""Faults a real API server cannot be made to produce on demand, injected with KMock: an API server that
answers 503 makes the stack Degraded (ClusterUnavailable), retried, never a crash. (KMock ignores
server-side apply, so recovery is shown on the real server, by the invalid-spec test.) Everything else about the operator is tested against the real kube-apiserver."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import kmock

from tests.operator.conftest import operator_running, settings_for
from tests.operator.k8s import condition, cpu_spec, wait_for
from tests.operator.kmock_cluster import (
    SD_RESOURCE,
    Emulator,
    declare_resources,
    get_object,
    write_kubeconfig,
)

NS = "faults"


async def test_api_server_errors_degrade_then_recover(tmp_path: Path) -> None:
    async with Emulator() as api, kmock.Server(api) as server:
        declare_resources(api)
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", str(server.url))
        api.fail("GET", "/deployments", 503)
        body = {"apiVersion": "kubespeech.io/v1alpha1", "kind": "SpeechDeployment",
                "metadata": {"name": "f", "namespace": NS, "uid": "uid-f", "generation": 1}, "spec": cpu_spec()}  # fmt: skip
        response = await api.post(
            f"/apis/{SD_RESOURCE.replace('/speechdeployments', '')}/namespaces/{NS}/speechdeployments",
            json=body,
        )
        assert response.status == 200, await response.text()

        def sd() -> Any:
            return get_object(api, "kubespeech.io/v1alpha1", "speechdeployments", NS, "f")

        settings = settings_for(kubeconfig, "")  # KMock cannot list namespaces
        async with operator_running(settings):

            def degraded() -> Any:
                c = condition(sd(), "Degraded")
                return c if c and c["status"] == "True" else None

            c = await wait_for(degraded, what="Degraded on 503")
            assert c["reason"] == "ClusterUnavailable", c
            assert "HTTP 503" in c["message"] and "list Deployment" in c["message"]
            assert condition(sd(), "Ready")["status"] == "False"

            # Retried, not given up on, and the operator stays alive: a later tick lists again.
            lists = [
                r
                for r in list(api)
                if r.method.value == "GET" and "/namespaces/faults/deployments" in str(r.url.path)
            ]
            await wait_for(
                lambda: (
                    len(
                        [
                            r
                            for r in list(api)
                            if r.method.value == "GET" and "/namespaces/faults/deployments" in str(r.url.path)
                        ]
                    )
                    > len(lists)
                ),
                what="a retry",
            )
            async with httpx.AsyncClient() as client:
                health = await client.get(f"http://127.0.0.1:{settings.liveness_port}/healthz")
            assert health.status_code == 200
