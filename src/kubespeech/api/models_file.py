"""models.json, the API's list of served models: one typed format, one writer (the operator) and one reader.

The operator renders it into the stack's ConfigMap from the SpeechDeployment's pools; ``kubespeech dev`` gets
it from the same builders; the API server's model registry reads it. Languages are not in it: a worker
announces what its engine understands, and the registry takes them from there.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError


class VoiceEntry(BaseModel):
    """A voice with details; a bare string in ``voices`` is a voice whose id is also its name."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    name: str | None = None
    language: str | None = None
    gender: str | None = None


class ModelEntry(BaseModel):
    """One served model: a queue that workers of one pool (or of several pools sharing it) pull from."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="The model name clients ask for and the queue's name.")
    task: Literal["asr", "tts"]
    default: bool = Field(False, description="The task's default model (requests that name none).")
    aliases: list[str] = Field(default_factory=list, description="Other names clients may use for it.")
    voices: list[str | VoiceEntry] = Field(default_factory=list, description="TTS voices it speaks.")
    cold_start_wait_s: float | None = Field(
        None, ge=0, le=600, description="How long a request waits for a pool scaled to zero to start."
    )


_ENTRIES = TypeAdapter(list[ModelEntry])


def dump_models_file(entries: Iterable[ModelEntry]) -> str:
    """The file's text: a JSON list, keys sorted, unset optional fields left out (stable for a ConfigMap)."""
    items = [e.model_dump(exclude_none=True) for e in entries]
    return orjson.dumps(items, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode() + "\n"


def load_models_file(data: bytes) -> list[ModelEntry]:
    """Parse the file (a list, or ``{"models": [...]}``); ValueError naming the bad entry and field."""
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"models file is not JSON: {exc}") from None
    if isinstance(raw, dict):
        if "models" not in raw:
            raise ValueError("models file: expected a list of entries, or an object with a 'models' list")
        raw = raw["models"]
    try:
        entries = _ENTRIES.validate_python(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"models file: entry {where}: {first['msg']}") from None
    names = [e.name for e in entries]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"models file: model {duplicates[0]!r} is listed twice")
    return entries
