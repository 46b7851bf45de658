"""The official clients, unmodified, against the API with real CPU engines (whisper tiny.en, piper joe):
smallestai TTS -> WAV -> STT (WER <= 15 %), and openai speech -> transcriptions in every response format.
The deployment's defaults are the real models, so the clients' own default names (pulse, lightning_v3.1,
whisper-1, tts-1, alloy) exercise the alias mapping."""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator

import jiwer
import pytest
import soundfile

from tests.api.conftest import API_KEY, PIPER, WHISPER, ApiServer, Workers, api_settings, start_api, wait_live
from tests.conftest import RedisServer

os.environ["SMALLESTAI_TELEMETRY"] = "0"

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call me back tomorrow morning before lunch.",
    "Kubernetes schedules the speech workers on every node.",
    "The weather is lovely in the spring.",
]


def normalize(text: str) -> str:
    text = re.sub(r"[^a-z0-9' ]+", " ", text.lower())
    return " ".join(text.split())


@pytest.fixture(scope="module")
def real_api(
    api_redis: RedisServer, real_workers: Workers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ApiServer]:
    models = [
        {"name": WHISPER, "task": "asr", "default": True},
        {"name": PIPER, "task": "tts", "default": True, "voices": ["joe"]},
    ]
    server = start_api(api_settings(api_redis.url, models, tmp_path_factory.mktemp("real"),
                                    limits={"request_timeout_s": 60.0}))  # fmt: skip
    wait_live(server, [WHISPER, PIPER])
    yield server
    server.stop()


def test_smallestai_sdk_tts_then_stt(real_api: ApiServer) -> None:
    from smallestai import SmallestAI
    from smallestai.environment import SmallestAIEnvironment
    from smallestai.waves.helpers import synthesize_bytes

    ws = real_api.url.replace("http://", "ws://")
    env = SmallestAIEnvironment(atoms=real_api.url, waves=real_api.url, waves_ws=ws, payment=real_api.url)
    client = SmallestAI(environment=env, api_key=API_KEY, max_retries=0)

    health = client.waves.ops.get_waves_health()
    assert health.status == "ok"
    voices = client.waves.get_voices("lightning-v3.1")
    assert [v.voice_id for v in voices.voices or []] == ["joe"]

    refs, hyps = [], []
    for i, sentence in enumerate(SENTENCES):
        audio = synthesize_bytes(client, sentence, voice_id="emily", sample_rate=16000, output_format="wav")
        data, rate = soundfile.read(io.BytesIO(audio))
        assert rate == 16000 and len(data) / rate > 1.0
        result = client.waves.speech_to_text.transcribe(
            model="pulse", language="en", request=audio, word_timestamps=(i == 0)
        )
        assert result.status == "success"
        assert result.metadata.duration == pytest.approx(len(data) / rate, abs=0.01)
        if i == 0:
            assert result.words and all(w.end >= w.start for w in result.words)
            assert result.words[-1].end <= result.metadata.duration + 0.5
        refs.append(normalize(sentence))
        hyps.append(normalize(result.transcription))
    wer = jiwer.wer(refs, hyps)
    assert wer <= 0.15, (wer, hyps)


def test_openai_sdk_speech_then_transcriptions(real_api: ApiServer) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=real_api.url + "/v1", api_key=API_KEY, max_retries=0)
    ids = {m.id for m in client.models.list()}
    assert {WHISPER, PIPER, "whisper-1", "tts-1", "gpt-4o-mini-tts"} <= ids

    sentence = SENTENCES[0]
    speech = client.audio.speech.create(model="tts-1", voice="alloy", input=sentence, response_format="mp3")
    mp3 = speech.read()
    assert mp3[:3] == b"ID3" or mp3[0] == 0xFF

    def tr(**kw: object) -> object:
        return client.audio.transcriptions.create(model="whisper-1", file=("speech.mp3", mp3), **kw)

    as_json = tr()
    assert jiwer.wer(normalize(sentence), normalize(as_json.text)) <= 0.15
    text = tr(response_format="text")
    assert isinstance(text, str) and normalize(text) == normalize(as_json.text)
    verbose = tr(response_format="verbose_json", timestamp_granularities=["word", "segment"])
    assert verbose.language and verbose.duration > 1.0
    assert len(verbose.words) >= 7
    assert [w.start for w in verbose.words] == sorted(w.start for w in verbose.words)
    assert verbose.segments and verbose.segments[0].end > verbose.segments[0].start
    srt = tr(response_format="srt")
    assert isinstance(srt, str)
    assert re.match(r"^1\n\d\d:\d\d:\d\d,\d{3} --> \d\d:\d\d:\d\d,\d{3}\n\S", srt)
