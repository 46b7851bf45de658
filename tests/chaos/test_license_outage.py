"""Chaos: the license upstream goes down for longer than a (shortened) grace period, then comes back.

Real processes: the reference license server, the license proxy, the API (license enforced through the
proxy), noop workers and Redis. Requests go on throughout: served during the grace period, refused with
403 LICENSE_EXPIRED (never a 500) once it is over, and served again within seconds of the upstream coming
back, without restarting the proxy or the API.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.stack import (
    ASR_MODEL,
    TTS_MODEL,
    License,
    LoadGenerator,
    Outcome,
    RedisProcess,
    ServiceProcess,
    long_run,
    start_api,
    start_license,
    wait_live,
)
from tests.stack import WorkerProcess

LONG = long_run()
GRACE_S = 6.0 if LONG else 2.0
DOWN_S = GRACE_S + (6.0 if LONG else 2.5)  # past the grace period and its 1 s of slack, with room to look
# The API caches the proxy's answer for 5 s, the proxy checks in every 0.3 s: back within seconds.
RECOVERY_BOUND_S = 15.0

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path / "redis", aof=False)
    server.start()
    yield server
    server.stop()


async def _until(lic: License, check: str, timeout: float) -> dict[str, object]:
    """Poll the proxy's answer until its ``state`` is ``check``."""
    until = time.monotonic() + timeout
    answer = await asyncio.to_thread(lic.state)
    while answer["state"] != check:
        assert time.monotonic() < until, answer
        await asyncio.sleep(0.1)
        answer = await asyncio.to_thread(lic.state)
    return answer


def test_license_upstream_outage_beyond_grace_then_back(redis: RedisProcess, tmp_path: Path) -> None:
    lic = start_license(redis.url, tmp_path, grace_s=GRACE_S)
    upstream, proxy = lic.upstream, lic.proxy
    workers = [
        WorkerProcess(redis.url, task=task, model=model, engine="noop", max_wait_ms=0)
        for task, model in (("asr", ASR_MODEL), ("tts", TTS_MODEL))
    ]
    api: ServiceProcess | None = None
    load = LoadGenerator("", concurrency=2, timeout_s=30, pause_after_refusal_s=0.1)
    marks: dict[str, float] = {}

    async def scenario() -> list[Outcome]:
        runner = asyncio.create_task(load.run())
        await asyncio.sleep(1.0)
        await asyncio.to_thread(upstream.stop)
        marks["upstream_down"] = time.monotonic()
        grace = await _until(lic, "grace", timeout=5)
        deadline_unix = grace["grace_deadline_unix"]
        assert isinstance(deadline_unix, int | float)
        marks["grace_end"] = time.monotonic() + (deadline_unix - time.time())
        expired = await _until(lic, "expired", timeout=GRACE_S + 5)
        assert expired["reason"] == "grace_expired", expired
        await asyncio.sleep(max(marks["upstream_down"] + DOWN_S - time.monotonic(), 0))
        # From here the proxy may check in again at any moment (before wait_healthy returns): a request
        # served from now on is not one served past the grace period.
        marks["upstream_restarting"] = time.monotonic()
        await asyncio.to_thread(upstream.restart)
        await asyncio.to_thread(upstream.wait_healthy)
        marks["upstream_up"] = time.monotonic()
        await _until(lic, "valid", timeout=10)
        # Keep the load on until the API serves again (bounded), and a little after.
        until = time.monotonic() + RECOVERY_BOUND_S + 5
        while time.monotonic() < until and not any(
            o.status == 200 and o.started > marks["upstream_up"] for o in load.outcomes
        ):
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        load.stop()
        return await runner

    try:
        # The proxy's first check-in may still be under way (a busy machine): start from a confirmed license.
        asyncio.run(_until(lic, "valid", timeout=15))
        api = start_api(redis.url, tmp_path, license_proxy_url=proxy.url)
        for w in workers:
            w.wait_ready(60)
        wait_live(api.url, [ASR_MODEL, TTS_MODEL])
        load.api_url = api.url
        pids = (api.proc.pid, proxy.proc.pid)
        outcomes = asyncio.run(scenario())
        still_running = api.proc.poll() is None and proxy.proc.poll() is None
        assert still_running and pids == (api.proc.pid, proxy.proc.pid), "no restarts"
    finally:
        for p in (api, proxy, upstream):
            if p is not None:
                p.stop()
        for w in workers:
            w.stop()

    down, grace_end, up = marks["upstream_down"], marks["grace_end"], marks["upstream_up"]
    bad = [o for o in outcomes if (o.status, o.code) not in ((200, ""), (403, "LICENSE_EXPIRED"))]
    wrong = [o for o in outcomes if o.status == 200 and not o.correct]
    # One second of slack either side of each transition: the API decides on its own clock and cache.
    in_grace = [o for o in outcomes if down <= o.started and o.finished < grace_end - 1.0]
    restarting = marks["upstream_restarting"]
    after_grace = [o for o in outcomes if grace_end + 1.0 < o.started and o.finished < restarting]
    served_again = sorted(o.finished for o in outcomes if o.status == 200 and o.started >= up)
    recovery = served_again[0] - up if served_again else float("inf")
    print(
        f"\nlicense outage: {len(outcomes)} requests; upstream down {up - down:.1f} s with a grace period of "
        f"{GRACE_S:g} s; during grace {sum(o.status == 200 for o in in_grace)}/{len(in_grace)} served; "
        f"after it {sum(o.status == 403 for o in after_grace)}/{len(after_grace)} refused 403; served "
        f"again {recovery:.2f} s after the upstream was back"
    )
    assert not bad, [(o.tag, o.status, o.code, o.detail) for o in bad[:10]]
    assert not wrong, [(o.tag, o.detail) for o in wrong[:10]]
    assert in_grace and all(o.status == 200 for o in in_grace), [
        (
            o.tag,
            o.kind,
            round(o.started - down, 2),
            round(o.finished - down, 2),
            round(grace_end - down, 2),
            o.status,
            o.code,
            o.detail,
        )
        for o in in_grace
        if o.status != 200
    ]
    assert after_grace and all(o.status == 403 for o in after_grace)
    assert recovery < RECOVERY_BOUND_S
    assert all(o.status == 200 for o in outcomes if o.started > up + recovery)
