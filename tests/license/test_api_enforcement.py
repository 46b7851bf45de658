"""Through the real API: a valid license serves requests and meters them upstream; one tampered byte refuses."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from kubespeech.api.app import create_app
from kubespeech.api.settings import ApiSettings
from kubespeech.config import RedisSettings
from kubespeech.license.proxy import create_proxy_app
from kubespeech.license.settings import ProxySettings
from tests.conftest import RedisServer, start_redis
from tests.license.conftest import FAST, Served, Upstream, Vendor, eventually
from tests.stack import WorkerProcess

pytestmark = pytest.mark.timeout(90)

API_KEY = "license-test-key-0123456789"
MODEL = "noop-tts"


@pytest.fixture(scope="module")
def stack_redis() -> Iterator[RedisServer]:
    """A Redis of this module's own: the shared one is flushed between tests, which would drop the worker."""
    server = start_redis()
    yield server
    assert server.process is not None
    server.process.terminate()
    server.process.wait(5)


@pytest.fixture(scope="module")
def tts_worker(stack_redis: RedisServer) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(stack_redis.url, task="tts", model=MODEL, engine="noop", max_wait_ms=0)
    try:
        worker.wait_ready(60)
        yield worker
    finally:
        worker.stop()


@pytest.fixture
async def stack_client(stack_redis: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(stack_redis.url)
    yield client
    await client.aclose()


async def _api(stack_redis: RedisServer, proxy_url: str, tmp_path: Path) -> Served:
    models = tmp_path / f"models-{proxy_url.rsplit(':', 1)[1]}.json"
    models.write_text(json.dumps([{"name": MODEL, "task": "tts", "default": True}]))
    settings = ApiSettings(
        host="127.0.0.1",
        port=0,
        api_keys=[API_KEY],  # type: ignore[list-item]
        models_file=models,
        license_proxy_url=proxy_url,
        refresh_interval_s=0.2,
        redis=RedisSettings(url=stack_redis.url),  # type: ignore[call-arg]
    )
    api = await Served(create_app(settings)).start()
    async with httpx.AsyncClient() as c:
        await eventually(
            lambda: c.get(f"{api.url}/ready"),
            lambda r: any(
                n > 0 for t in r.json().get("tasks", {}).values() for n in t.get("models", {}).values()
            ),
            timeout=20,
        )
    return api


async def _speech(api: Served, text: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=20) as c:
        return await c.post(
            f"{api.url}/v1/audio/speech",
            json={"model": MODEL, "input": text, "voice": "noop"},
            headers={"Authorization": f"Bearer {API_KEY}"},
        )


async def test_valid_license_serves_and_meters_and_a_tampered_byte_refuses(
    vendor: Vendor,
    upstream: Upstream,
    stack_redis: RedisServer,
    stack_client: Redis,
    tts_worker: WorkerProcess,
    tmp_path: Path,
) -> None:
    token = vendor.token(upstream=upstream.url, license_id="lic_api")
    i = len(token) // 2
    tampered = token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1 :]
    served: list[Served] = []
    try:
        for key in (token, tampered):
            settings = ProxySettings(key=key, public_key=vendor.public_pem, **FAST)  # type: ignore[arg-type]
            proxy = await Served(create_proxy_app(settings, stack_client, key_prefix="ks")).start()
            served.append(proxy)
            served.append(await _api(stack_redis, proxy.url, tmp_path))
        good_api, bad_api = served[1], served[3]

        texts = ["hello there", "a licensed request", "third one"]
        for text in texts:
            r = await _speech(good_api, text)
            assert r.status_code == 200, r.text
        # Every served request becomes one metadata-only usage event at the vendor.
        await eventually(lambda: upstream.summary("lic_api"), lambda s: s["events"] == len(texts), timeout=10)
        events = await upstream.events("lic_api")
        assert sorted(e["characters"] for e in events) == sorted(len(t) for t in texts)
        assert all(e["feature"] == "tts" and e["model"] == MODEL for e in events)
        assert not any(t in json.dumps(events) for t in texts)

        r = await _speech(bad_api, "refused")
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "INVALID_LICENSE"  # the OpenAI surface's error envelope
        assert "Traceback" not in r.text and token[10:40] not in r.text
    finally:
        for s in reversed(served):
            await s.stop()
