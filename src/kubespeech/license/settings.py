"""Settings of the license proxy and the reference license server (``KUBESPEECH_LICENSE_*`` env vars)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from kubespeech.license.constants import DEFAULT_CLOCK_SKEW_S
from kubespeech.license.usage import DEFAULT_MAX_EVENTS


class ProxySettings(BaseSettings):
    """``kubespeech license-proxy``: the license key and vendor public key come from mounted Secret files."""

    model_config = SettingsConfigDict(env_prefix="KUBESPEECH_LICENSE_", extra="ignore")

    key: SecretStr | None = Field(None, description="The license key itself; prefer key_file in Kubernetes.")
    key_file: Path | None = Field(None, description="File holding the license key (a mounted Secret).")
    public_key: str | None = Field(
        None, description="Vendor public key (PEM, or base64 of the raw 32 bytes)."
    )
    public_key_file: Path | None = Field(None, description="File holding the vendor public key.")
    upstream_url: str | None = Field(
        None, description="License server base URL; the license's own when unset."
    )
    checkin_interval_s: float = Field(900.0, gt=0, description="Seconds between check-ins with the upstream.")
    grace_hours: float | None = Field(
        None, ge=0, description="Shortens the license's grace period (it can never lengthen it)."
    )
    clock_skew_s: float = Field(
        DEFAULT_CLOCK_SKEW_S, ge=0, description="Tolerated clock difference, seconds."
    )
    upstream_timeout_s: float = Field(10.0, gt=0, description="Timeout of each call to the upstream.")
    usage_batch_size: int = Field(500, ge=1, le=10000, description="Usage events per upstream request.")
    usage_interval_s: float = Field(10.0, gt=0, description="Seconds between usage uploads when idle.")
    usage_backoff_max_s: float = Field(300.0, gt=0, description="Longest wait between failed uploads.")
    usage_max_events: int = Field(
        DEFAULT_MAX_EVENTS,
        ge=1,
        description="Bound of the usage buffer (the API's recorder must use the same).",
    )
    reload_poll_s: float = Field(5.0, gt=0, description="How often the key files are checked for changes.")
    host: str = Field("0.0.0.0", description="Address the proxy binds.")
    port: int = Field(3369, ge=0, le=65535, description="Port of the proxy (0: any free port).")
    dev: bool = Field(False, description="Use the built-in dev license and dev public key (kubespeech dev).")
    allow_dev_key: bool = Field(
        False, description="Accept tokens signed by the public dev key (never in prod)."
    )
    instance_id: str | None = Field(
        None, description="Name of this replica in check-ins; hostname when unset."
    )


class ServerSettings(BaseSettings):
    """``kubespeech license-server``: the vendor-side reference upstream."""

    model_config = SettingsConfigDict(env_prefix="KUBESPEECH_LICENSE_SERVER_", extra="ignore")

    public_key_file: Path | None = Field(
        None, description="Vendor public key that license keys must verify with."
    )
    public_key: str | None = Field(None, description="Vendor public key (PEM or base64 raw).")
    db: str = Field(":memory:", description="SQLite file for usage, check-ins and revocations.")
    admin_token_file: Path | None = Field(
        None, description="Bearer token required by the revocation endpoints."
    )
    revoked: str = Field("", description="Comma-separated license ids revoked at start.")
    host: str = Field("0.0.0.0", description="Address the server binds.")
    port: int = Field(3370, ge=0, le=65535, description="Port of the server.")
    max_events_per_request: int = Field(10000, ge=1, description="Largest usage batch accepted.")
