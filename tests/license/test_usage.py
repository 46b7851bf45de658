"""Usage metering end to end: recorder -> bounded Redis stream -> proxy -> reference upstream (deduplicated)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from kubespeech.license.export import verify_export
from kubespeech.license.keys import LicenseKeys
from kubespeech.license.usage import UsageRecorder
from tests.license.conftest import ADMIN, StartProxy, Upstream, Vendor, eventually

pytestmark = pytest.mark.timeout(60)

EVENT_FIELDS = {"id", "ts", "feature", "model", "audio_seconds", "characters", "status_code"}


async def _record(recorder: UsageRecorder, n: int, *, start: int = 0) -> None:
    for i in range(start, start + n):
        await recorder.record(
            feature="asr" if i % 2 else "tts",
            model="whisper-tiny",
            audio_seconds=1.5,
            characters=i,
            status_code=200 if i % 5 else 422,
        )


async def test_recorder_writes_metadata_only_into_a_bounded_stream(redis_client: Redis, prefix: str) -> None:
    recorder = UsageRecorder(redis_client, prefix, max_events=5)
    await _record(recorder, 8)
    keys = LicenseKeys(prefix)
    entries = await redis_client.xrange(keys.usage_stream)
    assert len(entries) == 5
    assert int(await redis_client.get(keys.usage_added)) == 8
    ids = set()
    for _, fields in entries:
        assert {k.decode() for k in fields} == EVENT_FIELDS
        ids.add(fields[b"id"])
    assert len(ids) == 5
    # The newest survive: characters 3..7.
    assert sorted(int(f[b"characters"]) for _, f in entries) == [3, 4, 5, 6, 7]
    assert float(await redis_client.get(keys.audio_seconds_day())) == pytest.approx(12.0)


async def test_buffered_recorder_writes_one_batch_per_interval_and_flushes_on_close(
    redis_client: Redis, prefix: str
) -> None:
    recorder = UsageRecorder(redis_client, prefix, flush_interval_s=0.2, flush_max_events=1000)
    keys = LicenseKeys(prefix)
    await _record(recorder, 7)
    assert await redis_client.xlen(keys.usage_stream) == 0, "a buffered recorder wrote per request"
    await eventually(lambda: redis_client.xlen(keys.usage_stream), lambda n: n == 7, timeout=5)
    assert int(await redis_client.get(keys.usage_added)) == 7
    assert float(await redis_client.get(keys.audio_seconds_day())) == pytest.approx(10.5)
    await _record(recorder, 3, start=7)
    await recorder.aclose()
    assert await redis_client.xlen(keys.usage_stream) == 10, "aclose did not flush the buffer"


async def test_recorder_sanitises_what_it_is_given(redis_client: Redis, prefix: str) -> None:
    recorder = UsageRecorder(redis_client, prefix)
    await recorder.record(
        feature="hello world transcript",
        model="m" * 1000,
        audio_seconds=float("nan"),
        characters=-3,
        status_code=200,
    )
    [(_, fields)] = await redis_client.xrange(LicenseKeys(prefix).usage_stream)
    assert fields[b"feature"] == b"other" and len(fields[b"model"]) == 128
    assert fields[b"audio_seconds"] == b"0.000" and fields[b"characters"] == b"0"


async def test_recorder_survives_redis_down() -> None:
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    from tests.conftest import free_port

    dead = Redis(port=free_port(), socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    recorder = UsageRecorder(dead)
    await recorder.record(feature="asr", model="m", audio_seconds=1, characters=0, status_code=200)
    assert recorder.failed == 1
    await dead.aclose()


async def test_n_events_are_ingested_exactly_once_even_across_an_outage(
    vendor: Vendor, upstream: Upstream, start_proxy: StartProxy, redis_client: Redis, prefix: str
) -> None:
    p = await start_proxy(vendor.token(upstream=upstream.url, license_id="lic_usage"), usage_batch_size=7)
    recorder = UsageRecorder(redis_client, prefix)
    await _record(recorder, 20)
    await eventually(lambda: upstream.summary("lic_usage"), lambda s: s["events"] == 20)
    await upstream.stop()
    await _record(recorder, 15, start=20)
    counts = await eventually(p.metrics, lambda m: m["kubespeech_license_usage_events_pending"] == 15)
    assert counts["kubespeech_license_usage_events_sent"] == 20
    await upstream.start()
    summary = await eventually(lambda: upstream.summary("lic_usage"), lambda s: s["events"] == 35)
    assert summary["audio_seconds"] == pytest.approx(35 * 1.5)
    assert summary["characters"] == sum(range(35))
    metrics = await eventually(p.metrics, lambda m: m["kubespeech_license_usage_events_pending"] == 0)
    assert metrics["kubespeech_license_usage_events_sent"] == 35
    assert metrics["kubespeech_license_usage_events_dropped"] == 0
    events = await upstream.events("lic_usage")
    assert len(events) == 35 and all(set(e) == EVENT_FIELDS for e in events)


async def test_lost_acknowledgements_are_retried_and_deduplicated(
    vendor: Vendor, upstream: Upstream, start_proxy: StartProxy, redis_client: Redis, prefix: str
) -> None:
    # The upstream stores the batch but the answer is lost (500) twice: the proxy resends, the server dedups.
    upstream.lose_usage_acks = 2
    await _record(UsageRecorder(redis_client, prefix), 12)
    p = await start_proxy(vendor.token(upstream=upstream.url, license_id="lic_dedup"))
    metrics = await eventually(p.metrics, lambda m: m["kubespeech_license_usage_events_pending"] == 0)
    assert metrics["kubespeech_license_usage_events_sent"] == 12
    assert upstream.lose_usage_acks == 0
    assert upstream.requests.count("/v1/usage") >= 3
    assert (await upstream.summary("lic_dedup"))["events"] == 12


async def test_buffer_bound_under_a_long_outage_drops_the_oldest_and_counts_them(
    vendor: Vendor, upstream: Upstream, start_proxy: StartProxy, redis_client: Redis, prefix: str
) -> None:
    await upstream.stop()
    p = await start_proxy(vendor.token(upstream=upstream.url, license_id="lic_bound"), usage_max_events=10)
    recorder = UsageRecorder(redis_client, prefix, max_events=10)
    await _record(recorder, 25)
    metrics = await p.metrics()
    assert metrics["kubespeech_license_usage_events_pending"] == 10
    assert metrics["kubespeech_license_usage_events_dropped"] == 15
    await upstream.start()
    await eventually(lambda: upstream.summary("lic_bound"), lambda s: s["events"] == 10)
    events = await upstream.events("lic_bound")
    assert sorted(e["characters"] for e in events) == list(range(15, 25))  # the newest ten
    metrics = await eventually(p.metrics, lambda m: m["kubespeech_license_usage_events_sent"] == 10)
    assert metrics["kubespeech_license_usage_events_dropped"] == 15


async def test_two_proxies_ship_each_event_once(
    vendor: Vendor, upstream: Upstream, start_proxy: StartProxy, redis_client: Redis, prefix: str
) -> None:
    token = vendor.token(upstream=upstream.url, license_id="lic_two")
    await start_proxy(token, usage_batch_size=3)
    await start_proxy(token, usage_batch_size=3)
    await _record(UsageRecorder(redis_client, prefix), 30)
    await eventually(lambda: upstream.summary("lic_two"), lambda s: s["events"] == 30)


async def test_audio_hours_limit_is_reported(
    vendor: Vendor, start_proxy: StartProxy, redis_client: Redis, prefix: str
) -> None:
    p = await start_proxy(vendor.token(mode="offline", limits={"audio_hours_per_day": 0.001}))  # 3.6 s
    assert (await p.license())["limits_exceeded"] == {}
    await _record(UsageRecorder(redis_client, prefix), 3)  # 4.5 s
    answer = await p.license()
    assert answer["usable"] is True and answer["usage_today"]["audio_hours"] == pytest.approx(
        4.5 / 3600, abs=1e-4
    )
    assert 0 < answer["limits_exceeded"]["audio_hours_per_day"]["retry_after"] <= 86400


async def test_air_gapped_export_is_signed_and_imports_once(
    vendor: Vendor,
    upstream: Upstream,
    start_proxy: StartProxy,
    redis_client: Redis,
    prefix: str,
    tmp_path: Path,
) -> None:
    from kubespeech.license.export import export_usage

    token = vendor.token(mode="offline", license_id="lic_airgap")
    p = await start_proxy(token)
    await _record(UsageRecorder(redis_client, prefix), 9)
    out = tmp_path / "usage.json"
    assert p.proxy.claims is not None
    assert (
        await export_usage(redis_client, LicenseKeys(prefix), token=token, claims=p.proxy.claims, out=out)
        == 9
    )
    assert await redis_client.xlen(LicenseKeys(prefix).usage_stream) == 0
    doc = json.loads(out.read_text())
    claims, _, events = verify_export(doc, vendor.key.public_key())
    assert claims.lid == "lic_airgap" and len(events) == 9 and all(set(e) == EVENT_FIELDS for e in events)
    async with httpx.AsyncClient() as c:
        first = (await c.post(f"{upstream.url}/v1/usage/import", json=doc, headers=ADMIN)).json()
        assert (first["accepted"], first["duplicates"]) == (9, 0)
        again = (await c.post(f"{upstream.url}/v1/usage/import", json=doc, headers=ADMIN)).json()
        assert (again["accepted"], again["duplicates"]) == (0, 9)
        doc["events"][0]["audio_seconds"] = 9999.0
        forged = await c.post(f"{upstream.url}/v1/usage/import", json=doc, headers=ADMIN)
        assert forged.status_code == 422 and forged.json()["code"] == "INVALID_EXPORT"
        assert "Traceback" not in forged.text
    assert (await upstream.summary("lic_airgap"))["events"] == 9
    # The sent counter includes exported events, so nothing reads as dropped.
    metrics = await p.metrics()
    assert metrics["kubespeech_license_usage_events_sent"] == 9
    assert metrics["kubespeech_license_usage_events_dropped"] == 0


async def test_upstream_refuses_content_and_bad_keys(vendor: Vendor, upstream: Upstream) -> None:
    token = vendor.token(license_id="lic_strict")
    event = {"id": "e1", "ts": 1.0, "feature": "asr", "model": "m", "audio_seconds": 1.0,
             "characters": 2, "status_code": 200}  # fmt: skip
    auth = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient() as c:
        url = f"{upstream.url}/v1/usage"
        smuggled = {"license_id": "lic_strict", "events": [{**event, "text": "secret transcript"}]}
        r = await c.post(url, json=smuggled, headers=auth)
        assert r.status_code == 422 and r.json()["code"] == "INVALID_PARAMETER"
        assert "secret transcript" not in r.text
        r = await c.post(
            url, json={"license_id": "lic_strict", "events": [event]}, headers={"Authorization": "x"}
        )
        assert r.status_code == 401 and r.json()["code"] == "INVALID_LICENSE"
        r = await c.post(url, json={"license_id": "lic_other", "events": [event]}, headers=auth)
        assert r.status_code == 403
        r = await c.post(url, content=b"{not json", headers={**auth, "Content-Type": "application/json"})
        assert r.status_code == 422 and "Traceback" not in r.text
        r = await c.post(f"{upstream.url}/v1/revocations", json={"license_id": "x"}, headers=auth)
        assert r.status_code == 401
