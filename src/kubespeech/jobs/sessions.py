"""Live (streaming) recognition sessions through Redis: audio in, events out, one claiming worker, resumable.

Layout (``{p}`` is the key prefix, ``{m}`` a model name, ``{sid}`` a session id):

- ``{p}:sq:{m}``      stream of session announcements, one entry ``{sid, ts}`` per session; consumer group
  ``sessions``. A worker claims an entry (XREADGROUP) and holds it for the session's whole life, touching it
  (XCLAIM JUSTID, idle 0) every ``claim_timeout_s / 3``; a worker that goes silent for ``claim_timeout_s``
  loses it to whoever runs XAUTOCLAIM next. A graceful stop releases its entries (XCLAIM IDLE) so another
  worker takes them at once. The entry is XACKed *and* XDELed when its session ends. No TTL (the queue itself
  lives as long as the model); entries of sessions that ended before any worker came are dropped by the
  first worker that claims them, and the stream is capped (MAXLEN ~) as a safety bound.
- ``{p}:sin:{sid}``   stream of the session's input, in order: ``{a: <16-bit mono PCM at 16 kHz>}`` per audio
  chunk, ``{c: finalize|close|abort}`` for control. Written by the API, read by the owning worker with XREAD
  BLOCK. Entries up to the last fully committed one are trimmed (XTRIM MINID) as finals are published, so it
  holds at most about one utterance plus what the worker has not read yet. TTL ``ttl_s``, renewed on every
  XADD and by the API's keep-alive.
- ``{p}:sout:{sid}``  stream of events for the client: ``{e: <event JSON>, k: p|f|l|x}`` (partial, final,
  last, error). Written by the owning worker only (the script checks ownership), read by the API with XREAD
  BLOCK. TTL ``ttl_s``, renewed on every XADD and by the API's keep-alive.
- ``{p}:ss:{sid}``    hash of the session's state: ``model``, ``meta`` (JSON: language, word_timestamps, ...),
  ``owner`` (consumer name of the worker running it, "" when none), ``committed`` (stream sample index up to
  which audio is settled, see engines.base.AsrStream), ``in_id``/``in_end`` (the last input entry wholly
  before ``committed`` and the stream sample index at its end), ``full`` (the transcript of every final
  sent), ``created``/``updated`` (unix seconds), ``ended`` (1 once the API or the worker finished it). A
  final event and the state that accounts for it are written in one script, so a worker that takes a
  session over resumes exactly after the finals already sent: none is sent twice. TTL ``ttl_s``, renewed
  like the streams.
- ``{p}:active:{m}``  sorted set of the model's open sessions (member: sid, score: expiry in unix ms, pushed
  ``ttl_s`` ahead by the API's keep-alive): ``active_sessions`` counts members not yet expired, which is the
  demand an autoscaler reads (it includes sessions still waiting for a worker). No TTL; expired members are
  pruned on every keep-alive.

Resuming: the new owner reads ``committed``, ``in_id`` and ``in_end``, opens an engine stream with
``start_sample=committed`` and re-feeds the input after ``in_id``, skipping its first ``committed - in_end``
samples; the client keeps its connection throughout.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.asyncio import Redis
from redis.exceptions import ResponseError

SESSION_GROUP = "sessions"
SESSION_RATE = 16000  # samples per second of the audio in ``{p}:sin:{sid}``


class SessionSettings(BaseSettings):
    """Timings of live sessions; the API and the workers of one stack must agree on ``ttl_s``."""

    model_config = SettingsConfigDict(env_prefix="KUBESPEECH_SESSION_", extra="ignore")

    claim_timeout_s: float = Field(
        10.0, gt=0, description="A session held this long by a silent worker is taken over by another."
    )
    ttl_s: float = Field(120.0, gt=0, description="Lifetime of a session's keys without a keep-alive.")
    max_per_worker: int = Field(4, ge=1, description="Live sessions one worker runs at the same time.")
    announce_max_length: int = Field(100000, ge=1, description="Bound of a model's announcement stream.")


class SessionKeys:
    """Key names of live sessions of one stack (one prefix)."""

    def __init__(self, prefix: str = "ks") -> None:
        self.prefix = prefix

    def announcements(self, model: str) -> str:
        return f"{self.prefix}:sq:{model}"

    def audio_in(self, sid: str) -> str:
        return f"{self.prefix}:sin:{sid}"

    def events_out(self, sid: str) -> str:
        return f"{self.prefix}:sout:{sid}"

    def state(self, sid: str) -> str:
        return f"{self.prefix}:ss:{sid}"

    def active(self, model: str) -> str:
        return f"{self.prefix}:active:{model}"


# Open: state, active member, group (created with the stream from id 0, so no announcement is skipped), entry.
_OPEN_LUA = """
redis.call('HSET', KEYS[1], 'model', ARGV[2], 'meta', ARGV[3], 'owner', '', 'committed', '0',
           'in_id', '0-0', 'in_end', '0', 'full', '', 'created', ARGV[4], 'updated', ARGV[4], 'ended', '0')
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[1])
if redis.call('EXISTS', KEYS[3]) == 0 then
  redis.pcall('XGROUP', 'CREATE', KEYS[3], ARGV[7], '0', 'MKSTREAM')
