"""Engine test helpers: the real piper and whisper engines (one load per test module) and WER scoring."""

from __future__ import annotations

import re
from collections.abc import Iterator

import jiwer
import numpy as np
import pytest
import soxr

from kubespeech.engines.base import Audio, TtsRequest, TtsResult
from kubespeech.engines.piper import PiperEngine
from kubespeech.engines.whisper import WhisperEngine

# Plain sentences without numerals or names, so the score measures recognition, not number formatting.
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "My favorite color is green and I like to eat apples.",
    "The weather today is sunny with a light breeze from the west.",
    "We will meet at the train station early tomorrow morning.",
    "Turn left at the next corner and drive slowly through the village.",
]


def normalize(text: str) -> str:
    """Lowercase, drop punctuation (apostrophes and hyphens join, other marks split), squeeze spaces."""
    text = re.sub(r"['\u2019-]", "", text.lower())
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


def wer(references: list[str], hypotheses: list[str]) -> float:
    return float(jiwer.wer([normalize(r) for r in references], [normalize(h) for h in hypotheses]))


def to_16k(audio: Audio, rate: int) -> Audio:
    return np.asarray(soxr.resample(audio, rate, 16000), dtype=np.float32)


@pytest.fixture(scope="module")
def piper() -> Iterator[PiperEngine]:
    engine = PiperEngine()
    engine.load()
    yield engine


@pytest.fixture(scope="module")
def whisper() -> Iterator[WhisperEngine]:
    engine = WhisperEngine()
    engine.load()
    yield engine


@pytest.fixture(scope="module")
def spoken(piper: PiperEngine) -> list[Audio]:
    """SENTENCES spoken by the joe voice, resampled to whisper's 16 kHz."""
    results = piper.synthesize_batch([TtsRequest(text=s) for s in SENTENCES])
    audio: list[Audio] = []
    for result in results:
        assert isinstance(result, TtsResult), result
        audio.append(to_16k(result.audio, result.sample_rate))
    return audio
