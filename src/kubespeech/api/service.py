"""The one service layer under every surface: resolve the model, check the license, decode, enqueue, wait,
encode, meter. Route modules only translate their surface's request/response shapes to and from these calls.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import orjson
import soxr
from redis.exceptions import RedisError

from kubespeech.api import metrics
from kubespeech.api.cache import CacheEntry, ResultCache, TaskCache, cache_control, normalize_text
from kubespeech.api.middleware import client_gone_var
from kubespeech.api.registry import ModelInfo, ModelRegistry
from kubespeech.api.settings import ApiSettings
from kubespeech.audio import (
    AudioLimits,
    DecodedAudio,
    decode_audio,
    decode_raw_pcm,
    encode_audio,
    resample_pcm16,
)
from kubespeech.audio.sniff import WAV, sniff_format
from kubespeech.errors import (
    ClientClosedRequest,
    DeadlineExceeded,
    EmptyInput,
    InvalidInput,
    KubespeechError,
    NoWorkers,
    ServiceUnavailable,
    TextTooLong,
)
from kubespeech.jobs import JobClient, Result, Ticket
from kubespeech.jobs.messages import ASR_SAMPLE_RATE, asr_meta, tts_meta

log = logging.getLogger(__name__)

T = TypeVar("T")

_LANGUAGE = re.compile(r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$")
# Language values that mean "detect it" (Smallest's regional aggregators, OpenAI's omission).
_AUTO_LANGUAGES = {"auto", "multi", "multi-eu", "multi-asian", "multi-indic", "detect"}
# Work that takes longer than this on the event loop goes to a thread instead.
_INLINE_DECODE_BYTES = 256 * 1024
_INLINE_ENCODE_FORMATS = {"pcm", "wav", "mulaw", "ulaw", "alaw"}


async def _while_client_waits(work: Coroutine[Any, Any, T]) -> T:
    """Run ``work`` to its end, or cancel it (its cleanup done) and raise 499 once the HTTP client has gone."""
    client_gone = client_gone_var.get()
    if client_gone is None:
        return await work
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(client_gone())
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        task.cancel()
        # The work's cleanup (abandoning its job) must be over before the request ends.
        await asyncio.wait((task, gone))
    if task.cancelled():
        raise ClientClosedRequest("the client disconnected before its answer was ready")
    return task.result()


def normalize_language(language: str | None) -> str | None:
    """ISO 639 code for the engine (``en-US`` -> ``en``), None for auto-detection; 422 for junk."""
    if language is None or language == "":
        return None
    lang = language.strip()
    if lang.lower() in _AUTO_LANGUAGES:
        return None
    if not _LANGUAGE.match(lang):
        raise InvalidInput(f"language '{language[:40]}' is not a language code", param="language")
    return lang.split("-")[0].split("_")[0].lower()


@dataclass(slots=True)
class TranscribeRequest:
    audio: bytes
    model: str | None = None
    language: str | None = None
    word_timestamps: bool = False
    prompt: str | None = None
    temperature: float = 0.0
    raw_sample_rate: int | None = None  # set for headerless PCM
    raw_encoding: str = "linear16"
    raw_channels: int = 1
    surface: str = "waves"
    cache_control: str | None = None  # the request's Cache-Control header (no-cache, no-store)


@dataclass(slots=True)
class Transcript:
    model: str
    text: str
    language: str | None
    duration: float
    words: list[dict[str, Any]]
    segments: list[dict[str, Any]]
    source_format: str
    source_sample_rate: int
    source_channels: int
    file_size: int
    processing_ms: float
    cache: str | None = None  # "hit" or "miss"; None when the STT cache is off


@dataclass(slots=True)
class SynthesizeRequest:
    text: str
    model: str | None = None
    voice: str | None = None
    speed: float = 1.0
    language: str | None = None
    sample_rate: int | None = None  # None: the model's native rate
    output_format: str = "wav"
    surface: str = "waves"
    cache_control: str | None = None  # the request's Cache-Control header (no-cache, no-store)


@dataclass(slots=True)
class Speech:
    model: str
    voice: str | None
    audio: bytes
    content_type: str
    sample_rate: int
    duration: float
    output_format: str
    extra: dict[str, Any] = field(default_factory=dict)
    cache: str | None = None  # "hit" or "miss"; None when the TTS cache is off


class SpeechService:
    def __init__(
        self,
        settings: ApiSettings,
        jobs: JobClient,
        registry: ModelRegistry,
        license_gate: Any,
        usage: Any,
        cache: ResultCache | None = None,
    ) -> None:
        self.settings = settings
        self.cache = cache
        self.jobs = jobs
        self.registry = registry
        self.license = license_gate
        self.usage = usage
        self.audio_limits = AudioLimits(
            max_bytes=settings.limits.max_upload_bytes, max_seconds=settings.limits.max_audio_seconds
        )
        self._background: set[asyncio.Task[None]] = set()

    # -- plumbing -------------------------------------------------------------------------------------

    def _record(
        self,
        feature: str,
        model: str,
        audio_seconds: float,
        characters: int,
        status: int,
        *,
        cached: bool = False,
    ) -> None:
        """Meter a finished request without making the client wait for the Redis write; a cache hit is
        usage like any other, flagged as cached."""
        if self.usage is None:
            return
        flag: dict[str, Any] = {"cached": True} if cached else {}
        if hasattr(self.usage, "enqueue"):
            # Buffered recorder: no I/O here; it writes a batch per flush interval.
            self.usage.enqueue(
                feature=feature,
                model=model,
                audio_seconds=audio_seconds,
                characters=characters,
                status_code=status,
                **flag,
            )
            return
        task = asyncio.create_task(
            self.usage.record(
                feature=feature,
                model=model,
                audio_seconds=audio_seconds,
                characters=characters,
                status_code=status,
                **flag,
            )
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait for pending usage writes (on shutdown)."""
        if self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
        if hasattr(self.usage, "aclose"):
            await self.usage.aclose()

    async def _call(self, model: ModelInfo, meta: dict[str, Any], payload: bytes) -> Result:
        try:
            return await self._call_queue(model, meta, payload)
        except (RedisError, OSError) as exc:
            # Nothing was acknowledged to the client; it may retry once Redis is back.
            raise ServiceUnavailable(
                f"the job queue is unreachable ({type(exc).__name__}); retry shortly",
                retry_after=float(self.settings.limits.retry_after_s),
            ) from None

    async def _call_queue(self, model: ModelInfo, meta: dict[str, Any], payload: bytes) -> Result:
        timeout = self.settings.limits.request_timeout_s
        if self.registry.live.get(model.name, 0) > 0:
            return await self.jobs.call(model.name, meta, payload, timeout_s=timeout)
        return await _while_client_waits(self._cold_start(model, meta, payload, timeout))

    async def _cold_start(
        self, model: ModelInfo, meta: dict[str, Any], payload: bytes, timeout: float
    ) -> Result:
        """Hold a request while its model's pool scales from zero, for at most min(deadline, cold-start wait).

        The job is enqueued first, so the queue depth the autoscaler watches shows the demand. Whenever the
        caller stops waiting without a result (503, client gone, deadline, Redis trouble) the job is
        abandoned: unless a worker already holds it, it becomes a tombstone that no engine will run.
        """
        started = time.monotonic()
        ticket = await self.jobs.enqueue(model.name, meta, payload, timeout_s=timeout)
        wait = model.cold_start_wait_s
        hold = min(timeout, self.settings.limits.cold_start_wait_s if wait is None else wait)
        decided = False
        settled = False  # finished, abandoned, or held by a worker: nothing left to undo
        try:
            state: str = "up"
            if not await self.registry.wait_for_worker(model.name, hold):
                state = await self.jobs.abandon(ticket)
                settled = True
            decided = True
            held = time.monotonic() - started
            if state == "gone":
                # Finished between the last look and the abandon (its result is waiting), or lost by Redis.
                try:
                    result = await self.jobs.wait(ticket.job_id, 0.01)
                except DeadlineExceeded:
                    state = "abandoned"
                else:
                    self._cold_start_outcome(model.name, "served", held)
                    return result.raise_for_error()
            if state == "abandoned":
                self._cold_start_outcome(model.name, "unavailable", held)
                raise NoWorkers(
                    f"no worker serves model '{model.name}' yet (cold start); retry shortly",
                    retry_after=float(self.settings.limits.retry_after_s),
                    model=model.name,
                )
            # A worker is up, or one took the job between the last look and the abandon ("claimed").
            self._cold_start_outcome(model.name, "served", held)
            result = await self.jobs.wait(ticket.job_id, max(timeout - (time.monotonic() - started), 0.05))
            settled = True
            return result.raise_for_error()
        except asyncio.CancelledError:
            if not decided:
                metrics.COLD_STARTS.labels(model.name, "disconnected").inc()
            raise
        finally:
            if not settled:
                await self._abandon(ticket)

    @staticmethod
    def _cold_start_outcome(model: str, outcome: str, held_s: float) -> None:
        metrics.COLD_STARTS.labels(model, outcome).inc()
        metrics.COLD_START_WAIT.labels(model, outcome).observe(held_s)

    async def _abandon(self, ticket: Ticket) -> None:
        """Abandon a job whose caller has gone; shielded, so a second cancellation cannot cut it short."""
        try:
            await asyncio.shield(self.jobs.abandon(ticket))
        except (RedisError, OSError) as exc:
            log.warning(
                "could not abandon a job whose caller has gone; it keeps its deadline",
                extra={
                    "job_id": ticket.job_id,
                    "model": ticket.model,
                    "error": f"{type(exc).__name__}: {exc}",
                },
            )

    async def _check_license(self, feature: str) -> None:
        if self.license is not None:
            await self.license.check(feature)

    # -- result cache ---------------------------------------------------------------------------------

    def _cache_for(self, task: str, model: ModelInfo) -> TaskCache | None:
        """The task's cache, when it is on and the model's revision is known (no revision, no safe key)."""
        if self.cache is None or model.revision is None:
            return None
        cache = self.cache.tts if task == "tts" else self.cache.asr
        return cache if cache.enabled else None

    @staticmethod
    def _lookup_allowed(cache: TaskCache, header: str | None) -> tuple[bool, bool]:
        read, write = cache_control(header)
        if not read:
            cache.count("bypass")
        return read, write

    # -- speech to text -------------------------------------------------------------------------------

    def _decode(self, req: TranscribeRequest) -> DecodedAudio:
        if req.raw_sample_rate is not None:
            return decode_raw_pcm(
                req.audio,
                sample_rate=req.raw_sample_rate,
                target_rate=ASR_SAMPLE_RATE,
                channels=req.raw_channels,
                encoding=req.raw_encoding,
                limits=self.audio_limits,
            )
        return decode_audio(req.audio, target_rate=ASR_SAMPLE_RATE, limits=self.audio_limits)

    async def transcribe(self, req: TranscribeRequest) -> Transcript:
        started = time.perf_counter()
        model_name = req.model or ""
        status = 500
        seconds = 0.0
        cached = False
        try:
            model = self.registry.resolve(req.model, "asr")
            model_name = model.name
            language = normalize_language(req.language)
            if not 0.0 <= req.temperature <= 1.0:
                raise InvalidInput("temperature must be between 0 and 1", param="temperature")
            if req.prompt is not None and len(req.prompt) > 2000:
                raise InvalidInput("prompt is longer than 2000 characters", param="prompt")
            await self._check_license("asr")
            inline = len(req.audio) <= _INLINE_DECODE_BYTES and (
                req.raw_sample_rate is not None or sniff_format(req.audio) == WAV
            )
            decoded = self._decode(req) if inline else await asyncio.to_thread(self._decode, req)
            seconds = decoded.duration
            metrics.AUDIO_SECONDS_IN.labels(req.surface, model.name).inc(seconds)
            meta = asr_meta(
                language=language,
                word_timestamps=req.word_timestamps,
                prompt=req.prompt or None,
                temperature=req.temperature,
            )
            head: dict[str, Any] | None = None
            cache = self._cache_for("asr", model)
            cache_state: str | None = None
            if cache is not None:
                read, write = self._lookup_allowed(cache, req.cache_control)
                params = {"model": model.name, "rev": model.revision, "meta": meta}
                digest = cache.digest(params, decoded.pcm16)
                entry = await cache.get(digest) if read else None
                cached = entry is not None and "text" in entry.header
                head = entry.header if cached and entry is not None else None
                cache_state = "hit" if cached else "miss"
            if head is None:
                result = await self._call(model, meta, decoded.pcm16)
                head = result.header
                if cache is not None and write and head.get("rev") == model.revision:
                    keep = ("text", "language", "duration", "words", "segments")
                    await cache.put(digest, {k: head[k] for k in keep if k in head}, b"")
            status = 200
            return Transcript(
                model=model.name,
                text=str(head.get("text") or "").strip(),
                language=head.get("language") or language,
                duration=float(head.get("duration") or decoded.duration),
                words=list(head.get("words") or []),
                segments=list(head.get("segments") or []),
                source_format=decoded.source_format,
                source_sample_rate=decoded.source_sample_rate,
                source_channels=decoded.source_channels,
                file_size=len(req.audio),
                processing_ms=(time.perf_counter() - started) * 1000,
                cache=cache_state,
            )
        except KubespeechError as exc:
            status = exc.http_status
            if isinstance(exc, DeadlineExceeded | NoWorkers) or exc.http_status >= 500:
                metrics.JOB_ERRORS.labels(model_name or "-", exc.code).inc()
            raise
        finally:
            self._record("asr", model_name, seconds, 0, status, cached=cached)

    # -- text to speech -------------------------------------------------------------------------------

    async def _tts_job(
        self, model: ModelInfo, req: SynthesizeRequest, *, stream: bool
    ) -> tuple[str | None, dict[str, Any]]:
        """Validate a synthesis request (text, voice, language, license) and build its job's meta."""
        chars = len(req.text)
        if not req.text.strip():
            raise EmptyInput("text is empty", param="text")
        if chars > self.settings.limits.max_text_chars:
            raise TextTooLong(
                f"text is {chars} characters long; the limit is {self.settings.limits.max_text_chars}",
                param="text",
                limit_chars=self.settings.limits.max_text_chars,
            )
        voice = self.registry.resolve_voice(model, req.voice)
        language = normalize_language(req.language)
        await self._check_license("tts")
        metrics.CHARACTERS_IN.labels(req.surface, model.name).inc(chars)
        text = req.text
        if self._cache_for("tts", model) is not None:
            # The engine speaks exactly the text the cache key names, so an entry is what this text sounds like.
            text = normalize_text(text)
        meta = tts_meta(text=text, voice=voice, speed=req.speed, language=language, stream=stream)
        return voice, meta

    def _tts_cache(
        self, model: ModelInfo, req: SynthesizeRequest, meta: dict[str, Any], stream: bool
    ) -> tuple[TaskCache, str, bool, bool] | None:
        """(cache, digest, read, write) for a synthesis; None when the TTS cache does not apply.

        The job's meta is the engine's whole input (normalized text, voice, speed, language); a whole-file
        answer adds its rate and format, a stream only its rate (its chunks are PCM, encoded per chunk).
        """
        cache = self._cache_for("tts", model)
        if cache is None:
            return None
        read, write = self._lookup_allowed(cache, req.cache_control)
        params: dict[str, Any] = {"model": model.name, "rev": model.revision, "meta": meta}
        params["sample_rate"] = req.sample_rate
        if not stream:
            params["format"] = req.output_format
        return cache, cache.digest(params), read, write

    async def open_stream(self, req: SynthesizeRequest) -> SpeechStream | CachedSpeechStream:
        """Start a streaming synthesis and wait for its first chunk.

        Waiting for the first chunk before answering keeps every failure that happens before any audio
        (unknown voice, no worker, full queue, an engine refusing the text) an ordinary error response;
        only failures after the first chunk reach the client inside the stream.
        """
        model_name = req.model or ""
        try:
            model = self.registry.resolve(req.model, "tts")
            model_name = model.name
            voice, meta = await self._tts_job(model, req, stream=True)
            lookup = self._tts_cache(model, req, meta, stream=True)
            store: tuple[TaskCache, str, str | None] | None = None
            if lookup is not None:
                cache, digest, read, write = lookup
                entry = await cache.get(digest) if read else None
                replay = CachedSpeechStream.of(self, model.name, voice, req, entry) if entry else None
                if replay is not None:
                    return replay
                if write:
                    store = (cache, digest, model.revision)
            timeout = self.settings.limits.request_timeout_s
            try:
                ticket = await self.jobs.enqueue(model.name, meta, b"", timeout_s=timeout)
            except (RedisError, OSError) as exc:
                raise self._queue_unreachable(exc) from None
            reader = _ChunkReader(self.jobs, ticket, time.monotonic() + timeout)
            try:
                first = await _while_client_waits(self._first_chunk(model, ticket, reader))
            except BaseException:
                self._stop_stream(reader)
                raise
            return SpeechStream(self, model.name, voice, req, reader, first, store=store)
        except KubespeechError as exc:
            if isinstance(exc, DeadlineExceeded | NoWorkers) or exc.http_status >= 500:
                metrics.JOB_ERRORS.labels(model_name or "-", exc.code).inc()
            self._record("tts", model_name, 0.0, len(req.text), exc.http_status)
            raise

    def _queue_unreachable(self, exc: BaseException) -> ServiceUnavailable:
        return ServiceUnavailable(
            f"the job queue is unreachable ({type(exc).__name__}); retry shortly",
            retry_after=float(self.settings.limits.retry_after_s),
        )

    async def _first_chunk(self, model: ModelInfo, ticket: Ticket, reader: _ChunkReader) -> tuple[bytes, int]:
        try:
            if self.registry.live.get(model.name, 0) == 0:
                await self._hold_stream(model, ticket, reader)
            first = await reader.next()
        except (RedisError, OSError) as exc:
            raise self._queue_unreachable(exc) from None
        if first is None:
            raise EmptyInput("the text contains nothing that can be spoken", param="text")
        return first

    async def _hold_stream(self, model: ModelInfo, ticket: Ticket, reader: _ChunkReader) -> None:
        """Hold a stream's job while its model's pool scales from zero (like ``_cold_start``, same metrics)."""
        started = time.monotonic()
        wait = model.cold_start_wait_s
        hold = self.settings.limits.cold_start_wait_s if wait is None else wait
        hold = min(hold, max(reader.deadline - started, 0.0))
        try:
            up = await self.registry.wait_for_worker(model.name, hold)
        except asyncio.CancelledError:
            metrics.COLD_STARTS.labels(model.name, "disconnected").inc()
            raise
        held = time.monotonic() - started
        # Unless a worker took the job between the last look and the abandon, nobody will.
        if not up and await self.jobs.abandon(ticket) == "abandoned":
            reader.finished = True
            self._cold_start_outcome(model.name, "unavailable", held)
            raise NoWorkers(
                f"no worker serves model '{model.name}' yet (cold start); retry shortly",
                retry_after=float(self.settings.limits.retry_after_s),
                model=model.name,
            )
        self._cold_start_outcome(model.name, "served", held)

    def _stop_stream(self, reader: _ChunkReader) -> None:
        """Stop the job of a stream nobody reads any more (abandon it, or make its worker stop), without
        waiting: this runs while the request is being torn down, where an await may be cancelled again."""
        if reader.finished:
            return
        reader.finished = True

        async def stop() -> None:
            try:
                if await self.jobs.abandon(reader.ticket) != "abandoned":
                    await self.jobs.stop_stream(reader.ticket.job_id)
            except (RedisError, OSError) as exc:
                log.warning(
                    "could not stop a stream whose client has gone",
                    extra={"job_id": reader.ticket.job_id, "error": f"{type(exc).__name__}: {exc}"},
                )

        task = asyncio.create_task(stop())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _encode(self, pcm: bytes, src_rate: int, dst_rate: int, fmt: str) -> tuple[bytes, str]:
        return encode_audio(resample_pcm16(pcm, src_rate, dst_rate), dst_rate, fmt)

    async def synthesize(self, req: SynthesizeRequest) -> Speech:
        model_name = req.model or ""
        status = 500
        chars = len(req.text)
        out_seconds = 0.0
        cached = False
        try:
            model = self.registry.resolve(req.model, "tts")
            model_name = model.name
            voice, meta = await self._tts_job(model, req, stream=False)
            lookup = self._tts_cache(model, req, meta, stream=False)
            if lookup is not None:
                cache, digest, read, write = lookup
                entry = await cache.get(digest) if read else None
                speech = _speech_from_entry(model.name, voice, req, entry) if entry else None
                if speech is not None:
                    cached = True
                    out_seconds = speech.duration
                    metrics.AUDIO_SECONDS_OUT.labels(req.surface, model.name).inc(out_seconds)
                    status = 200
                    return speech
            result = await self._call(model, meta, b"")
            src_rate = int(result.header.get("sample_rate") or model.sample_rate or 22050)
            dst_rate = req.sample_rate or src_rate
            pcm = result.body
            if req.output_format in _INLINE_ENCODE_FORMATS and (src_rate == dst_rate or len(pcm) < 64 * 1024):
                audio, content_type = self._encode(pcm, src_rate, dst_rate, req.output_format)
            else:
                audio, content_type = await asyncio.to_thread(
                    self._encode, pcm, src_rate, dst_rate, req.output_format
                )
            out_seconds = len(pcm) / 2 / src_rate
            metrics.AUDIO_SECONDS_OUT.labels(req.surface, model.name).inc(out_seconds)
            if lookup is not None and write and result.header.get("rev") == model.revision:
                head = {"content_type": content_type, "sample_rate": dst_rate, "duration": out_seconds}
                await cache.put(digest, head, audio)
            status = 200
            return Speech(
                model=model.name,
                voice=voice,
                audio=audio,
                content_type=content_type,
                sample_rate=dst_rate,
                duration=out_seconds,
                output_format=req.output_format,
                cache=None if lookup is None else "miss",
            )
        except KubespeechError as exc:
            status = exc.http_status
            if isinstance(exc, DeadlineExceeded | NoWorkers) or exc.http_status >= 500:
                metrics.JOB_ERRORS.labels(model_name or "-", exc.code).inc()
            raise
        finally:
            self._record("tts", model_name, out_seconds, chars, status, cached=cached)


