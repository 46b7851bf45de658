"""NVIDIA NeMo speech recognition: any ASR ``.nemo`` checkpoint (CTC, RNNT, TDT, hybrid) with batched inference.

A worker micro-batch becomes one batched forward pass: the items are sorted by length (so that, when a batch
is split to bound memory, similar lengths share padding), padded by NeMo's collate function and run through
the model's own ``transcribe()`` with ``batch_size`` equal to the batch, i.e. one preprocessor + encoder +
decoding call. ``last_batch_sizes`` records the batch size the encoder actually saw on each forward pass, so
tests and benchmarks can check that batching happens inside the model and not only in the worker loop.

NeMo and torch are imported when the engine loads, never when kubespeech is imported.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from kubespeech.engines.base import AsrRequest, AsrResult, Audio, Segment, StreamEvent, Word
from kubespeech.errors import AudioTooLong, CorruptAudio, EmptyInput, EngineError, InvalidInput

log = logging.getLogger(__name__)

# NeMo pads clips shorter than this on both sides (which would shift word times); padding them on the right
# ourselves keeps timestamps aligned with the caller's audio.
_MIN_SECONDS = 1.0


def _model_kind(model: Any) -> str:
    """A short name for the model family, shown in ``describe()``."""
    cls = type(model).__name__
    decoding = getattr(getattr(model, "cfg", None), "decoding", None)
    model_type = str(decoding.get("model_type", "")) if decoding is not None else ""
    if "Hybrid" in cls:
        return "hybrid-rnnt-ctc"
    if "MultiTask" in cls or "AED" in cls:
        return "aed"
    if "RNNT" in cls:
        return "tdt" if model_type == "tdt" else "rnnt"
    if "CTC" in cls:
        return "ctc"
    return cls


def resolve_precision(precision: str, device: str) -> str:
    """fp32 on CPU; on CUDA ``auto`` picks bf16 where the GPU supports it, else fp16."""
    precision = precision.lower()
    if precision not in {"auto", "fp32", "fp16", "bf16"}:
        raise InvalidInput(f"precision '{precision}' is not one of auto, fp32, fp16, bf16")
    if not device.startswith("cuda"):
        return "fp32"
    if precision != "auto":
        return precision
    import torch

    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def engine_options(configure: Any, options: dict[str, Any], label: str) -> dict[str, Any]:
    """Engine options as ``configure`` takes them: camelCase keys (as written in a SpeechDeployment) become
    snake_case, and unknown keys are an InvalidInput naming them and the known ones."""
    known = [name for name in inspect.signature(configure).parameters if name != "self"]
    converted, unknown = {}, []
    for key, value in options.items():
        name = re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()
        if name not in known:
            unknown.append(key)
        converted[name] = value
    if unknown:
        raise InvalidInput(
            f"unknown {label} engine options: {', '.join(sorted(unknown))}; known: {', '.join(known)}"
        )
    return converted


def gpu_memory(device: str) -> dict[str, float] | None:
    """Memory the process holds on ``device`` (MiB), or None on CPU."""
    if not device.startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    dev = torch.device(device)
    total = torch.cuda.get_device_properties(dev).total_memory
    mib = 1024 * 1024
    return {
        "allocated_mib": round(torch.cuda.memory_allocated(dev) / mib, 1),
        "reserved_mib": round(torch.cuda.memory_reserved(dev) / mib, 1),
        "max_allocated_mib": round(torch.cuda.max_memory_allocated(dev) / mib, 1),
        "total_mib": round(total / mib, 1),
    }


def _release_cuda_cache(device: str) -> None:
    """After a failed pass (often out of memory) give cached blocks back before the retry."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


