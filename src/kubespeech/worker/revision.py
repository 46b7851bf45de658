"""The model revision a worker publishes: a fingerprint of everything that decides what its engine outputs.

The API's result cache keys every entry by it, so a new model file, voice, engine option or release makes
new keys instead of serving audio or transcripts the old model produced.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import orjson

from kubespeech import __version__
from kubespeech.config import WorkerSettings

# Fields of an engine's description that change between runs (load time, memory), or between pools that share
# a queue (device, precision: the same model on an L4 and on a spot A100); leaving them out keeps one
# revision per model, so such pools share their cache entries instead of flipping each other's keys.
_VOLATILE = frozenset({"load_seconds", "gpu_memory", "device", "precision", "batching"})
# A model directory is fingerprinted by its files' names, sizes and modification times (not their content:
# hashing gigabytes of weights would delay every start); this many files at most.
_MAX_FILES = 4096


def _files(path: Path) -> list[list[Any]]:
    if path.is_file():
        st = path.stat()
        return [[path.name, st.st_size, st.st_mtime_ns]]
    out: list[list[Any]] = []
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            file = Path(root, name)
            try:
                st = file.stat()
            except OSError:
                continue
            out.append([str(file.relative_to(path)), st.st_size, st.st_mtime_ns])
            if len(out) >= _MAX_FILES:
                return out
    return out


def model_revision(settings: WorkerSettings, description: dict[str, Any]) -> str:
    """A short stable hash of the engine, its model files, options, voices and the kubespeech release."""
    files: list[list[Any]] = []
    if settings.model_path:
        try:
            files = _files(Path(settings.model_path))
        except OSError:
            files = []
    material = {
        "kubespeech": __version__,
        "engine": settings.engine,
        "model_path": settings.model_path,
        "files": files,
        "options": settings.engine_options,
        "description": {k: v for k, v in description.items() if k not in _VOLATILE},
    }
    return hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS, default=str)).hexdigest()[:16]
