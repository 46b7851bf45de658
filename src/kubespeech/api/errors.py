"""Errors to responses: every surface answers in its own envelope with the same stable ``code`` and message.

- Smallest (``/waves/...``, ``/api/v1/...``): ``{"status": "error", "request_id", "error": {"code", "message"}}``
  (the SDK's ``ErrorResponse``).
- OpenAI (``/v1/...``): ``{"error": {"message", "type", "param", "code"}}``.
- Operations and anything else: ``{"code", "message", "request_id"}``.

Every error response carries ``X-Request-ID``; 429/503 carry ``Retry-After``; 401 carries ``WWW-Authenticate``.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from kubespeech.errors import KubespeechError

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    406: "NOT_ACCEPTABLE",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    422: "INVALID_PARAMETER",
    429: "TOO_MANY_REQUESTS",
    500: "INTERNAL_ERROR",
    503: "SERVICE_UNAVAILABLE",
}

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


# --- documented envelopes (used in the OpenAPI document) ------------------------------------------------


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable error code, e.g. UNSUPPORTED_AUDIO_FORMAT.")
    message: str = Field(description="Human-readable explanation.")
    details: dict[str, Any] | None = Field(None, description="Extra context (limits, parameter names).")


class SmallestError(BaseModel):
    """Error envelope of the Smallest Waves surfaces (the SDK's ErrorResponse)."""

    status: Literal["error"] = "error"
    request_id: str
    error: ErrorBody


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str = Field(description="Stable machine-readable error code.")


class OpenAIError(BaseModel):
    """Error envelope of the OpenAI-compatible surface."""

    error: OpenAIErrorBody


class PlainError(BaseModel):
    """Error envelope of the operations routes."""

    code: str
    message: str
    request_id: str


_RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}
}


def error_responses(model: type[BaseModel], *statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the given error statuses in one surface's envelope."""
    text = {
        400: "Corrupt or empty audio, or a malformed request.",
        401: "Missing or invalid API key, or an invalid license.",
        403: "License expired or feature not licensed.",
        404: "Unknown model or voice.",
        413: "Upload or audio duration over the limit.",
        415: "Unsupported audio format.",
        422: "Invalid parameters.",
        429: "Queue full or a licensed limit reached.",
        503: "No worker serves the model yet (cold start) or a dependency is unavailable.",
        504: "The job missed its deadline.",
    }
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": model, "description": text.get(status, "Error.")}
        if status in (429, 503):
            entry["headers"] = _RETRY_AFTER
        out[status] = entry
    return out


# --- rendering --------------------------------------------------------------------------------------------


def surface_of(path: str) -> str:
    if path.startswith("/v1/"):
        return "openai"
    if path.startswith("/waves/") or path.startswith("/api/v1/"):
        return "smallest"
    return "ops"


def render_error(
    path: str,
    status: int,
    code: str,
    message: str,
    request_id: str,
    *,
    retry_after: float | None = None,
    details: dict[str, Any] | None = None,
    param: str | None = None,
) -> Response:
    surface = surface_of(path)
    body: dict[str, Any]
    if surface == "smallest":
        err: dict[str, Any] = {"code": code, "message": message}
        if details:
            err["details"] = details
        body = {"status": "error", "request_id": request_id, "error": err}
    elif surface == "openai":
        kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    else:
        body = {"code": code, "message": message, "request_id": request_id}
    headers = {"X-Request-ID": request_id}
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return Response(
        orjson.dumps(body, default=str), status_code=status, headers=headers, media_type="application/json"
    )


def request_id_of(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id") or "-")


def kubespeech_error_response(request: Request, exc: KubespeechError) -> Response:
    details = {k: v for k, v in exc.details.items() if k != "param"} or None
    param = exc.details.get("param")
    if exc.http_status >= 500 and exc.code in ("INTERNAL_ERROR", "ENGINE_ERROR", "JOB_FAILED"):
        log.warning(
            "request failed",
            extra={"code": exc.code, "error": exc.message, "request_id": request_id_of(request)},
        )
    return render_error(
        request.url.path,
        exc.http_status,
        exc.code,
        exc.message,
        request_id_of(request),
        retry_after=exc.retry_after,
        details=details,
        param=str(param) if param else None,
    )


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    parts = []
    param = None
    for err in errors[:5]:
        raw_loc = [str(x) for x in err.get("loc", ())]
        loc = [x for x in raw_loc if x not in ("body", "query", "path", "header", "form")]
        if not loc and raw_loc[:1] == ["body"]:
            parts.append(
                f"body: {err.get('msg', 'invalid')} (send a JSON object with Content-Type: application/json)"
            )
            param = param or "body"
            continue
        name = ".".join(loc) or "request"
        param = param or name
        parts.append(f"{name}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid parameters", param


def install_error_handlers(app: FastAPI) -> None:
    async def on_kubespeech(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, KubespeechError)
        return kubespeech_error_response(request, exc)

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = [dict(e) for e in exc.errors()]
        message, param = _validation_message(errors)
        # A JSON body that does not parse is a malformed request, not an invalid parameter.
        if any(e.get("type") == "json_invalid" for e in errors):
            return render_error(
                request.url.path, 400, "INVALID_JSON", message, request_id_of(request), param=param
            )
        slim = [
            {"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in errors[:10]
        ]
        return render_error(
            request.url.path, 422, "INVALID_PARAMETER", message, request_id_of(request),
            details={"errors": slim}, param=param,
        )  # fmt: skip

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        status = exc.status_code
        if status == 400 and request.scope.get("state", {}).get("body_too_large"):
            status = 413
        code = _HTTP_CODES.get(status, f"HTTP_{status}")
        message = str(exc.detail) if status != 413 else "request body exceeds the size limit"
        if status == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        response = render_error(request.url.path, status, code, message, request_id_of(request))
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.exception(
            "unhandled error", extra={"request_id": request_id_of(request), "path": request.url.path}
        )
        return render_error(
            request.url.path, 500, "INTERNAL_ERROR", "internal server error", request_id_of(request)
        )

    app.add_exception_handler(KubespeechError, on_kubespeech)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
