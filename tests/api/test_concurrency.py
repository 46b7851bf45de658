"""More concurrent requests than Redis connections: callers wait for a connection (or get 429), never a 503."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from kubespeech.config import RedisSettings
from tests.api.conftest import API_KEY, ApiServer, api_settings, start_api, wait_live
from tests.conftest import RedisServer
from tests.stack import WorkerProcess

SLOW = "noop-slow-asr"
POOL = 8
CALLERS = 2 * POOL


@pytest.fixture
def small_pool_api(api_redis: RedisServer, tmp_path: Path) -> Iterator[ApiServer]:
    # The worker answers each batch of 4 after 0.3 s, so all 16 callers are waiting at once.
    worker = WorkerProcess(api_redis.url, task="asr", model=SLOW, engine="noop", max_batch_size=4,
                           max_wait_ms=0, engine_options={"delay_s": 0.3})  # fmt: skip
    settings = api_settings(api_redis.url, [{"name": SLOW, "task": "asr", "default": True}], tmp_path)
    settings.redis = RedisSettings(url=api_redis.url, max_connections=POOL)
    server = start_api(settings)
    try:
        worker.wait_ready()
        wait_live(server, [SLOW])
        yield server
    finally:
        server.stop()
        worker.stop()


async def test_twice_the_pool_size_of_concurrent_callers_all_get_their_own_result(
    small_pool_api: ApiServer,
) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    limits = httpx.Limits(max_connections=CALLERS)
    async with httpx.AsyncClient(
        base_url=small_pool_api.url, headers=headers, timeout=30, limits=limits
    ) as c:

        async def one(i: int) -> httpx.Response:
            pcm = np.zeros(1000 + i, dtype="<i2").tobytes()
            return await c.post(
                f"/waves/v1/stt/?model={SLOW}&encoding=linear16&sample_rate=16000", content=pcm
            )

        responses = await asyncio.gather(*(one(i) for i in range(CALLERS)))
    for i, r in enumerate(responses):
        assert r.status_code == 200, f"caller {i}: {r.status_code} {r.text}"
        assert r.json()["transcription"] == f"{1000 + i} samples"
