"""The DEVELOPMENT key pair and dev license for ``kubespeech dev`` — public on purpose, never for production.

Anyone can sign tokens with this key, so a license proxy in production mode refuses tokens that verify
against it unless ``KUBESPEECH_LICENSE_ALLOW_DEV_KEY=true`` is set explicitly.
"""

from __future__ import annotations

import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from kubespeech.license.token import (
    CheckinPolicy,
    key_id,
    load_private_key,
    load_public_key,
    new_claims,
    sign,
)

DEV_PRIVATE_KEY_PEM = b"""-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIPtEgR1VvuT3cGvHYiSOmcyBHM7jVw5K0YgfkB3j6PZm
-----END PRIVATE KEY-----
"""

DEV_PUBLIC_KEY_PEM = b"""-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAqDEPVaKz+3zAaMlqxLi452YDkxvxbzZ4mC4Ov+/+nyY=
-----END PUBLIC KEY-----
"""


def dev_private_key() -> Ed25519PrivateKey:
    return load_private_key(DEV_PRIVATE_KEY_PEM)


def dev_public_key() -> Ed25519PublicKey:
    return load_public_key(DEV_PUBLIC_KEY_PEM)


DEV_KEY_ID = key_id(dev_public_key())


def dev_license(*, days: float = 30.0, now: float | None = None) -> str:
    """A fresh offline dev license with every feature and no limits, signed by the dev key."""
    t = time.time() if now is None else now
    claims = new_claims(
        signing_key=dev_private_key(),
        customer="kubespeech dev (not for production)",
        expires_at=t + days * 86400,
        features=["asr", "tts", "streaming"],
        checkin=CheckinPolicy(mode="offline", grace_hours=0),
        license_id="lic_dev",
        now=t,
    )
    return sign(claims, dev_private_key())
