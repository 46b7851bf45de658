"""Decoding: every accepted format (made by FFmpeg/libsndfile) comes out as 16 kHz mono of the right length
and pitch; bad input maps to its typed error (400/413/415), whatever the bytes."""

from __future__ import annotations

import os
import struct

import pytest

from kubespeech.audio import AudioLimits, EmptyAudio, decode_audio, decode_raw_pcm, sniff_format
from kubespeech.errors import (
    AudioTooLong,
    CorruptAudio,
    InvalidInput,
    PayloadTooLarge,
    UnsupportedAudioFormat,
)
from tests.audio.conftest import TONE_HZ, dominant_hz, ffmpeg_file, sndfile, tone

FORMATS = {
    "wav_s16_stereo_44k": (lambda: sndfile("WAV", "PCM_16"), "wav"),
    "wav_float32": (lambda: sndfile("WAV", "FLOAT"), "wav"),
    "wav_s24": (lambda: sndfile("WAV", "PCM_24"), "wav"),
    "wav_mulaw": (lambda: sndfile("WAV", "ULAW", rate=8000, channels=1), "wav"),
    "flac": (lambda: sndfile("FLAC", "PCM_16"), "flac"),
    "ogg_vorbis": (lambda: sndfile("OGG", "VORBIS"), "ogg_vorbis"),
    "aiff": (lambda: sndfile("AIFF", "PCM_16"), "aiff"),
    "ogg_opus": (lambda: ffmpeg_file("ogg", "libopus"), "ogg_opus"),
    "mp3": (lambda: ffmpeg_file("mp3", "libmp3lame", rate=44100), "mp3"),
    "m4a_aac": (lambda: ffmpeg_file("ipod", "aac", rate=44100), "mp4"),
    "webm_opus": (lambda: ffmpeg_file("webm", "libopus"), "webm"),
    "adts_aac": (lambda: ffmpeg_file("adts", "aac", rate=22050, channels=1), "aac"),
}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_format_matrix_decodes_to_16k_mono(name: str) -> None:
    make, expected_fmt = FORMATS[name]
    data = make()
    assert sniff_format(data) == expected_fmt
    decoded = decode_audio(data, target_rate=16000)
    assert decoded.sample_rate == 16000
    assert decoded.source_format == expected_fmt
    # Lossy codecs pad a few ms at the ends.
    assert decoded.duration == pytest.approx(1.5, abs=0.08)
    assert dominant_hz(decoded.samples, 16000) == pytest.approx(TONE_HZ, abs=3)
    assert decoded.samples.max() == pytest.approx(0.5, abs=0.1)


def test_pcm16_wav_at_target_rate_is_passed_through_unchanged() -> None:
    data = sndfile("WAV", "PCM_16", rate=16000, channels=1)
    decoded = decode_audio(data, target_rate=16000)
    assert decoded.pcm16 == data[44:]


def test_stereo_is_mixed_to_mono_by_mean() -> None:
    import io

    import numpy as np
    import soundfile

    left = tone(1.0, 16000, 1)[:, 0]
    stereo = np.stack([left, -left], axis=1)  # opposite phase: the mean is silence
    buf = io.BytesIO()
    soundfile.write(buf, stereo, 16000, format="WAV", subtype="PCM_16")
    decoded = decode_audio(buf.getvalue(), target_rate=16000)
    assert abs(decoded.samples).max() < 1e-3


def test_raw_linear16_with_explicit_rate() -> None:
    pcm = (tone(1.0, 8000, 2) * 32767).astype("<i2").tobytes()
    decoded = decode_raw_pcm(pcm, sample_rate=8000, channels=2, target_rate=16000)
    assert decoded.duration == pytest.approx(1.0, abs=0.01)
    assert dominant_hz(decoded.samples, 16000) == pytest.approx(TONE_HZ, abs=3)


def test_raw_pcm_needs_a_sane_rate_and_encoding() -> None:
    with pytest.raises(InvalidInput):
        decode_raw_pcm(b"\0\0" * 100, sample_rate=10, target_rate=16000)
    with pytest.raises(UnsupportedAudioFormat):
        decode_raw_pcm(b"\0\0" * 100, sample_rate=16000, target_rate=16000, encoding="mulaw")
    with pytest.raises(EmptyAudio):
        decode_raw_pcm(b"\0", sample_rate=16000, target_rate=16000)


def test_format_comes_from_content_not_name() -> None:
    # An MP3 is an MP3 whatever the client calls it; random bytes are not audio.
    assert sniff_format(ffmpeg_file("mp3", "libmp3lame", rate=44100)) == "mp3"
    assert sniff_format(b"this is a text file, not audio at all") is None


@pytest.mark.parametrize(
    ("data", "error", "code"),
    [
        (b"", EmptyAudio, "EMPTY_AUDIO"),
        (os.urandom(4096), UnsupportedAudioFormat, "UNSUPPORTED_AUDIO_FORMAT"),
        (b"%PDF-1.7\n" + os.urandom(1000), UnsupportedAudioFormat, "UNSUPPORTED_AUDIO_FORMAT"),
        (b"RIFF\x10\x00\x00\x00WAVEfmt ", CorruptAudio, "CORRUPT_AUDIO"),
        (b"RIFF" + struct.pack("<I", 100) + b"WAVE" + b"junk" + struct.pack("<I", 4) + b"abcd", CorruptAudio,
         "CORRUPT_AUDIO"),
        (b"fLaC" + os.urandom(2000), CorruptAudio, "CORRUPT_AUDIO"),
        (b"OggS" + os.urandom(2000), CorruptAudio, "CORRUPT_AUDIO"),
        (b"ID3\x04\x00\x00\x00\x00\x00\x00" + os.urandom(100), CorruptAudio, "CORRUPT_AUDIO"),
        (b"\x00\x00\x00\x20ftypM4A " + os.urandom(3000), CorruptAudio, "CORRUPT_AUDIO"),
        (b"\x1a\x45\xdf\xa3" + os.urandom(3000), CorruptAudio, "CORRUPT_AUDIO"),
    ],
    ids=["empty", "random", "pdf", "wav-truncated", "wav-no-data", "flac-junk", "ogg-junk", "id3-junk",
         "mp4-junk", "webm-junk"],
)  # fmt: skip
def test_bad_input_maps_to_typed_errors(data: bytes, error: type[Exception], code: str) -> None:
    with pytest.raises(error) as info:
        decode_audio(data, target_rate=16000)
    assert getattr(info.value, "code", None) == code


def test_truncated_files_decode_what_is_there_or_fail_cleanly() -> None:
    for make, _ in FORMATS.values():
        data = make()
        for cut in (len(data) // 2, 200, 60):
            try:
                decoded = decode_audio(data[:cut], target_rate=16000)
            except (CorruptAudio, UnsupportedAudioFormat):
                continue
            assert decoded.duration <= 1.6


def test_limits_on_bytes_and_seconds() -> None:
    data = sndfile("WAV", "PCM_16", seconds=2.0, rate=16000, channels=1)
    with pytest.raises(PayloadTooLarge):
        decode_audio(data, target_rate=16000, limits=AudioLimits(max_bytes=1000))
    for payload in (
        data,
        sndfile("FLAC", "PCM_16", seconds=2.0),
        ffmpeg_file("mp3", "libmp3lame", 2.0, 44100),
    ):
        with pytest.raises(AudioTooLong) as info:
            decode_audio(payload, target_rate=16000, limits=AudioLimits(max_seconds=1.0))
        assert info.value.http_status == 413
