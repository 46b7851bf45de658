"""The proxy's readiness and its verdict in Redis (what the operator's LicenseValid reads), over real HTTP."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from kubespeech.license.keys import LicenseKeys
from kubespeech.license.verdict import VERDICT_TTL_S, LicenseVerdict, read_verdict, write_verdict
from tests.conftest import free_port
from tests.license.conftest import ProxyHandle, StartProxy, Upstream, Vendor, eventually

pytestmark = pytest.mark.timeout(60)


async def _ready(p: ProxyHandle) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient() as c:
        r = await c.get(f"{p.url}/ready")
        return r.status_code, dict(r.json())


async def _raw_verdict(p: ProxyHandle) -> dict[str, str]:
    raw: dict[Any, Any] = await p.redis.hgetall(LicenseKeys(p.prefix).verdict)
    return {k.decode(): v.decode() for k, v in raw.items()}


async def test_valid_license_is_ready_and_publishes_a_usable_verdict_with_a_ttl(
    vendor: Vendor, start_proxy: StartProxy
) -> None:
    token = vendor.token(mode="offline", license_id="lic_ready", expires_in=3600)
    p = await start_proxy(token)
    status, body = await _ready(p)
    assert status == 200
    assert body == {"ready": True, "license": "valid", "message": "The license is valid (offline)."}
    raw = await _raw_verdict(p)
    assert raw["state"] == "valid" and raw["usable"] == "1" and raw["license_id"] == "lic_ready"
    assert abs(float(raw["updated_at_unix"]) - time.time()) < 10
    assert token not in str(raw) and token not in str(body)
    ttl_ms = await p.redis.pttl(LicenseKeys(p.prefix).verdict)
    assert 0 < ttl_ms <= VERDICT_TTL_S * 1000
    verdict = await read_verdict(p.redis, p.prefix)
    assert verdict is not None and verdict.usable and verdict.state == "valid"
    assert verdict.license_id == "lic_ready"
    assert p.proxy.claims is not None and verdict.expires_at_unix == float(p.proxy.claims.exp)
    # The liveness route stays 200 whatever the license says.
    async with httpx.AsyncClient() as c:
        assert (await c.get(f"{p.url}/health")).status_code == 200


async def test_expired_license_is_not_ready_and_the_verdict_says_expired(
    vendor: Vendor, start_proxy: StartProxy
) -> None:
    token = vendor.token(mode="offline", now=time.time() - 7200, expires_in=3600, license_id="lic_old")
    p = await start_proxy(token)
    status, body = await _ready(p)
    assert (status, body["ready"], body["license"]) == (503, False, "expired")
    assert "expired" in body["message"] and token not in str(body)
    raw = await _raw_verdict(p)
    assert (raw["state"], raw["usable"], raw["reason"]) == ("expired", "0", "expired")
    verdict = await read_verdict(p.redis, p.prefix)
    assert verdict is not None and (verdict.state, verdict.usable) == ("expired", False)
    assert verdict.license_id == "lic_old"
    # A liveness probe must not restart a proxy for a bad license; only readiness reflects it.
    async with httpx.AsyncClient() as c:
        assert (await c.get(f"{p.url}/health")).status_code == 200


@pytest.mark.parametrize("case", ["none_configured", "file_absent", "file_unreadable"])
async def test_missing_or_unreadable_license_is_not_ready(
    case: str, start_proxy: StartProxy, tmp_path: Path
) -> None:
    overrides: dict[str, Any] = {}
    if case == "file_absent":
        overrides["key_file"] = tmp_path / "nope.key"
    elif case == "file_unreadable":
        overrides["key_file"] = tmp_path  # a directory: read_text fails the way an unreadable file does
    p = await start_proxy(None, **overrides)
    status, body = await _ready(p)
    assert (status, body["ready"], body["license"]) == (503, False, "missing")
    assert body["message"]
    verdict = await read_verdict(p.redis, p.prefix)
    assert verdict is not None and (verdict.state, verdict.usable) == ("missing", False)
    assert verdict.license_id is None and verdict.expires_at_unix is None
    assert "license_id" not in await _raw_verdict(p)


async def test_other_invalid_keys_are_not_ready(vendor: Vendor, start_proxy: StartProxy) -> None:
    p = await start_proxy("this is not a license")
    status, body = await _ready(p)
    assert (status, body["license"]) == (503, "invalid")
    verdict = await read_verdict(p.redis, p.prefix)
    assert verdict is not None and (verdict.state, verdict.reason, verdict.usable) == (
        "invalid",
        "malformed",
        False,
    )


async def test_revocation_reaches_readiness_and_the_verdict_without_waiting_for_the_timer(
    vendor: Vendor, upstream: Upstream, start_proxy: StartProxy
) -> None:
    p = await start_proxy(vendor.token(upstream=upstream.url, license_id="lic_rv"))
    assert (await _ready(p))[0] == 200
    await upstream.revoke("lic_rv", "contract ended")
    # Well under the publish interval: the check-in itself triggers the publish.
    verdict = await eventually(
        lambda: read_verdict(p.redis, p.prefix), lambda v: v is not None and not v.usable, timeout=3
    )
    assert verdict.state == "revoked" and "contract ended" in verdict.message
    status, body = await _ready(p)
    assert (status, body["license"]) == (503, "revoked")
    await upstream.unrevoke("lic_rv")
    await eventually(lambda: read_verdict(p.redis, p.prefix), lambda v: v is not None and v.usable, timeout=3)
    assert (await _ready(p))[0] == 200


async def test_a_live_proxy_keeps_its_verdict_fresh_and_a_stopped_ones_expires(
    vendor: Vendor, upstream: Upstream, start_proxy: StartProxy
) -> None:
    p = await start_proxy(vendor.token(upstream=upstream.url))
    key = LicenseKeys(p.prefix).verdict
    await asyncio.sleep(1.0)
    assert await p.redis.pttl(key) > (VERDICT_TTL_S - 1.0) * 1000  # rewritten while alive
    await p.stop()
    first = await p.redis.pttl(key)
    await asyncio.sleep(1.0)
    second = await p.redis.pttl(key)
    assert 0 < second < first - 500, (first, second)  # nobody refreshes it: it will expire


async def test_readiness_needs_no_redis(vendor: Vendor, start_proxy: StartProxy) -> None:
    p = await start_proxy(vendor.token(mode="offline"), redis_url=f"redis://127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    status, body = await _ready(p)
    assert (status, body["license"]) == (200, "valid")
    assert time.monotonic() - started < 0.5


async def test_read_verdict_is_none_when_absent_and_round_trips(redis_client: Redis) -> None:
    assert await read_verdict(redis_client, "rv") is None
    written = LicenseVerdict(
        state="grace",
        usable=True,
        message="The license server cannot be reached.",
        updated_at_unix=1_700_000_000.5,
        reason="unreachable",
        license_id="lic_1",
        expires_at_unix=1_800_000_000.0,
    )
    await write_verdict(redis_client, "rv", written, ttl_s=7)
    assert await read_verdict(redis_client, "rv") == written
    assert 0 < await redis_client.pttl("rv:license:verdict") <= 7000
    # A rewrite without the optional fields drops the old ones rather than mixing two verdicts.
    bare = LicenseVerdict(state="missing", usable=False, message="No license.", updated_at_unix=1.0)
    await write_verdict(redis_client, "rv", bare)
    assert await read_verdict(redis_client, "rv") == bare
    assert await read_verdict(redis_client, "other") is None


@pytest.mark.parametrize(
    ("fields", "state"),
    [
        ({"state": "bogus", "usable": "1", "message": "x"}, "unknown"),
        ({"state": "valid", "usable": "yes"}, "valid"),
        ({"usable": "1"}, "unknown"),
        ({"state": b"\xff\xfe", "usable": b"\x00", "message": b"\xc3("}, "unknown"),
    ],
)
async def test_a_garbled_verdict_reads_as_not_usable_and_never_raises(
    redis_client: Redis, fields: dict[str, Any], state: str
) -> None:
    garbled: dict[Any, Any] = {
        **fields,
        "updated_at_unix": "nan",
        "expires_at_unix": "soon",
        "license_id": "",
    }
    await redis_client.hset("g:license:verdict", mapping=garbled)
    verdict = await read_verdict(redis_client, "g")
    assert verdict is not None
    assert (verdict.state, verdict.usable) == (state, False)
    assert verdict.updated_at_unix == 0.0 and verdict.expires_at_unix is None and verdict.license_id is None


async def test_the_verdict_carries_the_licenses_scaling_limits(
    vendor: Vendor, start_proxy: StartProxy
) -> None:
    """The operator's autoscaler clamps replicas to these; unlimited licenses carry none."""
    token = vendor.token(
        mode="offline", license_id="lic_limits", limits={"max_worker_replicas": 3, "max_gpus": 2}
    )
    p = await start_proxy(token)
    verdict = await eventually(lambda: read_verdict(p.redis, p.prefix), lambda v: v is not None)
    assert (verdict.max_worker_replicas, verdict.max_gpus) == (3, 2)
    raw = await _raw_verdict(p)
    assert (raw["max_worker_replicas"], raw["max_gpus"]) == ("3", "2")
    unlimited = LicenseVerdict.from_hash(
        {"state": "valid", "usable": "1", "max_gpus": "-1", "max_worker_replicas": "x"}
    )
    assert unlimited is not None and (unlimited.max_worker_replicas, unlimited.max_gpus) == (None, None)
