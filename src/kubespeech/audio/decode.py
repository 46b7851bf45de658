"""Decode any accepted upload to mono 16-bit PCM at one target rate, enforcing size and duration limits.

Paths, fastest first: 16-bit PCM WAV is parsed here (already mono at the target rate: zero copies into
the job); other WAV/FLAC/Ogg-Vorbis/AIFF go through libsndfile (``soundfile``); MP3, AAC, M4A, WebM, Opus
and anything libsndfile refuses go through FFmpeg (``av``). Mono mixing is a channel mean; resampling
is ``soxr``. Every decoder failure becomes a typed error: an unrecognised format is 415, a recognised
but unreadable one 400, too many bytes or seconds 413.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import soxr

from kubespeech.audio import sniff
from kubespeech.errors import (
    AudioTooLong,
    CorruptAudio,
    InvalidInput,
    PayloadTooLarge,
    UnsupportedAudioFormat,
    register_error,
)

Float32 = npt.NDArray[np.float32]


@register_error
class EmptyAudio(CorruptAudio):
    """The upload has no bytes, or decodes to no samples (400)."""

    code = "EMPTY_AUDIO"


@dataclass(slots=True, frozen=True)
class AudioLimits:
    """Bounds on one upload; the API's defaults are documented in ``ApiLimits``."""

    max_bytes: int = 25 * 1024 * 1024
    max_seconds: float = 600.0


@dataclass(slots=True)
class DecodedAudio:
    """Mono signed 16-bit little-endian PCM at ``sample_rate``, plus what the upload was."""

    pcm16: bytes
    sample_rate: int
    source_format: str
    source_sample_rate: int
    source_channels: int

    @property
    def duration(self) -> float:
        return len(self.pcm16) / 2 / self.sample_rate

    @property
    def samples(self) -> Float32:
        return (np.frombuffer(self.pcm16, dtype="<i2").astype(np.float32) / 32768.0).astype(np.float32)


def _to_pcm16(mono: Float32) -> bytes:
    return bytes((np.clip(mono, -1.0, 1.0) * 32767.0).astype("<i2").tobytes())


def _resample(mono: Float32, src: int, dst: int) -> Float32:
    if src == dst or mono.size == 0:
        return mono
    return np.asarray(soxr.resample(mono, src, dst, quality="HQ"), dtype=np.float32)


def _check_duration(frames: int, rate: int, limits: AudioLimits) -> None:
    if rate > 0 and frames / rate > limits.max_seconds:
        raise AudioTooLong(
            f"audio is {frames / rate:.1f} s long; the limit is {limits.max_seconds:g} s",
            limit_seconds=limits.max_seconds,
        )


def _finish(
    mono: Float32, rate: int, target_rate: int, fmt: str, channels: int, limits: AudioLimits
) -> DecodedAudio:
    if mono.size == 0:
        raise EmptyAudio("the audio contains no samples")
    _check_duration(mono.size, rate, limits)
    out = _resample(mono, rate, target_rate)
    return DecodedAudio(_to_pcm16(out), target_rate, fmt, rate, channels)


def _mix(interleaved: npt.NDArray[np.float32], channels: int) -> Float32:
    if channels <= 1:
        return interleaved.astype(np.float32, copy=False)
    usable = interleaved.size - interleaved.size % channels
    return np.asarray(interleaved[:usable].reshape(-1, channels).mean(axis=1), dtype=np.float32)


# --- WAV, parsed here for the common 16-bit PCM case ------------------------------------------------


