"""License test fixtures: a vendor key pair, token factory, in-process HTTP servers, proxies and upstreams."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from redis.asyncio import Redis

from kubespeech.license.proxy import LicenseProxy, create_proxy_app
from kubespeech.license.server import LicenseServer, create_server_app
from kubespeech.license.settings import ProxySettings
from kubespeech.license.token import CheckinPolicy, generate_private_key, new_claims, public_key_pem, sign
from tests.conftest import RedisServer, free_port

ADMIN_TOKEN = "admin-test-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

# Short timings keep the suite fast; every test that waits for a transition polls with a deadline.
FAST = {
    "checkin_interval_s": 0.2,
    "upstream_timeout_s": 0.5,
    "usage_interval_s": 0.1,
    "usage_backoff_max_s": 0.4,
    "reload_poll_s": 0.2,
}


class Served:
    """An ASGI app served by uvicorn on a loopback port inside the test's event loop."""

    def __init__(self, app: FastAPI, port: int | None = None) -> None:
        self.app = app
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> Served:
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_config=None, access_log=False, lifespan="on"
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        deadline = time.monotonic() + 10
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("server exited during start")
            if time.monotonic() > deadline:
                raise TimeoutError("server did not start")
            await asyncio.sleep(0.01)
        return self

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            done, _ = await asyncio.wait([self._task], timeout=5)
            while not done:
                # redis-py 8.1 often swallows a cancel that lands mid-command, so a background loop that
                # relies on task.cancel() alone (the API's "api-refresh" refresher) can keep the app's
                # shutdown waiting forever; cancel it again until the shutdown completes.
                for task in asyncio.all_tasks():
                    if task.get_name() == "api-refresh":
                        task.cancel()
                done, _ = await asyncio.wait([self._task], timeout=0.5)
        self._server, self._task = None, None

    @property
    def running(self) -> bool:
        return self._task is not None


@dataclass
class Vendor:
    key: Ed25519PrivateKey
    public_pem: str
    public_file: Path

    def token(
        self,
        *,
        features: list[str] | None = None,
        mode: str = "grace",
        grace_hours: float = 24.0,
        expires_in: float = 86400.0,
        not_before_in: float = 0.0,
        limits: dict[str, float | int] | None = None,
        upstream: str | None = None,
        key: Ed25519PrivateKey | None = None,
        license_id: str | None = None,
        now: float | None = None,
    ) -> str:
        t = time.time() if now is None else now
        signer = key or self.key
        claims = new_claims(
            signing_key=signer,
            customer="ACME Test",
            expires_at=t + expires_in,
            features=["asr", "tts", "streaming"] if features is None else features,
            limits=limits,
            checkin=CheckinPolicy(mode=mode, grace_hours=grace_hours),  # type: ignore[arg-type]
            upstream=upstream,
            not_before=t + not_before_in,
            license_id=license_id,
            now=t,
        )
        return sign(claims, signer)


@pytest.fixture(scope="session")
def vendor(tmp_path_factory: pytest.TempPathFactory) -> Vendor:
    key = generate_private_key()
    pem = public_key_pem(key.public_key()).decode()
    path = tmp_path_factory.mktemp("vendor") / "vendor.pub"
    path.write_text(pem)
    return Vendor(key, pem, path)


@dataclass
class Upstream:
    served: Served
    server: LicenseServer
    requests: list[str] = field(default_factory=list)
    lose_usage_acks: int = 0  # store the next N usage batches but answer 500, as if the reply were lost

    @property
    def url(self) -> str:
        return self.served.url

    async def stop(self) -> None:
        await self.served.stop()

    async def start(self) -> None:
        """(Re)start on the same port with the same database, as a real server coming back would."""
        await self.served.start()

    async def summary(self, license_id: str) -> dict[str, Any]:
        async with httpx.AsyncClient() as c:
            r = await c.get(f"{self.url}/v1/usage/summary", params={"license_id": license_id}, headers=ADMIN)
            r.raise_for_status()
            return dict(r.json())

    async def events(self, license_id: str) -> list[dict[str, Any]]:
        async with httpx.AsyncClient() as c:
            r = await c.get(f"{self.url}/v1/usage/events", params={"license_id": license_id}, headers=ADMIN)
            r.raise_for_status()
            return list(r.json()["events"])

    async def revoke(self, license_id: str, reason: str = "test revocation") -> None:
        async with httpx.AsyncClient() as c:
            r = await c.post(
                f"{self.url}/v1/revocations", json={"license_id": license_id, "reason": reason}, headers=ADMIN
            )
            r.raise_for_status()

    async def unrevoke(self, license_id: str) -> None:
        async with httpx.AsyncClient() as c:
            (await c.delete(f"{self.url}/v1/revocations/{license_id}", headers=ADMIN)).raise_for_status()


