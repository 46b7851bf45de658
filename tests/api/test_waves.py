"""Smallest Waves v1 and legacy self-host routes over real HTTP, real Redis and real no-op workers."""

from __future__ import annotations

import io

import numpy as np
import soundfile

from tests.api.conftest import NOOP_ASR, NOOP_TTS, ApiServer
from tests.audio.conftest import ffmpeg_file, sndfile


def wav16k(seconds: float = 1.0) -> bytes:
    return sndfile("WAV", "PCM_16", seconds=seconds, rate=16000, channels=1)


def test_stt_raw_body_any_format(noop_api: ApiServer) -> None:
    with noop_api.client() as c:
        for data, fmt in (
            (wav16k(1.0), "wav"),
            (ffmpeg_file("mp3", "libmp3lame", 1.0, 44100), "mp3"),
            (sndfile("FLAC", "PCM_16", seconds=1.0), "flac"),
        ):
            r = c.post("/waves/v1/stt/?model=pulse&language=en", content=data,
                       headers={"Content-Type": "application/octet-stream"})  # fmt: skip
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["status"] == "success"
            assert body["metadata"]["model"] == NOOP_ASR
            assert body["metadata"]["source_format"] == fmt
            assert body["metadata"]["fileSize"] == len(data)
            assert abs(body["audio_length"] - 1.0) < 0.08
            # The no-op engine reports the samples it got: the API sent 16 kHz mono.
            samples = int(body["transcription"].split()[0])
            assert abs(samples - 16000) < 1300
            assert r.headers["x-request-id"] == body["request_id"]


def test_stt_raw_pcm_needs_encoding_and_rate(noop_api: ApiServer) -> None:
    pcm = np.zeros(8000, dtype="<i2").tobytes()
    with noop_api.client() as c:
        r = c.post("/waves/v1/stt/?encoding=linear16&sample_rate=8000", content=pcm)
        assert r.status_code == 200, r.text
        assert r.json()["transcription"] == "16000 samples"
        r = c.post("/waves/v1/stt/", content=pcm, headers={"Content-Type": "audio/L16; rate=8000"})
        assert r.status_code == 200 and r.json()["transcription"] == "16000 samples"
        r = c.post("/waves/v1/stt/?encoding=linear16", content=pcm)
        assert r.status_code == 422 and r.json()["error"]["code"] == "INVALID_PARAMETER"


def test_stt_unsupported_options_are_reported_and_webhooks_refused(noop_api: ApiServer) -> None:
    with noop_api.client() as c:
        r = c.post("/waves/v1/stt/?diarize=true&redact_pii=true&word_timestamps=true", content=wav16k())
        assert r.status_code == 200
        assert r.json()["metadata"]["unsupported_features"] == ["diarize", "redact_pii"]
        r = c.post("/waves/v1/stt/?webhook_url=https://example.invalid/cb", content=wav16k())
        assert r.status_code == 422
        assert r.json()["error"]["code"] == "INVALID_PARAMETER"


def test_tts_formats_rates_and_headers(noop_api: ApiServer) -> None:
    expected = {"wav": "audio/wav", "pcm": "audio/pcm", "mp3": "audio/mpeg", "mulaw": "audio/basic",
                "ulaw": "audio/basic", "alaw": "audio/x-alaw-basic"}  # fmt: skip
    with noop_api.client() as c:
        for fmt, ctype in expected.items():
            r = c.post("/waves/v1/tts", json={"text": "hello there", "voice_id": "emily", "output_format": fmt,
                                              "sample_rate": 8000, "request_id": "abc-1", "session_id": "s.2"})  # fmt: skip
            assert r.status_code == 200, r.text
            assert r.headers["content-type"] == ctype
            assert r.headers["x-sample-rate"] == "8000"
            assert r.headers["x-external-request-id"] == "abc-1"
            assert r.headers["x-external-session-id"] == "s.2"
            assert len(r.content) > 0
        # 11 characters -> 0.11 s of silence from the no-op engine, resampled to 24 kHz WAV.
        r = c.post(
            "/waves/v1/tts", json={"text": "hello there", "sample_rate": 24000, "output_format": "wav"}
        )
        audio, rate = soundfile.read(io.BytesIO(r.content))
        assert rate == 24000 and abs(len(audio) - 0.11 * 24000) < 50


