"""The nemo ASR engine called directly on tiny real NeMo models: batching, per-item errors, word timestamps."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jiwer
import numpy as np
import pytest
import torch

from kubespeech.engines.base import AsrEngine, AsrRequest, AsrResult
from kubespeech.engines.nemo_asr import NemoAsrEngine
from kubespeech.engines.registry import EngineSpec, load_engine
from kubespeech.errors import AudioTooLong, CorruptAudio, EmptyInput, EngineError, InvalidInput
from tests.nemo.conftest import Speech

RATE = 16000


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * RATE)) * 0.05).astype(np.float32)


@pytest.fixture(scope="module")
def random_engine(ctc_model: Path) -> NemoAsrEngine:
    engine = load_engine(
        EngineSpec(task="asr", engine="nemo", model_path=str(ctc_model), options={"max_audio_s": 20})
    )
    engine.load()
    return engine


@pytest.fixture(scope="module")
def trained_engine(trained_ctc_model: Path) -> NemoAsrEngine:
    engine = NemoAsrEngine(model_path=str(trained_ctc_model))
    engine.load()
    return engine


def test_importing_the_engines_does_not_import_torch_or_nemo() -> None:
    code = (
        "import sys, kubespeech.engines.nemo_asr, kubespeech.engines.nemo_tts, kubespeech.models.cli, "
        "kubespeech.models.fetch; "
        "bad = [m for m in ('torch', 'nemo') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_micro_batch_is_one_forward_pass_with_results_in_order(random_engine: NemoAsrEngine) -> None:
    assert isinstance(random_engine, AsrEngine)
    seconds = [1.5, 0.4, 3.0, 2.2, 0.9]
    results = random_engine.transcribe_batch([AsrRequest(audio=noise(s, i)) for i, s in enumerate(seconds)])
    assert random_engine.last_batch_sizes == [5], "the encoder must see all five clips in one forward pass"
    assert all(isinstance(r, AsrResult) for r in results)
    assert [r.duration for r in results if isinstance(r, AsrResult)] == pytest.approx(seconds)
    info = random_engine.describe()
    assert info["kind"] == "ctc" and info["device"] == "cpu" and info["sample_rate"] == RATE
    assert "gpu_memory" not in info


def test_bad_items_fail_alone(random_engine: NemoAsrEngine) -> None:
    bad_nan = noise(1.0)
    bad_nan[100] = np.nan
    requests = [
        AsrRequest(audio=noise(1.0)),
        AsrRequest(audio=np.zeros(0, dtype=np.float32)),
        AsrRequest(audio=bad_nan),
        AsrRequest(audio=np.zeros((2, 8000), dtype=np.float32)),
        AsrRequest(audio=noise(21.0)),
        AsrRequest(audio=noise(2.0)),
    ]
    results = random_engine.transcribe_batch(requests)
    assert [type(r) for r in results] == [
        AsrResult,
        EmptyInput,
        CorruptAudio,
        CorruptAudio,
        AudioTooLong,
        AsrResult,
    ]
    assert random_engine.last_batch_sizes == [2]


def test_a_pass_that_fails_is_halved_until_the_bad_input_fails_alone(
    random_engine: NemoAsrEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fault injection at the model boundary: any pass that contains the poison clip fails, as a batch
    # that runs out of GPU memory or trips over one malformed input would.
    poison = int(1.3 * RATE)
    real = random_engine.model.transcribe

    def transcribe(audio: list[np.ndarray], **kwargs: object) -> object:
        if any(len(a) == poison for a in audio):
            raise RuntimeError("CUDA out of memory (injected)")
        return real(audio, **kwargs)

    monkeypatch.setattr(random_engine.model, "transcribe", transcribe)
    seconds = [1.0, 2.0, 1.3, 1.5, 0.5, 1.8, 1.1, 1.2]
    results = random_engine.transcribe_batch([AsrRequest(audio=noise(s, i)) for i, s in enumerate(seconds)])
    assert [isinstance(r, AsrResult) for r in results] == [s != 1.3 for s in seconds]
    assert isinstance(results[2], RuntimeError)
    # Sorted longest first, the poison (1.3 s) is in the first half: 8 fails -> [2.0 1.8 1.5 1.3] fails ->
    # [2.0 1.8] ok, [1.5 1.3] fails -> [1.5] ok, [1.3] fails alone; then the other half [1.2 1.1 1.0 0.5] ok.
    assert random_engine.last_batch_sizes == [2, 1, 4]
    assert [r.duration for r in results if isinstance(r, AsrResult)] == pytest.approx(
        [s for s in seconds if s != 1.3]
    )


def test_a_memory_budget_splits_the_batch_into_length_sorted_passes(ctc_model: Path) -> None:
    engine = NemoAsrEngine(model_path=str(ctc_model), max_batch_audio_s=8.0, warmup=False)
    engine.load()
    seconds = [1.0, 4.0, 1.0, 4.0, 1.0]
    results = engine.transcribe_batch([AsrRequest(audio=noise(s, i)) for i, s in enumerate(seconds)])
    # Longest first: the two 4 s clips share one pass (2 x 4 s), the three 1 s clips the next.
    assert engine.last_batch_sizes == [2, 3]
    assert [r.duration for r in results if isinstance(r, AsrResult)] == pytest.approx(seconds)


def test_trained_model_recognizes_its_phrases_with_word_times(
    trained_engine: NemoAsrEngine, speech: Speech
) -> None:
    requests = [AsrRequest(audio=a, word_timestamps=True) for a in speech.at_16k]
    results = trained_engine.transcribe_batch(requests)
    assert trained_engine.last_batch_sizes == [len(requests)]
    texts = [r.text if isinstance(r, AsrResult) else "" for r in results]
    assert jiwer.wer(speech.texts, texts) <= 0.2, texts
    for result, audio in zip(results, speech.at_16k, strict=True):
        assert isinstance(result, AsrResult) and result.words
        assert " ".join(w.word for w in result.words) == result.text
        starts = [w.start for w in result.words]
        assert starts == sorted(starts)
        assert all(0 <= w.start <= w.end <= len(audio) / RATE + 0.05 for w in result.words)
    plain = trained_engine.transcribe_batch([AsrRequest(audio=speech.at_16k[0])])[0]
    assert isinstance(plain, AsrResult) and plain.words == []


@pytest.mark.parametrize("kind", ["rnnt", "tdt", "hybrid"])
def test_rnnt_tdt_and_hybrid_checkpoints_batch_in_one_pass(nemo_dir: Path, kind: str) -> None:
    from kubespeech.bench.nemo_tiny import save_asr

    path = save_asr(nemo_dir / f"{kind}.nemo", kind)
    engine = NemoAsrEngine(model_path=str(path))
    engine.load()
    results = engine.transcribe_batch(
        [AsrRequest(audio=noise(s, 3), word_timestamps=True) for s in (0.5, 1.5, 1.0)]
    )
    assert engine.last_batch_sizes == [3]
    assert all(isinstance(r, AsrResult) for r in results)
    assert engine.describe()["kind"] == ("hybrid-rnnt-ctc" if kind == "hybrid" else kind)


def test_model_path_may_be_a_cache_directory_and_errors_are_clear(ctc_model: Path, tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "README.md").write_text("fetched alongside the model")
    (tmp_path / "m" / "model.nemo").write_bytes(ctc_model.read_bytes())
    engine = NemoAsrEngine(model_path=str(tmp_path / "m"), warmup=False)
    engine.load()
    assert engine.describe()["model_path"] == str(tmp_path / "m" / "model.nemo")
    with pytest.raises(EngineError, match="not found"):
        NemoAsrEngine(model_path=str(tmp_path / "missing.nemo")).load()
    with pytest.raises(InvalidInput, match="model_path"):
        NemoAsrEngine(model_path=None)
    with pytest.raises(InvalidInput, match="unknown nemo ASR engine options: beam"):
        NemoAsrEngine(model_path=str(ctc_model), beam=4)
    with pytest.raises(EngineError, match="no CUDA GPU") if not torch.cuda.is_available() else _nothing():
        NemoAsrEngine(model_path=str(ctc_model), device="cuda").load()


def test_options_as_a_speech_deployment_writes_them(ctc_model: Path) -> None:
    # engineOptions in a SpeechDeployment are camelCase; `decoding` is merged into the model's own config.
    engine = load_engine(
        EngineSpec(task="asr", engine="nemo", model_path=str(ctc_model),
                   options={"maxBatchAudioS": 4, "wordTimestamps": False, "decoding": {"strategy": "greedy_batch"}})
    )  # fmt: skip
    engine.load()
    assert engine.max_batch_audio_s == 4.0 and engine.describe()["decoding"] == "greedy_batch"
    assert engine.describe()["word_timestamps"] is False
    results = engine.transcribe_batch([AsrRequest(audio=noise(1.0)), AsrRequest(audio=noise(1.2))])
    assert all(isinstance(r, AsrResult) for r in results)
    with pytest.raises(EngineError, match="decoding option"):
        NemoAsrEngine(model_path=str(ctc_model), decoding={"strategy": "no-such-strategy"}).load()


class _nothing:  # noqa: N801 - a stand-in context manager when the GPU exists
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        return None


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)"
)
def test_gpu_batch_runs_under_autocast_and_reports_memory(trained_ctc_model: Path, speech: Speech) -> None:
    engine = NemoAsrEngine(model_path=str(trained_ctc_model), device="cuda", precision="fp16")
    engine.load()
    results = engine.transcribe_batch([AsrRequest(audio=a) for a in speech.at_16k])
    assert engine.last_batch_sizes == [len(speech.at_16k)]
    texts = [r.text if isinstance(r, AsrResult) else "" for r in results]
    assert jiwer.wer(speech.texts, texts) <= 0.2
    memory = engine.describe()["gpu_memory"]
    assert isinstance(memory, dict) and memory["allocated_mib"] > 0
