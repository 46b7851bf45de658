"""Usage metering: one metadata-only event per finished request or session into a bounded Redis stream.

An event carries what the vendor may bill on (feature, model, audio seconds, characters, status code, time,
and ``cached`` for a request the API's result cache answered) and an id for deduplication upstream; it never carries audio, text, API keys or client addresses. The
stream is the durable buffer the license proxy drains upstream; it is capped at ``max_events`` (the oldest
are trimmed, and the proxy counts them as dropped from the ``added`` counter).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Mapping
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from kubespeech.license.keys import LicenseKeys, utc_day

log = logging.getLogger(__name__)

DEFAULT_MAX_EVENTS = 100_000
FEATURES = frozenset({"asr", "tts", "streaming"})
# Daily audio counters only need to outlive the day they count (plus clock slack).
_DAY_COUNTER_TTL_S = 3 * 86400


def as_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def decode_event(fields: Mapping[Any, Any] | None) -> dict[str, Any] | None:
    """A stream entry as the event sent upstream (typed fields), or None if it is not a usage event."""
    f = {as_text(k): as_text(v) for k, v in (fields or {}).items()}
    try:
        event: dict[str, Any] = {
            "id": f["id"],
            "ts": float(f["ts"]),
            "feature": f["feature"],
            "model": f["model"],
            "audio_seconds": float(f["audio_seconds"]),
            "characters": int(f["characters"]),
            "status_code": int(f["status_code"]),
        }
    except (KeyError, ValueError):
        return None
    if f.get("cached") == "1":
        # Only on cached events, so the events of a deployment without the cache keep their exact shape.
        event["cached"] = True
    return event


class UsageRecorder:
    """Records usage events; never raises to the request path (metering must not fail a served request).

    With ``flush_interval_s`` > 0 (the API server's setting) events are buffered in memory and written in
    one transaction per interval (or per ``flush_max_events``), so metering costs a request no Redis round
    trip of its own; at most one interval of events is at risk if the process dies. With 0, ``record``
    writes before it returns.
    """

    def __init__(
        self,
        redis: Redis,
        prefix: str = "ks",
        max_events: int = DEFAULT_MAX_EVENTS,
        *,
        flush_interval_s: float = 0.0,
        flush_max_events: int = 512,
    ) -> None:
        if max_events < 1:
            raise ValueError("max_events must be at least 1")
        self._redis = redis
        self._keys = LicenseKeys(prefix)
        self.max_events = max_events
        self.flush_interval_s = flush_interval_s
        self.flush_max_events = max(1, flush_max_events)
        self.failed = 0  # events lost because Redis was unreachable (exported by the API's metrics)
        self._pending: list[tuple[dict[Any, Any], float, float]] = []
        self._flusher: asyncio.Task[None] | None = None

    def _event(
        self,
        feature: str,
        model: str,
        audio_seconds: float,
        characters: int,
        status_code: int,
        cached: bool = False,
    ) -> tuple[dict[Any, Any], float, float]:
        now = time.time()
        audio_seconds = float(audio_seconds)
        if not math.isfinite(audio_seconds) or audio_seconds < 0:
            audio_seconds = 0.0
        event: dict[Any, Any] = {
            "id": uuid.uuid4().hex,
            "ts": f"{now:.3f}",
            "feature": feature if feature in FEATURES else "other",
            # Model names are operator-chosen identifiers; cap the length so a caller cannot stuff text in.
            "model": str(model)[:128],
            "audio_seconds": f"{audio_seconds:.3f}",
            "characters": str(max(0, int(characters))),
            "status_code": str(int(status_code)),
        }
        if cached:
            event["cached"] = "1"
        return event, audio_seconds, now

    async def record(
        self,
        *,
        feature: str,
        model: str,
        audio_seconds: float,
        characters: int,
        status_code: int,
        cached: bool = False,
    ) -> None:
        if self.flush_interval_s > 0:
            self.enqueue(
                feature=feature,
                model=model,
                audio_seconds=audio_seconds,
                characters=characters,
                status_code=status_code,
                cached=cached,
            )
            return
        await self._write([self._event(feature, model, audio_seconds, characters, status_code, cached)])

    def enqueue(
        self,
        *,
        feature: str,
        model: str,
        audio_seconds: float,
        characters: int,
        status_code: int,
        cached: bool = False,
    ) -> None:
        """Buffer one event (no I/O); a background flush writes the buffer soon."""
        self._pending.append(self._event(feature, model, audio_seconds, characters, status_code, cached))
        if self._flusher is None or self._flusher.done():
            delay = 0.0 if len(self._pending) >= self.flush_max_events else self.flush_interval_s
            self._flusher = asyncio.create_task(self._flush_after(delay))

    async def _flush_after(self, delay: float) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        await self.flush()

    async def flush(self) -> None:
        """Write every buffered event now."""
        while self._pending:
            batch, self._pending = (
                self._pending[: self.flush_max_events],
                self._pending[self.flush_max_events :],
            )
            await self._write(batch)

    async def aclose(self) -> None:
        """Flush what is buffered (on shutdown)."""
        if self._flusher is not None and not self._flusher.done():
            self._flusher.cancel()
        await self.flush()

    async def _write(self, events: list[tuple[dict[Any, Any], float, float]]) -> None:
        days: dict[str, float] = {}
        for _, seconds, ts in events:
            if seconds > 0:
                day = self._keys.audio_seconds_day(utc_day(ts))
                days[day] = days.get(day, 0.0) + seconds
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                for event, _, _ in events:
                    pipe.xadd(self._keys.usage_stream, event, maxlen=self.max_events, approximate=False)
                pipe.incrby(self._keys.usage_added, len(events))
                for day_key, seconds in days.items():
                    pipe.incrbyfloat(day_key, seconds)
                    pipe.expire(day_key, _DAY_COUNTER_TTL_S)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self.failed += len(events)
            log.warning(
                "usage events not recorded: Redis unavailable",
                extra={"error": type(exc).__name__, "events": len(events)},
            )
