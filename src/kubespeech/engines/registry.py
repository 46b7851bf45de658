"""Engine selection by name: each engine's module is imported only when a worker asks for it."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from kubespeech.errors import InvalidInput

# name -> (task, "module:factory"); factories take (model_path | None, options) and return an engine.
_ENGINES: dict[tuple[str, str], str] = {
    ("asr", "noop"): "kubespeech.engines.noop:NoopAsrEngine",
    ("tts", "noop"): "kubespeech.engines.noop:NoopTtsEngine",
    ("asr", "whisper"): "kubespeech.engines.whisper:WhisperEngine",
    ("tts", "piper"): "kubespeech.engines.piper:PiperEngine",
    ("asr", "nemo"): "kubespeech.engines.nemo_asr:NemoAsrEngine",
    ("tts", "nemo"): "kubespeech.engines.nemo_tts:NemoTtsEngine",
}


@dataclass(slots=True)
class EngineSpec:
    """Which engine a worker runs: task, engine name, model location and engine options."""

    task: str
    engine: str
    model_path: str | None = None
    device: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)


def available_engines(task: str) -> list[str]:
    return sorted(name for (t, name) in _ENGINES if t == task)


def load_engine(spec: EngineSpec) -> Any:
    """Instantiate (not yet load) the engine named by ``spec``; unknown names raise InvalidInput."""
    target = _ENGINES.get((spec.task, spec.engine))
    if target is None:
        raise InvalidInput(
            f"unknown {spec.task} engine '{spec.engine}'; available: {', '.join(available_engines(spec.task))}"
        )
    module_name, factory_name = target.split(":")
    factory = getattr(importlib.import_module(module_name), factory_name)
    return factory(model_path=spec.model_path, device=spec.device, **spec.options)
