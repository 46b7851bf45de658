"""Decode any accepted upload to mono 16-bit PCM at one target rate, enforcing size, duration and shape limits.

Paths, fastest first: 16-bit PCM WAV is parsed here (already mono at the target rate: zero copies into
the job); other WAV/FLAC/Ogg-Vorbis/AIFF go through libsndfile (``soundfile``); MP3, AAC, M4A, WebM, Opus
and anything libsndfile refuses go through FFmpeg (``av``). Mono mixing is a channel mean; resampling
is ``soxr``. Every decoder failure becomes a typed error: an unrecognised format is 415, a recognised
but unreadable one 400, a sample rate or channel count outside ``AudioLimits`` 400, too many bytes or
seconds 413.

Compressed audio is a decompression bomb waiting to happen (1 MB of FLAC silence holds minutes of 384 kHz
8-channel audio, gigabytes as float32), and headers lie. So no path trusts a declared length, and none
holds the input as float: every path decodes in blocks of at most ``_BLOCK_FRAMES`` frames, mixes each
block to mono, resamples it through a streaming ``soxr`` resampler, and keeps only int16 output. Peak
memory is O(block + output), and the output is bounded by ``max_seconds`` of *decoded* samples, counted
as they arrive: the first block past the limit raises ``AudioTooLong``.
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
    KubespeechError,
    PayloadTooLarge,
    TooManyChannels,
    UnsupportedAudioFormat,
    UnsupportedSampleRate,
    register_error,
)

Float32 = npt.NDArray[np.float32]

# Frames per decode block: 32768 frames x 8 channels x 4 bytes is 1 MiB of float32 per block.
_BLOCK_FRAMES = 1 << 15
# Below this no codec we accept is real audio, and soxr's upsampling ratio to 16 kHz stays sane.
MIN_SAMPLE_RATE = 1000


@register_error
class EmptyAudio(CorruptAudio):
    """The upload has no bytes, or decodes to no samples (400)."""

    code = "EMPTY_AUDIO"


@dataclass(slots=True, frozen=True)
class AudioLimits:
    """Bounds on one upload; the API's defaults are documented in ``ApiLimits``.

    ``max_sample_rate`` and ``max_channels`` bound the decoding work per second of audio (memory is
    bounded by block decoding whatever they are): 192 kHz and 7.1 cover every real recording format.
    """

    max_bytes: int = 25 * 1024 * 1024
    max_seconds: float = 600.0
    max_sample_rate: int = 192_000
    max_channels: int = 8


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


def _check_duration(frames: int, rate: int, limits: AudioLimits) -> None:
    if rate > 0 and frames / rate > limits.max_seconds:
        raise AudioTooLong(
            f"audio is {frames / rate:.1f} s long; the limit is {limits.max_seconds:g} s",
            limit_seconds=limits.max_seconds,
        )


def _check_shape(rate: int, channels: int, limits: AudioLimits, fmt: str) -> None:
    """Refuse a sample rate or channel count out of bounds before a single sample is allocated."""
    if rate <= 0 or channels <= 0:
        raise CorruptAudio(f"the {fmt} audio names zero channels or a zero sample rate")
    if not MIN_SAMPLE_RATE <= rate <= limits.max_sample_rate:
        raise UnsupportedSampleRate(
            f"sample rate {rate} Hz is outside {MIN_SAMPLE_RATE}..{limits.max_sample_rate} Hz",
            sample_rate=rate,
            limit_hz=limits.max_sample_rate,
        )
    if channels > limits.max_channels:
        raise TooManyChannels(
            f"audio has {channels} channels; the limit is {limits.max_channels}",
            channels=channels,
            limit_channels=limits.max_channels,
        )


class _MonoSink:
    """Takes decoded blocks as they come, counts their duration, and keeps only mono int16 at the target rate.

    Holds one streaming resampler per source rate (a stream may change rate mid-way: FFmpeg frames can),
    so the float32 working set is one block, never the whole input.
    """

    def __init__(self, target_rate: int, limits: AudioLimits, fmt: str) -> None:
        self.target_rate = target_rate
        self.limits = limits
        self.fmt = fmt
        self.out = bytearray()
        self.source_rate = 0
        self.source_channels = 0
        self._rate = 0
        self._frames = 0  # frames at ``_rate`` since the last rate change
        self._seconds_before = 0.0  # duration of the segments at earlier rates
        self._stream: soxr.ResampleStream | None = None

    @property
    def seconds(self) -> float:
        return self._seconds_before + (self._frames / self._rate if self._rate else 0.0)

    def _switch(self, rate: int) -> None:
        self._flush()
        self._seconds_before = self.seconds
        self._rate, self._frames = rate, 0
        self._stream = (
            None
            if rate == self.target_rate
            else soxr.ResampleStream(rate, self.target_rate, 1, dtype="float32", quality="HQ")
        )

    def _flush(self) -> None:
        if self._stream is not None:
            tail = self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
            self.out += _to_pcm16(np.asarray(tail, dtype=np.float32))
            self._stream = None

    def admit(self, frames: int, rate: int, channels: int) -> None:
        """Check a block's shape and count its frames against the duration limit before it is converted."""
        _check_shape(rate, channels, self.limits, self.fmt)
        if not self.source_rate:
            self.source_rate, self.source_channels = rate, channels
        if rate != self._rate:
            self._switch(rate)
        self._frames += frames
        if self.seconds > self.limits.max_seconds:
            raise AudioTooLong(
                f"audio is longer than the limit of {self.limits.max_seconds:g} s",
                limit_seconds=self.limits.max_seconds,
            )

    def feed(self, mono: Float32) -> None:
        """Append one admitted block, already mixed to mono float32 at the rate ``admit`` was given."""
        if mono.size == 0:
            return
        if self._stream is not None:
            mono = np.asarray(
                self._stream.resample_chunk(np.ascontiguousarray(mono, dtype=np.float32)), dtype=np.float32
            )
        self.out += _to_pcm16(mono)

    def finish(self) -> DecodedAudio:
        self._flush()
        if not self.out:
            raise EmptyAudio(f"the {self.fmt} audio contains no samples")
        return DecodedAudio(
            bytes(self.out), self.target_rate, self.fmt, self.source_rate, self.source_channels
        )


