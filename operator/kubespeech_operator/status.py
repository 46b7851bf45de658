"""Compute a SpeechDeployment's status from its live children: conditions, pools, endpoints, columns.

Pure functions over what the reconciler observed, so every rule is testable without a cluster.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kubespeech.license.verdict import LicenseVerdict
from kubespeech_operator import conditions as cond
from kubespeech_operator.builders.common import POOL_LABEL, TASK_LABEL
from kubespeech_operator.conditions import Condition
from kubespeech_operator.errors import ReconcileError
from kubespeech_operator.scheduling import pool_scheduling_message
from kubespeech_operator.spec import SpeechDeploymentSpec

if TYPE_CHECKING:
    from kubespeech_operator.reconciler import ChildResult

COMPONENT_LABEL = "app.kubernetes.io/component"
# Status keys this operator owns (kopf may keep its own keys beside them; those are left alone).
OWNED_KEYS = (
    "observedGeneration",
    "conditions",
    "asrReplicas",
    "ttsReplicas",
    "queueDepth",
    "pools",
    "endpoints",
)
WORKLOAD_KINDS = ("Deployment", "StatefulSet")


@dataclass
class PoolWorkload:
    """A worker pool's Deployment as built and as it is live."""

    task: str
    pool: str
    manifest: Mapping[str, Any]
    live: Mapping[str, Any] | None

    @property
    def label(self) -> str:
        return f"{self.task}/{self.pool}"

    @property
    def desired(self) -> int:
        return desired_replicas(self.live or self.manifest)


@dataclass
class Observed:
    """Everything the reconciler saw in one pass."""

    spec: SpeechDeploymentSpec
    name: str
    namespace: str
    children: list[ChildResult]
    pods: dict[str, list[Mapping[str, Any]]] = field(default_factory=dict)
    queue_depths: dict[str, int] = field(default_factory=dict)
    active_streams: dict[str, int] = field(default_factory=dict)  # open live sessions per model
    queue_note: str | None = None
    license_secret_found: bool | None = None
    license_verdict: LicenseVerdict | None = None
    redis_reachable: bool = False
    # The built-in autoscaler's view per pool (``asr/l4`` → status fields), and its notes: missing queue
    # data, license clamp.
    autoscaling: dict[str, dict[str, Any]] = field(default_factory=dict)
    autoscaling_notes: tuple[str | None, str | None] = (None, None)


def desired_replicas(obj: Mapping[str, Any]) -> int:
    replicas = (obj.get("spec") or {}).get("replicas")
    return 1 if replicas is None else int(replicas)


def ready_replicas(obj: Mapping[str, Any] | None) -> int:
    return int(((obj or {}).get("status") or {}).get("readyReplicas") or 0)


def rolling_out(obj: Mapping[str, Any] | None) -> bool:
    """Whether a Deployment/StatefulSet has not yet rolled out its current template to every replica."""
    if not obj:
        return True
    st = obj.get("status") or {}
    generation = (obj.get("metadata") or {}).get("generation")
    if (
        generation is not None
        and st.get("observedGeneration") is not None
        and st["observedGeneration"] < generation
    ):
        return True
    return int(st.get("updatedReplicas") or 0) < desired_replicas(obj)


def pool_workloads(children: Sequence[ChildResult]) -> list[PoolWorkload]:
    result = []
    for child in children:
        labels = (child.manifest.get("metadata") or {}).get("labels") or {}
        if child.manifest.get("kind") in WORKLOAD_KINDS and POOL_LABEL in labels and TASK_LABEL in labels:
            result.append(PoolWorkload(labels[TASK_LABEL], labels[POOL_LABEL], child.manifest, child.live))
    return result


def _component(child: ChildResult) -> str:
    return str(((child.manifest.get("metadata") or {}).get("labels") or {}).get(COMPONENT_LABEL, ""))


def _job_state(job: Mapping[str, Any] | None) -> tuple[str, str]:
    """("succeeded" | "failed" | "running", message) of a model fetch Job."""
    st = (job or {}).get("status") or {}
    for c in st.get("conditions") or []:
        if c.get("type") == "Complete" and c.get("status") == "True":
            return "succeeded", ""
        if c.get("type") == "Failed" and c.get("status") == "True":
            return "failed", str(c.get("message") or c.get("reason") or "failed")
    if int(st.get("succeeded") or 0) > 0:
        return "succeeded", ""
    return "running", ""


