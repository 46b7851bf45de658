"""Real ``kubespeech worker`` processes: the jobs they hold (/inflight, /healthz, gauge), drain, expiry."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from redis.asyncio import Redis

from kubespeech.config import QueueSettings
from kubespeech.errors import DeadlineExceeded
from kubespeech.jobs import JobClient, Keys
from kubespeech.jobs.messages import asr_meta, pcm16_from_float
from tests.conftest import RedisServer
from tests.stack import WorkerProcess

QUEUE = QueueSettings(visibility_timeout_s=5)


def audio(samples: int) -> bytes:
    return pcm16_from_float(np.zeros(samples, dtype=np.float32))


@pytest.fixture
async def client(redis_client: Redis) -> AsyncIterator[JobClient]:
    yield JobClient(redis_client, QUEUE)


def load(worker: WorkerProcess, path: str = "/inflight") -> dict[str, object]:
    status, body = worker.get(path)
    assert status == 200, body
    data = json.loads(body)
    assert isinstance(data, dict)
    return data


def gauge(worker: WorkerProcess, model: str) -> float:
    _, text = worker.get("/metrics")
    prefix = f'kubespeech_worker_in_flight_jobs{{engine="noop",model="{model}",task="asr"}} '
    (line,) = [line for line in text.splitlines() if line.startswith(prefix)]
    return float(line.removeprefix(prefix))


async def until_in_flight(worker: WorkerProcess, count: int, timeout: float = 10) -> None:
    until = time.monotonic() + timeout
    while load(worker)["in_flight"] != count:
        assert time.monotonic() < until, f"/inflight never said {count}"
        await asyncio.sleep(0.02)


async def test_inflight_reports_the_job_a_worker_holds_then_zero(
    redis_server: RedisServer, client: JobClient
) -> None:
    worker = WorkerProcess(redis_server.url, task="asr", model="m-load", engine="noop", max_batch_size=1,
                           max_wait_ms=0, engine_options={"delay_s": 2.5})  # fmt: skip
    try:
        worker.wait_ready()
        assert load(worker) == {"in_flight": 0, "draining": False}
        assert load(worker, "/healthz") == {"status": "ok", "in_flight": 0, "draining": False}
        assert gauge(worker, "m-load") == 0
        call = asyncio.create_task(client.call("m-load", asr_meta(), audio(40), timeout_s=20))
        await until_in_flight(worker, 1)
        assert load(worker, "/healthz")["in_flight"] == 1
        assert gauge(worker, "m-load") == 1
        assert not call.done(), "the slow engine finished before the count could be read"
        assert (await call).header["text"] == "40 samples"
        await until_in_flight(worker, 0)
        assert gauge(worker, "m-load") == 0
    finally:
        assert worker.stop() == 0


async def test_sigterm_while_holding_a_job_publishes_it_and_exits_zero(
    redis_server: RedisServer, client: JobClient
) -> None:
    # The drain itself (several jobs in flight, the rest left queued) is covered by
    # test_worker_process.py::test_sigterm_drains_in_flight_work_and_exits_zero; this one watches what
    # the worker reports while it drains.
    worker = WorkerProcess(redis_server.url, task="asr", model="m-term", engine="noop", max_batch_size=1,
                           max_wait_ms=0, engine_options={"delay_s": 3.0})  # fmt: skip
    worker.wait_ready()
    call = asyncio.create_task(client.call("m-term", asr_meta(), audio(30), timeout_s=20))
    await until_in_flight(worker, 1)
    queued = asyncio.create_task(client.call("m-term", asr_meta(), audio(31), timeout_s=20))
    until = time.monotonic() + 5
    while (await client.depth("m-term")).waiting != 1:
        assert time.monotonic() < until, "the second job was never queued"
        await asyncio.sleep(0.02)
    worker.proc.send_signal(signal.SIGTERM)
    until = time.monotonic() + 5
    while not load(worker)["draining"]:
        assert time.monotonic() < until, "the worker never said it was draining"
        await asyncio.sleep(0.02)
    assert load(worker) == {"in_flight": 1, "draining": True}
    assert worker.get("/readyz")[0] == 503
    code = await asyncio.to_thread(worker.proc.wait, 20)
    assert code == 0
    # Published before the exit; the reply may still be on its way to this process.
    assert (await asyncio.wait_for(call, 5)).header["text"] == "30 samples"
    assert not queued.done(), "a draining worker pulled a new job"
    depth = await client.depth("m-term")
    assert (depth.waiting, depth.in_flight) == (1, 0)
    queued.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await queued


async def test_an_expired_job_never_reaches_the_engine_and_is_not_a_failure(
    redis_server: RedisServer, client: JobClient, tmp_path: Path
) -> None:
    calls = tmp_path / "calls.txt"
    with pytest.raises(DeadlineExceeded):
        await client.call("m-late", asr_meta(), audio(77), timeout_s=0.3)
    assert (await client.depth("m-late")).waiting == 1
    worker = WorkerProcess(redis_server.url, task="asr", model="m-late", engine="noop", max_wait_ms=0,
                           engine_options={"calls_file": str(calls)})  # fmt: skip
    try:
        worker.wait_ready()
        until = time.monotonic() + 10
        while (await client.depth("m-late")).total:
            assert time.monotonic() < until, "the worker never drained the expired entry"
            await asyncio.sleep(0.05)
        fresh = await client.call("m-late", asr_meta(), audio(78), timeout_s=10)
        assert fresh.header["text"] == "78 samples"
        assert calls.read_text().split() == ["78"], "the expired job reached the engine"
        jobs = 'kubespeech_worker_jobs_total{engine="noop",model="m-late",status="%s",task="asr"} 1.0'
        until = time.monotonic() + 5
        # The worker counts a job just after publishing it, so the caller may be a moment ahead.
        while jobs % "ok" not in (metrics := worker.get("/metrics")[1]):
            assert time.monotonic() < until, "the served job was never counted"
            await asyncio.sleep(0.02)
        assert jobs % "expired" in metrics
        assert "kubespeech_worker_errors_total{" not in metrics, "a dropped job counted as a failure"
        assert await client.redis.xlen(Keys().dead_letter("m-late")) == 0
    finally:
        assert worker.stop() == 0
