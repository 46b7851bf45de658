"""Streaming TTS: Waves ``/waves/v1/tts/live`` over Server-Sent Events (POST) and WebSocket, and the helpers
the OpenAI surface shares (SSE framing, the unknown-length WAV header, per-chunk encoding).

Both Waves shapes follow the ``smallestai`` SDK (5.14): SSE frames as documented on
``waves.synthesize_sse_tts`` (``event: audio`` + ``data: {"audio": <base64 PCM>}``, then ``data: {"done":
true}``); WebSocket messages as ``waves.tts.connect`` (``TtsRequestMessage`` in: text, ``continue``,
``flush``; ``TtsResponseMessage`` out: ``status`` chunk/complete with ``request_id`` and ``data.audio``) and
the ``WavesStreamingTTS`` helper that drives it (errors: ``status: error`` with ``message``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import struct
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Depends, Request, WebSocket
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import Response, StreamingResponse
from starlette.websockets import WebSocketDisconnect

from kubespeech.api.deps import Service, require_key
from kubespeech.api.errors import request_id_of
from kubespeech.api.service import CachedSpeechStream, SpeechService, SpeechStream, SynthesizeRequest
from kubespeech.api.waves import TTS_ERRORS, WavesTtsRequest, cache_headers
from kubespeech.audio.encode import encode_audio
from kubespeech.errors import InvalidInput, KubespeechError, Unauthorized

log = logging.getLogger(__name__)

router = APIRouter(tags=["Smallest Waves v1"])

# Formats whose chunks can be sent as they come: headerless samples, or one header before them.
STREAM_FORMATS = ("pcm", "wav", "mulaw", "ulaw", "alaw")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

# WebSocket close codes (RFC 6455): 1003 for data of a kind the endpoint does not take (binary frames,
# text that is not JSON), 1008 for a message that breaks the protocol's rules.
WS_UNSUPPORTED_DATA = 1003
WS_POLICY_VIOLATION = 1008
DEFAULT_IDLE_TIMEOUT_S = 60.0
_SENTENCE_DONE = re.compile(r"[.!?\u2026][\"')\]]*\s")


def sse_event(data: dict[str, Any], event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


def wav_stream_header(sample_rate: int) -> bytes:
    """A PCM16 mono WAV header for a stream of unknown length: RIFF and data sizes are 0xFFFFFFFF, which
    players and decoders (ffmpeg, libsndfile, browsers) read as "until the end of the stream"."""
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF", 0xFFFFFFFF, b"WAVE", b"fmt ", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16, b"data", 0xFFFFFFFF,
    )  # fmt: skip


async def encoded_chunks(stream: SpeechStream | CachedSpeechStream, fmt: str) -> AsyncIterator[bytes]:
    """The stream's audio in ``fmt`` (one of STREAM_FORMATS), chunk by chunk."""
    first = True
    async for pcm in stream.pcm():
        if fmt in ("pcm", "wav"):
            out = pcm
        else:
            out, _ = encode_audio(
                pcm, stream.sample_rate, fmt
            )  # G.711 is per sample: no state between chunks
        if first and fmt == "wav":
            out = wav_stream_header(stream.sample_rate) + out
        first = False
        yield out


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --- SSE --------------------------------------------------------------------------------------------------


