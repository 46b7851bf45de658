"""License tokens: signing, verification and every way a token can be bad."""

from __future__ import annotations

import base64
import json
import time

import pytest

from kubespeech.license import dev_keys
from kubespeech.license.token import (
    TokenError,
    check_times,
    decode_unverified,
    generate_private_key,
    key_id,
    verify,
    verify_signature,
)
from tests.license.conftest import Vendor


def _reason(token: str, vendor: Vendor, **kw: float) -> str:
    with pytest.raises(TokenError) as info:
        verify(token, vendor.key.public_key(), **kw)
    return info.value.reason


def _flip(token: str, index: int) -> str:
    c = token[index]
    return token[:index] + ("B" if c != "B" else "C") + token[index + 1 :]


def test_round_trip_carries_all_claims(vendor: Vendor) -> None:
    token = vendor.token(
        features=["asr", "streaming"],
        limits={"max_concurrent_streams": 4, "max_gpus": 2, "audio_hours_per_day": 1.5},
        mode="online",
        upstream="https://license.example.com",
        license_id="lic_abc",
    )
    assert token.startswith("ksl1.") and len(token) < 700
    claims = verify(token, vendor.key.public_key())
    assert claims.lid == "lic_abc" and claims.customer == "ACME Test"
    assert claims.features == ["asr", "streaming"]
    assert claims.limits.max_concurrent_streams == 4 and claims.limits.audio_hours_per_day == 1.5
    assert claims.limits.max_worker_replicas is None
    assert claims.checkin.mode == "online" and claims.upstream == "https://license.example.com"
    assert claims.kid == key_id(vendor.key.public_key())


def test_one_changed_byte_anywhere_breaks_the_signature(vendor: Vendor) -> None:
    token = vendor.token()
    payload_end = token.rindex(".")
    for index in (7, len(token) // 3, payload_end - 3, payload_end + 5, len(token) - 5):
        assert _reason(_flip(token, index), vendor) in ("bad_signature", "wrong_key", "malformed"), index
    # A changed claim (more features) with the original signature is refused as tampering.
    head, payload, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["exp"] += 86400 * 365
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    assert _reason(f"{head}.{forged}.{sig}", vendor) == "bad_signature"


def test_wrong_public_key_is_named(vendor: Vendor) -> None:
    other = generate_private_key()
    token = vendor.token(key=other)
    assert _reason(token, vendor) == "wrong_key"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "ksl1",
        "ksl1.a.b.c",
        "ksl2.eyJ9.AAAA",
        "ksl1.@@@.AAAA",
        "ksl1..",
        "x" * 20000,
        "ksl1.e30.e30",
    ],
)
def test_malformed_tokens(token: str, vendor: Vendor) -> None:
    assert _reason(token, vendor) in ("malformed", "bad_signature")


def test_validly_signed_garbage_claims_are_malformed(vendor: Vendor) -> None:
    def signed(payload: bytes) -> str:
        body = "ksl1." + base64.urlsafe_b64encode(payload).rstrip(b"=").decode()
        sig = base64.urlsafe_b64encode(vendor.key.sign(body.encode())).rstrip(b"=").decode()
        return f"{body}.{sig}"

    assert _reason(signed(b"not json"), vendor) == "malformed"
    assert _reason(signed(b'{"lid": "x"}'), vendor) == "malformed"
    good = decode_unverified(vendor.token()).model_dump()
    assert (
        _reason(signed(json.dumps({**good, "features": ["asr", "telepathy"]}).encode()), vendor)
        == "malformed"
    )
    assert _reason(signed(json.dumps({**good, "admin": True}).encode()), vendor) == "malformed"


def test_expired_and_not_yet_valid(vendor: Vendor) -> None:
    now = time.time()
    assert _reason(vendor.token(now=now - 7200, expires_in=3600), vendor) == "expired"
    assert _reason(vendor.token(not_before_in=3600), vendor) == "not_yet_valid"


def test_clock_skew_within_tolerance_is_accepted(vendor: Vendor) -> None:
    now = time.time()
    # Expired 100 s ago / valid from 100 s in the future: accepted with a 300 s tolerance.
    claims = verify_signature(vendor.token(now=now - 1000, expires_in=900), vendor.key.public_key())
    check_times(claims, now=now, skew_s=300)
    with pytest.raises(TokenError, match="expired"):
        check_times(claims, now=now, skew_s=50)
    early = verify_signature(vendor.token(now=now, not_before_in=100), vendor.key.public_key())
    check_times(early, now=now, skew_s=300)
    with pytest.raises(TokenError) as info:
        check_times(early, now=now, skew_s=10)
    assert info.value.reason == "not_yet_valid"


def test_dev_license_is_signed_by_the_published_dev_key() -> None:
    token = dev_keys.dev_license(days=1)
    claims = verify(token, dev_keys.dev_public_key())
    assert claims.kid == dev_keys.DEV_KEY_ID
    assert claims.checkin.mode == "offline"
    assert claims.features == ["asr", "tts", "streaming"]
    assert "not for production" in claims.customer
