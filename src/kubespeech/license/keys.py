"""Redis key names of the licensing subsystem, shared by the proxy, the gate and the usage recorder."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class LicenseKeys:
    """All keys live under ``<prefix>:license:`` so several stacks can share one Redis."""

    prefix: str = "ks"

    @property
    def base(self) -> str:
        return f"{self.prefix}:license"

    @property
    def usage_stream(self) -> str:
        """Bounded stream of usage events waiting to be sent upstream (the durable buffer)."""
        return f"{self.base}:usage"

    @property
    def usage_added(self) -> str:
        """Counter of events ever added; added - sent - pending = dropped by the buffer bound."""
        return f"{self.base}:usage:added"

    @property
    def usage_sent(self) -> str:
        return f"{self.base}:usage:sent"

    @property
    def usage_sender_lock(self) -> str:
        """Held by the one proxy replica that currently ships usage upstream."""
        return f"{self.base}:usage:sender"

    def audio_seconds_day(self, day: str | None = None) -> str:
        """Audio seconds processed on one UTC day (``YYYYMMDD``), for the audio-hours-per-day limit."""
        return f"{self.base}:audio_s:{day or utc_day()}"

    @property
    def streams(self) -> str:
        """Sorted set of open stream leases (member: lease id, score: expiry time)."""
        return f"{self.base}:streams"

    def state(self, license_id: str) -> str:
        """Shared check-in state of one license (last good check-in, revocation, first seen)."""
        return f"{self.base}:state:{license_id}"

    @property
    def verdict(self) -> str:
        """Hash of the proxy's latest verdict on the license, for the operator's LicenseValid condition.

        Fields: ``state`` (valid, grace, expired, revoked, invalid, missing), ``usable`` ("1"/"0"),
        ``message``, ``updated_at_unix``, and when known ``reason``, ``license_id``, ``expires_at_unix``.
        Rewritten every few seconds with a TTL (see :mod:`kubespeech.license.verdict`), so it vanishes
        when no proxy is alive.
        """
        return f"{self.base}:verdict"

    @property
    def export_key(self) -> str:
        """Private key of this installation that signs air-gapped usage exports."""
        return f"{self.base}:export_key"


def utc_day(ts: float | None = None) -> str:
    return time.strftime("%Y%m%d", time.gmtime(time.time() if ts is None else ts))


def seconds_until_utc_midnight(ts: float | None = None) -> float:
    now = time.time() if ts is None else ts
    return 86400.0 - (now % 86400.0)