def _speech_from_entry(
    model: str, voice: str | None, req: SynthesizeRequest, entry: CacheEntry
) -> Speech | None:
    """A cached whole-file answer, or None when the entry is not one (read as a miss)."""
    try:
        return Speech(
            model=model,
            voice=voice,
            audio=entry.body,
            content_type=str(entry.header["content_type"]),
            sample_rate=int(entry.header["sample_rate"]),
            duration=float(entry.header["duration"]),
            output_format=req.output_format,
            cache="hit",
        )
    except (KeyError, TypeError, ValueError):
        return None


class _ChunkReader:
    """Reads one streaming job's chunk stream in order (XREAD BLOCK), skipping the chunks a job restarted
    by another worker (after its first worker died) sends again: every seq at or below the last one read."""

    def __init__(self, jobs: JobClient, ticket: Ticket, deadline: float) -> None:
        self.jobs = jobs
        self.ticket = ticket
        self.deadline = deadline  # time.monotonic()
        self.last_id = "0-0"
        self.last_seq = -1
        self.finished = False
        self.revision: str | None = None  # the model revision the terminal entry names
        self.restarted = False  # another worker redid the job: its chunks may come from two workers
        self._pending: deque[tuple[str, dict[bytes, bytes]]] = deque()

    async def next(self) -> tuple[bytes, int] | None:
        """The next new chunk (PCM16, its rate), None once the job is done; raises the job's error."""
        while True:
            while self._pending:
                _, fields = self._pending.popleft()
                if b"e" in fields:
                    self.finished = True
                    raise KubespeechError.from_dict(orjson.loads(fields[b"e"]))
                if b"done" in fields:
                    self.finished = True
                    rev = fields.get(b"rev")
                    self.revision = rev.decode() if rev else None
                    return None
                seq = int(fields[b"seq"])
                if seq <= self.last_seq:
                    self.restarted = True
                    continue
                self.last_seq = seq
                return fields[b"pcm"], int(fields[b"sr"])
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded(
                    "the stream did not finish before its deadline", job_id=self.ticket.job_id
                )
            # Short blocks: a connection never sits in one read long enough to meet a socket timeout.
            entries = await self.jobs.read_chunks(self.ticket.job_id, self.last_id, min(left, 5.0))
            if entries:
                self.last_id = entries[-1][0]
                self._pending.extend(entries)


