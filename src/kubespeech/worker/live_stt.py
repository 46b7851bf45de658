"""Live STT sessions on an ASR worker: claim sessions of its model, run engine streams, publish Waves events.

Runs beside the job loop when the engine implements ``StreamingAsrEngine``. Each session is one task that
reads the session's input stream (XREAD BLOCK), feeds whatever audio has arrived to its engine stream in one
``accept`` call on a session thread (engines block), and publishes the resulting events together with the
state that accounts for them (jobs.sessions: one script, so a worker that takes over never repeats a final).
Claims are kept alive every ``claim_timeout_s / 3``; a silent worker's sessions are taken over by XAUTOCLAIM.
On SIGTERM the worker stops claiming, lets each session finish the call in progress, and releases its claims
so another worker resumes them at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from kubespeech.engines.base import AsrStream, StreamEvent, StreamingAsrEngine
from kubespeech.errors import KubespeechError
from kubespeech.jobs.sessions import SESSION_RATE, Claim, SessionConsumer, SessionSettings, SessionState

if TYPE_CHECKING:
    from kubespeech.worker.runtime import Worker

log = logging.getLogger(__name__)

_REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
_SAVE_EVERY_S = 2.0  # persist a committed point that moved without a final (silence) at most this often


def supports_live(worker: Worker) -> bool:
    return worker.settings.task == "asr" and isinstance(worker.engine, StreamingAsrEngine)


def event_message(
    event: StreamEvent, sid: str, meta: dict[str, Any], full: str, *, from_finalize: bool = False
) -> dict[str, Any]:
    """A StreamEvent as the Waves ``TranscriptionEvent`` the smallestai SDK parses."""
    final = event.kind == "final"
    msg: dict[str, Any] = {
        "type": "transcription",
        "status": "success",
        "session_id": sid,
        "transcript": event.text.strip(),
        "transcription": event.text.strip(),
        "is_final": final,
        "is_last": False,
        "language": meta.get("language") or "en",
        "start": event.start,
        "end": event.end,
    }
    if final:
        msg["from_finalize"] = from_finalize
    if meta.get("word_timestamps"):
        msg["words"] = [
            {"word": w.word.strip(), "start": w.start, "end": w.end, "confidence": w.confidence}
            for w in event.words
        ]
    if meta.get("full_transcript"):
        msg["full_transcript"] = full
    return msg


class _Session:
    """One claimed session: its engine stream and the bookkeeping that makes it resumable."""

    def __init__(self, owner: LiveSessions, claim: Claim, state: SessionState) -> None:
        self.owner = owner
        self.claim = claim
        self.sid = claim.sid
        self.meta = state.meta
        self.full = state.full
        self.committed = state.committed  # last saved committed point
        self.in_id = state.in_id
        self.in_end = state.in_end
        self.read_id = state.in_id  # last input entry read
        self.position = state.in_end  # stream sample index at the end of the input read so far
        self.start_sample = state.committed
        self.pending: deque[tuple[str, int]] = deque()  # (entry id, stream end) read, not yet committed
        self.saved_at = time.monotonic()
        self.stream: AsrStream | None = None

    async def call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.owner.executor, fn, *args)

    async def run(self) -> None:
        consumer = self.owner.consumer
        engine: Any = self.owner.worker.engine
        self.stream = await self.call(
            lambda: engine.open_stream(
                self.meta.get("language"),
                bool(self.meta.get("word_timestamps")),
                int(self.meta.get("eou_timeout_ms") or 600),
                start_sample=self.start_sample,
            )
        )
        checked = time.monotonic()
        while not self.owner.stopping:
            entries = await consumer.read_input(self.sid, self.read_id, block_ms=250)
            if not entries:
                if time.monotonic() - checked > 5.0:
                    checked = time.monotonic()
                    if not await consumer.alive(self.sid):
                        return  # its API side went away (keys expired) or another worker took it
                continue
            audio: list[np.ndarray] = []
            for entry_id, fields in entries:
                self.read_id = entry_id
                raw = fields.get(b"a")
                if raw is not None:
                    chunk = self._take_audio(entry_id, raw)
                    if chunk is not None:
                        audio.append(chunk)
                    continue
                command = fields.get(b"c", b"").decode()
                if audio:
                    if not await self._accept(np.concatenate(audio)):
                        return
                    audio = []
                if command == "abort":
                    return
                if command in ("finalize", "close"):
                    last = command == "close"
                    fn = self.stream.close if last else self.stream.finalize
                    events = await self.call(fn)
                    self.pending.append((entry_id, self.position))
                    if not await self._publish(events, from_finalize=True, last=last, always_final=True):
                        return
                    if last:
                        return
            if audio and not await self._accept(np.concatenate(audio)):
                return

    def _take_audio(self, entry_id: str, raw: bytes) -> np.ndarray | None:
        samples = np.frombuffer(raw[: len(raw) // 2 * 2], dtype="<i2").astype(np.float32) / 32768.0
        begin = self.position
        self.position += len(samples)
        if self.position <= self.start_sample:
            # Wholly before the resume point: already settled by the previous owner.
            self.in_id, self.in_end = entry_id, self.position
            return None
        self.pending.append((entry_id, self.position))
        skip = max(self.start_sample - begin, 0)
        return samples[skip:]

    async def _accept(self, audio: np.ndarray) -> bool:
        assert self.stream is not None
        events = await self.call(self.stream.accept, audio)
        return await self._publish(events)

    async def _publish(
        self,
        events: list[StreamEvent],
        *,
        from_finalize: bool = False,
        last: bool = False,
        always_final: bool = False,
    ) -> bool:
        """Publish one engine call's events with the state after it; False when the session is not ours."""
        assert self.stream is not None
        committed = self.stream.committed_samples
        while self.pending and self.pending[0][1] <= committed:
            self.in_id, self.in_end = self.pending.popleft()
        out: list[tuple[str, bytes]] = []
        finals = [e for e in events if e.kind == "final"]
        if always_final and not finals:
            # finalize/close answer with one final even when there was nothing to flush (the SDK waits for it).
            t = committed / SESSION_RATE
            events = [*events, StreamEvent(kind="final", text="", start=t, end=t)]
            finals = events[-1:]
        for i, event in enumerate(events):
            if event.kind == "final" and event.text.strip():
                self.full = f"{self.full} {event.text.strip()}".strip()
            msg = event_message(
                event, self.sid, self.meta, self.full, from_finalize=from_finalize and event.kind == "final"
            )
            is_last = last and i == len(events) - 1
            msg["is_last"] = is_last
            kind = "l" if is_last else "f" if event.kind == "final" else "p"
            out.append((kind, orjson.dumps(msg)))
        save = bool(finals) or (
            committed != self.committed and time.monotonic() - self.saved_at >= _SAVE_EVERY_S
        )
        if not out and not save:
            return True
        commit = (committed, self.in_id, self.in_end, self.full) if save else None
        ok = await self.owner.consumer.emit(self.sid, out, commit)
        if save:
            self.committed, self.saved_at = committed, time.monotonic()
        return ok

    async def fail(self, message: str) -> None:
        msg = {"type": "error", "status": "error", "message": message, "session_id": self.sid}
        with contextlib.suppress(*_REDIS_ERRORS):
            await self.owner.consumer.emit(self.sid, [("x", orjson.dumps(msg))])


