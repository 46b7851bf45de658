"""The license proxy (``kubespeech license-proxy``, :3369): verifies the license, checks in, ships usage.

State that must survive restarts and be shared by replicas lives in one Redis hash per license: when the
license was first seen, the last successful and the last failed check-in, and the upstream's revocation
verdict. Every replica computes the same answer from that hash, so two replicas agree and a restart keeps
the grace deadline. If Redis is down the proxy keeps answering from its in-memory copy.

Usage events (written by the API's :class:`~kubespeech.license.usage.UsageRecorder`) wait in a bounded
Redis stream; one replica at a time (a Redis lock) posts them upstream in batches and deletes them only
after the upstream acknowledged them, so delivery is at least once and the upstream deduplicates by id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from kubespeech.license import dev_keys
from kubespeech.license.keys import LicenseKeys, seconds_until_utc_midnight
from kubespeech.license.settings import ProxySettings
from kubespeech.license.token import (
    LicenseClaims,
    TokenError,
    check_times,
    iso,
    key_id,
    load_public_key,
    token_fingerprint,
    verify_signature,
)
from kubespeech.license.usage import as_text, decode_event
from kubespeech.license.verdict import (
    VERDICT_INTERVAL_S,
    VERDICT_TTL_S,
    LicenseVerdict,
    verdict_state,
    write_verdict,
)

log = logging.getLogger(__name__)

VERSION = "1"
# Where a vendor's license-proxy image carries its public key, used when none is configured.
BAKED_PUBLIC_KEY = Path("/etc/kubespeech/vendor-public-key.pem")

# Record the outcome of one check-in atomically: timestamps only move forward (replicas race), the
# revocation verdict is whatever the upstream said last.
_RECORD_LUA = """
if ARGV[1] == 'ok' then
  local cur = tonumber(redis.call('HGET', KEYS[1], 'last_ok') or '0')
  if tonumber(ARGV[2]) > cur then redis.call('HSET', KEYS[1], 'last_ok', ARGV[2]) end
  redis.call('HSET', KEYS[1], 'revoked', ARGV[3], 'revoked_message', ARGV[4])
else
  local cur = tonumber(redis.call('HGET', KEYS[1], 'last_fail') or '0')
  if tonumber(ARGV[2]) > cur then
    redis.call('HSET', KEYS[1], 'last_fail', ARGV[2], 'last_error', ARGV[3])
  end