@router.post(
    "/waves/v1/tts/live",
    summary="Synthesize speech, streamed as Server-Sent Events",
    dependencies=[Depends(require_key)],
    response_class=StreamingResponse,
    responses={
        200: {
            "description": (
                'Server-Sent Events: `event: audio` frames with `data: {"audio": "<base64>"}` as each chunk '
                'is synthesized, then `event: done` with `data: {"done": true, ...}`; a failure after the '
                "first chunk is an `event: error` frame. The same URL takes a WebSocket upgrade."
            ),
            # One Server-Sent Event (what SSE-aware tools such as schemathesis check each event against).
            "content": {
                "text/event-stream": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "event": {"type": "string", "enum": ["audio", "done", "error"]},
                            "data": {"type": "string", "description": "A JSON object, see above."},
                        },
                        "required": ["data"],
                    }
                }
            },
        },
        **TTS_ERRORS,
    },
)
async def waves_tts_live(request: Request, service: Service, body: WavesTtsRequest) -> Response:
    fmt = body.output_format or "pcm"
    if fmt not in STREAM_FORMATS:
        raise InvalidInput(
            f"output_format '{fmt}' cannot be streamed; use one of {', '.join(STREAM_FORMATS)}",
            param="output_format",
        )
    stream = await service.open_stream(
        SynthesizeRequest(
            text=body.text,
            model=body.model,
            voice=body.voice_id,
            speed=body.speed if body.speed is not None else 1.0,
            language=body.language or body.number_pronunciation_language,
            sample_rate=body.sample_rate,
            output_format=fmt,
            surface="waves",
            cache_control=request.headers.get("cache-control"),
        )
    )
    request_id = body.request_id or request_id_of(request)

    async def events() -> AsyncIterator[bytes]:
        try:
            async for chunk in encoded_chunks(stream, fmt):
                yield sse_event({"audio": b64(chunk)}, "audio")
        except KubespeechError as exc:
            yield sse_event({"status": "error", "message": exc.message, "error": exc.to_dict()}, "error")
            return
        done = {"done": True, "request_id": request_id, "sample_rate": stream.sample_rate,
                "duration": round(stream.duration, 3), "chunks": stream.chunks_out}  # fmt: skip
        yield sse_event(done, "done")

    headers = {**SSE_HEADERS, "X-Sample-Rate": str(stream.sample_rate), **cache_headers(stream.cache)}
    if body.session_id:
        headers["X-External-Session-Id"] = body.session_id
    if body.request_id:
        headers["X-External-Request-Id"] = body.request_id
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


# --- WebSocket --------------------------------------------------------------------------------------------