def _mix(block: Float32) -> Float32:
    """Channel mean of a (frames, channels) block."""
    if block.shape[1] == 1:
        return np.ascontiguousarray(block[:, 0], dtype=np.float32)
    return np.asarray(block.mean(axis=1, dtype=np.float32), dtype=np.float32)


def _feed_pcm16(sink: _MonoSink, payload: bytes | memoryview, rate: int, channels: int) -> None:
    """Feed interleaved little-endian int16 PCM block by block (int16 to float32 would double it at once)."""
    ints = np.frombuffer(payload, dtype="<i2").reshape(-1, channels)
    for start in range(0, len(ints), _BLOCK_FRAMES):
        block = ints[start : start + _BLOCK_FRAMES]
        sink.admit(len(block), rate, channels)
        sink.feed(_mix(block.astype(np.float32) / np.float32(32768.0)))


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
            # Checked for every codec, not just this path's: libsndfile would call 2000 channels corrupt.
            _check_shape(rate, channels, limits, sniff.WAV)
            if tag != 1 or bits != 16:
                return None
            # Streaming writers leave the size as 0 or 0xFFFFFFFF: take what is there. A size larger
            # than the file is a lie or a truncation: also take what is there, never the declared size.
            stop = end if size in (0, 0xFFFFFFFF) else min(end, body + size)
            usable = stop - body
            usable -= usable % (2 * channels)
            frames = usable // (2 * channels)
            if frames == 0:
                raise EmptyAudio("the WAV file contains no samples")
            _check_duration(frames, rate, limits)
            if channels == 1 and rate == target_rate:
                return DecodedAudio(data[body : body + usable], rate, sniff.WAV, rate, 1)
            sink = _MonoSink(target_rate, limits, sniff.WAV)
            _feed_pcm16(sink, memoryview(data)[body : body + usable], rate, channels)
            return sink.finish()
        pos = body + size + (size & 1)
    raise CorruptAudio("WAV file has no 'data' chunk")


