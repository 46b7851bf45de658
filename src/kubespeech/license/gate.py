"""The API server's license gate: asks the license proxy, caches the answer briefly, raises typed errors.

The API is the single enforcement point (workers enforce nothing). The gate caches the proxy's
``GET /v1/license`` answer for ``cache_ttl_s``; when the proxy cannot be reached it keeps deciding on the
last answer until that answer's ``serve_until_unix`` (the grace deadline the proxy computed), then refuses.
Concurrent streams are counted cluster-wide in Redis when a client is given (leases with a TTL, renewed
in the background, so a crashed API replica's streams free themselves).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

import httpx
from redis.asyncio import Redis
from redis.exceptions import RedisError

from kubespeech.license.errors import (
    FeatureNotLicensedError,
    InvalidLicenseError,
    LicenseExpiredError,
    LicenseLimitExceededError,
    LicenseUnavailableError,
)
from kubespeech.license.keys import LicenseKeys

log = logging.getLogger(__name__)

USABLE_STATES = frozenset({"valid", "grace"})

# Atomically drop expired leases, then take one if the count is below the limit.
_ACQUIRE_LUA = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
return 1
"""


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class StreamLease:
    """One licensed concurrent stream; release it when the stream ends (``async with`` does that)."""

    def __init__(self, gate: LicenseGate, lease_id: str) -> None:
        self._gate = gate
        self.lease_id = lease_id
        self.released = False

    async def release(self) -> None:
        if not self.released:
            self.released = True
            await self._gate.release_stream(self)

    async def __aenter__(self) -> StreamLease:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()


