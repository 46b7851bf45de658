"""A small closed-loop load generator for the API's surfaces (used by ``kubespeech bench`` and by hand).

It speaks HTTP/1.1 over raw asyncio streams with keep-alive, so the client costs microseconds per request
and the numbers show the server, not the load generator (this matters on a 2-core machine where client,
API, Redis and worker share the CPUs).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
import uuid
import wave
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np

SURFACES = ("waves_stt", "waves_tts", "legacy_stt", "legacy_tts", "openai_stt", "openai_tts")


def speechless_wav(seconds: float = 2.0, rate: int = 16000) -> bytes:
    """A 16 kHz mono PCM16 WAV of low noise (2 s is 64 kB: the size the targets are quoted for)."""
    rng = np.random.default_rng(0)
    samples = (rng.standard_normal(int(seconds * rate)) * 100).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return buf.getvalue()


@dataclass(slots=True)
class PreparedRequest:
    method: str
    path: str
    content_type: str
    body: bytes


def prepare(
    surface: str,
    *,
    audio: bytes | None = None,
    text: str = "The quick brown fox jumps over the lazy dog.",
    asr_model: str | None = None,
    tts_model: str | None = None,
    voice: str | None = None,
) -> PreparedRequest:
    """The request one surface receives for a small STT (2 s audio) or TTS (one sentence) call."""
    audio = audio if audio is not None else speechless_wav()
    asr_q = f"?model={asr_model}" if asr_model else ""
    if surface == "waves_stt":
        return PreparedRequest("POST", f"/waves/v1/stt/{asr_q}", "application/octet-stream", audio)
    if surface == "legacy_stt":
        return PreparedRequest(
            "POST", f"/api/v1/lightning/get_text{asr_q}", "application/octet-stream", audio
        )
    if surface in ("waves_tts", "legacy_tts"):
        body: dict[str, Any] = {"text": text, "output_format": "wav"}
        if tts_model:
            body["model"] = tts_model
        if voice:
            body["voice_id"] = voice
        path = "/waves/v1/tts" if surface == "waves_tts" else "/api/v1/lightning-v2/get_speech"
        return PreparedRequest("POST", path, "application/json", json.dumps(body).encode())
    if surface == "openai_stt":
        boundary = uuid.uuid4().hex
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{asr_model or "whisper-1"}\r\n',
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n",
        ]
        data = "".join(parts).encode() + audio + f"\r\n--{boundary}--\r\n".encode()
        return PreparedRequest(
            "POST", "/v1/audio/transcriptions", f"multipart/form-data; boundary={boundary}", data
        )
    if surface == "openai_tts":
        body = {
            "model": tts_model or "tts-1",
            "input": text,
            "voice": voice or "alloy",
            "response_format": "wav",
        }
        return PreparedRequest("POST", "/v1/audio/speech", "application/json", json.dumps(body).encode())
    raise ValueError(f"unknown surface {surface!r}; one of {', '.join(SURFACES)}")


class HttpConnection:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, head: bytes, body: bytes) -> tuple[int, int]:
        for attempt in range(2):
            fresh = self.writer is None
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            assert self.reader is not None and self.writer is not None
            try:
                self.writer.write(head + body)
                status_line = await self.reader.readline()
            except ConnectionError:
                status_line = b""
            if status_line or fresh or attempt:
                break
            # The server closed this idle keep-alive connection (uvicorn does after 5 s): reconnect once,
            # as any HTTP client pool does with a stale connection.
            await self.close()
        assert self.reader is not None
        status = int(status_line.split(b" ", 2)[1])
        length = 0
        close = False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            lname = name.strip().lower()
            if lname == b"content-length":
                length = int(value)
            elif lname == b"connection" and value.strip().lower() == b"close":
                close = True
        if length:
            await self.reader.readexactly(length)
        if close:
            await self.close()
        return status, length

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


@dataclass(slots=True)
class LoadResult:
    surface: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    statuses: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def measure(
    base_url: str,
    api_key: str,
    surface: str,
    *,
    concurrency: int = 1,
    requests: int = 200,
    warmup: int = 10,
    prepared: PreparedRequest | None = None,
) -> LoadResult:
    """Closed loop: ``concurrency`` clients each send requests back to back until ``requests`` are done."""
    parts = urlsplit(base_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    req = prepared or prepare(surface)
    head = (
        f"{req.method} {req.path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {api_key}\r\n"
        f"Content-Type: {req.content_type}\r\nContent-Length: {len(req.body)}\r\n\r\n"
    ).encode()
    conns = [HttpConnection(host, port) for _ in range(concurrency)]
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    remaining = requests

    async def client(conn: HttpConnection, record: bool, budget: list[int]) -> None:
        while budget[0] > 0:
            budget[0] -= 1
            t0 = time.perf_counter()
            try:
                status, _ = await conn.request(head, req.body)
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                status = 0
                await conn.close()
            if record:
                latencies.append(time.perf_counter() - t0)
                statuses[str(status)] = statuses.get(str(status), 0) + 1

    try:
        if warmup:
            await asyncio.gather(*(client(c, False, [max(1, warmup // concurrency)]) for c in conns))
        budget = [remaining]
        start = time.perf_counter()
        await asyncio.gather(*(client(c, True, budget) for c in conns))
        elapsed = time.perf_counter() - start
    finally:
        for c in conns:
            await c.close()
    lat = np.sort(np.asarray(latencies)) * 1000
    errors = sum(n for s, n in statuses.items() if s != "200")

    def pct(q: float) -> float:
        return round(float(np.percentile(lat, q)), 3) if lat.size else 0.0

    return LoadResult(
        surface=surface,
        concurrency=concurrency,
        requests=len(latencies),
        errors=errors,
        seconds=round(elapsed, 3),
        rps=round(len(latencies) / elapsed, 1) if elapsed > 0 else 0.0,
        p50_ms=pct(50),
        p90_ms=pct(90),
        p99_ms=pct(99),
        statuses=statuses,
    )
