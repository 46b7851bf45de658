"""OpenAI audio routes over real HTTP with no-op workers (the SDK itself runs in test_sdk_e2e.py)."""

from __future__ import annotations

import io

import soundfile

from tests.api.conftest import NOOP_ASR, NOOP_TTS, ApiServer
from tests.audio.conftest import sndfile


def test_models_lists_deployed_models_and_their_aliases(noop_api: ApiServer) -> None:
    with noop_api.client() as c:
        data = c.get("/v1/models").json()
        assert data["object"] == "list"
        ids = {m["id"]: m for m in data["data"]}
        assert ids[NOOP_ASR]["alias_of"] is None and ids[NOOP_TTS]["task"] == "tts"
        for alias, target in (("whisper-1", NOOP_ASR), ("gpt-4o-transcribe", NOOP_ASR), ("tts-1", NOOP_TTS),
                              ("tts-1-hd", NOOP_TTS), ("pulse", NOOP_ASR), ("lightning_v3.1", NOOP_TTS)):  # fmt: skip
            assert ids[alias]["alias_of"] == target
            assert ids[alias]["object"] == "model"
        assert c.get("/v1/models/whisper-1").json()["alias_of"] == NOOP_ASR
        r = c.get("/v1/models/gpt-5")
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "MODEL_NOT_FOUND"
        assert r.json()["error"]["type"] == "invalid_request_error"


def test_transcription_response_formats(noop_api: ApiServer) -> None:
    wav = sndfile("WAV", "PCM_16", seconds=1.0, rate=16000, channels=1)
    with noop_api.client() as c:

        def post(fmt: str, **extra: str) -> object:
            return c.post("/v1/audio/transcriptions", files={"file": ("speech.wav", wav, "audio/wav")},
                          data={"model": "whisper-1", "response_format": fmt, **extra})  # fmt: skip

        r = post("json")
        assert r.json() == {"text": "16000 samples", "usage": {"type": "duration", "seconds": 1.0}}
        assert post("text").text == "16000 samples\n"
        assert post("srt").text == "1\n00:00:00,000 --> 00:00:01,000\n16000 samples\n"
        vtt = post("vtt")
        assert vtt.headers["content-type"].startswith("text/vtt")
        assert vtt.text.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.000\n16000 samples")
        verbose = c.post("/v1/audio/transcriptions", files={"file": ("x", wav)},
                         data={"model": "whisper-1", "response_format": "verbose_json",
                               "timestamp_granularities[]": ["word", "segment"]}).json()  # fmt: skip
        assert verbose["task"] == "transcribe" and verbose["duration"] == 1.0
        assert verbose["words"] == [] and verbose["segments"][0]["text"] == "16000 samples"
        r = post("diarized_json")
        assert r.status_code == 422 and r.json()["error"]["param"] == "response_format"


def test_speech_every_format(noop_api: ApiServer) -> None:
    expected = {"mp3": "audio/mpeg", "opus": "audio/ogg; codecs=opus", "aac": "audio/aac", "flac": "audio/flac",
                "wav": "audio/wav", "pcm": "audio/pcm"}  # fmt: skip
    with noop_api.client() as c:
        for fmt, ctype in expected.items():
            r = c.post("/v1/audio/speech", json={"model": "tts-1", "input": "hello", "voice": "alloy",
                                                 "response_format": fmt})  # fmt: skip
            assert r.status_code == 200, r.text
            assert r.headers["content-type"] == ctype
        r = c.post("/v1/audio/speech", json={"model": "tts-1", "input": "hello", "voice": {"id": "noop"},
                                             "response_format": "flac", "speed": 1.5})  # fmt: skip
        audio, rate = soundfile.read(io.BytesIO(r.content))
        assert rate == 16000 and len(audio) == 5 * 160
        r = c.post("/v1/audio/speech", json={"model": "tts-1", "input": "hi", "voice": "alloy", "speed": 9})
        assert r.status_code == 422 and r.json()["error"]["param"] == "speed"
        r = c.post("/v1/audio/speech", json={"model": "whisper-1", "input": "hi", "voice": "alloy"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "MODEL_NOT_FOUND"
