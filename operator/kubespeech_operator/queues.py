"""Read each pool's queue depth, and the license proxy's verdict, from a stack's Redis within a time budget.

The operator may not reach Redis (it runs outside the cluster, or a NetworkPolicy is stricter than the
chart's): then depths stay 0, the status says so, and Redis is not retried for a few seconds, so a poll
never waits on an unreachable server every time while the autoscaler still notices its return quickly.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from dataclasses import dataclass, field

from redis.asyncio import Redis

from kubespeech.config import RedisSettings
from kubespeech.jobs import Keys, queue_depth
from kubespeech.jobs.sessions import SessionKeys, active_sessions
from kubespeech.license.verdict import LicenseVerdict, read_verdict
from kubespeech.redis_client import connect
from kubespeech_operator.builders.common import REDIS_PORT
from kubespeech_operator.kube import ApiError, KubeClient, Resource
from kubespeech_operator.spec import SpeechDeploymentSpec

logger = logging.getLogger(__name__)

SECRETS = Resource("v1", "secrets")
UNREACHABLE_NOTE = "queue depth unknown: the operator cannot reach this stack's Redis"


@dataclass
class StackReading:
    """What one status refresh read from a stack's Redis (``note`` says why something is missing)."""

    depths: dict[str, int]
    note: str | None = None
    in_flight: dict[str, int] = field(default_factory=dict)
    streams: dict[str, int] = field(default_factory=dict)  # open live sessions per model
    verdict: LicenseVerdict | None = None
    reachable: bool = False


@dataclass
class _Connection:
    url: str
    password: str | None
    client: Redis | None  # None while Redis is considered unreachable (no idle pool kept for it)
    retry_after: float = 0.0


class QueueDepthReader:
    """Queue depths per model name, one cached Redis client per SpeechDeployment."""

    def __init__(self, kube: KubeClient, *, timeout_s: float = 1.0, retry_unreachable_s: float = 5.0) -> None:
        self.kube = kube
        self.timeout_s = timeout_s
        self.retry_unreachable_s = retry_unreachable_s
        self._connections: dict[tuple[str, str], _Connection] = {}

    async def _password(self, namespace: str, spec: SpeechDeploymentSpec, embedded: str | None) -> str | None:
        if spec.redis.mode == "embedded":
            return embedded
        ref = spec.redis.external.password_secret_ref if spec.redis.external else None
        if ref is None:
            return None
        secret = await self.kube.get(SECRETS, namespace, ref.name)
        value = ((secret or {}).get("data") or {}).get(ref.key)
        return base64.b64decode(value).decode() if value else None

    def _url(self, name: str, namespace: str, spec: SpeechDeploymentSpec) -> str:
        if spec.redis.mode == "external" and spec.redis.external is not None:
            return spec.redis.external.url
        return f"redis://{name}-redis.{namespace}.svc:{REDIS_PORT}/0"

    async def read(
        self, name: str, namespace: str, spec: SpeechDeploymentSpec, *, embedded_password: str | None = None
    ) -> StackReading:
        """Jobs waiting (not yet taken by a worker) per model name, and the license proxy's verdict."""
        models = sorted({pool.queue_name for _, pool in spec.pools()})
        key = (namespace, name)
        url = self._url(name, namespace, spec)
        try:
            password = await self._password(namespace, spec, embedded_password)
        except ApiError as exc:
            return StackReading(
                {}, f"queue depth unknown: cannot read the Redis password Secret ({exc.status})"
            )
        connection = self._connections.get(key)
        if connection is not None and (connection.url, connection.password) != (url, password):
            await self._close(connection)
            connection = None
        if connection is not None and time.monotonic() < connection.retry_after:
            return StackReading({}, UNREACHABLE_NOTE)
        if connection is None or connection.client is None:
            # Every field given explicitly: the operator's own environment must not leak into it.
            settings = RedisSettings(
                url=url, password=password, password_file=None, key_prefix=spec.redis.key_prefix
            )
            connection = _Connection(url, password, connect(settings, max_connections=2))
            self._connections[key] = connection
        client = connection.client
        assert client is not None
        keys = Keys(spec.redis.key_prefix)
        try:
            async with asyncio.timeout(self.timeout_s):
                depths, in_flight, streams = {}, {}, {}
                session_keys = SessionKeys(spec.redis.key_prefix)
                for model in models:
                    depth = await queue_depth(client, keys, model)
                    depths[model], in_flight[model] = depth.waiting, depth.in_flight
                    streams[model] = await active_sessions(client, session_keys, model)
                verdict = await read_verdict(client, spec.redis.key_prefix)
                return StackReading(depths, None, in_flight, streams, verdict, reachable=True)
        except Exception as exc:  # any Redis failure only means "depth unknown"
            logger.info("queue depths of %s/%s unavailable: %s", namespace, name, exc)
            await self._close(connection)
            connection.retry_after = time.monotonic() + self.retry_unreachable_s
            return StackReading({}, UNREACHABLE_NOTE)

    @staticmethod
    async def _close(connection: _Connection) -> None:
        if connection.client is not None:
            with contextlib.suppress(Exception):
                await connection.client.aclose()
            connection.client = None

    async def forget(self, namespace: str, name: str) -> None:
        connection = self._connections.pop((namespace, name), None)
        if connection is not None:
            await self._close(connection)

    async def aclose(self) -> None:
        for namespace, name in list(self._connections):
            await self.forget(namespace, name)
