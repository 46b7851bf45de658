"""A fake Kubernetes API (KMock 0.8 over real HTTP) for the operator tests that inject faults a real API
server cannot be made to produce on demand (5xx answers); everything else runs against the real server.

KMock's limits are silent (see ../shared/FACTS.md): server-side apply is ignored, no PUT, no label
selectors, no generation/uid, no garbage collection. This adds the two API server behaviours kopf relies on.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import kmock
import yaml

from kubespeech_operator.builders import CHILD_KINDS

SD_RESOURCE = "kubespeech.io/v1alpha1/speechdeployments"
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
    # Injected faults: (HTTP method, a substring of the path) → the status every such request gets.
    faults: dict[tuple[str, str], int]

    def fail(self, method: str, path_part: str, status: int) -> None:
        self.faults = {**getattr(self, "faults", {}), (method, path_part): status}

    def heal(self) -> None:
        self.faults = {}

    # KMock matches each request against its whole request log (quadratic over a long run): a benchmark
    # sets this to False to keep only the requests in flight. Tests keep the log to assert on it.
    keep_request_log = True

    async def _handle(self, request: kmock.Request) -> Any:
        for (method, part), status in getattr(self, "faults", {}).items():
            if request.method.value == method and part in str(request.url.path):
                raise kmock.KubernetesError(
                    status=status, reason="ServiceUnavailable", message="injected fault"
                )
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
        try:
            return await super()._handle(request)
        finally:
            if not self.keep_request_log:
                for index, logged in enumerate(self._requests):
                    if logged is request:
                        del self._requests[index]
                        break

    # KMock answers a read of one object by scanning every stored object; with thousands of children (the
    # 100-SpeechDeployment benchmark) that dominates. Same answers, by key.
    def _lookup(
        self, request: kmock.Request, namespace: str | None, name: str | None, *, deleted: bool = False
    ) -> Any:
        store: dict[Any, Any] = self.objects._objects  # the array's own dict, read only
        obj = store.get((request.resource, namespace, name))
        if obj is None or (obj.deleted and not deleted):
            raise kmock.KubernetesNotFoundError()
        return obj

    async def _serve_fetch(self, request: kmock.Request) -> Any:
        return self._lookup(request, request.namespace, request.name).raw

    async def _serve_create(self, request: kmock.Request) -> Any:
        meta = request.data.get("metadata", {})
        return self._lookup(request, request.namespace or meta.get("namespace"), meta.get("name")).raw

    async def _serve_update(self, request: kmock.Request) -> Any:
        # Like KMock: the last state, even when this very patch released the object for deletion.
        return self._lookup(request, request.namespace, request.name, deleted=True).last.raw

    def _check_json_patch_tests(self, request: kmock.Request, ops: list[Any]) -> None:
        # A failed "test" op is 422 on a real API server (kopf then retries on the next cycle); KMock's
        # jsonpatch exception would surface as a 500 that kopf retries as a server error.
        store: dict[Any, Any] = self.objects._objects
        stored = store.get((request.resource, request.namespace, request.name))
        stored = None if stored is None or stored.deleted else stored
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
