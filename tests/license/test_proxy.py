"""The license proxy over real HTTP with real Redis and the reference upstream: states, faults, grace."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from kubespeech.license import dev_keys
from kubespeech.license.token import generate_private_key
from tests.license.conftest import Served, StartProxy, Upstream, Vendor, eventually

pytestmark = pytest.mark.timeout(60)


def _tamper(token: str) -> str:
    i = len(token) // 2
    return token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1 :]


async def test_valid_online_license_reports_entitlements(
    vendor: Vendor, upstream: Upstream, start_proxy: StartProxy
) -> None:
    token = vendor.token(
        features=["asr", "tts"],
        limits={"max_concurrent_streams": 3, "max_worker_replicas": 8},
        upstream=upstream.url,
    )
    p = await start_proxy(token)
    answer = await p.license()
    assert answer["state"] == "valid" and answer["usable"] is True
    assert answer["features"] == ["asr", "tts"]
    assert answer["limits"]["max_concurrent_streams"] == 3 and answer["limits"]["max_worker_replicas"] == 8
    assert answer["checkin"]["mode"] == "grace" and answer["checkin"]["last_ok"] is not None
    assert answer["grace_seconds_remaining"] is None
    assert "/v1/checkin" in upstream.requests
    async with httpx.AsyncClient() as c:
        health = (await c.get(f"{p.url}/health")).json()
        assert health == {"status": "ok", "license": "valid", "store": "ok"}
    metrics = await p.metrics()
    assert metrics["kubespeech_license_valid"] == 1.0
    assert metrics['kubespeech_license_state{state="valid"}'] == 1.0
    assert metrics["kubespeech_license_grace_seconds_remaining"] == 0.0
    for name in ("pending", "sent", "dropped"):
        assert f"kubespeech_license_usage_events_{name}" in metrics


@pytest.mark.parametrize(
    ("case", "state", "reason"),
    [
        ("tampered", "invalid", "bad_signature"),
        ("wrong_key", "invalid", "wrong_key"),
        ("malformed", "invalid", "malformed"),
        ("expired", "expired", "expired"),
        ("not_yet_valid", "invalid", "not_yet_valid"),
        ("missing", "invalid", "no_license"),
        ("dev_key_in_production", "invalid", "dev_key_not_allowed"),
    ],
)
async def test_bad_license_keys_give_a_specific_state(
    case: str, state: str, reason: str, vendor: Vendor, start_proxy: StartProxy
) -> None:
    now = time.time()
    public_key: str | None = "vendor"
    token: str | None
    if case == "tampered":
        token = _tamper(vendor.token(mode="offline"))
    elif case == "wrong_key":
        token = vendor.token(mode="offline", key=generate_private_key())
    elif case == "malformed":
        token = "this is not a license"
    elif case == "expired":
        token = vendor.token(mode="offline", now=now - 7200, expires_in=3600)
    elif case == "not_yet_valid":
        token = vendor.token(mode="offline", not_before_in=3600)
    elif case == "missing":
        token = None
    else:
        token, public_key = dev_keys.dev_license(), dev_keys.DEV_PUBLIC_KEY_PEM.decode()
    p = await start_proxy(token, public_key=public_key)
    answer = await p.license()
    assert (answer["state"], answer["reason"], answer["usable"]) == (state, reason, False)
    assert "Traceback" not in str(answer) and (token is None or token not in str(answer))
    assert (await p.metrics())["kubespeech_license_valid"] == 0.0


async def test_skew_within_tolerance_is_valid_and_beyond_is_not(
    vendor: Vendor, start_proxy: StartProxy
) -> None:
    now = time.time()
    late = vendor.token(mode="offline", now=now - 1000, expires_in=950)  # expired 50 s ago
    assert (await (await start_proxy(late, clock_skew_s=120)).license())["state"] == "valid"
    assert (await (await start_proxy(late, clock_skew_s=10)).license())["state"] == "expired"
    early = vendor.token(mode="offline", not_before_in=60)
    assert (await (await start_proxy(early, clock_skew_s=120)).license())["state"] == "valid"


async def test_dev_license_in_dev_mode_and_when_explicitly_allowed(
    vendor: Vendor, start_proxy: StartProxy
) -> None:
    dev = await start_proxy(None, public_key=None, dev=True)
    answer = await dev.license()
    assert answer["state"] == "valid" and answer["dev"] is True and answer["checkin"]["mode"] == "offline"
    allowed = await start_proxy(
        dev_keys.dev_license(), public_key=dev_keys.DEV_PUBLIC_KEY_PEM.decode(), allow_dev_key=True
    )
    assert (await allowed.license())["state"] == "valid"
    # A vendor license is not accepted by a dev-mode proxy: dev mode trusts only the dev key.
    assert (await (await start_proxy(vendor.token(), public_key=None, dev=True)).license())[
        "reason"
    ] == "wrong_key"


async def test_revocation_and_reinstatement_without_restart(
    vendor: Vendor, upstream: Upstream, start_proxy: StartProxy
) -> None:
    token = vendor.token(upstream=upstream.url, license_id="lic_revoke_me")
    p = await start_proxy(token)
    assert (await p.license())["state"] == "valid"
    await upstream.revoke("lic_revoke_me", "contract ended")
    answer = await eventually(p.license, lambda a: a["state"] != "valid")
    assert (answer["state"], answer["reason"]) == ("invalid", "revoked")
    assert "contract ended" in answer["message"]
    await upstream.unrevoke("lic_revoke_me")
    await eventually(p.license, lambda a: a["state"] == "valid")


def _fault_app(mode: str) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/checkin")
    async def checkin(request: Request) -> Response:
        if mode == "500":
            return JSONResponse({"detail": "boom"}, status_code=500)
        if mode == "garbage":
            return PlainTextResponse("<html>surprise</html>")
        if mode == "wrong_shape":
            return JSONResponse({"status": "maybe"})
        await asyncio.sleep(1.0)  # slow: longer than the proxy's upstream timeout
        return JSONResponse({"status": "active"})

    return app


@pytest.mark.parametrize(("mode", "reason"), [("500", "http_500"), ("garbage", "bad_response"),
                                              ("wrong_shape", "bad_response"), ("slow", "timeout")])  # fmt: skip
async def test_upstream_faults_put_the_license_in_grace(
    mode: str, reason: str, vendor: Vendor, start_proxy: StartProxy
) -> None:
    fault = await Served(_fault_app(mode)).start()
    try:
        p = await start_proxy(vendor.token(upstream=fault.url), upstream_timeout_s=0.3)
        started = time.monotonic()
        answer = await p.license()
        # The proxy answers from its state; it never makes a caller wait on the upstream.
        assert time.monotonic() - started < 0.3
        assert (answer["state"], answer["reason"], answer["usable"]) == ("grace", reason, True)
        assert 0 < answer["grace_seconds_remaining"] <= 24 * 3600
        assert (await p.metrics())["kubespeech_license_valid"] == 1.0
    finally:
        await fault.stop()


async def test_grace_then_refusal_then_recovery_without_restart(
    vendor: Vendor, upstream: Upstream, start_proxy: StartProxy
) -> None:
    grace_s = 1.5
    p = await start_proxy(vendor.token(upstream=upstream.url), grace_hours=grace_s / 3600)
    assert (await p.license())["state"] == "valid"
    await upstream.stop()
    answer = await eventually(p.license, lambda a: a["state"] != "valid")
    assert answer["state"] == "grace" and answer["reason"] == "unreachable"
    assert 0 < answer["grace_seconds_remaining"] <= grace_s
    metrics = await p.metrics()
    assert 0 < metrics["kubespeech_license_grace_seconds_remaining"] <= grace_s
    answer = await eventually(p.license, lambda a: a["state"] != "grace", timeout=grace_s + 2)
    assert (answer["state"], answer["reason"], answer["usable"]) == ("expired", "grace_expired", False)
    assert answer["grace_deadline"] is not None
    await upstream.start()
    answer = await eventually(p.license, lambda a: a["state"] == "valid", timeout=3)
    assert answer["usable"] is True


async def test_two_replicas_agree_and_a_restart_keeps_the_grace_deadline(
    vendor: Vendor, upstream: Upstream, start_proxy: StartProxy
) -> None:
    token = vendor.token(upstream=upstream.url, license_id="lic_shared")
    a = await start_proxy(token, grace_hours=30 / 3600)
    b = await start_proxy(token, grace_hours=30 / 3600)
    assert (await a.license())["state"] == (await b.license())["state"] == "valid"
    await upstream.stop()
    await eventually(a.license, lambda x: x["state"] == "grace")
    await eventually(b.license, lambda x: x["state"] == "grace")
    deadline_a = (await a.license())["grace_deadline_unix"]
    assert (await b.license())["grace_deadline_unix"] == deadline_a
    # Revocation seen by one replica is seen by both (the verdict lives in Redis).
    await a.stop()
    await b.stop()
    await asyncio.sleep(0.3)  # time passes while no proxy runs
    await a.restart()
    answer = await a.license()
    assert answer["state"] == "grace" and answer["grace_deadline_unix"] == deadline_a
    assert answer["grace_seconds_remaining"] < 30 - 0.3
    await upstream.start()
    await eventually(a.license, lambda x: x["state"] == "valid")
    await upstream.revoke("lic_shared")
    await eventually(a.license, lambda x: x["reason"] == "revoked")
    await b.restart()
    b.proxy.settings.checkin_interval_s = 3600  # b never checks in again; it learns from Redis
    assert (await b.license())["reason"] == "revoked"


async def test_a_restart_after_a_long_outage_does_not_trust_an_old_check_in(
    vendor: Vendor, upstream: Upstream, start_proxy: StartProxy
) -> None:
    p = await start_proxy(vendor.token(upstream=upstream.url), grace_hours=1.0 / 3600)
    assert (await p.license())["state"] == "valid"
    await p.stop()
    await upstream.stop()
    await asyncio.sleep(1.2)
    await p.restart()
    answer = await p.license()
    assert (answer["state"], answer["reason"]) == ("expired", "grace_expired")


async def test_offline_license_never_calls_out(
    vendor: Vendor, upstream: Upstream, start_proxy: StartProxy
) -> None:
    p = await start_proxy(vendor.token(mode="offline", upstream=upstream.url), upstream_url=upstream.url)
    await asyncio.sleep(0.6)  # several check-in and usage intervals
    assert (await p.license())["state"] == "valid"
    assert upstream.requests == []


async def test_redis_down_keeps_answering_from_memory(
    vendor: Vendor, upstream: Upstream, start_proxy: StartProxy
) -> None:
    from tests.conftest import start_redis

    own = start_redis()
    assert own.process is not None
    try:
        p = await start_proxy(vendor.token(upstream=upstream.url), redis_url=own.url)
        assert (await p.license())["store"] == "ok"
        own.process.kill()
        own.process.wait(5)
        answer = await eventually(p.license, lambda a: a["store"] == "unavailable")
        assert answer["state"] == "valid" and answer["usable"] is True
        async with httpx.AsyncClient() as c:
            assert (await c.get(f"{p.url}/health")).json()["store"] == "unavailable"
            metrics = await c.get(f"{p.url}/metrics")
            assert metrics.status_code == 200 and "Traceback" not in metrics.text
    finally:
        if own.process.poll() is None:
            own.process.kill()


async def test_key_file_change_is_picked_up(vendor: Vendor, start_proxy: StartProxy, tmp_path: Any) -> None:
    key_file = tmp_path / "license.key"
    key_file.write_text(vendor.token(mode="offline", features=["asr"]))
    p = await start_proxy(None, key_file=key_file)
    assert (await p.license())["features"] == ["asr"]
    key_file.write_text(vendor.token(mode="offline", features=["asr", "tts"]))
    await eventually(p.license, lambda a: a["features"] == ["asr", "tts"])
    key_file.write_text(_tamper(vendor.token(mode="offline")))
    await eventually(p.license, lambda a: a["reason"] == "bad_signature")


async def test_updated_terms_reach_every_replica_and_survive_a_restart(
    vendor: Vendor, upstream: Upstream, start_proxy: StartProxy
) -> None:
    from tests.license.conftest import ADMIN

    lid = "lic_terms"
    a = await start_proxy(vendor.token(features=["asr"], upstream=upstream.url, license_id=lid))
    b = await start_proxy(vendor.token(features=["asr"], upstream=upstream.url, license_id=lid))
    newer = vendor.token(
        features=["asr", "tts"],
        limits={"max_gpus": 4},
        upstream=upstream.url,
        license_id=lid,
        now=time.time() + 2,
    )
    async with httpx.AsyncClient() as c:
        url = f"{upstream.url}/v1/licenses/{lid}/token"
        other = vendor.token(license_id="lic_someone_else")
        assert (await c.put(url, json={"token": other}, headers=ADMIN)).status_code == 422
        forged = vendor.token(license_id=lid, key=generate_private_key())
        assert (await c.put(url, json={"token": forged}, headers=ADMIN)).status_code == 422
        assert (await c.put(url, json={"token": newer}, headers=ADMIN)).status_code == 200
    for p in (a, b):
        answer = await eventually(p.license, lambda x: x["features"] == ["asr", "tts"])
        assert answer["limits"]["max_gpus"] == 4 and answer["state"] == "valid"
    await a.stop()
    await upstream.stop()
    await a.restart()  # the configured key is the old one; the renewal is kept in Redis
    assert (await a.license())["features"] == ["asr", "tts"]
