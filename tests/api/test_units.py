"""Pure parts of the API: key store, model/alias/voice resolution, language codes, subtitles, log stamping."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from kubespeech.api.auth import KeyStore, generate_key, hash_key
from kubespeech.api.middleware import RequestIdFilter, request_id_var
from kubespeech.api.openai_audio import subtitles
from kubespeech.api.registry import ModelRegistry
from kubespeech.api.service import Transcript, normalize_language
from kubespeech.api.settings import ApiAliases, ApiSettings
from kubespeech.errors import InvalidInput, NoWorkers, Unauthorized, UnknownModel, UnknownVoice
from kubespeech.jobs import Keys


def test_key_store_hashes_and_verifies(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# comment\nplain-key\n{hash_key('hashed-key')}\nsha256:nothex\n")
    store = KeyStore(["settings-key"], keys_file)
    for key in ("plain-key", "hashed-key", "settings-key"):
        store.verify(f"Bearer {key}")
    for header in (None, "", "Bearer", "Bearer wrong", "Basic plain-key", "plain-key"):
        with pytest.raises(Unauthorized):
            store.verify(header)
    assert "plain-key" not in repr(store.__dict__) and "hashed-key" not in repr(store.__dict__)
    assert generate_key() != generate_key()


def test_no_keys_refuses_everything_unless_anonymous_is_allowed() -> None:
    with pytest.raises(Unauthorized):
        KeyStore([]).verify("Bearer anything")
    KeyStore([], allow_anonymous=True).verify(None)


def registry(tmp_path: Path, models: list[dict[str, object]], **aliases: object) -> ModelRegistry:
    path = tmp_path / "models.json"
    path.write_text(json.dumps(models))
    settings = ApiSettings(models_file=path, aliases=ApiAliases(**aliases))  # type: ignore[arg-type]
    return ModelRegistry(settings, None, Keys())


def test_resolution_of_models_aliases_and_voices(tmp_path: Path) -> None:
    reg = registry(
        tmp_path,
        [
            {"name": "whisper-small", "task": "asr"},
            {"name": "parakeet", "task": "asr", "default": True, "aliases": ["fast-asr"]},
            {
                "name": "piper",
                "task": "tts",
                "default": True,
                "voices": ["joe", {"id": "amy", "name": "Amy"}],
            },
        ],
    )
    assert reg.resolve(None, "asr").name == "parakeet"
    assert reg.resolve("whisper-1", "asr").name == "parakeet"  # client default -> deployment default
    assert reg.resolve("pulse", "asr").name == "parakeet"
    assert reg.resolve("fast-asr", "asr").name == "parakeet"
    assert reg.resolve("whisper-small", "asr").name == "whisper-small"
    assert reg.resolve("lightning_v3.1", "tts").name == "piper"
    with pytest.raises(UnknownModel):
        reg.resolve("gpt-5", "asr")
    with pytest.raises(UnknownModel):
        reg.resolve("piper", "asr")  # a TTS model is not an ASR model
    piper = reg.resolve(None, "tts")
    assert reg.resolve_voice(piper, None) == "joe"
    assert reg.resolve_voice(piper, "AMY") == "amy"
    assert reg.resolve_voice(piper, "alloy") == "joe"  # OpenAI default voices map to the default voice
    with pytest.raises(UnknownVoice):
        reg.resolve_voice(piper, "nobody")
    assert reg.enabled_tasks() == ["asr", "tts"]
    assert "whisper-1" in reg.aliases_of(reg.resolve(None, "asr"))


def test_configured_defaults_and_empty_deployments(tmp_path: Path) -> None:
    reg = registry(
        tmp_path, [{"name": "a", "task": "asr"}, {"name": "b", "task": "asr"}], default_asr_model="b"
    )
    assert reg.resolve(None, "asr").name == "b"
    with pytest.raises(NoWorkers):
        reg.resolve("tts-1", "tts")  # a client default name while no TTS model is deployed: 503, not 404


def test_language_codes() -> None:
    assert normalize_language("en-US") == "en"
    assert normalize_language("multi-eu") is None
    assert normalize_language("auto") is None
    assert normalize_language(None) is None
    for bad in ("e n", "english!", "x" * 40, "1"):
        with pytest.raises(InvalidInput):
            normalize_language(bad)


def test_subtitles() -> None:
    t = Transcript("m", "Hello there. General Kenobi.", "en", 3.5, [],
                   [{"text": " Hello there.", "start": 0.0, "end": 1.25},
                    {"text": " General Kenobi.", "start": 1.25, "end": 3661.5}], "wav", 16000, 1, 10, 1.0)  # fmt: skip
    assert subtitles(t, "srt") == (
        "1\n00:00:00,000 --> 00:00:01,250\nHello there.\n\n2\n00:00:01,250 --> 01:01:01,500\nGeneral Kenobi.\n"
    )
    assert subtitles(t, "vtt").startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.250\nHello there.\n")


def test_log_records_carry_the_request_id() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "msg", None, None)
    token = request_id_var.set("req-1")
    try:
        RequestIdFilter().filter(record)
    finally:
        request_id_var.reset(token)
    assert record.request_id == "req-1"  # type: ignore[attr-defined]
