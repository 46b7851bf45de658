"""The engine contracts: one Protocol per task, so whisper/piper (CPU) and nemo (GPU) are interchangeable.

Audio crosses these interfaces as mono float32 numpy arrays in [-1, 1] at the engine's own
``sample_rate``; the worker resamples before and after. Batch methods return exactly one item per
request, in order, and return (not raise) an exception for an item that failed, so one bad input fails
only itself.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

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


@dataclass(slots=True)
class StreamEvent:
    """One hypothesis from a streaming session; times are seconds from the start of the stream."""

    kind: Literal["partial", "final"]
    text: str
    start: float
    end: float
    words: list[Word] = field(default_factory=list)


@runtime_checkable
class AsrStream(Protocol):
    """An open streaming-recognition session: audio in, partial and final hypotheses out.

    ``accept(audio)`` takes the next chunk (any length, mono float32 at the engine's rate) and returns
    the events it produced, in order: ``partial`` events are the running, revisable hypothesis of the
    open utterance (each replaces the previous partial); a ``final`` event is never revised, and the
    next partial belongs to the next utterance. An utterance becomes final at end of speech (silence
    of at least the stream's ``eou_timeout_ms``), when it reaches the engine's length limit, or on
    ``finalize()``, which flushes the open utterance and leaves the stream open. ``close()`` flushes
    the same way and ends the session (``accept`` then raises InvalidInput; a second close returns []).
    Event, word and segment times are seconds of stream time: sample 0 is the first sample of the
    stream this one resumes (``start_sample`` of ``open_stream``), not of this object.

    Resuming on another worker: ``committed_samples`` is the stream-time sample index up to which
    audio is settled (turned into finals already sent, or dropped as non-speech); no later event
    covers audio before it. A caller keeps the audio from ``committed_samples`` on (it is at most one
    utterance plus a little context) and, after a crash, opens a new stream with
    ``start_sample=committed_samples`` and re-feeds that audio: the new stream then produces the
    finals not yet sent, with the same time base. It is read after any ``accept``/``finalize`` call.
    """

    @property
    def committed_samples(self) -> int: ...

    def accept(self, audio: Audio) -> list[StreamEvent]: ...

    def finalize(self) -> list[StreamEvent]: ...

    def close(self) -> list[StreamEvent]: ...


@runtime_checkable
class StreamingAsrEngine(Protocol):
    """An AsrEngine that can also recognize live audio (a separate Protocol: not every engine streams)."""

    name: str
    sample_rate: int

    def open_stream(
        self,
        language: str | None = None,
        word_timestamps: bool = False,
        eou_timeout_ms: int = 600,
        *,
        start_sample: int = 0,
    ) -> AsrStream:
        """Open a session on the loaded engine; ``start_sample`` resumes a stream (see AsrStream)."""
        ...


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
