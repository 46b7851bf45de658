"""A fake Kubernetes API (KMock 0.8 over real HTTP) with the kinds the operator uses, and helpers to drive it.

KMock's limits are silent (see ../shared/FACTS.md): no server-side apply, no PUT, no label selectors, no
generation/uid, no garbage collection. Tests therefore assert on the objects KMock stored (so a verb it
ignored fails them), set ``uid`` and ``generation`` themselves, and check ownerReferences instead of GC.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any

import kmock

from kubespeech_operator.builders import CHILD_KINDS
from kubespeech_operator.fakecluster import (
    SD_RESOURCE,
    Emulator,
    declare_resources,
    resource_key,
    write_kubeconfig,
)

__all__ = ["SD_RESOURCE", "Emulator", "declare_resources", "write_kubeconfig"]

SD_PATH = "/apis/kubespeech.io/v1alpha1/namespaces/{namespace}/speechdeployments"


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