def _endpoints(observed: Observed) -> dict[str, Any]:
    spec = observed.spec
    result: dict[str, Any] = {}
    for child in observed.children:
        if child.manifest.get("kind") == "Service" and _component(child) == "api":
            meta = child.manifest.get("metadata") or {}
            result["api"] = f"http://{meta.get('name')}.{observed.namespace}.svc:{spec.api.service.port}"
            ingress = (((child.live or {}).get("status") or {}).get("loadBalancer") or {}).get(
                "ingress"
            ) or []
            if spec.api.service.type == "LoadBalancer" and ingress:
                host = ingress[0].get("hostname") or ingress[0].get("ip")
                if host:
                    result["external"] = f"http://{host}:{spec.api.service.port}"
    if spec.api.ingress.enabled and spec.api.ingress.host:
        scheme = "https" if spec.api.ingress.tls_secret_name else "http"
        result["external"] = f"{scheme}://{spec.api.ingress.host}"
    return result


def build_status(previous: Mapping[str, Any], observed: Observed, generation: int | None) -> dict[str, Any]:
    """The full status after a successful apply."""
    # Pruned children are gone: they count as a change, never as a component.
    children = [c for c in observed.children if c.action != "pruned"]
    pools = pool_workloads(children)
    wanted: list[Condition] = []
    problems: list[tuple[str, str]] = []  # (reason, message) an admin must act on

    # Pools: replicas, readiness, scheduling problems, queue depth.
    pool_status: list[dict[str, Any]] = []
    by_task: dict[str, list[dict[str, Any]]] = {"asr": [], "tts": []}
    queue_names = {f"{task}/{pool.name}": pool.queue_name for task, pool in observed.spec.pools()}
    for workload in pools:
        live_status = (workload.live or {}).get("status") or {}
        entry: dict[str, Any] = {
            "name": workload.pool,
            "task": workload.task,
            "modelName": queue_names.get(workload.label, workload.pool),
            "replicas": int(live_status.get("replicas") or 0),
            "readyReplicas": ready_replicas(workload.live),
            "desiredReplicas": workload.desired,
            "queueDepth": observed.queue_depths.get(queue_names.get(workload.label, ""), 0),
            "activeStreams": observed.active_streams.get(queue_names.get(workload.label, ""), 0),
        }
        scaling = observed.autoscaling.get(workload.label)
        if scaling is not None:
            # The autoscaler's own view: what it read and decided (the live Deployment may lag a moment).
            entry.update({k: v for k, v in scaling.items() if k != "desiredReplicas"})
        message = pool_scheduling_message(workload.label, observed.pods.get(workload.label, []))
        if message:
            entry["message"] = message
            problems.append(("PodsUnschedulable", message))
        elif entry["readyReplicas"] < entry["desiredReplicas"]:
            entry["message"] = (
                f"{workload.label}: {entry['readyReplicas']}/{entry['desiredReplicas']} pods ready"
            )
        pool_status.append(entry)
        by_task.setdefault(workload.task, []).append(entry)

    for task, type_ in (("asr", cond.ASR_READY), ("tts", cond.TTS_READY)):
        entries = by_task.get(task) or []
        if not entries:
            wanted.append(Condition(type_, "True", "NoPools", f"no {task.upper()} pools are configured"))
            continue
        short = [e for e in entries if e["readyReplicas"] < e["desiredReplicas"]]
        cold = [e for e in entries if e.get("state") == "ColdStarting"]
        if cold:
            names = ", ".join(f"{task}/{e['name']}" for e in cold)
            wanted.append(Condition(type_, "False", "ColdStarting",
                                    f"{names}: scaling from zero for queued work; requests are held meanwhile"))  # fmt: skip
        elif short:
            wanted.append(Condition(type_, "False", "PoolsNotReady", "; ".join(e["message"] for e in short)))
        elif all(e["desiredReplicas"] == 0 for e in entries):
            wanted.append(
                Condition(type_, "True", "ScaledToZero", "every pool is scaled to zero; cold start on demand")
            )
        else:
            ready = sum(e["readyReplicas"] for e in entries)
            wanted.append(Condition(type_, "True", "PoolsReady", f"{ready} {task.upper()} pods ready"))

    # Models: fetch Jobs.
    jobs = [c for c in children if c.manifest.get("kind") == "Job"]
    states = [(c, *_job_state(c.live)) for c in jobs]
    failed = [f"{c.ref}: {msg}" for c, state, msg in states if state == "failed"]
    running = [c.ref for c, state, _ in states if state == "running"]
    if not jobs:
        wanted.append(
            Condition(cond.MODELS_READY, "True", "NoDownloads", "every model is in the image or cache")
        )
    elif failed:
        wanted.append(Condition(cond.MODELS_READY, "False", "ModelFetchFailed", "; ".join(failed)))
        problems.append(("ModelFetchFailed", "model download failed: " + "; ".join(failed)))
    elif running:
        wanted.append(
            Condition(cond.MODELS_READY, "False", "ModelFetchInProgress", "fetching: " + ", ".join(running))
        )
    else:
        wanted.append(
            Condition(cond.MODELS_READY, "True", "ModelsFetched", f"{len(jobs)} model(s) in the cache")
        )

    # License: the Secret must exist; then the proxy's own verdict (published in Redis) says whether the
    # license is usable and why not; without it, the proxy's readiness (it is ready only while usable).
    proxies = [
        c for c in children if c.manifest.get("kind") in WORKLOAD_KINDS and _component(c) == "license-proxy"
    ]
    secret_name = observed.spec.license.secret_ref.name
    verdict = observed.license_verdict
    if observed.license_secret_found is False:
        message = f"license Secret {secret_name!r} not found in namespace {observed.namespace}"
        wanted.append(Condition(cond.LICENSE_VALID, "False", "LicenseSecretMissing", message))
        problems.append(("LicenseSecretMissing", message))
    elif verdict is not None and verdict.usable:
        wanted.append(
            Condition(cond.LICENSE_VALID, "True", _license_reason(verdict), _license_message(verdict))
        )
    elif verdict is not None:
        reason, message = _license_reason(verdict), _license_message(verdict)
        wanted.append(Condition(cond.LICENSE_VALID, "False", reason, message))
        problems.append((reason, message))
    elif proxies and all(ready_replicas(p.live) > 0 for p in proxies) and not observed.redis_reachable:
        # Redis out of the operator's reach: the proxy's readiness is the next best evidence.
        wanted.append(
            Condition(
                cond.LICENSE_VALID, "True", "LicenseProxyReady", "the license proxy reports a usable license"
            )
        )
    else:
        wanted.append(
            Condition(
                cond.LICENSE_VALID,
                "Unknown",
                "LicenseProxyNotReady",
                "waiting for the license proxy to report on the license",
            )
        )

    # Other workloads (api, license proxy, redis) and rollouts.
    workloads = [c for c in children if c.manifest.get("kind") in WORKLOAD_KINDS]
    not_ready = [
        f"{c.ref} {ready_replicas(c.live)}/{desired_replicas(c.live or c.manifest)} ready"
        for c in workloads
        if ready_replicas(c.live) < desired_replicas(c.live or c.manifest)
    ]
    changed = [c.ref for c in observed.children if c.action in ("created", "patched", "pruned")]
    rollouts = [
        c.ref for c in workloads if desired_replicas(c.live or c.manifest) > 0 and rolling_out(c.live)
    ]

    if changed:
        wanted.append(
            Condition(
                cond.PROGRESSING,
                "True",
                "ChildrenUpdated",
                f"applied {len(changed)}: {', '.join(changed[:8])}",
            )
        )
    elif rollouts:
        wanted.append(
            Condition(cond.PROGRESSING, "True", "RollingOut", "rolling out: " + ", ".join(rollouts[:8]))
        )
    elif running:
        wanted.append(
            Condition(cond.PROGRESSING, "True", "FetchingModels", "fetching: " + ", ".join(running))
        )
    else:
        wanted.append(Condition(cond.PROGRESSING, "False", "ReconcileComplete", "every child is up to date"))

    unserved = sorted({c.ref for c in observed.children if c.action == "skipped" and c.manifest.get("kind") in (
        "ScaledObject", "TriggerAuthentication")})  # fmt: skip
    if unserved:
        message = ("autoscaling.mode keda needs KEDA: keda.sh/v1alpha1 is not served by this cluster, so "
                   f"{', '.join(unserved)} cannot be created; install KEDA or use mode operator")  # fmt: skip
        problems.append(("KedaNotInstalled", message))

    if observed.autoscaling:
        missing, clamped = observed.autoscaling_notes
        if missing:
            wanted.append(Condition(cond.SCALING_ACTIVE, "False", "QueueDepthUnavailable", missing))
        else:
            wanted.append(Condition(cond.SCALING_ACTIVE, "True", "ReadingQueues",
                                    f"{len(observed.autoscaling)} pool(s) scaled on queue depth"))  # fmt: skip
        if clamped:
            wanted.append(Condition(cond.SCALING_LIMITED, "True", "LicenseClamp", clamped))
        else:
            wanted.append(
                Condition(cond.SCALING_LIMITED, "False", "WithinLimits", "no license limit reached")
            )

    problem_text = "; ".join(message for _, message in problems)
    if problems:
        wanted.append(Condition(cond.DEGRADED, "True", problems[0][0], problem_text))
    else:
        wanted.append(Condition(cond.DEGRADED, "False", "AsExpected", "no problems found"))

    if problems:
        wanted.append(Condition(cond.READY, "False", problems[0][0], problem_text))
    elif not_ready:
        wanted.append(Condition(cond.READY, "False", "ComponentsNotReady", "; ".join(not_ready[:8])))
    elif running:
        wanted.append(Condition(cond.READY, "False", "ModelsNotReady", "fetching: " + ", ".join(running)))
    else:
        wanted.append(Condition(cond.READY, "True", "AllComponentsReady", "every component is ready"))

    result: dict[str, Any] = {
        "conditions": cond.merge_conditions(
            previous.get("conditions"), wanted, observed_generation=generation
        ),
        "asrReplicas": _ratio(by_task.get("asr") or []),
        "ttsReplicas": _ratio(by_task.get("tts") or []),
        "queueDepth": sum(observed.queue_depths.values()),
        "pools": pool_status,
        "endpoints": _endpoints(observed),
    }
    if observed.queue_note:
        for entry in pool_status:
            entry["message"] = "; ".join(m for m in (entry.get("message"), observed.queue_note) if m)
    if generation is not None:
        result["observedGeneration"] = generation
    return result