class LiveMessage(BaseModel):
    """One client message (the SDK's ``TtsRequestMessage``; ``type`` optional, for clients that name it)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    type: Literal["text", "continue", "flush"] | None = None
    text: str = ""
    voice_id: str | None = Field(None, max_length=128)
    model: str | None = Field(None, max_length=128)
    language: str | None = Field(None, max_length=35)
    sample_rate: Literal[8000, 16000, 22050, 24000, 44100, 48000] | None = None
    speed: float | None = Field(None, ge=0.5, le=2.0)
    continue_: bool = Field(False, alias="continue")
    flush: bool = False
    request_id: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,128}$")
    session_id: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,128}$")


@dataclass(slots=True)
class _Utterance:
    text: str
    message: LiveMessage
    request_id: str
    complete: bool  # send "complete" for request_id once this piece is spoken


class _ProtocolError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class LiveSession:
    """One WebSocket: a reader that buffers text and cuts it into utterances, and a speaker that synthesizes
    them in order, so audio for the first sentence flows while the client is still sending the next."""

    def __init__(self, ws: WebSocket, service: SpeechService, max_chars: int, idle_timeout_s: float) -> None:
        self.ws = ws
        self.service = service
        self.max_chars = max_chars
        self.idle_timeout_s = idle_timeout_s
        self.buffer = ""
        self.request_id: str | None = None
        self.queue: asyncio.Queue[_Utterance] = asyncio.Queue()
        self.busy = False
        self._send_lock = asyncio.Lock()
        # The upgrade request's Cache-Control applies to every utterance of the socket.
        self.cache_control = ws.headers.get("cache-control")

    async def send(self, message: dict[str, Any]) -> None:
        async with self._send_lock:
            await self.ws.send_text(orjson.dumps(message).decode())

    async def run(self) -> None:
        speaker = asyncio.create_task(self._speak())
        try:
            await self._read()
        except _ProtocolError as exc:
            with contextlib.suppress(Exception):
                await self.send({"status": "error", "message": exc.message,
                                 "error": {"code": "INVALID_MESSAGE", "message": exc.message}})  # fmt: skip
                await self.ws.close(exc.code, exc.message[:120])
        except WebSocketDisconnect:
            pass
        finally:
            speaker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await speaker

    async def _read(self) -> None:
        while True:
            try:
                message = await asyncio.wait_for(self.ws.receive(), timeout=self.idle_timeout_s)
            except TimeoutError:
                if self.busy or not self.queue.empty():
                    continue  # the client waits for audio, not idle
                text = f"Connection timed out after {self.idle_timeout_s:g} seconds of inactivity"
                await self.send(
                    {"status": "error", "message": text, "error": {"code": "TIMEOUT", "message": text}}
                )
                await self.ws.close(1000, "idle timeout")
                return
            if message["type"] == "websocket.disconnect":
                return
            if message.get("bytes") is not None:
                raise _ProtocolError(
                    WS_UNSUPPORTED_DATA, "binary frames are not accepted; send JSON text messages"
                )
            try:
                data = orjson.loads(message.get("text") or "")
            except orjson.JSONDecodeError:
                raise _ProtocolError(WS_UNSUPPORTED_DATA, "messages must be JSON objects") from None
            if not isinstance(data, dict):
                raise _ProtocolError(WS_POLICY_VIOLATION, "messages must be JSON objects")
            try:
                msg = LiveMessage.model_validate(data)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first.get("loc", ()))
                raise _ProtocolError(
                    WS_POLICY_VIOLATION, f"invalid message: {where}: {first.get('msg')}"
                ) from None
            self._take(msg)

    def _take(self, msg: LiveMessage) -> None:
        if len(self.buffer) + len(msg.text) > self.max_chars:
            raise _ProtocolError(
                WS_POLICY_VIOLATION, f"text exceeds the limit of {self.max_chars} characters before a flush"
            )
        self.buffer += msg.text
        self.request_id = self.request_id or msg.request_id or uuid.uuid4().hex
        streaming = msg.continue_ or msg.type == "continue"
        if msg.flush or msg.type == "flush" or not streaming:
            piece, self.buffer = self.buffer, ""
            self.queue.put_nowait(_Utterance(piece, msg, self.request_id, complete=True))
            self.request_id = None
            return
        # Text arrives in pieces (LLM tokens): speak every finished sentence now, keep the unfinished rest.
        cut = 0
        for match in _SENTENCE_DONE.finditer(self.buffer):
            cut = match.end()
        if cut:
            piece, self.buffer = self.buffer[:cut], self.buffer[cut:]
            self.queue.put_nowait(_Utterance(piece, msg, self.request_id, complete=False))

    async def _speak(self) -> None:
        while True:
            item = await self.queue.get()
            self.busy = True
            try:
                if item.text.strip():
                    await self._synthesize(item)
                if item.complete:
                    await self.send({"request_id": item.request_id, "session_id": item.message.session_id,
                                     "status": "complete", "message": "All chunks sent", "done": True})  # fmt: skip
            except KubespeechError as exc:
                await self.send({"request_id": item.request_id, "status": "error", "message": exc.message,
                                 "error": exc.to_dict()})  # fmt: skip
            finally:
                self.busy = False

    async def _synthesize(self, item: _Utterance) -> None:
        m = item.message
        stream = await self.service.open_stream(
            SynthesizeRequest(
                text=item.text,
                model=m.model,
                voice=m.voice_id,
                speed=m.speed if m.speed is not None else 1.0,
                language=m.language,
                sample_rate=m.sample_rate,
                output_format="pcm",
                surface="waves",
                cache_control=self.cache_control,
            )
        )
        async for pcm in stream.pcm():
            await self.send({"request_id": item.request_id, "session_id": m.session_id, "status": "chunk",
                             "data": {"audio": b64(pcm), "sample_rate": stream.sample_rate}})  # fmt: skip


def _idle_timeout(ws: WebSocket) -> float:
    raw = ws.query_params.get("timeout")
    try:
        value = float(raw) if raw is not None else DEFAULT_IDLE_TIMEOUT_S
    except ValueError:
        return DEFAULT_IDLE_TIMEOUT_S
    return value if 0 < value <= 3600 else DEFAULT_IDLE_TIMEOUT_S


@router.websocket("/waves/v1/tts/live")
async def waves_tts_live_ws(websocket: WebSocket) -> None:
    state = websocket.app.state.kubespeech
    try:
        state.keys.verify(websocket.headers.get("authorization"))
    except Unauthorized as exc:
        body = {
            "status": "error",
            "message": exc.message,
            "error": {"code": exc.code, "message": exc.message},
        }
        try:
            # A plain 401 on the upgrade, which the SDK reports as "invalid credentials".
            await websocket.send_denial_response(
                Response(orjson.dumps(body), 401, media_type="application/json")
            )
        except RuntimeError:
            await websocket.close(WS_POLICY_VIOLATION, "invalid API key")
        return
    await websocket.accept()
    session = LiveSession(
        websocket, state.service, state.settings.limits.max_text_chars, _idle_timeout(websocket)
    )
    await session.run()