class SpeechStream:
    """A synthesis whose audio arrives chunk by chunk: iterate ``pcm()`` once for 16-bit mono PCM at
    ``sample_rate`` (the requested rate, else the engine's); closing it early stops the job."""

    def __init__(
        self,
        service: SpeechService,
        model: str,
        voice: str | None,
        req: SynthesizeRequest,
        reader: _ChunkReader,
        first: tuple[bytes, int],
        *,
        store: tuple[TaskCache, str, str | None] | None = None,
    ) -> None:
        self.service = service
        self.model = model
        self.voice = voice
        self.req = req
        self.reader = reader
        self._first = first
        self.source_rate = first[1]
        self.sample_rate = req.sample_rate or first[1]
        self.job_id = reader.ticket.job_id
        self.samples_out = 0
        self.chunks_out = 0
        self.cache: str | None = None if store is None else "miss"
        # (cache, digest, revision) to store the stream's audio under once it ends well.
        self._store = store
        self._kept: list[bytes] | None = [] if store is not None else None
        self._kept_bytes = 0
        # One resampler for the whole stream: resampling chunks one by one would click at every seam.
        self._resampler = (
            soxr.ResampleStream(self.source_rate, self.sample_rate, 1, dtype="int16", quality="HQ")
            if self.sample_rate != self.source_rate
            else None
        )

    @property
    def duration(self) -> float:
        return self.samples_out / self.sample_rate

    def _convert(self, pcm: bytes, rate: int, last: bool = False) -> bytes:
        if self._resampler is None:
            return pcm
        if rate != self.source_rate:
            # Another worker (another voice config) answered a restarted job at another rate.
            pcm = resample_pcm16(pcm, rate, self.source_rate)
        ints = np.frombuffer(pcm[: len(pcm) - len(pcm) % 2], dtype="<i2")
        return bytes(self._resampler.resample_chunk(ints, last=last).astype("<i2").tobytes())

    def _keep(self, out: bytes) -> None:
        if self._kept is None or self._store is None:
            return
        self._kept_bytes += len(out)
        if self._kept_bytes > self._store[0].settings.max_bytes:
            self._kept = None  # it could never fit; stop holding it
            return
        self._kept.append(out)

    async def _store_kept(self) -> None:
        if self._store is None or self._kept is None or not self._kept:
            return
        cache, digest, revision = self._store
        # Only audio one worker produced with the revision the key names (a restarted job may mix two).
        if self.reader.restarted or self.reader.revision != revision:
            return
        head = {"sample_rate": self.sample_rate, "chunks": [len(c) for c in self._kept]}
        await cache.put(digest, head, b"".join(self._kept))

    async def pcm(self) -> AsyncIterator[bytes]:
        status = 500
        try:
            item: tuple[bytes, int] | None = self._first
            while item is not None:
                out = self._convert(*item)
                if out:
                    self.samples_out += len(out) // 2
                    self.chunks_out += 1
                    self._keep(out)
                    yield out
                item = await self.reader.next()
            if self._resampler is not None:
                tail = self._convert(b"", self.source_rate, last=True)
                if tail:
                    self.samples_out += len(tail) // 2
                    self.chunks_out += 1
                    self._keep(tail)
                    yield tail
            await self._store_kept()
            status = 200
        except KubespeechError as exc:
            status = exc.http_status
            raise
        except (RedisError, OSError) as exc:
            status = 503
            raise self.service._queue_unreachable(exc) from None
        finally:
            self.service._stop_stream(self.reader)
            metrics.AUDIO_SECONDS_OUT.labels(self.req.surface, self.model).inc(self.duration)
            self.service._record("tts", self.model, self.duration, len(self.req.text), status)


