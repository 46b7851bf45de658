"""A small async Kubernetes client (httpx) that uses the same credentials as kopf: kubeconfig or in-cluster."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import json
import os
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import kopf
import yaml

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")

JsonObject = dict[str, Any]


class ApiError(Exception):
    """A Kubernetes API request failed; ``status`` is the HTTP status (0: the server was not reached)."""

    def __init__(self, status: int, method: str, path: str, message: str) -> None:
        super().__init__(
            f"{method} {path}: HTTP {status}: {message}" if status else f"{method} {path}: {message}"
        )
        self.status = status
        self.method = method
        self.path = path
        self.message = message

    @property
    def temporary(self) -> bool:
        """Whether retrying the same request later can succeed without anyone changing anything."""
        return self.status == 0 or self.status == 409 or self.status == 429 or self.status >= 500


class CredentialsError(Exception):
    """Neither an in-cluster service account nor a usable kubeconfig was found."""


def load_connection_info(kubeconfig: str | os.PathLike[str] | None = None) -> kopf.ConnectionInfo:
    """Credentials from, in order: ``kubeconfig`` (a path), the in-cluster service account, ``$KUBECONFIG``.

    Read at call time (never at import time, unlike kubernetes_asyncio), so tests and the CLI can choose
    the cluster. Exec and auth-provider plugins are not run: use a token or client certificate.
    """
    if kubeconfig is not None:
        return _from_kubeconfig(Path(kubeconfig))
    token_path = SERVICE_ACCOUNT_DIR / "token"
    if token_path.exists() and os.environ.get("KUBERNETES_SERVICE_HOST"):
        host = os.environ["KUBERNETES_SERVICE_HOST"]
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        namespace_path = SERVICE_ACCOUNT_DIR / "namespace"
        return kopf.ConnectionInfo(
            server=f"https://{_bracket_ipv6(host)}:{port}",
            ca_path=str(SERVICE_ACCOUNT_DIR / "ca.crt"),
            token=token_path.read_text().strip(),
            default_namespace=namespace_path.read_text().strip() if namespace_path.exists() else None,
        )
    env = os.environ.get("KUBECONFIG", "")
    paths = [Path(p).expanduser() for p in env.split(os.pathsep) if p.strip()]
    if not paths and Path("~/.kube/config").expanduser().exists():
        paths = [Path("~/.kube/config").expanduser()]
    if not paths:
        raise CredentialsError(
            "no in-cluster service account and no kubeconfig (set KUBECONFIG or --kubeconfig)"
        )
    return _from_kubeconfig(paths[0])


def _bracket_ipv6(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _from_kubeconfig(path: Path) -> kopf.ConnectionInfo:
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CredentialsError(f"cannot read kubeconfig {path}: {exc}") from exc
    current = config.get("current-context")
    contexts = {c["name"]: c.get("context") or {} for c in config.get("contexts") or []}
    clusters = {c["name"]: c.get("cluster") or {} for c in config.get("clusters") or []}
    users = {u["name"]: u.get("user") or {} for u in config.get("users") or []}
    if current not in contexts:
        raise CredentialsError(f"kubeconfig {path}: current-context {current!r} is not defined")
    context = contexts[current]
    cluster = clusters.get(context.get("cluster"), {})
    user = users.get(context.get("user"), {})
    if not cluster.get("server"):
        raise CredentialsError(f"kubeconfig {path}: cluster of context {current!r} has no server")
    if "exec" in user or "auth-provider" in user:
        raise CredentialsError(
            f"kubeconfig {path}: user of context {current!r} needs an exec/auth-provider plugin; "
            "use a token or client certificate for the operator"
        )

    def relative(value: str | None) -> str | None:
        # kubeconfig file references are relative to the kubeconfig's own directory.
        return str((path.parent / value).resolve()) if value else None

    return kopf.ConnectionInfo(
        server=cluster["server"],
        ca_path=relative(cluster.get("certificate-authority")),
        ca_data=cluster.get("certificate-authority-data"),
        insecure=cluster.get("insecure-skip-tls-verify"),
        certificate_path=relative(user.get("client-certificate")),
        certificate_data=user.get("client-certificate-data"),
        private_key_path=relative(user.get("client-key")),
        private_key_data=user.get("client-key-data"),
        username=user.get("username"),
        password=user.get("password"),
        token=user.get("token"),
        default_namespace=context.get("namespace"),
    )


def _b64_pem(data: str | bytes) -> bytes:
    raw = data.encode() if isinstance(data, str) else data
    return raw if raw.lstrip().startswith(b"-----BEGIN") else base64.b64decode(raw)


def _ssl_context(info: kopf.ConnectionInfo, workdir: Path) -> ssl.SSLContext | bool:
    if info.insecure:
        return False
    context = ssl.create_default_context()
    if info.ca_path:
        context.load_verify_locations(cafile=os.fsdecode(info.ca_path))
    elif info.ca_data:
        context.load_verify_locations(cadata=_b64_pem(info.ca_data).decode())
    cert = info.certificate_path
    key = info.private_key_path
    # ssl only loads client certificates from files: materialise inline data in a private temp dir.
    if info.certificate_data:
        cert = workdir / "client.crt"
        cert.write_bytes(_b64_pem(info.certificate_data))
    if info.private_key_data:
        key = workdir / "client.key"
        key.write_bytes(_b64_pem(info.private_key_data))
    if cert:
        context.load_cert_chain(os.fsdecode(cert), os.fsdecode(key) if key else None)
    return context


class FileTokenAuth(httpx.Auth):
    """Bearer token re-read from a file: in-cluster service account tokens are rotated by the kubelet."""

    def __init__(self, path: Path, refresh_s: float = 60.0) -> None:
        self.path = path
        self.refresh_s = refresh_s
        self._token = ""
        self._read_at = -refresh_s

    def auth_flow(self, request: httpx.Request) -> Any:
        if time.monotonic() - self._read_at >= self.refresh_s:
            self._token = self.path.read_text().strip()
            self._read_at = time.monotonic()
        request.headers["Authorization"] = f"Bearer {self._token}"
        response = yield request
        if response.status_code == 401:
            # Rotated since the last read: read again once and retry.
            self._token = self.path.read_text().strip()
            self._read_at = time.monotonic()
            request.headers["Authorization"] = f"Bearer {self._token}"
            yield request


def in_cluster_token_path(kubeconfig: str | os.PathLike[str] | None) -> Path | None:
    """The service account token file when :func:`load_connection_info` would use it, else None."""
    token_path = SERVICE_ACCOUNT_DIR / "token"
    if kubeconfig is None and token_path.exists() and os.environ.get("KUBERNETES_SERVICE_HOST"):
        return token_path
    return None


@dataclass(frozen=True)
class Resource:
    """A resource's REST coordinates."""

    api_version: str
    plural: str
    namespaced: bool = True

    def path(
        self, namespace: str | None = None, name: str | None = None, subresource: str | None = None
    ) -> str:
        base = f"/api/{self.api_version}" if "/" not in self.api_version else f"/apis/{self.api_version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{name}"
        if subresource:
            base += f"/{subresource}"
        return base


