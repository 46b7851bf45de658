"""OpenAI Realtime transcription sessions: ``WS /v1/realtime?intent=transcription``.

The protocol of the OpenAI Realtime API's transcription sessions as NVIDIA's ASR NIM, vLLM and speaches
serve it. ``Authorization: Bearer <key>`` on the upgrade (or the browsers' ``openai-insecure-api-key.<key>``
subprotocol). The server speaks first with ``transcription_session.created``. Client events:

- ``transcription_session.update`` (``session.update`` is taken as a synonym) with ``session``:
  ``input_audio_format`` (``pcm16``: 24 kHz mono little-endian, the default; ``g711_ulaw``/``g711_alaw``:
  8 kHz), ``input_audio_transcription`` (``model``, ``language``, ``prompt``), ``turn_detection``
  (``{"type": "server_vad", "silence_duration_ms": ...}`` or ``null``), ``input_audio_noise_reduction``
  and ``include`` (accepted, ignored); answered with ``transcription_session.updated``.
- ``input_audio_buffer.append`` (``audio``: base64), ``input_audio_buffer.commit`` (finalize the current
  utterance; answered with ``input_audio_buffer.committed``), ``input_audio_buffer.clear`` (drop the audio
  not yet transcribed; answered with ``input_audio_buffer.cleared``).

Server events: ``input_audio_buffer.speech_started`` (server VAD, with the first partial of an utterance),
``input_audio_buffer.committed`` (``item_id``, ``previous_item_id``),
``conversation.item.input_audio_transcription.delta`` (``item_id``, ``content_index`` 0, ``delta``: text
appended since the last delta of the item, derived from the worker's partials: a partial that extends what
was already sent yields its new suffix, a revision yields nothing), ``...transcription.completed``
(``item_id``, ``content_index``, ``transcript``) for each final, and ``error`` (``{"type": "error",
"error": {"type", "code", "message", "param", "event_id"}}``) for a bad client event; the socket stays open.

Audio is decoded and resampled to 16 kHz (stt_live.PcmDecoder) and runs through a Redis session like the
Waves live endpoint, whose connection (backpressure, idle timeout, keep-alive, maximum duration, close
codes: 1008 refused key, 1003 non-JSON text frame, 1011 worker failure, 1013 no worker) this reuses. With
``turn_detection: null`` utterances end on ``commit`` only, or after 10 s of silence (the engines' longest
end-of-utterance wait). A session's language or turn detection can only change before its first audio.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import uuid
from collections import deque
from typing import Any

import orjson
from fastapi import APIRouter, WebSocket

from kubespeech.api.stt_live import (
    WS_INTERNAL_ERROR,
    WS_POLICY_VIOLATION,
    WS_TRY_AGAIN_LATER,
    WS_UNSUPPORTED_DATA,
    Close,
    LiveParams,
    LiveSttConnection,
    LiveSttSettings,
    PcmDecoder,
    live_parts,
)
from kubespeech.errors import KubespeechError, NoWorkers, UnknownModel
from kubespeech.jobs.sessions import SessionClient
from kubespeech.license.errors import LicenseLimitExceededError

router = APIRouter(tags=["OpenAI compatible"])

# OpenAI format name -> (stt_live encoding, sample rate)
FORMATS = {"pcm16": ("linear16", 24000), "g711_ulaw": ("mulaw", 8000), "g711_alaw": ("alaw", 8000)}
SESSION_FIELDS = {
    "input_audio_format",
    "input_audio_transcription",
    "turn_detection",
    "input_audio_noise_reduction",
    "include",
    "modalities",
}
TRANSCRIPTION_FIELDS = {"model", "language", "prompt"}
VAD_FIELDS = {"type", "threshold", "prefix_padding_ms", "silence_duration_ms", "create_response",
              "interrupt_response"}  # fmt: skip
MANUAL_EOU_MS = 10000  # turn_detection null: the longest end-of-utterance wait the engines accept
KEY_SUBPROTOCOL = "openai-insecure-api-key."


class EventError(Exception):
    """A bad client event, answered with an ``error`` event (the connection goes on)."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def error_event(code: str, message: str, param: str | None = None, event_id: str | None = None) -> str:
    kind = "server_error" if code == "server_error" else "invalid_request_error"
    error = {"type": kind, "code": code, "message": message, "param": param, "event_id": event_id}
    return orjson.dumps({"type": "error", "event_id": _id("event"), "error": error}).decode()


def _event(kind: str, **fields: Any) -> str:
    return orjson.dumps({"type": kind, "event_id": _id("event"), **fields}).decode()


