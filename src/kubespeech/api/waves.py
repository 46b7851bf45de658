"""Smallest Waves v1 surface (the ``smallestai`` SDK's ``waves`` module is the reference client)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import orjson
from fastapi import APIRouter, Depends, Path, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import Response

from kubespeech.api.deps import Service, State, require_key
from kubespeech.api.errors import SmallestError, error_responses, request_id_of
from kubespeech.api.service import Speech, SynthesizeRequest, TranscribeRequest, Transcript
from kubespeech.audio.encode import CONTENT_TYPES
from kubespeech.errors import InvalidInput

_Q = TypeVar("_Q", bound=BaseModel)

router = APIRouter(tags=["Smallest Waves v1"])
authed = APIRouter(tags=["Smallest Waves v1"], dependencies=[Depends(require_key)])

STT_ERRORS = error_responses(SmallestError, 400, 401, 403, 404, 413, 415, 422, 429, 503, 504)
TTS_ERRORS = error_responses(SmallestError, 400, 401, 403, 404, 413, 422, 429, 503, 504)

_AUDIO_BINARY = {"schema": {"type": "string", "format": "binary"}}
RAW_AUDIO_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": (
            "The audio file as the raw request body. The format is detected from the content (WAV, FLAC, "
            "Ogg Vorbis/Opus, MP3, AAC, M4A, WebM); headerless 16-bit PCM needs `encoding=linear16` and "
            "`sample_rate`."
        ),
        "content": {"application/octet-stream": _AUDIO_BINARY},
    }
}
AUDIO_OUT_TYPES = sorted({ct.split(";")[0] for ct in CONTENT_TYPES.values()})


def audio_response_doc(description: str, types: list[str]) -> dict[str, Any]:
    return {"description": description, "content": {t: _AUDIO_BINARY for t in types}}


# --- models (response shapes follow the SDK's TranscriptionResponse / GetVoicesWavesResponse) ------------


class WavesWord(BaseModel):
    word: str
    start: float
    end: float
    confidence: float | None = None


class WavesUtterance(BaseModel):
    text: str
    start: float
    end: float
    speaker: str | None = Field(
        None, description="Always null: diarization is not available on this deployment."
    )


class WavesMetadata(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    duration: float = Field(description="Audio duration in seconds.")
    file_size: int = Field(alias="fileSize", description="Bytes received.")
    processing_time_ms: float
    model: str = Field(description="The model (worker pool) that served the request.")
    source_format: str = Field(description="The format detected from the audio's content.")
    source_sample_rate: int
    source_channels: int
    unsupported_features: list[str] = Field(
        description="Requested options this deployment accepted but does not perform (e.g. diarize)."
    )


class WavesTranscription(BaseModel):
    status: Literal["success"] = "success"
    transcription: str
    words: list[WavesWord]
    utterances: list[WavesUtterance]
    language: str | None = None
    audio_length: float = Field(description="Audio duration in seconds.")
    metadata: WavesMetadata
    request_id: str


class WavesTtsRequest(BaseModel):
    """Body of ``POST /waves/v1/tts`` (and the legacy ``get_speech`` routes)."""

    # strict: a JSON false is not a number and "1" is not a rate (no silent coercion of client mistakes)
    model_config = ConfigDict(extra="ignore", strict=True)

    text: str = Field(description="The text to speak.", examples=["Hello from kubespeech."])
    voice_id: str | None = Field(
        None, description="Voice id; the model's default voice when omitted.", examples=["emily"]
    )
    model: str | None = Field(
        None, description="TTS model; the deployment's default when omitted.", examples=["lightning_v3.1"]
    )
    sample_rate: Literal[8000, 16000, 22050, 24000, 44100, 48000] | None = Field(
        None, description="Output sample rate; the model's native rate when omitted."
    )
    speed: float | None = Field(None, ge=0.5, le=2.0, description="Speaking rate, 0.5 to 2.")
    language: str | None = Field(None, max_length=35)
    number_pronunciation_language: str | None = Field(None, max_length=35)
    output_format: Literal["wav", "pcm", "mp3", "mulaw", "ulaw", "alaw"] | None = Field(
        None, description="Audio format; from the Accept header when omitted, else wav."
    )
    pronunciation_dicts: list[str] | None = Field(
        None, description="Accepted; not applied on this deployment."
    )
    word_timestamps: bool | None = Field(None, description="Accepted and ignored (WebSocket-only in Waves).")
    consistency: float | None = Field(None, description="Accepted and ignored (lightning-v2 parameter).")
    similarity: float | None = Field(None, description="Accepted and ignored (lightning-v2 parameter).")
    enhancement: float | None = Field(None, description="Accepted and ignored (lightning-v2 parameter).")
    session_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9._-]{1,128}$", description="Echoed in a header."
    )
    request_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9._-]{1,128}$", description="Echoed in a header."
    )


class VoiceTags(BaseModel):
    language: list[str] = Field(default_factory=list)
    gender: str | None = None
    accent: str | None = None
    age: str | None = None
    emotions: list[str] = Field(default_factory=list)
    usecases: list[str] = Field(default_factory=list)


class WavesVoice(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    voice_id: str = Field(alias="voiceId")
    display_name: str = Field(alias="displayName")
    tags: VoiceTags
    model: str = Field(description="The TTS model (pool) that speaks with this voice.")


class WavesVoices(BaseModel):
    voices: list[WavesVoice]


class ServiceStatus(BaseModel):
    status: str


class WavesHealth(BaseModel):
    status: str = Field(description="ok, or degraded when Redis is unreachable.")
    redis: ServiceStatus


# --- shared translation helpers (also used by the legacy routes) -------------------------------------------

_ACCEPT_FORMATS = {
    "audio/wav": "wav",
    "audio/x-wav": "wav",
    "audio/wave": "wav",
    "audio/mpeg": "mp3",
    "audio/mp3": "mp3",
    "audio/pcm": "pcm",
    "audio/l16": "pcm",
    "audio/basic": "mulaw",
    "audio/mulaw": "mulaw",
    "audio/x-mulaw": "mulaw",
    "audio/pcmu": "mulaw",
    "audio/alaw": "alaw",
    "audio/x-alaw-basic": "alaw",
    "audio/pcma": "alaw",
}

_RAW_CONTENT_TYPES = ("audio/l16", "audio/pcm", "audio/x-raw", "audio/raw")


def format_from_accept(accept: str | None) -> str:
    for part in (accept or "").split(","):
        fmt = _ACCEPT_FORMATS.get(part.split(";")[0].strip().lower())
        if fmt:
            return fmt
    # Waves documents pcm as its default, but headerless PCM does not say its rate and is not playable;
    # WAV is the same samples with a header, so a client that named nothing gets WAV.
    return "wav"


def raw_params_from_content_type(content_type: str) -> int | None:
    """``audio/L16; rate=16000`` style content types name headerless PCM and its rate."""
    main, _, params = content_type.partition(";")
    if main.strip().lower() not in _RAW_CONTENT_TYPES:
        return None
    for p in params.split(";"):
        key, _, value = p.partition("=")
        if key.strip().lower() == "rate" and value.strip().isdigit():
            return int(value.strip())
    return None


def transcription_body(
    t: Transcript, request_id: str, unsupported: list[str], with_words: bool
) -> dict[str, Any]:
    words = (
        [
            {"word": w.get("word", "").strip(), "start": w.get("start", 0.0), "end": w.get("end", 0.0),
             "confidence": w.get("confidence")}
            for w in t.words
        ]
        if with_words
        else []
    )  # fmt: skip
    utterances = [
        {
            "text": s.get("text", "").strip(),
            "start": s.get("start", 0.0),
            "end": s.get("end", 0.0),
            "speaker": None,
        }
        for s in t.segments
    ]
    return {
        "status": "success",
        "transcription": t.text,
        "words": words,
        "utterances": utterances,
        "language": t.language,
        "audio_length": round(t.duration, 3),
        "metadata": {
            "duration": round(t.duration, 3),
            "fileSize": t.file_size,
            "processing_time_ms": round(t.processing_ms, 2),
            "model": t.model,
            "source_format": t.source_format,
            "source_sample_rate": t.source_sample_rate,
            "source_channels": t.source_channels,
            "unsupported_features": unsupported,
        },
        "request_id": request_id,
    }


def json_response(body: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(body), status_code=status_code, headers=headers, media_type="application/json"
    )


def cache_headers(status: str | None) -> dict[str, str]:
    """``X-Cache: hit|miss`` when the task's result cache is on (no header when it is off)."""
    return {"X-Cache": status} if status else {}


