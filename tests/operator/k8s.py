"""Test-side helpers against the real API server: an async admin client, SpeechDeployment specs, polling."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx

from kubespeech_operator.builders import CHILD_KINDS
from tests.envtest import ApiServer, api_path

SD_API = "kubespeech.io/v1alpha1"
SD_PLURAL = "speechdeployments"
PLURALS = {kind: (api_version, plural) for api_version, kind, plural in CHILD_KINDS}


def cpu_spec(**overrides: Any) -> dict[str, Any]:
    """A small valid spec: one whisper ASR pool, one piper TTS pool, embedded Redis."""
    spec: dict[str, Any] = {
        "license": {"secretRef": {"name": "license", "key": "key"}},
        "api": {"apiKeysSecretRef": {"name": "api-keys", "key": "keys"}, "replicas": 1},
        "asr": {"pools": [{"name": "cpu", "engine": "whisper", "modelName": "whisper-tiny"}]},
        "tts": {"pools": [{"name": "cpu", "engine": "piper", "modelName": "joe"}]},
    }
    spec.update(overrides)
    return spec


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return dict(c)
    return None


async def wait_for(predicate: Callable[[], Any], *, timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy; fail with ``what`` after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return value
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            last_error = exc
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: {last_error!r})")


class Kube:
    """A small async client for tests, bound to one namespace."""

    def __init__(self, http: httpx.AsyncClient, namespace: str) -> None:
        self.http = http
        self.namespace = namespace

    @classmethod
    @asynccontextmanager
    async def admin(cls, server: ApiServer, namespace: str, token: str | None = None) -> AsyncIterator[Kube]:
        async with httpx.AsyncClient(
            base_url=server.url,
            verify=server.ssl_context(),
            headers={"Authorization": f"Bearer {token or server.admin_token}"},
            timeout=30,
        ) as http:
            yield cls(http, namespace)

    async def get(self, api_version: str, plural: str, name: str) -> dict[str, Any] | None:
        response = await self.http.get(api_path(api_version, plural, self.namespace, name))
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return dict(response.json())

    async def child(self, kind: str, name: str) -> dict[str, Any] | None:
        api_version, plural = PLURALS[kind]
        return await self.get(api_version, plural, name)

    async def sd(self, name: str) -> dict[str, Any] | None:
        return await self.get(SD_API, SD_PLURAL, name)

    async def create(self, api_version: str, plural: str, body: dict[str, Any]) -> dict[str, Any]:
        response = await self.http.post(api_path(api_version, plural, self.namespace), json=body)
        assert response.status_code == 201, response.text
        return dict(response.json())

    async def create_sd(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {"apiVersion": SD_API, "kind": "SpeechDeployment",
                "metadata": {"name": name, "namespace": self.namespace}, "spec": spec}  # fmt: skip
        return await self.create(SD_API, SD_PLURAL, body)

    async def update_sd(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        """Replace the spec (a JSON merge patch of the whole spec, with nulls for removed keys)."""
        live = await self.sd(name)
        assert live is not None
        patch_spec: dict[str, Any] = {k: None for k in live["spec"] if k not in spec}
        patch_spec.update(spec)
        return await self.merge_patch(
            SD_API, SD_PLURAL, name, {"spec": _with_nulls(live["spec"], patch_spec)}
        )

    async def merge_patch(
        self, api_version: str, plural: str, name: str, patch: dict[str, Any], *, subresource: str = "",
        manager: str = "test-editor",
    ) -> dict[str, Any]:  # fmt: skip
        path = api_path(api_version, plural, self.namespace, name) + (
            f"/{subresource}" if subresource else ""
        )
        response = await self.http.patch(
            path, content=json.dumps(patch), params={"fieldManager": manager},
            headers={"Content-Type": "application/merge-patch+json"},
        )  # fmt: skip
        assert response.status_code == 200, response.text
        return dict(response.json())

    async def delete(self, api_version: str, plural: str, name: str) -> None:
        response = await self.http.delete(api_path(api_version, plural, self.namespace, name))
        assert response.status_code in (200, 202), response.text

    async def create_secret(self, name: str, data: dict[str, str]) -> None:
        await self.create("v1", "secrets", {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}})  # fmt: skip

    async def create_license_secret(self) -> None:
        await self.create_secret("license", {"key": "license-key"})

    async def children(self, instance: str) -> dict[tuple[str, str], dict[str, Any]]:
        """(kind, name) → object of every child kind labelled with the stack's instance label, except
        objects being deleted."""
        result: dict[tuple[str, str], dict[str, Any]] = {}
        for api_version, kind, plural in CHILD_KINDS:
            response = await self.http.get(
                api_path(api_version, plural, self.namespace),
                params={"labelSelector": f"app.kubernetes.io/instance={instance}"},
            )
            if response.status_code == 404:  # the kind is not served (ServiceMonitor without its CRD)
                continue
            response.raise_for_status()
            for item in response.json().get("items") or []:
                # Deleted, waiting for a controller to clear its finalizer (PVC protection): gone for us.
                if not item["metadata"].get("deletionTimestamp"):
                    result[(kind, item["metadata"]["name"])] = item
        return result

    async def events(self) -> list[dict[str, Any]]:
        response = await self.http.get(api_path("v1", "events", self.namespace))
        response.raise_for_status()
        return list(response.json().get("items") or [])

    async def set_workloads_ready(self, instance: str) -> None:
        """Play the kubelet and the controllers: every Deployment/StatefulSet of the stack reports its pods
        ready (this server runs no controllers)."""
        for (kind, name), obj in (await self.children(instance)).items():
            if kind not in ("Deployment", "StatefulSet"):
                continue
            replicas = obj["spec"].get("replicas", 1)
            api_version, plural = PLURALS[kind]
            generation = obj["metadata"].get("generation", 1)
            await self.merge_patch(api_version, plural, name, {"status": {
                "observedGeneration": generation, "replicas": replicas, "readyReplicas": replicas,
                "updatedReplicas": replicas, "availableReplicas": replicas}},
                subresource="status", manager="kube-controller-manager")  # fmt: skip


def _with_nulls(live: Any, want: Any) -> Any:
    """A merge patch turning ``live`` into ``want``: keys ``want`` lacks become null (recursively)."""
    if isinstance(live, dict) and isinstance(want, dict):
        result = {k: None for k in live if k not in want}
        for key, value in want.items():
            result[key] = _with_nulls(live.get(key), value) if key in live else value
        return result
    return want