def _api_key(ws: WebSocket) -> str | None:
    """The Authorization header, or the key carried in the browsers' subprotocol."""
    header = ws.headers.get("authorization")
    if header:
        return header
    for proto in ws.scope.get("subprotocols") or []:
        if proto.startswith(KEY_SUBPROTOCOL):
            return f"Bearer {proto[len(KEY_SUBPROTOCOL) :]}"
    return None


def _subprotocol(ws: WebSocket) -> str | None:
    """Browsers fail a handshake whose answer names none of the offered subprotocols: echo ``realtime``."""
    offered = ws.scope.get("subprotocols") or []
    return "realtime" if "realtime" in offered else None


class RealtimeConnection(LiveSttConnection):
    """One Realtime client bridged to a Redis session; a session update or a clear before the audio it
    concerns replaces the Redis session (its meta is fixed when it is opened)."""

    def __init__(
        self,
        ws: WebSocket,
        params: LiveParams,
        settings: LiveSttSettings,
        sessions: SessionClient,
        sid: str,
        state: Any,
    ) -> None:
        super().__init__(ws, params, settings, sessions, sid)
        self.state = state
        self.session_id = _id("sess")
        self.audio_format = "pcm16"
        self.asked_model = params.model
        self.prompt = ""
        self.vad: dict[str, Any] | None = {
            "type": "server_vad",
            "threshold": 0.5,
            "prefix_padding_ms": 300,
            "silence_duration_ms": params.eou_timeout_ms,
        }
        self.decoder = PcmDecoder(*FORMATS["pcm16"])
        self.has_audio = False  # since the session (re)opened: meta changes need a new session
        self.uncommitted = False  # audio appended since the last commit
        self.last_item: str | None = None
        # Forwarder state: the item being transcribed, its committed ids not yet completed (in order) and
        # the text its deltas have carried so far.
        self.item: str | None = None
        self.pending: deque[str] = deque()
        self.sent = ""

    def error_event(self, message: str) -> str:
        return error_event("invalid_value" if "audio" in message else "server_error", message)

    def session_object(self) -> dict[str, Any]:
        return {
            "id": self.session_id,
            "object": "realtime.transcription_session",
            "input_audio_format": self.audio_format,
            "input_audio_transcription": {
                "model": self.asked_model,
                "language": self.params.language,
                "prompt": self.prompt,
            },
            "turn_detection": self.vad,
            "input_audio_noise_reduction": None,
            "include": None,
        }

    async def _reopen(self) -> None:
        """Replace the Redis session (new meta, or audio dropped); the forwarder follows ``self.sid``."""
        old = self.sid
        self.sid = await self.sessions.open(self.params.model, self.params.meta())
        with contextlib.suppress(Exception):
            await self.sessions.end(old, self.params.model, abort=True)
        self.decoder = PcmDecoder(*FORMATS[self.audio_format])
        self.has_audio = self.uncommitted = False
        self.item, self.sent = None, ""
        self.pending.clear()

    async def _read(self) -> str:
        while True:
            message = await self._receive()
            if message["type"] == "websocket.disconnect":
                return "gone"
            if message.get("bytes") is not None:
                await self.send(
                    error_event("invalid_value", "send audio as base64 in input_audio_buffer.append events")
                )
                continue
            try:
                data = orjson.loads(message.get("text") or "")
            except orjson.JSONDecodeError:
                text = "text frames must be JSON client events"
                raise Close(WS_UNSUPPORTED_DATA, text, text) from None
            event_id = data.get("event_id") if isinstance(data, dict) else None
            try:
                if not isinstance(data, dict):
                    raise EventError("invalid_value", "a client event must be a JSON object")
                await self._handle(data)
            except EventError as exc:
                await self.send(
                    error_event(
                        exc.code, exc.message, exc.param, event_id if isinstance(event_id, str) else None
                    )
                )

    async def _handle(self, data: dict[str, Any]) -> None:
        kind = data.get("type")
        if kind in ("transcription_session.update", "session.update"):
            _known(data, {"type", "event_id", "session"}, "")
            await self._update(data.get("session"))
            updated = "session.updated" if kind == "session.update" else "transcription_session.updated"
            await self.send(_event(updated, session=self.session_object()))
        elif kind == "input_audio_buffer.append":
            _known(data, {"type", "event_id", "audio"}, "")
            audio = data.get("audio")
            if not isinstance(audio, str):
                raise EventError("invalid_value", "audio must be a base64 string", "audio")
            try:
                frame = base64.b64decode(audio, validate=True)
            except (binascii.Error, ValueError):
                raise EventError("invalid_base64", "audio is not valid base64", "audio") from None
            if frame:
                self.has_audio = self.uncommitted = True
                await self._audio(frame)
        elif kind == "input_audio_buffer.commit":
            _known(data, {"type", "event_id"}, "")
            if not self.uncommitted:
                raise EventError(
                    "input_audio_buffer_commit_empty", "no audio was appended since the last commit"
                )
            self.uncommitted = False
            item = self.item or _id("item")
            self.item = item
            self.pending.append(item)
            # Sent before the finalize so the committed event precedes the item's remaining deltas.
            await self.send(
                _event("input_audio_buffer.committed", previous_item_id=self.last_item, item_id=item)
            )
            self.last_item = item
            await self._flush_resampler()
            await self.sessions.send_control(self.sid, "finalize")
        elif kind == "input_audio_buffer.clear":
            _known(data, {"type", "event_id"}, "")
            if self.has_audio:
                await self._reopen()
            await self.send(_event("input_audio_buffer.cleared"))
        else:
            raise EventError("unknown_event", f"unknown event type {str(kind)[:60]!r}", "type")

    async def _update(self, session: Any) -> None:
        if not isinstance(session, dict):
            raise EventError("invalid_value", "session must be an object", "session")
        _known(session, SESSION_FIELDS, "session.")
        params = self.params
        language, model, eou = params.language, params.model, params.eou_timeout_ms
        asked_model, prompt, vad = self.asked_model, self.prompt, self.vad
        audio_format = session.get("input_audio_format", self.audio_format)
        if audio_format not in FORMATS:
            raise EventError(
                "invalid_value",
                f"input_audio_format must be one of {', '.join(FORMATS)}",
                "session.input_audio_format",
            )
        if "input_audio_transcription" in session:
            tr = session["input_audio_transcription"] or {}
            if not isinstance(tr, dict):
                raise EventError("invalid_value", "must be an object", "session.input_audio_transcription")
            _known(tr, TRANSCRIPTION_FIELDS, "session.input_audio_transcription.")
            if tr.get("model"):
                try:
                    model = self.state.registry.resolve(str(tr["model"]), "asr").name
                except (UnknownModel, NoWorkers) as exc:
                    raise EventError(
                        "invalid_value", exc.message, "session.input_audio_transcription.model"
                    ) from None
                asked_model = str(tr["model"])
            if "language" in tr:
                language = str(tr["language"]) if tr["language"] else None
            prompt = str(tr.get("prompt") or prompt)
        if "turn_detection" in session:
            td = session["turn_detection"]
            if td is None:
                vad, eou = None, MANUAL_EOU_MS
            elif isinstance(td, dict) and td.get("type", "server_vad") == "server_vad":
                _known(td, VAD_FIELDS, "session.turn_detection.")
                silence = td.get("silence_duration_ms", 600)
                if not isinstance(silence, int) or not 50 <= silence <= 10000:
                    raise EventError(
                        "invalid_value",
                        "silence_duration_ms must be an integer from 50 to 10000",
                        "session.turn_detection.silence_duration_ms",
                    )
                vad = {"type": "server_vad", "threshold": td.get("threshold", 0.5),
                       "prefix_padding_ms": td.get("prefix_padding_ms", 300), "silence_duration_ms": silence}  # fmt: skip
                eou = silence
            else:
                raise EventError(
                    "invalid_value",
                    "turn_detection must be null or of type server_vad",
                    "session.turn_detection",
                )
        changed = (language, model, eou) != (params.language, params.model, params.eou_timeout_ms)
        if changed and self.has_audio:
            raise EventError(
                "session_already_started",
                "the model, language and turn_detection can only change before the first audio",
                "session",
            )
        self.asked_model, self.prompt, self.vad = asked_model, prompt, vad
        format_changed = audio_format != self.audio_format
        self.audio_format = audio_format
        if changed:
            if model != params.model and not await self.state.registry.wait_for_worker(model, 0):
                raise EventError("invalid_value", f"no worker is ready for model '{model}'", "session")
            params.language, params.model, params.eou_timeout_ms = language, model, eou
            await self._reopen()
        elif format_changed:
            await self._flush_resampler()  # audio already decoded keeps its old format
            self.decoder = PcmDecoder(*FORMATS[audio_format])

    async def _forward(self) -> None:
        after, sid = "0-0", self.sid
        while not self.stopping:
            entries = await self.sessions.read_events(sid, after, block_s=0.5)
            if sid != self.sid:  # reopened: the old session's events are void
                after, sid = "0-0", self.sid
                continue
            for entry_id, kind, raw in entries:
                after = entry_id
                event = orjson.loads(raw)
                if kind == "x":
                    await self.send(
                        error_event("server_error", str(event.get("message") or "session failed"))
                    )
                    raise Close(WS_INTERNAL_ERROR, "session failed")
                if kind == "p":
                    await self._partial(str(event.get("transcript") or ""), event)
                elif kind in ("f", "l"):
                    await self._final(str(event.get("transcript") or ""), bool(event.get("from_finalize")))
                if kind == "l":  # only after a close control: the server is draining (stt_live)
                    self.finished = True
                    code = 1012 if getattr(self, "draining", False) else 1000
                    raise Close(code, "server restarting; reconnect" if code == 1012 else "stream closed")

    async def _partial(self, text: str, event: dict[str, Any]) -> None:
        if not text:
            return
        if self.item is None:
            self.item = _id("item")
            if self.vad is not None:
                start = int(float(event.get("start") or 0) * 1000)
                await self.send(
                    _event("input_audio_buffer.speech_started", audio_start_ms=start, item_id=self.item)
                )
        if text.startswith(self.sent) and len(text) > len(self.sent):
            delta = text[len(self.sent) :]
            self.sent = text
            await self.send(
                _event(
                    "conversation.item.input_audio_transcription.delta",
                    item_id=self.item,
                    content_index=0,
                    delta=delta,
                )
            )

    async def _final(self, text: str, from_finalize: bool) -> None:
        if self.pending:
            item = self.pending.popleft()  # the client committed it: it gets a completed, even if empty
        elif text:
            item = self.item or _id("item")
            await self.send(
                _event("input_audio_buffer.committed", previous_item_id=self.last_item, item_id=item)
            )
            self.last_item = item
        else:
            self.item, self.sent = None, ""
            return
        await self.send(
            _event(
                "conversation.item.input_audio_transcription.completed",
                item_id=item,
                content_index=0,
                transcript=text,
            )
        )
        self.item = self.pending[0] if self.pending else None
        self.sent = ""


