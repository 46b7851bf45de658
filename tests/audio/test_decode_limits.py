"""Decompression bombs and lying headers: decoding is bounded by the real data and the limits, never the header."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import textwrap
import tracemalloc
from datetime import timedelta
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubespeech.audio import AudioLimits, DecodedAudio, decode_audio
from kubespeech.errors import (
    AudioTooLong,
    CorruptAudio,
    PayloadTooLarge,
    TooManyChannels,
    UnsupportedAudioFormat,
    UnsupportedSampleRate,
)
from tests.audio.conftest import sndfile

TYPED = (
    AudioTooLong,
    CorruptAudio,
    PayloadTooLarge,
    TooManyChannels,
    UnsupportedAudioFormat,
    UnsupportedSampleRate,
)

# The old decoder grew 816 MB on the 120 s 192 kHz 8-channel FLAC below and 4 GB on the 384 kHz one.
PEAK_GROWTH_LIMIT_MB = 150


# --- corpus ------------------------------------------------------------------------------------------


def flac_silence(seconds: float, rate: int, channels: int) -> bytes:
    """Silent FLAC written block by block (FLAC stores silence in a few bytes per block: the bomb)."""
    buf = io.BytesIO()
    zeros = np.zeros((1 << 16, channels), dtype=np.int16)
    with soundfile.SoundFile(buf, "w", rate, channels, format="FLAC", subtype="PCM_16") as f:
        left = int(seconds * rate)
        while left > 0:
            f.write(zeros[: min(left, len(zeros))])
            left -= len(zeros)
    return buf.getvalue()


def flac_with_total_samples(data: bytes, total: int) -> bytes:
    """Rewrite STREAMINFO's 36-bit total-samples field (0 means unknown; anything else may be a lie)."""
    off = 4 + 4 + 10  # "fLaC", the metadata block header, min/max block and frame sizes
    packed = int.from_bytes(data[off : off + 8], "big")
    packed = (packed & ~((1 << 36) - 1)) | total
    return data[:off] + packed.to_bytes(8, "big") + data[off + 8 :]