class NemoAsrEngine:
    """A NeMo ASR checkpoint behind the AsrEngine protocol.

    Options (``KUBESPEECH_WORKER_ENGINE_OPTIONS``): ``precision`` (auto|fp32|fp16|bf16; autocast on CUDA only),
    ``word_timestamps`` (compute word times when the model supports them; default true),
    ``max_batch_audio_s`` (split a micro-batch into length-sorted sub-batches whose padded audio stays under
    this many seconds; default: no split), ``max_audio_s`` (longest accepted clip), ``language`` (reported
    language), ``warmup`` (run one pass at load; default true), ``cpu_threads`` (torch threads on CPU), and
    the streaming knobs ``stream_chunk_s``, ``stream_max_segment_s``, ``stream_silence_s``,
    ``stream_silence_rms``, and ``decoding`` (merged into the model's decoding config, e.g.
    ``{"strategy": "greedy_batch"}``). camelCase keys are accepted.
    """

    name = "nemo"

    def __init__(self, model_path: str | None = None, device: str = "cpu", **options: Any) -> None:
        if not model_path:
            raise InvalidInput(
                "the nemo engine needs model_path: a local .nemo file or a directory holding one"
                " (see `kubespeech model fetch`)"
            )
        self.model_path = str(model_path)
        self.device = device or "cpu"
        self._configure(**engine_options(self._configure, options, "nemo ASR"))
        self.sample_rate = 16000
        self.model: Any = None
        self.model_file = self.model_path
        self.kind = "unknown"
        self.timestamps_supported = False
        self.load_seconds = 0.0
        # Batch size of each encoder forward pass of the most recent transcribe_batch call, and since load.
        self.last_batch_sizes: list[int] = []
        self.batch_size_counts: Counter[int] = Counter()
        self._recording: list[int] | None = None
        self._lock = threading.Lock()
        self._window_stride = 0.01
        self._subsampling = 1

    def _configure(
        self,
        *,
        precision: str = "auto",
        word_timestamps: bool = True,
        max_batch_audio_s: float | None = None,
        max_audio_s: float | None = None,
        language: str = "en",
        warmup: bool = True,
        cpu_threads: int | None = None,
        stream_chunk_s: float = 1.0,
        stream_max_segment_s: float = 15.0,
        stream_silence_s: float = 0.6,
        stream_silence_rms: float = 0.01,
        decoding: dict[str, Any] | None = None,
    ) -> None:
        self.decoding_option = dict(decoding) if decoding else None
        self.precision_option = precision
        self.precision = "fp32"
        self.word_timestamps_option = bool(word_timestamps)
        self.max_batch_audio_s = float(max_batch_audio_s) if max_batch_audio_s else None
        self.max_audio_s = float(max_audio_s) if max_audio_s else None
        self.language = language
        self.warmup = bool(warmup)
        self.cpu_threads = int(cpu_threads) if cpu_threads else None
        self.stream_options = {
            "chunk_s": float(stream_chunk_s),
            "max_segment_s": float(stream_max_segment_s),
            "silence_s": float(stream_silence_s),
            "silence_rms": float(stream_silence_rms),
        }

    # ----- load -----------------------------------------------------------------------------------

    def load(self) -> None:
        if self.model is not None:
            return
        from kubespeech.models.nemo_files import resolve_model_file

        path = resolve_model_file(self.model_path)
        started = time.perf_counter()
        import torch

        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise EngineError(f"device '{self.device}' requested but torch sees no CUDA GPU")
        self.precision = resolve_precision(self.precision_option, self.device)
        if self.cpu_threads and not self.device.startswith("cuda"):
            torch.set_num_threads(self.cpu_threads)  # process-wide: a worker process serves one engine
        from nemo.collections.asr.models import ASRModel

        model = ASRModel.restore_from(str(path), map_location=torch.device(self.device))
        model.eval()
        self.model = model
        self.model_file = str(path)
        self.kind = _model_kind(model)
        cfg = model.cfg
        self.sample_rate = int(cfg.get("sample_rate", None) or cfg.preprocessor.get("sample_rate", 16000))
        self._window_stride = float(cfg.preprocessor.get("window_stride", 0.01) or 0.01)
        self._subsampling = int(getattr(getattr(model, "encoder", None), "subsampling_factor", 1) or 1)
        encoder = getattr(model, "encoder", None)
        if encoder is not None:
            encoder.register_forward_hook(self._on_encoder_forward, with_kwargs=True)
        if self.decoding_option:
            self._apply_decoding(self.decoding_option)
        if self.word_timestamps_option:
            self.timestamps_supported = self._enable_timestamps()
        if self.warmup:
            self._warm_up()
        self.load_seconds = time.perf_counter() - started
        log.info(
            "nemo ASR model loaded",
            extra={
                "model": path.name,
                "kind": self.kind,
                "device": self.device,
                "precision": self.precision,
                "seconds": round(self.load_seconds, 2),
                "timestamps": self.timestamps_supported,
            },
        )

    def _apply_decoding(self, overrides: dict[str, Any]) -> None:
        """Merge the ``decoding`` option (e.g. ``{"strategy": "greedy_batch"}``) into the model's decoding."""
        from omegaconf import OmegaConf, open_dict

        try:
            decoding = self.model.cfg.decoding
            with open_dict(decoding):
                merged = OmegaConf.merge(decoding, OmegaConf.create(overrides))
            self.model.change_decoding_strategy(merged, verbose=False)
            with open_dict(self.model.cfg):
                self.model.cfg.decoding = merged
        except Exception as exc:
            raise EngineError(
                f"decoding option {overrides} rejected by the model: {type(exc).__name__}: {exc}"
            ) from exc

    def _enable_timestamps(self) -> bool:
        """Ask the decoder for token/word offsets once, instead of rebuilding decoding on every batch."""
        from omegaconf import open_dict

        model = self.model
        try:
            decoding = model.cfg.decoding
            with open_dict(decoding):
                decoding.compute_timestamps = True
            model.change_decoding_strategy(decoding, verbose=False)
            return True
        except Exception as exc:
            log.warning(
                "word timestamps unavailable for this model", extra={"error": f"{type(exc).__name__}: {exc}"}
            )
            return False

    def _disable_timestamps(self) -> None:
        from omegaconf import open_dict

        with open_dict(self.model.cfg.decoding):
            self.model.cfg.decoding.compute_timestamps = False
        self.model.change_decoding_strategy(self.model.cfg.decoding, verbose=False)
        self.timestamps_supported = False

    def _warm_up(self) -> None:
        rng = np.random.default_rng(0)
        clip = (rng.standard_normal(self.sample_rate) * 0.01).astype(np.float32)
        try:
            self._forward([clip])
        except Exception as exc:
            if not self.timestamps_supported:
                raise
            # Some decoders (seen with TDT) fail while computing offsets: serve text without word times.
            log.warning("disabling word timestamps after a failed warm-up", extra={"error": f"{exc}"[:300]})
            self._disable_timestamps()
            self._forward([clip])
        self.batch_size_counts.clear()

    def _on_encoder_forward(self, _module: Any, args: Any, kwargs: Any, _output: Any) -> None:
        signal = kwargs.get("audio_signal") if kwargs else None
        if signal is None and args:
            signal = args[0]
        if signal is not None and self._recording is not None:
            self._recording.append(int(signal.shape[0]))

    # ----- batch inference -----------------------------------------------------------------------

    def autocast(self) -> Any:
        if not self.device.startswith("cuda") or self.precision == "fp32":
            return contextlib.nullcontext()
        import torch

        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type="cuda", dtype=dtype)

    def _forward(self, clips: list[Audio]) -> list[Any]:
        """One batched pass over ``clips`` (already validated); returns one NeMo hypothesis per clip."""
        min_len = int(_MIN_SECONDS * self.sample_rate)
        padded = [c if len(c) >= min_len else np.pad(c, (0, min_len - len(c))) for c in clips]
        recording: list[int] = []
        with self._lock:
            self._recording = recording
            try:
                with self.autocast():
                    out = self.model.transcribe(
                        padded,
                        batch_size=len(padded),
                        return_hypotheses=True,
                        num_workers=0,
                        verbose=False,
                    )
            finally:
                self._recording = None
            # Without an encoder hook (unusual model classes) count the call itself as one pass.
            passes = recording or [len(clips)]
            self.last_batch_sizes.extend(passes)
            self.batch_size_counts.update(passes)
        if isinstance(out, tuple):  # older RNNT APIs return (best, all)
            out = out[0]
        hyps = list(out)
        if len(hyps) != len(clips):
            raise EngineError(f"NeMo returned {len(hyps)} hypotheses for {len(clips)} clips")
        return hyps

    def _words(self, hyp: Any, offset_s: float = 0.0) -> list[Word]:
        stamps = getattr(hyp, "timestamp", None)
        if not isinstance(stamps, dict):
            return []
        frame = self._window_stride * self._subsampling
        words = []
        for item in stamps.get("word") or []:
            if "start" in item and "end" in item:
                start, end = float(item["start"]), float(item["end"])
            else:
                start, end = float(item["start_offset"]) * frame, float(item["end_offset"]) * frame
            words.append(Word(word=str(item.get("word", "")), start=offset_s + start, end=offset_s + end))
        return words

    def _result(self, hyp: Any, duration: float, with_words: bool, offset_s: float = 0.0) -> AsrResult:
        text = hyp if isinstance(hyp, str) else str(getattr(hyp, "text", "") or "")
        text = " ".join(text.split())
        words = self._words(hyp, offset_s) if with_words and self.timestamps_supported else []
        segments = [Segment(text=text, start=offset_s, end=offset_s + duration)] if text else []
        return AsrResult(text=text, language=self.language, duration=duration, words=words, segments=segments)

    def _validate(self, request: AsrRequest) -> Audio:
        audio = np.asarray(request.audio, dtype=np.float32)
        if audio.ndim != 1:
            raise CorruptAudio(f"expected mono audio (1-D), got shape {audio.shape}")
        if audio.size == 0:
            raise EmptyInput("audio is empty")
        if not np.isfinite(audio).all():
            raise CorruptAudio("audio contains NaN or infinite samples")
        seconds = audio.size / self.sample_rate
        if self.max_audio_s is not None and seconds > self.max_audio_s:
            raise AudioTooLong(
                f"audio of {seconds:.1f} s exceeds this model's limit of {self.max_audio_s:.0f} s"
            )
        return audio

    def _sub_batches(self, order: list[int], lengths: list[int]) -> Iterator[list[int]]:
        """Length-sorted sub-batches whose padded size (count x longest) fits ``max_batch_audio_s``."""
        if self.max_batch_audio_s is None:
            yield order
            return
        budget = self.max_batch_audio_s * self.sample_rate
        current: list[int] = []
        for i in order:  # longest first, so the first item of a sub-batch sets its padded length
            if current and (len(current) + 1) * lengths[current[0]] > budget:
                yield current
                current = []
            current.append(i)
        if current:
            yield current

    def transcribe_batch(self, requests: Sequence[AsrRequest]) -> list[AsrResult | Exception]:
        if self.model is None:
            raise EngineError("the nemo engine is not loaded")
        self.last_batch_sizes = []
        results: list[AsrResult | Exception | None] = [None] * len(requests)
        clips: dict[int, Audio] = {}
        for i, request in enumerate(requests):
            try:
                clips[i] = self._validate(request)
            except Exception as exc:
                results[i] = exc
        lengths = [len(clips[i]) if i in clips else 0 for i in range(len(requests))]
        order = sorted(clips, key=lambda i: lengths[i], reverse=True)
        pending = list(self._sub_batches(order, lengths))
        while pending:
            group = pending.pop(0)
            try:
                hyps = self._forward([clips[i] for i in group])
            except Exception as exc:
                if len(group) == 1:
                    results[group[0]] = exc
                    continue
                # The pass ran out of memory or one input broke it: halve the group (still length-sorted)
                # and retry, so memory fits again and a bad input ends up failing alone in log2(n) passes.
                log.warning(
                    "batched pass failed; retrying in halves",
                    extra={"batch": len(group), "error": f"{type(exc).__name__}: {exc}"[:300]},
                )
                _release_cuda_cache(self.device)
                half = len(group) // 2
                pending[:0] = [group[:half], group[half:]]
                continue
            for i, hyp in zip(group, hyps, strict=True):
                results[i] = self._result(hyp, lengths[i] / self.sample_rate, requests[i].word_timestamps)
        return [r if r is not None else EngineError("no result") for r in results]

    # ----- streaming --------------------------------------------------------------------------------

    def open_stream(
        self,
        language: str | None = None,
        word_timestamps: bool = False,
        eou_timeout_ms: int | None = None,
        *,
        start_sample: int = 0,
    ) -> NemoAsrStream:
        """A streaming session (see NemoAsrStream); ``eou_timeout_ms`` defaults to ``stream_silence_s``."""
        if self.model is None:
            raise EngineError("the nemo engine is not loaded")
        options = dict(self.stream_options)
        if eou_timeout_ms is not None:
            if not 50 <= eou_timeout_ms <= 10000:
                raise InvalidInput("eou_timeout_ms must be between 50 and 10000")
            options["silence_s"] = eou_timeout_ms / 1000
        if start_sample < 0:
            raise InvalidInput("start_sample must be >= 0")
        return NemoAsrStream(self, word_timestamps=word_timestamps, start_sample=start_sample, **options)

    def transcribe_segment(self, audio: Audio, offset_s: float, word_timestamps: bool) -> AsrResult:
        """Transcribe one streaming segment; word and segment times are shifted by ``offset_s``."""
        hyp = self._forward([audio])[0]
        return self._result(hyp, len(audio) / self.sample_rate, word_timestamps, offset_s)

    # ----- description ------------------------------------------------------------------------------

    def describe(self) -> dict[str, object]:
        info: dict[str, object] = {
            "engine": self.name,
            "model": Path(self.model_file).stem,
            "model_path": self.model_file,
            "kind": self.kind,
            "device": self.device,
            "precision": self.precision,
            "sample_rate": self.sample_rate,
            "languages": [self.language],
            "word_timestamps": self.timestamps_supported,
            "decoding": str(self.model.cfg.decoding.get("strategy", "")) if self.model is not None else None,
            "streaming": True,
            "load_seconds": round(self.load_seconds, 3),
        }
        memory = gpu_memory(self.device)
        if memory is not None:
            info["gpu_memory"] = memory
        return info


