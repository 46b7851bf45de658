"""The API's /ready over real HTTP with a real license proxy: the license details only for a valid API key."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from kubespeech.api.app import create_app
from kubespeech.api.settings import ApiSettings
from kubespeech.config import RedisSettings
from tests.conftest import RedisServer
from tests.license.conftest import ProxyHandle, Served, StartProxy, Vendor

pytestmark = pytest.mark.timeout(60)

API_KEY = "ready-test-key-0123456789"
LICENSE_ID = "lic_private_0042"
FEATURES = ["asr", "streaming", "tts"]

StartApi = Callable[..., Awaitable[Served]]


@pytest.fixture
async def start_api(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[StartApi]:
    served: list[Served] = []

    async def start(proxy: ProxyHandle, *, keys: list[str], allow_anonymous: bool = False) -> Served:
        models = tmp_path / "models.json"
        models.write_text(json.dumps([{"name": "noop-tts", "task": "tts", "default": True}]))
        settings = ApiSettings(
            host="127.0.0.1",
            port=0,
            api_keys=[SecretStr(k) for k in keys],
            allow_anonymous=allow_anonymous,
            models_file=models,
            license_proxy_url=proxy.url,
            refresh_interval_s=0.2,
            redis=RedisSettings(url=redis_server.url),
        )
        api = await Served(create_app(settings)).start()
        served.append(api)
        return api

    yield start
    for api in served:
        await api.stop()


async def _ready(api: Served, authorization: str | None = None) -> httpx.Response:
    headers = {"Authorization": authorization} if authorization is not None else {}
    async with httpx.AsyncClient() as c:
        return await c.get(f"{api.url}/ready", headers=headers)


def _assert_no_license_details(r: httpx.Response, proxy: ProxyHandle) -> None:
    body = r.json()
    assert set(body) == {"status", "redis", "tasks"}, body
    claims = proxy.proxy.claims
    assert claims is not None
    expiry = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(claims.exp))
    for secret in (LICENSE_ID, expiry, str(claims.exp), "features", "streaming", "ACME", "license"):
        assert secret not in r.text, (secret, r.text)


async def test_anonymous_and_bad_keys_get_readiness_without_the_license(
    vendor: Vendor, start_proxy: StartProxy, start_api: StartApi
) -> None:
    proxy = await start_proxy(vendor.token(mode="offline", license_id=LICENSE_ID, features=FEATURES))
    api = await start_api(proxy, keys=[API_KEY])
    for authorization in (None, "Bearer not-a-key", "Basic dXNlcjpwYXNz", "Bearer", f"Bearer {API_KEY}x"):
        r = await _ready(api, authorization)
        assert r.status_code == 200, (authorization, r.text)  # a bad key is anonymous, never a 401 here
        assert r.json()["status"] == "ready" and r.json()["redis"] == "ok"
        assert "tts" in r.json()["tasks"]
        _assert_no_license_details(r, proxy)


async def test_a_valid_key_gets_the_license(
    vendor: Vendor, start_proxy: StartProxy, start_api: StartApi
) -> None:
    proxy = await start_proxy(vendor.token(mode="offline", license_id=LICENSE_ID, features=FEATURES))
    api = await start_api(proxy, keys=[API_KEY])
    for authorization in (f"Bearer {API_KEY}", f"Token {API_KEY}"):
        r = await _ready(api, authorization)
        assert r.status_code == 200, r.text
        license_state = r.json()["license"]
        assert license_state["license_id"] == LICENSE_ID and license_state["usable"] is True
        assert sorted(license_state["features"]) == FEATURES and license_state["state"] == "valid"
        assert proxy.proxy.claims is not None
        assert license_state["expires_at"] == time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(proxy.proxy.claims.exp)
        )


async def test_an_unusable_license_is_503_for_everyone_but_explained_only_with_a_key(
    vendor: Vendor, start_proxy: StartProxy, start_api: StartApi
) -> None:
    token = vendor.token(
        mode="offline", license_id=LICENSE_ID, features=FEATURES, now=time.time() - 7200, expires_in=3600
    )
    proxy = await start_proxy(token)
    api = await start_api(proxy, keys=[API_KEY])
    anonymous = await _ready(api)
    assert anonymous.status_code == 503 and anonymous.json()["status"] == "not_ready"
    _assert_no_license_details(anonymous, proxy)
    keyed = await _ready(api, f"Bearer {API_KEY}")
    assert keyed.status_code == 503
    assert keyed.json()["license"]["state"] == "expired" and keyed.json()["license"]["usable"] is False
    assert keyed.json()["license"]["license_id"] == LICENSE_ID


async def test_open_access_without_keys_still_keeps_the_license_private(
    vendor: Vendor, start_proxy: StartProxy, start_api: StartApi
) -> None:
    proxy = await start_proxy(vendor.token(mode="offline", license_id=LICENSE_ID, features=FEATURES))
    api = await start_api(proxy, keys=[], allow_anonymous=True)
    for authorization in (None, "Bearer anything"):
        r = await _ready(api, authorization)
        assert r.status_code == 200, r.text
        _assert_no_license_details(r, proxy)


async def test_openapi_documents_the_license_as_optional(
    vendor: Vendor, start_proxy: StartProxy, start_api: StartApi
) -> None:
    proxy = await start_proxy(vendor.token(mode="offline"))
    api = await start_api(proxy, keys=[API_KEY])
    async with httpx.AsyncClient() as c:
        schema: dict[str, Any] = (await c.get(f"{api.url}/openapi.json")).json()
    readiness = schema["components"]["schemas"]["Readiness"]
    assert "license" in readiness["properties"]
    assert "license" not in readiness["required"]
    assert {"status", "redis", "tasks"} <= set(readiness["required"])
    assert schema["paths"]["/ready"]["get"].get("security"), "the optional key is documented"