def wav(tag: int, channels: int, rate: int, bits: int, data_size: int, payload: bytes) -> bytes:
    block_align = (channels * bits // 8) & 0xFFFF
    fmt = struct.pack("<HHIIHH", tag, channels, rate, (rate * block_align) & 0xFFFFFFFF, block_align, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", data_size) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


def mkv_flac_silence(
    real_seconds: float, claimed_seconds: float, rate: int = 192000, channels: int = 8
) -> bytes:
    """FLAC in Matroska (the FFmpeg path) whose packet timestamps claim ``claimed_seconds`` of audio.

    One silent FLAC packet is encoded once and muxed over and over, which keeps generation fast; spacing
    the timestamps closer than the packet's real length makes the container lie about the duration.
    """
    out = io.BytesIO()
    with av.open(out, mode="w", format="matroska") as container:
        stream = container.add_stream("flac", rate=rate, layout=f"{channels}c")
        silence = np.zeros((1, 4608 * channels), dtype=np.int16)
        packets = []
        for i in range(4):
            frame = av.AudioFrame.from_ndarray(silence, format="s16", layout=stream.layout)
            frame.sample_rate = rate
            frame.pts = i * 4608
            packets += list(stream.encode(frame))
        proto = packets[-1]
        raw, real = bytes(proto), int(proto.duration)
        step = max(1, round(real * claimed_seconds / real_seconds))
        for i in range(int(real_seconds * rate) // real):
            packet = av.Packet(raw)
            packet.stream = stream
            packet.time_base = proto.time_base
            packet.pts = packet.dts = i * step
            packet.duration = step
            container.mux(packet)
    return out.getvalue()


# --- peak memory, measured in a fresh process --------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import av, numpy, soundfile, soxr  # every decoder's import cost belongs to the baseline
    from kubespeech.audio import AudioLimits, decode_audio
    data = open(sys.argv[1], "rb").read()
    limits = AudioLimits(max_bytes=len(data) + 1, max_seconds=float(sys.argv[2]))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        decoded = decode_audio(data, target_rate=16000, limits=limits)
        outcome = {"duration": decoded.duration, "channels": decoded.source_channels}
    except Exception as exc:
        outcome = {"error": getattr(exc, "code", type(exc).__name__)}
    outcome["growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    print(json.dumps(outcome))
    """
)


def decode_in_child(tmp_path: Path, data: bytes, max_seconds: float = 600.0) -> dict[str, float | str]:
    """Decode in a fresh interpreter: ru_maxrss is a high-water mark, and this process's is already high."""
    path = tmp_path / "upload.bin"
    path.write_bytes(data)
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), str(max_seconds)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result: dict[str, float | str] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture(scope="module")
def flac_192k_8ch_120s() -> bytes:
    return flac_silence(120, 192000, 8)


def test_flac_bomb_within_limits_decodes_in_bounded_memory(tmp_path: Path, flac_192k_8ch_120s: bytes) -> None:
    # 184 M samples: 740 MB as float32, in a 190 kB file.
    assert len(flac_192k_8ch_120s) < 300_000
    result = decode_in_child(tmp_path, flac_192k_8ch_120s)
    assert result.get("duration") == pytest.approx(120.0, abs=0.01), result
    assert result["growth_mb"] < PEAK_GROWTH_LIMIT_MB, result


def test_flac_of_unknown_length_is_cut_off_by_counting(tmp_path: Path, flac_192k_8ch_120s: bytes) -> None:
    # A streamed FLAC declares 0 (unknown) samples: only the decoded frames can be counted.
    unknown = flac_with_total_samples(flac_192k_8ch_120s, 0)
    assert decode_in_child(tmp_path, unknown)["duration"] == pytest.approx(120.0, abs=0.01)
    result = decode_in_child(tmp_path, unknown, max_seconds=60)
    assert result.get("error") == "AUDIO_TOO_LONG", result
    assert result["growth_mb"] < PEAK_GROWTH_LIMIT_MB, result


def test_small_files_declaring_hours_of_384k_8ch_audio_are_refused(tmp_path: Path) -> None:
    hours = 3 * 3600 * 384000
    flac = flac_with_total_samples(flac_silence(2, 384000, 8), hours)
    lying_wav = wav(1, 8, 384000, 16, 0xFFFFFFF0, bytes(64 * 1024))
    for data in (flac, lying_wav):
        assert len(data) < 200_000
        result = decode_in_child(tmp_path, data)
        assert result.get("error") == "UNSUPPORTED_SAMPLE_RATE", result
        assert result["growth_mb"] < PEAK_GROWTH_LIMIT_MB, result


def test_flac_declaring_hours_within_rate_limits_is_refused_up_front() -> None:
    data = flac_with_total_samples(flac_silence(1, 192000, 8), 3 * 3600 * 192000)
    with pytest.raises(AudioTooLong):
        decode_audio(data, target_rate=16000)


def test_ffmpeg_path_counts_decoded_samples_not_container_timestamps(tmp_path: Path) -> None:
    # 400 s of 192 kHz 8-channel FLAC in Matroska, whose timestamps claim 40 s.
    data = mkv_flac_silence(real_seconds=400, claimed_seconds=40)
    with av.open(io.BytesIO(data)) as container:
        assert container.duration is not None and container.duration / 1e6 < 60
    result = decode_in_child(tmp_path, data, max_seconds=300)
    assert result.get("error") == "AUDIO_TOO_LONG", result
    assert result["growth_mb"] < PEAK_GROWTH_LIMIT_MB, result


def test_ffmpeg_path_decodes_within_limits_in_bounded_memory(tmp_path: Path) -> None:
    data = mkv_flac_silence(real_seconds=120, claimed_seconds=120)
    result = decode_in_child(tmp_path, data)
    assert result.get("duration") == pytest.approx(120.0, abs=0.2), result
    assert result["growth_mb"] < PEAK_GROWTH_LIMIT_MB, result


# --- shape limits ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "error", "code"),
    [
        (wav(1, 1, 384000, 16, 2000, bytes(2000)), UnsupportedSampleRate, "UNSUPPORTED_SAMPLE_RATE"),
        (wav(1, 1, 500, 16, 2000, bytes(2000)), UnsupportedSampleRate, "UNSUPPORTED_SAMPLE_RATE"),
        (wav(3, 2, 400000, 32, 8000, bytes(8000)), UnsupportedSampleRate, "UNSUPPORTED_SAMPLE_RATE"),
        (wav(1, 9, 16000, 16, 1800, bytes(1800)), TooManyChannels, "TOO_MANY_CHANNELS"),
        (wav(3, 65535, 16000, 32, 4096, bytes(4096)), TooManyChannels, "TOO_MANY_CHANNELS"),
    ],
    ids=["wav-384k", "wav-500hz", "float-wav-400k", "wav-9ch", "float-wav-65535ch"],
)
def test_rates_and_channel_counts_out_of_bounds_are_typed_400s(
    data: bytes, error: type[Exception], code: str
) -> None:
    with pytest.raises(error) as info:
        decode_audio(data, target_rate=16000)
    assert getattr(info.value, "code", None) == code
    assert getattr(info.value, "http_status", None) == 400


def test_limits_are_configurable() -> None:
    data = sndfile("FLAC", "PCM_16", seconds=0.5, rate=48000, channels=2)
    with pytest.raises(UnsupportedSampleRate):
        decode_audio(data, target_rate=16000, limits=AudioLimits(max_sample_rate=44100))
    with pytest.raises(TooManyChannels):
        decode_audio(data, target_rate=16000, limits=AudioLimits(max_channels=1))
    assert decode_audio(data, target_rate=16000).duration == pytest.approx(0.5, abs=0.01)


# --- adversarial headers, property-based -------------------------------------------------------------

_MAX_TRACED_MB = 32  # a block is 1 MiB of float32; anything sized by a header would be far more


def _check_outcome(data: bytes, real_bytes: int) -> None:
    """Decode ``data``: a typed error, or 16 kHz mono no longer than ``real_bytes`` could hold."""
    tracemalloc.start()
    try:
        decoded = decode_audio(data, target_rate=16000)
    except TYPED:
        return
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        # numpy reports its buffers to tracemalloc, so a header-sized array would show here.
        assert peak < _MAX_TRACED_MB * 2**20, f"{peak / 2**20:.0f} MB traced"
    assert isinstance(decoded, DecodedAudio)
    assert decoded.sample_rate == 16000
    assert len(decoded.pcm16) % 2 == 0 and decoded.pcm16
    assert 1000 <= decoded.source_sample_rate <= 192000
    assert 1 <= decoded.source_channels <= 8
    assert decoded.duration <= 600.0 + 0.01
    # No codec a WAV can hold packs more than 8 samples into a byte (1-bit): the length follows the data.
    assert decoded.duration <= real_bytes * 8 / decoded.source_sample_rate + 0.05


_rates = st.one_of(
    st.sampled_from([0, 1, 999, 1000, 8000, 16000, 44100, 192000, 192001, 384000, 0xFFFFFFFF]),
    st.integers(0, 0xFFFFFFFF),
)
_channels = st.one_of(st.integers(0, 10), st.integers(0, 0xFFFF))
_tags = st.one_of(st.sampled_from([1, 3, 6, 7, 2, 0x11, 0xFFFE]), st.integers(0, 0xFFFF))
_bits = st.one_of(st.sampled_from([0, 8, 16, 24, 32, 64]), st.integers(0, 0xFFFF))
_sizes = st.one_of(st.sampled_from([0, 1, 0xFFFFFFFF, 0xFFFFFFF0]), st.integers(0, 0xFFFFFFFF))
_payloads = st.one_of(
    st.binary(max_size=4096),
    st.integers(0, 64 * 1024).map(bytes),  # silence: what a bomb is made of
)


@settings(
    max_examples=300,
    deadline=timedelta(seconds=3),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(_tags, _channels, _rates, _bits, _sizes, _payloads, st.integers(0, 64))
def test_wav_with_adversarial_header_decodes_what_is_there_or_fails_typed(
    tag: int, channels: int, rate: int, bits: int, size: int, payload: bytes, cut: int
) -> None:
    data = wav(tag, channels, rate, bits, size, payload)
    data = data[: len(data) - cut] if cut else data
    _check_outcome(data, real_bytes=len(payload))


_FLAC_BASE = flac_silence(0.5, 16000, 2)


@settings(max_examples=100, deadline=timedelta(seconds=3), suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(0, (1 << 20) - 1),
    st.integers(0, 7),
    st.integers(0, 31),
    st.one_of(st.sampled_from([0, 1, (1 << 36) - 1]), st.integers(0, (1 << 36) - 1)),
    st.integers(0, 2000),
)
def test_flac_with_adversarial_streaminfo_decodes_what_is_there_or_fails_typed(
    rate: int, channels_minus_1: int, bps_minus_1: int, total: int, cut: int
) -> None:
    off = 4 + 4 + 10
    packed = (rate << 44) | (channels_minus_1 << 41) | (bps_minus_1 << 36) | total
    data = _FLAC_BASE[:off] + packed.to_bytes(8, "big") + _FLAC_BASE[off + 8 :]
    data = data[: len(data) - cut] if cut else data
    # The frames are 0.5 s of 16 kHz stereo whatever STREAMINFO says; allow for a lie about the rate.
    try:
        decoded = decode_audio(data, target_rate=16000)
    except TYPED:
        return
    assert decoded.sample_rate == 16000 and decoded.pcm16
    assert decoded.duration <= 0.5 * 16000 / decoded.source_sample_rate + 0.05
