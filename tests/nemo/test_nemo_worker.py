"""The nemo engines inside the real worker runtime, against real Redis: batching, per-item errors, WER, formats."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jiwer
import numpy as np
import pytest
from redis.asyncio import Redis

from kubespeech.config import QueueSettings, RedisSettings, WorkerSettings
from kubespeech.errors import EmptyInput, UnknownVoice
from kubespeech.jobs import JobClient
from kubespeech.jobs.messages import asr_meta, pcm16_from_float, tts_meta
from kubespeech.worker.runtime import Worker
from tests.conftest import RedisServer
from tests.nemo.conftest import Speech, TtsModels
from tests.stack import WorkerProcess


@asynccontextmanager
async def running_worker(redis_server: RedisServer, **settings: Any) -> AsyncIterator[Worker]:
    """The worker runtime in this event loop (engine calls run in its executor thread)."""
    worker = Worker(
        WorkerSettings(engine="nemo", health_port=0, health_host="127.0.0.1", **settings),
        RedisSettings(url=redis_server.url),
        QueueSettings(),
    )
    task = asyncio.create_task(worker.run())
    until = time.monotonic() + 120
    while not worker.model_loaded:
        if task.done():
            raise RuntimeError(f"worker exited early: {worker.load_error}")
        assert time.monotonic() < until, "model did not load"
        await asyncio.sleep(0.05)
    try:
        yield worker
    finally:
        worker.request_stop()
        assert await asyncio.wait_for(task, 30) == 0


async def test_asr_jobs_are_batched_into_one_forward_pass_and_recognized(
    redis_server: RedisServer, redis_client: Redis, trained_ctc_model: Path, speech: Speech
) -> None:
    async with running_worker(
        redis_server, task="asr", model="nemo-asr", model_path=str(trained_ctc_model), max_batch_size=16,
        max_wait_ms=300, engine_options={"word_timestamps": True},
    ) as worker:  # fmt: skip
        engine = worker.engine
        engine.batch_size_counts.clear()
        client = JobClient(redis_client)
        # The piper voice's native 22.05 kHz audio: the worker resamples it to the model's 16 kHz.
        meta = {**asr_meta(word_timestamps=True), "sample_rate": speech.native_rate}
        payloads = [pcm16_from_float(a) for a in speech.native] + [b""]
        outcomes = await asyncio.gather(
            *(client.call("nemo-asr", meta, p, timeout_s=60) for p in payloads), return_exceptions=True
        )
        assert isinstance(outcomes[-1], EmptyInput), "an empty payload fails alone"
        texts = [o.header["text"] for o in outcomes[:-1] if not isinstance(o, BaseException)]
        assert len(texts) == len(speech.texts)
        assert jiwer.wer(speech.texts, texts) <= 0.2, texts
        for outcome, audio in zip(outcomes, speech.native, strict=False):
            assert not isinstance(outcome, BaseException)
            assert outcome.header["duration"] == pytest.approx(len(audio) / speech.native_rate, abs=0.01)
            assert outcome.header["words"], "word timestamps were asked for"
        passes = engine.batch_size_counts
        assert max(passes) >= 3, f"jobs were not grouped into one forward pass: {dict(passes)}"
        assert sum(size * n for size, n in passes.items()) == len(speech.texts)


async def test_tts_jobs_are_batched_and_return_pcm_at_the_native_rate(
    redis_server: RedisServer, redis_client: Redis, tts_models: TtsModels
) -> None:
    async with running_worker(
        redis_server, task="tts", model="nemo-tts", model_path=str(tts_models.directory), max_batch_size=8,
        max_wait_ms=300,
    ) as worker:  # fmt: skip
        engine = worker.engine
        client = JobClient(redis_client)
        described = await redis_client.hget(client.keys.models, "nemo-tts")
        assert described is not None and b"speaker-2" in described
        jobs = [
            tts_meta(text="Hello there."),
            tts_meta(text="A longer sentence for the second job.", voice="speaker-1"),
            tts_meta(text="Nobody speaks.", voice="nobody"),
            tts_meta(text="Quick!", speed=1.5, voice="speaker-2"),
        ]
        engine.last_batch_sizes = []
        calls = [asyncio.create_task(client.call("nemo-tts", m, timeout_s=60)) for m in jobs]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert isinstance(outcomes[2], UnknownVoice)
        lengths = []
        for outcome in (outcomes[0], outcomes[1], outcomes[3]):
            assert not isinstance(outcome, BaseException)
            assert outcome.header["sample_rate"] == 22050 and outcome.header["encoding"] == "pcm_s16le"
            samples = np.frombuffer(outcome.body, dtype="<i2")
            assert samples.size > 0 and samples.size % 256 == 0  # whole mel frames of hop 256
            assert outcome.header["duration"] == pytest.approx(samples.size / 22050)
            lengths.append(samples.size)
        assert lengths[1] > lengths[0] > lengths[2]
        assert max(engine.last_batch_sizes) >= 2, (
            f"jobs were not synthesized together: {engine.last_batch_sizes}"
        )


async def test_kubespeech_worker_process_serves_a_nemo_model_from_env(
    redis_server: RedisServer, redis_client: Redis, trained_ctc_model: Path, speech: Speech, tmp_path: Path
) -> None:
    # A model-cache directory as `kubespeech model fetch` leaves it: the worker finds the .nemo inside.
    cache = tmp_path / "models" / "0123abcd"
    cache.mkdir(parents=True)
    (cache / "README.md").write_text("model card")
    await asyncio.to_thread(shutil.copy, trained_ctc_model, cache / "ctc-trained.nemo")
    worker = WorkerProcess(
        redis_server.url, task="asr", model="nemo-proc", engine="nemo", max_batch_size=8, max_wait_ms=200,
        engine_options={"cpu_threads": 1},
        env={"KUBESPEECH_WORKER_MODEL_PATH": str(cache), "KUBESPEECH_WORKER_DEVICE": "cpu"},
    )  # fmt: skip
    try:
        await asyncio.to_thread(worker.wait_ready, 120)
        client = JobClient(redis_client)
        results = await asyncio.gather(
            *(client.call("nemo-proc", asr_meta(), pcm16_from_float(a), timeout_s=60) for a in speech.at_16k)
        )
        texts = [r.header["text"] for r in results]
        assert jiwer.wer(speech.texts, texts) <= 0.2, texts
        status, metrics = await asyncio.to_thread(worker.get, "/metrics")
        assert status == 200
        count = [
            line for line in metrics.splitlines() if line.startswith("kubespeech_worker_batch_size_count")
        ]
        assert count and float(count[0].split()[-1]) < len(speech.texts), "jobs were not batched"
    finally:
        assert worker.stop(30) == 0