class LicenseGate:
    """Decides whether a request may be served under the current license.

    ``proxy_url=None`` allows everything (tests and bare runs without a license proxy).
    """

    def __init__(
        self,
        proxy_url: str | None,
        *,
        cache_ttl_s: float = 5.0,
        timeout_s: float = 2.0,
        redis: Redis | None = None,
        key_prefix: str = "ks",
        stream_lease_ttl_s: float = 30.0,
    ) -> None:
        self.proxy_url = proxy_url.rstrip("/") if proxy_url else None
        self.cache_ttl_s = cache_ttl_s
        self._timeout_s = timeout_s
        self._redis = redis
        self._keys = LicenseKeys(key_prefix)
        self._lease_ttl_s = stream_lease_ttl_s
        self._client: httpx.AsyncClient | None = None
        self._cached: dict[str, Any] | None = None
        self._cached_at = 0.0  # monotonic time of the last successful fetch
        self._next_fetch = 0.0  # monotonic time before which no new fetch is attempted
        self._last_error: str | None = None
        self._lock = asyncio.Lock()
        self._leases: set[str] = set()
        self._renew_task: asyncio.Task[None] | None = None
        self._closed = False

    # -- the proxy's answer ------------------------------------------------------------------

    async def _fetch(self) -> dict[str, Any]:
        assert self.proxy_url is not None
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout_s)
        resp = await self._client.get(f"{self.proxy_url}/v1/license")
        resp.raise_for_status()
        data = resp.json()
        if not isinstance(data, dict) or "state" not in data:
            raise ValueError("license proxy answered without a state")
        return data

    async def _current(self) -> tuple[dict[str, Any] | None, str]:
        """The license answer to decide on and where it came from (``proxy``, ``cache``, ``none``)."""
        if self._cached is not None and time.monotonic() < self._next_fetch and not self._outlived():
            return self._cached, "proxy" if self._last_error is None else "cache"
        async with self._lock:
            now = time.monotonic()
            if now >= self._next_fetch or self._outlived():
                try:
                    data = await self._fetch()
                except (httpx.HTTPError, ValueError) as exc:
                    if self._last_error is None:
                        log.warning(
                            "license proxy unreachable; deciding on the cached answer",
                            extra={"error": type(exc).__name__},
                        )
                    self._last_error = type(exc).__name__
                else:
                    if self._last_error is not None:
                        log.info("license proxy reachable again")
                    self._cached, self._cached_at, self._last_error = data, now, None
                # A failed fetch waits a TTL too, so a dead proxy is not asked on every request.
                self._next_fetch = now + self.cache_ttl_s
        if self._cached is None:
            return None, "none"
        return self._cached, "proxy" if self._last_error is None else "cache"

    def _outlived(self) -> bool:
        """The cached answer's ``serve_until`` has passed while the proxy still answers: ask it again now.

        Without this a grace period shorter than the cache TTL would refuse requests the proxy itself still
        serves (a check-in succeeded since the answer was cached). With the proxy unreachable, the TTL paces
        the retries and the outlived answer decides (see _usable).
        """
        serve_until = (self._cached or {}).get("serve_until_unix")
        return (
            self._last_error is None
            and isinstance(serve_until, int | float)
            and not isinstance(serve_until, bool)
            and time.time() >= serve_until
        )

    async def _usable(self) -> dict[str, Any]:
        data, _source = await self._current()
        if data is None:
            raise LicenseUnavailableError(
                "The license proxy cannot be reached; try again shortly.", retry_after=self.cache_ttl_s
            )
        state = str(data.get("state"))
        serve_until = data.get("serve_until_unix")
        if state in USABLE_STATES and isinstance(serve_until, int | float) and time.time() >= serve_until:
            # The answer has outlived what the proxy allowed (expiry or grace deadline) and no newer one
            # could be fetched: refuse, as the proxy itself would.
            ended_by_grace = state == "grace" or serve_until < float(data.get("expires_at_unix") or 0)
            raise LicenseExpiredError(
                "The license could not be confirmed before the end of its grace period."
                if ended_by_grace
                else "The license has expired.",
                expires_at=_iso(serve_until) if ended_by_grace else data.get("expires_at"),
                reason="grace_expired" if ended_by_grace else "expired",
            )
        if state == "expired":
            grace_ended = data.get("reason") == "grace_expired"
            exp = data.get("grace_deadline") if grace_ended else data.get("expires_at")
            raise LicenseExpiredError(
                str(data.get("message") or "The license has expired."),
                expires_at=exp,
                reason=data.get("reason") or "expired",
            )
        if state not in USABLE_STATES:
            raise InvalidLicenseError(
                str(data.get("message") or "The license is not valid."),
                reason=data.get("reason") or "invalid",
            )
        return data

    # -- public API --------------------------------------------------------------------------

    async def check(self, feature: str) -> None:
        """Raise a license error unless ``feature`` (asr, tts, streaming) may be served now."""
        if self.proxy_url is None:
            return
        data = await self._usable()
        features = data.get("features") or []
        if feature not in features:
            raise FeatureNotLicensedError(
                f"The license does not include the '{feature}' feature.",
                feature=feature,
                licensed=list(features),
            )
        exceeded = data.get("limits_exceeded") or {}
        if feature in ("asr", "tts", "streaming") and "audio_hours_per_day" in exceeded:
            info = exceeded["audio_hours_per_day"] or {}
            raise LicenseLimitExceededError(
                "The licensed audio hours for today are used up.",
                retry_after=float(info.get("retry_after", 60.0)),
                limit="audio_hours_per_day",
                max=(data.get("limits") or {}).get("audio_hours_per_day"),
            )

    async def acquire_stream(self, feature: str = "streaming") -> StreamLease:
        """Take a slot of ``max_concurrent_streams`` or raise; release the lease when the stream ends."""
        lease = StreamLease(self, uuid.uuid4().hex)
        if self.proxy_url is None:
            return lease
        await self.check(feature)
        data = await self._usable()
        limit = (data.get("limits") or {}).get("max_concurrent_streams")
        if not isinstance(limit, int) or limit <= 0:
            return lease
        now = time.time()
        if self._redis is None:
            taken = len(self._leases) < limit  # without Redis the limit is per API process
            if taken:
                self._leases.add(lease.lease_id)
        else:
            try:
                expiry = now + self._lease_ttl_s
                taken = bool(
                    await self._redis.eval(
                        _ACQUIRE_LUA, 1, self._keys.streams, now, expiry, limit, lease.lease_id
                    )
                )
            except RedisError as exc:
                # Redis down takes the API down anyway; do not also refuse the stream for licensing.
                log.warning("stream limit not enforced: Redis down", extra={"error": type(exc).__name__})
                return lease
            if taken:
                self._leases.add(lease.lease_id)
                self._ensure_renewer()
        if not taken:
            lease.released = True
            raise LicenseLimitExceededError(
                f"The licensed maximum of {limit} concurrent streams is in use.",
                retry_after=5.0,
                limit="max_concurrent_streams",
                max=limit,
            )
        return lease

    async def release_stream(self, lease: StreamLease) -> None:
        lease.released = True
        if lease.lease_id not in self._leases:
            return
        self._leases.discard(lease.lease_id)
        if self._redis is not None:
            # If Redis is down the lease simply expires after its TTL.
            with contextlib.suppress(RedisError):
                await self._redis.zrem(self._keys.streams, lease.lease_id)

    def _ensure_renewer(self) -> None:
        if self._renew_task is None or self._renew_task.done():
            self._renew_task = asyncio.create_task(self._renew_leases(), name="license-lease-renewer")

    async def _renew_leases(self) -> None:
        assert self._redis is not None
        while self._leases and not self._closed:
            await asyncio.sleep(self._lease_ttl_s / 3)
            expiry = time.time() + self._lease_ttl_s
            try:
                await self._redis.zadd(self._keys.streams, dict.fromkeys(self._leases, expiry), xx=True)
            except RedisError:
                log.warning("stream leases not renewed: Redis unavailable")

    async def state(self) -> dict[str, Any]:
        """What /ready reports: ``usable`` plus the proxy's answer (or why there is none)."""
        if self.proxy_url is None:
            return {"state": "unlicensed", "usable": True, "source": "disabled"}
        data, source = await self._current()
        result: dict[str, Any] = {"source": source}
        if data is not None:
            for key in ("state", "reason", "license_id", "expires_at", "grace_seconds_remaining", "features"):
                result[key] = data.get(key)
        try:
            await self._usable()
            result["usable"] = True
        except (InvalidLicenseError, LicenseExpiredError, LicenseUnavailableError) as exc:
            result["usable"] = False
            result["error"] = exc.code
        return result

    async def aclose(self) -> None:
        # The flag ends the renewer even if redis-py swallows the cancellation (it can turn one that lands
        # mid-command into a timeout and retry).
        self._closed = True
        if self._renew_task is not None:
            self._renew_task.cancel()
            await asyncio.wait([self._renew_task], timeout=5)
            self._renew_task = None
        for lease_id in list(self._leases):
            await self.release_stream(StreamLease(self, lease_id))
        if self._client is not None:
            await self._client.aclose()
            self._client = None
