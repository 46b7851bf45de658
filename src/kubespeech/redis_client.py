"""One way to open Redis connections, with retries and backoff on connection errors."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from kubespeech.config import RedisSettings

_POOL_WAIT_S = 10.0


def connect(settings: RedisSettings, *, max_connections: int | None = None) -> Redis:
    """Return an asyncio Redis client; connecting is lazy, so this never blocks or fails by itself.

    Blocking pops hold a connection each; ``JobClient`` caps how many it runs at once below the pool size,
    so other commands find a connection. The pool is a blocking one: a command that finds every
    connection busy waits for one (up to ``_POOL_WAIT_S``) instead of failing at once.
    """
    kwargs: dict[str, object] = {}
    if settings.url.startswith("rediss://") and settings.tls_insecure_skip_verify:
        kwargs["ssl_cert_reqs"] = "none"
    pool = BlockingConnectionPool.from_url(
        settings.url,
        password=settings.resolved_password(),
        max_connections=max_connections or settings.max_connections,
        timeout=_POOL_WAIT_S,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        health_check_interval=30,
        socket_connect_timeout=5,
        **kwargs,
    )
    client = Redis(connection_pool=pool)
    # A client built on a pool of our own must still close it, as Redis.from_url's clients do.
    client.auto_close_connection_pool = True
    return client
