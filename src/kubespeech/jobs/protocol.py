"""The Redis Streams job protocol: enqueue, claim in micro-batches, publish once, reclaim, dead-letter, depth.

Layout (``{p}`` is the key prefix, ``{m}`` a model queue name):

- ``{p}:q:{m}``    stream of jobs; consumer group ``workers``; entries are XACKed *and* XDELed once their
  result is published, so ``XLEN`` is the number of outstanding jobs (waiting + in flight) and
  ``XPENDING`` (summary) the number in flight: queue depth is two O(1) reads, on Redis 6.2 and 7.
- ``{p}:p:{id}``   payload of one job when it is larger than the inline limit: stored once, read by whichever
  worker gets the entry (a reclaim copies only the small stream entry, never the audio).
- ``{p}:r:{id}``   list the result is pushed to; the API waits on it with BLPOP (no polling).
- ``{p}:d:{id}``   "result published" marker set with NX: a job that two workers finish (a slow worker and the
  one that reclaimed its entry) is delivered to its caller exactly once.
- ``{p}:dlq:{m}``  dead-letter stream: jobs that failed on every allowed delivery.
- ``{p}:w:{m}``    sorted set of live workers (member: consumer name, score: last heartbeat in ms).
- ``{p}:models``   hash: model queue name -> JSON description published by its workers.
- ``{p}:c:{id}``   stream of one *streaming* job's audio (meta ``stream`` true), read by the API with XREAD
  BLOCK as entries arrive: ``{seq, sr, pcm}`` per chunk (seq from 0, 16-bit mono PCM at rate ``sr``), then
  one terminal entry, ``{done: 1, chunks, duration, rev}`` (``rev``: the worker's model revision) or ``{error: code, message, e: error JSON}``. The TTL
  (the job's deadline plus the result TTL) is renewed on every XADD. A worker that dies mid-stream leaves
  its entry pending; whoever reclaims it synthesizes again *from the beginning*, appending seq 0, 1, ...
  once more after the chunks already there: the reader skips every seq at or below the last it forwarded,
  so its client hears each chunk once. A streaming job is still published like any other (a small result
  without audio on ``{p}:r:{id}``, nobody reads it), so acks, reclaims and the dead-letter path are shared.
- ``{p}:x:{id}``   "stop" marker of a streaming job whose reader went away (client disconnected): the worker
  checks it with every chunk it appends and stops synthesizing.

Every key except the queue streams carries a TTL, so a caller that gives up leaves nothing behind.

A caller that stops waiting for a job no worker has claimed yet (the API's cold-start hold ended in a 503,
or its client disconnected) *abandons* it: in one script, the entry is replaced by a tombstone (same job
id, no payload or metadata, deadline 0, field ``x`` = 1), so it can never reach an engine. The tombstone
still counts in the queue depth (the demand that scales a pool from zero) until a worker drains it by
answering ``DEADLINE_EXCEEDED`` without running it. A job some worker already holds is not abandoned:
its caller keeps waiting for the result instead.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from kubespeech.config import QueueSettings
from kubespeech.errors import DeadlineExceeded, KubespeechError, PayloadTooLarge, QueueFull

GROUP = "workers"
_RESULT_MAGIC = b"KS1"

# Enqueue atomically: refuse when the queue is at its bound, create the consumer group with the stream
# (from id 0, so nothing added before a worker starts is skipped), store a large payload once.
_ENQUEUE_LUA = """
local depth = redis.call('XLEN', KEYS[1])
if depth == 0 and redis.call('EXISTS', KEYS[1]) == 0 then
  redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[4], '0', 'MKSTREAM')
end
if depth >= tonumber(ARGV[1]) then
  if ARGV[5] == '1' then
    -- The caller is already blocked on its reply list in the same round trip: wake it up.
    redis.call('RPUSH', KEYS[3], '')
    redis.call('PEXPIRE', KEYS[3], ARGV[2])
  end
  return depth
end
if ARGV[3] ~= '' then
  redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
