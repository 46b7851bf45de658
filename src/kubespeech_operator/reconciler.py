"""Reconcile one SpeechDeployment: parse → build → apply every child idempotently → observe → status.

A linear script (as prometheus-operator's): children whose input hash and content match are not
written; a child that was deleted or hand-edited is restored; the status is written only when it changed.
Errors are classified by type (``errors.py``) so the kopf handlers know whether to retry.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubespeech_operator import builders, conditions, diffing, status
from kubespeech_operator.builders.common import REDIS_PASSWORD_KEY, Context, redis_secret_name
from kubespeech_operator.errors import InvalidSpecError, ReconcileError, from_api_error
from kubespeech_operator.kube import ApiError, JsonObject, KubeClient, Resource
from kubespeech_operator.models import SpecError, SpeechDeploymentSpec, parse_spec, validate_name
from kubespeech_operator.queues import QueueDepthReader
from kubespeech_operator.settings import GROUP, PLURAL, VERSION

logger = logging.getLogger(__name__)

SPEECH_DEPLOYMENTS = Resource(f"{GROUP}/{VERSION}", PLURAL)
PODS = Resource("v1", "pods")
SECRETS = Resource("v1", "secrets")
SERVICE_MONITOR_API = "monitoring.coreos.com/v1"

# Applied first: what workloads reference (a pod whose ServiceAccount or Secret is missing fails to start).
FIRST_WAVE = {"ServiceAccount", "Secret", "ConfigMap", "PersistentVolumeClaim", "Service", "NetworkPolicy"}


@dataclass
class ChildResult:
    """What applying one child did: created, patched, unchanged, or skipped (its API is not served)."""

    manifest: Mapping[str, Any]
    action: str
    live: JsonObject | None = None

    @property
    def ref(self) -> str:
        meta = self.manifest.get("metadata") or {}
        return f"{self.manifest.get('kind')}/{meta.get('name')}"


@dataclass
class ReconcileOutcome:
    """The result of one reconcile: what changed and the status written."""

    children: list[ChildResult] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)
    status_changed: bool = False
    transitions: list[Mapping[str, Any]] = field(default_factory=list)
    error: ReconcileError | None = None

    def count(self, action: str) -> int:
        return sum(1 for c in self.children if c.action == action)


def resource_of(manifest: Mapping[str, Any]) -> Resource:
    """The REST resource of a child manifest (from the builders' CHILD_KINDS table)."""
    key = (manifest.get("apiVersion"), manifest.get("kind"))
    for api_version, kind, plural in builders.CHILD_KINDS:
        if (api_version, kind) == key:
            return Resource(api_version, plural)
    raise ReconcileError(f"no resource known for {key[1]} {key[0]} (missing from builders.CHILD_KINDS)")


def owner_reference(body: Mapping[str, Any]) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "SpeechDeployment",
        "name": meta.get("name"),
        "uid": meta.get("uid") or "",
        "controller": True,
        "blockOwnerDeletion": True,
    }


