"""The engine contracts: one Protocol per task, so whisper/piper (CPU) and nemo (GPU) are interchangeable.

Audio crosses these interfaces as mono float32 numpy arrays in [-1, 1] at the engine's own
``sample_rate``; the worker resamples before and after. Batch methods return exactly one item per
request, in order, and return (not raise) an exception for an item that failed, so one bad input fails
only itself.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

Audio = npt.NDArray[np.float32]


@dataclass(slots=True)
class Word:
    word: str
    start: float
    end: float
    confidence: float | None = None


@dataclass(slots=True)
class Segment:
    text: str
    start: float
    end: float


@dataclass(slots=True)
class AsrRequest:
    audio: Audio
    language: str | None = None
    word_timestamps: bool = False
    prompt: str | None = None
    temperature: float = 0.0


@dataclass(slots=True)
class AsrResult:
    text: str
    language: str | None = None
    duration: float = 0.0
    words: list[Word] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)


@dataclass(slots=True)
class VoiceInfo:
    """A voice a TTS engine can speak with; ``id`` is what clients pass as ``voice_id``/``voice``."""

    id: str
    name: str
    language: str = "en-US"
    gender: str | None = None


@dataclass(slots=True)
class TtsRequest:
    text: str
    voice: str | None = None
    speed: float = 1.0
    language: str | None = None


@dataclass(slots=True)
class TtsResult:
    audio: Audio
    sample_rate: int


@runtime_checkable
class AsrStream(Protocol):
    """An open streaming-recognition session (audio in, partial and final text out)."""

    def accept(self, audio: Audio) -> list[AsrResult]: ...

    def finish(self) -> list[AsrResult]: ...


@runtime_checkable
class AsrEngine(Protocol):
    """Speech to text."""

    name: str
    sample_rate: int

    def load(self) -> None:
        """Load the model once (the worker calls this before it takes any job)."""

    def transcribe_batch(self, requests: Sequence[AsrRequest]) -> list[AsrResult | Exception]:
        """Transcribe a micro-batch; exactly one result or exception per request, in order."""
        ...

    def describe(self) -> dict[str, object]:
        """What the engine serves (model, languages, device), published for the API's model listing."""
        ...


@runtime_checkable
class TtsEngine(Protocol):
    """Text to speech."""

    name: str
    sample_rate: int

    def load(self) -> None: ...

    def voices(self) -> list[VoiceInfo]: ...

    def synthesize_batch(self, requests: Sequence[TtsRequest]) -> list[TtsResult | Exception]:
        """Synthesize a micro-batch; exactly one result or exception per request, in order."""
        ...

    def synthesize_stream(self, request: TtsRequest) -> Iterator[Audio]:
        """Yield audio chunks (e.g. one per sentence) as soon as each is ready."""
        ...

    def describe(self) -> dict[str, object]: ...
