"""Session fixtures for the nemo engine tests: tiny NeMo models built from config and saved as real ``.nemo`` files.

``import nemo.collections.asr`` costs ~8 s and training the char-CTC model ~10-40 s on 2 cores, so every
model is built once per session. The trained model learns a handful of phrases spoken by the bundled piper
voice; tests then recognize those phrases through the worker, which proves that the audio path (PCM,
resampling, features, decoding) is wired right, not just that it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soxr

nemo = pytest.importorskip("nemo", reason="needs nemo_toolkit[asr] (pip install -e '.[nemo]')")

import torch  # noqa: E402 - only once NeMo (and so torch) is known to be installed

# Tiny models spend more time synchronizing torch's threads than computing; on a busy 2-core CI machine
# two threads were measured 15x slower than one. Workers started by these tests get cpu_threads=1.
torch.set_num_threads(1)

PHRASES = [
    "hello world",
    "open the door",
    "turn on the light",
    "good morning",
    "play some music",
    "what time is it",
]
TRAIN_STEPS = 400


@dataclass(frozen=True)
class Speech:
    """The training phrases as the piper voice speaks them, at its own rate and at 16 kHz."""

    texts: list[str]
    native: list[np.ndarray]
    native_rate: int
    at_16k: list[np.ndarray]


@dataclass(frozen=True)
class TtsModels:
    fastpitch: Path
    hifigan: Path
    directory: Path


@pytest.fixture(scope="session")
def speech() -> Speech:
    from kubespeech.engines.base import TtsRequest
    from kubespeech.engines.registry import EngineSpec, load_engine

    # Without VITS noise the voice speaks each phrase the same way every run, so training (seeded, one
    # thread) and everything downstream is reproducible.
    options = {"noise_scale": 0.0, "noise_w_scale": 0.0, "cpu_threads": 1}
    piper = load_engine(EngineSpec(task="tts", engine="piper", options=options))
    piper.load()
    results = piper.synthesize_batch([TtsRequest(text=t) for t in PHRASES])
    native = [r.audio for r in results]
    rate = results[0].sample_rate
    # Through 16-bit PCM like every job payload, so training sees what the worker will see.
    at_16k = [
        (np.round(np.clip(soxr.resample(a, rate, 16000), -1, 1) * 32767) / 32768).astype(np.float32)
        for a in native
    ]
    return Speech(texts=list(PHRASES), native=native, native_rate=rate, at_16k=at_16k)


@pytest.fixture(scope="session")
def nemo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("nemo-models")


@pytest.fixture(scope="session")
def ctc_model(nemo_dir: Path) -> Path:
    """A random-weight char-CTC model: fast, for shape/batching/error tests."""
    from kubespeech.bench.nemo_tiny import save_asr

    return save_asr(nemo_dir / "ctc-random.nemo", "ctc")


@pytest.fixture(scope="session")
def trained_ctc_model(nemo_dir: Path, speech: Speech) -> Path:
    """A char-CTC model trained on ``PHRASES`` until it recognizes them."""
    import torch

    from kubespeech.bench.nemo_tiny import build_asr, train_char_ctc

    torch.manual_seed(0)
    model = build_asr("ctc")
    losses = train_char_ctc(model, speech.at_16k, speech.texts, steps=TRAIN_STEPS)
    assert losses[-1] < losses[0] / 20, f"training did not converge: {losses[0]:.1f} -> {losses[-1]:.2f}"
    path = nemo_dir / "ctc-trained.nemo"
    model.save_to(str(path))
    return path


@pytest.fixture(scope="session")
def tts_models(nemo_dir: Path) -> TtsModels:
    from kubespeech.bench.nemo_tiny import save_tts

    directory = nemo_dir / "tts"
    fastpitch, hifigan = save_tts(directory, n_speakers=3)
    return TtsModels(fastpitch=fastpitch, hifigan=hifigan, directory=directory)