def speech_response(speech: Speech, body: WavesTtsRequest | None = None) -> Response:
    headers = {"X-Sample-Rate": str(speech.sample_rate), "X-Audio-Duration": f"{speech.duration:.3f}"}
    headers.update(cache_headers(speech.cache))
    if body is not None:
        if body.session_id:
            headers["X-External-Session-Id"] = body.session_id
        if body.request_id:
            headers["X-External-Request-Id"] = body.request_id
    return Response(speech.audio, media_type=speech.content_type, headers=headers)


async def synthesize_waves(
    service: Any, request: Request, body: WavesTtsRequest, model_override: str | None = None
) -> Response:
    fmt = body.output_format or format_from_accept(request.headers.get("accept"))
    speech = await service.synthesize(
        SynthesizeRequest(
            text=body.text,
            model=body.model or model_override,
            voice=body.voice_id,
            speed=body.speed if body.speed is not None else 1.0,
            language=body.language or body.number_pronunciation_language,
            sample_rate=body.sample_rate,
            output_format=fmt,
            surface="waves",
            cache_control=request.headers.get("cache-control"),
        )
    )
    return speech_response(speech, body)


async def transcribe_raw(
    service: Any,
    request: Request,
    audio: bytes,
    *,
    model: str | None,
    language: str | None,
    word_timestamps: bool,
    sample_rate: int | None,
    encoding: str | None,
    channels: int,
    unsupported: list[str],
    surface: str = "waves",
) -> Response:
    raw_rate = sample_rate if encoding else None
    if encoding and sample_rate is None:
        raise InvalidInput("raw PCM (encoding=linear16) needs its sample_rate", param="sample_rate")
    if raw_rate is None:
        raw_rate = raw_params_from_content_type(request.headers.get("content-type", ""))
    transcript = await service.transcribe(
        TranscribeRequest(
            audio=audio,
            model=model,
            language=language,
            word_timestamps=word_timestamps,
            raw_sample_rate=raw_rate,
            raw_encoding=encoding or "linear16",
            raw_channels=channels,
            surface=surface,
            cache_control=request.headers.get("cache-control"),
        )
    )
    body = transcription_body(transcript, request_id_of(request), unsupported, word_timestamps)
    return json_response(body, headers=cache_headers(transcript.cache))


