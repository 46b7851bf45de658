"""API test stack: one private Redis, real ``kubespeech worker`` subprocesses, and the API served by uvicorn
on a free port in a background thread (real HTTP, so the official SDKs can talk to it)."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from kubespeech.api.app import create_app
from kubespeech.api.settings import ApiAliases, ApiLimits, ApiSettings, CacheSettings
from kubespeech.config import QueueSettings, RedisSettings
from tests.conftest import RedisServer, free_port, start_redis
from tests.stack import WorkerProcess

API_KEY = "test-key-0123456789"
NOOP_ASR = "noop-asr"
NOOP_TTS = "noop-tts"
WHISPER = "whisper-tiny"
PIPER = "piper-joe"


@dataclass
class ApiServer:
    url: str
    settings: ApiSettings
    server: uvicorn.Server
    thread: threading.Thread
    key: str = API_KEY

    def client(self, **kw: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.key}", **kw.pop("headers", {})}
        return httpx.Client(base_url=self.url, headers=headers, timeout=kw.pop("timeout", 60), **kw)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def start_api(settings: ApiSettings) -> ApiServer:
    port = free_port()
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, loop="uvloop", http="httptools",
        lifespan="on", access_log=False, log_config=None, timeout_graceful_shutdown=2,
    )  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"api-{port}", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    until = time.monotonic() + 15
    while time.monotonic() < until:
        if server.started:
            return ApiServer(url, settings, server, thread)
        time.sleep(0.02)
    raise RuntimeError("API server did not start")


def api_settings(
    redis_url: str,
    models: list[dict[str, Any]],
    tmp: Path,
    *,
    keys_file: Path | None = None,
    limits: dict[str, Any] | None = None,
    aliases: dict[str, Any] | None = None,
    queue: dict[str, Any] | None = None,
    cache: dict[str, Any] | None = None,
) -> ApiSettings:
    models_file = tmp / f"models-{time.monotonic_ns()}.json"
    models_file.write_text(json.dumps(models))
    return ApiSettings(
        host="127.0.0.1",
        port=0,
        api_keys=[API_KEY],
        keys_file=keys_file,
        models_file=models_file,
        limits=ApiLimits(**{"cold_start_wait_s": 0.5, "request_timeout_s": 20.0, **(limits or {})}),
        aliases=ApiAliases(**(aliases or {})),
        # Result caching off unless a test asks for it: a cached answer would keep repeated requests from
        # the workers these tests exercise (tests/api/test_cache.py turns it on).
        cache=CacheSettings.model_validate({"tts": {"enabled": False}} if cache is None else cache),
        refresh_interval_s=0.2,
        redis=RedisSettings(url=redis_url),
        queue=QueueSettings(**(queue or {})),
    )


NOOP_MODELS = [
    {"name": NOOP_ASR, "task": "asr", "default": True},
    {"name": NOOP_TTS, "task": "tts", "default": True},
]


@dataclass
class Workers:
    procs: list[WorkerProcess] = field(default_factory=list)

    def stop(self) -> None:
        for p in self.procs:
            p.stop()


@pytest.fixture(scope="session")
def api_redis() -> Iterator[RedisServer]:
    """A Redis of the API tests' own (the shared fixture flushes between tests, which would drop workers)."""
    server = start_redis()
    yield server
    if server.process is not None:
        server.process.terminate()
        server.process.wait(5)


@pytest.fixture(scope="session")
def noop_workers(api_redis: RedisServer) -> Iterator[Workers]:
    workers = Workers(
        [
            WorkerProcess(api_redis.url, task="asr", model=NOOP_ASR, engine="noop", max_wait_ms=0),
            WorkerProcess(api_redis.url, task="tts", model=NOOP_TTS, engine="noop", max_wait_ms=0),
        ]
    )
    try:
        for w in workers.procs:
            w.wait_ready(60)
        yield workers
    finally:
        workers.stop()


@pytest.fixture(scope="session")
def real_workers(api_redis: RedisServer) -> Iterator[Workers]:
    """Whisper tiny.en and the Piper 'joe' voice on CPU (the engines' bundled models)."""
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    workers = Workers(
        [
            WorkerProcess(api_redis.url, task="asr", model=WHISPER, engine="whisper", max_wait_ms=0, env=env),
            WorkerProcess(api_redis.url, task="tts", model=PIPER, engine="piper", max_wait_ms=0, env=env),
        ]
    )
    try:
        for w in workers.procs:
            w.wait_ready(120)
        yield workers
    finally:
        workers.stop()


@pytest.fixture(scope="module")
def noop_api(
    api_redis: RedisServer, noop_workers: Workers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ApiServer]:
    settings = api_settings(api_redis.url, NOOP_MODELS, tmp_path_factory.mktemp("api"))
    server = start_api(settings)
    wait_live(server, [NOOP_ASR, NOOP_TTS])
    yield server
    server.stop()


def wait_live(server: ApiServer, models: list[str], timeout: float = 30.0) -> None:
    """Wait until /ready shows a live worker for each model (the registry refreshes in the background)."""
    until = time.monotonic() + timeout
    with httpx.Client(base_url=server.url) as c:
        while time.monotonic() < until:
            body = c.get("/ready").json()
            live = {m: n for t in body.get("tasks", {}).values() for m, n in t["models"].items()}
            if all(live.get(m, 0) > 0 for m in models):
                return
            time.sleep(0.05)
    raise TimeoutError(f"no live workers for {models}")


os.environ.setdefault("HF_HUB_OFFLINE", "1")
