"""The piper engine with the bundled joe voice: voices, per-item errors, speed, per-sentence streaming."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kubespeech.engines.base import TtsEngine, TtsRequest, TtsResult
from kubespeech.engines.piper import PiperEngine, default_voice_files
from kubespeech.engines.registry import EngineSpec, load_engine
from kubespeech.errors import EmptyInput, EngineError, InvalidInput, TextTooLong, UnknownModel, UnknownVoice


def seconds(result: TtsResult | Exception) -> float:
    assert isinstance(result, TtsResult), result
    return len(result.audio) / result.sample_rate


def test_protocol_voice_and_description(piper: PiperEngine) -> None:
    assert isinstance(piper, TtsEngine)
    assert piper.sample_rate == 22050
    [voice] = piper.voices()
    assert (voice.id, voice.name, voice.language, voice.gender) == ("joe", "Joe", "en-US", "male")
    info = piper.describe()
    assert info["engine"] == "piper"
    assert info["voices"] == ["joe"]
    assert info["sample_rate"] == 22050
    assert info["device"] == "cpu"


def test_synthesizes_audible_float_audio(piper: PiperEngine) -> None:
    [result] = piper.synthesize_batch([TtsRequest(text="Hello there, how are you today?", voice="joe")])
    assert isinstance(result, TtsResult)
    assert result.audio.dtype == np.float32 and result.audio.ndim == 1
    assert result.sample_rate == 22050
    assert 1.0 < seconds(result) < 4.0
    assert np.isfinite(result.audio).all() and float(np.abs(result.audio).max()) <= 1.0
    assert float(np.sqrt(np.mean(result.audio**2))) > 0.02  # speech, not silence


def test_bad_items_fail_alone(piper: PiperEngine) -> None:
    results = piper.synthesize_batch(
        [
            TtsRequest(text="First good sentence."),
            TtsRequest(text="   "),
            TtsRequest(text="x" * 5001),
            TtsRequest(text="Hello.", voice="nobody"),
            TtsRequest(text="Hello.", speed=3.0),
            TtsRequest(text="... !!"),
            TtsRequest(text="Hello.", language="de"),
            TtsRequest(text="Last good sentence.", voice="JOE", language="en-US"),
        ]
    )
    assert len(results) == 8
    assert isinstance(results[0], TtsResult) and isinstance(results[-1], TtsResult)
    assert isinstance(results[1], EmptyInput)
    assert isinstance(results[2], TextTooLong)
    assert isinstance(results[3], UnknownVoice) and "nobody" in str(results[3])
    assert isinstance(results[4], InvalidInput) and "speed" in str(results[4])
    assert isinstance(results[5], EmptyInput)
    assert isinstance(results[6], InvalidInput)
    assert results[3].to_dict()["code"] == "VOICE_NOT_FOUND"


def test_max_chars_is_configurable() -> None:
    engine = PiperEngine(maxChars=10)  # camelCase as the CRD's engineOptions spells it
    engine.load()
    [ok, too_long] = engine.synthesize_batch([TtsRequest(text="Short."), TtsRequest(text="Much too long.")])
    assert isinstance(ok, TtsResult)
    assert isinstance(too_long, TextTooLong)


def test_speed_changes_duration() -> None:
    # Phoneme-duration noise off: durations then depend on the speed alone, so the ratios are not luck.
    engine = PiperEngine(noiseWScale=0.0)
    engine.load()
    text = "Speaking rate should follow the requested speed."
    slow, normal, fast = engine.synthesize_batch([TtsRequest(text=text, speed=s) for s in (0.5, 1.0, 2.0)])
    assert seconds(slow) > 1.6 * seconds(normal)
    assert seconds(fast) < 0.65 * seconds(normal)


def test_stream_yields_one_chunk_per_sentence(piper: PiperEngine) -> None:
    chunks = list(piper.synthesize_stream(TtsRequest(text="One sentence here. A second one! And a third?")))
    assert len(chunks) == 3
    assert all(c.dtype == np.float32 and c.ndim == 1 and len(c) > 0.3 * 22050 for c in chunks)


def test_stream_rejects_bad_request_before_first_chunk(piper: PiperEngine) -> None:
    with pytest.raises(UnknownVoice):
        piper.synthesize_stream(TtsRequest(text="Hello.", voice="nobody"))
    with pytest.raises(EmptyInput):
        piper.synthesize_stream(TtsRequest(text=""))


def test_directory_of_voices(tmp_path: Path) -> None:
    model, config = default_voice_files()
    for name in ("en_US-joe-medium", "en_GB-alan-low"):
        (tmp_path / f"{name}.onnx").symlink_to(model)
        cfg = json.loads(config.read_text())
        if name.startswith("en_GB"):
            cfg["language"]["code"] = "en_GB"
            cfg["audio"]["sample_rate"] = 16000  # a low-quality voice's rate: resampled to the engine's
        (tmp_path / f"{name}.onnx.json").write_text(json.dumps(cfg))
    (tmp_path / "stray.onnx").write_bytes(b"no config beside it: ignored")
    engine = PiperEngine(model_path=tmp_path, default_voice="joe")
    engine.load()
    assert [(v.id, v.language) for v in engine.voices()] == [("alan", "en-GB"), ("joe", "en-US")]
    assert engine.sample_rate == 16000  # the first voice's rate
    alan, joe = engine.synthesize_batch([TtsRequest(text="Good morning.", voice=v) for v in ("alan", "joe")])
    assert isinstance(alan, TtsResult) and isinstance(joe, TtsResult)
    assert alan.sample_rate == joe.sample_rate == 16000


def test_single_onnx_file_and_registry_factory() -> None:
    model, _ = default_voice_files()
    engine = load_engine(
        EngineSpec(task="tts", engine="piper", model_path=str(model), options={"cpu_threads": 1})
    )
    assert isinstance(engine, PiperEngine)
    engine.load()
    assert [v.id for v in engine.voices()] == ["joe"]


def test_bad_model_paths_and_options(tmp_path: Path) -> None:
    with pytest.raises(UnknownModel, match="does not exist"):
        PiperEngine(model_path=tmp_path / "missing.onnx").load()
    with pytest.raises(UnknownModel, match="no piper voices"):
        PiperEngine(model_path=tmp_path).load()
    (tmp_path / "broken.onnx").write_bytes(b"not an onnx model")
    (tmp_path / "broken.onnx.json").write_text(default_voice_files()[1].read_text())
    with pytest.raises(EngineError, match="could not load piper voice"):
        PiperEngine(model_path=tmp_path / "broken.onnx").load()
    with pytest.raises(InvalidInput, match="unknown piper engine option"):
        PiperEngine(lengthScale=2)
    with pytest.raises(EngineError, match="before load"):
        PiperEngine().synthesize_batch([TtsRequest(text="Hi.")])