def _wav_pcm16(data: bytes, target_rate: int, limits: AudioLimits) -> DecodedAudio | None:
    """Decode 16-bit integer PCM WAV without libsndfile; None hands anything else to libsndfile."""
    if data[:4] != b"RIFF":
        return None
    pos, end = 12, len(data)
    fmt: tuple[int, int, int, int] | None = None
    while pos + 8 <= end:
        cid = data[pos : pos + 4]
        size = struct.unpack_from("<I", data, pos + 4)[0]
        body = pos + 8
        if cid == b"fmt ":
            if size < 16 or body + 16 > end:
                raise CorruptAudio("WAV 'fmt ' chunk is truncated")
            tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", data, body)
            if tag == 0xFFFE and size >= 40 and body + 26 <= end:
                tag = struct.unpack_from("<H", data, body + 24)[0]  # WAVE_FORMAT_EXTENSIBLE sub-format
            fmt = (tag, channels, rate, bits)
        elif cid == b"data":
            if fmt is None:
                raise CorruptAudio("WAV 'data' chunk before its 'fmt ' chunk")
            tag, channels, rate, bits = fmt
            if tag != 1 or bits != 16:
                return None
            if channels < 1 or rate < 1:
                raise CorruptAudio("WAV header names zero channels or a zero sample rate")
            # Streaming writers leave the size as 0 or 0xFFFFFFFF: take what is there.
            stop = end if size in (0, 0xFFFFFFFF) else min(end, body + size)
            payload = data[body:stop]
            payload = payload[: len(payload) - len(payload) % (2 * channels)]
            frames = len(payload) // (2 * channels)
            if frames == 0:
                raise EmptyAudio("the WAV file contains no samples")
            _check_duration(frames, rate, limits)
            if channels == 1 and rate == target_rate:
                return DecodedAudio(payload, rate, sniff.WAV, rate, 1)
            ints = np.frombuffer(payload, dtype="<i2")
            mono = _mix(ints.astype(np.float32) / 32768.0, channels)
            return _finish(mono, rate, target_rate, sniff.WAV, channels, limits)
        pos = body + size + (size & 1)
    raise CorruptAudio("WAV file has no 'data' chunk")


# --- libsndfile ---------------------------------------------------------------------------------------


def _soundfile(data: bytes, fmt: str, target_rate: int, limits: AudioLimits) -> DecodedAudio:
    import soundfile

    try:
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            _check_duration(f.frames, f.samplerate, limits)
            channels, rate = f.channels, f.samplerate
            frames = f.read(dtype="float32", always_2d=True)
    except (AudioTooLong, EmptyAudio):
        raise
    except Exception as exc:  # libsndfile raises plain RuntimeError/LibsndfileError for every failure
        raise CorruptAudio(f"cannot decode {fmt} audio: {exc}"[:300]) from None
    mono = frames[:, 0] if channels == 1 else frames.mean(axis=1, dtype=np.float32)
    return _finish(np.ascontiguousarray(mono, dtype=np.float32), rate, target_rate, fmt, channels, limits)


# --- FFmpeg (PyAV) ------------------------------------------------------------------------------------


def _ffmpeg(data: bytes, fmt: str, target_rate: int, limits: AudioLimits) -> DecodedAudio:
    import av

    chunks: list[Float32] = []
    total = 0
    try:
        with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
            streams = container.streams.audio
            if not streams:
                raise CorruptAudio(f"the {fmt} file has no audio stream")
            stream = streams[0]
            rate = int(stream.codec_context.sample_rate or stream.rate or 0)
            channels = int(stream.codec_context.channels or 1)
            if rate <= 0:
                raise CorruptAudio(f"the {fmt} audio stream has no sample rate")
            max_frames = int(limits.max_seconds * rate) + 1
            for frame in container.decode(stream):
                arr = frame.to_ndarray()
                if arr.dtype.kind in "iu":
                    bits = arr.dtype.itemsize * 8
                    unsigned = arr.dtype.kind == "u"
                    arr = arr.astype(np.float32) / float(2 ** (bits - 1))
                    if unsigned:
                        arr -= 1.0
                ch = len(frame.layout.channels) or 1
                if frame.format.is_planar:
                    mono = arr.mean(axis=0, dtype=np.float32) if ch > 1 else arr[0]
                else:
                    mono = _mix(arr.reshape(-1).astype(np.float32, copy=False), ch)
                chunks.append(np.asarray(mono, dtype=np.float32))
                total += mono.size
                if total > max_frames:
                    _check_duration(total, rate, limits)
    except (CorruptAudio, AudioTooLong):
        raise
    except Exception as exc:  # av.error.* (InvalidDataError, EOFError, ...) and codec failures
        if not chunks:
            raise CorruptAudio(f"cannot decode {fmt} audio: {exc}"[:300]) from None
        # A stream truncated mid-frame still yields the frames decoded before the damage.
    if not chunks:
        raise EmptyAudio(f"the {fmt} file decodes to no samples")
    mono_all = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
    return _finish(mono_all, rate, target_rate, fmt, channels, limits)