end
return redis.call('XADD', KEYS[1], '*', unpack(ARGV, 6))
"""

# Publish a result exactly once, then acknowledge and remove the entry and its payload.
_PUBLISH_LUA = """
local fresh = redis.call('SET', KEYS[3], '1', 'NX', 'PX', ARGV[4])
if fresh then
  redis.call('RPUSH', KEYS[2], ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('DEL', KEYS[4])
if fresh then return 1 end
return 0
"""


# Abandon a job only while no worker has claimed it: not in the group's pending list and still in the
# stream means never delivered. Replacing the entry (rather than deleting it) keeps the demand visible in
# the queue depth; a deadline of 0 makes every worker drop it whatever its clock says. Returns 1 when
# abandoned, 0 when a worker holds it, -1 when it is gone (finished, or Redis lost it).
_ABANDON_LUA = """
local held = redis.pcall('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if type(held) ~= 'table' or held['err'] then return -1 end
if #held > 0 then return 0 end
local found = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
if #found == 0 then return -1 end
local ts = '0'
local fields = found[1][2]
for i = 1, #fields, 2 do
  if fields[i] == 'ts' then ts = fields[i + 1] end
end
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('DEL', KEYS[2])
redis.call('XADD', KEYS[1], '*', 'id', ARGV[3], 'm', '{}', 'dl', '0', 'ts', ts, 'b', '', 'x', '1')
return 1
"""


class Keys:
    """Key names of one stack (one prefix)."""

    def __init__(self, prefix: str = "ks") -> None:
        self.prefix = prefix

    def queue(self, model: str) -> str:
        return f"{self.prefix}:q:{model}"

    def dead_letter(self, model: str) -> str:
        return f"{self.prefix}:dlq:{model}"

    def payload(self, job_id: str) -> str:
        return f"{self.prefix}:p:{job_id}"

    def reply(self, job_id: str) -> str:
        return f"{self.prefix}:r:{job_id}"

    def done(self, job_id: str) -> str:
        return f"{self.prefix}:d:{job_id}"

    def workers(self, model: str) -> str:
        return f"{self.prefix}:w:{model}"

    def chunks(self, job_id: str) -> str:
        return f"{self.prefix}:c:{job_id}"

    def stop(self, job_id: str) -> str:
        return f"{self.prefix}:x:{job_id}"

    @property
    def models(self) -> str:
        return f"{self.prefix}:models"


@dataclass(slots=True)
class Job:
    """One unit of work as a worker sees it."""

    job_id: str
    model: str
    meta: dict[str, Any]
    payload: bytes
    deadline: float
    enqueued_at: float
    entry_id: str
    payload_key: str | None = None
    deliveries: int = 1
    abandoned: bool = False  # its caller stopped waiting before any worker claimed it (a tombstone)

    @property
    def expired(self) -> bool:
        return self.abandoned or time.time() > self.deadline


@dataclass(slots=True, frozen=True)
class Ticket:
    """A job the caller enqueued: enough to wait for it, or to abandon it."""

    job_id: str
    model: str
    entry_id: str


@dataclass(slots=True)
class Result:
    """A job's outcome: a JSON header and an optional binary body (audio), or a typed error."""

    header: dict[str, Any] = field(default_factory=dict)
    body: bytes = b""
    error: KubespeechError | None = None

    def encode(self) -> bytes:
        head = dict(self.header)
        if self.error is not None:
            head["error"] = self.error.to_dict()
        raw = orjson.dumps(head)
        return _RESULT_MAGIC + len(raw).to_bytes(4, "big") + raw + self.body

    @staticmethod
    def decode(data: bytes) -> Result:
        if data[:3] != _RESULT_MAGIC:
            raise ValueError("not a kubespeech result")
        n = int.from_bytes(data[3:7], "big")
        head = orjson.loads(data[7 : 7 + n])
        err = head.pop("error", None)
        return Result(
            header=head,
            body=data[7 + n :],
            error=KubespeechError.from_dict(err) if err else None,
        )

    def raise_for_error(self) -> Result:
        if self.error is not None:
            raise self.error
        return self


@dataclass(slots=True, frozen=True)
class QueueDepth:
    """Jobs outstanding on one model queue."""

    waiting: int
    in_flight: int

    @property
    def total(self) -> int:
        return self.waiting + self.in_flight


def _decode_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def queue_depth(redis: Redis, keys: Keys, model: str) -> QueueDepth:
    """Waiting and in-flight jobs of ``model``: XLEN and the XPENDING summary, both O(1)."""
    queue = keys.queue(model)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xlen(queue)
        pipe.xpending(queue, GROUP)
        try:
            length, pending = await pipe.execute(raise_on_error=False)
        except ResponseError:
            return QueueDepth(0, 0)
    if isinstance(length, Exception):
        length = 0
    in_flight = 0 if isinstance(pending, Exception) else int(pending.get("pending", 0) or 0)
    return QueueDepth(waiting=max(int(length) - in_flight, 0), in_flight=in_flight)


async def live_workers(redis: Redis, keys: Keys, model: str, ttl_s: float) -> int:
    """Workers of ``model`` that sent a heartbeat in the last ``ttl_s`` seconds."""
    now_ms = time.time() * 1000
    return int(await redis.zcount(keys.workers(model), now_ms - ttl_s * 1000, "+inf"))


class JobClient:
    """The producer side (API server): submit a job and wait for its single result."""

    def __init__(self, redis: Redis, settings: QueueSettings | None = None, prefix: str = "ks") -> None:
        self.redis = redis
        self.settings = settings or QueueSettings()
        self.keys = Keys(prefix)
        self._enqueue = redis.register_script(_ENQUEUE_LUA)
        self._abandon = redis.register_script(_ABANDON_LUA)
        # Every caller waiting for a result holds a pooled connection (BLPOP). Capping the waits below the
        # pool size leaves connections for everything else (enqueues, abandons, refreshes, usage), so a
        # burst larger than the pool queues here instead of failing at the pool.
        pool_size = int(getattr(redis.connection_pool, "max_connections", 0) or 2**31)
        self.max_waiting = max(1, pool_size - max(2, pool_size // 16))
        self._waiting = asyncio.Semaphore(self.max_waiting)

    def _prepare(
        self, model: str, meta: dict[str, Any], payload: bytes, timeout: float, same_round_trip: bool
    ) -> tuple[str, list[Any], list[Any]]:
        if len(payload) > self.settings.max_payload_bytes:
            raise PayloadTooLarge(
                f"payload of {len(payload)} bytes exceeds the limit of {self.settings.max_payload_bytes} bytes"
            )
        now = time.time()
        job_id = uuid.uuid4().hex
        ttl_ms = int((timeout + self.settings.result_ttl_s) * 1000)
        inline = len(payload) <= self.settings.inline_payload_max_bytes
        fields: list[Any] = [
            "id", job_id,
            "m", orjson.dumps(meta),
            "dl", f"{now + timeout:.3f}",
            "ts", f"{now:.6f}",
        ]  # fmt: skip
        if inline:
            fields += ["b", payload]
        keys = [self.keys.queue(model), self.keys.payload(job_id), self.keys.reply(job_id)]
        args = [
            self.settings.max_length,
            ttl_ms,
            b"" if inline else payload,
            GROUP,
            "1" if same_round_trip else "0",
            *fields,
        ]
        return job_id, keys, args

    def _queue_full(self, model: str, depth: int) -> QueueFull:
        return QueueFull(
            f"queue for model '{model}' is full ({depth} jobs outstanding); retry later", retry_after=1.0
        )

    async def submit(
        self, model: str, meta: dict[str, Any], payload: bytes = b"", *, timeout_s: float | None = None
    ) -> str:
        """Put a job on ``model``'s queue and return its id; raises QueueFull when the queue is at its bound."""
        return (await self.enqueue(model, meta, payload, timeout_s=timeout_s)).job_id

    async def enqueue(
        self, model: str, meta: dict[str, Any], payload: bytes = b"", *, timeout_s: float | None = None
    ) -> Ticket:
        """Like ``submit``, but returns a ticket that can also ``abandon`` the job."""
        timeout = timeout_s if timeout_s is not None else self.settings.default_deadline_s
        job_id, keys, args = self._prepare(model, meta, payload, timeout, same_round_trip=False)
        res = await self._enqueue(keys=keys, args=args)
        if isinstance(res, int):
            raise self._queue_full(model, res)
        return Ticket(job_id=job_id, model=model, entry_id=_decode_str(res))

    async def abandon(self, ticket: Ticket) -> Literal["abandoned", "claimed", "gone"]:
        """Make sure no engine ever runs a job whose caller stops waiting for it.

        ``abandoned``: it was still unclaimed and is now a tombstone; it will not run. ``claimed``: a worker
        took it first; its result will come, so the caller may keep waiting. ``gone``: it is no longer
        queued (its result was already published, or Redis lost it).
        """
        res = await self._abandon(
            keys=[self.keys.queue(ticket.model), self.keys.payload(ticket.job_id)],
            args=[GROUP, ticket.entry_id, ticket.job_id],
        )
        return "abandoned" if res == 1 else "claimed" if res == 0 else "gone"

    async def wait(self, job_id: str, timeout_s: float) -> Result:
        """Block until the job's result arrives (BLPOP, no polling); DeadlineExceeded after ``timeout_s``.

        Waiting for a free connection (see ``max_waiting``) counts against ``timeout_s``.
        """
        until = time.monotonic() + timeout_s
        try:
            await asyncio.wait_for(self._waiting.acquire(), timeout=max(timeout_s, 0.01))
        except TimeoutError:
            raise DeadlineExceeded(f"no result within {timeout_s:.1f} s", job_id=job_id) from None
        try:
            left = max(until - time.monotonic(), 0.01)
            popped: Any = await self.redis.blpop([self.keys.reply(job_id)], timeout=left)
        finally:
            self._waiting.release()
        if popped is None:
            raise DeadlineExceeded(f"no result within {timeout_s:.1f} s", job_id=job_id)
        return Result.decode(popped[1])

    async def call(
        self, model: str, meta: dict[str, Any], payload: bytes = b"", *, timeout_s: float | None = None
    ) -> Result:
        """Submit and wait in ONE round trip; raises the job's own typed error when it failed.

        The enqueue script and the BLPOP on the job's reply list are sent together on one connection: Redis
        runs the script, then blocks the same connection until the worker's result arrives (or the script
        itself pushed a wake-up because the queue was full). Only when the script fails before it runs
        (e.g. NOSCRIPT after a Redis restart) is the connection, still blocked in BLPOP, dropped.

        When ``max_waiting`` callers already wait for results, the job is enqueued on its own (so the queue
        bound still answers QueueFull at once, and the demand shows in the queue depth) and its caller
        waits for a free connection before waiting for the result: a burst beyond the connection pool
        queues, it never fails at the pool.
        """
        timeout = timeout_s if timeout_s is not None else self.settings.default_deadline_s
        if self._waiting.locked():
            started = time.monotonic()
            ticket = await self.enqueue(model, meta, payload, timeout_s=timeout)
            result = await self.wait(ticket.job_id, timeout - (time.monotonic() - started))
            return result.raise_for_error()
        async with self._waiting:
            return await self._call_one_round_trip(model, meta, payload, timeout)

    async def _call_one_round_trip(
        self, model: str, meta: dict[str, Any], payload: bytes, timeout: float
    ) -> Result:
        job_id, keys, args = self._prepare(model, meta, payload, timeout, same_round_trip=True)
        pool = self.redis.connection_pool
        for attempt in range(3):
            conn = await pool.get_connection()
            sent = False
            try:
                await conn.send_packed_command(
                    conn.pack_commands(
                        [
                            ("EVALSHA", self._enqueue.sha, len(keys), *keys, *args),
                            ("BLPOP", keys[2], f"{max(timeout, 0.01):.3f}"),
                        ]
                    )
                )
                sent = True
                try:
                    enqueued = await conn.read_response(disable_decoding=True)
                except NoScriptError:
                    await conn.disconnect()
                    self._enqueue.sha = await self.redis.script_load(_ENQUEUE_LUA)
                    continue
                except ResponseError:
                    await conn.disconnect()
                    raise
                if isinstance(enqueued, int):
                    await conn.read_response(disable_decoding=True)  # the wake-up the script pushed
                    raise self._queue_full(model, enqueued)
                # The client's socket timeout (redis-py's default is 5 s) would cut a long BLPOP short:
                # read with the job's own deadline plus a margin for Redis to answer nil.
                popped = await conn.read_response(disable_decoding=True, timeout=timeout + 5.0)
                if popped is None:
                    # Either Redis answered nil or our read gave up first; only a fresh connection is
                    # certainly clean, and this happens only on a missed deadline.
                    await conn.disconnect()
            except (RedisConnectionError, OSError):
                # A pooled connection that went stale fails on send; the job id is reused, so even a
                # job that did get queued before the failure is answered once (the result marker is per id).
                if sent or attempt == 2:
                    raise
                continue
            finally:
                await pool.release(conn)
            if popped is None:
                raise DeadlineExceeded(f"no result within {timeout:.1f} s", job_id=job_id)
            return Result.decode(popped[1]).raise_for_error()
        raise RedisConnectionError("could not enqueue after reconnecting")

    async def depth(self, model: str) -> QueueDepth:
        return await queue_depth(self.redis, self.keys, model)

    async def read_chunks(
        self, job_id: str, after: str, block_s: float, count: int = 64
    ) -> list[tuple[str, dict[bytes, bytes]]]:
        """Entries of a streaming job's chunk stream after id ``after`` ("0-0": from the start); waits up to
        ``block_s`` for the first one (XREAD BLOCK, no polling); [] when none came."""
        async with self._waiting:
            resp: Any = await self.redis.xread(
                {self.keys.chunks(job_id): after}, count=count, block=max(int(block_s * 1000), 1)
            )
        if not resp:
            return []
        return [(_decode_str(eid), fields) for eid, fields in resp[0][1]]

    async def stop_stream(self, job_id: str) -> None:
        """Tell the worker streaming this job that nobody reads it any more."""
        ttl_ms = int(self.settings.result_ttl_s * 1000)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.stop(job_id), "1", px=ttl_ms)
            pipe.delete(self.keys.chunks(job_id))
            await pipe.execute()


class JobConsumer:
    """The consumer side (a worker): claim micro-batches, publish results once, reclaim, dead-letter."""

    def __init__(
        self,
        redis: Redis,
        model: str,
        consumer: str,
        settings: QueueSettings | None = None,
        prefix: str = "ks",
    ) -> None:
        self.redis = redis
        self.model = model
        self.consumer = consumer
        self.settings = settings or QueueSettings()
        self.keys = Keys(prefix)
        self.queue = self.keys.queue(model)
        self._publish = redis.register_script(_PUBLISH_LUA)
        self._reclaim_cursor = "0-0"

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.queue, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read_batch(self, max_batch: int, max_wait_ms: int, block_ms: int = 1000) -> list[Job]:
        """Wait up to ``block_ms`` for a first job, then up to ``max_wait_ms`` more to fill the batch."""
        entries = await self._read(max_batch, block_ms)
        if entries and len(entries) < max_batch and max_wait_ms > 0:
            until = time.monotonic() + max_wait_ms / 1000
            while len(entries) < max_batch:
                left_ms = int((until - time.monotonic()) * 1000)
                if left_ms < 1:
                    break
                more = await self._read(max_batch - len(entries), left_ms)
                if not more:
                    break
                entries += more
        return await self._to_jobs(entries, deliveries=None)

    async def _read(self, count: int, block_ms: int) -> list[tuple[Any, dict[Any, Any]]]:
        resp: Any = await self.redis.xreadgroup(
            GROUP, self.consumer, {self.queue: ">"}, count=count, block=max(block_ms, 1)
        )
        if not resp:
            return []
        return list(resp[0][1])

    async def reclaim(self, max_count: int) -> list[Job]:
        """Take over entries a silent worker held longer than the visibility timeout (XAUTOCLAIM)."""
        min_idle = int(self.settings.visibility_timeout_s * 1000)
        resp = await self.redis.xautoclaim(
            self.queue, GROUP, self.consumer, min_idle, start_id=self._reclaim_cursor, count=max_count
        )
        self._reclaim_cursor = _decode_str(resp[0])
        entries = [e for e in resp[1] if e and e[1]]
        if not entries:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id, _ in entries:
                pipe.xpending_range(self.queue, GROUP, min=entry_id, max=entry_id, count=1)
            infos = await pipe.execute()
        deliveries = {
            _decode_str(info[0]["message_id"]): int(info[0]["times_delivered"]) for info in infos if info
        }
        return await self._to_jobs(entries, deliveries)

    async def _to_jobs(
        self, entries: list[tuple[Any, dict[Any, Any]]], deliveries: dict[str, int] | None
    ) -> list[Job]:
        jobs: list[Job] = []
        for entry_id, fields in entries:
            eid = _decode_str(entry_id)
            job_id = _decode_str(fields[b"id"])
            inline = fields.get(b"b")
            abandoned = fields.get(b"x") == b"1"
            jobs.append(
                Job(
                    job_id=job_id,
                    model=self.model,
                    meta=orjson.loads(fields[b"m"]),
                    payload=inline if inline is not None else b"",
                    deadline=float(fields[b"dl"]),
                    enqueued_at=float(fields[b"ts"]),
                    entry_id=eid,
                    payload_key=None if inline is not None else self.keys.payload(job_id),
                    deliveries=(deliveries or {}).get(eid, 1),
                    abandoned=abandoned,
                )
            )
        external = [j for j in jobs if j.payload_key]
        if external:
            blobs: Any = await self.redis.mget([j.payload_key for j in external if j.payload_key])
            for job, blob in zip(external, blobs, strict=True):
                job.payload = blob if blob is not None else b""
                if blob is None:
                    job.meta["_payload_missing"] = True
        return jobs

    async def extend(self, jobs: list[Job]) -> None:
        """Tell the group these jobs are still being worked on (resets their idle time; no delivery counted)."""
        if jobs:
            await self.redis.xclaim(
                self.queue, GROUP, self.consumer, 0, [j.entry_id for j in jobs], justid=True
            )

    async def release(self, jobs: list[Job]) -> None:
        """Give up these jobs unanswered: the next reclaim, by any worker, takes them over as a new delivery.

        Marking them idle for a full visibility timeout (XCLAIM IDLE; JUSTID counts no delivery here) makes
        them reclaimable at once instead of one visibility timeout after the last keep-alive.
        """
        if jobs:
            idle_ms = int(self.settings.visibility_timeout_s * 1000)
            await self.redis.xclaim(
                self.queue, GROUP, self.consumer, 0, [j.entry_id for j in jobs], idle=idle_ms, justid=True
            )

    async def publish(self, results: list[tuple[Job, Result]]) -> list[bool]:
        """Publish each result once (NX marker), then XACK+XDEL the entry; True where this call delivered."""
        await self._end_streams(results)
        ttl_ms = int(self.settings.result_ttl_s * 1000)
        calls = [
            (
                self.queue,
                self.keys.reply(job.job_id),
                self.keys.done(job.job_id),
                job.payload_key or self.keys.payload(job.job_id),
                GROUP,
                job.entry_id,
                result.encode(),
                ttl_ms,
            )
            for job, result in results
        ]
        out: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for _ in range(2):
            # EVALSHA straight into the pipeline: redis-py's script registration would add a SCRIPT EXISTS
            # round trip to every batch. A NOSCRIPT (Redis restarted) loads it and redoes those calls only;
            # publishing is idempotent (NX marker, XACK, XDEL).
            async with self.redis.pipeline(transaction=False) as pipe:
                for i in todo:
                    pipe.evalsha(self._publish.sha, 4, *calls[i])
                replies = await pipe.execute(raise_on_error=False)
            missing = []
            for i, reply in zip(todo, replies, strict=True):
                if isinstance(reply, NoScriptError):
                    missing.append(i)
                elif isinstance(reply, Exception):
                    raise reply
                else:
                    out[i] = reply
            if not missing:
                break
            self._publish.sha = await self.redis.script_load(_PUBLISH_LUA)
            todo = missing
        return [bool(x) for x in out]

    async def append_chunk(self, job: Job, seq: int, sample_rate: int, pcm: bytes) -> bool:
        """Append one audio chunk to a streaming job's chunk stream; False when its reader asked to stop."""
        key = self.keys.chunks(job.job_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(key, {"seq": seq, "sr": sample_rate, "pcm": pcm})
            pipe.pexpire(key, self._stream_ttl_ms(job))
            pipe.exists(self.keys.stop(job.job_id))
            _, _, stopped = await pipe.execute()
        return not stopped

    def _stream_ttl_ms(self, job: Job) -> int:
        left = max(job.deadline - time.time(), 0.0)
        return int((left + self.settings.result_ttl_s) * 1000)

    async def _end_streams(self, results: list[tuple[Job, Result]]) -> None:
        """The terminal entry of every streaming job among ``results`` (before its result is published, so
        a failure in between redoes the job rather than leaving its reader without an end)."""
        ends = [(job, result) for job, result in results if job.meta.get("stream")]
        if not ends:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for job, result in ends:
                key = self.keys.chunks(job.job_id)
                fields: dict[Any, Any]
                if result.error is not None:
                    fields = {
                        "error": result.error.code,
                        "message": result.error.message,
                        "e": orjson.dumps(result.error.to_dict()),
                    }
                else:
                    fields = {
                        "done": 1,
                        "chunks": int(result.header.get("chunks") or 0),
                        "duration": float(result.header.get("duration") or 0.0),
                    }
                    if result.header.get("rev"):
                        fields["rev"] = str(result.header["rev"])
                pipe.xadd(key, fields)
                pipe.pexpire(key, self._stream_ttl_ms(job))
            await pipe.execute()

    async def dead_letter(self, job: Job, reason: str) -> None:
        """Record the job in the dead-letter stream; its caller gets a JOB_FAILED error."""
        from kubespeech.errors import JobFailed

        await self.redis.xadd(
            self.keys.dead_letter(self.model),
            {
                "id": job.job_id,
                "m": orjson.dumps(job.meta),
                "deliveries": job.deliveries,
                "reason": reason,
                "consumer": self.consumer,
            },
            maxlen=self.settings.dead_letter_max_length,
            approximate=True,
        )
        err = JobFailed(
            f"job failed on {job.deliveries} deliveries and was moved to the dead-letter queue: {reason}",
            job_id=job.job_id,
        )
        await self.publish([(job, Result(error=err))])

    async def heartbeat(self, info: dict[str, Any] | None = None) -> None:
        """Announce this worker as live (and, with ``info``, describe the model it serves)."""
        now_ms = time.time() * 1000
        ttl_ms = self.settings.worker_ttl_s * 1000
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(self.keys.workers(self.model), {self.consumer: now_ms})
            pipe.zremrangebyscore(self.keys.workers(self.model), "-inf", now_ms - 6 * ttl_ms)
            if info is not None:
                pipe.hset(self.keys.models, self.model, orjson.dumps(info))
            await pipe.execute()

    async def leave(self) -> None:
        """Stop counting as live (on graceful shutdown)."""
        await self.redis.zrem(self.keys.workers(self.model), self.consumer)
