"""Air-gapped usage export: the buffered usage events as one signed JSON file for the vendor.

The file carries the license key (vendor-signed, so the vendor knows whose usage it is), the events, and an
Ed25519 signature by this installation's export key (generated once and kept in Redis). The vendor's
server pins that key to the license on first import, so later files cannot be altered or forged by a
third party. Like any self-reported metering it cannot stop the licensee from withholding a file.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from redis.asyncio import Redis

from kubespeech.license.keys import LicenseKeys
from kubespeech.license.token import LicenseClaims, TokenError, iso, verify_signature
from kubespeech.license.usage import as_text, decode_event

EXPORT_FORMAT = "kubespeech-usage-export/1"


def canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


async def installation_key(redis: Redis, keys: LicenseKeys) -> Ed25519PrivateKey:
    """This installation's export signing key, created on first use (SETNX, so replicas share one)."""
    fresh = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    await redis.set(keys.export_key, base64.b64encode(fresh), nx=True)
    stored = await redis.get(keys.export_key)
    if stored is None:
        raise RuntimeError("the export key vanished from Redis")
    return Ed25519PrivateKey.from_private_bytes(base64.b64decode(stored))


async def export_usage(
    redis: Redis, keys: LicenseKeys, *, token: str, claims: LicenseClaims, out: Path, keep: bool = False
) -> int:
    """Write every buffered event to ``out`` (signed); then remove them from the buffer unless ``keep``."""
    entries = await redis.xrange(keys.usage_stream) or []
    ids = [as_text(entry_id) for entry_id, _ in entries]
    events = [e for e in (decode_event(fields) for _, fields in entries) if e is not None]
    key = await installation_key(redis, keys)
    doc: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "license_id": claims.lid,
        "license_key": token,
        "created_at": iso(time.time()),
        "installation_key": base64.b64encode(
            key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        ).decode(),
        "events": events,
    }
    doc["signature"] = base64.b64encode(key.sign(canonical(doc))).decode()
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("wb") as fh:
        fh.write(json.dumps(doc, indent=1).encode())
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(out)
    # Only after the file is safely on disk do the events leave the buffer (they count as sent).
    if ids and not keep:
        async with redis.pipeline(transaction=True) as pipe:
            pipe.xdel(keys.usage_stream, *ids)
            pipe.incrby(keys.usage_sent, len(events))
            await pipe.execute()
    return len(events)


class ExportError(Exception):
    """An export file that must not be ingested."""


def verify_export(doc: Any, vendor_key: Ed25519PublicKey) -> tuple[LicenseClaims, str, list[dict[str, Any]]]:
    """Check an export file: returns (claims, installation key base64, events) or raises ExportError."""
    if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
        raise ExportError("not a kubespeech usage export")
    try:
        claims = verify_signature(str(doc.get("license_key", "")), vendor_key)
    except TokenError as exc:
        raise ExportError(f"license key: {exc.reason}") from exc
    if claims.lid != doc.get("license_id"):
        raise ExportError("license id does not match the license key")
    body = {k: v for k, v in doc.items() if k != "signature"}
    try:
        install_b64 = str(doc["installation_key"])
        install_key = Ed25519PublicKey.from_public_bytes(base64.b64decode(install_b64, validate=True))
        install_key.verify(base64.b64decode(str(doc["signature"]), validate=True), canonical(body))
    except (KeyError, ValueError, binascii.Error, InvalidSignature) as exc:
        raise ExportError("bad signature") from exc
    events = doc.get("events")
    if not isinstance(events, list):
        raise ExportError("no events list")
    return claims, install_b64, events