end
return 1
"""

# Become (or stay) the replica that ships usage: the lock expires if its holder dies.
_LOCK_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""


@dataclass
class SharedState:
    """The check-in history of one license, as stored in Redis (times are Unix seconds, 0 = never)."""

    first_seen: float = 0.0
    last_ok: float = 0.0
    last_fail: float = 0.0
    last_error: str = ""
    revoked: bool = False
    revoked_message: str = ""
    renewed_token: str = ""  # updated terms the license server delivered at a check-in

    @classmethod
    def from_hash(cls, raw: Mapping[Any, Any]) -> SharedState:
        data = {as_text(k): as_text(v) for k, v in raw.items()}

        def num(name: str) -> float:
            try:
                return float(data.get(name) or 0.0)
            except ValueError:
                return 0.0

        return cls(
            first_seen=num("first_seen"),
            last_ok=num("last_ok"),
            last_fail=num("last_fail"),
            last_error=data.get("last_error", ""),
            revoked=data.get("revoked") == "1",
            revoked_message=data.get("revoked_message", ""),
            renewed_token=data.get("renewed_token", ""),
        )


@dataclass
class UsageCounts:
    pending: int = 0
    sent: int = 0
    dropped: int = 0


class UpstreamError(Exception):
    """A call to the upstream failed; ``reason`` is a short word safe to log and to show."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LicenseProxy:
    """Owns the license, its state, the check-in loop, the usage uploader and the reload watcher."""

    def __init__(self, settings: ProxySettings, redis: Redis, *, key_prefix: str = "ks") -> None:
        self.settings = settings
        self.redis = redis
        self.keys = LicenseKeys(key_prefix)
        self.instance_id = settings.instance_id or f"{socket.gethostname()}-{os.getpid()}"
        self.token: str | None = None
        self.claims: LicenseClaims | None = None
        self.token_error: TokenError | None = None
        self.shared = SharedState()
        self.store_ok = True
        self.usage = UsageCounts()
        self.last_upload_error: str | None = None
        self._public_key: Ed25519PublicKey | None = None
        self._file_mtimes: dict[Path, float] = {}
        self._http = httpx.AsyncClient(timeout=settings.upstream_timeout_s)
        self._tasks: list[asyncio.Task[None]] = []
        self._wake_checkin = asyncio.Event()
        self._wake_verdict = asyncio.Event()
        self._reload_requested = False
        self._closing = False
        self._last_logged_state: str | None = None
        self.registry = CollectorRegistry()
        self._g_valid = Gauge(
            "kubespeech_license_valid", "1 if requests may be served.", registry=self.registry
        )
        self._g_state = Gauge(
            "kubespeech_license_state", "1 for the current state.", ["state"], registry=self.registry
        )
        self._g_grace = Gauge(
            "kubespeech_license_grace_seconds_remaining",
            "Seconds of grace left (0 unless in grace).",
            registry=self.registry,
        )
        self._g_expiry = Gauge(
            "kubespeech_license_expiry_timestamp_seconds", "When the license expires.", registry=self.registry
        )
        self._g_pending = Gauge(
            "kubespeech_license_usage_events_pending",
            "Usage events buffered in Redis.",
            registry=self.registry,
        )
        self._g_sent = Gauge(
            "kubespeech_license_usage_events_sent",
            "Usage events acknowledged upstream.",
            registry=self.registry,
        )
        self._g_dropped = Gauge(
            "kubespeech_license_usage_events_dropped",
            "Usage events lost to the buffer bound.",
            registry=self.registry,
        )
        self._c_checkins = Counter(
            "kubespeech_license_checkins", "Check-ins by outcome.", ["outcome"], registry=self.registry
        )

    # -- configuration -----------------------------------------------------------------------

    def _watched_files(self) -> list[Path]:
        return [p for p in (self.settings.key_file, self.settings.public_key_file) if p is not None]

    def load(self) -> None:
        """(Re)read the license key and public key and verify the signature; never raises."""
        s = self.settings
        self._file_mtimes = {}
        for path in self._watched_files():
            with contextlib.suppress(OSError):
                self._file_mtimes[path] = path.stat().st_mtime
        previous = self.claims
        try:
            token, public_key = self._read_config()
            claims = verify_signature(token, public_key)
            if key_id(public_key) == dev_keys.DEV_KEY_ID and not (s.dev or s.allow_dev_key):
                raise TokenError(
                    "dev_key_not_allowed",
                    "The license is signed with the public development key, which production refuses "
                    "(set KUBESPEECH_LICENSE_ALLOW_DEV_KEY=true only for testing).",
                )
        except TokenError as exc:
            self.claims, self.token_error = None, exc
            log.error("license key rejected", extra={"reason": exc.reason})
            return
        changed = token != self.token
        if previous is None or previous.lid != claims.lid:
            self.shared = SharedState()  # the check-in history belongs to one license
        self.token, self.claims, self.token_error, self._public_key = token, claims, None, public_key
        if changed:
            log.info(
                "license key loaded",
                extra={
                    "license_id": claims.lid,
                    "fingerprint": token_fingerprint(token),
                    "expires_at": iso(claims.exp),
                    "checkin_mode": claims.checkin.mode,
                },
            )
            self._wake_checkin.set()

    def _read_config(self) -> tuple[str, Ed25519PublicKey]:
        s = self.settings
        token: str | None = None
        if s.key is not None:
            token = s.key.get_secret_value()
        elif s.key_file is not None:
            try:
                token = s.key_file.read_text()
            except OSError as exc:
                raise TokenError(
                    "no_license", f"The license key file cannot be read ({exc.strerror})."
                ) from exc
        elif s.dev:
            token = dev_keys.dev_license()
        if not token or not token.strip():
            raise TokenError("no_license", "No license key is configured.")
        try:
            if s.dev and s.public_key is None and s.public_key_file is None:
                public_key = dev_keys.dev_public_key()
            elif s.public_key is not None:
                public_key = load_public_key(s.public_key)
            elif s.public_key_file is not None:
                public_key = load_public_key(s.public_key_file)
            elif BAKED_PUBLIC_KEY.exists():
                public_key = load_public_key(BAKED_PUBLIC_KEY)
            else:
                raise TokenError("no_public_key", "No vendor public key is configured.")
        except (OSError, ValueError) as exc:
            raise TokenError("no_public_key", "The vendor public key cannot be read.") from exc
        return token.strip(), public_key

    def _consider_renewal(self, token: str) -> bool:
        """Adopt updated terms from the license server: same license, validly signed, issued later."""
        current = self.claims
        if current is None or self._public_key is None or token.strip() == self.token:
            return False
        try:
            claims = verify_signature(token, self._public_key)
        except TokenError as exc:
            log.warning("license server sent an unusable license key; ignored", extra={"reason": exc.reason})
            return False
        if claims.lid != current.lid or claims.iat <= current.iat:
            return False
        self.token, self.claims = token.strip(), claims
        log.info(
            "license terms updated by the license server",
            extra={
                "license_id": claims.lid,
                "fingerprint": token_fingerprint(token),
                "expires_at": iso(claims.exp),
            },
        )
        return True

    def request_reload(self) -> None:
        """Called from a SIGHUP handler: reload at the next watcher tick (soon, not in the handler)."""
        self._reload_requested = True

    def _files_changed(self) -> bool:
        for path in self._watched_files():
            try:
                mtime = path.stat().st_mtime
            except OSError:
                mtime = -1.0
            if self._file_mtimes.get(path) != mtime:
                return True
        return False

    async def _watch_files(self) -> None:
        poll = self.settings.reload_poll_s
        next_poll = time.monotonic() + poll
        while not self._closing:
            # Short sleeps so a SIGHUP is acted on promptly; the files are only stat()ed every poll.
            await asyncio.sleep(min(poll, 0.5))
            now = time.monotonic()
            due = now >= next_poll
            if due:
                next_poll = now + poll
            if self._reload_requested or (due and self._files_changed()):
                self._reload_requested = False
                log.info("reloading the license configuration")
                self.load()
                self._wake_verdict.set()

    # -- shared state ------------------------------------------------------------------------

    async def _pull_shared(self) -> None:
        claims = self.claims
        if claims is None:
            return
        try:
            raw = await self.redis.hgetall(self.keys.state(claims.lid))
        except (RedisError, OSError):
            self._set_store_ok(False)
            return
        self._set_store_ok(True)
        stored = SharedState.from_hash(raw)
        mine = self.shared
        # Keep whichever is newer: this replica may have learnt something while Redis was down.
        # first_seen is written once (HSETNX) so replicas racing at first start end up with one value.
        first_seen = stored.first_seen or mine.first_seen or round(time.time(), 3)
        if not stored.first_seen:
            with contextlib.suppress(RedisError, OSError):
                key = self.keys.state(claims.lid)
                await self.redis.hsetnx(key, "first_seen", f"{first_seen:.3f}")
                first_seen = float(await self.redis.hget(key, "first_seen") or first_seen)
        newer_ok = stored.last_ok >= mine.last_ok
        self.shared = SharedState(
            first_seen=first_seen,
            last_ok=max(stored.last_ok, mine.last_ok),
            last_fail=max(stored.last_fail, mine.last_fail),
            last_error=stored.last_error if stored.last_fail >= mine.last_fail else mine.last_error,
            revoked=stored.revoked if newer_ok else mine.revoked,
            revoked_message=stored.revoked_message if newer_ok else mine.revoked_message,
            renewed_token=stored.renewed_token or mine.renewed_token,
        )
        if self.shared.renewed_token:
            self._consider_renewal(self.shared.renewed_token)

    def _set_store_ok(self, ok: bool) -> None:
        if ok != self.store_ok:
            if ok:
                log.info("Redis reachable again; license state shared")
            else:
                log.warning("Redis unreachable; answering from this replica's license state")
        self.store_ok = ok

    async def _record_checkin(self, ok: bool, *, now: float, revoked: bool = False, detail: str = "") -> None:
        if self.claims is None:
            return
        now = round(now, 3)  # what Redis stores, so replicas and restarts compute identical deadlines
        if ok:
            self.shared.last_ok = max(self.shared.last_ok, now)
            self.shared.revoked, self.shared.revoked_message = revoked, detail
        else:
            if now > self.shared.last_fail:
                self.shared.last_fail, self.shared.last_error = now, detail
        args = ["ok", f"{now:.3f}", "1" if revoked else "0", detail] if ok else ["fail", f"{now:.3f}", detail]
        try:
            await self.redis.eval(_RECORD_LUA, 1, self.keys.state(self.claims.lid), *args)
            self._set_store_ok(True)
        except (RedisError, OSError):
            self._set_store_ok(False)

    # -- the answer --------------------------------------------------------------------------

    def grace_seconds(self) -> float:
        """How long service continues without a successful check-in, for this license and settings."""
        assert self.claims is not None
        s = self.settings
        if self.claims.checkin.mode == "online":
            # Online-required licenses tolerate only a missed check-in or two.
            grace = 2 * s.checkin_interval_s + s.upstream_timeout_s
        else:
            grace = self.claims.checkin.grace_hours * 3600.0
        if s.grace_hours is not None:
            grace = min(grace, s.grace_hours * 3600.0)
        return grace

    def upstream_url(self) -> str | None:
        url = self.settings.upstream_url or (self.claims.upstream if self.claims else None)
        return url.rstrip("/") if url else None

    def evaluate(self, now: float | None = None) -> dict[str, Any]:
        """The ``GET /v1/license`` answer from the loaded license and the shared state (no I/O)."""
        t = time.time() if now is None else now
        answer: dict[str, Any] = {"checked_at": iso(t), "store": "ok" if self.store_ok else "unavailable"}
        if self.claims is None:
            err = self.token_error or TokenError("no_license", "No license key is configured.")
            answer.update(state="invalid", reason=err.reason, message=err.message, usable=False)
            return self._note(answer)
        c = self.claims
        answer.update(
            license_id=c.lid,
            customer=c.customer,
            issued_at=iso(c.iat),
            not_before=iso(c.nbf),
            expires_at=iso(c.exp),
            expires_at_unix=c.exp,
            features=list(c.features),
            limits=c.limits.model_dump(),
            checkin={
                "mode": c.checkin.mode,
                "grace_hours": self.grace_seconds() / 3600.0 if c.checkin.mode != "offline" else None,
                "last_ok": iso(self.shared.last_ok or None),
                "last_failure": iso(self.shared.last_fail or None),
                "last_error": self.shared.last_error or None,
            },
            grace_deadline=None,
            grace_deadline_unix=None,
            grace_seconds_remaining=None,
            # Until when a cached copy of this answer may be acted on (the API gate's fallback).
            serve_until_unix=c.exp + self.settings.clock_skew_s,
            dev=c.kid == dev_keys.DEV_KEY_ID,
        )
        try:
            check_times(c, now=t, skew_s=self.settings.clock_skew_s)
        except TokenError as exc:
            state = "expired" if exc.reason == "expired" else "invalid"
            answer.update(state=state, reason=exc.reason, message=exc.message, usable=False)
            return self._note(answer)
        if self.shared.revoked:
            answer.update(
                state="invalid",
                reason="revoked",
                message="The license has been revoked by the vendor."
                + (f" {self.shared.revoked_message}" if self.shared.revoked_message else ""),
                usable=False,
            )
            return self._note(answer)
        if c.checkin.mode == "offline":
            answer.update(state="valid", reason=None, message="The license is valid (offline).", usable=True)
            return self._note(answer)
        grace = self.grace_seconds()
        anchor = self.shared.last_ok or self.shared.first_seen or t
        deadline = min(anchor + grace, float(c.exp))
        answer["serve_until_unix"] = min(anchor + grace, c.exp + self.settings.clock_skew_s)
        # Valid while the latest check-in (by any replica) succeeded and is recent enough; a replica that
        # restarts after a long outage must not trust an old success.
        recent = self.shared.last_ok and t - self.shared.last_ok <= 2 * self.settings.checkin_interval_s + (
            self.settings.upstream_timeout_s
        )
        if recent and self.shared.last_ok >= self.shared.last_fail:
            answer.update(state="valid", reason=None, message="The license is valid.", usable=True)
            return self._note(answer)
        answer.update(grace_deadline=iso(deadline), grace_deadline_unix=deadline)
        if t < deadline:
            remaining = deadline - t
            answer.update(
                state="grace",
                reason=self.shared.last_error or "checkin_pending",
                message=f"The license server cannot be reached; service continues until {iso(deadline)}.",
                grace_seconds_remaining=round(remaining, 3),
                usable=True,
            )
            return self._note(answer)
        answer.update(
            state="expired",
            reason="grace_expired",
            message=f"The license could not be confirmed with the license server since {iso(anchor)}; "
            f"the grace period ended at {iso(deadline)}.",
            grace_seconds_remaining=0.0,
            usable=False,
        )
        return self._note(answer)

    def _note(self, answer: dict[str, Any]) -> dict[str, Any]:
        state = answer["state"]
        if state != self._last_logged_state:
            extra = {"state": state, "reason": answer.get("reason")}
            if state == "valid":
                log.info("license state: valid", extra=extra)
            elif state == "grace":
                log.warning(
                    "license state: grace (license server unreachable)",
                    extra={**extra, "grace_deadline": answer.get("grace_deadline")},
                )
            else:
                log.error("license state: %s; requests are refused", state, extra=extra)
            self._last_logged_state = state
        self._g_valid.set(1 if answer.get("usable") else 0)
        for name in ("valid", "grace", "expired", "invalid"):
            self._g_state.labels(name).set(1 if name == state else 0)
        self._g_grace.set(answer.get("grace_seconds_remaining") or 0.0)
        if answer.get("expires_at_unix"):
            self._g_expiry.set(answer["expires_at_unix"])
        return answer

    async def snapshot(self) -> dict[str, Any]:
        await self._pull_shared()
        claims = self.claims  # a reload may swap it while this awaits Redis
        answer = self.evaluate()
        if answer.get("usable") and claims is not None:
            await self._add_daily_usage(answer, claims)
        return answer

    async def _add_daily_usage(self, answer: dict[str, Any], claims: LicenseClaims) -> None:
        try:
            raw = await self.redis.get(self.keys.audio_seconds_day())
        except (RedisError, OSError):
            return
        used_h = float(raw or 0.0) / 3600.0
        answer["usage_today"] = {"audio_hours": round(used_h, 4)}
        limit = claims.limits.audio_hours_per_day
        answer["limits_exceeded"] = {}
        if limit is not None and used_h >= limit:
            answer["limits_exceeded"]["audio_hours_per_day"] = {
                "used": round(used_h, 4),
                "retry_after": round(seconds_until_utc_midnight(), 1),
            }

    # -- check-ins ---------------------------------------------------------------------------

    async def checkin_once(self) -> bool:
        """One check-in with the upstream; records the outcome in the shared state. True on contact."""
        if self.claims is None or self.token is None or self.claims.checkin.mode == "offline":
            return True
        lid = self.claims.lid  # a reload may swap the claims while this awaits the upstream
        now = time.time()
        url = self.upstream_url()
        try:
            if url is None:
                raise UpstreamError("no_upstream")
            data = await self._post(
                f"{url}/v1/checkin",
                {"license_id": lid, "instance": self.instance_id, "proxy_version": VERSION},
            )
            status = data.get("status")
            if status not in ("active", "revoked"):
                raise UpstreamError("bad_response")
        except UpstreamError as exc:
            self._c_checkins.labels("failure").inc()
            await self._record_checkin(False, now=now, detail=exc.reason)
            log.warning(
                "license check-in failed",
                extra={"reason": exc.reason, "grace_deadline": self.evaluate(now).get("grace_deadline")},
            )
            return False
        renewed = data.get("token")
        if isinstance(renewed, str) and self._consider_renewal(renewed):
            self.shared.renewed_token = renewed
            with contextlib.suppress(RedisError, OSError):
                await self.redis.hset(self.keys.state(lid), "renewed_token", renewed)
        revoked = status == "revoked"
        message = str(data.get("message") or "")[:200]
        self._c_checkins.labels("revoked" if revoked else "ok").inc()
        await self._record_checkin(True, now=now, revoked=revoked, detail=message)
        return True

    async def _post(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        assert self.token is not None
        try:
            resp = await self._http.post(url, json=body, headers={"Authorization": f"Bearer {self.token}"})
        except httpx.TimeoutException as exc:
            raise UpstreamError("timeout") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError("unreachable") from exc
        if resp.status_code >= 300:
            raise UpstreamError(f"http_{resp.status_code}")
        try:
            data = resp.json()
        except ValueError as exc:
            raise UpstreamError("bad_response") from exc
        if not isinstance(data, dict):
            raise UpstreamError("bad_response")
        return data

    async def _checkin_loop(self) -> None:
        interval = self.settings.checkin_interval_s
        while not self._closing:
            ok = await self.checkin_once()
            self._wake_verdict.set()  # a check-in can revoke, reinstate or renew the license
            # After a failure retry sooner, so service leaves grace soon after the upstream returns.
            delay = interval if ok else min(interval, max(1.0, interval / 4))
            self._wake_checkin.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_checkin.wait(), delay)

    # -- the verdict the operator reads ------------------------------------------------------

    async def publish_verdict(self) -> LicenseVerdict:
        """Evaluate the license (with the replicas' shared state) and publish the verdict to Redis."""
        await self._pull_shared()
        verdict = LicenseVerdict.from_answer(self.evaluate())
        try:
            await write_verdict(self.redis, self.keys.prefix, verdict, ttl_s=VERDICT_TTL_S)
        except (RedisError, OSError):
            self._set_store_ok(False)
        return verdict

    async def _verdict_loop(self) -> None:
        # Also on a timer: expiry and the end of grace happen without any event to wake this loop.
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_verdict.wait(), VERDICT_INTERVAL_S)
            self._wake_verdict.clear()  # after the wait, so a wake during the publish below is not lost
            if not self._closing:
                await self.publish_verdict()

    # -- usage -------------------------------------------------------------------------------

    async def usage_counts(self) -> UsageCounts:
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xlen(self.keys.usage_stream)
                pipe.get(self.keys.usage_added)
                pipe.get(self.keys.usage_sent)
                pending, added, sent = await pipe.execute()
        except (RedisError, OSError):
            return self.usage
        pending, added, sent = int(pending), int(added or 0), int(sent or 0)
        self.usage = UsageCounts(pending=pending, sent=sent, dropped=max(0, added - sent - pending))
        return self.usage

    async def upload_usage_once(self) -> int:
        """Send one batch upstream; returns the events acknowledged (raises UpstreamError on failure)."""
        claims = self.claims
        url = self.upstream_url()
        if claims is None or url is None:
            raise UpstreamError("no_upstream")
        stream = self.keys.usage_stream
        await self.redis.xtrim(stream, maxlen=self.settings.usage_max_events, approximate=False)
        entries = await self.redis.xrange(stream, count=self.settings.usage_batch_size) or []
        if not entries:
            return 0
        ids = [as_text(entry_id) for entry_id, _ in entries]
        events = [e for e in (decode_event(fields) for _, fields in entries) if e is not None]
        sent = 0
        if events:
            try:
                data = await self._post(f"{url}/v1/usage", {"license_id": claims.lid, "events": events})
                if not isinstance(data.get("accepted"), int):
                    raise UpstreamError("bad_response")
                sent = len(events)
            except UpstreamError as exc:
                if exc.reason not in ("http_400", "http_413", "http_422"):
                    raise
                # The upstream will never take this batch; retrying would block all later usage.
                log.error("usage batch refused by the upstream; dropped", extra={"reason": exc.reason})
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xdel(stream, *ids)
            if sent:
                pipe.incrby(self.keys.usage_sent, sent)
            await pipe.execute()
        return len(ids)

    async def _usage_loop(self) -> None:
        s = self.settings
        failures = 0
        while not self._closing:
            delay = s.usage_interval_s
            try:
                if (
                    self.claims is not None
                    and self.claims.checkin.mode != "offline"
                    and await self._hold_lock()
                ):
                    n = await self.upload_usage_once()
                    if failures:
                        log.info("usage upload recovered", extra={"after_failures": failures})
                    failures, self.last_upload_error = 0, None
                    if n >= s.usage_batch_size:
                        delay = 0.0
            except UpstreamError as exc:
                failures += 1
                self.last_upload_error = exc.reason
                delay = min(s.usage_backoff_max_s, min(1.0, s.usage_interval_s) * 2 ** min(failures, 20))
                delay *= random.uniform(0.5, 1.0)
                log.warning(
                    "usage upload failed", extra={"reason": exc.reason, "retry_in_s": round(delay, 2)}
                )
            except (RedisError, OSError):
                self._set_store_ok(False)
            await self.usage_counts()
            await asyncio.sleep(delay)

    async def _hold_lock(self) -> bool:
        ttl_ms = int(1000 * (3 * self.settings.usage_interval_s + 2 * self.settings.upstream_timeout_s))
        held = await self.redis.eval(_LOCK_LUA, 1, self.keys.usage_sender_lock, self.instance_id, ttl_ms)
        return bool(held)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self.load()
        await self._pull_shared()
        if self.claims is not None and self.claims.checkin.mode != "offline":
            # Answer correctly from the first request: one check-in before serving (bounded by its timeout).
            await self.checkin_once()
        await self.publish_verdict()
        self._tasks = [
            asyncio.create_task(self._checkin_loop(), name="license-checkin"),
            asyncio.create_task(self._verdict_loop(), name="license-verdict"),
            asyncio.create_task(self._usage_loop(), name="license-usage"),
            asyncio.create_task(self._watch_files(), name="license-reload"),
        ]

    async def aclose(self) -> None:
        # The flag ends the loops even if a client library swallows the cancellation (redis-py can,
        # when it lands mid-command).
        self._closing = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        self._tasks = []
        await self._http.aclose()

    async def metrics(self) -> bytes:
        await self.snapshot()
        counts = await self.usage_counts()
        self._g_pending.set(counts.pending)
        self._g_sent.set(counts.sent)
        self._g_dropped.set(counts.dropped)
        return generate_latest(self.registry)


