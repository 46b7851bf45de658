"""No-op engines: answer instantly, so benchmarks measure the protocol and API overhead alone."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from kubespeech.engines.base import AsrRequest, AsrResult, Audio, TtsRequest, TtsResult, VoiceInfo
from kubespeech.errors import EmptyInput


class _CallLog:
    """Appends one line per request an engine received to ``calls_file`` (tests count engine calls)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._lock = threading.Lock()

    def record(self, lines: list[str]) -> None:
        if self.path:
            with self._lock, open(self.path, "a", encoding="utf-8") as f:
                f.writelines(line.replace("\n", " ") + "\n" for line in lines)


class NoopAsrEngine:
    """Returns the number of samples it received as the transcript.

    Four options exist for tests of the worker runtime (never set in deployments): ``delay_s`` sleeps
    per batch (work in flight when a worker is killed or drained), ``hang_s`` blocks the engine thread
    that long on every batch (a stuck CUDA call), ``exit_on_samples`` ends the process abruptly on an
    input of exactly that many samples (a poison job), and ``calls_file`` appends the sample count of
    every request the engine receives to that file (which jobs reached the engine).
    """

    name = "noop"
    sample_rate = 16000

    def __init__(
        self,
        model_path: str | None = None,
        device: str = "cpu",
        delay_s: float = 0.0,
        hang_s: float = 0.0,
        exit_on_samples: int | None = None,
        calls_file: str | None = None,
        **_: Any,
    ) -> None:
        self.device = device
        self.delay_s = float(delay_s)
        self.hang_s = float(hang_s)
        self.exit_on_samples = exit_on_samples
        self.calls = _CallLog(calls_file)
        self.batch_sizes: list[int] = []

    def load(self) -> None:
        return None

    def transcribe_batch(self, requests: Sequence[AsrRequest]) -> list[AsrResult | Exception]:
        self.batch_sizes.append(len(requests))
        self.calls.record([str(len(r.audio)) for r in requests])
        if self.exit_on_samples is not None and any(len(r.audio) == self.exit_on_samples for r in requests):
            os._exit(70)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.hang_s:
            time.sleep(self.hang_s)
        return [
            AsrResult(text=f"{len(r.audio)} samples", duration=len(r.audio) / self.sample_rate)
            for r in requests
        ]

    def describe(self) -> dict[str, object]:
        return {"engine": self.name, "model": "noop", "sample_rate": self.sample_rate, "device": self.device}


class NoopTtsEngine:
    """Returns 10 ms of silence per character.

    Test-only options (never set in deployments): ``delay_s`` sleeps per batch, ``hang_s`` blocks the
    engine thread that long on every batch (a stuck engine), and ``calls_file`` appends the text of every
    request the engine receives to that file, one line each.
    """

    name = "noop"
    sample_rate = 16000

    def __init__(
        self,
        model_path: str | None = None,
        device: str = "cpu",
        delay_s: float = 0.0,
        hang_s: float = 0.0,
        calls_file: str | None = None,
        **_: Any,
    ) -> None:
        self.device = device
        self.delay_s = float(delay_s)
        self.hang_s = float(hang_s)
        self.calls = _CallLog(calls_file)

    def load(self) -> None:
        return None

    def voices(self) -> list[VoiceInfo]:
        return [VoiceInfo(id="noop", name="Silence")]

    def _one(self, request: TtsRequest) -> TtsResult:
        if not request.text.strip():
            raise EmptyInput("text is empty")
        return TtsResult(
            audio=np.zeros(len(request.text) * 160, dtype=np.float32), sample_rate=self.sample_rate
        )

    def synthesize_batch(self, requests: Sequence[TtsRequest]) -> list[TtsResult | Exception]:
        self.calls.record([r.text for r in requests])
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.hang_s:
            time.sleep(self.hang_s)
        out: list[TtsResult | Exception] = []
        for r in requests:
            try:
                out.append(self._one(r))
            except EmptyInput as exc:
                out.append(exc)
        return out

    def synthesize_stream(self, request: TtsRequest) -> Iterator[Audio]:
        yield self._one(request).audio

    def describe(self) -> dict[str, object]:
        return {
            "engine": self.name,
            "model": "noop",
            "sample_rate": self.sample_rate,
            "device": self.device,
            "voices": [{"id": "noop", "name": "Silence", "language": "en-US"}],
        }