class NemoAsrStream:
    """Buffered streaming (base.AsrStream): re-decode the open segment every ``chunk_s`` of new audio.

    Energy endpointing: a segment opens at the first chunk louder than ``silence_rms`` and becomes a
    ``final`` event once its last ``silence_s`` are quiet (checked on every chunk) or it reaches
    ``max_segment_s``; while it is open, each ``chunk_s`` of new audio re-decodes the whole segment
    into a ``partial`` event (when its text changed). Re-decoding the growing segment is what works for
    every NeMo model kind (CTC, RNNT, TDT, AED) without a cache-aware encoder; its cost grows with the
    segment, which ``max_segment_s`` bounds.
    """

    def __init__(
        self,
        engine: NemoAsrEngine,
        *,
        word_timestamps: bool = False,
        chunk_s: float = 1.0,
        max_segment_s: float = 15.0,
        silence_s: float = 0.6,
        silence_rms: float = 0.01,
        start_sample: int = 0,
    ) -> None:
        self.engine = engine
        self.word_timestamps = word_timestamps
        rate = engine.sample_rate
        self.chunk = max(int(chunk_s * rate), 1)
        self.max_segment = max(int(max_segment_s * rate), self.chunk)
        self.silence = max(int(silence_s * rate), 1)
        self.silence_rms = silence_rms
        self._buffer: list[Audio] = []
        self._since_decode = 0
        self._segment_start = start_sample  # stream sample index of the buffer's first sample
        self._heard_speech = False
        self._last_partial = ""
        self._closed = False

    @property
    def committed_samples(self) -> int:
        """Stream sample index before which all audio is settled (see base.AsrStream)."""
        return self._segment_start

    def _segment_audio(self) -> Audio:
        if not self._buffer:
            return np.zeros(0, dtype=np.float32)
        if len(self._buffer) > 1:
            self._buffer = [np.concatenate(self._buffer)]
        return self._buffer[0]

    def _rms(self, audio: Audio) -> float:
        return float(math.sqrt(float(np.mean(np.square(audio, dtype=np.float64))))) if audio.size else 0.0

    def _speech_span(self, audio: Audio) -> tuple[int, int] | None:
        """The part of ``audio`` from the first to the last loud 20 ms frame, plus a margin on each side.

        Long pauses around an utterance are not what models are trained on (and per-utterance feature
        normalization shifts with them), so a segment is recognized without its surrounding quiet.
        """
        frame = max(int(0.02 * self.engine.sample_rate), 1)
        n = audio.size // frame
        if n == 0:
            return None
        energy = np.sqrt(np.mean(np.square(audio[: n * frame].reshape(n, frame), dtype=np.float64), axis=1))
        loud = np.flatnonzero(energy >= self.silence_rms)
        if loud.size == 0:
            return None
        margin = int(0.25 * self.engine.sample_rate)
        return max(int(loud[0]) * frame - margin, 0), min((int(loud[-1]) + 1) * frame + margin, audio.size)

    def _recognize(self, audio: Audio, kind: Literal["partial", "final"]) -> StreamEvent | None:
        span = self._speech_span(audio)
        if span is None:
            return None
        offset = (self._segment_start + span[0]) / self.engine.sample_rate
        # Word times only on finals: partials are revised anyway.
        with_words = self.word_timestamps and kind == "final"
        result = self.engine.transcribe_segment(audio[span[0] : span[1]], offset, with_words)
        if not result.text:
            return None
        end = offset + (span[1] - span[0]) / self.engine.sample_rate
        return StreamEvent(kind=kind, text=result.text, start=offset, end=end, words=result.words)

    def _close_segment(self, audio: Audio) -> StreamEvent | None:
        event = self._recognize(audio, "final") if self._heard_speech and audio.size else None
        self._segment_start += audio.size
        self._buffer, self._since_decode = [], 0
        self._heard_speech = False
        self._last_partial = ""
        return event

    def accept(self, audio: Audio) -> list[StreamEvent]:
        if self._closed:
            raise InvalidInput("the stream is closed")
        chunk = np.asarray(audio, dtype=np.float32).reshape(-1)
        if not np.isfinite(chunk).all():
            raise CorruptAudio("audio contains NaN or infinite samples")
        if chunk.size == 0:
            return []
        self._buffer.append(chunk)
        self._since_decode += chunk.size
        if self._rms(chunk) >= self.silence_rms:
            self._heard_speech = True
        segment = self._segment_audio()
        if not self._heard_speech:
            # Leading silence: drop it (keep a little context) so segments start near the speech.
            if segment.size > 2 * self.silence:
                keep = segment[-self.silence :]
                self._segment_start += segment.size - keep.size
                self._buffer = [keep]
            self._since_decode = 0
            return []
        ended = segment.size > self.silence and self._rms(segment[-self.silence :]) < self.silence_rms
        if ended or segment.size >= self.max_segment:
            final = self._close_segment(segment)
            return [final] if final is not None else []
        if self._since_decode < self.chunk:
            return []
        self._since_decode = 0
        partial = self._recognize(segment, "partial")
        if partial is None or partial.text == self._last_partial:
            return []
        self._last_partial = partial.text
        return [partial]

    def finalize(self) -> list[StreamEvent]:
        """Flush: the open segment (if speech was heard) becomes a final; the stream stays open."""
        if self._closed or not self._heard_speech:
            return []
        final = self._close_segment(self._segment_audio())
        return [final] if final is not None else []

    def close(self) -> list[StreamEvent]:
        """Flush like finalize() and end the session; accept() then raises InvalidInput."""
        events = self.finalize()
        self._closed = True
        return events
