"""Real ``kubespeech worker`` processes whose engine hangs: liveness fails, its jobs move on or dead-letter."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from redis.asyncio import Redis

from kubespeech.config import QueueSettings
from kubespeech.errors import DeadlineExceeded, JobFailed
from kubespeech.jobs import JobClient, Keys, live_workers
from kubespeech.jobs.messages import asr_meta, pcm16_from_float
from tests.conftest import RedisServer
from tests.stack import WorkerProcess

QUEUE = QueueSettings(visibility_timeout_s=1, max_deliveries=2)
# A one-second visibility timeout and batch bound keep every hand-over in these tests short.
ENV = {
    "KUBESPEECH_QUEUE_VISIBILITY_TIMEOUT_S": "1",
    "KUBESPEECH_QUEUE_MAX_DELIVERIES": "2",
    "KUBESPEECH_WORKER_MAX_BATCH_S": "1",
}
HANG = {"hang_s": 3600}


def audio(samples: int) -> bytes:
    return pcm16_from_float(np.zeros(samples, dtype=np.float32))


@pytest.fixture
async def client(redis_client: Redis) -> AsyncIterator[JobClient]:
    yield JobClient(redis_client, QUEUE)


def worker(
    redis: RedisServer, model: str, calls: Path, *, hang: bool, env: dict[str, str] = ENV
) -> WorkerProcess:
    options: dict[str, object] = {"calls_file": str(calls), **(HANG if hang else {})}
    return WorkerProcess(redis.url, task="asr", model=model, engine="noop", max_batch_size=1, max_wait_ms=0,
                         engine_options=options, env=env)  # fmt: skip


def kill(w: WorkerProcess) -> None:
    # A hung worker never finishes its drain; SIGKILL is what the kubelet ends up doing too.
    w.proc.kill()
    w.proc.wait()


def calls(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def test_a_hung_batch_fails_liveness_and_another_worker_serves_its_job(
    redis_server: RedisServer, client: JobClient, tmp_path: Path
) -> None:
    env = {**ENV, "KUBESPEECH_QUEUE_MAX_DELIVERIES": "3"}
    hung = worker(redis_server, "m-hung", tmp_path / "hung.txt", hang=True, env=env)
    healthy: WorkerProcess | None = None
    try:
        hung.wait_ready()
        call = asyncio.create_task(client.call("m-hung", asr_meta(), audio(50), timeout_s=30))

        async def holds_it() -> bool:
            return bool(json.loads(hung.get("/inflight")[1])["in_flight"] == 1)

        await until(holds_it, "the hanging worker never took the job")
        assert hung.get("/healthz")[0] == 200, "unhealthy before the batch outran max_batch_s"

        async def unhealthy() -> bool:
            return hung.get("/healthz")[0] == 503

        await until(unhealthy, "/healthz never failed for a batch running past max_batch_s", timeout=5)
        body = json.loads(hung.get("/healthz")[1])
        assert body["status"] == "unhealthy" and "max_batch_s" in body["reason"]
        status, why = hung.get("/readyz")
        assert status == 503 and "max_batch_s" in why
        # It gave the job up, so it holds nothing and no longer counts as a live worker.
        assert json.loads(hung.get("/inflight")[1]) == {"in_flight": 0, "draining": False}

        async def left() -> bool:
            return await live_workers(client.redis, Keys(), "m-hung", 10) == 0

        await until(left, "the hung worker still counts as live")
        assert not call.done()

        healthy = worker(redis_server, "m-hung", tmp_path / "healthy.txt", hang=False, env=env)
        result = await asyncio.wait_for(call, 15)
        assert result.header["text"] == "50 samples"
        assert calls(tmp_path / "hung.txt") == ["50"]
        assert calls(tmp_path / "healthy.txt") == ["50"]
        # Exactly one result was published: nothing is left on the reply list or in the queue.
        keys = Keys()
        assert await client.redis.keys(keys.reply("*")) == []
        assert (await client.depth("m-hung")).total == 0
        assert await client.redis.xlen(keys.dead_letter("m-hung")) == 0
    finally:
        kill(hung)
        if healthy is not None:
            assert healthy.stop() == 0


async def test_when_every_worker_hangs_the_job_is_dead_lettered_after_max_deliveries(
    redis_server: RedisServer, client: JobClient, tmp_path: Path
) -> None:
    workers = [worker(redis_server, "m-all-hung", tmp_path / f"w{i}.txt", hang=True) for i in range(2)]
    try:
        for w in workers:
            w.wait_ready()
        started = time.monotonic()
        with pytest.raises(JobFailed) as failed:
            await client.call("m-all-hung", asr_meta(), audio(60), timeout_s=20)
        assert time.monotonic() - started < 10
        assert "dead-letter" in failed.value.message
        # Delivery 1 hung on one worker, delivery 2 (the last allowed) on the other.
        assert sorted(calls(tmp_path / "w0.txt") + calls(tmp_path / "w1.txt")) == ["60", "60"]
        dead: Any = await client.redis.xrange(Keys().dead_letter("m-all-hung"))
        assert len(dead) == 1
        fields = dead[0][1]
        assert fields[b"deliveries"] == b"2"
        assert b"did not finish within 1 s" in fields[b"reason"]
        assert (await client.depth("m-all-hung")).total == 0
    finally:
        for w in workers:
            kill(w)


async def test_a_hung_batch_is_kept_claimed_only_until_its_deadline(
    redis_server: RedisServer, client: JobClient, tmp_path: Path
) -> None:
    # The batch bound is far away: only the job's own deadline may end the keep-alive.
    env = {**ENV, "KUBESPEECH_WORKER_MAX_BATCH_S": "300"}
    hung = worker(redis_server, "m-late-hung", tmp_path / "hung.txt", hang=True, env=env)
    other: WorkerProcess | None = None
    try:
        hung.wait_ready()
        with pytest.raises(DeadlineExceeded):
            await client.call("m-late-hung", asr_meta(), audio(70), timeout_s=1.5)
        assert calls(tmp_path / "hung.txt") == ["70"]
        assert hung.get("/healthz")[0] == 200
        other = worker(redis_server, "m-late-hung", tmp_path / "other.txt", hang=False, env=env)

        async def drained() -> bool:
            return (await client.depth("m-late-hung")).total == 0

        # Kept claimed forever, the entry would stay in flight; released, the other worker drops it unrun.
        await until(drained, "the hung worker kept the expired job claimed")
        assert calls(tmp_path / "other.txt") == []
    finally:
        kill(hung)
        if other is not None:
            assert other.stop() == 0
