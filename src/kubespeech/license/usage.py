"""Usage metering: one metadata-only event per finished request or session into a bounded Redis stream.

An event carries what the vendor may bill on (feature, model, audio seconds, characters, status code, time)
and an id for deduplication upstream; it never carries audio, text, API keys or client addresses. The
stream is the durable buffer the license proxy drains upstream; it is capped at ``max_events`` (the oldest
are trimmed, and the proxy counts them as dropped from the ``added`` counter).
"""

from __future__ import annotations

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
        return {
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


class UsageRecorder:
    """Records usage events; never raises to the request path (metering must not fail a served request)."""

    def __init__(self, redis: Redis, prefix: str = "ks", max_events: int = DEFAULT_MAX_EVENTS) -> None:
        if max_events < 1:
            raise ValueError("max_events must be at least 1")
        self._redis = redis
        self._keys = LicenseKeys(prefix)
        self.max_events = max_events
        self.failed = 0  # events lost because Redis was unreachable (exported by the API's metrics)

    async def record(
        self,
        *,
        feature: str,
        model: str,
        audio_seconds: float,
        characters: int,
        status_code: int,
    ) -> None:
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
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.xadd(self._keys.usage_stream, event, maxlen=self.max_events, approximate=False)
                pipe.incr(self._keys.usage_added)
                if audio_seconds > 0:
                    day_key = self._keys.audio_seconds_day(utc_day(now))
                    pipe.incrbyfloat(day_key, audio_seconds)
                    pipe.expire(day_key, _DAY_COUNTER_TTL_S)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self.failed += 1
            log.warning("usage event not recorded: Redis unavailable", extra={"error": type(exc).__name__})
