"""Adapters between jobs and engines: turn a micro-batch of jobs into engine requests and back into results."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import soxr

from kubespeech.engines.base import AsrEngine, AsrResult, Audio, TtsEngine, TtsRequest, TtsResult
from kubespeech.errors import ClientClosedRequest, EmptyInput, EngineError, InvalidInput, KubespeechError
from kubespeech.jobs import Job, Result
from kubespeech.jobs.messages import (
    ASR_SAMPLE_RATE,
    asr_request_from_job,
    asr_result_header,
    pcm16_from_float,
    tts_request_from_job,
)

_SENTENCE_END = re.compile(r"(?<=[.!?\u2026])\s+|\n+")
_CLAUSE_END = re.compile(r"(?<=[,;:\u2013\u2014])\s+")
_SPEAKABLE = re.compile(r"\w")


def split_for_streaming(text: str, first_max_chars: int = 60, max_chars: int = 200) -> list[str]:
    """Sentences; the first one longer than ``first_max_chars`` (and any longer than ``max_chars``) is cut at
    clause punctuation, so the first audio leaves after one clause's synthesis, not a whole sentence's.

    Clauses are grouped up to the limit: a lone two-word clause sounds clipped. Pieces with nothing to say
    (bare punctuation) are dropped; an engine would answer them with noise or an error.
    """
    pieces: list[str] = []
    for raw in _SENTENCE_END.split(text):
        sentence = raw.strip()
        if not sentence:
            continue
        limit = first_max_chars if not pieces else max_chars
        if len(sentence) <= limit:
            pieces.append(sentence)
            continue
        group = ""
        for clause in _CLAUSE_END.split(sentence):
            if group and len(group) + 1 + len(clause) > limit:
                pieces.append(group)
                group, limit = clause, max_chars
            else:
                group = f"{group} {clause}".strip()
        if group:
            pieces.append(group)
    return [p for p in pieces if _SPEAKABLE.search(p)]


@dataclass(slots=True)
class Outcome:
    """A job's result plus what the metrics need to know about it."""

    result: Result
    audio_seconds: float = 0.0


class TaskHandler(Protocol):
    """Runs a micro-batch of jobs through an engine (called in the worker's engine thread)."""

    engine: Any

    def run_batch(self, jobs: Sequence[Job]) -> list[Outcome]: ...

    def describe(self) -> dict[str, Any]: ...


def _as_error(exc: BaseException) -> KubespeechError:
    if isinstance(exc, KubespeechError):
        return exc
    # An engine's own exception may carry library internals: keep its type name, not a traceback.
    return EngineError(f"engine failed on this input: {type(exc).__name__}: {exc}"[:500])


def _resample(audio: Audio, src: int, dst: int) -> Audio:
    if src == dst or audio.size == 0:
        return audio
    return np.asarray(soxr.resample(audio, src, dst), dtype=np.float32)


class AsrHandler:
    def __init__(self, engine: AsrEngine) -> None:
        self.engine = engine

    def describe(self) -> dict[str, Any]:
        return {"task": "asr", **self.engine.describe()}

    def run_batch(self, jobs: Sequence[Job]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(jobs)
        requests = []
        index = []
        for i, job in enumerate(jobs):
            try:
                if not job.payload:
                    raise EmptyInput("audio is empty")
                req = asr_request_from_job(job.meta, job.payload)
                rate = int(job.meta.get("sample_rate") or ASR_SAMPLE_RATE)
                req.audio = _resample(req.audio, rate, self.engine.sample_rate)
                requests.append(req)
                index.append(i)
            except Exception as exc:
                outcomes[i] = Outcome(Result(error=_as_error(exc)))
        if requests:
            results = _run_isolated(self.engine.transcribe_batch, requests)
            for i, req, res in zip(index, requests, results, strict=True):
                seconds = len(req.audio) / self.engine.sample_rate
                if isinstance(res, AsrResult):
                    if not res.duration:
                        res.duration = seconds
                    outcomes[i] = Outcome(Result(header=asr_result_header(res)), seconds)
                else:
                    outcomes[i] = Outcome(Result(error=_as_error(res)), seconds)
        return [o for o in outcomes if o is not None]


class TtsHandler:
    def __init__(self, engine: TtsEngine) -> None:
        self.engine = engine

    def describe(self) -> dict[str, Any]:
        voices = [
            {"id": v.id, "name": v.name, "language": v.language, "gender": v.gender}
            for v in self.engine.voices()
        ]
        return {"task": "tts", **self.engine.describe(), "voices": voices}

    def run_batch(self, jobs: Sequence[Job]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(jobs)
        requests = []
        index = []
        for i, job in enumerate(jobs):
            try:
                req = tts_request_from_job(job.meta)
                if not req.text.strip():
                    raise EmptyInput("text is empty")
                requests.append(req)
                index.append(i)
            except Exception as exc:
                outcomes[i] = Outcome(Result(error=_as_error(exc)))
        if requests:
            results = _run_isolated(self.engine.synthesize_batch, requests)
            for i, res in zip(index, results, strict=True):
                if isinstance(res, TtsResult):
                    seconds = len(res.audio) / res.sample_rate
                    header = {"sample_rate": res.sample_rate, "duration": seconds, "encoding": "pcm_s16le"}
                    outcomes[i] = Outcome(Result(header=header, body=pcm16_from_float(res.audio)), seconds)
                else:
                    outcomes[i] = Outcome(Result(error=_as_error(res)))
        return [o for o in outcomes if o is not None]

    def run_stream(self, job: Job, emit: Callable[[bytes, int], bool]) -> Outcome:
        """Synthesize one streaming job piece by piece, handing each chunk (PCM16, rate) to ``emit`` as soon as
        the engine yields it; ``emit`` returning False (the reader left) stops the synthesis."""
        try:
            req = tts_request_from_job(job.meta)
            if not req.text.strip():
                raise EmptyInput("text is empty")
            rate = int(self.engine.sample_rate)
            chunks = samples = 0
            for piece in split_for_streaming(req.text) or [req.text]:
                sub = TtsRequest(text=piece, voice=req.voice, speed=req.speed, language=req.language)
                for audio in self.engine.synthesize_stream(sub):
                    if audio.size == 0:
                        continue
                    chunks += 1
                    samples += int(audio.size)
                    if not emit(pcm16_from_float(audio), rate):
                        raise ClientClosedRequest("the stream's reader went away")
            if chunks == 0:
                raise EmptyInput("the text contains nothing that can be spoken")
        except Exception as exc:
            return Outcome(Result(error=_as_error(exc)))
        seconds = samples / rate
        header = {"sample_rate": rate, "duration": seconds, "chunks": chunks, "encoding": "pcm_s16le"}
        return Outcome(Result(header=header), seconds)


def _run_isolated(batch_fn: Any, requests: list[Any]) -> list[Any]:
    """Run a batch; if the engine fails the batch as a whole, retry item by item so one bad item fails alone."""
    try:
        results = list(batch_fn(requests))
        if len(results) != len(requests):
            raise EngineError(f"engine returned {len(results)} results for {len(requests)} requests")
        return results
    except Exception as exc:
        if len(requests) == 1:
            return [exc]
    out: list[Any] = []
    for req in requests:
        try:
            out.extend(batch_fn([req]))
        except Exception as exc:
            out.append(exc)
    return out


def make_handler(task: str, engine: Any) -> TaskHandler:
    if task == "asr":
        return AsrHandler(engine)
    if task == "tts":
        return TtsHandler(engine)
    raise InvalidInput(f"unknown task '{task}' (expected asr or tts)")
