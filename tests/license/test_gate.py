"""LicenseGate (the API's enforcement point) against a real license proxy: cache, grace fallback, each error."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.asyncio import Redis

from kubespeech.errors import KubespeechError
from kubespeech.license.errors import (
    FeatureNotLicensedError,
    InvalidLicenseError,
    LicenseExpiredError,
    LicenseLimitExceededError,
    LicenseUnavailableError,
)
from kubespeech.license.gate import LicenseGate
from kubespeech.license.usage import UsageRecorder
from tests.conftest import free_port
from tests.license.conftest import StartProxy, Upstream, Vendor

pytestmark = pytest.mark.timeout(60)


async def test_no_proxy_allows_everything() -> None:
    gate = LicenseGate(None)
    for feature in ("asr", "tts", "streaming"):
        await gate.check(feature)
    async with await gate.acquire_stream():
        pass
    assert (await gate.state())["usable"] is True
    await gate.aclose()


async def test_valid_license_and_feature_check(vendor: Vendor, start_proxy: StartProxy) -> None:
    p = await start_proxy(vendor.token(mode="offline", features=["asr"]))
    gate = LicenseGate(p.url)
    try:
        await gate.check("asr")
        with pytest.raises(FeatureNotLicensedError) as info:
            await gate.check("tts")
        err = info.value
        assert (err.code, err.http_status) == ("FEATURE_NOT_LICENSED", 403)
        assert err.details["feature"] == "tts" and err.details["licensed"] == ["asr"]
        state = await gate.state()
        assert state["usable"] is True and state["state"] == "valid" and state["source"] == "proxy"
    finally:
        await gate.aclose()


async def test_invalid_and_expired_licenses_map_to_their_codes(
    vendor: Vendor, start_proxy: StartProxy
) -> None:
    token = vendor.token(mode="offline")
    tampered = token[:-10] + ("A" if token[-10] != "A" else "B") + token[-9:]
    bad = await start_proxy(tampered)
    expired = await start_proxy(vendor.token(mode="offline", now=time.time() - 7200, expires_in=3600))
    gates = [LicenseGate(bad.url), LicenseGate(expired.url)]
    try:
        with pytest.raises(InvalidLicenseError) as info:
            await gates[0].check("asr")
        assert (info.value.code, info.value.http_status) == ("INVALID_LICENSE", 401)
        assert info.value.details["reason"] == "bad_signature"
        with pytest.raises(LicenseExpiredError) as exp_info:
            await gates[1].check("asr")
        assert (exp_info.value.code, exp_info.value.http_status) == ("LICENSE_EXPIRED", 403)
        assert exp_info.value.details["expires_at"].endswith("Z")
        # The error survives the worker/API serialisation with its class and details.
        again = KubespeechError.from_dict(exp_info.value.to_dict())
        assert isinstance(again, LicenseExpiredError) and again.details["expires_at"]
        assert (await gates[0].state())["usable"] is False
    finally:
        for g in gates:
            await g.aclose()


async def test_answers_are_cached_for_the_ttl(vendor: Vendor, start_proxy: StartProxy) -> None:
    p = await start_proxy(vendor.token(mode="offline"))
    hits = {"n": 0}
    original = p.proxy.snapshot

    async def counted() -> dict[str, object]:
        hits["n"] += 1
        return await original()

    p.proxy.snapshot = counted  # type: ignore[method-assign]
    gate = LicenseGate(p.url, cache_ttl_s=0.3)
    try:
        for _ in range(20):
            await gate.check("asr")
        assert hits["n"] == 1
        await asyncio.sleep(0.35)
        await gate.check("asr")
        assert hits["n"] == 2
    finally:
        await gate.aclose()


async def test_an_answer_that_outlives_its_serve_until_is_fetched_again_not_refused(
    vendor: Vendor, upstream: Upstream, start_proxy: StartProxy
) -> None:
    """A grace period shorter than the gate's cache TTL: the proxy keeps checking in, so every answer it
    gives is valid, but each is only good for the grace period; the gate must ask again, not refuse."""
    grace_s = 0.6
    p = await start_proxy(vendor.token(upstream=upstream.url), grace_hours=grace_s / 3600)
    hits = {"n": 0}
    original = p.proxy.snapshot

    async def counted() -> dict[str, object]:
        hits["n"] += 1
        return await original()

    p.proxy.snapshot = counted  # type: ignore[method-assign]
    gate = LicenseGate(p.url, cache_ttl_s=30.0, timeout_s=1.0)
    try:
        until = time.monotonic() + 3 * grace_s
        while time.monotonic() < until:
            await gate.check("asr")  # raised LicenseExpiredError once the first answer outlived its grace
            await asyncio.sleep(0.05)
        assert 2 <= hits["n"] <= 20  # fetched again as answers ran out, not on every request
    finally:
        await gate.aclose()


async def test_proxy_unreachable_serves_cached_state_until_the_grace_deadline(
    vendor: Vendor, upstream: Upstream, start_proxy: StartProxy
) -> None:
    grace_s = 1.5
    p = await start_proxy(vendor.token(upstream=upstream.url), grace_hours=grace_s / 3600)
    gate = LicenseGate(p.url, cache_ttl_s=0.1, timeout_s=0.3)
    try:
        await gate.check("asr")
        await p.stop()  # proxy gone (and with it, check-ins)
        await asyncio.sleep(0.15)
        await gate.check("asr")  # cached valid answer, deadline not reached
        state = await gate.state()
        assert state["source"] == "cache" and state["usable"] is True
        await asyncio.sleep(grace_s)
        with pytest.raises(LicenseExpiredError) as info:
            await gate.check("asr")
        assert info.value.details["reason"] == "grace_expired"
        await p.restart()  # proxy back, upstream reachable: the gate recovers on its own
        deadline = time.monotonic() + 3
        while True:
            try:
                await gate.check("asr")
                break
            except LicenseExpiredError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
    finally:
        await gate.aclose()


async def test_proxy_never_reached_is_503() -> None:
    gate = LicenseGate(f"http://127.0.0.1:{free_port()}", cache_ttl_s=0.2, timeout_s=0.3)
    try:
        with pytest.raises(LicenseUnavailableError) as info:
            await gate.check("asr")
        assert (info.value.code, info.value.http_status) == ("LICENSE_UNAVAILABLE", 503)
        assert info.value.retry_after == 0.2
    finally:
        await gate.aclose()


async def test_concurrent_stream_limit_is_cluster_wide(
    vendor: Vendor, start_proxy: StartProxy, redis_client: Redis, prefix: str
) -> None:
    p = await start_proxy(vendor.token(mode="offline", limits={"max_concurrent_streams": 2}))
    # Two API replicas sharing Redis share the limit.
    a = LicenseGate(p.url, redis=redis_client, key_prefix=prefix, stream_lease_ttl_s=0.6)
    b = LicenseGate(p.url, redis=redis_client, key_prefix=prefix, stream_lease_ttl_s=0.6)
    try:
        first = await a.acquire_stream()
        await b.acquire_stream()
        with pytest.raises(LicenseLimitExceededError) as info:
            await a.acquire_stream()
        assert (info.value.code, info.value.http_status) == ("LICENSE_LIMIT_EXCEEDED", 429)
        assert info.value.retry_after and info.value.details["limit"] == "max_concurrent_streams"
        await first.release()
        third = await b.acquire_stream()
        # Leases are renewed while held: after several TTLs the slots are still taken.
        await asyncio.sleep(1.0)
        with pytest.raises(LicenseLimitExceededError):
            await a.acquire_stream()
        await third.release()
        await a.acquire_stream()
    finally:
        await a.aclose()
        await b.aclose()


async def test_streaming_needs_the_streaming_feature(vendor: Vendor, start_proxy: StartProxy) -> None:
    p = await start_proxy(vendor.token(mode="offline", features=["asr"]))
    gate = LicenseGate(p.url)
    try:
        with pytest.raises(FeatureNotLicensedError):
            await gate.acquire_stream()
    finally:
        await gate.aclose()


async def test_daily_audio_limit_is_429_until_midnight(
    vendor: Vendor, start_proxy: StartProxy, redis_client: Redis, prefix: str
) -> None:
    p = await start_proxy(vendor.token(mode="offline", limits={"audio_hours_per_day": 0.001}))
    gate = LicenseGate(p.url, cache_ttl_s=0.05)
    try:
        await gate.check("asr")
        await UsageRecorder(redis_client, prefix).record(
            feature="asr", model="m", audio_seconds=4.0, characters=0, status_code=200
        )
        await asyncio.sleep(0.1)
        with pytest.raises(LicenseLimitExceededError) as info:
            await gate.check("tts")
        assert 0 < (info.value.retry_after or 0) <= 86400
        assert info.value.details["limit"] == "audio_hours_per_day"
    finally:
        await gate.aclose()


async def test_revoked_license_is_invalid_at_the_gate(
    vendor: Vendor, upstream: Upstream, start_proxy: StartProxy
) -> None:
    p = await start_proxy(vendor.token(upstream=upstream.url, license_id="lic_gate_revoked"))
    gate = LicenseGate(p.url, cache_ttl_s=0.05)
    try:
        await gate.check("asr")
        await upstream.revoke("lic_gate_revoked")
        deadline = time.monotonic() + 5
        while True:
            try:
                await gate.check("asr")
            except InvalidLicenseError as exc:
                assert exc.details["reason"] == "revoked"
                break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        await gate.aclose()


async def test_cached_answer_is_not_used_past_the_license_expiry(
    vendor: Vendor, start_proxy: StartProxy
) -> None:
    p = await start_proxy(vendor.token(mode="offline", expires_in=2.5), clock_skew_s=0)
    gate = LicenseGate(p.url, cache_ttl_s=0.1, timeout_s=0.3)
    try:
        await gate.check("asr")
        exp = (await p.license())["expires_at_unix"]
        await p.stop()
        await asyncio.sleep(max(0.0, exp - time.time()) + 0.05)
        with pytest.raises(LicenseExpiredError) as info:
            await gate.check("asr")
        assert info.value.details["reason"] == "expired"
    finally:
        await gate.aclose()


async def test_stream_limit_fails_open_when_redis_is_down(vendor: Vendor, start_proxy: StartProxy) -> None:
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    p = await start_proxy(vendor.token(mode="offline", limits={"max_concurrent_streams": 1}))
    dead = Redis(port=free_port(), socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    gate = LicenseGate(p.url, redis=dead)
    try:
        # Redis down takes the API down anyway; licensing does not add a second refusal on top.
        leases = [await gate.acquire_stream(), await gate.acquire_stream()]
        for lease in leases:
            await lease.release()
    finally:
        await gate.aclose()
        await dead.aclose()