_SOUNDFILE_FORMATS = {sniff.WAV, sniff.FLAC, sniff.OGG_VORBIS, sniff.AIFF, sniff.CAF}


def decode_audio(
    data: bytes,
    *,
    target_rate: int,
    limits: AudioLimits | None = None,
) -> DecodedAudio:
    """Decode a complete audio file (format from its content) to mono PCM16 at ``target_rate``."""
    limits = limits or AudioLimits()
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(
            f"audio of {len(data)} bytes exceeds the limit of {limits.max_bytes} bytes",
            limit_bytes=limits.max_bytes,
        )
    if not data:
        raise EmptyAudio("the request carries no audio")
    fmt = sniff.sniff_format(data)
    if fmt is None:
        raise UnsupportedAudioFormat(
            "unrecognised audio format; send WAV, FLAC, Ogg (Vorbis/Opus), MP3, AAC, M4A or WebM, "
            "or raw 16-bit PCM with encoding=linear16 and its sample_rate"
        )
    if fmt == sniff.WAV:
        fast = _wav_pcm16(data, target_rate, limits)
        if fast is not None:
            return fast
    if fmt in _SOUNDFILE_FORMATS:
        try:
            return _soundfile(data, fmt, target_rate, limits)
        except CorruptAudio as exc:
            if isinstance(exc, EmptyAudio):
                raise
            # libsndfile lacks some WAV codecs (e.g. ADPCM variants) that FFmpeg reads.
            try:
                return _ffmpeg(data, fmt, target_rate, limits)
            except CorruptAudio:
                raise exc from None
    return _ffmpeg(data, fmt, target_rate, limits)


RAW_ENCODINGS = ("linear16", "pcm_s16le", "s16le")


def decode_raw_pcm(
    data: bytes,
    *,
    sample_rate: int,
    target_rate: int,
    channels: int = 1,
    encoding: str = "linear16",
    limits: AudioLimits | None = None,
) -> DecodedAudio:
    """Interpret headerless little-endian 16-bit PCM (the caller names its rate) and resample it."""
    limits = limits or AudioLimits()
    if encoding.lower() not in RAW_ENCODINGS:
        raise UnsupportedAudioFormat(
            f"raw encoding '{encoding}' is not supported; use one of {', '.join(RAW_ENCODINGS)}"
        )
    if not 1000 <= sample_rate <= 384000:
        raise InvalidInput(f"sample_rate {sample_rate} is outside 1000..384000 Hz", param="sample_rate")
    if not 1 <= channels <= 8:
        raise InvalidInput(f"channels {channels} is outside 1..8", param="channels")
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(
            f"audio of {len(data)} bytes exceeds the limit of {limits.max_bytes} bytes",
            limit_bytes=limits.max_bytes,
        )
    usable = len(data) - len(data) % (2 * channels)
    if usable == 0:
        raise EmptyAudio("the request carries no audio samples")
    _check_duration(usable // (2 * channels), sample_rate, limits)
    if channels == 1 and sample_rate == target_rate:
        return DecodedAudio(data[:usable], sample_rate, "pcm", sample_rate, 1)
    ints = np.frombuffer(data, dtype="<i2", count=usable // 2)
    mono = _mix(ints.astype(np.float32) / 32768.0, channels)
    return _finish(mono, sample_rate, target_rate, "pcm", channels, limits)
