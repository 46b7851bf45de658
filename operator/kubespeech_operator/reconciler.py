"""Reconcile one SpeechDeployment: parse → build → apply every child → prune → observe → status.

A linear script (as prometheus-operator's). The live children are listed by the stack's labels and owner
reference; each desired child is written with server-side apply under the operator's field manager unless
its input hash matches and no other manager touched it; a child that was deleted or hand-edited is
restored; children that are no longer rendered are deleted; the status is written only when it changed.
Errors are classified by type (``errors.py``) so the kopf handlers know whether to retry.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubespeech_operator import builders, conditions, status
from kubespeech_operator.builders.common import (
    INPUT_HASH_ANNOTATION,
    MANAGED_BY,
    REDIS_PASSWORD_KEY,
    Context,
    redis_secret_name,
)
from kubespeech_operator.errors import InvalidSpecError, ReconcileError, from_api_error
from kubespeech_operator.kube import ApiError, JsonObject, KubeClient, Resource
from kubespeech_operator.queues import QueueDepthReader
from kubespeech_operator.settings import GROUP, PLURAL, VERSION
from kubespeech_operator.spec import SpecError, SpeechDeploymentSpec, parse_spec, validate_name

logger = logging.getLogger(__name__)

SPEECH_DEPLOYMENTS = Resource(f"{GROUP}/{VERSION}", PLURAL)
PODS = Resource("v1", "pods")
SECRETS = Resource("v1", "secrets")
# Kinds that exist only when another project's CRD is installed (Prometheus operator, KEDA): skipped, not
# failed, where the API server does not serve them; the status says so where a spec asked for one.
OPTIONAL_APIS = {"monitoring.coreos.com/v1", "keda.sh/v1alpha1"}

# Applied first: what workloads reference (a pod whose ServiceAccount or Secret is missing fails to start).
FIRST_WAVE = {"ServiceAccount", "Secret", "ConfigMap", "PersistentVolumeClaim", "Service", "NetworkPolicy"}

FIELD_MANAGER = "kubespeech-operator"
"""Field manager of every child the operator applies."""
AUTOSCALER_MANAGER = "kubespeech-autoscaler"
"""Field manager that owns ``spec.replicas`` of autoscaled pools, so the operator's own apply omits it."""
# Managers whose writes are not drift: the operator's own, and the control plane's bookkeeping (the
# Deployment controller's revision annotation, status writers use the status subresource anyway).
_OWN_MANAGERS = {FIELD_MANAGER, AUTOSCALER_MANAGER}


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


ChildKey = tuple[str, str, str]
"""(apiVersion, kind, name) of a child."""


def child_key(obj: Mapping[str, Any]) -> ChildKey:
    return (str(obj.get("apiVersion")), str(obj.get("kind")), str((obj.get("metadata") or {}).get("name")))


def owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    """Whether ``obj`` names the SpeechDeployment with ``uid`` as its controller (never guess by name)."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return bool(uid) and any(
        r.get("uid") == uid and r.get("kind") == "SpeechDeployment" and r.get("controller") for r in refs
    )


def touched_by_others(obj: Mapping[str, Any]) -> bool:
    """Whether a field manager other than ours wrote the object's spec or data (a hand edit, kubectl scale...).

    Status subresource writes do not count; neither does the Deployment controller's revision annotation.
    """
    for entry in (obj.get("metadata") or {}).get("managedFields") or []:
        if entry.get("manager") in _OWN_MANAGERS or entry.get("subresource"):
            continue
        fields = dict(entry.get("fieldsV1") or {})
        meta = dict(fields.pop("f:metadata", None) or {})
        annotations = dict(meta.pop("f:annotations", None) or {})
        annotations.pop("f:deployment.kubernetes.io/revision", None)
        if fields or meta or annotations:
            return True
    return False


def replicas_owner(obj: Mapping[str, Any], manager: str) -> bool:
    """Whether ``manager`` owns ``spec.replicas`` of ``obj`` (per its managedFields)."""
    for entry in (obj.get("metadata") or {}).get("managedFields") or []:
        if entry.get("manager") == manager and not entry.get("subresource"):
            spec = (entry.get("fieldsV1") or {}).get("f:spec") or {}
            if "f:replicas" in spec:
                return True
    return False


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
        max_concurrent_reconciles: int = 4,
        queue_reader: QueueDepthReader | None = None,
        operator_namespace: str | None = None,
    ) -> None:
        self.kube = kube
        self.operator_namespace = operator_namespace
        self.apply_concurrency = apply_concurrency
        # A hundred stacks created at once would otherwise list and apply all their children at once: more
        # memory held at the peak (Python keeps it) and no sooner done on a small CPU share.
        self._running = asyncio.Semaphore(max_concurrent_reconciles)
        self.queues = queue_reader or QueueDepthReader(kube)
        # One reconcile at a time per object (the timer and an update handler may overlap); a lock lives
        # only while someone holds a reference to it.
        self._locks: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        # The status last written per object: the body a timer gets may predate our own last write.
        self._written: dict[tuple[str, str], dict[str, Any]] = {}
        self._workloads: dict[tuple[str, str], dict[str, JsonObject]] = {}
        self._passwords: dict[tuple[str, str], str | None] = {}
        # The autoscaler's view per pool, merged into the status (set by the operator when it runs one).
        self.autoscaling_status: (
            Callable[[str, str], tuple[dict[str, dict[str, Any]], tuple[str | None, str | None]]] | None
        ) = None

    def _lock(self, namespace: str, name: str) -> asyncio.Lock:
        key = (namespace, name)
        lock = self._locks.get(key)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[key] = lock
        return lock

    async def forget(self, namespace: str, name: str) -> None:
        self._written.pop((namespace, name), None)
        self._workloads.pop((namespace, name), None)
        self._passwords.pop((namespace, name), None)
        await self.queues.forget(namespace, name)

    def workloads(self, namespace: str, name: str) -> dict[str, JsonObject]:
        """Deployment name → live Deployment of a stack, as its last reconcile saw them (for the autoscaler)."""
        return self._workloads.get((namespace, name), {})

    def redis_password(self, namespace: str, name: str) -> str | None:
        """The embedded Redis password the last reconcile used (None: external Redis or not known yet)."""
        return self._passwords.get((namespace, name))

    async def reconcile(self, body: Mapping[str, Any]) -> ReconcileOutcome:
        """Bring the children of ``body`` to the desired state and write its status.

        Never raises for a problem it can report: the outcome's ``error`` says what failed (and the
        Degraded condition says it to the admin); the caller decides on retrying by the error's type.
        """
        meta = body.get("metadata") or {}
        name, namespace = str(meta.get("name")), str(meta.get("namespace"))
        lock = self._lock(namespace, name)
        async with lock, self._running:
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
                name,
                namespace,
                spec,
                owner=owner_reference(body),
                redis_password=password,
                operator_namespace=self.operator_namespace,
            )
            names = Context(name=name, namespace=namespace, spec=spec)
            autoscaled = {
                names.pool_name(task, pool) for task, pool in spec.pools() if pool.autoscaling.enabled
            }
            uid = str((body.get("metadata") or {}).get("uid") or "")
            outcome.children = await self._apply_all(name, namespace, uid, children, autoscaled)
            observed = await self._observe(name, namespace, spec, outcome.children, password)
            self._passwords[(namespace, name)] = password
            self._workloads[(namespace, name)] = {
                str(c.live["metadata"]["name"]): c.live
                for c in outcome.children
                if c.live is not None and c.manifest.get("kind") == "Deployment"
            }
            if self.autoscaling_status is not None:
                observed.autoscaling, observed.autoscaling_notes = self.autoscaling_status(namespace, name)
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
        self,
        name: str,
        namespace: str,
        uid: str,
        children: Sequence[Mapping[str, Any]],
        autoscaled: set[str],
    ) -> list[ChildResult]:
        served = {
            (api_version, plural)
            for api_version, _kind, plural in builders.CHILD_KINDS
            if api_version not in OPTIONAL_APIS or await self.kube.has_resource(api_version, plural)
        }
        live = await self._owned_children(name, namespace, uid, served=served)
        semaphore = asyncio.Semaphore(self.apply_concurrency)

        async def apply(manifest: Mapping[str, Any]) -> ChildResult:
            if (manifest.get("apiVersion"), resource_of(manifest).plural) not in served:
                return ChildResult(manifest, "skipped")
            meta = manifest.get("metadata") or {}
            autoscaled_pool = manifest.get("kind") == "Deployment" and meta.get("name") in autoscaled
            async with semaphore:
                return await self._apply(manifest, live.get(child_key(manifest)), autoscaled=autoscaled_pool)

        first = [c for c in children if c.get("kind") in FIRST_WAVE]
        second = [c for c in children if c.get("kind") not in FIRST_WAVE]
        results = list(await asyncio.gather(*(apply(c) for c in first)))
        results += await asyncio.gather(*(apply(c) for c in second))
        wanted = {child_key(c) for c in children}
        # Already being deleted (a PVC waits for its pods to go): deleting again would only repeat it.
        stale = [
            obj
            for key, obj in sorted(live.items())
            if key not in wanted and not (obj.get("metadata") or {}).get("deletionTimestamp")
        ]
        results += await asyncio.gather(*(self._prune(obj) for obj in stale))
        return results

    async def _owned_children(
        self, name: str, namespace: str, uid: str, *, served: set[tuple[str, str]]
    ) -> dict[ChildKey, JsonObject]:
        """Every live child of this SpeechDeployment: the stack's labels narrow the list, the controller
        owner reference decides (objects that others created, even with our labels, are never ours)."""
        selector = f"app.kubernetes.io/instance={name},app.kubernetes.io/managed-by={MANAGED_BY}"
        kinds = [k for k in builders.CHILD_KINDS if (k[0], k[2]) in served]

        async def list_kind(api_version: str, kind: str, plural: str) -> list[JsonObject]:
            try:
                items = await self.kube.list(
                    Resource(api_version, plural), namespace, label_selector=selector
                )
            except ApiError as exc:
                raise from_api_error(exc, f"list {kind} in {namespace}") from exc
            for item in items:
                item.setdefault("apiVersion", api_version)
                item.setdefault("kind", kind)
            return items

        listed = await asyncio.gather(*(list_kind(*k) for k in kinds))
        return {child_key(item): item for items in listed for item in items if owned_by(item, uid)}

    async def _prune(self, live: JsonObject) -> ChildResult:
        """Delete a child the spec no longer renders (a removed pool, a feature turned off, a renamed pool)."""
        meta = live.get("metadata") or {}
        try:
            await self.kube.delete(resource_of(live), meta.get("namespace"), str(meta.get("name")))
        except ApiError as exc:
            raise from_api_error(
                exc, f"delete {live.get('kind')} {meta.get('namespace')}/{meta.get('name')}"
            ) from exc
        logger.info("pruned %s/%s: no longer in the spec", live.get("kind"), meta.get("name"))
        return ChildResult(live, "pruned", None)

    async def _apply(
        self, manifest: Mapping[str, Any], live: JsonObject | None, *, autoscaled: bool = False
    ) -> ChildResult:
        """Server-side apply the child unless it is live with the same input hash and nobody else wrote it.

        ``autoscaled``: the autoscaler's field manager owns ``spec.replicas`` of the pool's Deployment; the
        operator's apply leaves it out (else each reconcile would reset it), except to create the Deployment.
        """
        resource = resource_of(manifest)
        meta = manifest.get("metadata") or {}
        name, namespace = str(meta["name"]), meta.get("namespace")
        what = f"apply {manifest.get('kind')} {namespace}/{name}"
        try:
            if live is not None:
                live_hash = ((live.get("metadata") or {}).get("annotations") or {}).get(INPUT_HASH_ANNOTATION)
                same = live_hash == (meta.get("annotations") or {}).get(INPUT_HASH_ANNOTATION)
                if manifest.get("kind") == "Job":
                    # A Job's pod template is immutable: replace it, unless it already did its work.
                    return (
                        ChildResult(manifest, "unchanged", live)
                        if same
                        else await self._replace_job(resource, manifest, live)
                    )
                if (
                    same
                    and not touched_by_others(live)
                    and (not autoscaled or replicas_owner(live, AUTOSCALER_MANAGER))
                ):
                    return ChildResult(manifest, "unchanged", live)
            body: Mapping[str, Any] = manifest
            if autoscaled and live is not None:
                if not replicas_owner(live, AUTOSCALER_MANAGER):
                    # Turned autoscaled just now: hand the live count to the autoscaler before our apply
                    # drops the field (a field no manager owns any more is removed: replicas would reset to 1).
                    await self._claim_replicas(resource, manifest, (live.get("spec") or {}).get("replicas"))
                body = {**manifest, "spec": {k: v for k, v in manifest["spec"].items() if k != "replicas"}}
            applied = await self.kube.apply(resource, namespace, name, body, field_manager=FIELD_MANAGER)
            if autoscaled and live is None:
                await self._claim_replicas(resource, manifest, manifest["spec"].get("replicas"))
            if live is None:
                return ChildResult(manifest, "created", applied)
            changed = (applied.get("metadata") or {}).get("resourceVersion") != (
                live.get("metadata") or {}
            ).get("resourceVersion")
            return ChildResult(manifest, "patched" if changed else "unchanged", applied)
        except ApiError as exc:
            raise from_api_error(exc, what) from exc

    async def _claim_replicas(self, resource: Resource, manifest: Mapping[str, Any], replicas: Any) -> None:
        """Make the autoscaler's field manager (co-)own ``spec.replicas`` at its current value."""
        meta = manifest.get("metadata") or {}
        body = {
            "apiVersion": manifest["apiVersion"],
            "kind": manifest["kind"],
            "metadata": {"name": meta["name"], "namespace": meta.get("namespace")},
            "spec": {"replicas": 1 if replicas is None else int(replicas)},
        }
        try:
            # Not forced: if another writer (an HPA, a person) changed replicas meanwhile, it owns them now
            # and the operator's apply leaves them alone anyway; overriding it would undo its decision.
            await self.kube.apply(
                resource,
                meta.get("namespace"),
                str(meta["name"]),
                body,
                field_manager=AUTOSCALER_MANAGER,
                force=False,
            )
        except ApiError as exc:
            if exc.status != 409:
                raise

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

        async def license_secret() -> None:
            try:
                found = await self.kube.get(SECRETS, namespace, spec.license.secret_ref.name)
                observed.license_secret_found = found is not None
            except ApiError as exc:
                logger.warning("cannot read the license Secret of %s/%s: %s", namespace, name, exc)

        async def pods_of(pool: status.PoolWorkload) -> None:
            selector = ((pool.manifest.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
            label_selector = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
            try:
                pods = await self.kube.list(PODS, namespace, label_selector=label_selector or None)
            except ApiError as exc:
                logger.warning("cannot list pods of %s: %s", pool.label, exc)
                return
            # Filter here too: the selector is a hint some API fakes ignore, the labels are the truth.
            observed.pods[pool.label] = [
                p
                for p in pods
                if all(
                    ((p.get("metadata") or {}).get("labels") or {}).get(k) == v for k, v in selector.items()
                )
            ]

        async def stack_redis() -> None:
            started = time.monotonic()
            reading = await self.queues.read(name, namespace, spec, embedded_password=redis_password)
            observed.queue_depths, observed.queue_note = reading.depths, reading.note
            observed.active_streams = reading.streams
            observed.license_verdict, observed.redis_reachable = reading.verdict, reading.reachable
            logger.debug("queue depths of %s/%s read in %.3f s", namespace, name, time.monotonic() - started)

        short = [
            pool
            for pool in status.pool_workloads([c for c in children if c.action != "pruned"])
            if status.ready_replicas(pool.live) < pool.desired
        ]
        # Independent reads: one round trip's worth of waiting, not the sum.
        await asyncio.gather(license_secret(), stack_redis(), *(pods_of(pool) for pool in short))
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
