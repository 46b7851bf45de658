"""kopf handlers, kept thin: each hands the object to the Reconciler and maps its outcome to kopf's retries.

``build_registry(settings)`` returns a registry of its own (nothing is registered at import time), so
tests run the operator with short intervals against a fake API server, in their own event loop.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from kubespeech_operator import conditions as cond
from kubespeech_operator.errors import ReconcileError, retry_delay
from kubespeech_operator.kube import KubeClient, in_cluster_token_path, load_connection_info
from kubespeech_operator.queues import QueueDepthReader
from kubespeech_operator.reconciler import ReconcileOutcome, Reconciler
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


def _post_events(body: kopf.Body, outcome: ReconcileOutcome) -> None:
    for c in outcome.transitions:
        if c.get("type") not in EVENT_CONDITIONS:
            continue
        bad = (c.get("type") == cond.DEGRADED and c.get("status") == "True") or (
            c.get("type") != cond.DEGRADED and c.get("status") == "False"
        )
        message = f"{c.get('type')}={c.get('status')}: {c.get('message') or c.get('reason')}"
        post = kopf.warn if bad else kopf.info
        post(body, reason=str(c.get("reason") or c.get("type")), message=message[:1024])
    created = outcome.count("created")
    if created:
        kopf.info(body, reason="ChildrenCreated", message=f"created {created} objects")


def _raise_for_retry(outcome: ReconcileOutcome, retry: int) -> None:
    """The error class decides: permanent → no retry until the spec changes; otherwise retry with backoff."""
    error: ReconcileError | None = outcome.error
    if error is None:
        return
    if error.permanent:
        raise kopf.PermanentError(error.message)
    raise kopf.TemporaryError(error.message, delay=retry_delay(error, retry))


def build_registry(config: OperatorSettings) -> kopf.OperatorRegistry:
    """Every handler of the operator, bound to one Reconciler created at startup."""
    registry = kopf.OperatorRegistry()
    state: dict[str, Reconciler] = {}
    resource = (GROUP, VERSION, PLURAL)

    def reconciler() -> Reconciler:
        return state["reconciler"]

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
            kube, apply_concurrency=config.apply_concurrency, queue_reader=queues
        )

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        # Timers may still be finishing: they see the closed client as "cluster unavailable" and stop.
        if "reconciler" in state:
            await state["reconciler"].queues.aclose()
            await state["reconciler"].kube.aclose()

    @kopf.on.resume(*resource, id="reconcile", registry=registry)
    @kopf.on.create(*resource, id="reconcile", registry=registry)
    @kopf.on.update(*resource, id="reconcile", registry=registry)
    async def reconcile(body: kopf.Body, retry: int, logger: kopf.Logger, **_: Any) -> None:
        outcome = await reconciler().reconcile(body)
        if outcome.error is None:
            logger.info("reconciled: %d created, %d patched, %d unchanged, %d skipped",
                        outcome.count("created"), outcome.count("patched"), outcome.count("unchanged"),
                        outcome.count("skipped"))  # fmt: skip
        _post_events(body, outcome)
        _raise_for_retry(outcome, retry)

    @kopf.timer(*resource, id="resync", interval=config.resync_interval_s,
                initial_delay=config.resync_interval_s, registry=registry)  # fmt: skip
    async def resync(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
        # Restores deleted or hand-edited children and refreshes the status; errors are reported in the
        # status and retried at the next tick, never in a tight loop.
        if reconciler().kube.http.is_closed:
            return
        outcome = await reconciler().reconcile(body)
        restored = outcome.count("created") + outcome.count("patched")
        if restored and outcome.error is None:
            logger.info("restored %d drifted children: %s", restored,
                        ", ".join(c.ref for c in outcome.children if c.action in ("created", "patched")))  # fmt: skip
        _post_events(body, outcome)
        if outcome.error is not None and not outcome.error.permanent:
            logger.warning("resync failed, retrying at the next tick: %s", outcome.error.message)

    @kopf.on.delete(*resource, optional=True, registry=registry)
    async def forget(name: str, namespace: str | None, **_: Any) -> None:
        # Children go by owner references (garbage collection); only in-memory state is ours to drop.
        await reconciler().forget(namespace or "", name)

    @kopf.on.probe(id="reconciler", registry=registry)
    def probe(**_: Any) -> str:
        return "ready" if "reconciler" in state else "starting"

    return registry