@pytest.fixture
async def upstream(vendor: Vendor) -> AsyncIterator[Upstream]:
    server = LicenseServer(vendor.key.public_key(), admin_token=ADMIN_TOKEN)
    app = create_server_app(server)
    up = Upstream(Served(app), server)

    @app.middleware("http")
    async def count(request: Any, call_next: Any) -> Any:
        up.requests.append(request.url.path)
        response = await call_next(request)
        if request.url.path == "/v1/usage" and up.lose_usage_acks > 0:
            up.lose_usage_acks -= 1
            return JSONResponse({"detail": "reply lost"}, status_code=500)
        return response

    await up.served.start()
    yield up
    await up.served.stop()


@dataclass
class ProxyHandle:
    served: Served
    settings: ProxySettings
    redis: Redis
    prefix: str

    @property
    def url(self) -> str:
        return self.served.url

    @property
    def proxy(self) -> LicenseProxy:
        return self.served.app.state.proxy  # type: ignore[no-any-return]

    async def license(self) -> dict[str, Any]:
        async with httpx.AsyncClient() as c:
            r = await c.get(f"{self.url}/v1/license")
            assert r.status_code == 200, r.text
            return dict(r.json())

    async def metrics(self) -> dict[str, float]:
        async with httpx.AsyncClient() as c:
            text = (await c.get(f"{self.url}/metrics")).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    async def stop(self) -> None:
        await self.served.stop()

    async def restart(self) -> None:
        """A fresh proxy process would be a new app on the same port: build one from the same settings."""
        self.served = Served(
            create_proxy_app(self.settings, self.redis, key_prefix=self.prefix), self.served.port
        )
        await self.served.start()


StartProxy = Callable[..., Awaitable[ProxyHandle]]


@pytest.fixture
async def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def start_proxy(redis_server: RedisServer, prefix: str, vendor: Vendor) -> AsyncIterator[StartProxy]:
    """Start license proxies sharing one Redis and key prefix (call twice for two replicas)."""
    handles: list[ProxyHandle] = []
    clients: list[Redis] = []

    async def start(
        token: str | None,
        *,
        redis_url: str | None = None,
        public_key: str | None = "vendor",
        **overrides: Any,
    ) -> ProxyHandle:
        redis = Redis.from_url(redis_url or redis_server.url, socket_connect_timeout=0.5, socket_timeout=0.5)
        clients.append(redis)
        values: dict[str, Any] = {**FAST, "instance_id": f"proxy-{len(handles)}", **overrides}
        if token is not None:
            values["key"] = token
        if public_key is not None:
            values["public_key"] = vendor.public_pem if public_key == "vendor" else public_key
        settings = ProxySettings(**values)
        handle = ProxyHandle(
            Served(create_proxy_app(settings, redis, key_prefix=prefix)), settings, redis, prefix
        )
        await handle.served.start()
        handles.append(handle)
        return handle

    yield start
    for h in handles:
        await h.stop()
    for c in clients:
        await c.aclose()


async def eventually(
    probe: Callable[[], Awaitable[Any]],
    check: Callable[[Any], bool],
    timeout: float = 5.0,
    step: float = 0.05,
) -> Any:
    """Poll ``probe`` until ``check`` holds (returns the value) or fail with the last value seen."""
    deadline = time.monotonic() + timeout
    value = await probe()
    while not check(value):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s; last value: {value!r}")
        await asyncio.sleep(step)
        value = await probe()
    return value
