"""Live STT over WebSocket: Waves ``/waves/v1/stt/live`` and the legacy ``/api/v1/lightning/get_text``.

The protocol is the ``smallestai`` SDK's (5.14, ``waves.speech_to_text.stream`` / ``stream_speech_to_text``):
``Authorization: Bearer <key>`` on the upgrade, session parameters in the query string, binary frames of
raw audio in ``encoding`` at ``sample_rate``, JSON text frames ``{"type": "finalize"}`` (flush the turn) and
``{"type": "close_stream"}`` (flush, answer with the ``is_last`` event, close). The server sends
``TranscriptionEvent`` JSON (``type: transcription``, ``transcript``/``transcription``, ``is_final``,
``is_last``, ``session_id``, ``words``, ``full_transcript``) and ``TranscriptionErrorEvent`` JSON (``type:
error``, ``message``). Audio is decoded, resampled to 16 kHz and handed to a worker through a Redis session
(jobs.sessions), which also lets another worker take the session over if its worker dies.

Close codes: 1000 after the ``is_last`` event; 1003 for a text frame that is not JSON; 1008 for a refused
key, a bad query parameter, audio too far ahead of real time, idle timeout or the maximum duration; 1009
for an oversized frame; 1011 when the worker failed the session; 1013 when no worker came up within the
cold-start wait (reconnect later). Pings are answered by the server (uvicorn's ``ws_ping_interval``).

Events reach the client through a bounded queue per connection: once ``max_pending_events`` wait for a client
that does not read, it is closed with 1008, so it holds neither memory nor its worker. On SIGTERM/SIGINT
(``install_drain_on_signal``, from the app's lifespan) open sessions are drained before uvicorn drops the
connections: each is flushed as if the client had sent ``close_stream``, its last final is forwarded, and it
is closed with 1012 "server restarting; reconnect"; new sessions are refused with 1012 meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, WebSocket
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.websockets import WebSocketDisconnect

from kubespeech.errors import KubespeechError, NoWorkers, UnknownModel
from kubespeech.jobs.sessions import SESSION_RATE, SessionClient, SessionSettings
from kubespeech.license.errors import LicenseLimitExceededError

log = logging.getLogger(__name__)

router = APIRouter(tags=["Smallest Waves v1"])

WS_NORMAL = 1000
WS_UNSUPPORTED_DATA = 1003
WS_POLICY_VIOLATION = 1008
WS_TOO_BIG = 1009
WS_INTERNAL_ERROR = 1011
WS_SERVICE_RESTART = 1012
RESTART_REASON = "server restarting; reconnect"
WS_TRY_AGAIN_LATER = 1013
ENCODINGS = ("linear16", "linear32", "mulaw", "alaw")
_WIDTH = {"linear16": 2, "linear32": 4, "mulaw": 1, "alaw": 1}


class LiveSttSettings(BaseSettings):
    """Bounds of one live STT connection (env ``KUBESPEECH_STT_LIVE_*``)."""

    model_config = SettingsConfigDict(env_prefix="KUBESPEECH_STT_LIVE_", extra="ignore")

    idle_timeout_s: float = Field(30.0, gt=0, description="Close a connection that sends nothing this long.")
    max_session_s: float = Field(3600.0, gt=0, description="Longest connection.")
    max_frame_bytes: int = Field(256 * 1024, ge=1024, description="Largest binary frame.")
    max_ahead_s: float = Field(
        30.0, gt=0, description="Audio a client may send ahead of real time (backpressure bound)."
    )
    keepalive_s: float = Field(5.0, gt=0, description="How often the session's Redis keys are renewed.")
    max_pending_events: int = Field(
        256, ge=1, description="Events waiting for a client that does not read them before it is closed."
    )
    drain_timeout_s: float = Field(
        10.0, gt=0, description="On shutdown, how long open sessions get to deliver their last final."
    )


def _g711_decode_tables() -> tuple[np.ndarray, np.ndarray]:
    """256-entry G.711 mu-law and A-law to 16-bit linear tables (ITU-T G.711)."""
    codes = np.arange(256, dtype=np.int32)
    u = ~codes & 0xFF
    mag = (((u & 0x0F) << 3) + 0x84) << ((u >> 4) & 7)
    mulaw = np.where(u & 0x80, 0x84 - mag, mag - 0x84)
    a = codes ^ 0x55
    exp, man = (a >> 4) & 7, a & 0x0F
    amag = np.where(exp == 0, (man << 4) + 8, ((man << 4) + 0x108) << np.maximum(exp - 1, 0))
    alaw = np.where(a & 0x80, amag, -amag)
    return (mulaw / 32768.0).astype(np.float32), (alaw / 32768.0).astype(np.float32)


_MULAW, _ALAW = _g711_decode_tables()


class BadAudio(Exception):
    """A frame that cannot be decoded in the session's encoding (answered with an error event)."""


