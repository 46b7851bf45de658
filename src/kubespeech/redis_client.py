"""One way to open Redis connections, with retries and backoff on connection errors."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from kubespeech.config import RedisSettings


def connect(settings: RedisSettings, *, max_connections: int = 512) -> Redis:
    """Return an asyncio Redis client; connecting is lazy, so this never blocks or fails by itself.

    Blocking pops hold a connection each, so the pool must be at least as large as the number of requests
    an API process waits on at once.
    """
    kwargs: dict[str, object] = {}
    if settings.url.startswith("rediss://") and settings.tls_insecure_skip_verify:
        kwargs["ssl_cert_reqs"] = "none"
    return Redis.from_url(
        settings.url,
        password=settings.resolved_password(),
        max_connections=max_connections,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        health_check_interval=30,
        socket_connect_timeout=5,
        **kwargs,  # type: ignore[arg-type]
    )
