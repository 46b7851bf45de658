"""Every API route except the operational ones requires a key, and keys are compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute, APIWebSocketRoute
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from kubespeech.api.auth import KeyStore
from tests.api.conftest import API_KEY, NOOP_MODELS, ApiServer, api_settings, start_api
from tests.conftest import RedisServer

# Open by design: liveness/readiness for the kubelet (readiness shows the license only with a key), Prometheus
# scraping, and the API's own documentation. The operator's Ingress routes none of them (only /waves,
# /api/v1 and /v1), so from outside the cluster they are reachable only through a LoadBalancer Service.
OPEN = {"/health", "/ready", "/metrics", "/waves/v1/health", "/api/v1/health", "/docs", "/docs/oauth2-redirect",
        "/redoc", "/openapi.json"}  # fmt: skip


@pytest.fixture(scope="module")
def api(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    server = start_api(api_settings(redis_server.url, NOOP_MODELS, tmp_path_factory.mktemp("auth")))
    yield server
    server.stop()


def _walk(routes: list[Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(path, route) of every HTTP and WebSocket route, through included routers (which newer FastAPI
    versions keep as router objects rather than copying their routes into the app)."""
    for route in routes:
        if isinstance(route, APIRoute | APIWebSocketRoute):
            yield prefix + route.path, route
        elif hasattr(route, "original_router"):
            yield from _walk(route.original_router.routes, prefix + route.include_context.prefix)
        elif hasattr(route, "path"):
            yield prefix + route.path, route


def _routes(api: ApiServer) -> list[tuple[str, Any]]:
    app: Any = api.server.config.app
    return list(_walk(app.routes))


def _fill(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


def test_every_route_but_the_operational_ones_needs_a_key(api: ApiServer) -> None:
    routes = _routes(api)
    checked = 0
    for path, route in routes:
        if path in OPEN:
            continue
        url = api.url + _fill(path)
        if isinstance(route, APIWebSocketRoute):
            ws_url = url.replace("http://", "ws://")
            for headers in ({}, {"Authorization": "Bearer not-the-key"}):
                try:
                    # An error event (the surface's own shape) may come first; then the close.
                    with (
                        connect(ws_url, additional_headers=headers, open_timeout=5) as ws,
                        pytest.raises(ConnectionClosed) as closed,
                    ):
                        for _ in range(3):
                            assert "error" in ws.recv(timeout=5), path
                    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008, path
                except InvalidStatus as exc:  # refused at the handshake
                    assert exc.response.status_code in (401, 403), path
            checked += 1
            continue
        if not isinstance(route, APIRoute):
            continue  # the documentation routes, which are open
        for method in sorted(route.methods - {"HEAD", "OPTIONS"}):
            for headers in (
                {},
                {"Authorization": "Bearer not-the-key"},
                {"Authorization": f"Basic {API_KEY}"},
            ):
                r = httpx.request(method, url, headers=headers, json={"text": "hi"}, timeout=10)
                assert r.status_code == 401, (method, path, r.status_code, r.text[:200])
            checked += 1
    assert checked >= 10, "the API surfaces were all found"
    assert {p for p, _ in routes} >= OPEN - {"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}


def test_open_routes_show_no_secret(api: ApiServer) -> None:
    for path in ("/health", "/ready", "/metrics", "/waves/v1/health", "/api/v1/health", "/openapi.json"):
        r = httpx.get(api.url + path, timeout=10)
        assert API_KEY not in r.text and hashlib.sha256(API_KEY.encode()).hexdigest() not in r.text, path


def test_key_comparison_is_constant_time(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every check compares the candidate's SHA-256 digest with every known digest via hmac.compare_digest:
    fixed-length inputs and no early exit, so the time taken says nothing about which key (or prefix)
    matched."""
    keys = [f"key-number-{i}-{'x' * i}" for i in range(5)]
    keys_file = tmp_path / "keys"
    keys_file.write_text("extra-key-from-a-file\n")
    store = KeyStore(keys, keys_file)
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def counting(a: Any, b: Any) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for candidate, ok in ((keys[0], True), (keys[-1], True), ("extra-key-from-a-file", True),
                          ("wrong", False), (keys[0][:-1], False), (keys[0] + "y" * 100, False)):  # fmt: skip
        calls.clear()
        if ok:
            store.verify(f"Bearer {candidate}")
        else:
            with pytest.raises(Exception, match="invalid API key"):
                store.verify(f"Bearer {candidate}")
        assert len(calls) == store.count == 6, candidate
        assert set(calls) == {(32, 32)}, candidate
