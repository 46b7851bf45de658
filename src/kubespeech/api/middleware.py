"""One pure-ASGI middleware for every HTTP request: request id, body bound, disconnect watch, metrics, log.

Written against raw ASGI (not ``BaseHTTPMiddleware``) because it runs on every request and the no-op
path's budget is a millisecond or two.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kubespeech.api import metrics
from kubespeech.api.errors import render_error

log = logging.getLogger("kubespeech.api.access")

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")
# While a request is served: a coroutine function that returns once its client has disconnected (the
# service uses it to stop holding a cold-start request nobody waits for any more).
client_gone_var: ContextVar[Callable[[], Awaitable[None]] | None] = ContextVar("client_gone", default=None)

_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_MULTIPART = b"multipart/"


class RequestIdFilter(logging.Filter):
    """Stamps records made while a request is served with its ``request_id`` (attach to handlers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            rid = request_id_var.get()
            if rid != "-":
                record.request_id = rid
        return True


def install_request_id_logging() -> None:
    """Add the filter to the root logger's handlers (the API process's log output)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
            handler.addFilter(RequestIdFilter())


class _BodyTooLarge(Exception):
    pass


class ApiMiddleware:
    def __init__(self, app: ASGIApp, *, max_upload_bytes: int, max_json_bytes: int) -> None:
        self.app = app
        self.max_upload = max_upload_bytes
        # multipart framing adds a little around the file itself
        self.max_multipart = max_upload_bytes + 64 * 1024
        self.max_json = max_json_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        content_length = -1
        content_type = b""
        rid = ""
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    content_length = int(value)
                except ValueError:
                    content_length = -1
            elif name == b"content-type":
                content_type = value
            elif name == b"x-request-id":
                candidate = value.decode("latin-1")
                if _VALID_ID.match(candidate):
                    rid = candidate
        rid = rid or uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        token = request_id_var.set(rid)
        method = scope["method"]
        if content_type.startswith(b"application/json"):
            limit = self.max_json
        elif content_type.startswith(_MULTIPART):
            limit = self.max_multipart
        else:
            limit = self.max_upload
        status_holder = [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder[0] = message["status"]
                headers = list(message.get("headers", []))
                # Error responses rendered outside this middleware (the 500 path) carry it already.
                if not any(name == b"x-request-id" for name, _ in headers):
                    headers.append((b"x-request-id", rid.encode()))
                message["headers"] = headers
            await send(message)

        received = 0
        body_read = False

        async def receive_wrapper() -> Message:
            nonlocal received, body_read
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    state["body_too_large"] = True
                    raise _BodyTooLarge()
                if not message.get("more_body", False):
                    body_read = True
            return message

        async def client_gone() -> None:
            """Return once the client has disconnected; cancel it to stop listening."""
            # Listening before the app has read the whole body would steal body chunks from it; the
            # server answers nothing but a disconnect once the body is complete.
            if body_read and (await receive())["type"] == "http.disconnect":
                return
            await asyncio.get_running_loop().create_future()

        gone_token = client_gone_var.set(client_gone)
        metrics.IN_FLIGHT.inc()
        try:
            if content_length > limit:
                state["body_too_large"] = True
                response = render_error(
                    scope["path"], 413, "PAYLOAD_TOO_LARGE",
                    f"request body of {content_length} bytes exceeds the limit of {limit} bytes", rid,
                    details={"limit_bytes": limit},
                )  # fmt: skip
                await response(scope, receive, send_wrapper)
            else:
                try:
                    await self.app(scope, receive_wrapper, send_wrapper)
                except _BodyTooLarge:
                    response = render_error(
                        scope["path"], 413, "PAYLOAD_TOO_LARGE",
                        f"request body exceeds the limit of {limit} bytes", rid, details={"limit_bytes": limit},
                    )  # fmt: skip
                    await response(scope, receive, send_wrapper)
        finally:
            metrics.IN_FLIGHT.dec()
            route: Any = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            elapsed = time.perf_counter() - start
            status = status_holder[0]
            metrics.REQUESTS.labels(template, method, str(status)).inc()
            metrics.LATENCY.labels(template, method).observe(elapsed)
            # 503 is the expected answer during cold starts and readiness checks, not a server fault.
            fault = status >= 500 and status != 503
            if fault or log.isEnabledFor(logging.DEBUG):
                log.log(
                    logging.WARNING if fault else logging.DEBUG,
                    "request",
                    extra={"request_id": rid, "method": method, "route": template, "status": status,
                           "ms": round(elapsed * 1000, 2)},
                )  # fmt: skip
            client_gone_var.reset(gone_token)
            request_id_var.reset(token)
