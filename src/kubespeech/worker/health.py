"""A tiny asyncio HTTP server for /healthz, /readyz, /inflight and /metrics (no framework: workers stay small).

``/healthz`` answers JSON ``{"status": "ok", "in_flight": N, "draining": bool}`` (503 with status
``unhealthy`` and a ``reason`` when the process is broken: the model failed to load, or the engine hung); ``/inflight`` answers ``{"in_flight": N, "draining": bool}``, the
number of jobs the worker holds (claimed, not yet published), which the operator turns into the pod's
deletion cost so Kubernetes removes idle pods first.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, generate_latest

log = logging.getLogger(__name__)


class HealthServer:
    """Serves liveness (process and loop responsive), readiness (a callable) and Prometheus metrics."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        is_alive: Callable[[], tuple[bool, str]],
        is_ready: Callable[[], tuple[bool, str]],
        registry: CollectorRegistry,
        load: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.is_alive = is_alive
        self.is_ready = is_ready
        self.registry = registry
        self.load = load or (lambda: {"in_flight": 0, "draining": False})
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = request_line.split(" ")
            method, path = (parts[0], parts[1].split("?", 1)[0]) if len(parts) >= 2 else ("", "")
            status, ctype, body = self._route(method, path)
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    def _route(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"method not allowed\n"
        if path == "/healthz":
            ok, why = self.is_alive()
            status: dict[str, Any] = {"status": "ok"} if ok else {"status": "unhealthy", "reason": why}
            body = orjson.dumps({**status, **self.load()})
            return ("200 OK" if ok else "503 Service Unavailable"), "application/json", body
        if path == "/inflight":
            return "200 OK", "application/json", orjson.dumps(self.load())
        if path == "/readyz":
            ready, why = self.is_ready()
            return ("200 OK" if ready else "503 Service Unavailable"), "text/plain", (why + "\n").encode()
        if path == "/metrics":
            return "200 OK", "text/plain; version=0.0.4; charset=utf-8", generate_latest(self.registry)
        return "404 Not Found", "text/plain", b"not found\n"