@dataclass
class KubeClient:
    """Get, list, server-side apply, merge-patch and delete objects; discovery with a short cache.

    Children are written with server-side apply under one field manager, so fields that other managers own
    (an autoscaler's ``replicas``, annotations added by others, server defaults) survive every reconcile;
    status is written with JSON merge patch (``application/merge-patch+json``). Never PUT.
    """

    http: httpx.AsyncClient
    discovery_ttl_s: float = 60.0
    _discovery: dict[str, tuple[float, set[str]]] = field(default_factory=dict)
    _tmpdir: tempfile.TemporaryDirectory[str] | None = None

    @classmethod
    def from_connection_info(
        cls, info: kopf.ConnectionInfo, *, timeout_s: float = 15.0, token_path: Path | None = None
    ) -> KubeClient:
        """A client for ``info``; ``token_path``: re-read the bearer token from there (rotated tokens)."""
        tmpdir = tempfile.TemporaryDirectory(prefix="kubespeech-kube-")
        verify = _ssl_context(info, Path(tmpdir.name))
        headers = {"Accept": "application/json", "User-Agent": "kubespeech-operator"}
        auth: httpx.Auth | None = None
        if token_path is not None:
            auth = FileTokenAuth(token_path)
        elif info.token:
            headers["Authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
        elif info.username and info.password:
            auth = httpx.BasicAuth(info.username, info.password)
        http = httpx.AsyncClient(
            base_url=info.server.rstrip("/"),
            verify=verify,
            headers=headers,
            auth=auth,
            timeout=httpx.Timeout(timeout_s, connect=5.0),
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
        )
        return cls(http=http, _tmpdir=tmpdir)

    async def aclose(self) -> None:
        await self.http.aclose()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str | None = None,
    ) -> JsonObject:
        headers = {"Content-Type": content_type} if content_type else None
        if self.http.is_closed:
            raise ApiError(0, method, path, "the client is closed (the operator is stopping)")
        try:
            response = await self.http.request(method, path, json=json, params=params, headers=headers)
        except httpx.HTTPError as exc:
            raise ApiError(0, method, path, f"{type(exc).__name__}: {exc}") from exc
        if response.status_code >= 400:
            try:
                message = str(response.json().get("message", response.text))
            except ValueError:
                message = response.text[:500]
            raise ApiError(response.status_code, method, path, message)
        if not response.content:
            return {}
        result = response.json()
        return result if isinstance(result, dict) else {"items": result}

    async def get(self, resource: Resource, namespace: str | None, name: str) -> JsonObject | None:
        """The object, or None when it does not exist."""
        try:
            return await self._request("GET", resource.path(namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def list(
        self, resource: Resource, namespace: str | None, *, label_selector: str | None = None
    ) -> list[JsonObject]:
        params = {"labelSelector": label_selector} if label_selector else None
        result = await self._request("GET", resource.path(namespace), params=params)
        return list(result.get("items") or [])

    async def create(self, resource: Resource, namespace: str | None, body: Mapping[str, Any]) -> JsonObject:
        return await self._request("POST", resource.path(namespace), json=body)

    async def merge_patch(
        self,
        resource: Resource,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any],
        *,
        subresource: str | None = None,
    ) -> JsonObject:
        return await self._request(
            "PATCH",
            resource.path(namespace, name, subresource),
            json=patch,
            content_type="application/merge-patch+json",
        )

    async def apply(
        self,
        resource: Resource,
        namespace: str | None,
        name: str,
        body: Mapping[str, Any],
        *,
        field_manager: str,
        force: bool = True,
    ) -> JsonObject:
        """Server-side apply ``body`` as ``field_manager``: creates the object or updates the fields it sets.

        Fields this manager applied before and ``body`` no longer sets are removed unless another manager
        owns them too; ``force`` takes over fields someone else changed (a hand edit is reverted).
        """
        return await self._request(
            "PATCH",
            resource.path(namespace, name),
            json=body,
            params={"fieldManager": field_manager, "force": "true" if force else "false"},
            content_type="application/apply-patch+yaml",
        )

    async def delete(self, resource: Resource, namespace: str | None, name: str) -> bool:
        """Delete with background propagation (children go by garbage collection); False if already gone."""
        try:
            await self._request(
                "DELETE", resource.path(namespace, name), json={"propagationPolicy": "Background"}
            )
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def watch(
        self,
        resource: Resource,
        namespace: str | None,
        *,
        label_selector: str,
        timeout_s: int = 300,
    ) -> AsyncIterator[tuple[str, JsonObject]]:
        """(event type, object metadata) of every change to matching objects from now on, forever.

        A small watch of its own rather than kopf's: only ``metadata`` of each event is kept, so following
        hundreds of Deployments costs next to no memory. It lists once (``limit=1``: only the collection's
        resourceVersion is needed), then watches from there, resuming after a dropped connection and
        listing again when the server says the version is too old (410 Gone).
        """
        path = resource.path(namespace)
        version: str | None = None
        while True:
            if version is None:
                listed = await self._request(
                    "GET", path, params={"labelSelector": label_selector, "limit": "1"}
                )
                version = str((listed.get("metadata") or {}).get("resourceVersion") or "")
            params = {
                "watch": "true",
                "labelSelector": label_selector,
                "resourceVersion": version,
                "allowWatchBookmarks": "true",
                "timeoutSeconds": str(timeout_s),
            }
            try:
                async with self.http.stream(
                    "GET", path, params=params, timeout=httpx.Timeout(timeout_s + 30, connect=5.0)
                ) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        raise ApiError(response.status_code, "WATCH", path, response.text[:500])
                    async for line in response.aiter_lines():
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        kind, obj = str(event.get("type")), event.get("object") or {}
                        if kind == "ERROR":
                            if obj.get("code") == 410:
                                version = None  # too old: list again
                                break
                            raise ApiError(int(obj.get("code") or 0), "WATCH", path, str(obj.get("message")))
                        meta = obj.get("metadata") or {}
                        version = str(meta.get("resourceVersion") or version)
                        if kind != "BOOKMARK":
                            yield kind, {"metadata": meta}
            except httpx.HTTPError:
                if self.http.is_closed:
                    return
                await asyncio.sleep(1.0)  # the server went away; resume from the last version seen

    async def post_event(
        self, about: Mapping[str, Any], *, reason: str, message: str, type_: str = "Normal"
    ) -> None:
        """A core/v1 Event on ``about`` (a SpeechDeployment), as ``kubectl describe`` shows them."""
        meta = about.get("metadata") or {}
        namespace = str(meta.get("namespace") or "default")
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name')}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": about.get("apiVersion"),
                "kind": about.get("kind"),
                "name": meta.get("name"),
                "namespace": namespace,
                "uid": meta.get("uid"),
            },
            "reason": reason[:128],
            "message": message[:1024],
            "type": type_,
            "source": {"component": "kubespeech-operator"},
            "reportingComponent": "kubespeech-operator",
            "reportingInstance": "kubespeech-operator",
            "action": reason[:128],
            "firstTimestamp": now[:19] + "Z",
            "lastTimestamp": now[:19] + "Z",
            "eventTime": now,
            "count": 1,
        }
        await self.create(Resource("v1", "events"), namespace, event)

    async def served_resources(self, group_version: str) -> set[str]:
        """Plural names the API server serves in ``group_version`` (empty when the group is unknown)."""
        cached = self._discovery.get(group_version)
        now = time.monotonic()
        if cached is not None and now - cached[0] < self.discovery_ttl_s:
            return cached[1]
        path = f"/api/{group_version}" if "/" not in group_version else f"/apis/{group_version}"
        try:
            result = await self._request("GET", path)
            names = {str(r.get("name", "")) for r in result.get("resources") or []}
        except ApiError as exc:
            if exc.status != 404:
                raise
            names = set()
        self._discovery[group_version] = (now, names)
        return names

    async def has_resource(self, api_version: str, plural: str) -> bool:
        with contextlib.suppress(ApiError):
            return plural in await self.served_resources(api_version)
        return False
