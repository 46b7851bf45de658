"""Streaming jobs on the worker: run one through its handler, appending each chunk to the job's chunk stream
as the engine yields it, then publish its (audio-less) result like any other job's."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from kubespeech.jobs import Job

if TYPE_CHECKING:
    from kubespeech.worker.handlers import Outcome
    from kubespeech.worker.runtime import Worker


def is_streaming(worker: Worker, job: Job) -> bool:
    return bool(job.meta.get("stream")) and hasattr(worker.handler, "run_stream")


async def run_streams(worker: Worker, jobs: list[Job]) -> None:
    """Streaming jobs, one at a time; each job's result is published as soon as it ends (not after the rest
    of its micro-batch), since its reader waits for the terminal entry."""
    assert worker.consumer is not None
    consumer = worker.consumer
    metrics = worker.metrics
    labels = metrics.labels
    loop = asyncio.get_running_loop()
    run_stream = worker.handler.run_stream  # type: ignore[attr-defined]
    for job in jobs:
        seq = itertools.count()

        def emit(pcm: bytes, rate: int, job: Job = job, seq: Iterator[int] = seq) -> bool:
            # Runs in the engine thread: waiting until Redis holds the chunk keeps the order and lets a slow
            # Redis slow the engine down instead of piling chunks up in memory.
            append = consumer.append_chunk(job, next(seq), rate, pcm)
            return asyncio.run_coroutine_threadsafe(append, loop).result()

        keep_alive = asyncio.create_task(worker._keep_alive([job]))
        started = time.perf_counter()
        try:
            outcome: Outcome = await loop.run_in_executor(worker._executor, run_stream, job, emit)
        finally:
            keep_alive.cancel()
        elapsed = time.perf_counter() - started
        metrics.batch_size.labels(**labels).observe(1)
        metrics.processing.labels(**labels).observe(elapsed)
        if outcome.audio_seconds > 0:
            metrics.audio_seconds.labels(**labels).inc(outcome.audio_seconds)
            metrics.rtf.labels(**labels).observe(elapsed / outcome.audio_seconds)
        if outcome.result.error is None:
            outcome.result.header.update(
                engine_ms=round(elapsed * 1000, 3), batch_size=1, rev=worker.revision
            )
        await worker._publish([(job, outcome.result)])