# --- routes --------------------------------------------------------------------------------------------------


class SttQuery(BaseModel):
    """Query parameters of ``POST /waves/v1/stt/`` (the SDK's ``transcribe`` parameters)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(
        None, max_length=128, description="ASR model or alias (pulse, pulse-pro).", examples=["pulse"]
    )
    language: str | None = Field(
        None, max_length=35, description="Language code, or multi-* / auto.", examples=["en"]
    )
    word_timestamps: bool = Field(False, description="Include words[] with start/end/confidence.")
    diarize: bool = Field(False, description="Accepted; reported as unsupported in metadata.")
    webhook_url: str | None = Field(
        None, max_length=2048, description="Not available on this deployment (422 when set)."
    )
    webhook_method: Literal["GET", "POST"] | None = None
    webhook_extra: str | None = Field(None, max_length=4096)
    redact_pii: bool = Field(False, description="Accepted; reported as unsupported in metadata.")
    redact_pci: bool = Field(False, description="Accepted; reported as unsupported in metadata.")
    emotion_detection: bool = Field(False, description="Accepted; reported as unsupported in metadata.")
    gender_detection: bool = Field(False, description="Accepted; reported as unsupported in metadata.")
    sample_rate: int | None = Field(None, ge=1000, le=384000, description="Rate of raw PCM input.")
    encoding: Literal["linear16", "pcm_s16le"] | None = Field(
        None, description="Set for headerless PCM input."
    )
    channels: int = Field(1, ge=1, le=8, description="Channels of raw PCM input.")


def query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    """OpenAPI ``parameters`` for a query model, so the document and ``parse_query`` share one definition."""
    schema = model.model_json_schema()
    required = set(schema.get("required", []))
    params = []
    for name, prop in schema["properties"].items():
        prop = dict(prop)
        description = prop.pop("description", None)
        prop.pop("title", None)
        examples = prop.pop("examples", None)
        param: dict[str, Any] = {"name": name, "in": "query", "required": name in required, "schema": prop}
        if description:
            param["description"] = description
        if examples:
            param["example"] = examples[0]
        params.append(param)
    return params


def parse_query(request: Request, model: type[_Q]) -> _Q:
    """Validate the query string against ``model`` in one call (FastAPI's per-parameter path costs ~0.1 ms
    per request on the hottest route); errors become the same 422 as FastAPI's own."""
    try:
        return model.model_validate(dict(request.query_params))
    except ValidationError as exc:
        errors = [{**e, "loc": ("query", *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


@authed.post(
    "/waves/v1/stt/",
    summary="Transcribe an audio file",
    response_model=None,
    responses={200: {"model": WavesTranscription, "description": "The transcript."}, **STT_ERRORS},
    openapi_extra={"parameters": query_parameters(SttQuery), **RAW_AUDIO_BODY},
)
async def waves_stt(request: Request) -> Response:
    q = parse_query(request, SttQuery)
    if q.webhook_url:
        raise InvalidInput(
            "webhook delivery is not available on this deployment; omit webhook_url to get the transcript "
            "in the response",
            param="webhook_url",
        )
    unsupported = [
        name
        for name in ("diarize", "redact_pii", "redact_pci", "emotion_detection", "gender_detection")
        if getattr(q, name)
    ]
    audio = await request.body()
    return await transcribe_raw(
        request.app.state.kubespeech.service, request, audio, model=q.model, language=q.language,
        word_timestamps=q.word_timestamps, sample_rate=q.sample_rate, encoding=q.encoding, channels=q.channels,
        unsupported=unsupported,
    )  # fmt: skip


TTS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: audio_response_doc(
        "The synthesized audio.",
        ["audio/wav", "audio/pcm", "audio/mpeg", "audio/basic", "audio/x-alaw-basic"],
    ),
    **TTS_ERRORS,
}


@authed.post("/waves/v1/tts", summary="Synthesize speech", response_class=Response, responses=TTS_RESPONSES)
async def waves_tts(request: Request, service: Service, body: WavesTtsRequest) -> Response:
    return await synthesize_waves(service, request, body)


def _model_route(path: str, model: str) -> None:
    async def handler(request: Request, service: Service, body: WavesTtsRequest) -> Response:
        return await synthesize_waves(service, request, body, model_override=model)

    authed.post(
        path,
        summary=f"Synthesize speech ({model} route)",
        response_class=Response,
        responses=TTS_RESPONSES,
        operation_id=f"waves_tts_{model.replace('-', '_')}",
    )(handler)


for _path, _model in (
    ("/waves/v1/lightning/get_speech", "lightning"),
    ("/waves/v1/lightning-v2/get_speech", "lightning-v2"),
    ("/waves/v1/lightning-large/get_speech", "lightning-large"),
):
    _model_route(_path, _model)


def voices_body(state: Any, model_name: str | None) -> dict[str, Any]:
    registry = state.registry
    models = [registry.resolve(model_name, "tts")] if model_name else registry.of_task("tts")
    voices = []
    for m in models:
        for v in m.voices:
            voices.append(
                {
                    "voiceId": v.id,
                    "displayName": v.name,
                    "tags": {"language": [v.language] if v.language else [], "gender": v.gender, "accent": None,
                             "age": None, "emotions": [], "usecases": []},
                    "model": m.name,
                }
            )  # fmt: skip
    return {"voices": voices}


@authed.get(
    "/waves/v1/{model}/get_voices",
    summary="List the voices of a TTS model",
    response_model=None,
    responses={
        200: {"model": WavesVoices, "description": "Voices."},
        **error_responses(SmallestError, 401, 404, 503),
    },
)
async def waves_get_voices(
    state: State,
    model: Annotated[
        str,
        Path(max_length=128, description="TTS model or alias (lightning-v3.1).", examples=["lightning-v3.1"]),
    ],
) -> Response:
    return json_response(voices_body(state, model))


@authed.get(
    "/waves/v1/voice/get-all-models",
    summary="List every voice of every TTS model",
    response_model=None,
    responses={200: {"model": WavesVoices, "description": "Voices."}, **error_responses(SmallestError, 401)},
)
async def waves_all_voices(state: State) -> Response:
    return json_response(voices_body(state, None))


def health_body(state: Any) -> dict[str, Any]:
    ok = state.registry.redis_ok
    return {"status": "ok" if ok else "degraded", "redis": {"status": "ok" if ok else "unreachable"}}


@router.get(
    "/waves/v1/health",
    summary="Health of the Waves API",
    response_model=None,
    responses={200: {"model": WavesHealth, "description": "Health (no authentication needed)."}},
)
async def waves_health(state: State) -> Response:
    return json_response(health_body(state))


router.include_router(authed)