end
return redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[8], '*', 'sid', ARGV[1], 'ts', ARGV[4])
"""

# Take a session over: only one that exists and has not ended; returns its state.
_TAKE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
if redis.call('HGET', KEYS[1], 'ended') == '1' then return false end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'updated', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return redis.call('HGETALL', KEYS[1])
"""

# Publish events (and the state that accounts for them) only while still the owner. ARGV: owner, ttl_ms,
# now, commit flag, committed, in_id, in_end, full, then kind/event pairs.
_EMIT_LUA = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
for i = 9, #ARGV, 2 do
  redis.call('XADD', KEYS[2], '*', 'k', ARGV[i], 'e', ARGV[i + 1])
end
if #ARGV >= 9 then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], 'committed', ARGV[5], 'in_id', ARGV[6], 'in_end', ARGV[7], 'full', ARGV[8],
             'updated', ARGV[3])
  if ARGV[6] ~= '0-0' then redis.call('XTRIM', KEYS[3], 'MINID', ARGV[6]) end
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def active_sessions(redis: Redis, keys: SessionKeys, model: str) -> int:
    """Open sessions of ``model`` (including those waiting for a worker): what an autoscaler scales on."""
    return int(await redis.zcount(keys.active(model), time.time() * 1000, "+inf"))


@dataclass(slots=True)
class SessionState:
    """A session's state as a worker that takes it over reads it."""

    sid: str
    model: str
    meta: dict[str, Any]
    committed: int
    in_id: str
    in_end: int
    full: str

    @staticmethod
    def parse(sid: str, raw: list[Any]) -> SessionState:
        d = {_s(raw[i]): raw[i + 1] for i in range(0, len(raw), 2)}
        return SessionState(
            sid=sid,
            model=_s(d.get("model", b"")),
            meta=orjson.loads(d.get("meta") or b"{}"),
            committed=int(d.get("committed") or 0),
            in_id=_s(d.get("in_id") or b"0-0"),
            in_end=int(d.get("in_end") or 0),
            full=_s(d.get("full") or b""),
        )


@dataclass(slots=True, frozen=True)
class Claim:
    """A session announcement a worker holds."""

    sid: str
    entry_id: str


