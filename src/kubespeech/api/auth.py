"""API keys: stored only as SHA-256 digests, compared in constant time, reloaded from a file without restart."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from pathlib import Path

from kubespeech.errors import Unauthorized

log = logging.getLogger(__name__)

_HASH_PREFIX = "sha256:"


def hash_key(key: str) -> str:
    """The form a key is stored in (``sha256:<hex>``); safe to put in a Secret or a log line."""
    return _HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    """A new random API key (for ``kubespeech dev`` and for operators minting keys)."""
    return "ks_" + secrets.token_urlsafe(32)


def _parse_keys_file(text: str) -> set[bytes]:
    digests: set[bytes] = set()
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.lower().startswith(_HASH_PREFIX):
            hexdigest = line[len(_HASH_PREFIX) :].strip().lower()
            try:
                digest = bytes.fromhex(hexdigest)
            except ValueError:
                log.warning("ignoring a malformed hashed key in the keys file")
                continue
            if len(digest) != 32:
                log.warning("ignoring a hashed key of the wrong length in the keys file")
                continue
            digests.add(digest)
        else:
            digests.add(hashlib.sha256(line.encode()).digest())
    return digests


class KeyStore:
    """The accepted keys' digests; ``verify`` raises Unauthorized for anything else."""

    def __init__(
        self, keys: list[str] | None = None, keys_file: Path | None = None, allow_anonymous: bool = False
    ):
        self._static = {hashlib.sha256(k.encode()).digest() for k in keys or [] if k}
        self.keys_file = keys_file
        self._file_digests: set[bytes] = set()
        self._file_stamp: tuple[float, int] | None = None
        self._digests: tuple[bytes, ...] = tuple(self._static)
        self.allow_anonymous = allow_anonymous
        self.reload()

    @property
    def count(self) -> int:
        return len(self._digests)

    def reload(self) -> bool:
        """Re-read the keys file when its mtime/size changed; True when the key set changed."""
        if self.keys_file is None:
            return False
        try:
            st = self.keys_file.stat()
            stamp = (st.st_mtime, st.st_size)
            if stamp == self._file_stamp:
                return False
            digests = _parse_keys_file(self.keys_file.read_text())
        except OSError as exc:
            if self._file_stamp is not None:
                log.warning(
                    "keys file unreadable; keeping the last keys", extra={"error": type(exc).__name__}
                )
            return False
        self._file_stamp = stamp
        changed = digests != self._file_digests
        self._file_digests = digests
        self._digests = tuple(self._static | digests)
        if changed:
            log.info("API keys loaded", extra={"keys": len(self._digests)})
        return changed

    def verify(self, authorization: str | None) -> None:
        """Accept ``Bearer <key>`` (or ``Token <key>``, the legacy self-host scheme) for a known key."""
        if not self._digests and self.allow_anonymous:
            return
        if not authorization:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() not in ("bearer", "token") or not token:
            raise Unauthorized("malformed Authorization header: expected 'Bearer <key>'")
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        ok = False
        for known in self._digests:  # no early exit: the time taken does not depend on which key matched
            ok |= hmac.compare_digest(digest, known)
        if not ok:
            raise Unauthorized("invalid API key")
