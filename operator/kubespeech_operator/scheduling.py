"""Turn the scheduler's FailedScheduling messages on pods into one line an admin can act on."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

_COUNTED = re.compile(r"^(\d+)\s+(.*)$")
_TAINT = re.compile(r"taints?\s*\{([^:}]+)")
_INSUFFICIENT = re.compile(r"^Insufficient (\S+)")


def _plural(count: int) -> str:
    return f"{count} node" if count == 1 else f"{count} nodes"


def _rephrase(reason: str) -> str:
    """One scheduler reason ("2 node(s) had untolerated taint {k: v}") in short words without the count."""
    reason = reason.strip().rstrip(".")
    if match := _INSUFFICIENT.match(reason):
        return f"Insufficient {match.group(1)}"
    if "taint" in reason and (match := _TAINT.search(reason)):
        return f"untolerated taint {match.group(1).strip()}"
    if "node affinity/selector" in reason or "node selector" in reason:
        return "nodeSelector/affinity matches no node"
    if "didn't match pod topology spread constraints" in reason:
        return "topology spread constraints unsatisfiable"
    if "persistent volume" in reason.lower() or "PersistentVolumeClaim" in reason:
        return reason.replace("node(s) ", "")
    return reason.replace("node(s) ", "")


def summarize_scheduler_message(message: str) -> str:
    """``0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: ...`` → ``Insufficient
    nvidia.com/gpu (3 nodes)``; messages of another shape come back trimmed but unchanged."""
    text = message.split(" preemption:", 1)[0].strip()
    if "nodes are available:" not in text:
        return text.rstrip(".")
    reasons = text.split("nodes are available:", 1)[1].strip().rstrip(".")
    parts: list[str] = []
    # Reasons are comma-separated, but a taint like {k: v} never holds a comma, so a plain split is safe.
    for chunk in reasons.split(", "):
        match = _COUNTED.match(chunk.strip())
        if match:
            parts.append(f"{_rephrase(match.group(2))} ({_plural(int(match.group(1)))})")
        elif chunk.strip():
            parts.append(_rephrase(chunk))
    return ", ".join(parts)


def pod_unscheduled_message(pod: Mapping[str, Any]) -> str | None:
    """The scheduler's reason when ``pod`` is Pending because it cannot be scheduled, else None."""
    status = pod.get("status") or {}
    if status.get("phase") not in (None, "Pending"):
        return None
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return str(condition.get("message") or condition.get("reason") or "Unschedulable")
    return None


def pool_scheduling_message(label: str, pods: Iterable[Mapping[str, Any]]) -> str | None:
    """``asr/l4: 0/2 pods scheduled: Insufficient nvidia.com/gpu (3 nodes)`` when some pods of a pool
    cannot be scheduled, else None. Deleted (terminating) pods are ignored."""
    live = [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
    unscheduled = [(p, m) for p in live if (m := pod_unscheduled_message(p)) is not None]
    if not unscheduled:
        return None
    scheduled = len(live) - len(unscheduled)
    reasons: list[str] = []
    for _, message in unscheduled:
        summary = summarize_scheduler_message(message)
        if summary and summary not in reasons:
            reasons.append(summary)
    return f"{label}: {scheduled}/{len(live)} pods scheduled: {'; '.join(reasons[:3])}"
