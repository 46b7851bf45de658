"""Cold start through the real API: held requests, 503s whose jobs never run, late workers, disconnects."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis as redis_sync
from redis.asyncio import Redis

from kubespeech.jobs import Keys, QueueDepth, queue_depth
from tests.api.conftest import ApiServer, api_settings, start_api
from tests.conftest import RedisServer
from tests.stack import WorkerProcess

ABANDONED = "cs-abandoned"
LATE = "cs-late"
DEADLINE = "cs-deadline"
GONE = "cs-gone"
MODELS = [{"name": m, "task": "tts"} for m in (ABANDONED, LATE, DEADLINE, GONE)]


def _api(redis: RedisServer, tmp: Path, **limits: float) -> Iterator[ApiServer]:
    server = start_api(api_settings(redis.url, MODELS, tmp, limits={"retry_after_s": 2, **limits}))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def short_hold_api(api_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """Held for the cold-start wait (1 s), well inside the request deadline."""
    yield from _api(
        api_redis, tmp_path_factory.mktemp("short"), cold_start_wait_s=1.0, request_timeout_s=20.0
    )


@pytest.fixture(scope="module")
def long_hold_api(api_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """Held long enough for a worker process to start."""
    yield from _api(
        api_redis, tmp_path_factory.mktemp("long"), cold_start_wait_s=25.0, request_timeout_s=30.0
    )


@pytest.fixture(scope="module")
def deadline_api(api_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """A request deadline (1.5 s) shorter than the cold-start wait: the deadline bounds the hold."""
    yield from _api(api_redis, tmp_path_factory.mktemp("dl"), cold_start_wait_s=30.0, request_timeout_s=1.5)


def speak(server: ApiServer, model: str, text: str, timeout: float = 60) -> httpx.Response:
    with server.client(timeout=timeout) as c:
        return c.post(
            "/v1/audio/speech",
            json={"model": model, "input": text, "voice": "alloy", "response_format": "wav"},
        )


def depth(redis: RedisServer, model: str) -> QueueDepth:
    async def read() -> QueueDepth:
        client = Redis.from_url(redis.url)
        try:
            return await queue_depth(client, Keys(), model)
        finally:
            await client.aclose()

    return asyncio.run(read())


def eventually(check: Callable[[], bool], what: str, timeout: float = 15) -> None:
    until = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < until, what
        time.sleep(0.05)


def metric(server: ApiServer, name: str, **labels: str) -> float:
    want = name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "} "
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(want):
            return float(line.removeprefix(want))
    return 0.0


def tts_worker(redis: RedisServer, model: str, calls: Path) -> WorkerProcess:
    return WorkerProcess(redis.url, task="tts", model=model, engine="noop", max_wait_ms=0,
                         engine_options={"calls_file": str(calls)})  # fmt: skip


def engine_calls(calls: Path) -> list[str]:
    return calls.read_text().splitlines() if calls.exists() else []


def dead_letters(redis: RedisServer, model: str) -> int:
    return int(redis_sync.Redis.from_url(redis.url).xlen(Keys().dead_letter(model)))


def test_a_503_job_never_runs_on_a_worker_that_starts_later(
    short_hold_api: ApiServer, api_redis: RedisServer, tmp_path: Path
) -> None:
    calls = tmp_path / "calls.txt"
    started = time.monotonic()
    r = speak(short_hold_api, ABANDONED, "nobody waits for this any more")
    held = time.monotonic() - started
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "WORKERS_UNAVAILABLE"
    assert r.headers["retry-after"] == "2"
    assert 0.95 <= held < 5, f"held {held:.2f} s for a 1 s cold-start wait (20 s deadline)"
    assert depth(api_redis, ABANDONED).total == 1, "the demand must stay visible to the autoscaler"
    assert metric(short_hold_api, "kubespeech_api_cold_start_waits_total", model=ABANDONED,
                  outcome="unavailable") == 1  # fmt: skip
    waited = metric(short_hold_api, "kubespeech_api_cold_start_wait_seconds_sum", model=ABANDONED,
                    outcome="unavailable")  # fmt: skip
    assert 0.95 <= waited < 5

    worker = tts_worker(api_redis, ABANDONED, calls)
    try:
        worker.wait_ready()
        eventually(lambda: depth(api_redis, ABANDONED).total == 0, "the abandoned entry was never drained")
        r = speak(short_hold_api, ABANDONED, "a new request")
        assert r.status_code == 200, r.text
        assert r.content[:4] == b"RIFF"
        assert engine_calls(calls) == ["a new request"], "the abandoned job reached the engine"
        assert dead_letters(api_redis, ABANDONED) == 0
        jobs = 'kubespeech_worker_jobs_total{engine="noop",model="%s",status="%s",task="tts"} 1.0'
        # The worker counts a job just after publishing it, so the caller may be a moment ahead.
        eventually(lambda: jobs % (ABANDONED, "ok") in worker.get("/metrics")[1], "the job was never counted")
        _, worker_metrics = worker.get("/metrics")
        assert jobs % (ABANDONED, "expired") in worker_metrics
        assert "kubespeech_worker_errors_total{" not in worker_metrics
    finally:
        assert worker.stop() == 0


def test_a_worker_that_starts_within_the_wait_serves_the_held_request(
    long_hold_api: ApiServer, api_redis: RedisServer, tmp_path: Path
) -> None:
    calls = tmp_path / "calls.txt"
    text = "held until a worker came up"
    results: dict[str, httpx.Response] = {}
    thread = threading.Thread(target=lambda: results.update(r=speak(long_hold_api, LATE, text)))
    thread.start()
    worker = None
    try:
        eventually(lambda: depth(api_redis, LATE).total == 1, "the held request's job was never queued")
        worker = tts_worker(api_redis, LATE, calls)
        thread.join(30)
        r = results["r"]
        assert r.status_code == 200, r.text
        assert r.content[:4] == b"RIFF"
        assert engine_calls(calls) == [text]
        assert depth(api_redis, LATE).total == 0
        assert metric(long_hold_api, "kubespeech_api_cold_start_waits_total", model=LATE,
                      outcome="served") == 1  # fmt: skip
        assert metric(long_hold_api, "kubespeech_api_cold_start_wait_seconds_count", model=LATE,
                      outcome="served") == 1  # fmt: skip
    finally:
        thread.join(30)
        if worker is not None:
            assert worker.stop() == 0


def test_the_deadline_bounds_the_hold_and_the_entry_drains_to_zero(
    deadline_api: ApiServer, api_redis: RedisServer, tmp_path: Path
) -> None:
    calls = tmp_path / "calls.txt"
    started = time.monotonic()
    r = speak(deadline_api, DEADLINE, "past its deadline")
    held = time.monotonic() - started
    assert r.status_code == 503 and r.json()["error"]["code"] == "WORKERS_UNAVAILABLE", r.text
    assert 1.45 <= held < 10, f"held {held:.2f} s for a 1.5 s deadline (30 s cold-start wait)"
    assert depth(api_redis, DEADLINE) == QueueDepth(waiting=1, in_flight=0)
    worker = tts_worker(api_redis, DEADLINE, calls)
    try:
        worker.wait_ready()
        eventually(lambda: depth(api_redis, DEADLINE).total == 0, "the expired entry lingered in the queue")
        assert engine_calls(calls) == []
        assert dead_letters(api_redis, DEADLINE) == 0
    finally:
        assert worker.stop() == 0


def test_a_client_that_disconnects_while_held_leaves_a_job_that_never_runs(
    long_hold_api: ApiServer, api_redis: RedisServer, tmp_path: Path
) -> None:
    calls = tmp_path / "calls.txt"
    body = json.dumps({"model": GONE, "input": "the client hung up", "voice": "alloy"}).encode()
    host, port = long_hold_api.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as client:
        client.sendall(
            f"POST /v1/audio/speech HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {long_hold_api.key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        eventually(lambda: depth(api_redis, GONE).total == 1, "the held request's job was never queued")

    # The client hung up while held; the API notices long before its 25 s hold would end.
    def noticed() -> bool:
        waits = "kubespeech_api_cold_start_waits_total"
        return metric(long_hold_api, waits, model=GONE, outcome="disconnected") == 1

    eventually(noticed, "the API kept holding a request whose client had gone", timeout=5)
    assert depth(api_redis, GONE).total == 1
    worker = tts_worker(api_redis, GONE, calls)
    try:
        worker.wait_ready()
        eventually(lambda: depth(api_redis, GONE).total == 0, "the abandoned entry was never drained")
        assert engine_calls(calls) == [], "the job of a client that had gone reached the engine"
        assert dead_letters(api_redis, GONE) == 0
    finally:
        assert worker.stop() == 0


PER_MODEL = "cs-per-model"


def test_a_models_per_model_cold_start_wait_overrides_the_apis(
    api_redis: RedisServer, tmp_path: Path
) -> None:
    """coldStartWaitSeconds of a SpeechDeployment's pool reaches the API through the models file: that model
    is held for its own wait (0.5 s) instead of the API's (20 s); a model without one gets the API's."""
    models = [{"name": PER_MODEL, "task": "tts", "cold_start_wait_s": 0.5},
              {"name": "cs-api-default", "task": "tts"}]  # fmt: skip
    server = start_api(api_settings(api_redis.url, models, tmp_path,
                                    limits={"retry_after_s": 2, "cold_start_wait_s": 20.0, "request_timeout_s": 1.5}))  # fmt: skip
    try:
        started = time.monotonic()
        r = speak(server, PER_MODEL, "held briefly")
        held = time.monotonic() - started
        assert r.status_code == 503 and 0.45 <= held < 1.4, (r.status_code, held)
        started = time.monotonic()
        r = speak(server, "cs-api-default", "held until the deadline")
        # The API's own 20 s wait applies, so the 1.5 s request deadline ends the hold.
        assert time.monotonic() - started >= 1.4, r.status_code
    finally:
        server.stop()
