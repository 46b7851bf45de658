"""The whisper engine on speech synthesized by piper: accuracy, word timestamps, per-item errors, the streaming VAD."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from faster_whisper.vad import get_vad_model

from kubespeech.engines.base import AsrEngine, AsrRequest, AsrResult, Audio
from kubespeech.engines.registry import EngineSpec, load_engine
from kubespeech.engines.whisper import StreamingVad, WhisperEngine, default_model_path
from kubespeech.errors import EmptyInput, EngineError, InvalidInput, UnknownModel
from tests.engines.conftest import SENTENCES, normalize, wer

RATE = 16000


@pytest.fixture(scope="module")
def transcripts(whisper: WhisperEngine, spoken: list[Audio]) -> list[AsrResult]:
    started = time.perf_counter()
    results = whisper.transcribe_batch([AsrRequest(audio=a, word_timestamps=True) for a in spoken])
    elapsed = time.perf_counter() - started
    audio_s = sum(len(a) for a in spoken) / RATE
    print(f"\nwhisper: {audio_s:.1f} s of speech in {elapsed:.2f} s (RTF {elapsed / audio_s:.3f})")
    assert all(isinstance(r, AsrResult) for r in results), results
    return [r for r in results if isinstance(r, AsrResult)]


def test_protocol_and_description(whisper: WhisperEngine) -> None:
    assert isinstance(whisper, AsrEngine)
    assert whisper.sample_rate == RATE
    assert whisper.describe() == {
        "engine": "whisper",
        "model": "whisper-tiny.en",
        "model_path": str(default_model_path()),
        "languages": ["en"],
        "sample_rate": RATE,
        "device": "cpu",
        "compute_type": "int8",
    }


def test_round_trip_word_error_rate(transcripts: list[AsrResult]) -> None:
    hypotheses = [r.text for r in transcripts]
    score = wer(SENTENCES, hypotheses)
    print(f"\npiper(joe) -> whisper(tiny.en) WER over {len(SENTENCES)} sentences: {score:.1%}")
    for ref, hyp in zip(SENTENCES, hypotheses, strict=True):
        print(f"  ref: {ref}\n  hyp: {hyp}")
    assert score <= 0.15


def test_result_fields(transcripts: list[AsrResult], spoken: list[Audio]) -> None:
    for result, audio in zip(transcripts, spoken, strict=True):
        assert result.language == "en"
        assert result.duration == pytest.approx(len(audio) / RATE)
        assert result.segments and " ".join(s.text for s in result.segments) == result.text
        assert all(0.0 <= s.start <= s.end <= result.duration for s in result.segments)


def test_word_timestamps_monotonic_within_duration(transcripts: list[AsrResult]) -> None:
    for result in transcripts:
        words = result.words
        assert [normalize(w.word) for w in words if normalize(w.word)] == normalize(result.text).split()
        previous_end = 0.0
        for w in words:
            assert previous_end <= w.start <= w.end <= result.duration, (w, result.duration)
            assert w.confidence is not None and 0.0 <= w.confidence <= 1.0
            previous_end = w.end
        # Speech fills these clips: the words must span most of them, not pile up at one instant.
        assert words[-1].end - words[0].start > 0.6 * result.duration


def test_bad_items_fail_alone(whisper: WhisperEngine, spoken: list[Audio]) -> None:
    nan = spoken[0].copy()
    nan[100] = np.nan
    results = whisper.transcribe_batch(
        [
            AsrRequest(audio=spoken[0]),
            AsrRequest(audio=np.zeros(0, dtype=np.float32)),
            AsrRequest(audio=nan),
            AsrRequest(audio=np.zeros(RATE // 50, dtype=np.float32)),  # 20 ms
            AsrRequest(audio=np.zeros((2, RATE), dtype=np.float32)),  # stereo
            AsrRequest(audio=(spoken[1] * 32767).astype(np.int16)),  # not float samples
            AsrRequest(audio=spoken[1], language="fr"),  # tiny.en speaks English only
            AsrRequest(audio=spoken[1], temperature=-1.0),
            AsrRequest(audio=spoken[1], language="en-US"),
        ]
    )
    assert len(results) == 9
    first, last = results[0], results[-1]
    assert isinstance(first, AsrResult) and wer([SENTENCES[0]], [first.text]) <= 0.15
    assert isinstance(last, AsrResult) and wer([SENTENCES[1]], [last.text]) <= 0.15
    assert isinstance(results[1], EmptyInput)
    for bad in results[2:8]:
        assert isinstance(bad, InvalidInput), bad
    assert "NaN" in str(results[2]) and "short" in str(results[3]) and "mono" in str(results[4])


def test_silence_is_not_hallucinated(whisper: WhisperEngine) -> None:
    [result] = whisper.transcribe_batch([AsrRequest(audio=np.zeros(2 * RATE, dtype=np.float32))])
    assert isinstance(result, AsrResult)
    assert result.text == "" and result.words == [] and result.duration == 2.0


def test_streaming_vad_matches_one_shot_vad(spoken: list[Audio]) -> None:
    audio = np.concatenate(spoken[:2])
    audio = audio[: len(audio) // 512 * 512]
    one_shot = np.asarray(get_vad_model()(audio)).reshape(-1)
    vad = StreamingVad()
    pieces = [vad(audio[i : i + 3000]) for i in range(0, len(audio), 3000)]  # not window-aligned
    np.testing.assert_allclose(np.concatenate(pieces), one_shot, atol=1e-5)
    assert one_shot.max() > 0.9 and one_shot.min() < 0.1  # it does tell speech from pauses


def test_model_dir_by_path_and_registry_factory(tmp_path: Path, spoken: list[Audio]) -> None:
    model_dir = tmp_path / "my-whisper"
    model_dir.mkdir()
    for f in default_model_path().iterdir():
        (model_dir / f.name).symlink_to(f)
    engine = load_engine(
        EngineSpec(task="asr", engine="whisper", model_path=str(model_dir), options={"beamSize": 2})
    )
    assert isinstance(engine, WhisperEngine) and engine.beam_size == 2
    engine.load()
    assert engine.describe()["model"] == "my-whisper"
    [result] = engine.transcribe_batch([AsrRequest(audio=spoken[4])])
    assert isinstance(result, AsrResult) and wer([SENTENCES[4]], [result.text]) <= 0.15


def test_bad_model_paths_and_options(tmp_path: Path) -> None:
    with pytest.raises(UnknownModel, match="does not exist"):
        WhisperEngine(model_path=tmp_path / "missing").load()
    with pytest.raises(UnknownModel, match=r"missing model\.bin"):
        WhisperEngine(model_path=tmp_path).load()  # also: no tokenizer.json, so it would try to download
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).symlink_to(default_model_path() / name)
    (tmp_path / "model.bin").write_bytes(b"truncated")
    with pytest.raises(EngineError, match="could not load whisper model"):
        WhisperEngine(model_path=tmp_path).load()
    with pytest.raises(InvalidInput, match="unknown whisper engine option"):
        WhisperEngine(modelSize="tiny")
    with pytest.raises(EngineError, match="before load"):
        WhisperEngine().transcribe_batch([AsrRequest(audio=np.zeros(RATE, dtype=np.float32))])
