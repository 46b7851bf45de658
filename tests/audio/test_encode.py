"""Encoding: every output format decodes (with FFmpeg, independently of our code) to the same tone."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest

from kubespeech.audio import CONTENT_TYPES, encode_audio, resample_pcm16
from kubespeech.errors import InvalidInput
from tests.audio.conftest import TONE_HZ, dominant_hz, tone

RATE = 22050
PCM = (tone(1.0, RATE)[:, 0] * 32767).astype("<i2").tobytes()


def ffmpeg_decode(data: bytes, fmt: str | None = None, rate: int | None = None) -> tuple[np.ndarray, int]:
    options = {"sample_rate": str(rate), "channels": "1"} if rate else {}
    with av.open(io.BytesIO(data), format=fmt, options=options) as c:
        stream = c.streams.audio[0]
        frames = [f.to_ndarray() for f in c.decode(stream)]
        out_rate = stream.codec_context.sample_rate
    samples = np.concatenate([f.reshape(f.shape[0], -1)[0] for f in frames]).astype(np.float32)
    if samples.dtype.kind != "f" or np.abs(samples).max() > 2:
        samples = samples / 32768.0
    return samples, int(out_rate)


@pytest.mark.parametrize(
    ("fmt", "demuxer", "raw_rate"),
    [
        ("wav", None, None),
        ("mp3", None, None),
        ("opus", None, None),
        ("aac", None, None),
        ("flac", None, None),
        ("pcm", "s16le", RATE),
        ("mulaw", "mulaw", RATE),
        ("ulaw", "mulaw", RATE),
        ("alaw", "alaw", RATE),
    ],
)
def test_every_output_format_round_trips(fmt: str, demuxer: str | None, raw_rate: int | None) -> None:
    body, content_type = encode_audio(PCM, RATE, fmt)
    assert content_type == CONTENT_TYPES[fmt]
    samples, rate = ffmpeg_decode(body, demuxer, raw_rate)
    if fmt == "opus":
        # Opus has no 22.05 kHz mode: we encode at the next rate up (named in OpusHead); decoders give 48 kHz.
        head = body.index(b"OpusHead")
        assert int.from_bytes(body[head + 12 : head + 16], "little") == 24000
        assert rate == 48000
    else:
        assert rate == RATE
    assert samples.size / rate == pytest.approx(1.0, abs=0.08)
    assert dominant_hz(samples, rate) == pytest.approx(TONE_HZ, abs=3)


def test_g711_is_accurate_to_its_quantization_step() -> None:
    original = np.frombuffer(PCM, dtype="<i2").astype(np.float32) / 32768.0
    for fmt, demuxer, step in (("mulaw", "mulaw", 0.032), ("alaw", "alaw", 0.016)):
        body, _ = encode_audio(PCM, RATE, fmt)
        assert len(body) == len(PCM) // 2
        samples, _ = ffmpeg_decode(body, demuxer, RATE)
        assert np.abs(samples - original).max() <= step / 2 + 1e-4


def test_wav_header_is_canonical() -> None:
    body, _ = encode_audio(PCM, RATE, "wav")
    assert body[:4] == b"RIFF" and body[8:16] == b"WAVEfmt " and body[36:40] == b"data"
    assert body[44:] == PCM


def test_unknown_format_is_a_422() -> None:
    with pytest.raises(InvalidInput) as info:
        encode_audio(PCM, RATE, "ogg-speex")
    assert info.value.http_status == 422


def test_resample_changes_length_not_pitch() -> None:
    out = resample_pcm16(PCM, RATE, 8000)
    samples = np.frombuffer(out, dtype="<i2").astype(np.float32) / 32768
    assert samples.size == pytest.approx(8000, abs=2)
    assert dominant_hz(samples, 8000) == pytest.approx(TONE_HZ, abs=3)
