"""Audio fixtures: a known tone rendered into real files by FFmpeg (PyAV) and libsndfile, not by our encoders."""

from __future__ import annotations

import io

import av
import numpy as np
import numpy.typing as npt
import soundfile

TONE_HZ = 440.0


def tone(seconds: float, rate: int, channels: int = 1, hz: float = TONE_HZ) -> npt.NDArray[np.float32]:
    t = np.arange(int(seconds * rate)) / rate
    mono = (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)
    return np.repeat(mono[:, None], channels, axis=1)


def dominant_hz(samples: npt.NDArray[np.float32], rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(samples.size)))
    return float(np.argmax(spectrum) * rate / samples.size)


def ffmpeg_file(
    container: str, codec: str, seconds: float = 1.5, rate: int = 48000, channels: int = 2
) -> bytes:
    """Encode a tone with FFmpeg into ``container``/``codec``."""
    data = tone(seconds, rate, channels)
    out = io.BytesIO()
    layout = "stereo" if channels == 2 else "mono"
    with av.open(out, mode="w", format=container) as c:
        stream = c.add_stream(codec, rate=rate, layout=layout)
        ints = (data * 32767).astype(np.int16)
        for start in range(0, len(ints), 4096):
            chunk = np.ascontiguousarray(ints[start : start + 4096].reshape(1, -1))
            frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout=layout)
            frame.sample_rate = rate
            frame.pts = start
            for p in stream.encode(frame):
                c.mux(p)
        for p in stream.encode(None):
            c.mux(p)
    return out.getvalue()


def sndfile(fmt: str, subtype: str, seconds: float = 1.5, rate: int = 44100, channels: int = 2) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, tone(seconds, rate, channels), rate, format=fmt, subtype=subtype)
    return buf.getvalue()
