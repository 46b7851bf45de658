"""Result cache in Redis: repeated TTS (and, opted in, STT) requests answered without reaching a worker.

Layout (``{p}`` is the key prefix, ``{t}`` the task, ``asr`` or ``tts``):

- ``{p}:cache:{t}:e:{digest}``  one entry (a string) with a TTL of ``ttl_s``: a length-prefixed JSON header
  and the body (TTS: the encoded audio; ASR: the worker's result header, AES-GCM encrypted with a key).
- ``{p}:cache:{t}:lru``         sorted set: digest -> last use (ms). Its lowest scores are evicted first.
- ``{p}:cache:{t}:size``        hash: digest -> bytes the entry holds.
- ``{p}:cache:{t}:bytes``       bytes of every entry indexed in ``lru`` (what ``max_bytes`` bounds).
- ``{p}:cache:{t}:evictions``   entries evicted to stay under ``max_bytes`` (all API replicas together).

The bound is kept by our own LRU in one script per store (reap entries whose TTL surely passed, then drop
the least recently used until the new entry fits), so it works on any Redis a user can point us at,
including managed ones whose ``maxmemory-policy`` they cannot change and which hold the job queues too (an
``allkeys-lru`` there would evict jobs). An entry that Redis expires by its TTL stays counted until the
store that reaps it; the count is therefore an upper bound of the bytes really held.

The digest hashes everything that can change the answer: model, the model *revision* the workers publish
(a new model or voice file means new keys, never a stale entry), and every request parameter. A result is
stored only under the revision of the worker that produced it. ASR digests are HMACs under the cache key,
so an entry's name does not reveal which audio it belongs to.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import os
import struct
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from kubespeech.api import metrics
from kubespeech.api.settings import CacheSettings, TaskCacheSettings

log = logging.getLogger(__name__)

Task = Literal["asr", "tts"]
CacheStatus = Literal["hit", "miss"]

_FORMAT_VERSION = 1
_HEADER = struct.Struct(">I")
_CIPHER_MAGIC = b"KSE1"
_NONCE_BYTES = 12

# Look an entry up and, on a hit, mark it recently used (one round trip).
_GET_LUA = """
local value = redis.call('GET', KEYS[1])
if value then
  redis.call('ZADD', KEYS[2], 'XX', ARGV[2], ARGV[1])
end
return value
"""

# Store an entry within the byte bound: forget the old copy's bytes, reap entries whose TTL has surely
# passed (last use older than the TTL means created longer ago than that), then evict the least recently
# used until the new entry fits. Returns {stored (0/1), evicted, bytes now}.
_PUT_LUA = """
local digest, value = ARGV[1], ARGV[2]
local ttl_ms, max_bytes, now = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local entry_prefix = ARGV[6]
local size = string.len(value)
if size > max_bytes then return {0, 0, tonumber(redis.call('GET', KEYS[3]) or '0')} end
local total = tonumber(redis.call('GET', KEYS[3]) or '0')
local function forget(d)
  local s = redis.call('HGET', KEYS[2], d)
  if s then total = total - tonumber(s) end
  redis.call('HDEL', KEYS[2], d)
  redis.call('ZREM', KEYS[1], d)
  return redis.call('DEL', entry_prefix .. d)
end
forget(digest)
local stale = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - ttl_ms, 'LIMIT', 0, 128)
for _, d in ipairs(stale) do forget(d) end
local evicted = 0
while total + size > max_bytes do
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0)
  if #oldest == 0 then break end
  evicted = evicted + forget(oldest[1])
end
if total < 0 then total = 0 end
redis.call('SET', entry_prefix .. digest, value, 'PX', ttl_ms)
redis.call('ZADD', KEYS[1], now, digest)
redis.call('HSET', KEYS[2], digest, size)
total = total + size
redis.call('SET', KEYS[3], total)
if evicted > 0 then redis.call('INCRBY', KEYS[4], evicted) end
return {1, evicted, total}
"""


class InvalidCacheKey(ValueError):
    """The STT cache's encryption key file is missing, unreadable or not 32 bytes."""


