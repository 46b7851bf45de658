"""License tokens: compact Ed25519-signed claims (``ksl1.<payload>.<signature>``, base64url, no padding).

The payload is canonical JSON of :class:`LicenseClaims`; the signature covers ``ksl1.<payload>``. Checking
a token needs only the vendor's public key. Signature checks and time checks are separate steps so the
proxy can still show who an expired license belongs to.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
import uuid
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kubespeech.license.constants import DEFAULT_CLOCK_SKEW_S, DEFAULT_GRACE_HOURS, FEATURES

TOKEN_PREFIX = "ksl1"
# Tokens are small; anything far larger is not a token and is refused before any decoding work.
_MAX_TOKEN_CHARS = 8192


class TokenError(Exception):
    """A token that cannot be used; ``reason`` is a stable word (malformed, bad_signature, expired, ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class Limits(BaseModel):
    """Licensed limits; ``None`` means unlimited."""

    model_config = ConfigDict(extra="forbid")

    max_concurrent_streams: int | None = Field(
        None, ge=0, description="Open streaming sessions, cluster-wide."
    )
    max_worker_replicas: int | None = Field(None, ge=0, description="Worker pods across all pools.")
    max_gpus: int | None = Field(None, ge=0, description="GPUs requested by worker pods.")
    audio_hours_per_day: float | None = Field(
        None, ge=0, description="Audio processed per UTC day, in hours."
    )


class CheckinPolicy(BaseModel):
    """How the installation must talk to the vendor's license server."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["online", "grace", "offline"] = Field(
        "grace",
        description="online: check-ins required (only a missed check-in or two is tolerated); "
        "grace: service continues for grace_hours without contact; offline: never calls out.",
    )
    grace_hours: float = Field(DEFAULT_GRACE_HOURS, ge=0, description="Time without a check-in (grace mode).")


class LicenseClaims(BaseModel):
    """What a license grants, to whom, and for how long (times are Unix seconds)."""

    model_config = ConfigDict(extra="forbid")

    v: Literal[1] = 1
    lid: str = Field(..., min_length=1, max_length=64, description="License id.")
    customer: str = Field(..., min_length=1, max_length=200)
    iat: int = Field(..., description="Issued at.")
    nbf: int = Field(..., description="Not valid before.")
    exp: int = Field(..., description="Expires at.")
    kid: str = Field(..., description="Id of the signing key (first 16 hex digits of its SHA-256).")
    features: list[str] = Field(default_factory=list)
    limits: Limits = Field(default_factory=Limits)
    checkin: CheckinPolicy = Field(default_factory=CheckinPolicy)
    upstream: str | None = Field(None, max_length=500, description="Vendor license server base URL.")

    @field_validator("features")
    @classmethod
    def _known_features(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(FEATURES))
        if unknown:
            raise ValueError(f"unknown features: {', '.join(unknown)}")
        return sorted(set(value), key=FEATURES.index)


# -- keys ------------------------------------------------------------------------------------


def generate_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_private_key(data: bytes | str | Path) -> Ed25519PrivateKey:
    pem = Path(data).read_bytes() if isinstance(data, Path) else data
    pem = pem.encode() if isinstance(pem, str) else pem
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("not an Ed25519 private key")
    return key


def load_public_key(data: bytes | str | Path) -> Ed25519PublicKey:
    """Load a PEM public key, or a bare base64 of the 32 raw key bytes."""
    raw = Path(data).read_bytes() if isinstance(data, Path) else data
    raw = raw.encode() if isinstance(raw, str) else raw
    if b"-----BEGIN" in raw:
        key = serialization.load_pem_public_key(raw)
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("not an Ed25519 public key")
        return key
    try:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(raw.strip(), validate=True))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not an Ed25519 public key (PEM or base64 of 32 bytes)") from exc


def key_id(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


# -- tokens ----------------------------------------------------------------------------------


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    if not text or any(
        c not in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_" for c in text
    ):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_claims(
    *,
    signing_key: Ed25519PrivateKey,
    customer: str,
    expires_at: float,
    features: list[str],
    limits: dict[str, float | int] | None = None,
    checkin: CheckinPolicy | None = None,
    upstream: str | None = None,
    not_before: float | None = None,
    license_id: str | None = None,
    now: float | None = None,
) -> LicenseClaims:
    issued = int(time.time() if now is None else now)
    return LicenseClaims(
        lid=license_id or f"lic_{uuid.uuid4().hex[:20]}",
        customer=customer,
        iat=issued,
        nbf=int(issued if not_before is None else not_before),
        exp=int(expires_at),
        kid=key_id(signing_key.public_key()),
        features=features,
        limits=Limits.model_validate(limits or {}),
        checkin=checkin or CheckinPolicy(),
        upstream=upstream,
    )


def sign(claims: LicenseClaims, key: Ed25519PrivateKey) -> str:
    payload = json.dumps(claims.model_dump(exclude_none=True), sort_keys=True, separators=(",", ":"))
    signed = f"{TOKEN_PREFIX}.{_b64e(payload.encode())}"
    return f"{signed}.{_b64e(key.sign(signed.encode('ascii')))}"


def _split(token: str) -> tuple[str, bytes, bytes]:
    token = token.strip()
    if len(token) > _MAX_TOKEN_CHARS:
        raise TokenError("malformed", "The license key is too long to be a license key.")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        raise TokenError("malformed", "The license key is not a kubespeech license key.")
    try:
        return f"{parts[0]}.{parts[1]}", _b64d(parts[1]), _b64d(parts[2])
    except ValueError as exc:
        raise TokenError("malformed", "The license key is not valid base64url.") from exc


def _parse_claims(payload: bytes) -> LicenseClaims:
    try:
        return LicenseClaims.model_validate_json(payload)
    except ValidationError as exc:
        raise TokenError("malformed", "The license key's claims are not valid.") from exc


def decode_unverified(token: str) -> LicenseClaims:
    """The claims of a token WITHOUT checking its signature (for display only, never for decisions)."""
    _, payload, _ = _split(token)
    return _parse_claims(payload)


def verify_signature(token: str, public_key: Ed25519PublicKey) -> LicenseClaims:
    """Claims of a token signed by ``public_key``; raises TokenError (malformed, wrong_key, bad_signature)."""
    signed, payload, signature = _split(token)
    try:
        public_key.verify(signature, signed.encode("ascii"))
    except InvalidSignature as exc:
        try:
            kid = decode_unverified(token).kid
        except TokenError:
            kid = None
        if kid is not None and kid != key_id(public_key):
            raise TokenError(
                "wrong_key",
                "The license key does not verify with this vendor public key (it names another key).",
            ) from exc
        raise TokenError("bad_signature", "The license key's signature does not match its content.") from exc
    return _parse_claims(payload)


def check_times(
    claims: LicenseClaims, *, now: float | None = None, skew_s: float = DEFAULT_CLOCK_SKEW_S
) -> None:
    """Raise TokenError (not_yet_valid, expired) unless ``now`` is inside [nbf, exp] widened by ``skew_s``."""
    t = time.time() if now is None else now
    if t + skew_s < claims.nbf:
        raise TokenError("not_yet_valid", f"The license is not valid before {iso(claims.nbf)}.")
    if t - skew_s >= claims.exp:
        raise TokenError("expired", f"The license expired at {iso(claims.exp)}.")


def verify(
    token: str,
    public_key: Ed25519PublicKey,
    *,
    now: float | None = None,
    skew_s: float = DEFAULT_CLOCK_SKEW_S,
) -> LicenseClaims:
    """Signature and validity period together (what ``kubespeech license inspect`` checks)."""
    claims = verify_signature(token, public_key)
    check_times(claims, now=now, skew_s=skew_s)
    return claims


def token_fingerprint(token: str) -> str:
    """A short, non-reversible name for a token, safe to log (the token itself never is)."""
    return hashlib.sha256(token.strip().encode()).hexdigest()[:12]


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
