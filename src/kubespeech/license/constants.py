"""Names and defaults of the license format, importable without pulling in cryptography or pydantic."""

from __future__ import annotations

FEATURES = ("asr", "tts", "streaming")
LIMIT_KEYS = ("max_concurrent_streams", "max_worker_replicas", "max_gpus", "audio_hours_per_day")
DEFAULT_CLOCK_SKEW_S = 300.0
DEFAULT_GRACE_HOURS = 24.0
