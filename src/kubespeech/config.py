"""Settings shared by every component, read from ``KUBESPEECH_*`` environment variables (pydantic-settings)."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class RedisSettings(BaseSettings):
    """Where Redis is; the password comes from the environment or a mounted Secret file, never a ConfigMap."""

    model_config = SettingsConfigDict(env_prefix="KUBESPEECH_REDIS_", extra="ignore")

    url: str = Field("redis://127.0.0.1:6379/0", description="redis:// or rediss:// URL (no password in it).")
    password: SecretStr | None = Field(
        None, description="Redis password; prefer password_file in Kubernetes."
    )
    password_file: Path | None = Field(
        None, description="File holding the Redis password (a mounted Secret)."
    )
    key_prefix: str = Field(
        "ks", description="Prefix of every key the stack writes, so stacks can share a Redis."
    )
    tls_insecure_skip_verify: bool = Field(
        False, description="Skip certificate checks for rediss:// (testing)."
    )
    max_connections: int = Field(
        512,
        ge=4,
        description=(
            "Connections per API process; each request in flight holds one while it waits for its result, "
            "so requests beyond the pool (less a few kept for other commands) wait for a free one."
        ),
    )

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
    max_deliveries: int = Field(
        3, ge=1, description="Deliveries before a job goes to the dead-letter stream."
    )
    result_ttl_s: float = Field(120.0, gt=0, description="How long an unread result or payload is kept.")
    inline_payload_max_bytes: int = Field(
        16 * 1024,
        ge=0,
        description="Payloads up to this size ride in the stream entry; larger ones in one key.",
    )
    max_payload_bytes: int = Field(64 * 1024 * 1024, ge=1, description="Largest payload accepted on a queue.")
    default_deadline_s: float = Field(
        120.0, gt=0, description="Deadline of a job when the caller gives none."
    )
    worker_heartbeat_s: float = Field(2.0, gt=0, description="How often workers announce themselves.")
    worker_ttl_s: float = Field(10.0, gt=0, description="A worker silent this long no longer counts as live.")
    dead_letter_max_length: int = Field(10000, ge=1, description="Entries kept per dead-letter stream.")


class WorkerSettings(BaseSettings):
    """One worker process: which queue it serves, with which engine and model, and how it batches."""

    model_config = SettingsConfigDict(env_prefix="KUBESPEECH_WORKER_", extra="ignore")

    task: str = Field("asr", pattern="^(asr|tts)$", description="asr or tts.")
    model: str = Field(
        ..., min_length=1, description="Model (queue) name clients ask for; pools may share one."
    )
    engine: str = Field(..., description="Engine: whisper, piper, nemo (or noop for benchmarks).")
    model_path: str | None = Field(
        None, description="Local model path; the engine's bundled model when unset."
    )
    device: str = Field("cpu", description="cpu or cuda[:N].")
    max_batch_size: int = Field(8, ge=1, le=1024, description="Most jobs run in one engine call.")
    max_wait_ms: int = Field(
        5, ge=0, le=10000, description="How long to wait to fill a batch after the first job."
    )
    health_port: int = Field(
        9090, ge=0, le=65535, description="Port of /healthz, /readyz and /metrics (0: any)."
    )
    health_host: str = Field("0.0.0.0", description="Address the health server binds.")
    drain_timeout_s: float = Field(60.0, gt=0, description="On SIGTERM, how long in-flight work may take.")
    max_batch_s: float = Field(
        300.0,
        gt=0,
        description=(
            "An engine call running longer is taken as hung: /healthz and /readyz fail (the kubelet restarts "
            "the pod) and its jobs are released to other workers, or dead-lettered on their last delivery."
        ),
    )
    engine_options: dict[str, object] = Field(
        default_factory=dict, description="Engine-specific options (JSON)."
    )
    consumer_name: str | None = Field(
        None, description="Consumer name in the group; hostname-pid when unset."
    )


class LogSettings(BaseSettings):
    """Logging of every component."""

    model_config = SettingsConfigDict(env_prefix="KUBESPEECH_LOG_", extra="ignore")

    level: str = Field("INFO", description="Log level: DEBUG, INFO, WARNING or ERROR.")


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel a field holds (``Model`` or ``Model | None``), else None."""
    candidates = typing.get_args(annotation) or (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def env_names(settings: type[BaseSettings]) -> set[str]:
    """Every environment variable ``settings`` reads: prefix + field, and nested fields with the delimiter."""
    prefix = str(settings.model_config.get("env_prefix") or "")
    delimiter = settings.model_config.get("env_nested_delimiter")
    out: set[str] = set()

    def walk(model: type[BaseModel], head: str) -> None:
        for name, info in model.model_fields.items():
            out.add(head + name.upper())
            nested = _nested_model(info.annotation)
            if delimiter and nested is not None:
                walk(nested, head + name.upper() + str(delimiter))

    walk(settings, prefix)
    return out


def env_name(settings: type[BaseSettings], *path: str) -> str:
    """The environment variable of one setting, e.g. ``env_name(ApiSettings, "cache", "tts", "enabled")``.

    Builders and ``kubespeech dev`` name variables through this, so a renamed field cannot leave a variable
    that nothing reads: an unknown path raises KeyError here, at render time.
    """
    prefix = str(settings.model_config.get("env_prefix") or "")
    delimiter = str(settings.model_config.get("env_nested_delimiter") or "")
    model: type[BaseModel] | None = settings
    for i, part in enumerate(path):
        if model is None or part not in model.model_fields:
            raise KeyError(f"{settings.__name__} has no setting {'.'.join(path[: i + 1])}")
        if i < len(path) - 1 and not delimiter:
            raise KeyError(f"{settings.__name__} reads no nested variables ({'.'.join(path)})")
        model = _nested_model(model.model_fields[part].annotation)
    return prefix + delimiter.join(p.upper() for p in path)
