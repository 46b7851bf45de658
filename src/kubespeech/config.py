"""Settings shared by every component, read from ``KUBESPEECH_*`` environment variables (pydantic-settings)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class RedisSettings(BaseSettings):
    """Where Redis is; the password comes from the environment or a mounted Secret file, never a ConfigMap."""

    model_config = SettingsConfigDict(env_prefix="KUBESPEECH_REDIS_", extra="ignore")

    url: str = Field("redis://127.0.0.1:6379/0", description="redis:// or rediss:// URL (no password in it).")
    password: SecretStr | None = Field(None, description="Redis password; prefer password_file in Kubernetes.")
    password_file: Path | None = Field(None, description="File holding the Redis password (a mounted Secret).")
    key_prefix: str = Field("ks", description="Prefix of every key the stack writes, so stacks can share a Redis.")
    tls_insecure_skip_verify: bool = Field(False, description="Skip certificate checks for rediss:// (testing).")

    def resolved_password(self) -> str | None:
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is not None:
            return self.password_file.read_text().strip() or None
        return None


class QueueSettings(BaseSettings):
    """Bounds and timings of the job protocol; the API and the workers of one stack must agree on them."""

    model_config = SettingsConfigDict(env_prefix="KUBESPEECH_QUEUE_", extra="ignore")

    max_length: int = Field(1000, ge=1, description="Jobs outstanding (waiting + in flight) per model queue.")
    visibility_timeout_s: float = Field(
        30.0, gt=0, description="A job held this long by a silent worker is reclaimed by another worker."
    )
    max_deliveries: int = Field(3, ge=1, description="Deliveries before a job goes to the dead-letter stream.")
    result_ttl_s: float = Field(120.0, gt=0, description="How long an unread result or payload is kept.")
    inline_payload_max_bytes: int = Field(
        16 * 1024, ge=0, description="Payloads up to this size ride in the stream entry; larger ones in one key."
    )
    max_payload_bytes: int = Field(64 * 1024 * 1024, ge=1, description="Largest payload accepted on a queue.")
    default_deadline_s: float = Field(120.0, gt=0, description="Deadline of a job when the caller gives none.")
    worker_heartbeat_s: float = Field(2.0, gt=0, description="How often workers announce themselves.")
    worker_ttl_s: float = Field(10.0, gt=0, description="A worker silent this long no longer counts as live.")
    dead_letter_max_length: int = Field(10000, ge=1, description="Entries kept per dead-letter stream.")