def test_tts_format_from_accept_header_else_wav(noop_api: ApiServer) -> None:
    with noop_api.client() as c:
        r = c.post("/waves/v1/tts", json={"text": "hi"}, headers={"Accept": "audio/mpeg"})
        assert r.headers["content-type"] == "audio/mpeg"
        r = c.post("/waves/v1/tts", json={"text": "hi"})
        assert r.headers["content-type"] == "audio/wav"
        assert r.content[:4] == b"RIFF"


def test_model_specific_tts_routes(noop_api: ApiServer) -> None:
    with noop_api.client() as c:
        for path in ("/waves/v1/lightning/get_speech", "/waves/v1/lightning-v2/get_speech",
                     "/waves/v1/lightning-large/get_speech", "/api/v1/lightning-v2/get_speech"):  # fmt: skip
            r = c.post(path, json={"text": "hi", "voice_id": "emily", "output_format": "wav"})
            assert r.status_code == 200, (path, r.text)
            assert r.content[:4] == b"RIFF"


def test_voices_listing(noop_api: ApiServer) -> None:
    with noop_api.client() as c:
        for path in ("/waves/v1/lightning-v3.1/get_voices", f"/waves/v1/{NOOP_TTS}/get_voices",
                     "/waves/v1/voice/get-all-models"):  # fmt: skip
            r = c.get(path)
            assert r.status_code == 200, r.text
            voices = r.json()["voices"]
            assert {"voiceId": "noop", "displayName": "Silence"}.items() <= voices[0].items()
            assert voices[0]["model"] == NOOP_TTS
        r = c.get("/waves/v1/no-such-model/get_voices")
        assert r.status_code == 404 and r.json()["error"]["code"] == "MODEL_NOT_FOUND"


def test_unknown_voice_is_404_but_client_default_voices_are_aliases(noop_api: ApiServer) -> None:
    with noop_api.client() as c:
        assert c.post("/waves/v1/tts", json={"text": "hi", "voice_id": "alloy"}).status_code == 200
        assert c.post("/waves/v1/tts", json={"text": "hi", "voice_id": "noop"}).status_code == 200
        r = c.post("/waves/v1/tts", json={"text": "hi", "voice_id": "nobody-here"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "VOICE_NOT_FOUND"


def test_health_routes_need_no_key(noop_api: ApiServer) -> None:
    import httpx

    with httpx.Client(base_url=noop_api.url) as c:
        for path in ("/waves/v1/health", "/api/v1/health"):
            r = c.get(path)
            assert r.status_code == 200 and r.json() == {"status": "ok", "redis": {"status": "ok"}}


def test_legacy_get_text_raw_and_multipart(noop_api: ApiServer) -> None:
    with noop_api.client() as c:
        r = c.post("/api/v1/lightning/get_text?language=en", content=wav16k(0.5))
        assert r.status_code == 200 and r.json()["transcription"] == "8000 samples"
        r = c.post("/api/v1/lightning/get_text", files={"file": ("a.bin", wav16k(0.5))},
                   data={"language": "en", "word_timestamps": "true"})  # fmt: skip
        assert r.status_code == 200 and r.json()["transcription"] == "8000 samples"
        r = c.post("/api/v1/lightning/get_text", data={"language": "en"}, files={"other": ("a", b"x")})
        assert r.status_code == 422
        # The legacy self-host "Token" scheme is accepted too.
        r = c.post("/api/v1/lightning/get_text", content=wav16k(0.5),
                   headers={"Authorization": f"Token {noop_api.key}"})  # fmt: skip
        assert r.status_code == 200
