"""The nemo TTS engine called directly on a tiny FastPitch + HiFi-GAN pair: batching, lengths, voices, streaming."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from kubespeech.engines.base import TtsEngine, TtsRequest, TtsResult
from kubespeech.engines.nemo_tts import NemoTtsEngine, split_sentences
from kubespeech.errors import EmptyInput, InvalidInput, TextTooLong, UnknownVoice
from tests.nemo.conftest import TtsModels

HOP = 256
FRAMES_PER_TOKEN = 4  # what save_tts biases the tiny duration predictor to


@pytest.fixture(scope="module")
def engine(tts_models: TtsModels) -> NemoTtsEngine:
    eng = NemoTtsEngine(
        model_path=str(tts_models.fastpitch), vocoder_path=str(tts_models.hifigan), max_text_chars=200
    )
    eng.load()
    return eng


def token_count(engine: NemoTtsEngine, text: str) -> int:
    return int(engine.spec_gen.parse(text)[0].numel())


def test_a_batch_is_one_pass_and_each_item_has_its_own_length(engine: NemoTtsEngine) -> None:
    assert isinstance(engine, TtsEngine)
    texts = ["Hi.", "A somewhat longer sentence to speak.", "Hi.", "Middle length text."]
    requests = [
        TtsRequest(text=texts[0]),
        TtsRequest(text=texts[1], voice="speaker-2"),
        TtsRequest(text=texts[2], speed=2.0),
        TtsRequest(text=texts[3], voice="speaker-1"),
    ]
    results = engine.synthesize_batch(requests)
    assert engine.last_batch_sizes == [4], "all four texts must go through FastPitch and HiFi-GAN together"
    audio = [r.audio for r in results if isinstance(r, TtsResult)]
    assert len(audio) == 4 and all(r.sample_rate == 22050 for r in results if isinstance(r, TtsResult))
    for clip, text, request in zip(audio, texts, requests, strict=True):
        expected = token_count(engine, text) * FRAMES_PER_TOKEN / request.speed * HOP
        assert abs(len(clip) - expected) <= 2 * HOP, (text, len(clip), expected)
        assert clip.dtype == np.float32 and np.isfinite(clip).all() and np.abs(clip).max() <= 1.0
    # Padding a short item to the batch's longest must not change its audio, except in the last few frames
    # where HiFi-GAN's receptive field reaches into the (silent) padding.
    alone = engine.synthesize_batch([TtsRequest(text=texts[0])])[0]
    assert isinstance(alone, TtsResult) and len(alone.audio) == len(audio[0])
    edge = 8 * HOP
    np.testing.assert_allclose(alone.audio[:-edge], audio[0][:-edge], atol=1e-3)


def test_bad_items_fail_alone(engine: NemoTtsEngine) -> None:
    results = engine.synthesize_batch(
        [
            TtsRequest(text="Fine."),
            TtsRequest(text="   "),
            TtsRequest(text="Hello", voice="nobody"),
            TtsRequest(text="x" * 201),
            TtsRequest(text="Too fast", speed=9.0),
            TtsRequest(text="Also fine."),
        ]
    )
    assert [type(r) for r in results] == [
        TtsResult,
        EmptyInput,
        UnknownVoice,
        TextTooLong,
        InvalidInput,
        TtsResult,
    ]
    assert engine.last_batch_sizes == [2]


def test_speakers_are_voices(engine: NemoTtsEngine, tts_models: TtsModels) -> None:
    assert [v.id for v in engine.voices()] == ["speaker-0", "speaker-1", "speaker-2"]
    named = NemoTtsEngine(
        model_path=str(tts_models.directory), voices=["ava", "ben", "cy"], default_voice="ben", warmup=False
    )
    named.load()
    assert [v.id for v in named.voices()] == ["ava", "ben", "cy"]
    by_default, by_name = named.synthesize_batch(
        [TtsRequest(text="Same words."), TtsRequest(text="Same words.", voice="ben")]
    )
    assert isinstance(by_default, TtsResult) and isinstance(by_name, TtsResult)
    np.testing.assert_allclose(by_default.audio, by_name.audio, atol=1e-4)
    info = named.describe()
    assert info["vocoder"] == "hifigan" and info["model"] == "fastpitch"
    with pytest.raises(InvalidInput, match="outside"):
        NemoTtsEngine(model_path=str(tts_models.directory), voices={"x": 7}, warmup=False).load()


def test_output_can_be_resampled(tts_models: TtsModels, engine: NemoTtsEngine) -> None:
    at_16k = NemoTtsEngine(model_path=str(tts_models.directory), output_sample_rate=16000, warmup=False)
    at_16k.load()
    result = at_16k.synthesize_batch([TtsRequest(text="Resample me.")])[0]
    native = engine.synthesize_batch([TtsRequest(text="Resample me.")])[0]
    assert isinstance(result, TtsResult) and isinstance(native, TtsResult)
    assert result.sample_rate == 16000 and at_16k.sample_rate == 16000
    assert abs(len(result.audio) - len(native.audio) * 16000 / 22050) <= 2


def test_streaming_yields_one_chunk_per_sentence(engine: NemoTtsEngine) -> None:
    text = "First sentence here. Second one! A third? And the fourth."
    sentences = split_sentences(text)
    assert sentences == ["First sentence here.", "Second one!", "A third?", "And the fourth."]
    chunks = list(engine.synthesize_stream(TtsRequest(text=text)))
    assert len(chunks) == 4
    for chunk, sentence in zip(chunks, sentences, strict=True):
        assert abs(len(chunk) - token_count(engine, sentence) * FRAMES_PER_TOKEN * HOP) <= 2 * HOP
    with pytest.raises(EmptyInput):
        list(engine.synthesize_stream(TtsRequest(text="  ")))


def test_long_sentences_are_cut_at_spaces() -> None:
    pieces = split_sentences("word " * 100, max_chars=50)
    assert all(len(p) <= 50 for p in pieces) and " ".join(pieces) == ("word " * 100).strip()


def test_text_is_normalized_when_nemo_text_processing_is_installed(
    tts_models: TtsModels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # nemo_text_processing (pynini, 650 MB) is not installed here: a minimal stand-in with its interface
    # checks that the engine finds it, builds it for the voice's language and calls it before tokenizing.
    package = tmp_path / "nemo_text_processing" / "text_normalization"
    package.mkdir(parents=True)
    (package.parent / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "normalize.py").write_text(
        "class Normalizer:\n"
        "    def __init__(self, input_case, lang):\n"
        "        assert (input_case, lang) == ('cased', 'en')\n"
        "    def normalize(self, text, punct_post_process=False):\n"
        "        return text.replace('5', 'five')\n"
    )
    plain = NemoTtsEngine(model_path=str(tts_models.directory), warmup=False)
    plain.load()
    unread = plain.synthesize_batch([TtsRequest(text="5")])[0]
    # The character tokenizer drops the digit: only the padding spaces around it are spoken.
    assert (
        isinstance(unread, TtsResult) and len(unread.audio) == token_count(plain, "") * FRAMES_PER_TOKEN * HOP
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        normalizing = NemoTtsEngine(model_path=str(tts_models.directory), warmup=False)
        normalizing.load()
    finally:  # later engines in this session must not find the stand-in
        for name in [m for m in sys.modules if m.startswith("nemo_text_processing")]:
            del sys.modules[name]
    assert normalizing.describe()["text_normalization"] is True
    result = normalizing.synthesize_batch([TtsRequest(text="5")])[0]
    assert isinstance(result, TtsResult)
    assert len(result.audio) == token_count(normalizing, "five") * FRAMES_PER_TOKEN * HOP
