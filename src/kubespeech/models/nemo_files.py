"""Find ``.nemo`` checkpoints in a model-cache directory and tell what each holds, without importing NeMo.

The operator points a worker at the directory ``kubespeech model fetch`` filled (an NGC or Hugging Face
model often brings a README, configs and one ``.nemo``); a ``.nemo`` file is a tar archive whose
``model_config.yaml`` names the model class in ``target``, which is enough to tell a vocoder from a
spectrogram generator.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import yaml

from kubespeech.errors import EngineError

_VOCODER_MARKERS = ("hifigan", "univnet", "waveglow", "vocoder", "melgan", "vocos", "bigvgan")


def nemo_target(path: str | Path) -> str:
    """The model class a ``.nemo`` file restores to (its config's ``target``), or "" when it names none."""
    try:
        with tarfile.open(path) as archive:
            for member in archive.getmembers():
                if member.name.rsplit("/", 1)[-1] == "model_config.yaml":
                    handle = archive.extractfile(member)
                    if handle is None:
                        break
                    config = yaml.safe_load(handle) or {}
                    return str(config.get("target") or config.get("_target_") or "")
    except (tarfile.TarError, OSError, yaml.YAMLError) as exc:
        raise EngineError(f"{path} is not a readable .nemo archive: {exc}") from exc
    return ""


def is_vocoder(path: str | Path) -> bool:
    target = nemo_target(path).lower()
    return any(marker in target for marker in _VOCODER_MARKERS)


def nemo_files(directory: str | Path) -> list[Path]:
    """Every ``.nemo`` file under ``directory`` (hidden and partial-download folders skipped), sorted."""
    root = Path(directory)
    return sorted(
        p
        for p in root.rglob("*.nemo")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def resolve_model_file(path: str | Path, *, vocoder: bool | None = None) -> Path:
    """A model path as configured (a ``.nemo`` file, or a directory holding one) -> the ``.nemo`` file.

    ``vocoder`` filters a directory's files: True keeps vocoders only, False keeps everything else.
    """
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise EngineError(f"NeMo model not found at {p} (fetch it first with `kubespeech model fetch`)")
    candidates = nemo_files(p)
    if vocoder is not None:
        candidates = [c for c in candidates if is_vocoder(c) == vocoder]
    kind = {True: "vocoder ", False: "", None: ""}[vocoder]
    if not candidates:
        raise EngineError(f"no {kind}.nemo file in {p}")
    if len(candidates) > 1:
        names = ", ".join(str(c.relative_to(p)) for c in candidates)
        raise EngineError(f"several {kind}.nemo files in {p} ({names}): point model_path at one of them")
    return candidates[0]
