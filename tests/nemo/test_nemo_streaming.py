"""NeMo streaming sessions on the trained tiny CTC model: partials, finals at pauses, flush, resume, garbage."""

from __future__ import annotations

from pathlib import Path

import jiwer
import numpy as np
import pytest

from kubespeech.engines.base import AsrStream, StreamEvent, StreamingAsrEngine
from kubespeech.engines.nemo_asr import NemoAsrEngine
from kubespeech.errors import InvalidInput
from tests.nemo.conftest import Speech

RATE = 16000
CHUNK = 2048  # samples: one 4096-byte frame of 16-bit PCM, as a live client sends it
PICK = [1, 3, 4]  # "open the door", "turn on the light", "play some music"


@pytest.fixture(scope="module")
def engine(trained_ctc_model: Path) -> NemoAsrEngine:
    engine = NemoAsrEngine(model_path=str(trained_ctc_model))
    engine.load()
    return engine


@pytest.fixture(scope="module")
def conversation(speech: Speech) -> tuple[np.ndarray, list[str], list[tuple[int, int]]]:
    """Three trained phrases with 0.8 s pauses; returns audio, texts and each phrase's (start, end) sample."""
    gap = np.zeros(int(0.8 * RATE), dtype=np.float32)
    pieces, spans = [gap[:4000]], []
    for i in PICK:
        offset = sum(len(p) for p in pieces)
        spans.append((offset, offset + len(speech.at_16k[i])))
        pieces += [speech.at_16k[i], gap]
    return np.concatenate(pieces), [speech.texts[i] for i in PICK], spans


def feed(stream: AsrStream, audio: np.ndarray, start: int = 0) -> list[tuple[StreamEvent, int]]:
    """(event, stream samples accepted when it came out) for every event."""
    out = []
    for i in range(0, len(audio), CHUNK):
        chunk = audio[i : i + CHUNK]
        out += [(e, start + i + len(chunk)) for e in stream.accept(chunk)]
    return out


def test_partials_then_a_final_at_each_pause(
    engine: NemoAsrEngine, conversation: tuple[np.ndarray, list[str], list[tuple[int, int]]]
) -> None:
    audio, texts, spans = conversation
    assert isinstance(engine, StreamingAsrEngine)
    stream = engine.open_stream(word_timestamps=True, eou_timeout_ms=500)
    assert isinstance(stream, AsrStream)
    emitted = feed(stream, audio)
    assert stream.close() == []  # every phrase was final before the end
    finals = [(e, at) for e, at in emitted if e.kind == "final"]
    assert jiwer.wer(texts, [e.text for e, _ in finals]) <= 0.25, [e.text for e, _ in emitted]
    for (final, at), (start, end) in zip(finals, spans, strict=True):
        assert end < at <= end + int(0.8 * RATE)  # at the pause that follows the phrase
        assert final.words and abs(final.words[0].start - start / RATE) < 0.5
        assert final.start <= final.words[0].start and final.words[-1].end <= final.end + 0.05
    partials = [(e, at) for e, at in emitted if e.kind == "partial"]
    assert partials and all(e.words == [] for e, _ in partials)
    assert partials[0][1] < spans[0][1] + int(0.3 * RATE), "first partial only after the first phrase"
    with pytest.raises(InvalidInput):
        stream.accept(audio[:CHUNK])
    with pytest.raises(InvalidInput):
        engine.open_stream(eou_timeout_ms=10)


def test_finalize_flushes_and_a_resumed_stream_continues(
    engine: NemoAsrEngine, conversation: tuple[np.ndarray, list[str], list[tuple[int, int]]]
) -> None:
    audio, texts, spans = conversation
    # finalize() right at the end of the first phrase's audio: no pause has been heard, yet it is final.
    stream = engine.open_stream()
    flush_at = spans[0][1] // CHUNK * CHUNK + CHUNK
    assert [e for e, _ in feed(stream, audio[:flush_at]) if e.kind == "final"] == []
    [flushed] = stream.finalize()
    assert flushed.kind == "final" and jiwer.wer(texts[0], flushed.text) <= 0.34, flushed.text
    assert stream.committed_samples == flush_at
    # The worker dies in the middle of the second phrase; a new one resumes from the committed point.
    crash = (spans[1][0] + spans[1][1]) // 2
    feed(stream, audio[flush_at:crash], start=flush_at)
    committed = stream.committed_samples
    assert flush_at <= committed <= spans[1][0]
    resumed = engine.open_stream(word_timestamps=True, start_sample=committed)
    rest = [e for e, _ in feed(resumed, audio[committed:], start=committed) if e.kind == "final"]
    rest += resumed.close()
    assert jiwer.wer(texts[1:], [e.text for e in rest]) <= 0.25, [e.text for e in rest]
    assert abs(rest[0].words[0].start - spans[1][0] / RATE) < 0.5  # the original stream's time base


def test_noise_and_silence_do_not_crash_or_ramble(engine: NemoAsrEngine) -> None:
    rng = np.random.default_rng(0)
    garbage = np.concatenate(
        [
            np.zeros(RATE, dtype=np.float32),
            (rng.standard_normal(3 * RATE) * 0.1).astype(np.float32),
            np.zeros(RATE, dtype=np.float32),
        ]
    )
    stream = engine.open_stream()
    events = [e for e, _ in feed(stream, garbage)] + stream.close()
    # The tiny model knows six phrases; noise must not become more than a couple of words of one.
    assert sum(len(e.text.split()) for e in events if e.kind == "final") <= 4, [e.text for e in events]
    # All but the trailing quiet kept as onset context is settled.
    assert len(garbage) - RATE <= stream.committed_samples <= len(garbage)