# --- libsndfile ---------------------------------------------------------------------------------------

_SF_COUNT_MAX = 2**63 - 1


def _soundfile(data: bytes, fmt: str, target_rate: int, limits: AudioLimits) -> DecodedAudio:
    import soundfile

    sink = _MonoSink(target_rate, limits, fmt)
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            channels, rate = f.channels, f.samplerate
            _check_shape(rate, channels, limits, fmt)
            # libsndfile reports an unknown length (a streamed FLAC's 0 total) as SF_COUNT_MAX: only a
            # known length can be refused up front; the sink counts the real frames either way.
            if f.frames < _SF_COUNT_MAX:
                _check_duration(f.frames, rate, limits)
            # The declared frame count only caps each read; the loop ends on the data actually there.
            while True:
                block = f.read(_BLOCK_FRAMES, dtype="float32", always_2d=True)
                if len(block) == 0:
                    break
                sink.admit(len(block), rate, channels)
                sink.feed(_mix(block))
    except KubespeechError:
        raise
    except Exception as exc:  # libsndfile raises plain RuntimeError/LibsndfileError for every failure
        raise CorruptAudio(f"cannot decode {fmt} audio: {exc}"[:300]) from None
    return sink.finish()


# --- FFmpeg (PyAV) ------------------------------------------------------------------------------------


def _frame_mono(arr: npt.NDArray[np.generic], planar: bool, channels: int) -> Float32:
    """One FFmpeg frame (planar: channels x samples; packed: 1 x samples*channels) as mono float32."""
    if arr.dtype.kind in "iu":
        bits = arr.dtype.itemsize * 8
        unsigned = arr.dtype.kind == "u"
        floats = arr.astype(np.float32) / np.float32(2 ** (bits - 1))
        if unsigned:
            floats -= 1.0
    else:
        floats = arr.astype(np.float32, copy=False)
    if planar:
        return _mix(floats.T) if channels > 1 else np.ascontiguousarray(floats[0], dtype=np.float32)
    flat = floats.reshape(-1)
    usable = flat.size - flat.size % channels
    return _mix(flat[:usable].reshape(-1, channels))


def _ffmpeg(data: bytes, fmt: str, target_rate: int, limits: AudioLimits) -> DecodedAudio:
    import av

    sink = _MonoSink(target_rate, limits, fmt)
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
            _check_shape(rate, channels, limits, fmt)
            # The container's declared duration is never trusted: ``admit`` counts every decoded frame
            # (and re-checks its rate and channels, which may change mid-stream) before converting it.
            for frame in container.decode(stream):
                ch = len(frame.layout.channels) or 1
                sink.admit(frame.samples, int(frame.sample_rate or rate), ch)
                sink.feed(_frame_mono(frame.to_ndarray(), frame.format.is_planar, ch))
    except KubespeechError:
        raise
    except Exception as exc:  # av.error.* (InvalidDataError, EOFError, ...) and codec failures
        if sink.seconds == 0:
            raise CorruptAudio(f"cannot decode {fmt} audio: {exc}"[:300]) from None
        # A stream truncated mid-frame still yields the frames decoded before the damage.
    return sink.finish()


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
    # Raw PCM has its own (parameter) bounds above: only the block-wise conversion is shared.
    sink = _MonoSink(
        target_rate,
        AudioLimits(max_seconds=limits.max_seconds, max_sample_rate=384000, max_channels=8),
        "pcm",
    )
    _feed_pcm16(sink, memoryview(data)[:usable], sample_rate, channels)
    return sink.finish()
