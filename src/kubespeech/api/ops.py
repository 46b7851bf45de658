"""Operations routes: liveness, readiness and Prometheus metrics (no authentication, no per-surface shape).

Probes carry no API key, so ``/ready`` answers everyone; only a caller with a valid key also sees the
license it is running under (id, expiry, features), which is nobody else's business.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from pydantic import BaseModel, Field
from starlette.responses import Response

from kubespeech.api.deps import AppState, State
from kubespeech.api.waves import json_response
from kubespeech.errors import Unauthorized

router = APIRouter(tags=["Operations"])

# Optional: documents the scheme in OpenAPI; the header itself is checked by the key store below.
_optional_bearer = HTTPBearer(
    auto_error=False, description="Optional API key: with a valid one, /ready also reports the license."
)


class Liveness(BaseModel):
    status: Literal["ok"] = "ok"


class TaskReadiness(BaseModel):
    state: Literal["ready", "cold_start"] = Field(
        description="cold_start: no live worker yet; requests are held."
    )
    live_workers: int
    models: dict[str, int] = Field(description="Live workers per model of this task.")


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    redis: Literal["ok", "unreachable"]
    license: dict[str, Any] | None = Field(
        None,
        description="The license state (id, expiry, features, ...); only for a caller with a valid API key.",
    )
    tasks: dict[str, TaskReadiness]


@router.get("/health", summary="Liveness", response_model=None, responses={200: {"model": Liveness}})
async def health() -> Response:
    return json_response({"status": "ok"})


@router.get(
    "/ready",
    summary="Readiness: Redis reachable, license usable, a worker (or a cold start) per enabled task",
    response_model=None,
    responses={
        200: {"model": Readiness, "description": "Ready."},
        503: {"model": Readiness, "description": "Not ready; the body says why."},
    },
)
async def ready(
    request: Request,
    state: State,
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(_optional_bearer)],
) -> Response:
    redis_ok = True
    try:
        await state.redis.ping()
    except Exception:  # any failure to reach Redis is simply "not ready"
        redis_ok = False
    license_state: dict[str, Any]
    try:
        license_state = await state.license_gate.state()
    except Exception as exc:  # the gate reports problems in its state; anything else is "not usable"
        license_state = {"usable": False, "error": type(exc).__name__}
    registry = state.registry
    tasks: dict[str, Any] = {}
    workers_ok = True
    for task in registry.enabled_tasks():
        models = {m.name: registry.live.get(m.name, 0) for m in registry.of_task(task)}
        live = sum(models.values())
        tasks[task] = {"state": "ready" if live else "cold_start", "live_workers": live, "models": models}
        workers_ok = workers_ok and (live > 0 or not state.settings.ready_requires_workers)
    ok = redis_ok and bool(license_state.get("usable")) and workers_ok
    body: dict[str, Any] = {
        "status": "ready" if ok else "not_ready",
        "redis": "ok" if redis_ok else "unreachable",
        "tasks": tasks,
    }
    if _has_valid_key(state, request.headers.get("authorization")):
        body["license"] = license_state
    return json_response(body, status_code=200 if ok else 503)


def _has_valid_key(state: AppState, authorization: str | None) -> bool:
    """True for a configured API key; a bad key is simply anonymous here (a probe route never 401s)."""
    # With no keys configured the store may let everyone in, which must not make everyone "keyed" here.
    if not authorization or state.keys.count == 0:
        return False
    try:
        state.keys.verify(authorization)
    except Unauthorized:
        return False
    return True


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Metrics."}},
)
async def prometheus_metrics() -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
