"""A fake Kubernetes API (KMock 0.8 over real HTTP) with the kinds the operator uses, and helpers to drive it.

KMock's limits are silent (see ../shared/FACTS.md): no server-side apply, no PUT, no label selectors, no
generation/uid, no garbage collection. Tests therefore assert on the objects KMock stored (so a verb it
ignored fails them), set ``uid`` and ``generation`` themselves, and check ownerReferences instead of GC.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import kmock
import yaml

from kubespeech_operator.builders import CHILD_KINDS

SD_RESOURCE = "kubespeech.io/v1alpha1/speechdeployments"
SD_PATH = "/apis/kubespeech.io/v1alpha1/namespaces/{namespace}/speechdeployments"
ALL_VERBS = {"get", "list", "watch", "create", "patch", "delete"}


def resource_key(api_version: str, plural: str) -> str:
    return f"{api_version}/{plural}"


class Emulator(kmock.KubernetesEmulator):
    """KMock plus two things every API server does and kopf relies on.

    A new ``resourceVersion`` on every write: kopf waits (``consistency_timeout``) for a version newer
    than its own last patch before handling an object again, and KMock's versions never move otherwise.
    Names for ``generateName`` creations (kopf's Events): KMock would key them all under ``None``.
    """

    _counter = itertools.count(1000)

    async def _handle(self, request: kmock.Request) -> Any:
        if request.resource is not None and request.action in (kmock.action.CREATE, kmock.action.UPDATE):
            version = str(next(self._counter))
            data = request.data
            if isinstance(data, dict):
                meta = data.setdefault("metadata", {})
                if (
                    request.action == kmock.action.CREATE
                    and not meta.get("name")
                    and meta.get("generateName")
                ):
                    meta["name"] = f"{meta['generateName']}{version}"
                meta["resourceVersion"] = version
            elif isinstance(data, list):  # a JSON patch: tests first, then move the version on
                self._check_json_patch_tests(request, data)
                data.append({"op": "add", "path": "/metadata/resourceVersion", "value": version})
        return await super()._handle(request)

    def _check_json_patch_tests(self, request: kmock.Request, ops: list[Any]) -> None:
        # A failed "test" op is 422 on a real API server (kopf then retries on the next cycle); KMock's
        # jsonpatch exception would surface as a 500 that kopf retries as a server error.
        key = (request.resource, request.namespace, request.name)
        stored = self.objects[key] if key in self.objects and not self.objects[key].deleted else None
        current = ((stored.raw if stored is not None else {}).get("metadata") or {}).get("resourceVersion")
        for op in ops:
            if (
                op.get("op") == "test"
                and op.get("path") == "/metadata/resourceVersion"
                and op.get("value") != current
            ):
                raise kmock.KubernetesError(
                    status=422, reason="Invalid", message="resourceVersion test failed"
                )


def declare_resources(server: kmock.KubernetesEmulator, *, monitoring: bool = False) -> None:
    """Declare every kind the operator touches; kopf waits forever for undeclared namespaces or CRDs."""
    server.resources["v1/namespaces"] = kmock.ResourceInfo(
        kind="Namespace", singular="namespace", namespaced=False, verbs={"get", "list", "watch"}
    )
    server.resources[SD_RESOURCE] = kmock.ResourceInfo(
        kind="SpeechDeployment",
        singular="speechdeployment",
        namespaced=True,
        verbs=ALL_VERBS,
        shortnames={"sd", "speech"},
        categories={"kubespeech"},
        subresources={"status"},
    )
    for api_version, kind, plural in CHILD_KINDS:
        if api_version.startswith("monitoring.coreos.com") and not monitoring:
            continue
        server.resources[resource_key(api_version, plural)] = kmock.ResourceInfo(
            kind=kind, singular=kind.lower(), namespaced=True, verbs=ALL_VERBS, subresources={"status"}
        )
    server.resources["v1/pods"] = kmock.ResourceInfo(
        kind="Pod", singular="pod", namespaced=True, verbs=ALL_VERBS
    )
    server.resources["v1/events"] = kmock.ResourceInfo(
        kind="Event", singular="event", namespaced=True, verbs={"create", "list"}
    )


def write_kubeconfig(path: Path, server_url: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "kmock",
                "clusters": [{"name": "kmock", "cluster": {"server": server_url}}],
                "users": [{"name": "kmock", "user": {"token": "test-token"}}],
                "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
            }
        )
    )
    return path


def speech_deployment(
    name: str, namespace: str, spec: dict[str, Any], *, uid: str | None = None, generation: int = 1
) -> dict[str, Any]:
    return {
        "apiVersion": "kubespeech.io/v1alpha1",
        "kind": "SpeechDeployment",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid or f"uid-{name}",
            "generation": generation,
        },
        "spec": spec,
    }


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


def get_object(
    server: kmock.KubernetesEmulator, api_version: str, plural: str, namespace: str, name: str
) -> Any:
    """The stored object, or None if absent/deleted."""
    key = (resource_key(api_version, plural), namespace, name)
    try:
        obj = server.objects[key]
    except KeyError:
        return None
    return None if obj.deleted else obj.raw


def stored_children(
    server: kmock.KubernetesEmulator, namespace: str
) -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) → object, for every live object of a child kind in ``namespace``."""
    kinds = {resource_key(a, p): k for a, k, p in CHILD_KINDS}
    result = {}
    for (resource, ns, name), obj in list(server.objects.items()):
        key = resource_key(resource.group + "/" + resource.version if resource.group else resource.version,
                           resource.plural)  # fmt: skip
        if ns == namespace and key in kinds and not obj.deleted:
            result[(kinds[key], name)] = obj.raw
    return result


async def wait_for(predicate: Callable[[], Any], *, timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            last_error = exc
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: {last_error!r})")


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return dict(c)
    return None


def requests_to(server: kmock.KubernetesEmulator, method: str, path_part: str) -> list[Any]:
    return [r for r in list(server) if r.method.value == method and path_part in str(r.url.path)]


def operator_patches(requests: Iterable[Any]) -> list[Any]:
    """PATCH requests made by the operator's own client (kopf's bookkeeping patches are its business)."""
    return [
        r
        for r in requests
        if r.method.value == "PATCH" and r.headers.get("User-Agent") == "kubespeech-operator"
    ]