class Reconciler:
    """Applies SpeechDeployments through a KubeClient; one instance serves every object of the operator."""

    def __init__(
        self,
        kube: KubeClient,
        *,
        apply_concurrency: int = 8,
        queue_reader: QueueDepthReader | None = None,
    ) -> None:
        self.kube = kube
        self.apply_concurrency = apply_concurrency
        self.queues = queue_reader or QueueDepthReader(kube)
        # One reconcile at a time per object (the timer and an update handler may overlap); a lock lives
        # only while someone holds a reference to it.
        self._locks: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        # The status last written per object: the body a timer gets may predate our own last write.
        self._written: dict[tuple[str, str], dict[str, Any]] = {}

    def _lock(self, namespace: str, name: str) -> asyncio.Lock:
        key = (namespace, name)
        lock = self._locks.get(key)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[key] = lock
        return lock

    async def forget(self, namespace: str, name: str) -> None:
        self._written.pop((namespace, name), None)
        await self.queues.forget(namespace, name)

    async def reconcile(self, body: Mapping[str, Any]) -> ReconcileOutcome:
        """Bring the children of ``body`` to the desired state and write its status.

        Never raises for a problem it can report: the outcome's ``error`` says what failed (and the
        Degraded condition says it to the admin); the caller decides on retrying by the error's type.
        """
        meta = body.get("metadata") or {}
        name, namespace = str(meta.get("name")), str(meta.get("namespace"))
        lock = self._lock(namespace, name)
        async with lock:
            return await self._reconcile(body, name, namespace)

    async def _reconcile(self, body: Mapping[str, Any], name: str, namespace: str) -> ReconcileOutcome:
        outcome = ReconcileOutcome()
        generation = (body.get("metadata") or {}).get("generation")
        # The body a timer gets may predate our own last status write: start from what we wrote.
        previous = self._written.get((namespace, name)) or dict(body.get("status") or {})
        try:
            validate_name(name)
            spec = parse_spec(dict(body.get("spec") or {}))
        except SpecError as exc:
            outcome.error = InvalidSpecError(exc.field_path, exc.message)
            new_status = status.error_status(previous, outcome.error, generation)
            await self._write_status(namespace, name, previous, new_status, outcome)
            return outcome

        try:
            password = await self._redis_password(name, namespace, spec)
            children = builders.build_children(
                name, namespace, spec, owner=owner_reference(body), redis_password=password
            )
            names = Context(name=name, namespace=namespace, spec=spec)
            autoscaled = {
                names.pool_name(task, pool) for task, pool in spec.pools() if pool.autoscaling.enabled
            }
            outcome.children = await self._apply_all(children, autoscaled)
            observed = await self._observe(name, namespace, spec, outcome.children, password)
        except ReconcileError as exc:
            outcome.error = exc
        except ApiError as exc:
            outcome.error = from_api_error(exc, "reconcile")
        except SpecError as exc:
            outcome.error = InvalidSpecError(exc.field_path, exc.message)

        if outcome.error is not None:
            new_status = status.error_status(previous, outcome.error, generation)
        else:
            new_status = status.build_status(previous, observed, generation)
        await self._write_status(namespace, name, previous, new_status, outcome)
        return outcome

    async def _redis_password(self, name: str, namespace: str, spec: SpeechDeploymentSpec) -> str | None:
        """The embedded Redis password: read from its Secret when it exists, generated once otherwise."""
        if spec.redis.mode != "embedded":
            return None
        secret_name = redis_secret_name(name)
        try:
            live = await self.kube.get(SECRETS, namespace, secret_name)
        except ApiError as exc:
            raise from_api_error(exc, f"read Secret {namespace}/{secret_name}") from exc
        if live is not None:
            value = (live.get("data") or {}).get(REDIS_PASSWORD_KEY)
            if value:
                return base64.b64decode(value).decode()
            value = (live.get("stringData") or {}).get(REDIS_PASSWORD_KEY)
            if value:
                return str(value)
        # Never regenerated once stored: only a missing Secret (or key) gets a new password.
        return secrets.token_urlsafe(32)

    async def _apply_all(
        self, children: Sequence[Mapping[str, Any]], autoscaled: set[str]
    ) -> list[ChildResult]:
        monitoring = await self.kube.has_resource(SERVICE_MONITOR_API, "servicemonitors")
        semaphore = asyncio.Semaphore(self.apply_concurrency)

        async def apply(manifest: Mapping[str, Any]) -> ChildResult:
            if manifest.get("apiVersion") == SERVICE_MONITOR_API and not monitoring:
                return ChildResult(manifest, "skipped")
            meta = manifest.get("metadata") or {}
            keep_replicas = manifest.get("kind") == "Deployment" and meta.get("name") in autoscaled
            async with semaphore:
                return await self._apply(manifest, keep_live_replicas=keep_replicas)

        first = [c for c in children if c.get("kind") in FIRST_WAVE]
        second = [c for c in children if c.get("kind") not in FIRST_WAVE]
        results = list(await asyncio.gather(*(apply(c) for c in first)))
        results += await asyncio.gather(*(apply(c) for c in second))
        return results

    async def _apply(self, manifest: Mapping[str, Any], *, keep_live_replicas: bool = False) -> ChildResult:
        """Create the child, or merge-patch it when its input hash or content differs from the manifest.

        ``keep_live_replicas``: the autoscaler owns ``spec.replicas`` of an existing Deployment.
        """
        resource = resource_of(manifest)
        meta = manifest.get("metadata") or {}
        name, namespace = str(meta["name"]), meta.get("namespace")
        what = f"apply {manifest.get('kind')} {namespace}/{name}"
        try:
            live = await self.kube.get(resource, namespace, name)
            if live is None:
                try:
                    created = await self.kube.create(resource, namespace, diffing.normalized(manifest))
                    return ChildResult(manifest, "created", created)
                except ApiError as exc:
                    # Created meanwhile (another reconcile, or a stale read): treat it as existing.
                    if exc.status != 409:
                        raise
                    live = await self.kube.get(resource, namespace, name)
                    if live is None:
                        raise
            desired: Mapping[str, Any] = manifest
            if keep_live_replicas:
                desired = {**manifest, "spec": {k: v for k, v in manifest["spec"].items() if k != "replicas"}}
            patch = diffing.merge_patch_for(live, desired)
            if patch is None:
                return ChildResult(manifest, "unchanged", live)
            if manifest.get("kind") == "Job":
                return await self._replace_job(resource, manifest, live)
            patched = await self.kube.merge_patch(resource, namespace, name, patch)
            return ChildResult(manifest, "patched", patched)
        except ApiError as exc:
            raise from_api_error(exc, what) from exc

    async def _replace_job(
        self, resource: Resource, manifest: Mapping[str, Any], live: JsonObject
    ) -> ChildResult:
        """A Job's pod template is immutable: a finished Job stays; an unfinished outdated one is deleted and
        created again by the next reconcile (deletion takes its pods a moment)."""
        job_status = live.get("status") or {}
        if int(job_status.get("succeeded") or 0) > 0:
            return ChildResult(manifest, "unchanged", live)
        meta = manifest.get("metadata") or {}
        await self.kube.delete(resource, meta.get("namespace"), str(meta.get("name")))
        return ChildResult(manifest, "deleted", None)

    async def _observe(
        self,
        name: str,
        namespace: str,
        spec: SpeechDeploymentSpec,
        children: Sequence[ChildResult],
        redis_password: str | None,
    ) -> status.Observed:
        observed = status.Observed(spec=spec, name=name, namespace=namespace, children=list(children))
        try:
            license_secret = await self.kube.get(SECRETS, namespace, spec.license.secret_ref.name)
            observed.license_secret_found = license_secret is not None
        except ApiError as exc:
            logger.warning("cannot read the license Secret of %s/%s: %s", namespace, name, exc)
        short = [
            pool
            for pool in status.pool_workloads(children)
            if status.ready_replicas(pool.live) < pool.desired
        ]
        for pool in short:
            selector = ((pool.manifest.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
            label_selector = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
            try:
                pods = await self.kube.list(PODS, namespace, label_selector=label_selector or None)
            except ApiError as exc:
                logger.warning("cannot list pods of %s: %s", pool.label, exc)
                continue
            # Filter here too: the selector is a hint some API fakes ignore, the labels are the truth.
            observed.pods[pool.label] = [
                p
                for p in pods
                if all(
                    ((p.get("metadata") or {}).get("labels") or {}).get(k) == v for k, v in selector.items()
                )
            ]
        started = time.monotonic()
        observed.queue_depths, observed.queue_note = await self.queues.depths(
            name, namespace, spec, embedded_password=redis_password
        )
        logger.debug("queue depths of %s/%s read in %.3f s", namespace, name, time.monotonic() - started)
        return observed

    async def _write_status(
        self,
        namespace: str,
        name: str,
        previous: Mapping[str, Any],
        new_status: dict[str, Any],
        outcome: ReconcileOutcome,
    ) -> None:
        outcome.status = new_status
        outcome.transitions = conditions.transitions(
            previous.get("conditions"), new_status.get("conditions") or []
        )
        if status.same_status(previous, new_status):
            return
        patch = {"status": status.status_patch(previous, new_status)}
        try:
            await self.kube.merge_patch(SPEECH_DEPLOYMENTS, namespace, name, patch, subresource="status")
        except ApiError as exc:
            if exc.status == 404:
                return  # deleted while we worked: nothing to report to
            error = from_api_error(exc, f"write status of {namespace}/{name}")
            outcome.error = outcome.error or error
            return
        self._written[(namespace, name)] = new_status
        outcome.status_changed = True
