"""kopf handlers, kept thin: each hands the object to the Reconciler and maps its outcome to kopf's retries.

``build_registry(settings)`` returns a registry of its own (nothing is registered at import time), so
tests run the operator with short intervals against a real API server, in their own event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import kopf

from kubespeech_operator import conditions as cond
from kubespeech_operator import metrics
from kubespeech_operator.autoscaler import PoolDecision
from kubespeech_operator.builders.common import MANAGED_BY
from kubespeech_operator.errors import ReconcileError, retry_delay
from kubespeech_operator.kube import (
    ApiError,
    KubeClient,
    Resource,
    in_cluster_token_path,
    load_connection_info,
)
from kubespeech_operator.queues import QueueDepthReader
from kubespeech_operator.reconciler import ReconcileOutcome, Reconciler
from kubespeech_operator.scaler import Scaler
from kubespeech_operator.settings import DOMAIN, FINALIZER, GROUP, PLURAL, VERSION, OperatorSettings

logger = logging.getLogger(__name__)

# Conditions whose transitions are worth a Kubernetes Event (the others change with every rollout).
EVENT_CONDITIONS = {cond.READY, cond.DEGRADED, cond.LICENSE_VALID, cond.MODELS_READY}


def configure_kopf(settings: kopf.OperatorSettings) -> None:
    """kopf's bookkeeping under kubespeech.io; events only where we post them; one standalone replica."""
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=DOMAIN)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=DOMAIN, key="last-handled-configuration"
    )
    settings.posting.loggers = False
    settings.posting.reporting_component = "kubespeech-operator"
    settings.peering.standalone = True
    # A watch that silently stalls is reconnected; the timer covers anything missed meanwhile.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 30


def _events(outcome: ReconcileOutcome) -> list[tuple[str, str, str]]:
    """(type, reason, message) of the Events worth posting for a reconcile: condition transitions an admin
    cares about, and children created."""
    events = []
    for c in outcome.transitions:
        if c.get("type") not in EVENT_CONDITIONS:
            continue
        bad = (c.get("type") == cond.DEGRADED and c.get("status") == "True") or (
            c.get("type") != cond.DEGRADED and c.get("status") == "False"
        )
        message = f"{c.get('type')}={c.get('status')}: {c.get('message') or c.get('reason')}"
        events.append(("Warning" if bad else "Normal", str(c.get("reason") or c.get("type")), message[:1024]))
    created = outcome.count("created")
    if created:
        events.append(("Normal", "ChildrenCreated", f"created {created} objects"))
    return events


def _post_events(body: kopf.Body, outcome: ReconcileOutcome) -> None:
    """From a kopf handler: through kopf's event queue."""
    for type_, reason, message in _events(outcome):
        (kopf.warn if type_ == "Warning" else kopf.info)(body, reason=reason, message=message)


def _raise_for_retry(outcome: ReconcileOutcome, retry: int) -> None:
    """The error class decides: permanent → no retry until the spec changes; otherwise retry with backoff."""
    error: ReconcileError | None = outcome.error
    if error is None:
        return
    if error.permanent:
        raise kopf.PermanentError(error.message)
    raise kopf.TemporaryError(error.message, delay=retry_delay(error, retry))


# Children whose status feeds the SpeechDeployment's (readiness of its pods).
WATCHED_CHILDREN = (Resource("apps/v1", "deployments"), Resource("apps/v1", "statefulsets"))


def _owner_name(body: Mapping[str, Any]) -> str | None:
    """The SpeechDeployment that controls a child, by its controller owner reference."""
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if (
            ref.get("kind") == "SpeechDeployment"
            and ref.get("controller")
            and str(ref.get("apiVersion", "")).startswith(f"{GROUP}/")
        ):
            return str(ref.get("name"))
    return None