class SessionClient:
    """The API side: open a session, push audio and control, read events, keep it alive, end it."""

    def __init__(self, redis: Redis, settings: SessionSettings | None = None, prefix: str = "ks") -> None:
        self.redis = redis
        self.settings = settings or SessionSettings()
        self.keys = SessionKeys(prefix)
        self._open = redis.register_script(_OPEN_LUA)

    @property
    def _ttl_ms(self) -> int:
        return int(self.settings.ttl_s * 1000)

    async def open(self, model: str, meta: dict[str, Any]) -> str:
        sid = uuid.uuid4().hex
        now = time.time()
        await self._open(
            keys=[self.keys.state(sid), self.keys.active(model), self.keys.announcements(model)],
            args=[sid, model, orjson.dumps(meta), f"{now:.3f}", self._ttl_ms,
                  int(now * 1000) + self._ttl_ms, SESSION_GROUP, self.settings.announce_max_length],
        )  # fmt: skip
        return sid

    async def send_audio(self, sid: str, pcm16: bytes) -> None:
        key = self.keys.audio_in(sid)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(key, {"a": pcm16})
            pipe.pexpire(key, self._ttl_ms)
            await pipe.execute()

    async def send_control(self, sid: str, command: str) -> None:
        key = self.keys.audio_in(sid)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(key, {"c": command})
            pipe.pexpire(key, self._ttl_ms)
            await pipe.execute()

    async def read_events(
        self, sid: str, after: str, block_s: float, count: int = 100
    ) -> list[tuple[str, str, bytes]]:
        """Events after id ``after`` as (id, kind, event JSON); waits up to ``block_s`` for the first."""
        resp: Any = await self.redis.xread(
            {self.keys.events_out(sid): after}, count=count, block=max(int(block_s * 1000), 1)
        )
        if not resp:
            return []
        return [(_s(eid), _s(f.get(b"k", b"")), f.get(b"e", b"{}")) for eid, f in resp[0][1]]

    async def touch(self, sid: str, model: str) -> None:
        """Keep the session's keys and its place among the active sessions alive."""
        now_ms = int(time.time() * 1000)
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in (self.keys.state(sid), self.keys.audio_in(sid), self.keys.events_out(sid)):
                pipe.pexpire(key, self._ttl_ms)
            pipe.zadd(self.keys.active(model), {sid: now_ms + self._ttl_ms})
            pipe.zremrangebyscore(self.keys.active(model), "-inf", now_ms)
            await pipe.execute()

    async def end(self, sid: str, model: str, *, abort: bool) -> None:
        """The client is gone: stop counting the session; ``abort`` tells its worker to stop at once."""
        async with self.redis.pipeline(transaction=False) as pipe:
            if abort:
                pipe.xadd(self.keys.audio_in(sid), {"c": "abort"})
                pipe.hset(self.keys.state(sid), "ended", "1")
            pipe.zrem(self.keys.active(model), sid)
            # Nobody reads the session any more: let its keys go soon instead of after the full TTL.
            for key in (self.keys.state(sid), self.keys.audio_in(sid), self.keys.events_out(sid)):
                pipe.pexpire(key, 30_000)
            await pipe.execute()


