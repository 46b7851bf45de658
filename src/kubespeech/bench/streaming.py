"""Streaming benchmarks: live STT latency (end of phrase → final, first partial), sessions per worker, TTS TTFB.

Everything goes through the real stack (redis-server, ``kubespeech api``, whisper and piper workers) over
real WebSockets and HTTP. Clients send audio paced as a microphone delivers it: each 50 ms frame leaves when
its last sample has been "spoken", so a latency measured from the wall-clock moment a phrase ended includes
the framing delay a real client has too.
"""

from __future__ import annotations

import asyncio
import base64
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kubespeech.bench.stack import BenchStack

RATE = 16000
FRAME_S = 0.05
FRAME = int(RATE * FRAME_S)
ASR_MODEL = "whisper-tiny-en"
TTS_MODEL = "piper-joe"
PHRASES = (
    "Please call Stella and ask her to bring these things with her from the store.",
    "The quick brown fox jumps over the lazy dog.",
    "I would like to book a table for two people at seven tonight.",
    "Can you tell me the balance of my checking account?",
    "The meeting has been moved to Thursday afternoon.",
    "Turn left at the next traffic light and park behind the library.",
)
TTS_TEXT = (
    "Thank you for calling. Your order has shipped and should arrive on Thursday. "
    "Is there anything else I can help you with today?"
)


@dataclass
class Phrase:
    text: str
    audio: np.ndarray  # 16 kHz float32, trimmed to 100 ms before and after the speech
    speech_start: int  # samples
    speech_end: int


def phrases() -> list[Phrase]:
    """The benchmark's phrases, spoken by piper (bundled voice) and resampled to 16 kHz."""
    import soxr

    from kubespeech.engines.base import TtsRequest
    from kubespeech.engines.registry import EngineSpec, load_engine

    tts = load_engine(EngineSpec(task="tts", engine="piper"))
    tts.load()
    out = []
    for text in PHRASES:
        (speech,) = tts.synthesize_batch([TtsRequest(text=text)])
        audio = np.asarray(soxr.resample(speech.audio, speech.sample_rate, RATE), dtype=np.float32)
        loud = np.flatnonzero(np.abs(audio) > 0.02)
        lead = RATE // 10
        first, last = max(int(loud[0]) - lead, 0), int(loud[-1]) + 1
        audio = audio[first : last + lead]
        out.append(Phrase(text, audio, int(loud[0]) - first, last - first))
    return out


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return round(float(np.percentile(values, q)), 1)


@dataclass
class LiveRun:
    """What one client saw on one live STT connection (times are perf_counter seconds)."""

    finals: list[tuple[float, str]] = field(default_factory=list)
    partials: list[tuple[float, str]] = field(default_factory=list)
    last_at: float | None = None
    error: str | None = None


class LiveClient:
    """One live STT WebSocket (Waves protocol) with a paced sender and a recording receiver."""

    def __init__(self, http: Any, stack: BenchStack, eou_ms: int) -> None:
        self.http = http
        self.url = (
            f"{stack.url.replace('http', 'ws', 1)}/waves/v1/stt/live?model={ASR_MODEL}&language=en"
            f"&sample_rate={RATE}&encoding=linear16&eou_timeout_ms={eou_ms}"
        )
        self.headers = {"Authorization": f"Bearer {stack.key}"}
        self.run = LiveRun()
        self.ws: Any = None
        self._reader: asyncio.Task[None] | None = None
        self.final_seen = asyncio.Event()
        self.t0 = 0.0
        self.sent = 0  # samples sent

    async def __aenter__(self) -> LiveClient:
        self.ws = await self.http.ws_connect(self.url, headers=self.headers, heartbeat=None)
        self._reader = asyncio.create_task(self._read())
        self.t0 = time.perf_counter()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
        await self.ws.close()

    async def _read(self) -> None:
        import aiohttp

        async for msg in self.ws:
            now = time.perf_counter()
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if data.get("type") == "error" or data.get("status") == "error":
                self.run.error = data.get("message") or str(data)
                self.final_seen.set()
                continue
            text = (data.get("transcript") or "").strip()
            if data.get("is_final") and text:
                self.run.finals.append((now, text))
                self.final_seen.set()
            elif text:
                self.run.partials.append((now, text))
            if data.get("is_last"):
                self.run.last_at = now
                self.final_seen.set()

    def spoken_at(self, sample: int) -> float:
        """Wall time at which the stream's sample ``sample`` was spoken (the sender's time base)."""
        return self.t0 + sample / RATE

    async def send(self, audio: np.ndarray) -> None:
        """Send ``audio`` in real time: each frame when its last sample has been spoken."""
        for i in range(0, len(audio), FRAME):
            frame = audio[i : i + FRAME]
            due = self.spoken_at(self.sent + len(frame))
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await self.ws.send_bytes(pcm16(frame))
            self.sent += len(frame)

    async def send_quiet_until_final(self, limit_s: float) -> None:
        quiet = np.zeros(FRAME, dtype=np.float32)
        deadline = time.perf_counter() + limit_s
        while not self.final_seen.is_set() and time.perf_counter() < deadline:
            await self.send(quiet)

    async def command(self, kind: str) -> float:
        sent_at = time.perf_counter()
        await self.ws.send_str(json.dumps({"type": kind}))
        return sent_at

    async def wait_final(self, timeout: float) -> None:
        await asyncio.wait_for(self.final_seen.wait(), timeout)
        self.final_seen.clear()

    async def end(self, timeout: float = 30.0) -> None:
        await self.command("close_stream")
        deadline = time.perf_counter() + timeout
        while self.run.last_at is None and self.run.error is None and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)


