"""The FastAPI app factory: lifespan-owned Redis, job client, registry, license gate and usage recorder."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from redis.asyncio import Redis

from kubespeech import __version__
from kubespeech.api import metrics
from kubespeech.api.auth import KeyStore
from kubespeech.api.cache import ResultCache
from kubespeech.api.deps import AppState
from kubespeech.api.errors import install_error_handlers
from kubespeech.api.middleware import ApiMiddleware
from kubespeech.api.registry import ModelRegistry
from kubespeech.api.service import SpeechService
from kubespeech.api.settings import ApiSettings
from kubespeech.jobs import JobClient, Keys
from kubespeech.redis_client import connect

log = logging.getLogger(__name__)


def _license_parts(settings: ApiSettings, redis: Redis) -> tuple[Any, Any]:
    from kubespeech.license.gate import LicenseGate
    from kubespeech.license.usage import UsageRecorder

    gate = LicenseGate(settings.license_proxy_url, redis=redis, key_prefix=settings.redis.key_prefix)
    return gate, UsageRecorder(
        redis, settings.redis.key_prefix, flush_interval_s=settings.usage_flush_interval_s
    )


async def _refresh_loop(state: AppState, stop: asyncio.Event) -> None:
    """Keep models, live-worker counts and keys current so requests never look them up themselves.

    Ends on ``stop`` rather than on cancellation alone: redis-py can swallow a cancel that lands in the
    middle of a command (redis/redis-py#2028), which would leave shutdown waiting forever.
    """
    interval = state.settings.refresh_interval_s
    while not stop.is_set():
        try:
            await state.registry.refresh()
        except Exception as exc:
            log.warning("model registry refresh failed", extra={"error": str(exc)})
        state.keys.reload()
        if state.service.cache is not None:
            try:
                await state.service.cache.refresh()
            except Exception as exc:  # Redis down: the registry refresh above already reports it
                log.debug("cache size refresh failed", extra={"error": type(exc).__name__})
        for name, count in state.registry.live.items():
            metrics.LIVE_WORKERS.labels(name).set(count)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)


def build_state(settings: ApiSettings, redis: Redis | None = None) -> AppState:
    redis = redis if redis is not None else connect(settings.redis)
    prefix = settings.redis.key_prefix
    jobs = JobClient(redis, settings.queue, prefix=prefix)
    registry = ModelRegistry(settings, redis, Keys(prefix))
    keys = KeyStore(
        [k.get_secret_value() for k in settings.api_keys],
        settings.keys_file,
        allow_anonymous=settings.allow_anonymous,
    )
    gate, usage = _license_parts(settings, redis)
    cache = ResultCache(redis, prefix, settings.cache)
    service = SpeechService(settings, jobs, registry, gate, usage, cache)
    return AppState(settings, redis, jobs, registry, keys, service, gate, usage)


def create_app(settings: ApiSettings | None = None, *, redis: Redis | None = None) -> FastAPI:
    """Build the API app; ``redis`` lets a caller share a client (it is then not closed on shutdown)."""
    settings = settings or ApiSettings()
    owns_redis = redis is None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = build_state(settings, redis)
        app.state.kubespeech = state
        if state.keys.count == 0 and not settings.allow_anonymous:
            log.warning("no API keys configured: every request will be refused with 401")
        await state.registry.refresh()
        stop = asyncio.Event()
        refresher = asyncio.create_task(_refresh_loop(state, stop), name="api-refresh")
        from kubespeech.api.stt_live import install_drain_on_signal

        # Live sessions must drain before uvicorn drops every WebSocket, which it does before this finally.
        undo_signals = install_drain_on_signal(app)
        try:
            yield
        finally:
            undo_signals()
            stop.set()
            _, pending = await asyncio.wait([refresher], timeout=5)
            for task in pending:
                task.cancel()
            await state.service.drain()
            if hasattr(state.license_gate, "aclose"):
                await state.license_gate.aclose()
            if owns_redis:
                await state.redis.aclose()

    app = FastAPI(
        title="kubespeech API",
        version=__version__,
        description=(
            "Self-hosted speech API: Smallest Waves v1 (`/waves/v1`), Smallest self-host legacy routes "
            "(`/api/v1`) and OpenAI audio (`/v1/audio`), all over one job queue. Authenticate with "
            "`Authorization: Bearer <api key>`."
        ),
        lifespan=lifespan,
        # Prometheus metrics come from our own middleware; FastAPI's OpenTelemetry hooks cost a tracer
        # lookup per request even with no exporter configured.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    install_error_handlers(app)
    app.add_middleware(
        ApiMiddleware,
        max_upload_bytes=settings.limits.max_upload_bytes,
        max_json_bytes=settings.limits.max_json_bytes,
    )
    from kubespeech.api import legacy, openai_audio, ops, realtime, stt_live, tts_live, waves

    app.include_router(ops.router)
    app.include_router(waves.router)
    app.include_router(tts_live.router)
    app.include_router(stt_live.router)
    app.include_router(legacy.router)
    app.include_router(openai_audio.router)
    app.include_router(realtime.router)
    return app
