"""Chaos: Redis (AOF on) restarted in the middle of mixed load. During the outage the API answers 503 with
Retry-After, never 500 and never past the request deadline; it recovers within seconds without restarting
any process, and the jobs Redis had acknowledged when it went down are all run and answered afterwards.

Engines: noop (see test_worker_kills.py): the answers are checkable exactly, and the subject is the queue.
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
    LoadGenerator,
    Outcome,
    RedisProcess,
    long_run,
    start_api,
    wait_live,
)
from tests.stack import WorkerProcess

LONG = long_run()
CONCURRENCY = 16 if LONG else 8
WARM_UP_S = 5.0 if LONG else 2.0
OUTAGE_S = 5.0 if LONG else 2.0
AFTER_S = 15.0 if LONG else 6.0
REQUEST_TIMEOUT_S = 10.0
# "Within seconds": generous, since a worker backs off up to 5 s between reconnects and CI machines are slow.
RECOVERY_BOUND_S = 12.0

pytestmark = pytest.mark.timeout(300 if LONG else 120)


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path / "redis", aof=True)
    server.start()
    yield server
    server.stop()


def _queued_job_ids(redis: RedisProcess) -> set[str]:
    """Every job Redis holds in the model queues right now (waiting or in flight): acknowledged jobs."""
    client = redis.client()
    ids: set[str] = set()
    for model in (ASR_MODEL, TTS_MODEL):
        for _, fields in client.xrange(f"ks:q:{model}"):
            if fields.get(b"x") != b"1":  # not a tombstone of an abandoned job
                ids.add(fields[b"id"].decode())
    return ids


def test_redis_restart_under_load(redis: RedisProcess, tmp_path: Path) -> None:
    env = {"KUBESPEECH_QUEUE_VISIBILITY_TIMEOUT_S": "2", "OMP_NUM_THREADS": "1"}
    workers = [
        WorkerProcess(redis.url, task=task, model=model, engine="noop", max_batch_size=4, max_wait_ms=0,
                      engine_options={"delay_s": 0.2}, env=env)
        for task, model in (("asr", ASR_MODEL), ("tts", TTS_MODEL))
    ]  # fmt: skip
    api = start_api(redis.url, tmp_path, request_timeout_s=REQUEST_TIMEOUT_S)
    pids = [api.proc.pid, *(w.proc.pid for w in workers)]
    # A client gives up well after the deadline: an answer later than the deadline counts as a hang.
    load = LoadGenerator(api.url, CONCURRENCY, timeout_s=REQUEST_TIMEOUT_S + 20)
    marks: dict[str, float] = {}
    acknowledged: set[str] = set()

    async def scenario() -> list[Outcome]:
        runner = asyncio.create_task(load.run())
        await asyncio.sleep(WARM_UP_S)
        acknowledged.update(_queued_job_ids(redis))
        marks["down"] = time.monotonic()
        await asyncio.to_thread(redis.stop)
        await asyncio.sleep(OUTAGE_S)
        await asyncio.to_thread(redis.start)
        marks["up"] = time.monotonic()
        await asyncio.sleep(AFTER_S)
        load.stop()
        return await runner

    try:
        for w in workers:
            w.wait_ready(60)
        wait_live(api.url, [ASR_MODEL, TTS_MODEL])
        outcomes = asyncio.run(scenario())
        # Every acknowledged job is run and published once Redis is back (its "done" marker is set on
        # publish); the queues drain to empty.
        client = redis.client()
        until = time.monotonic() + 30
        while time.monotonic() < until and any(client.xlen(f"ks:q:{m}") for m in (ASR_MODEL, TTS_MODEL)):
            time.sleep(0.1)
        unanswered = [j for j in acknowledged if not client.exists(f"ks:d:{j}")]
        alive = [p.proc.poll() is None for p in (api, *workers)]
        same_pids = [api.proc.pid, *(w.proc.pid for w in workers)] == pids
    finally:
        api.stop()
        for w in workers:
            w.stop()

    assert all(alive) and same_pids, api.tail()
    up, down = marks["up"], marks["down"]
    bad = [o for o in outcomes if o.status not in (200, 503)]
    wrong = [o for o in outcomes if o.status == 200 and not o.correct]
    no_retry_after = [o for o in outcomes if o.status == 503 and not o.retry_after]
    slow = [o for o in outcomes if o.finished - o.started > REQUEST_TIMEOUT_S + 2.0]
    refused = [o for o in outcomes if o.status == 503]
    served_after = sorted(o.finished for o in outcomes if o.status == 200 and o.started >= up)
    recovery = served_after[0] - up if served_after else float("inf")
    late_refusals = [o for o in refused if o.started > up + recovery + 2.0]
    print(
        f"\nredis restart: sent {len(outcomes)}, served {sum(o.status == 200 for o in outcomes)}, "
        f"refused 503 {len(refused)}, other {len(bad)}; outage {up - down:.2f} s; recovery after Redis "
        f"was back {recovery:.2f} s; acknowledged jobs at the restart {len(acknowledged)}, "
        f"unanswered {len(unanswered)}; slowest answer {max(o.finished - o.started for o in outcomes):.2f} s"
    )
    assert not bad, [(o.tag, o.status, o.code, o.detail) for o in bad[:10]]
    assert not wrong, [(o.tag, o.detail) for o in wrong[:10]]
    assert not no_retry_after, [o.tag for o in no_retry_after[:10]]
    assert not slow, [(o.tag, o.status, round(o.finished - o.started, 2)) for o in slow[:10]]
    assert any(down <= o.started <= up for o in refused), "the outage was seen by clients"
    assert recovery < RECOVERY_BOUND_S
    assert not late_refusals, [(o.tag, round(o.started - up, 2), o.code) for o in late_refusals[:10]]
    assert acknowledged, "jobs were queued when Redis went down"
    assert not unanswered, sorted(unanswered)[:10]
