"""API server settings, read from ``KUBESPEECH_API_*`` environment variables (nested: ``__`` delimiter)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from kubespeech.config import QueueSettings, RedisSettings

# Names the official clients send by default; they resolve to the deployment's default model/voice.
SMALLEST_ASR_ALIASES = ["pulse", "pulse-pro", "lightning-asr", "lightning_asr"]
OPENAI_ASR_ALIASES = [
    "whisper-1",
    "gpt-4o-transcribe",
    "gpt-4o-mini-transcribe",
    "gpt-4o-mini-transcribe-2025-12-15",
    "gpt-transcribe",
]
SMALLEST_TTS_ALIASES = [
    "lightning",
    "lightning-v2",
    "lightning_v2",
    "lightning-large",
    "lightning_large",
    "lightning-v3.1",
    "lightning_v3.1",
    "lightning-v3.1-pro",
    "lightning_v3.1_pro",
]
OPENAI_TTS_ALIASES = ["tts-1", "tts-1-hd", "gpt-4o-mini-tts", "gpt-4o-mini-tts-2025-12-15"]
OPENAI_VOICES = [
    "alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse", "marin", "cedar",
]  # fmt: skip
SMALLEST_VOICES = ["emily", "magnus", "kanik", "meher", "jasmine", "arman", "arnav", "aditi", "raj", "george"]


class ApiLimits(BaseModel):
    """Request bounds; each violation is a typed 413/422, never a 500."""

    max_upload_bytes: int = Field(
        25 * 1024 * 1024, ge=1024, description="Largest audio upload (raw or multipart)."
    )
    max_json_bytes: int = Field(1024 * 1024, ge=1024, description="Largest JSON request body.")
    max_audio_seconds: float = Field(600.0, gt=0, description="Longest audio accepted for transcription.")
    max_text_chars: int = Field(5000, ge=1, description="Longest text accepted for synthesis.")
    request_timeout_s: float = Field(120.0, gt=0, description="Deadline of one job, queue wait included.")
    cold_start_wait_s: float = Field(
        10.0,
        ge=0,
        description="How long a request is held when no worker serves its model yet, before a 503.",
    )
    retry_after_s: int = Field(5, ge=1, description="Retry-After sent with 503 WORKERS_UNAVAILABLE.")


class ApiAliases(BaseModel):
    """Client default names mapped onto the deployment's default model and voice."""

    asr: list[str] = Field(default_factory=lambda: [*SMALLEST_ASR_ALIASES, *OPENAI_ASR_ALIASES])
    tts: list[str] = Field(default_factory=lambda: [*SMALLEST_TTS_ALIASES, *OPENAI_TTS_ALIASES])
    voices: list[str] = Field(default_factory=lambda: [*OPENAI_VOICES, *SMALLEST_VOICES])
    default_asr_model: str | None = Field(
        None, description="Default ASR model; the models file's default if unset."
    )
    default_tts_model: str | None = Field(
        None, description="Default TTS model; the models file's default if unset."
    )
    default_voice: str | None = Field(
        None, description="Default voice; the default TTS model's first voice if unset."
    )


class TaskCacheSettings(BaseModel):
    """The result cache of one task (see ``kubespeech.api.cache``)."""

    enabled: bool = Field(True, description="Answer repeated requests from Redis without a worker.")
    max_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024,
        le=1 << 40,
        description="Bytes the cached values may take in Redis; the least recently used are evicted first.",
    )
    ttl_s: int = Field(
        7 * 86400, ge=1, le=365 * 86400, description="How long an entry lives after it is stored."
    )


class AsrCacheSettings(TaskCacheSettings):
    """The STT result cache: off unless enabled, since audio and transcripts may be sensitive."""

    enabled: bool = Field(False, description="Answer repeated transcriptions from Redis (opt-in).")
    ttl_s: int = Field(86400, ge=1, le=365 * 86400, description="How long an entry lives after it is stored.")
    key_file: Path | None = Field(
        None,
        description=(
            "File holding the 32-byte key (base64, hex or raw; a mounted Secret) that encrypts every entry "
            "with AES-256-GCM and keys entries by HMAC."
        ),
    )
    unencrypted_in_embedded_redis: bool = Field(
        False,
        description=(
            "Allow plaintext entries without key_file: only for the stack's own embedded Redis, which nothing "
            "outside the stack reaches (the operator sets it)."
        ),
    )

    @model_validator(mode="after")
    def _protected(self) -> AsrCacheSettings:
        if self.enabled and self.key_file is None and not self.unencrypted_in_embedded_redis:
            raise ValueError(
                "the STT cache holds transcripts: enabling it needs key_file (an encryption key from a "
                "Secret), or unencrypted_in_embedded_redis for the stack's own embedded Redis"
            )
        return self


class CacheSettings(BaseModel):
    """Result caching per task: TTS on by default, STT opt-in and protected."""

    tts: TaskCacheSettings = Field(default_factory=TaskCacheSettings)
    asr: AsrCacheSettings = Field(default_factory=AsrCacheSettings)


class ApiSettings(BaseSettings):
    """One API server process."""

    model_config = SettingsConfigDict(env_prefix="KUBESPEECH_API_", env_nested_delimiter="__", extra="ignore")

    host: str = Field("0.0.0.0", description="Address to bind.")
    port: int = Field(7100, ge=0, le=65535, description="Port to bind (0: any free port).")
    keys_file: Path | None = Field(
        None,
        description="File of API keys (a mounted Secret): one per line, plain or 'sha256:<hex>'; reloaded live.",
    )
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="Extra API keys (development); hashed at load, never kept in plain text.",
    )
    allow_anonymous: bool = Field(
        False, description="Serve requests without a key when no key is configured (local experiments only)."
    )
    models_file: Path | None = Field(None, description="JSON list of served models written by the operator.")
    usage_flush_interval_s: float = Field(
        0.05,
        ge=0,
        description="Usage events are written to Redis in one batch per interval (0: per request).",
    )
    license_proxy_url: str | None = Field(
        None, description="License proxy base URL; unset allows everything."
    )
    limits: ApiLimits = Field(default_factory=ApiLimits)
    aliases: ApiAliases = Field(default_factory=ApiAliases)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    refresh_interval_s: float = Field(
        1.0, gt=0, description="How often model, worker and key state is refreshed in the background."
    )
    ready_requires_workers: bool = Field(
        False,
        description="Make /ready fail while a task has no live worker (otherwise it reports cold_start).",
    )
    redis: RedisSettings = Field(default_factory=RedisSettings, exclude=True)
    queue: QueueSettings = Field(default_factory=QueueSettings, exclude=True)
