"""Encode mono 16-bit PCM to every output format the API offers: wav, pcm, mp3, opus, aac, flac, mulaw, alaw.

WAV/PCM/G.711 are built here (a header or a table lookup: microseconds); FLAC goes through libsndfile;
MP3 (LAME), Opus (in Ogg) and AAC (in ADTS) through FFmpeg via ``av``.
"""

from __future__ import annotations

import io
import struct
from functools import lru_cache

import numpy as np
import numpy.typing as npt
import soxr

from kubespeech.errors import InvalidInput

Int16 = npt.NDArray[np.int16]

# ulaw is Smallest's spelling of mulaw.
OUTPUT_FORMATS = ("wav", "pcm", "mp3", "opus", "aac", "flac", "mulaw", "ulaw", "alaw")

CONTENT_TYPES = {
    "wav": "audio/wav",
    "pcm": "audio/pcm",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg; codecs=opus",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "mulaw": "audio/basic",
    "ulaw": "audio/basic",
    "alaw": "audio/x-alaw-basic",
}

_OPUS_RATES = (8000, 12000, 16000, 24000, 48000)


def resample_pcm16(pcm: bytes, src: int, dst: int) -> bytes:
    """Resample mono s16le PCM (soxr, high quality)."""
    if src == dst or not pcm:
        return pcm
    ints = np.frombuffer(pcm[: len(pcm) - len(pcm) % 2], dtype="<i2")
    out = soxr.resample(ints.astype(np.float32) / 32768.0, src, dst, quality="HQ")
    return bytes((np.clip(out, -1.0, 1.0) * 32767.0).astype("<i2").tobytes())


def wav_bytes(pcm: bytes, sample_rate: int) -> bytes:
    """A canonical 44-byte-header PCM16 mono WAV around ``pcm``."""
    n = len(pcm)
    header = struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF", 36 + n, b"WAVE", b"fmt ", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16, b"data", n,
    )  # fmt: skip
    return header + pcm


@lru_cache(maxsize=1)
def _g711_tables() -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """ITU-T G.711 mu-law and A-law codes for every int16 value (indexed by value + 32768)."""
    x = np.arange(-32768, 32768, dtype=np.int32)
    # mu-law (the classic Sun/CCITT reference: bias 0x84, clip 32635)
    sign = np.where(x < 0, 0x80, 0)
    mag = np.minimum(np.abs(x), 32635) + 0x84
    exp = np.floor(np.log2(mag)).astype(np.int32) - 7
    exp = np.clip(exp, 0, 7)
    mant = (mag >> (exp + 3)) & 0x0F
    ulaw = (~(sign | (exp << 4) | mant)) & 0xFF
    # A-law (13-bit magnitude, segments 0..7, even bits inverted)
    a_sign = np.where(x >= 0, 0x80, 0)
    a_mag = np.minimum(np.where(x >= 0, x, -x - 1), 32767) >> 3
    seg = np.zeros_like(a_mag)
    for i, bound in enumerate((0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF)):
        seg = np.where((a_mag > bound) & (seg == i), i + 1, seg)
    seg = np.minimum(seg, 7)
    a_mant = np.where(seg == 0, a_mag >> 1, a_mag >> seg) & 0x0F
    alaw = ((a_sign | (seg << 4) | a_mant) ^ 0x55) & 0xFF
    return ulaw.astype(np.uint8), alaw.astype(np.uint8)


def _g711(pcm: bytes, table_index: int) -> bytes:
    ints = np.frombuffer(pcm, dtype="<i2").astype(np.int32) + 32768
    return bytes(_g711_tables()[table_index][ints].tobytes())


def _ffmpeg_encode(pcm: bytes, sample_rate: int, container: str, codec: str, bit_rate: int | None) -> bytes:
    import av

    out = io.BytesIO()
    with av.open(out, mode="w", format=container) as c:
        stream = c.add_stream(codec, rate=sample_rate, layout="mono")
        assert isinstance(stream, av.audio.stream.AudioStream)
        if bit_rate:
            stream.codec_context.bit_rate = bit_rate
        frame_samples = 4096
        ints = np.frombuffer(pcm, dtype="<i2")
        pts = 0
        for start in range(0, max(ints.size, 1), frame_samples):
            chunk = ints[start : start + frame_samples]
            if chunk.size == 0:
                break
            frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = sample_rate
            frame.pts = pts
            pts += chunk.size
            for packet in stream.encode(frame):
                c.mux(packet)
        for packet in stream.encode(None):
            c.mux(packet)
    return out.getvalue()


def encode_audio(pcm: bytes, sample_rate: int, fmt: str) -> tuple[bytes, str]:
    """Encode mono s16le ``pcm`` at ``sample_rate`` as ``fmt``; returns (bytes, content type).

    Opus only runs at 8/12/16/24/48 kHz, so other rates are resampled to the next one up.
    """
    fmt = fmt.lower()
    if fmt not in CONTENT_TYPES:
        raise InvalidInput(
            f"output format '{fmt}' is not supported; use one of {', '.join(OUTPUT_FORMATS)}",
            param="output_format",
        )
    pcm = pcm[: len(pcm) - len(pcm) % 2]
    if fmt == "pcm":
        body = pcm
    elif fmt == "wav":
        body = wav_bytes(pcm, sample_rate)
    elif fmt in ("mulaw", "ulaw"):
        body = _g711(pcm, 0)
    elif fmt == "alaw":
        body = _g711(pcm, 1)
    elif fmt == "flac":
        import soundfile

        buf = io.BytesIO()
        soundfile.write(buf, np.frombuffer(pcm, dtype="<i2"), sample_rate, format="FLAC", subtype="PCM_16")
        body = buf.getvalue()
    elif fmt == "mp3":
        body = _ffmpeg_encode(
            pcm, sample_rate, "mp3", "libmp3lame", 64000 if sample_rate <= 24000 else 128000
        )
    elif fmt == "aac":
        body = _ffmpeg_encode(pcm, sample_rate, "adts", "aac", 64000)
    else:  # opus
        rate = next((r for r in _OPUS_RATES if r >= sample_rate), 48000)
        body = _ffmpeg_encode(resample_pcm16(pcm, sample_rate, rate), rate, "ogg", "libopus", 32000)
    return body, CONTENT_TYPES[fmt]
