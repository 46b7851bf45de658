"""SpeechDeployment status conditions: the types, what each status value means, and transition bookkeeping.

Every condition carries ``type/status/reason/message/lastTransitionTime/observedGeneration``;
``lastTransitionTime`` only moves when ``status`` changes (as prometheus-operator does), so a status
rewritten by every reconcile does not look like a flapping one.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

ConditionStatus = Literal["True", "False", "Unknown"]

READY = "Ready"
"""True: every component is available and nothing is degraded. False: something is missing, rolling out,
unschedulable or invalid (the reason says which). Unknown: not reconciled yet."""

PROGRESSING = "Progressing"
"""True: the operator is creating/updating children or a rollout is in progress. False: the observed
generation is fully applied and every rollout finished."""

DEGRADED = "Degraded"
"""True: the spec is invalid, a child could not be applied, or pods cannot be scheduled; the message says
what an admin must change. False: nothing known to be wrong."""

LICENSE_VALID = "LicenseValid"
"""True: the license proxy's verdict (published in the stack's Redis) says the license is usable, or, where
the operator cannot reach Redis, the proxy is ready (it is ready only while the license is usable). False:
the license Secret is missing, or the verdict says expired, revoked, invalid or missing (the reason names
it: LicenseExpired, LicenseRevoked, LicenseInvalid, LicenseMissing). Unknown: no verdict yet."""

MODELS_READY = "ModelsReady"
"""True: every model-cache fetch Job succeeded (or no model needs downloading). False: a fetch Job is
running or failed (the message names it)."""

ASR_READY = "ASRReady"
"""True: every ASR pool has its desired replicas ready (a pool scaled to zero counts as ready: it
cold-starts on demand) or no ASR pool is configured. False: a pool is short of ready replicas."""

TTS_READY = "TTSReady"
"""As ASRReady, for the TTS pools."""

SCALING_ACTIVE = "ScalingActive"
"""Only with pools scaled by the operator's autoscaler. True: it reads the queues and decides. False
(QueueDepthUnavailable): Redis could not be read; replicas are held (or go to fallbackReplicas), never to
zero on missing data."""

SCALING_LIMITED = "ScalingLimited"
"""Only with pools scaled by the operator's autoscaler. True (LicenseClamp): the license's
max_worker_replicas or max_gpus capped what the queues asked for; the message names the limit. False: no
limit reached."""

CONDITION_TYPES = (
    READY,
    PROGRESSING,
    DEGRADED,
    LICENSE_VALID,
    MODELS_READY,
    ASR_READY,
    TTS_READY,
    SCALING_ACTIVE,
    SCALING_LIMITED,
)


@dataclass(frozen=True)
class Condition:
    """A condition the reconciler wants; ``lastTransitionTime`` is filled in by :func:`merge_conditions`."""

    type: str
    status: ConditionStatus
    reason: str
    message: str = ""


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_conditions(
    previous: Iterable[Mapping[str, Any]] | None,
    wanted: Iterable[Condition],
    *,
    observed_generation: int | None,
    now: str | None = None,
) -> list[dict[str, Any]]:
    """The new condition list, in ``CONDITION_TYPES`` order, keeping ``lastTransitionTime`` when unchanged."""
    old = {str(c.get("type")): c for c in previous or [] if isinstance(c, Mapping)}
    timestamp = now or now_rfc3339()
    result: dict[str, dict[str, Any]] = {}
    for condition in wanted:
        before = old.get(condition.type)
        unchanged = before is not None and before.get("status") == condition.status
        entry: dict[str, Any] = {
            "type": condition.type,
            "status": condition.status,
            "reason": condition.reason,
            "message": condition.message,
            "lastTransitionTime": before.get("lastTransitionTime", timestamp)
            if before and unchanged
            else timestamp,
        }
        if observed_generation is not None:
            entry["observedGeneration"] = observed_generation
        result[condition.type] = entry
    order = {t: i for i, t in enumerate(CONDITION_TYPES)}
    return sorted(result.values(), key=lambda c: order.get(c["type"], len(order)))


def find(conditions: Iterable[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any] | None:
    for condition in conditions or []:
        if isinstance(condition, Mapping) and condition.get("type") == type_:
            return condition
    return None


def transitions(
    previous: Iterable[Mapping[str, Any]] | None, current: Iterable[Mapping[str, Any]]
) -> list[Mapping[str, Any]]:
    """Conditions whose status or reason changed: the ones worth a Kubernetes Event."""
    old = {str(c.get("type")): c for c in previous or [] if isinstance(c, Mapping)}
    changed = []
    for condition in current:
        before = old.get(str(condition.get("type")))
        if before is None or (before.get("status"), before.get("reason")) != (
            condition.get("status"),
            condition.get("reason"),
        ):
            changed.append(condition)
    return changed
