"""Real ``kubespeech worker`` processes against real Redis: results, batching, reclaim, drain, dead-letter."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest
from redis.asyncio import Redis

from kubespeech.config import QueueSettings
from kubespeech.errors import EmptyInput, JobFailed
from kubespeech.jobs import JobClient, Keys
from kubespeech.jobs.messages import asr_meta, pcm16_from_float, tts_meta
from tests.conftest import RedisServer, free_port, start_redis
from tests.stack import WorkerProcess

FAST = {"KUBESPEECH_QUEUE_VISIBILITY_TIMEOUT_S": "1", "KUBESPEECH_QUEUE_MAX_DELIVERIES": "2"}
QUEUE = QueueSettings(visibility_timeout_s=1, max_deliveries=2)


def audio(samples: int) -> bytes:
    return pcm16_from_float(np.zeros(samples, dtype=np.float32))


@pytest.fixture
async def client(redis_client: Redis) -> AsyncIterator[JobClient]:
    yield JobClient(redis_client, QUEUE)


async def wait_in_flight(client: JobClient, model: str, at_least: int, timeout: float = 20) -> None:
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        if (await client.depth(model)).in_flight >= at_least:
            return
        await asyncio.sleep(0.02)
    raise TimeoutError("jobs never went in flight")


async def test_worker_serves_jobs_in_batches_and_reports_metrics(
    redis_server: RedisServer, client: JobClient
) -> None:
    worker = WorkerProcess(redis_server.url, task="asr", model="noop", engine="noop", max_batch_size=8,
                           max_wait_ms=50, env=FAST)  # fmt: skip
    try:
        worker.wait_ready()
        results = await asyncio.gather(
            *(client.call("noop", asr_meta(), audio(100 + i), timeout_s=10) for i in range(16))
        )
        assert [r.header["text"] for r in results] == [f"{100 + i} samples" for i in range(16)]
        status, metrics = worker.get("/metrics")
        assert status == 200
        assert (
            'kubespeech_worker_jobs_total{engine="noop",model="noop",status="ok",task="asr"} 16.0' in metrics
        )
        batches = [
            line for line in metrics.splitlines() if line.startswith("kubespeech_worker_batch_size_count")
        ]
        assert batches and float(batches[0].split()[-1]) < 16, "jobs were not grouped into micro-batches"
        assert worker.get("/healthz")[0] == 200
        described = await client.redis.hget(Keys().models, "noop")
        assert described is not None and b'"task":"asr"' in described
    finally:
        assert worker.stop() == 0


async def test_a_bad_item_fails_alone_within_its_batch(redis_server: RedisServer, client: JobClient) -> None:
    worker = WorkerProcess(redis_server.url, task="tts", model="tts-noop", engine="noop", max_wait_ms=100)
    try:
        worker.wait_ready()
        texts = ["hello", "", "world"]
        outcomes = await asyncio.gather(
            *(client.call("tts-noop", tts_meta(text=t), timeout_s=10) for t in texts), return_exceptions=True
        )
        assert isinstance(outcomes[1], EmptyInput)
        for text, outcome in zip(texts[::2], outcomes[::2], strict=True):
            assert not isinstance(outcome, BaseException)
            assert len(outcome.body) == len(text) * 160 * 2
            assert outcome.header["sample_rate"] == 16000
    finally:
        worker.stop()


async def test_sigkill_mid_batch_loses_nothing_and_duplicates_nothing(
    redis_server: RedisServer, client: JobClient
) -> None:
    victim = WorkerProcess(redis_server.url, task="asr", model="m-kill", engine="noop", max_batch_size=4,
                           engine_options={"delay_s": 30}, env=FAST)  # fmt: skip
    victim.wait_ready()
    calls = [
        asyncio.create_task(client.call("m-kill", asr_meta(), audio(10 + i), timeout_s=60)) for i in range(10)
    ]
    await wait_in_flight(client, "m-kill", 4)
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    rescuer = WorkerProcess(redis_server.url, task="asr", model="m-kill", engine="noop", env=FAST)
    try:
        rescuer.wait_ready()
        results = await asyncio.gather(*calls)
        assert sorted(r.header["text"] for r in results) == sorted(f"{10 + i} samples" for i in range(10))
        assert (await client.depth("m-kill")).total == 0
        _, metrics = rescuer.get("/metrics")
        assert "kubespeech_worker_reclaimed_total" in metrics
        replies = [k async for k in client.redis.scan_iter("ks:r:*")]
        assert replies == [], "a duplicate result was left for a caller"
    finally:
        rescuer.stop()


async def test_sigterm_drains_in_flight_work_and_exits_zero(
    redis_server: RedisServer, client: JobClient
) -> None:
    worker = WorkerProcess(redis_server.url, task="asr", model="m-drain", engine="noop", max_batch_size=2,
                           engine_options={"delay_s": 1.0})  # fmt: skip
    worker.wait_ready()
    calls = [
        asyncio.create_task(client.call("m-drain", asr_meta(), audio(20 + i), timeout_s=30)) for i in range(5)
    ]
    await wait_in_flight(client, "m-drain", 2)
    worker.proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(worker.proc.wait, 20)
    assert code == 0
    finished = [c for c in calls if c.done()]
    assert len(finished) >= 2 and all(not c.exception() for c in finished), (
        "in-flight jobs were not completed"
    )
    depth = await client.depth("m-drain")
    assert depth.in_flight == 0 and depth.waiting == 5 - len(finished), "a job was lost or left pending"
    successor = WorkerProcess(redis_server.url, task="asr", model="m-drain", engine="noop")
    try:
        successor.wait_ready()
        await asyncio.wait_for(asyncio.gather(*calls), 20)
    finally:
        successor.stop()


async def test_a_job_that_kills_every_worker_goes_to_the_dead_letter_stream(
    redis_server: RedisServer, client: JobClient
) -> None:
    poison = 777
    call = asyncio.create_task(client.call("m-poison", asr_meta(), audio(poison), timeout_s=60))
    crashed = 0
    for _ in range(6):
        worker = WorkerProcess(redis_server.url, task="asr", model="m-poison", engine="noop",
                               engine_options={"exit_on_samples": poison}, env=FAST)  # fmt: skip
        code = await asyncio.to_thread(_wait_exit_or_result, worker, call)
        if code is None:
            break
        crashed += 1
    assert crashed == QUEUE.max_deliveries, "the poison job was retried more or less than allowed"
    with pytest.raises(JobFailed, match="dead-letter"):
        await call
    dlq = await client.redis.xrange(Keys().dead_letter("m-poison"))
    assert len(dlq) == 1


def _wait_exit_or_result(worker: WorkerProcess, call: asyncio.Task[object]) -> int | None:
    until = time.monotonic() + 30
    while time.monotonic() < until:
        if worker.proc.poll() is not None:
            return worker.proc.returncode
        if call.done():
            worker.stop()
            return None
        time.sleep(0.05)
    worker.stop()
    raise TimeoutError("neither a crash nor a result")


async def test_redis_unreachable_at_start_then_back() -> None:
    port = free_port()
    worker = WorkerProcess(f"redis://127.0.0.1:{port}/0", task="asr", model="m", engine="noop")
    try:
        until = time.monotonic() + 20
        while True:
            try:
                status, body = worker.get("/readyz")
                if "redis unreachable" in body:
                    break
            except OSError:
                pass
            assert time.monotonic() < until, "worker never reported redis as unreachable"
            await asyncio.sleep(0.05)
        assert status == 503 and worker.get("/healthz")[0] == 200
        late = _start_redis_on(port)
        try:
            worker.wait_ready(timeout=20)
        finally:
            assert late.process is not None
            late.process.terminate()
    finally:
        worker.stop()


def _start_redis_on(port: int) -> RedisServer:
    import tests.conftest as conftest

    original = conftest.free_port
    conftest.free_port = lambda: port
    try:
        return start_redis()
    finally:
        conftest.free_port = original


async def test_redis_lost_mid_run_then_back_serves_again() -> None:
    own = start_redis()
    worker = WorkerProcess(own.url, task="asr", model="m-flap", engine="noop")
    try:
        worker.wait_ready()
        assert own.process is not None
        own.process.terminate()
        own.process.wait(5)
        until = time.monotonic() + 20
        while worker.get("/readyz")[0] == 200:
            assert time.monotonic() < until, "worker kept reporting ready without Redis"
            await asyncio.sleep(0.05)
        assert worker.get("/healthz")[0] == 200, "losing Redis must not fail liveness (no restart loop)"
        back = _start_redis_on(own.port)
        try:
            worker.wait_ready(timeout=30)
            redis = Redis.from_url(back.url)
            try:
                result = await JobClient(redis, QUEUE).call("m-flap", asr_meta(), audio(5), timeout_s=10)
                assert result.header["text"] == "5 samples"
            finally:
                await redis.aclose()
        finally:
            assert back.process is not None
            back.process.terminate()
    finally:
        assert worker.stop() == 0