def create_proxy_app(
    settings: ProxySettings,
    redis: Redis,
    *,
    key_prefix: str = "ks",
    close_redis: bool = False,
    handle_sighup: bool = False,
) -> FastAPI:
    """The proxy's HTTP app; its lifespan starts and stops the :class:`LicenseProxy`.

    ``handle_sighup`` (the CLI sets it) makes SIGHUP reload the license key and public key files.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        proxy = LicenseProxy(settings, redis, key_prefix=key_prefix)
        app.state.proxy = proxy
        await proxy.start()
        if handle_sighup and hasattr(signal, "SIGHUP"):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, proxy.request_reload)
        try:
            yield
        finally:
            if handle_sighup and hasattr(signal, "SIGHUP"):
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            await proxy.aclose()
            if close_redis:
                await redis.aclose()

    app = FastAPI(title="kubespeech license proxy", lifespan=lifespan, docs_url=None, redoc_url=None)

    def proxy_of(request: Request) -> LicenseProxy:
        return request.app.state.proxy

    @app.get("/v1/license")
    async def license_state(request: Request) -> JSONResponse:
        return JSONResponse(await proxy_of(request).snapshot())

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        proxy = proxy_of(request)
        answer = proxy.evaluate()
        return JSONResponse({"status": "ok", "license": answer["state"], "store": answer["store"]})

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        # Readiness is the license's usability: an expired or revoked license takes the proxy out of
        # its Service. No Redis round trip here; the loops keep the shared state current.
        answer = proxy_of(request).evaluate()
        usable = bool(answer.get("usable"))
        body = {
            "ready": usable,
            "license": verdict_state(answer["state"], answer.get("reason")),
            "message": answer.get("message") or "",
        }
        return JSONResponse(body, status_code=200 if usable else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(await proxy_of(request).metrics(), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error", extra={"path": request.url.path, "error": type(exc).__name__})
        return JSONResponse({"code": "INTERNAL_ERROR", "message": "Internal error."}, status_code=500)

    return app
