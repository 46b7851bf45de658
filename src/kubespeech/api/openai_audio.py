"""OpenAI audio surface: ``/v1/audio/transcriptions``, ``/v1/audio/speech`` and ``/v1/models``."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Form, Path, Request, UploadFile
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response, StreamingResponse

from kubespeech.api.deps import Service, State, require_key
from kubespeech.api.errors import OpenAIError, error_responses
from kubespeech.api.service import SynthesizeRequest, TranscribeRequest, Transcript
from kubespeech.api.tts_live import SSE_HEADERS, b64, encoded_chunks, sse_event
from kubespeech.api.waves import audio_response_doc, cache_headers, json_response
from kubespeech.audio.encode import CONTENT_TYPES
from kubespeech.errors import InvalidInput, KubespeechError, UnknownModel

log = logging.getLogger(__name__)
router = APIRouter(tags=["OpenAI audio"], dependencies=[Depends(require_key)])

_STARTED = int(time.time())


class Usage(BaseModel):
    type: Literal["duration"] = "duration"
    seconds: float


class Transcription(BaseModel):
    text: str
    usage: Usage


class TranscriptionWord(BaseModel):
    word: str
    start: float
    end: float


class TranscriptionSegment(BaseModel):
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int] = Field(description="Always empty: token ids are not exposed.")
    temperature: float
    avg_logprob: float = Field(description="Not computed by this server; always 0.")
    compression_ratio: float = Field(description="Not computed by this server; always 0.")
    no_speech_prob: float = Field(description="Not computed by this server; always 0.")


class TranscriptionVerbose(BaseModel):
    task: Literal["transcribe"] = "transcribe"
    language: str
    duration: float
    text: str
    segments: list[TranscriptionSegment] | None = None
    words: list[TranscriptionWord] | None = None
    usage: Usage


class VoiceRef(BaseModel):
    id: str = Field(max_length=128)


class SpeechBody(BaseModel):
    # strict: a JSON false is not a number and "1" is not a rate (no silent coercion of client mistakes)
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(
        max_length=128,
        description="TTS model or alias (tts-1, tts-1-hd, gpt-4o-mini-tts).",
        examples=["tts-1"],
    )
    input: str = Field(description="The text to speak.", examples=["Hello from kubespeech."])
    voice: str | VoiceRef = Field(
        description='Voice id or alias (alloy, echo, ...), or {"id": ...}.', examples=["alloy"]
    )
    instructions: str | None = Field(None, max_length=4096, description="Accepted and ignored.")
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] | None = Field(
        None,
        description=(
            "`sse`: Server-Sent Events (`speech.audio.delta` with base64 audio as it is synthesized, then "
            "`speech.audio.done`), pcm (the default here) or wav. `audio`: pcm and wav are sent chunk by chunk "
            "as they are synthesized (wav with an unknown-length header). Omitted: the whole file at once."
        ),
    )


class ModelEntry(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    task: Literal["asr", "tts"] = Field(description="What the model does.")
    alias_of: str | None = Field(None, description="The deployed model this name resolves to, for aliases.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelEntry]


ERRORS_STT = error_responses(OpenAIError, 400, 401, 403, 404, 413, 415, 422, 429, 503, 504)
ERRORS_TTS = error_responses(OpenAIError, 400, 401, 403, 404, 413, 422, 429, 503, 504)


def _ts(seconds: float, sep: str) -> str:
    ms = max(0, round(seconds * 1000))
    h, rem = divmod(ms, 3_600_000)
    m, rem = divmod(rem, 60_000)
    s, ms = divmod(rem, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def _segments(t: Transcript) -> list[dict[str, Any]]:
    segs = [s for s in t.segments if str(s.get("text", "")).strip()]
    if not segs and t.text:
        segs = [{"text": t.text, "start": 0.0, "end": t.duration}]
    return segs


def subtitles(t: Transcript, fmt: str) -> str:
    lines: list[str] = ["WEBVTT", ""] if fmt == "vtt" else []
    for i, seg in enumerate(_segments(t), start=1):
        start, end = float(seg.get("start", 0.0)), float(seg.get("end", 0.0))
        if fmt == "srt":
            lines.append(str(i))
            lines.append(f"{_ts(start, ',')} --> {_ts(end, ',')}")
        else:
            lines.append(f"{_ts(start, '.')} --> {_ts(end, '.')}")
        lines.append(str(seg.get("text", "")).strip())
        lines.append("")
    return "\n".join(lines) + ("\n" if not lines else "")


def verbose_body(t: Transcript, temperature: float, granularities: Sequence[str]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "task": "transcribe",
        "language": t.language or "",
        "duration": round(t.duration, 3),
        "text": t.text,
        "usage": {"type": "duration", "seconds": round(t.duration, 3)},
    }
    if "segment" in granularities or not granularities:
        body["segments"] = [
            {"id": i, "seek": 0, "start": float(s.get("start", 0.0)), "end": float(s.get("end", 0.0)),
             "text": str(s.get("text", "")), "tokens": [], "temperature": temperature, "avg_logprob": 0.0,
             "compression_ratio": 0.0, "no_speech_prob": 0.0}
            for i, s in enumerate(_segments(t))
        ]  # fmt: skip
    if "word" in granularities:
        body["words"] = [
            {
                "word": str(w.get("word", "")).strip(),
                "start": float(w.get("start", 0.0)),
                "end": float(w.get("end", 0.0)),
            }
            for w in t.words
        ]
    return body


_TRANSCRIPTION_200: dict[str, Any] = {
    "model": Transcription | TranscriptionVerbose,
    "description": "json/verbose_json: a JSON object; text/srt: text/plain; vtt: text/vtt.",
    "content": {"text/plain": {"schema": {"type": "string"}}, "text/vtt": {"schema": {"type": "string"}}},
}


@router.post(
    "/v1/audio/transcriptions",
    summary="Transcribe audio (OpenAI-compatible)",
    response_model=None,
    responses={200: _TRANSCRIPTION_200, **ERRORS_STT},
)
async def create_transcription(
    request: Request,
    service: Service,
    file: Annotated[UploadFile, File(description="The audio file; its format is detected from the content.")],
    model: Annotated[
        str, Form(max_length=128, description="ASR model or alias (whisper-1, ...).", examples=["whisper-1"])
    ],
    language: Annotated[str | None, Form(max_length=35)] = None,
    prompt: Annotated[str | None, Form(max_length=2000)] = None,
    response_format: Annotated[Literal["json", "text", "srt", "verbose_json", "vtt"], Form()] = "json",
    temperature: Annotated[float, Form(ge=0.0, le=1.0)] = 0.0,
    timestamp_granularities: Annotated[
        list[Literal["word", "segment"]] | None, Form(alias="timestamp_granularities[]")
    ] = None,
    stream: Annotated[
        bool, Form(description="Accepted and ignored: the whole transcript is returned.")
    ] = False,
) -> Response:
    granularities = list(timestamp_granularities or [])
    audio = await file.read()
    transcript = await service.transcribe(
        TranscribeRequest(
            audio=audio,
            model=model,
            language=language,
            word_timestamps=response_format == "verbose_json" and "word" in granularities,
            prompt=prompt,
            temperature=temperature,
            surface="openai",
            cache_control=request.headers.get("cache-control"),
        )
    )
    headers = cache_headers(transcript.cache)
    if response_format == "json":
        return json_response(
            {
                "text": transcript.text,
                "usage": {"type": "duration", "seconds": round(transcript.duration, 3)},
            },
            headers=headers,
        )
    if response_format == "verbose_json":
        return json_response(verbose_body(transcript, temperature, granularities), headers=headers)
    if response_format == "text":
        return Response(transcript.text + "\n", media_type="text/plain; charset=utf-8", headers=headers)
    if response_format == "srt":
        return Response(subtitles(transcript, "srt"), media_type="text/plain; charset=utf-8", headers=headers)
    return Response(subtitles(transcript, "vtt"), media_type="text/vtt; charset=utf-8", headers=headers)


@router.post(
    "/v1/audio/speech",
    summary="Synthesize speech (OpenAI-compatible)",
    response_class=Response,
    responses={
        200: audio_response_doc(
            "The audio.", ["audio/mpeg", "audio/ogg", "audio/aac", "audio/flac", "audio/wav", "audio/pcm"]
        ),
        **ERRORS_TTS,
    },
)
async def create_speech(request: Request, service: Service, body: SpeechBody) -> Response:
    voice = body.voice.id if isinstance(body.voice, VoiceRef) else body.voice
    sse = body.stream_format == "sse"
    fmt = "pcm" if sse and "response_format" not in body.model_fields_set else body.response_format
    # Streaming jobs run one by one on a worker (no micro-batching), so whole-file stays the default and
    # a client asks for chunks by naming a stream_format.
    if sse or (body.stream_format == "audio" and fmt in ("pcm", "wav")):
        if fmt not in ("pcm", "wav"):
            raise InvalidInput(
                f"stream_format 'sse' streams pcm or wav, not '{fmt}'", param="response_format"
            )
        return await _stream_speech(service, body, voice, fmt, sse, request.headers.get("cache-control"))
    speech = await service.synthesize(
        SynthesizeRequest(
            text=body.input,
            model=body.model,
            voice=voice,
            speed=body.speed,
            output_format=body.response_format,
            # OpenAI's pcm is 24 kHz; the other formats carry their rate, so keep the model's own.
            sample_rate=24000 if body.response_format == "pcm" else None,
            surface="openai",
            cache_control=request.headers.get("cache-control"),
        )
    )
    headers = {"X-Sample-Rate": str(speech.sample_rate), **cache_headers(speech.cache)}
    return Response(speech.audio, media_type=speech.content_type, headers=headers)


async def _stream_speech(
    service: Any, body: SpeechBody, voice: str, fmt: str, sse: bool, cache_control: str | None
) -> Response:
    stream = await service.open_stream(
        SynthesizeRequest(
            text=body.input,
            model=body.model,
            voice=voice,
            speed=body.speed,
            output_format=fmt,
            sample_rate=24000 if fmt == "pcm" else None,  # OpenAI's pcm is 24 kHz
            surface="openai",
            cache_control=cache_control,
        )
    )
    headers = {"X-Sample-Rate": str(stream.sample_rate), **cache_headers(stream.cache)}
    if not sse:
        # Mid-stream failures cannot change a status already sent: the body just ends early.
        return StreamingResponse(
            _quiet(encoded_chunks(stream, fmt)), media_type=CONTENT_TYPES[fmt], headers=headers
        )

    async def events() -> AsyncIterator[bytes]:
        try:
            async for chunk in encoded_chunks(stream, fmt):
                yield sse_event({"type": "speech.audio.delta", "audio": b64(chunk)})
        except KubespeechError as exc:
            yield sse_event({"type": "error", "error": {"message": exc.message, "code": exc.code}})
            return
        # There is no tokenizer here: input characters stand in for input tokens, and no audio tokens exist.
        usage = {"input_tokens": len(body.input), "output_tokens": 0, "total_tokens": len(body.input)}
        yield sse_event({"type": "speech.audio.done", "usage": usage})

    return StreamingResponse(events(), media_type="text/event-stream", headers={**SSE_HEADERS, **headers})


async def _quiet(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield chunk
    except KubespeechError as exc:
        log.warning(
            "speech stream failed after its first chunk", extra={"code": exc.code, "error": exc.message}
        )


def _model_entries(state: Any) -> list[dict[str, Any]]:
    registry = state.registry
    out: list[dict[str, Any]] = []
    for m in registry.of_task():
        out.append({"id": m.name, "object": "model", "created": _STARTED, "owned_by": "kubespeech",
                    "task": m.task, "alias_of": None})  # fmt: skip
        for alias in registry.aliases_of(m):
            out.append({"id": alias, "object": "model", "created": _STARTED, "owned_by": "kubespeech",
                        "task": m.task, "alias_of": m.name})  # fmt: skip
    return out


@router.get(
    "/v1/models",
    summary="List the models this deployment serves (with their aliases)",
    response_model=None,
    responses={200: {"model": ModelList, "description": "Models."}, **error_responses(OpenAIError, 401)},
)
async def list_models(state: State) -> Response:
    return json_response({"object": "list", "data": _model_entries(state)})


@router.get(
    "/v1/models/{model}",
    summary="Describe one model",
    response_model=None,
    responses={
        200: {"model": ModelEntry, "description": "The model."},
        **error_responses(OpenAIError, 401, 404),
    },
)
async def get_model(
    state: State, model: Annotated[str, Path(max_length=256, examples=["whisper-1"])]
) -> Response:
    for entry in _model_entries(state):
        if entry["id"] == model:
            return json_response(entry)
    raise UnknownModel(f"The model '{model}' does not exist", model=model)