class SessionConsumer:
    """The worker side: claim, keep, release and finish sessions; read their input; publish their events."""

    def __init__(
        self,
        redis: Redis,
        model: str,
        consumer: str,
        settings: SessionSettings | None = None,
        prefix: str = "ks",
    ) -> None:
        self.redis = redis
        self.model = model
        self.consumer = consumer
        self.settings = settings or SessionSettings()
        self.keys = SessionKeys(prefix)
        self.queue = self.keys.announcements(model)
        self._take = redis.register_script(_TAKE_LUA)
        self._emit = redis.register_script(_EMIT_LUA)
        self._reclaim_cursor = "0-0"

    @property
    def _ttl_ms(self) -> int:
        return int(self.settings.ttl_s * 1000)

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.queue, SESSION_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def claim_new(self, count: int, block_ms: int) -> list[Claim]:
        resp: Any = await self.redis.xreadgroup(
            SESSION_GROUP, self.consumer, {self.queue: ">"}, count=count, block=max(block_ms, 1)
        )
        if not resp:
            return []
        return [Claim(_s(f[b"sid"]), _s(eid)) for eid, f in resp[0][1] if f and b"sid" in f]

    async def reclaim(self, count: int) -> list[Claim]:
        """Take over announcements a silent worker held longer than ``claim_timeout_s`` (XAUTOCLAIM)."""
        min_idle = int(self.settings.claim_timeout_s * 1000)
        resp = await self.redis.xautoclaim(
            self.queue, SESSION_GROUP, self.consumer, min_idle, start_id=self._reclaim_cursor, count=count
        )
        self._reclaim_cursor = _s(resp[0])
        return [Claim(_s(f[b"sid"]), _s(eid)) for eid, f in resp[1] if f and b"sid" in f]

    async def extend(self, claims: list[Claim]) -> None:
        """Still running these sessions: reset their idle time (no delivery counted)."""
        if claims:
            await self.redis.xclaim(
                self.queue, SESSION_GROUP, self.consumer, 0, [c.entry_id for c in claims], justid=True
            )

    async def release(self, claims: list[Claim]) -> None:
        """Hand sessions off: clear the owner and mark the entries idle, so the next XAUTOCLAIM takes them."""
        if not claims:
            return
        idle_ms = int(self.settings.claim_timeout_s * 1000)
        async with self.redis.pipeline(transaction=False) as pipe:
            for c in claims:
                pipe.hset(self.keys.state(c.sid), "owner", "")
            pipe.xclaim(
                self.queue, SESSION_GROUP, self.consumer, 0, [c.entry_id for c in claims],
                idle=idle_ms, justid=True,
            )  # fmt: skip
            await pipe.execute()

    async def take_over(self, claim: Claim) -> SessionState | None:
        """Become the session's owner; None when it no longer exists or has ended (drop the claim then)."""
        raw = await self._take(
            keys=[self.keys.state(claim.sid)], args=[self.consumer, f"{time.time():.3f}", self._ttl_ms]
        )
        return SessionState.parse(claim.sid, raw) if raw else None

    async def read_input(
        self, sid: str, after: str, block_ms: int, count: int = 200
    ) -> list[tuple[str, dict[bytes, bytes]]]:
        resp: Any = await self.redis.xread(
            {self.keys.audio_in(sid): after}, count=count, block=max(block_ms, 1)
        )
        if not resp:
            return []
        return [(_s(eid), fields) for eid, fields in resp[0][1]]

    async def emit(
        self,
        sid: str,
        events: list[tuple[str, bytes]],
        commit: tuple[int, str, int, str] | None = None,
    ) -> bool:
        """Append ``events`` ((kind, JSON) pairs) and, with ``commit`` = (committed, in_id, in_end, full), the
        state accounting for them, atomically; False when another worker owns the session now."""
        args: list[Any] = [self.consumer, self._ttl_ms, f"{time.time():.3f}"]
        args += ["1", *commit] if commit is not None else ["0", 0, "0-0", 0, ""]
        for kind, event in events:
            args += [kind, event]
        keys = [self.keys.state(sid), self.keys.events_out(sid), self.keys.audio_in(sid)]
        return bool(await self._emit(keys=keys, args=args))

    async def alive(self, sid: str) -> bool:
        """The session's state still exists, has not ended and is still ours."""
        owner, ended = await self.redis.hmget(self.keys.state(sid), ["owner", "ended"])
        return owner is not None and _s(owner) == self.consumer and _s(ended or b"0") != "1"

    async def finish(self, claim: Claim) -> None:
        """The session is over: drop its announcement and its place among the active sessions."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xack(self.queue, SESSION_GROUP, claim.entry_id)
            pipe.xdel(self.queue, claim.entry_id)
            pipe.zrem(self.keys.active(self.model), claim.sid)
            pipe.hset(self.keys.state(claim.sid), "ended", "1")
            pipe.pexpire(self.keys.state(claim.sid), 30_000)  # its reader needs only the events now
            await pipe.execute()
