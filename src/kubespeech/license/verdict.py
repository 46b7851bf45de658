"""The license proxy's verdict on its license, published to Redis for the operator's LicenseValid condition.

The proxy rewrites the hash :attr:`~kubespeech.license.keys.LicenseKeys.verdict` whenever it evaluates its
license (at start, after each check-in and key reload, and every :data:`VERDICT_INTERVAL_S`), with a TTL
of :data:`VERDICT_TTL_S`: a verdict that is still there comes from a proxy that was alive moments ago, and
an absent one means no proxy is running (or none can reach Redis). This module needs only a Redis client,
so the operator can import it without the proxy's web stack.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from kubespeech.license.keys import LicenseKeys

VERDICT_INTERVAL_S = 5.0
# A few publish intervals, so one slow or missed write does not make a live proxy's verdict vanish.
VERDICT_TTL_S = 3 * VERDICT_INTERVAL_S

USABLE_STATES = frozenset({"valid", "grace"})
# "revoked" and "missing" are the proxy's "invalid" narrowed by its reason, so a condition can say why.
KNOWN_STATES = frozenset({"valid", "grace", "expired", "revoked", "invalid", "missing"})
UNKNOWN_STATE = "unknown"


def verdict_state(state: str, reason: str | None) -> str:
    """The verdict's state for the proxy's ``(state, reason)``: ``invalid`` is split by the reason."""
    if state == "invalid" and reason == "revoked":
        return "revoked"
    if state == "invalid" and reason == "no_license":
        return "missing"
    return state


@dataclass(frozen=True)
class LicenseVerdict:
    """One proxy's verdict: ``usable`` is whether requests are served (``state`` valid or grace)."""

    state: str
    usable: bool
    message: str
    updated_at_unix: float
    reason: str | None = None
    license_id: str | None = None
    expires_at_unix: float | None = None
    # The license's limits on what the operator may scale to (None: unlimited).
    max_worker_replicas: int | None = None
    max_gpus: int | None = None

    @classmethod
    def from_answer(cls, answer: Mapping[str, Any], *, now: float | None = None) -> LicenseVerdict:
        """The verdict in a ``LicenseProxy.evaluate()`` answer (never the token or the customer's name)."""
        expires = answer.get("expires_at_unix")
        return cls(
            state=verdict_state(str(answer["state"]), answer.get("reason")),
            usable=bool(answer.get("usable")),
            message=str(answer.get("message") or ""),
            updated_at_unix=round(time.time() if now is None else now, 3),
            reason=answer.get("reason"),
            license_id=answer.get("license_id"),
            expires_at_unix=float(expires) if expires is not None else None,
            max_worker_replicas=_limit((answer.get("limits") or {}).get("max_worker_replicas")),
            max_gpus=_limit((answer.get("limits") or {}).get("max_gpus")),
        )

    def to_hash(self) -> dict[str, str]:
        fields = {
            "state": self.state,
            "usable": "1" if self.usable else "0",
            "message": self.message,
            "updated_at_unix": f"{self.updated_at_unix:.3f}",
        }
        if self.reason:
            fields["reason"] = self.reason
        if self.license_id:
            fields["license_id"] = self.license_id
        if self.expires_at_unix is not None:
            fields["expires_at_unix"] = f"{self.expires_at_unix:.3f}"
        if self.max_worker_replicas is not None:
            fields["max_worker_replicas"] = str(self.max_worker_replicas)
        if self.max_gpus is not None:
            fields["max_gpus"] = str(self.max_gpus)
        return fields

    @classmethod
    def from_hash(cls, raw: Mapping[Any, Any]) -> LicenseVerdict | None:
        """Parse a stored hash; None when empty. Malformed fields never raise: an unknown state or a
        ``usable`` other than ``"1"`` reads as not usable, unparsable numbers as unknown."""
        data = {_text(k): _text(v) for k, v in raw.items()}
        if not data:
            return None
        state = data.get("state", "")
        if state not in KNOWN_STATES:
            state = UNKNOWN_STATE
        return cls(
            state=state,
            # Usable only when both fields agree, so a half-garbled hash never reads as a valid license.
            usable=data.get("usable") == "1" and state in USABLE_STATES,
            message=data.get("message", ""),
            updated_at_unix=_number(data.get("updated_at_unix")) or 0.0,
            reason=data.get("reason") or None,
            license_id=data.get("license_id") or None,
            expires_at_unix=_number(data.get("expires_at_unix")),
            max_worker_replicas=_limit(data.get("max_worker_replicas")),
            max_gpus=_limit(data.get("max_gpus")),
        )


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _limit(value: Any) -> int | None:
    """A non-negative whole limit, or None (unlimited, or unreadable: the proxy enforces it anyway)."""
    try:
        number = int(str(value)) if value is not None and str(value) != "" else None
    except ValueError:
        return None
    return number if number is not None and number >= 0 else None


def _number(value: str | None) -> float | None:
    try:
        number = float(value) if value else None
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) else None


async def write_verdict(
    redis: Redis, key_prefix: str, verdict: LicenseVerdict, *, ttl_s: float = VERDICT_TTL_S
) -> None:
    """Replace the stored verdict (atomically, so stale optional fields go) and restart its TTL."""
    key = LicenseKeys(key_prefix).verdict
    fields: dict[Any, Any] = verdict.to_hash()  # redis-py's mapping type is invariant in its key type
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(key)
        pipe.hset(key, mapping=fields)
        pipe.pexpire(key, max(1, int(ttl_s * 1000)))
        await pipe.execute()


async def read_verdict(redis: Redis, key_prefix: str) -> LicenseVerdict | None:
    """The latest live proxy verdict, or None when no proxy published one within the TTL.

    Redis errors propagate: the caller decides what an unreachable Redis means for its status.
    """
    return LicenseVerdict.from_hash(await redis.hgetall(LicenseKeys(key_prefix).verdict))
