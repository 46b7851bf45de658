"""No-op engines: answer instantly, so benchmarks measure the protocol and API overhead alone."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from kubespeech.engines.base import AsrRequest, AsrResult, Audio, TtsRequest, TtsResult, VoiceInfo
from kubespeech.errors import EmptyInput


class NoopAsrEngine:
    """Returns the number of samples it received as the transcript.

    Two options exist for fault-injection tests of the worker runtime (never set in deployments):
    ``delay_s`` sleeps per batch (work in flight when a worker is killed or drained) and
    ``exit_on_samples`` ends the process abruptly on an input of exactly that many samples (a poison job).
    """

    name = "noop"
    sample_rate = 16000

    def __init__(
        self,
        model_path: str | None = None,
        device: str = "cpu",
        delay_s: float = 0.0,
        exit_on_samples: int | None = None,
        **_: Any,
    ) -> None:
        self.device = device
        self.delay_s = float(delay_s)
        self.exit_on_samples = exit_on_samples
        self.batch_sizes: list[int] = []

    def load(self) -> None:
        return None

    def transcribe_batch(self, requests: Sequence[AsrRequest]) -> list[AsrResult | Exception]:
        self.batch_sizes.append(len(requests))
        if self.exit_on_samples is not None and any(len(r.audio) == self.exit_on_samples for r in requests):
            os._exit(70)
        if self.delay_s:
            time.sleep(self.delay_s)
        return [
            AsrResult(text=f"{len(r.audio)} samples", duration=len(r.audio) / self.sample_rate)
            for r in requests
        ]

    def describe(self) -> dict[str, object]:
        return {"engine": self.name, "model": "noop", "sample_rate": self.sample_rate, "device": self.device}


class NoopTtsEngine:
    """Returns 10 ms of silence per character."""

    name = "noop"
    sample_rate = 16000

    def __init__(self, model_path: str | None = None, device: str = "cpu", **_: Any) -> None:
        self.device = device

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