class PcmDecoder:
    """Binary frames in ``encoding`` at ``rate`` -> 16-bit PCM at 16 kHz (a streaming resampler keeps its
    state across frames, so chunk edges add no clicks)."""

    def __init__(self, encoding: str, rate: int) -> None:
        self.encoding = encoding
        self.rate = rate
        self._resampler: Any = None
        if rate != SESSION_RATE:
            import soxr

            self._resampler = soxr.ResampleStream(rate, SESSION_RATE, 1, dtype="float32")

    def seconds(self, frame: bytes) -> float:
        return len(frame) / _WIDTH[self.encoding] / self.rate

    def decode(self, frame: bytes) -> bytes:
        width = _WIDTH[self.encoding]
        if len(frame) % width:
            raise BadAudio(
                f"{self.encoding} audio frames must hold whole {width}-byte samples; got {len(frame)} bytes"
            )
        if self.encoding == "linear16":
            audio = np.frombuffer(frame, dtype="<i2").astype(np.float32) / 32768.0
        elif self.encoding == "linear32":
            audio = np.frombuffer(frame, dtype="<f4").astype(np.float32)
            if not np.isfinite(audio).all() or (audio.size and float(np.abs(audio).max()) > 4.0):
                raise BadAudio("linear32 audio must be little-endian float32 samples in [-1, 1]")
        else:
            table = _MULAW if self.encoding == "mulaw" else _ALAW
            audio = table[np.frombuffer(frame, dtype=np.uint8)]
        return self._pcm16(audio, last=False)

    def flush(self) -> bytes:
        return self._pcm16(np.zeros(0, dtype=np.float32), last=True) if self._resampler is not None else b""

    def _pcm16(self, audio: np.ndarray, *, last: bool) -> bytes:
        if self._resampler is not None:
            audio = self._resampler.resample_chunk(audio, last=last)
        return bytes(np.round(np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes())


class _Close(Exception):
    """End the connection with ``code``; ``error`` (when set) is sent as an error event first."""

    def __init__(self, code: int, reason: str, error: str | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.error = error


@dataclass(slots=True)
class LiveParams:
    model: str
    language: str | None
    sample_rate: int
    encoding: str
    word_timestamps: bool
    full_transcript: bool
    eou_timeout_ms: int
    cold_start_wait_s: float

    def meta(self) -> dict[str, Any]:
        return {
            "language": self.language,
            "word_timestamps": self.word_timestamps,
            "full_transcript": self.full_transcript,
            "eou_timeout_ms": self.eou_timeout_ms,
        }


def _bool(query: Any, name: str, default: bool) -> bool:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("true", "1", "yes"):
        return True
    if raw.lower() in ("false", "0", "no"):
        return False
    raise _Close(WS_POLICY_VIOLATION, f"{name} must be true or false", f"invalid {name} '{raw[:40]}'")


def _int(query: Any, name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        text = f"{name} must be an integer from {low} to {high}"
        raise _Close(WS_POLICY_VIOLATION, text, f"{text}; got '{raw[:40]}'")
    return value


def parse_params(ws: WebSocket, state: Any) -> LiveParams:
    q = ws.query_params
    try:
        model = state.registry.resolve(q.get("model"), "asr")
    except UnknownModel as exc:
        raise _Close(WS_POLICY_VIOLATION, "unknown model", exc.message) from None
    except NoWorkers as exc:
        raise _Close(WS_TRY_AGAIN_LATER, "no ASR model is deployed yet", exc.message) from None
    encoding = (q.get("encoding") or "linear16").lower()
    if encoding not in ENCODINGS:
        text = f"unsupported encoding; use one of {', '.join(ENCODINGS)}"
        raise _Close(WS_POLICY_VIOLATION, text, f"encoding '{encoding[:40]}' is not supported; {text[12:]}")
    asked = q.get("language") or "en"
    language: str | None = asked
    if asked.lower() in ("multi", "auto"):
        language = None  # detect
    elif model.languages:
        code = asked.replace("_", "-").split("-")[0].lower()
        if code not in model.languages and asked not in model.languages:
            text = f"language '{asked[:35]}' is not supported by model '{model.name}'"
            raise _Close(WS_POLICY_VIOLATION, "unsupported language", text)
    limits = state.settings.limits
    return LiveParams(
        model=model.name,
        language=language,
        sample_rate=_int(q, "sample_rate", 16000, 8000, 48000),
        encoding=encoding,
        word_timestamps=_bool(q, "word_timestamps", False),
        full_transcript=_bool(q, "full_transcript", False),
        eou_timeout_ms=_int(q, "eou_timeout_ms", 600, 50, 10000),
        cold_start_wait_s=limits.cold_start_wait_s
        if model.cold_start_wait_s is None
        else model.cold_start_wait_s,
    )


def _error_event(message: str, session_id: str | None = None) -> str:
    return orjson.dumps(
        {"type": "error", "status": "error", "message": message, "session_id": session_id}
    ).decode()


def _live_parts(ws: WebSocket) -> tuple[LiveSttSettings, SessionClient]:
    """Per-app settings and session client, built on first use (tests may set ``app.state.stt_live``)."""
    app_state = ws.app.state
    if getattr(app_state, "stt_live", None) is None:
        app_state.stt_live = LiveSttSettings()
    if getattr(app_state, "stt_sessions", None) is None:
        state = app_state.kubespeech
        app_state.stt_sessions = SessionClient(
            state.redis, SessionSettings(), state.settings.redis.key_prefix
        )
    return app_state.stt_live, app_state.stt_sessions


# Public names for the other live endpoints built on this connection (api.realtime).
Close = _Close
live_parts = _live_parts


class LiveSttConnection:
    """One client connection bridged to one Redis session: a reader (client -> audio stream), a forwarder
    (event stream -> client) and a keeper (key TTLs, maximum duration)."""

    def __init__(
        self, ws: WebSocket, params: LiveParams, settings: LiveSttSettings, sessions: SessionClient, sid: str
    ) -> None:
        self.ws = ws
        self.params = params
        self.settings = settings
        self.sessions = sessions
        self.sid = sid
        self.decoder = PcmDecoder(params.encoding, params.sample_rate)
        self.started = time.monotonic()
        self.first_audio: float | None = None
        self.audio_s = 0.0
        self.stopping = False
        self.finished = False  # the is_last event went out
        self._send_lock = asyncio.Lock()
        self.draining = False  # server shutdown: the session was flushed with a close control
        self.close_sent = False
        self.overflowed = False
        # Bounded: a client that never reads must not make the server hold its events without limit.
        self._out: asyncio.Queue[str | None] = asyncio.Queue(settings.max_pending_events)

    def error_event(self, message: str) -> str:
        """An error event in this protocol's shape (api.realtime overrides it with the OpenAI shape)."""
        return _error_event(message, self.sid)

    async def send(self, text: str) -> None:
        """Queue an event for the client (the writer sends it); 1008 when the client does not read."""
        try:
            self._out.put_nowait(text)
        except asyncio.QueueFull:
            self.overflowed = True
            reason = f"client is not reading events ({self.settings.max_pending_events} pending)"
            raise _Close(WS_POLICY_VIOLATION, reason) from None

    async def _write(self) -> None:
        while (text := await self._out.get()) is not None:
            async with self._send_lock:
                await self.ws.send_text(text)

    async def _end_writes(self, writer: asyncio.Task[None], drop: bool) -> None:
        """Deliver what is queued (bounded), unless the client is gone or does not read."""
        if not drop and not writer.done():
            try:
                self._out.put_nowait(None)
            except asyncio.QueueFull:
                drop = True
            else:
                await asyncio.wait({writer}, timeout=5)
        if not writer.done():
            writer.cancel()
            await asyncio.wait({writer}, timeout=1)

    async def drain(self) -> None:
        """Server shutdown: flush the session like ``close_stream``; its is_last event closes with 1012."""
        self.draining = True
        if not self.close_sent:
            self.close_sent = True
            await self._flush_resampler()
            await self.sessions.send_control(self.sid, "close")

    async def run(self) -> None:
        live = _connections(self.ws.app)
        live.add(self)
        try:
            await self._run()
        finally:
            live.discard(self)

    async def _run(self) -> None:
        reader = asyncio.create_task(self._read())
        writer = asyncio.create_task(self._write())
        tasks = {reader, writer, asyncio.create_task(self._forward()), asyncio.create_task(self._keep())}
        outcome: _Close | None = None
        gone = False
        try:
            while tasks and outcome is None and not gone:
                done, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    exc = task.exception()
                    if isinstance(exc, _Close):
                        outcome = exc
                    elif isinstance(exc, WebSocketDisconnect):
                        gone = True
                    elif exc is not None:
                        log.error("live stt connection failed", exc_info=exc)
                        outcome = _Close(WS_INTERNAL_ERROR, "internal error", "internal server error")
                    elif task is reader and task.result() == "gone":
                        gone = True
        finally:
            self.stopping = True
            rest = tasks - {writer}
            for task in rest:
                task.cancel()
            if rest:
                await asyncio.wait(rest, timeout=2)
            with contextlib.suppress(Exception):
                await self.sessions.end(self.sid, self.params.model, abort=not self.finished)
            # The writer goes last: what the forwarder queued (a final, the is_last event) still goes out.
            await self._end_writes(writer, drop=gone or self.overflowed)
        if outcome is not None and not gone:
            with contextlib.suppress(Exception):
                if outcome.error and not self.overflowed:
                    await self.ws.send_text(self.error_event(outcome.error))
                # Bounded: the close frame of a client that does not read may never be written.
                await asyncio.wait_for(self.ws.close(outcome.code, outcome.reason[:120]), timeout=5)

    async def _receive(self) -> dict[str, Any]:
        """The next client frame; a client silent for longer than the idle timeout is closed (1008)."""
        try:
            return dict(await asyncio.wait_for(self.ws.receive(), timeout=self.settings.idle_timeout_s))
        except TimeoutError:
            text = f"idle timeout: no data for {self.settings.idle_timeout_s:g} s"
            raise _Close(WS_POLICY_VIOLATION, text, text) from None

    async def _read(self) -> str:
        """Client frames into the session; returns "gone" (client left) or "closed" (sent close_stream)."""
        while True:
            message = await self._receive()
            if message["type"] == "websocket.disconnect":
                return "gone"
            if self.draining:
                continue  # flushed for shutdown: nothing sent now would be transcribed
            frame = message.get("bytes")
            if frame is not None:
                await self._audio(frame)
                continue
            try:
                data = orjson.loads(message.get("text") or "")
            except orjson.JSONDecodeError:
                text = "text frames must be JSON control messages"
                raise _Close(WS_UNSUPPORTED_DATA, text, text) from None
            kind = data.get("type") if isinstance(data, dict) else None
            if kind == "finalize":
                await self._flush_resampler()
                await self.sessions.send_control(self.sid, "finalize")
            elif kind == "close_stream":
                self.close_sent = True
                await self._flush_resampler()
                await self.sessions.send_control(self.sid, "close")
                return "closed"
            else:
                await self.send(
                    _error_event(
                        f"unknown message type {str(kind)[:40]!r}; expected 'finalize' or 'close_stream'",
                        self.sid,
                    )
                )

    async def _audio(self, frame: bytes) -> None:
        if len(frame) > self.settings.max_frame_bytes:
            text = f"audio frame of {len(frame)} bytes exceeds the limit of {self.settings.max_frame_bytes}"
            raise _Close(WS_TOO_BIG, "frame too large", text)
        try:
            pcm = self.decoder.decode(frame)
        except BadAudio as exc:
            await self.send(self.error_event(str(exc)))
            return
        now = time.monotonic()
        if self.first_audio is None:
            self.first_audio = now
        self.audio_s += self.decoder.seconds(frame)
        ahead = self.audio_s - (now - self.first_audio)
        if ahead > self.settings.max_ahead_s:
            text = f"audio is arriving more than {self.settings.max_ahead_s:g} s ahead of real time"
            raise _Close(WS_POLICY_VIOLATION, "audio too far ahead of real time", text)
        if pcm:
            await self.sessions.send_audio(self.sid, pcm)

    async def _flush_resampler(self) -> None:
        rest = self.decoder.flush()
        if rest:
            await self.sessions.send_audio(self.sid, rest)

    async def _forward(self) -> None:
        after = "0-0"
        while not self.stopping:
            for entry_id, kind, event in await self.sessions.read_events(self.sid, after, block_s=0.5):
                after = entry_id
                await self.send(event.decode())
                if kind == "l":
                    self.finished = True
                    if self.draining:
                        raise _Close(WS_SERVICE_RESTART, RESTART_REASON)
                    raise _Close(WS_NORMAL, "stream closed")
                if kind == "x":
                    raise _Close(WS_INTERNAL_ERROR, "session failed")

    async def _keep(self) -> None:
        while not self.stopping:
            await asyncio.sleep(self.settings.keepalive_s)
            await self.sessions.touch(self.sid, self.params.model)
            if time.monotonic() - self.started > self.settings.max_session_s:
                text = f"maximum session duration of {self.settings.max_session_s:g} s reached"
                raise _Close(WS_POLICY_VIOLATION, "maximum session duration reached", text)


async def _refuse(ws: WebSocket, close: _Close) -> None:
    with contextlib.suppress(Exception):
        if close.error:
            await ws.send_text(_error_event(close.error))
        await ws.close(close.code, close.reason[:120])


async def live_stt(websocket: WebSocket) -> None:
    state = websocket.app.state.kubespeech
    await websocket.accept()
    try:
        state.keys.verify(websocket.headers.get("authorization"))
    except KubespeechError as exc:
        await _refuse(websocket, _Close(WS_POLICY_VIOLATION, "invalid or missing API key", exc.message))
        return
    try:
        params = parse_params(websocket, state)
    except _Close as exc:
        await _refuse(websocket, exc)
        return
    settings, sessions = _live_parts(websocket)
    if getattr(websocket.app.state, "stt_live_draining", False):
        await _refuse(websocket, _Close(WS_SERVICE_RESTART, RESTART_REASON, "the server is restarting"))
        return
    try:
        lease = await state.license_gate.acquire_stream("streaming")
    except LicenseLimitExceededError as exc:
        await _refuse(websocket, _Close(WS_TRY_AGAIN_LATER, "concurrent stream limit reached", exc.message))
        return
    except KubespeechError as exc:
        await _refuse(websocket, _Close(WS_POLICY_VIOLATION, "not licensed", exc.message))
        return
    try:
        # Opened before waiting for a worker: the session already counts as demand for the autoscaler.
        sid = await sessions.open(params.model, params.meta())
        if not await state.registry.wait_for_worker(params.model, params.cold_start_wait_s):
            await sessions.end(sid, params.model, abort=True)
            retry = state.settings.limits.retry_after_s
            text = f"no worker is ready for model '{params.model}'; reconnect in {retry} s"
            await _refuse(websocket, _Close(WS_TRY_AGAIN_LATER, f"no worker ready; retry in {retry} s", text))
            return
        await LiveSttConnection(websocket, params, settings, sessions, sid).run()
    finally:
        await lease.release()


def _connections(app: Any) -> set[LiveSttConnection]:
    if getattr(app.state, "stt_live_connections", None) is None:
        app.state.stt_live_connections = set()
    conns: set[LiveSttConnection] = app.state.stt_live_connections
    return conns


async def drain_live_sessions(app: Any, timeout_s: float | None = None) -> int:
    """Shutdown: refuse new sessions, flush the open ones and wait (bounded) until they closed; returns how
    many were still open at the deadline (uvicorn then drops them with a bare 1012)."""
    app.state.stt_live_draining = True
    conns = _connections(app)
    if timeout_s is None:
        timeout_s = (getattr(app.state, "stt_live", None) or LiveSttSettings()).drain_timeout_s
    for conn in list(conns):
        with contextlib.suppress(Exception):
            await conn.drain()
    deadline = time.monotonic() + timeout_s
    while conns and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if conns:
        log.warning("live sessions still open after the drain timeout", extra={"count": len(conns)})
    return len(conns)


def install_drain_on_signal(app: Any) -> Callable[[], None]:
    """Wrap uvicorn's SIGTERM/SIGINT handlers so open live sessions drain before it shuts connections.

    uvicorn fails every WebSocket with a bare 1012 as the first step of its shutdown, before the lifespan
    shutdown runs, so the drain has to run before uvicorn learns of the signal. Only possible in the main
    thread (an API served from a test's thread keeps uvicorn's behaviour). Returns the undo.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    draining: list[int] = []
    tasks: set[asyncio.Task[None]] = set()

    def chain(sig: int, frame: Any) -> None:
        handler = previous[sig]
        if callable(handler):
            handler(sig, frame)
        elif handler == signal.SIG_DFL:
            signal.signal(sig, signal.SIG_DFL)
            signal.raise_signal(sig)

    async def drain_then_exit(sig: int) -> None:
        try:
            await drain_live_sessions(app)
        finally:
            chain(sig, None)

    def on_signal(sig: int, frame: Any) -> None:
        if draining:  # a second signal: stop waiting for the sessions
            chain(sig, frame)
            return
        draining.append(sig)
        # A Python signal handler may run while the loop sleeps in its selector: wake it up.
        loop.call_soon_threadsafe(lambda: tasks.add(loop.create_task(drain_then_exit(sig))))

    for sig in previous:
        signal.signal(sig, on_signal)

    def undo() -> None:
        for sig, handler in previous.items():
            with contextlib.suppress(Exception):
                signal.signal(sig, handler)

    return undo


router.add_api_websocket_route("/waves/v1/stt/live", live_stt, name="waves_stt_live")
router.add_api_websocket_route("/api/v1/lightning/get_text", live_stt, name="legacy_stt_live")