def _known(obj: dict[str, Any], allowed: set[str], prefix: str) -> None:
    for key in obj:
        if key not in allowed:
            raise EventError("unknown_parameter", f"unknown parameter '{prefix}{key}'", f"{prefix}{key}")


async def _refuse(ws: WebSocket, code: int, reason: str, message: str, error_code: str) -> None:
    with contextlib.suppress(Exception):
        await ws.send_text(error_event(error_code, message))
        await ws.close(code, reason[:120])


async def realtime(websocket: WebSocket) -> None:
    state = websocket.app.state.kubespeech
    await websocket.accept(subprotocol=_subprotocol(websocket))
    try:
        state.keys.verify(_api_key(websocket))
    except KubespeechError as exc:
        await _refuse(
            websocket, WS_POLICY_VIOLATION, "invalid or missing API key", exc.message, "invalid_api_key"
        )
        return
    intent = websocket.query_params.get("intent") or "transcription"
    if intent != "transcription":
        text = "only intent=transcription is served"
        await _refuse(websocket, WS_POLICY_VIOLATION, text, text, "invalid_value")
        return
    try:
        model = state.registry.resolve(websocket.query_params.get("model"), "asr")
    except UnknownModel as exc:
        await _refuse(websocket, WS_POLICY_VIOLATION, "unknown model", exc.message, "invalid_value")
        return
    except NoWorkers as exc:
        await _refuse(
            websocket, WS_TRY_AGAIN_LATER, "no ASR model is deployed yet", exc.message, "server_error"
        )
        return
    limits = state.settings.limits
    params = LiveParams(
        model=model.name,
        language="en",
        sample_rate=24000,
        encoding="linear16",
        word_timestamps=False,
        full_transcript=False,
        eou_timeout_ms=600,
        cold_start_wait_s=limits.cold_start_wait_s
        if model.cold_start_wait_s is None
        else model.cold_start_wait_s,
    )
    settings, sessions = live_parts(websocket)
    try:
        lease = await state.license_gate.acquire_stream("streaming")
    except LicenseLimitExceededError as exc:
        await _refuse(
            websocket, WS_TRY_AGAIN_LATER, "concurrent stream limit reached", exc.message, "server_error"
        )
        return
    except KubespeechError as exc:
        await _refuse(websocket, WS_POLICY_VIOLATION, "not licensed", exc.message, "server_error")
        return
    try:
        # Opened before waiting for a worker: the session already counts as demand for the autoscaler.
        sid = await sessions.open(params.model, params.meta())
        if not await state.registry.wait_for_worker(params.model, params.cold_start_wait_s):
            await sessions.end(sid, params.model, abort=True)
            retry = limits.retry_after_s
            text = f"no worker is ready for model '{params.model}'; reconnect in {retry} s"
            await _refuse(
                websocket, WS_TRY_AGAIN_LATER, f"no worker ready; retry in {retry} s", text, "server_error"
            )
            return
        conn = RealtimeConnection(websocket, params, settings, sessions, sid, state)
        await conn.send(_event("transcription_session.created", session=conn.session_object()))
        await conn.run()
    finally:
        await lease.release()


router.add_api_websocket_route("/v1/realtime", realtime, name="openai_realtime")