def load_cache_key(path: Path) -> bytes:
    """The 32-byte key in ``path``: base64 (``openssl rand -base64 32``), hex, or 32 raw bytes."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InvalidCacheKey(f"cannot read the STT cache key file: {exc.strerror or exc}") from None
    text = raw.strip()
    candidates: list[bytes] = []
    if len(text) == 64:
        with contextlib.suppress(binascii.Error, ValueError):
            candidates.append(binascii.unhexlify(text))
    with contextlib.suppress(binascii.Error, ValueError):
        candidates.append(base64.b64decode(text, validate=True))
    candidates.append(raw)
    for key in candidates:
        if len(key) == 32:
            return key
    # Never echo the file's content: it is a secret.
    raise InvalidCacheKey(
        "the STT cache key must be 32 bytes: base64 (openssl rand -base64 32), 64 hex digits, or 32 raw bytes"
    )


def normalize_text(text: str) -> str:
    """The text as the cache sees it: Unicode NFC, whitespace runs made one space, ends trimmed."""
    return " ".join(unicodedata.normalize("NFC", text).split())


@dataclass(slots=True)
class CacheEntry:
    header: dict[str, Any]
    body: bytes


def _pack(header: dict[str, Any], body: bytes) -> bytes:
    head = orjson.dumps(header)
    return _HEADER.pack(len(head)) + head + body


def _unpack(value: bytes) -> CacheEntry | None:
    if len(value) < _HEADER.size:
        return None
    (n,) = _HEADER.unpack_from(value)
    try:
        header = orjson.loads(value[_HEADER.size : _HEADER.size + n])
    except orjson.JSONDecodeError:
        return None
    if not isinstance(header, dict):
        return None
    return CacheEntry(header, value[_HEADER.size + n :])


class _Sealer:
    """AES-256-GCM for entries, and an HMAC for their names; both keys derived from the one cache key."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(hmac.digest(key, b"kubespeech cache: encrypt", "sha256"))
        self._mac_key = hmac.digest(key, b"kubespeech cache: name", "sha256")

    def name(self, material: bytes) -> str:
        return hmac.new(self._mac_key, material, "sha256").hexdigest()

    def seal(self, digest: str, plain: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        # The digest as associated data: an entry copied under another name does not decrypt.
        return _CIPHER_MAGIC + nonce + self._aead.encrypt(nonce, plain, digest.encode())

    def open(self, digest: str, sealed: bytes) -> bytes | None:
        if not sealed.startswith(_CIPHER_MAGIC):
            return None
        nonce = sealed[len(_CIPHER_MAGIC) : len(_CIPHER_MAGIC) + _NONCE_BYTES]
        try:
            return self._aead.decrypt(nonce, sealed[len(_CIPHER_MAGIC) + _NONCE_BYTES :], digest.encode())
        except InvalidTag:
            return None


class TaskCache:
    """The cache of one task; every Redis failure reads as a miss (a cache must never fail a request)."""

    def __init__(
        self, redis: Redis, prefix: str, task: Task, settings: TaskCacheSettings, key: bytes | None = None
    ) -> None:
        self.redis = redis
        self.task = task
        self.settings = settings
        self.enabled = settings.enabled
        base = f"{prefix}:cache:{task}"
        self.entry_prefix = f"{base}:e:"
        self.lru_key = f"{base}:lru"
        self.size_key = f"{base}:size"
        self.bytes_key = f"{base}:bytes"
        self.evictions_key = f"{base}:evictions"
        self._sealer = _Sealer(key) if key is not None else None
        self._get_sha: str | None = None
        self._put_sha: str | None = None
        self.hits = 0
        self.misses = 0

    def digest(self, params: dict[str, Any], content: bytes = b"") -> str:
        """The entry name for these parameters (and content, e.g. decoded audio)."""
        material = orjson.dumps({"v": _FORMAT_VERSION, **params}, option=orjson.OPT_SORT_KEYS)
        material += hashlib.sha256(content).digest()
        if self._sealer is not None:
            return self._sealer.name(material)
        return hashlib.sha256(material).hexdigest()

    async def _script(self, which: str, source: str, keys: list[str], args: list[Any]) -> Any:
        attr = f"_{which}_sha"
        sha = getattr(self, attr)
        if sha is not None:
            try:
                return await self.redis.evalsha(sha, len(keys), *keys, *args)
            except NoScriptError:
                pass  # Redis restarted or flushed its scripts: load it again
        setattr(self, attr, await self.redis.script_load(source))
        return await self.redis.evalsha(getattr(self, attr), len(keys), *keys, *args)

    def count(self, status: Literal["hit", "miss", "bypass"]) -> None:
        metrics.CACHE_LOOKUPS.labels(self.task, status).inc()
        if status == "hit":
            self.hits += 1
        elif status == "miss":
            self.misses += 1
        else:
            return
        metrics.CACHE_HIT_RATIO.labels(self.task).set(self.hits / (self.hits + self.misses))

    async def get(self, digest: str) -> CacheEntry | None:
        """The entry under ``digest`` (counted as a hit or a miss), None when absent or unreadable."""
        try:
            raw = await self._script(
                "get", _GET_LUA, [self.entry_prefix + digest, self.lru_key], [digest, int(time.time() * 1000)]
            )
        except (RedisError, OSError) as exc:
            log.warning("cache lookup failed; serving without it", extra={"error": type(exc).__name__})
            raw = None
        entry = self._decode(digest, raw) if raw is not None else None
        self.count("hit" if entry is not None else "miss")
        return entry

    def _decode(self, digest: str, raw: bytes) -> CacheEntry | None:
        if self._sealer is not None:
            opened = self._sealer.open(digest, raw)
            if opened is None:
                # Written under another key (rotated) or tampered with: not ours to serve.
                return None
            raw = opened
        return _unpack(raw)

    async def put(self, digest: str, header: dict[str, Any], body: bytes) -> bool:
        """Store an entry (evicting the least recently used ones to stay within ``max_bytes``)."""
        value = _pack(header, body)
        if self._sealer is not None:
            value = self._sealer.seal(digest, value)
        try:
            stored, evicted, total = await self._script(
                "put",
                _PUT_LUA,
                [self.lru_key, self.size_key, self.bytes_key, self.evictions_key],
                [
                    digest,
                    value,
                    self.settings.ttl_s * 1000,
                    self.settings.max_bytes,
                    int(time.time() * 1000),
                    self.entry_prefix,
                ],
            )
        except (RedisError, OSError) as exc:
            log.warning("cache store failed", extra={"error": type(exc).__name__})
            return False
        metrics.CACHE_BYTES.labels(self.task).set(int(total))
        if evicted:
            metrics.CACHE_EVICTIONS.labels(self.task).inc(int(evicted))
        if stored:
            metrics.CACHE_STORES.labels(self.task).inc()
        return bool(stored)

    async def refresh_bytes(self) -> None:
        """Update the bytes gauge from Redis (the count is shared by every API replica)."""
        raw = await self.redis.get(self.bytes_key)
        metrics.CACHE_BYTES.labels(self.task).set(int(raw or 0))


class ResultCache:
    """The TTS and ASR caches of one API process."""

    def __init__(self, redis: Redis, prefix: str, settings: CacheSettings) -> None:
        asr_key = (
            load_cache_key(settings.asr.key_file) if settings.asr.enabled and settings.asr.key_file else None
        )
        self.tts = TaskCache(redis, prefix, "tts", settings.tts)
        self.asr = TaskCache(redis, prefix, "asr", settings.asr, key=asr_key)

    async def refresh(self) -> None:
        for cache in (self.tts, self.asr):
            if cache.enabled:
                await cache.refresh_bytes()


def cache_control(header: str | None) -> tuple[bool, bool]:
    """(read, write) allowed by a request's ``Cache-Control``: ``no-cache`` skips the lookup (the fresh
    result is still stored), ``no-store`` skips both."""
    directives = {d.strip().split("=")[0].lower() for d in (header or "").split(",")}
    no_store = "no-store" in directives
    return not (no_store or "no-cache" in directives), not no_store