class LiveSessions:
    """The worker's session loop: claims up to ``max_per_worker`` sessions and runs each as a task."""

    def __init__(self, worker: Worker, settings: SessionSettings | None = None) -> None:
        assert worker.redis is not None
        self.worker = worker
        self.settings = settings or SessionSettings()
        self.consumer = SessionConsumer(
            worker.redis,
            worker.settings.model,
            worker.consumer_name,
            self.settings,
            worker.redis_settings.key_prefix,
        )
        self.executor = ThreadPoolExecutor(
            max_workers=self.settings.max_per_worker, thread_name_prefix="live-stt"
        )
        self.sessions: dict[str, tuple[Claim, asyncio.Task[None]]] = {}
        self.stopping = False
        self._done = asyncio.Event()

    @property
    def free(self) -> int:
        return self.settings.max_per_worker - len(self.sessions)

    async def run(self) -> None:
        """Claim and keep sessions until the worker stops; then hand the running ones off."""
        keep_every = self.settings.claim_timeout_s / 3
        reclaim_every = max(min(self.settings.claim_timeout_s / 4, 1.0), 0.05)
        next_keep = next_reclaim = time.monotonic()
        group_ready = False
        backoff = 0.1
        try:
            while not self.worker._stop.is_set():
                try:
                    if not group_ready:
                        await self.consumer.ensure_group()
                        group_ready = True
                    now = time.monotonic()
                    if now >= next_keep:
                        next_keep = now + keep_every
                        await self.consumer.extend([c for c, _ in self.sessions.values()])
                    claims: list[Claim] = []
                    if self.free > 0 and now >= next_reclaim:
                        next_reclaim = now + reclaim_every
                        claims = await self.consumer.reclaim(self.free)
                    if not claims and self.free > 0:
                        claims = await self.consumer.claim_new(self.free, block_ms=200)
                    elif not claims:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self.worker._stop.wait(), timeout=0.2)
                    for claim in claims:
                        await self._start(claim)
                    backoff = 0.1
                except ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    group_ready = False
                except _REDIS_ERRORS as exc:
                    log.warning("live sessions: redis unavailable", extra={"error": str(exc)})
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:
            await self.hand_off()

    async def _start(self, claim: Claim) -> None:
        if claim.sid in self.sessions:
            return
        state = await self.consumer.take_over(claim)
        if state is None:
            await self.consumer.finish(claim)  # ended before any worker came, or its keys expired
            return
        resumed = state.committed > 0 or state.in_id != "0-0"
        log.info("live session claimed", extra={"session": claim.sid, "resumed": resumed})
        session = _Session(self, claim, state)
        task = asyncio.create_task(self._run(session), name=f"live-{claim.sid}")
        self.sessions[claim.sid] = (claim, task)

    async def _run(self, session: _Session) -> None:
        finished = True
        try:
            await session.run()
            finished = not self.stopping
        except KubespeechError as exc:
            await session.fail(exc.message)
        except _REDIS_ERRORS as exc:
            # Keep the claim: once Redis is back this worker (or, after the timeout, another) resumes it.
            log.warning("live session lost redis", extra={"session": session.sid, "error": str(exc)})
            finished = False
        except Exception as exc:
            log.exception("live session failed", extra={"session": session.sid})
            await session.fail(f"internal error: {type(exc).__name__}")
        finally:
            if finished:
                with contextlib.suppress(*_REDIS_ERRORS):
                    await self.consumer.finish(session.claim)
                self.sessions.pop(session.sid, None)

    async def hand_off(self) -> None:
        """Stop: let every session finish its engine call, then release the claims of those still open."""
        self.stopping = True
        tasks = [t for _, t in self.sessions.values()]
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        left = [c for c, t in self.sessions.values()]
        if left:
            log.info("handing live sessions off", extra={"count": len(left)})
            with contextlib.suppress(*_REDIS_ERRORS):
                await self.consumer.release(left)
        self.sessions.clear()
        self.executor.shutdown(wait=False, cancel_futures=True)


def start_live_sessions(worker: Worker) -> asyncio.Task[None] | None:
    """The session loop as a task of the worker's run loop (None when the engine cannot stream)."""
    if not supports_live(worker) or worker.redis is None:
        return None
    return asyncio.create_task(LiveSessions(worker).run(), name="live-sessions")
