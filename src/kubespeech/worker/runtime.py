"""The worker loop: load once; pull a micro-batch; run the engine; publish one result per job; ack.

Lifecycle (Triton python_backend's shape): load the engine once (readiness stays false until then),
execute batches, return exactly one result per job with per-job errors, and on SIGTERM stop pulling,
finish what is in flight, publish, ack and exit 0. A SIGKILL loses nothing: entries still pending in the
consumer group are reclaimed by another worker after the visibility timeout. A job whose deadline passed
before processing (or that its caller abandoned) is answered DEADLINE_EXCEEDED without reaching the
engine; it counts as ``expired``, not as an error. The health server reports how many jobs the worker
holds (``in_flight``), so the operator can make Kubernetes remove idle pods first when scaling down.

A hung engine (a stuck CUDA call never returns) is bounded twice. While a batch runs, its jobs are kept
claimed only until their own deadlines (their callers have given up by then; a worker that reclaims one
later drops it unrun). A batch running longer than ``max_batch_s`` makes the worker hung: ``/healthz`` and
``/readyz`` fail with the reason (the kubelet restarts the pod; readiness only reports, since workers pull
their work), it stops counting as a live worker, and it gives its jobs up: a job on its last allowed
delivery goes to the dead-letter stream (its caller gets JOB_FAILED), the others are released at once for
another worker's reclaim, which counts a new delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from kubespeech.config import QueueSettings, RedisSettings, WorkerSettings
from kubespeech.engines.registry import EngineSpec, load_engine
from kubespeech.errors import DeadlineExceeded, JobFailed
from kubespeech.jobs import Job, JobConsumer, Result
from kubespeech.redis_client import connect
from kubespeech.worker.handlers import Outcome, TaskHandler, make_handler
from kubespeech.worker.health import HealthServer
from kubespeech.worker.live_stt import start_live_sessions
from kubespeech.worker.metrics import WorkerMetrics
from kubespeech.worker.revision import model_revision
from kubespeech.worker.streaming import is_streaming, run_streams

log = logging.getLogger(__name__)

_REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


class Worker:
    """One worker process serving one model queue."""

    def __init__(
        self,
        settings: WorkerSettings,
        redis_settings: RedisSettings | None = None,
        queue_settings: QueueSettings | None = None,
        *,
        engine: Any | None = None,
    ) -> None:
        self.settings = settings
        self.redis_settings = redis_settings or RedisSettings()
        self.queue_settings = queue_settings or QueueSettings()
        self.consumer_name = (
            settings.consumer_name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        )
        self.engine = engine or load_engine(
            EngineSpec(
                task=settings.task,
                engine=settings.engine,
                model_path=settings.model_path,
                device=settings.device,
                options=dict(settings.engine_options),
            )
        )
        self.handler: TaskHandler = make_handler(settings.task, self.engine)
        self.metrics = WorkerMetrics(settings.model, settings.task, settings.engine)
        self.redis: Redis | None = None
        self.consumer: JobConsumer | None = None
        self.model_loaded = False
        self.revision: str | None = None  # set once the engine has loaded (see worker/revision.py)
        self.load_error: str | None = None
        self.redis_ok = False
        self.draining = False
        self.in_flight = 0  # jobs this worker claimed and has not yet published (or left to be reclaimed)
        self._batch_started: float | None = None  # monotonic start of the engine call now running
        self._stop = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.health = HealthServer(
            settings.health_host,
            settings.health_port,
            is_alive=self._liveness,
            is_ready=self._readiness,
            registry=self.metrics.registry,
            load=self._load,
        )

    # ----- lifecycle -------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop pulling new work; in-flight work finishes (graceful drain)."""
        if not self.draining:
            log.info("draining: no new jobs will be pulled", extra={"model": self.settings.model})
        self.draining = True
        self._stop.set()

    def _hung(self) -> str | None:
        """Why the engine counts as hung (its batch outran ``max_batch_s``), or None."""
        started = self._batch_started
        if started is None:
            return None
        running = time.monotonic() - started
        if running <= self.settings.max_batch_s:
            return None
        return (
            f"engine batch running for {running:.1f} s, longer than max_batch_s={self.settings.max_batch_s:g}"
        )

    def _liveness(self) -> tuple[bool, str]:
        if self.load_error:
            return False, f"model failed to load: {self.load_error}"
        hung = self._hung()
        if hung:
            return False, hung
        return True, "ok"

    def _readiness(self) -> tuple[bool, str]:
        if self.load_error:
            return False, f"model failed to load: {self.load_error}"
        hung = self._hung()
        if hung:
            return False, hung
        if not self.model_loaded:
            return False, "loading model"
        if not self.redis_ok:
            return False, "redis unreachable"
        if self.draining:
            return False, "draining"
        return True, "ready"

    def _load(self) -> dict[str, Any]:
        return {"in_flight": self.in_flight, "draining": self.draining}

    def _hold(self, count: int) -> None:
        self.in_flight = count
        self.metrics.in_flight.labels(**self.metrics.labels).set(count)

    def _set_ready_gauge(self) -> None:
        self.metrics.ready.labels(**self.metrics.labels).set(1 if self._readiness()[0] else 0)

    async def run(self) -> int:
        """Run until stopped; returns the process exit code."""
        await self.health.start()
        log.info(
            "worker starting",
            extra={
                "model": self.settings.model,
                "engine": self.settings.engine,
                "health_port": self.health.port,
            },
        )
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self.engine.load)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"[:500]
            log.error("model failed to load", extra={"error": self.load_error})
            await self.health.close()
            return 1
        self.revision = model_revision(self.settings, self.handler.describe())
        self.model_loaded = True
        self.redis = connect(self.redis_settings, max_connections=16)
        self.consumer = JobConsumer(
            self.redis,
            self.settings.model,
            self.consumer_name,
            self.queue_settings,
            self.redis_settings.key_prefix,
        )
        heartbeat = asyncio.create_task(self._heartbeat_loop())
        live = start_live_sessions(self)  # live STT sessions, when the engine streams
        try:
            await self._loop()
        finally:
            if live is not None:
                # Hands its sessions off (releases the claims) before Redis closes.
                await asyncio.wait([live], timeout=15)
            heartbeat.cancel()
            try:
                await asyncio.wait_for(self.consumer.leave(), timeout=2)
            except (RedisError, *_REDIS_ERRORS, TimeoutError):
                pass
            await self.redis.aclose()
            await self.health.close()
            self._executor.shutdown(wait=False, cancel_futures=True)
            log.info("worker stopped", extra={"model": self.settings.model})
        return 0

    async def _heartbeat_loop(self) -> None:
        assert self.consumer is not None
        info = self.handler.describe()
        info.update(
            model=self.settings.model,
            batching={"max_batch_size": self.settings.max_batch_size},
            revision=self.revision,
        )
        while True:
            try:
                if self._hung():
                    # A hung worker serves nothing: the API must not count it as capacity.
                    await self.consumer.leave()
                else:
                    await self.consumer.heartbeat(info)
                self.redis_ok = True
            except _REDIS_ERRORS as exc:
                self.redis_ok = False
                log.warning("redis heartbeat failed", extra={"error": str(exc)})
            self._set_ready_gauge()
            await asyncio.sleep(self.queue_settings.worker_heartbeat_s)

    async def _loop(self) -> None:
        assert self.consumer is not None
        backoff = 0.1
        group_ready = False
        reclaim_every = max(self.queue_settings.visibility_timeout_s / 2, 0.05)
        next_reclaim = time.monotonic() + reclaim_every
        while not self._stop.is_set():
            try:
                if not group_ready:
                    await self.consumer.ensure_group()
                    group_ready = True
                jobs: list[Job] = []
                if time.monotonic() >= next_reclaim:
                    jobs = await self.consumer.reclaim(self.settings.max_batch_size)
                    next_reclaim = time.monotonic() + reclaim_every
                    if jobs:
                        self.metrics.reclaimed.labels(**self.metrics.labels).inc(len(jobs))
                        log.info("reclaimed jobs from a silent worker", extra={"count": len(jobs)})
                if not jobs:
                    block_ms = int(min(500, max(1, (next_reclaim - time.monotonic()) * 1000)))
                    jobs = await self.consumer.read_batch(
                        self.settings.max_batch_size, self.settings.max_wait_ms, block_ms=block_ms
                    )
                self.redis_ok = True
                backoff = 0.1
                if jobs:
                    self._hold(len(jobs))
                    try:
                        await self._process(jobs)
                    finally:
                        self._hold(0)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # Redis came back empty (restart without persistence, or a flush): recreate the group.
                log.warning("consumer group missing; recreating it", extra={"model": self.settings.model})
                group_ready = False
            except _REDIS_ERRORS as exc:
                self.redis_ok = False
                self._set_ready_gauge()
                log.warning("redis unavailable, retrying", extra={"error": str(exc), "retry_in_s": backoff})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=backoff)
                backoff = min(backoff * 2, 5.0)

    # ----- one micro-batch ------------------------------------------------------------------------

    async def _process(self, jobs: list[Job]) -> None:
        assert self.consumer is not None
        labels = self.metrics.labels
        ready: list[tuple[Job, Result]] = []
        live: list[Job] = []
        expired: set[str] = set()
        now = time.time()
        for job in jobs:
            if job.deliveries > self.queue_settings.max_deliveries:
                await self.consumer.dead_letter(job, f"delivered {job.deliveries} times without a result")
                self.metrics.dead_lettered.labels(**labels).inc()
                self.metrics.errors.labels(**labels, code=JobFailed.code).inc()
                continue
            if job.meta.get("_payload_missing"):
                # Either another worker finished it (then publishing is a no-op) or the payload expired.
                ready.append((job, Result(error=JobFailed("job payload is no longer available"))))
            elif job.expired:
                # Nobody waits for it any more (deadline passed, or its caller abandoned it): never run it.
                # Publishing still acks and deletes the entry, so the queue depth drops back.
                ready.append((job, Result(error=DeadlineExceeded("job deadline passed before processing"))))
                expired.add(job.entry_id)
            else:
                live.append(job)
                self.metrics.queue_wait.labels(**labels).observe(max(now - job.enqueued_at, 0.0))
        streams = [j for j in live if is_streaming(self, j)]
        if streams:
            live = [j for j in live if not is_streaming(self, j)]
            await run_streams(self, streams)
        if live:
            ready.extend(await self._run_engine(live))
        if ready:
            await self._publish(ready, expired)

    async def _run_engine(self, jobs: list[Job]) -> list[tuple[Job, Result]]:
        assert self.consumer is not None
        labels = self.metrics.labels
        loop = asyncio.get_running_loop()
        keep_alive: list[asyncio.Task[None]] = []
        # Only a batch that outlives a third of the visibility timeout (or max_batch_s) needs watching; a
        # timer (not a task per batch) keeps the common, short batch cheap.
        timer = loop.call_later(
            max(min(self.queue_settings.visibility_timeout_s / 3, self.settings.max_batch_s), 0.05),
            lambda: keep_alive.append(asyncio.create_task(self._keep_alive(jobs))),
        )
        started = time.perf_counter()
        self._batch_started = time.monotonic()
        try:
            outcomes: list[Outcome] = await loop.run_in_executor(self._executor, self.handler.run_batch, jobs)
        finally:
            self._batch_started = None
            timer.cancel()
            for task in keep_alive:
                task.cancel()
        elapsed = time.perf_counter() - started
        self.metrics.batch_size.labels(**labels).observe(len(jobs))
        self.metrics.processing.labels(**labels).observe(elapsed)
        audio = sum(o.audio_seconds for o in outcomes)
        if audio > 0:
            self.metrics.audio_seconds.labels(**labels).inc(audio)
            self.metrics.rtf.labels(**labels).observe(elapsed / audio)
        # Engine time and batch size ride along so the API can show its own overhead beside the engine's.
        timing: dict[str, Any] = {"engine_ms": round(elapsed * 1000, 3), "batch_size": len(jobs)}
        # The revision that produced a result: the API caches it only under that revision's key.
        timing["rev"] = self.revision
        for o in outcomes:
            if o.result.error is None:
                o.result.header.update(timing)
        return [(job, o.result) for job, o in zip(jobs, outcomes, strict=True)]

    async def _keep_alive(self, jobs: list[Job]) -> None:
        """Keep the jobs claimed while the engine runs, up to their deadlines; give them up at ``max_batch_s``."""
        assert self.consumer is not None and self._batch_started is not None
        interval = max(self.queue_settings.visibility_timeout_s / 3, 0.05)
        give_up_at = self._batch_started + self.settings.max_batch_s
        while time.monotonic() < give_up_at:
            # A job past its deadline has no caller left; keeping it claimed would only hide it. The last
            # touch protects it for one visibility timeout; whoever reclaims it after that drops it unrun.
            alive = [j for j in jobs if time.time() < j.deadline]
            if alive:
                with contextlib.suppress(*_REDIS_ERRORS):
                    await self.consumer.extend(alive)
            await asyncio.sleep(max(min(interval, give_up_at - time.monotonic()), 0.0))
        await self._give_up(jobs)

    async def _give_up(self, jobs: list[Job]) -> None:
        """The engine is hung on this batch: dead-letter jobs on their last delivery, release the rest."""
        assert self.consumer is not None
        labels = self.metrics.labels
        last = [j for j in jobs if j.deliveries >= self.queue_settings.max_deliveries]
        rest = [j for j in jobs if j.deliveries < self.queue_settings.max_deliveries]
        log.error(
            "engine hung: giving up its batch",
            extra={
                "max_batch_s": self.settings.max_batch_s,
                "dead_lettered": len(last),
                "released": len(rest),
            },
        )
        # On a Redis error the jobs simply stay unclaimed: once their idle time passes the visibility
        # timeout, another worker reclaims them (and dead-letters those past max_deliveries).
        for job in last:
            with contextlib.suppress(*_REDIS_ERRORS):
                await self.consumer.dead_letter(
                    job,
                    f"engine did not finish within {self.settings.max_batch_s:g} s "
                    f"on delivery {job.deliveries} of {self.queue_settings.max_deliveries}",
                )
                self.metrics.dead_lettered.labels(**labels).inc()
                self.metrics.errors.labels(**labels, code=JobFailed.code).inc()
        with contextlib.suppress(*_REDIS_ERRORS):
            await self.consumer.release(rest)
        # It holds nothing now: the operator may remove this pod first.
        self._hold(0)

    async def _publish(self, results: list[tuple[Job, Result]], expired: set[str] | None = None) -> None:
        assert self.consumer is not None
        labels = self.metrics.labels
        delay = 0.1
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while True:
            try:
                delivered = await self.consumer.publish(results)
                break
            except _REDIS_ERRORS as exc:
                if time.monotonic() > deadline:
                    # Unacknowledged entries stay pending: another worker (or this one) will redo them.
                    log.error("could not publish results; they will be redone", extra={"error": str(exc)})
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        for (job, result), fresh in zip(results, delivered, strict=True):
            if not fresh:
                self.metrics.duplicates.labels(**labels).inc()
            if expired and job.entry_id in expired:
                # Dropped unprocessed: the worker did nothing wrong, so it is not an error.
                self.metrics.jobs.labels(**labels, status="expired").inc()
            elif result.error is None:
                self.metrics.jobs.labels(**labels, status="ok").inc()
            else:
                self.metrics.jobs.labels(**labels, status="error").inc()
                self.metrics.errors.labels(**labels, code=result.error.code).inc()