async def phrase_latency(stack: BenchStack, items: list[Phrase], repeats: int) -> list[dict[str, Any]]:
    """End of phrase → final in three ways a client ends a phrase, one session per phrase, one at a time."""
    import aiohttp

    from kubespeech.bench.report import word_error_rate

    modes = {
        # VAD endpointing: the server decides the phrase ended after eou_timeout_ms of quiet.
        "vad endpoint (eou 300 ms)": 300,
        # The client's own turn detection waited 300 ms of quiet, then sent finalize.
        "finalize after 300 ms pause": 2000,
        # The client sent finalize the moment the phrase ended (push-to-talk release).
        "finalize at end of speech": 2000,
    }
    rows = []
    async with aiohttp.ClientSession() as http:
        for mode, eou in modes.items():
            latencies: list[float] = []
            after_finalize: list[float] = []
            first_partials: list[float] = []
            refs: list[str] = []
            hyps: list[str] = []
            for _ in range(repeats):
                for p in items:
                    async with LiveClient(http, stack, eou) as c:
                        if mode.startswith("vad"):
                            await c.send(p.audio)
                            await c.send_quiet_until_final(5.0)
                            sent = None
                        elif mode.startswith("finalize after"):
                            await c.send(np.concatenate([p.audio[: p.speech_end], np.zeros(int(0.3 * RATE))]))
                            sent = await c.command("finalize")
                        else:
                            await c.send(p.audio[: p.speech_end])
                            sent = await c.command("finalize")
                        await c.wait_final(30.0)
                        await c.end()
                        if c.run.error or not c.run.finals:
                            raise RuntimeError(f"live STT failed ({mode}): {c.run.error or 'no final'}")
                        at = c.run.finals[0][0]
                        latencies.append((at - c.spoken_at(p.speech_end)) * 1000)
                        if sent is not None:
                            after_finalize.append((at - sent) * 1000)
                        if c.run.partials:
                            first_partials.append((c.run.partials[0][0] - c.spoken_at(p.speech_start)) * 1000)
                        refs.append(p.text)
                        hyps.append(" ".join(t for _, t in c.run.finals))
            rows.append(
                {
                    "mode": mode,
                    "phrases": len(latencies),
                    "end_of_phrase_to_final_p50_ms": pct(latencies, 50),
                    "end_of_phrase_to_final_p95_ms": pct(latencies, 95),
                    "finalize_to_final_p50_ms": pct(after_finalize, 50),
                    "finalize_to_final_p95_ms": pct(after_finalize, 95),
                    "speech_onset_to_first_partial_p50_ms": pct(first_partials, 50),
                    "wer": round(word_error_rate(refs, hyps), 3),
                }
            )
    return rows