class CachedSpeechStream:
    """A stream answered from the cache: the stored PCM replayed in the chunks it was first sent in."""

    cache = "hit"
    job_id = None

    def __init__(
        self,
        service: SpeechService,
        model: str,
        voice: str | None,
        req: SynthesizeRequest,
        sample_rate: int,
        chunks: list[bytes],
    ) -> None:
        self.service = service
        self.model = model
        self.voice = voice
        self.req = req
        self.sample_rate = self.source_rate = sample_rate
        self._chunks = chunks
        self.samples_out = 0
        self.chunks_out = 0

    @classmethod
    def of(
        cls, service: SpeechService, model: str, voice: str | None, req: SynthesizeRequest, entry: CacheEntry
    ) -> CachedSpeechStream | None:
        """The replay of ``entry``, or None when it is not a stream's entry (read as a miss)."""
        try:
            rate = int(entry.header["sample_rate"])
            lengths = [int(n) for n in entry.header["chunks"]]
        except (KeyError, TypeError, ValueError):
            return None
        if rate <= 0 or sum(lengths) != len(entry.body):
            return None
        chunks, at = [], 0
        for n in lengths:
            chunks.append(entry.body[at : at + n])
            at += n
        return cls(service, model, voice, req, rate, chunks)

    @property
    def duration(self) -> float:
        return self.samples_out / self.sample_rate

    async def pcm(self) -> AsyncIterator[bytes]:
        status = 499  # a client that leaves mid-replay is metered as such
        try:
            for chunk in self._chunks:
                self.samples_out += len(chunk) // 2
                self.chunks_out += 1
                yield chunk
            status = 200
        finally:
            metrics.AUDIO_SECONDS_OUT.labels(self.req.surface, self.model).inc(self.duration)
            self.service._record("tts", self.model, self.duration, len(self.req.text), status, cached=True)
