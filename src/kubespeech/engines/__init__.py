"""Speech engines behind one Protocol per task; ``load_engine`` picks one by name without importing the others."""

from kubespeech.engines.registry import EngineSpec, load_engine

__all__ = ["EngineSpec", "load_engine"]