class StatusFollower:
    """Re-reconciles a SpeechDeployment shortly after one of its workloads changed (e.g. became ready).

    Bursts of child events (a rollout emits several per pod) collapse into one reconcile per
    ``debounce_s``; the reconciler's per-object lock keeps it from overlapping a running one.
    """

    def __init__(self, run: Callable[[tuple[str, str]], Awaitable[None]], debounce_s: float = 0.2) -> None:
        self._run = run
        self.debounce_s = debounce_s
        self._pending: set[tuple[str, str]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def schedule(self, key: tuple[str, str]) -> None:
        if key in self._pending:
            return
        self._pending.add(key)
        task = asyncio.create_task(self._later(key), name=f"status-follow {key[0]}/{key[1]}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _later(self, key: tuple[str, str]) -> None:
        await asyncio.sleep(self.debounce_s)
        self._pending.discard(key)
        try:
            await self._run(key)
        except Exception:  # a failed refresh is retried by the next event or the resync loop
            logger.exception("status refresh of %s/%s failed", *key)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)


def build_registry(config: OperatorSettings) -> kopf.OperatorRegistry:
    """Every handler of the operator, bound to one Reconciler created at startup.

    No handler needs a finalizer (kopf's timers and daemons would add one, so the periodic resync is a
    plain task over the SpeechDeployments the watch has seen): children go by their owner references, and
    deleting a SpeechDeployment never waits for the operator to be running.
    """
    registry = kopf.OperatorRegistry()
    state: dict[str, Any] = {}
    resource = (GROUP, VERSION, PLURAL)
    # The latest body of every SpeechDeployment, from kopf's watch: what the resync loop reconciles.
    known: dict[tuple[str, str], dict[str, Any]] = {}

    def reconciler() -> Reconciler:
        return state["reconciler"]

    async def run_and_report(body: Mapping[str, Any], what: str) -> ReconcileOutcome:
        outcome = await reconciler().reconcile(body)
        changed = [c.ref for c in outcome.children if c.action in ("created", "patched", "pruned")]
        if changed and outcome.error is None:
            logger.info("%s of %s/%s changed %d children: %s", what, body["metadata"].get("namespace"),
                        body["metadata"].get("name"), len(changed), ", ".join(changed[:12]))  # fmt: skip
        # Outside kopf's handlers (the resync loop, the status follower): posted directly.
        for type_, reason, message in _events(outcome):
            try:
                await reconciler().kube.post_event(body, reason=reason, message=message, type_=type_)
            except ApiError as exc:
                logger.info("cannot post Event %s: %s", reason, exc)
        if outcome.error is not None and not outcome.error.permanent:
            logger.warning("%s failed, retrying: %s", what, outcome.error.message)
        return outcome

    async def refresh(key: tuple[str, str]) -> None:
        body = known.get(key)
        if body is not None and "reconciler" in state and not reconciler().kube.http.is_closed:
            await run_and_report(body, "status refresh")

    follower = StatusFollower(refresh)

    async def scaled(body: Mapping[str, Any], decisions: list[PoolDecision]) -> None:
        # One Event per scale decision (posted directly: this loop runs outside kopf's handler context,
        # where kopf.info has no queue), and the status shows the new replicas and why within a moment.
        for d in decisions:
            try:
                await reconciler().kube.post_event(
                    body,
                    reason=f"Scaled{d.reason}",
                    message=f"{d.key}: {d.current} → {d.desired}: {d.message}",
                )
            except ApiError as exc:
                logger.info("cannot post the scale Event: %s", exc)
        meta = body.get("metadata") or {}
        follower.schedule((str(meta.get("namespace") or ""), str(meta.get("name"))))

    async def autoscale_loop() -> None:
        # Each stack is polled at its own pollingIntervalSeconds; this loop wakes often enough for 1 s.
        scaler: Scaler = state["scaler"]
        while True:
            now = time.monotonic()
            for key, body in list(known.items()):
                if reconciler().kube.http.is_closed:
                    return
                if not scaler.due(body, now):
                    continue
                try:
                    await scaler.tick(body, now=now)
                except Exception:  # one stack's failure must not stop the others
                    logger.exception("autoscaling %s failed", key)
            await asyncio.sleep(0.25)

    async def resync_loop() -> None:
        # Restores deleted or hand-edited children and refreshes the status (queue depth, pods); errors are
        # reported in the status and retried at the next tick, never in a tight loop.
        while True:
            await asyncio.sleep(config.resync_interval_s)
            for _key, body in list(known.items()):
                if reconciler().kube.http.is_closed:
                    return
                try:
                    await run_and_report(body, "resync")
                except Exception:  # one object's failure must not stop the loop for the others
                    logger.exception("resync of %s failed", _key)
            state["resynced_at"] = time.monotonic()

    def watch_namespaces() -> list[str | None]:
        names = config.namespace_list()
        if not names:
            return [None]  # cluster-wide
        if any(set(n) & set("*?[") for n in names):
            logger.warning("namespace patterns: children are not watched; status follows at each resync")
            return []
        return list(names)

    async def follow_children(resource: Resource, namespace: str | None) -> None:
        selector = f"app.kubernetes.io/managed-by={MANAGED_BY}"
        while True:
            try:
                async for _type, obj in reconciler().kube.watch(resource, namespace, label_selector=selector):
                    owner = _owner_name(obj)
                    if owner is not None:
                        follower.schedule((str(obj["metadata"].get("namespace") or ""), owner))
                return
            except ApiError as exc:
                if reconciler().kube.http.is_closed:
                    return
                logger.warning("watching %s failed, retrying in 5 s: %s", resource.plural, exc)
                await asyncio.sleep(5)

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        # Explicit: kopf's default login would import kubernetes_asyncio, which reads KUBECONFIG at import.
        return load_connection_info(config.kubeconfig)

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure_kopf(settings)
        kube = KubeClient.from_connection_info(
            load_connection_info(config.kubeconfig), token_path=in_cluster_token_path(config.kubeconfig)
        )
        queues = QueueDepthReader(kube, timeout_s=config.redis_timeout_s)
        state["reconciler"] = Reconciler(
            kube,
            apply_concurrency=config.apply_concurrency,
            max_concurrent_reconciles=config.max_concurrent_reconciles,
            queue_reader=queues,
            operator_namespace=config.pod_namespace or None,
        )
        reconciler_ = state["reconciler"]
        scaler = Scaler(
            kube,
            queues,
            live=reconciler_.workloads,
            redis_password=reconciler_.redis_password,
            on_scaled=scaled,
        )
        state["scaler"] = scaler
        reconciler_.autoscaling_status = lambda ns, name: (
            scaler.pool_status(ns, name),
            scaler.conditions(ns, name),
        )
        metrics.serve(config.metrics_host, config.metrics_port)
        state["resync"] = asyncio.create_task(resync_loop(), name="resync")
        state["autoscale"] = asyncio.create_task(autoscale_loop(), name="autoscale")
        # Owned workloads: a readiness change reaches the status within a moment, not at the next resync.
        state["child-watches"] = [
            asyncio.create_task(follow_children(resource, namespace), name=f"watch {resource.plural}")
            for resource in WATCHED_CHILDREN
            for namespace in watch_namespaces()
        ]

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        tasks = [
            t
            for t in [state.get("resync"), state.get("autoscale"), *state.get("child-watches", [])]
            if t is not None
        ]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        await follower.aclose()
        if "reconciler" in state:
            await state["reconciler"].queues.aclose()
            await state["reconciler"].kube.aclose()

    @kopf.on.event(*resource, registry=registry)
    async def track(event: Mapping[str, Any], body: kopf.Body, **_: Any) -> None:
        meta = body.get("metadata", {})
        key = (str(meta.get("namespace") or ""), str(meta.get("name")))
        if event.get("type") == "DELETED":
            known.pop(key, None)
            if "reconciler" in state:
                await reconciler().forget(*key)
                state["scaler"].forget(*key)
        else:
            # Without managedFields: the reconciler never reads them, and 100 copies add up.
            meta = {k: v for k, v in body.get("metadata", {}).items() if k != "managedFields"}
            known[key] = {**dict(body), "metadata": meta}

    @kopf.on.resume(*resource, id="reconcile", registry=registry)
    @kopf.on.create(*resource, id="reconcile", registry=registry)
    @kopf.on.update(*resource, id="reconcile", registry=registry)
    async def reconcile(body: kopf.Body, retry: int, logger: kopf.Logger, **_: Any) -> None:
        outcome = await reconciler().reconcile(body)
        if outcome.error is None:
            logger.info("reconciled: %d created, %d patched, %d pruned, %d unchanged, %d skipped",
                        outcome.count("created"), outcome.count("patched"), outcome.count("pruned"),
                        outcome.count("unchanged"), outcome.count("skipped"))  # fmt: skip
        _post_events(body, outcome)
        _raise_for_retry(outcome, retry)

    @kopf.on.probe(id="reconciler", registry=registry)
    def probe(**_: Any) -> str:
        if "reconciler" not in state:
            return "starting"
        for task in [state.get("resync"), state.get("autoscale"), *state.get("child-watches", [])]:
            if task is not None and task.done():
                # A loop died: report it so the liveness probe restarts the pod.
                raise RuntimeError(f"{task.get_name()} stopped")
        return "ready"

    return registry