async def sessions_per_worker(
    stack: BenchStack, items: list[Phrase], levels: tuple[int, ...], lag_bound_s: float
) -> list[dict[str, Any]]:
    """``k`` concurrent real-time sessions on one worker, each speaking three phrases with pauses."""
    import aiohttp

    gap = np.zeros(int(0.9 * RATE), dtype=np.float32)
    rows = []
    async with aiohttp.ClientSession() as http:
        for k in levels:

            async def speaker(i: int) -> tuple[list[float], float] | None:
                """(end of phrase -> final lags, close after audio end) of one session; None on error."""
                chosen = [items[(i + j) % len(items)] for j in range(3)]
                async with LiveClient(http, stack, 600) as c:
                    # Stagger the starts so the sessions' endpoints do not all fall on the same instant.
                    await asyncio.sleep(i * 0.37 % 1.5)
                    c.t0 = time.perf_counter()
                    ends = []
                    for p in chosen:
                        ends.append(c.sent + p.speech_end)
                        await c.send(p.audio)
                        await c.send(gap)
                    audio_end = c.spoken_at(c.sent)
                    await c.end(timeout=60.0)
                    if c.run.error or c.run.last_at is None:
                        return None
                    lags = [at - c.spoken_at(end) for (at, _), end in zip(c.run.finals, ends, strict=False)]
                    return lags, c.run.last_at - audio_end

            done = await asyncio.gather(*(speaker(i) for i in range(k)))
            errors = sum(1 for d in done if d is None)
            lags = [x for d in done if d is not None for x in d[0]]
            tails = [d[1] for d in done if d is not None]
            row = {
                "sessions": k,
                "errors": errors,
                "end_of_phrase_to_final_p50_ms": pct([x * 1000 for x in lags], 50),
                "end_of_phrase_to_final_p95_ms": pct([x * 1000 for x in lags], 95),
                "worst_lag_ms": round(max(lags, default=float("nan")) * 1000, 1),
                "close_after_audio_end_p50_ms": pct([x * 1000 for x in tails], 50),
            }
            row["keeps_up"] = errors == 0 and bool(lags) and max(lags) <= lag_bound_s
            rows.append(row)
            if not row["keeps_up"]:
                break  # the next level only falls further behind
    return rows


async def tts_first_audio(stack: BenchStack, repeats: int) -> dict[str, Any]:
    """SSE streaming TTS: time to the first audio chunk vs the whole synthesis, for a three-sentence text."""
    import aiohttp

    first: list[float] = []
    total: list[float] = []
    chunks: list[int] = []
    # no-store: each request is synthesized (the result cache would answer repeats from Redis).
    headers = {"Authorization": f"Bearer {stack.key}", "Cache-Control": "no-store"}
    body = {"text": TTS_TEXT, "model": TTS_MODEL, "voice_id": "joe", "sample_rate": 24000}
    async with aiohttp.ClientSession() as http:
        for i in range(repeats + 1):
            started = time.perf_counter()
            got_first = None
            n = 0
            async with http.post(f"{stack.url}/waves/v1/tts/live", json=body, headers=headers) as r:
                if r.status != 200:
                    raise RuntimeError(f"streaming TTS failed: {r.status} {await r.text()}")
                async for line in r.content:
                    if line.startswith(b"data:") and b'"audio"' in line:
                        base64.b64decode(json.loads(line[5:])["audio"])
                        n += 1
                        if got_first is None:
                            got_first = time.perf_counter()
            ended = time.perf_counter()
            if i == 0 or got_first is None:
                continue  # the first request warms the worker's voice
            first.append((got_first - started) * 1000)
            total.append((ended - started) * 1000)
            chunks.append(n)
    return {
        "requests": len(first),
        "text_chars": len(TTS_TEXT),
        "chunks_median": statistics.median(chunks) if chunks else 0,
        "time_to_first_audio_p50_ms": pct(first, 50),
        "time_to_first_audio_p95_ms": pct(first, 95),
        "total_p50_ms": pct(total, 50),
        "total_p95_ms": pct(total, 95),
    }


async def streaming(
    repeats: int = 2, levels: tuple[int, ...] = (1, 2, 3, 4, 6, 8), lag_bound_s: float = 1.5
) -> dict[str, Any]:
    """The streaming suite: phrase latencies, sessions one worker sustains, and TTS time to first audio."""
    items = phrases()
    stack = BenchStack(
        workers=[
            {
                "task": "asr",
                "model": ASR_MODEL,
                "engine": "whisper",
                "max_batch_size": 8,
                "env": {"KUBESPEECH_SESSION_MAX_PER_WORKER": str(max(levels))},
            },
            {"task": "tts", "model": TTS_MODEL, "engine": "piper", "max_batch_size": 8},
        ],
        models=[
            {"name": ASR_MODEL, "task": "asr", "default": True, "aliases": []},
            {"name": TTS_MODEL, "task": "tts", "default": True, "aliases": [], "voices": ["joe"]},
        ],
    )
    stack.start()
    try:
        latency = await phrase_latency(stack, items, repeats)
        tts = await tts_first_audio(stack, repeats=4 * repeats)
        sessions = await sessions_per_worker(stack, items, levels, lag_bound_s)
    finally:
        stack.stop()
    kept = [r["sessions"] for r in sessions if r["keeps_up"]]
    return {
        "stt_phrase_latency": latency,
        "tts_streaming": tts,
        "sessions_per_worker": sessions,
        "sessions_one_worker_sustains": max(kept, default=0),
        "lag_bound_s": lag_bound_s,
    }
