"""Smallest self-host legacy routes, kept as aliases of the Waves v1 handlers for existing deployments."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile
from starlette.responses import Response

from kubespeech.api.deps import Service, State, require_key
from kubespeech.api.waves import (
    STT_ERRORS,
    TTS_RESPONSES,
    WavesHealth,
    WavesTranscription,
    WavesTtsRequest,
    health_body,
    json_response,
    parse_query,
    query_parameters,
    synthesize_waves,
    transcribe_raw,
)
from kubespeech.errors import InvalidInput

router = APIRouter(tags=["Smallest self-host (legacy)"])
authed = APIRouter(tags=["Smallest self-host (legacy)"], dependencies=[Depends(require_key)])

_GET_TEXT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "The audio as the raw body, or as the `file` part of a multipart form.",
        "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "language": {"type": "string", "maxLength": 35},
                        "word_timestamps": {"type": "boolean"},
                        "model": {"type": "string", "maxLength": 128},
                    },
                }
            },
        },
    }
}

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", ""}


def _form_bool(value: Any, name: str) -> bool | None:
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InvalidInput(f"{name} must be true or false", param=name)


class GetTextQuery(BaseModel):
    """Query parameters of the legacy ``get_text`` route (form fields override them for multipart)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, max_length=128, description="ASR model or alias.")
    language: str | None = Field(None, max_length=35, description="Language code.", examples=["en"])
    word_timestamps: bool = False
    sample_rate: int | None = Field(None, ge=1000, le=384000, description="Rate of raw PCM input.")
    encoding: Literal["linear16", "pcm_s16le"] | None = Field(None, description="Set for headerless PCM.")
    channels: int = Field(1, ge=1, le=8)


@authed.post(
    "/api/v1/lightning/get_text",
    summary="Transcribe audio (legacy self-host route)",
    response_model=None,
    responses={200: {"model": WavesTranscription, "description": "The transcript."}, **STT_ERRORS},
    openapi_extra={"parameters": query_parameters(GetTextQuery), **_GET_TEXT_BODY},
)
async def legacy_get_text(request: Request) -> Response:
    q = parse_query(request, GetTextQuery)
    model, language, word_timestamps = q.model, q.language, q.word_timestamps
    content_type = request.headers.get("content-type", "")
    if content_type.lower().startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=20)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidInput("the multipart form needs a 'file' part with the audio", param="file")
        audio = await upload.read()
        lang_field = form.get("language")
        if isinstance(lang_field, str) and lang_field:
            if len(lang_field) > 35:
                raise InvalidInput("language is longer than 35 characters", param="language")
            language = lang_field
        model_field = form.get("model")
        if isinstance(model_field, str) and model_field:
            if len(model_field) > 128:
                raise InvalidInput("model is longer than 128 characters", param="model")
            model = model_field
        wt = _form_bool(form.get("word_timestamps"), "word_timestamps")
        if wt is not None:
            word_timestamps = wt
    else:
        audio = await request.body()
    return await transcribe_raw(
        request.app.state.kubespeech.service, request, audio, model=model, language=language,
        word_timestamps=word_timestamps, sample_rate=q.sample_rate, encoding=q.encoding, channels=q.channels,
        unsupported=[], surface="legacy",
    )  # fmt: skip


@authed.post(
    "/api/v1/lightning-v2/get_speech",
    summary="Synthesize speech (legacy self-host route)",
    response_class=Response,
    responses=TTS_RESPONSES,
)
async def legacy_get_speech(request: Request, service: Service, body: WavesTtsRequest) -> Response:
    return await synthesize_waves(service, request, body, model_override="lightning-v2")


@router.get(
    "/api/v1/health",
    summary="Health (legacy self-host route)",
    response_model=None,
    responses={200: {"model": WavesHealth, "description": "Health (no authentication needed)."}},
)
async def legacy_health(state: State) -> Response:
    return json_response(health_body(state))


router.include_router(authed)
