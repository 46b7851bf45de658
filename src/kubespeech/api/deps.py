"""Dependencies shared by the route modules: the per-process state, the service, and API-key auth."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis.asyncio import Redis

from kubespeech.api.auth import KeyStore
from kubespeech.api.registry import ModelRegistry
from kubespeech.api.service import SpeechService
from kubespeech.api.settings import ApiSettings
from kubespeech.jobs import JobClient


@dataclass
class AppState:
    """Everything the routes need, built once per process in the lifespan."""

    settings: ApiSettings
    redis: Redis
    jobs: JobClient
    registry: ModelRegistry
    keys: KeyStore
    service: SpeechService
    license_gate: Any
    usage: Any


_bearer = HTTPBearer(auto_error=False, description="API key as a bearer token.")


# Dependencies are async on purpose: FastAPI runs plain ``def`` dependencies in a thread pool, a
# thread hop per request that cost more than the rest of the dependency work together.
async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.kubespeech
    return state


async def get_service(request: Request) -> SpeechService:
    service: SpeechService = request.app.state.kubespeech.service
    return service


async def require_key(
    request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """Reject the request unless it carries a configured API key (401 in the surface's envelope)."""
    request.app.state.kubespeech.keys.verify(request.headers.get("authorization"))


Service = Annotated[SpeechService, Depends(get_service)]
State = Annotated[AppState, Depends(get_state)]