_LICENSE_REASONS = {
    "valid": "LicenseValid",
    "grace": "LicenseInGracePeriod",
    "expired": "LicenseExpired",
    "revoked": "LicenseRevoked",
    "invalid": "LicenseInvalid",
    "missing": "LicenseMissing",
}


def _license_reason(verdict: LicenseVerdict) -> str:
    return _LICENSE_REASONS.get(verdict.state, "LicenseStateUnknown")


def _license_message(verdict: LicenseVerdict) -> str:
    parts = [f"license {verdict.state}"]
    if verdict.license_id:
        parts.append(f"id {verdict.license_id}")
    if verdict.expires_at_unix:
        parts.append("expires " + time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(verdict.expires_at_unix)))
    text = ", ".join(parts)
    return f"{text}: {verdict.message}" if verdict.message else text


def _ratio(entries: Sequence[Mapping[str, Any]]) -> str:
    return f"{sum(e['readyReplicas'] for e in entries)}/{sum(e['desiredReplicas'] for e in entries)}"


def error_status(
    previous: Mapping[str, Any], error: ReconcileError, generation: int | None
) -> dict[str, Any]:
    """Degraded and not Ready, with the error's reason and message; the other conditions are kept.

    Children are left as they were: after an invalid spec change, the last good spec keeps serving.
    """
    waiting = "waiting for a corrected spec" if error.permanent else "retrying"
    wanted = [
        Condition(cond.READY, "False", error.reason, error.message),
        Condition(
            cond.PROGRESSING,
            "False" if error.permanent else "True",
            error.reason,
            f"{waiting}: {error.message}",
        ),
        Condition(cond.DEGRADED, "True", error.reason, error.message),
    ]
    replaced = {w.type for w in wanted}
    kept = [
        Condition(c["type"], c["status"], c.get("reason", ""), c.get("message", ""))
        for c in previous.get("conditions") or []
        if c.get("type") not in replaced
    ]
    result = {k: previous[k] for k in OWNED_KEYS if k in previous}
    result["conditions"] = cond.merge_conditions(
        previous.get("conditions"), [*wanted, *kept], observed_generation=generation
    )
    if generation is not None:
        result["observedGeneration"] = generation
    return result


def same_status(previous: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    return all(previous.get(k) == new.get(k) for k in OWNED_KEYS)


def status_patch(previous: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A merge patch of ``status``: the new values, and null for owned keys that went away."""
    patch: dict[str, Any] = {k: None for k in OWNED_KEYS if k in previous and k not in new}
    patch.update(new)
    old_endpoints = previous.get("endpoints") or {}
    if isinstance(new.get("endpoints"), Mapping):
        patch["endpoints"] = {
            **{k: None for k in old_endpoints if k not in new["endpoints"]},
            **new["endpoints"],
        }
    return patch
