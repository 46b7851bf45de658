"""Live STT over WebSocket against a real API, real whisper worker processes and Redis: the smallestai SDK at
real-time pace, a worker SIGKILLed mid-session, and the protocol's refusals with their close codes."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pytest
import redis as redis_sync
import soxr
from redis.asyncio import Redis
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from kubespeech.api.stt_live import LiveSttSettings, PcmDecoder
from kubespeech.audio.encode import encode_audio
from kubespeech.engines.base import TtsRequest, TtsResult
from kubespeech.engines.piper import PiperEngine
from kubespeech.jobs.sessions import SessionKeys, active_sessions
from tests.api.conftest import API_KEY, WHISPER, ApiServer, api_settings, start_api, wait_live
from tests.conftest import RedisServer, start_redis
from tests.engines.conftest import SENTENCES, to_16k, wer
from tests.stack import WorkerProcess

RATE = 16000
CHUNK_BYTES = 4096  # what the SDK's examples send: 128 ms of 16-bit PCM
GAP_S = 0.8
GHOST = "ghost-asr"  # a configured model no worker serves
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@dataclass
class Conversation:
    pcm: bytes
    texts: list[str]
    spans: list[tuple[int, int]]  # (speech start, speech end) samples of each sentence


@pytest.fixture(scope="module")
def conversation() -> Conversation:
    piper = PiperEngine()
    piper.load()
    gap = np.zeros(int(GAP_S * RATE), dtype=np.float32)
    pieces: list[np.ndarray] = [gap[: RATE // 2]]
    spans = []
    for text in SENTENCES[:3]:
        [result] = piper.synthesize_batch([TtsRequest(text=text)])
        assert isinstance(result, TtsResult)
        audio = to_16k(result.audio, result.sample_rate)
        loud = np.flatnonzero(np.abs(audio) > 0.02)
        offset = sum(len(p) for p in pieces)
        spans.append((offset + int(loud[0]), offset + int(loud[-1]) + 1))
        pieces += [audio, gap]
    ints = np.round(np.clip(np.concatenate(pieces), -1, 1) * 32767).astype("<i2")
    return Conversation(ints.tobytes(), SENTENCES[:3], spans)


def own_redis() -> Iterator[RedisServer]:
    """A Redis of the module's own: a kill or hand-off test must know every worker that could own a session."""
    server = start_redis()
    yield server
    if server.process is not None:
        server.process.terminate()
        server.process.wait(5)


def whisper_workers(redis_url: str, names: tuple[str, ...]) -> Iterator[dict[str, WorkerProcess]]:
    """Real whisper worker processes that give up a dead peer's session after 2 s, ready before yielding."""
    env = {"OMP_NUM_THREADS": "1", "KUBESPEECH_SESSION_CLAIM_TIMEOUT_S": "2"}
    procs = {
        name: WorkerProcess(
            redis_url,
            task="asr",
            model=WHISPER,
            engine="whisper",
            max_wait_ms=0,
            env={**env, "KUBESPEECH_WORKER_CONSUMER_NAME": name},
        )
        for name in names
    }
    try:
        for p in procs.values():
            p.wait_ready(120)
        yield procs
    finally:
        for p in procs.values():
            p.stop()


@pytest.fixture(scope="module")
def live_redis() -> Iterator[RedisServer]:
    yield from own_redis()


@pytest.fixture(scope="module")
def workers(live_redis: RedisServer) -> Iterator[dict[str, WorkerProcess]]:
    yield from whisper_workers(live_redis.url, ("live-a", "live-b"))


@pytest.fixture(scope="module")
def api(
    live_redis: RedisServer, workers: dict[str, WorkerProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ApiServer]:
    models = [{"name": WHISPER, "task": "asr", "default": True}, {"name": GHOST, "task": "asr"}]
    server = start_api(api_settings(live_redis.url, models, tmp_path_factory.mktemp("live")))
    server.server.config.app.state.stt_live = LiveSttSettings(idle_timeout_s=3, max_frame_bytes=64 * 1024)
    wait_live(server, [WHISPER])
    yield server
    server.stop()


def ws_url(api: ApiServer, query: str = "", path: str = "/waves/v1/stt/live") -> str:
    return api.url.replace("http://", "ws://") + path + (f"?{query}" if query else "")


def drain(ws: ClientConnection, timeout: float = 30) -> tuple[list[dict[str, Any]], int | None, str]:
    """Every message until the server closes, and the close code and reason."""
    messages = []
    try:
        while True:
            raw = ws.recv(timeout=timeout)
            messages.append(orjson.loads(raw))
    except ConnectionClosed as exc:
        rcvd = exc.rcvd
        return messages, rcvd.code if rcvd else None, rcvd.reason if rcvd else ""


def paced_sender(
    pcm: bytes, send: Any, close: Any, t0: list[float], stop: threading.Event | None = None
) -> threading.Thread:
    """Send ``pcm`` in 4096-byte frames at real-time pace, then close the stream (in a thread)."""

    def run() -> None:
        dur = CHUNK_BYTES / 2 / RATE
        t0.append(time.monotonic())
        for i in range(0, len(pcm), CHUNK_BYTES):
            if stop is not None and stop.is_set():
                return
            send(pcm[i : i + CHUNK_BYTES])
            time.sleep(max(0.0, t0[0] + (i // CHUNK_BYTES + 1) * dur - time.monotonic()))
        close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def sdk_client(api: ApiServer) -> Any:
    from smallestai import SmallestAI
    from smallestai.environment import SmallestAIEnvironment

    ws = api.url.replace("http://", "ws://")
    env = SmallestAIEnvironment(atoms=api.url, waves=api.url, waves_ws=ws, payment=api.url)
    return SmallestAI(environment=env, api_key=API_KEY, max_retries=0)


def run_sdk_session(
    api: ApiServer, conv: Conversation, on_event: Any = None
) -> tuple[list[tuple[float, Any]], float]:
    """Stream the conversation through the SDK; (arrival time, event) of every event and the send start."""
    from smallestai.waves.helpers import stream_speech_to_text
    from smallestai.waves.speech_to_text.types import CloseStream

    client = sdk_client(api)
    received: list[tuple[float, Any]] = []
    t0: list[float] = []
    with stream_speech_to_text(
        client, language="en", sample_rate=RATE, encoding="linear16", word_timestamps=True,
        full_transcript=True, eou_timeout_ms=600,
    ) as socket:  # fmt: skip
        sender = paced_sender(
            conv.pcm, socket.send_audio_chunk_out,
            lambda: socket.send_close_stream(CloseStream(type="close_stream")), t0,
        )  # fmt: skip
        for event in socket:
            received.append((time.monotonic(), event))
            if on_event is not None:
                on_event(event)
            if getattr(event, "is_last", False) or getattr(event, "type", None) == "error":
                break
        sender.join(60)
    return received, t0[0]


def finals_of(received: list[tuple[float, Any]]) -> list[tuple[float, Any]]:
    return [(t, e) for t, e in received if e.is_final and (e.transcript or "").strip()]


def test_sdk_streams_real_time_with_partials_finals_and_is_last(
    api: ApiServer, conversation: Conversation
) -> None:
    received, t0 = run_sdk_session(api, conversation)
    events = [e for _, e in received]
    assert all(e.type == "transcription" for e in events), [e for e in events if e.type != "transcription"]
    assert events[-1].is_last is True and events[-1].is_final is True
    assert all(not e.is_last for e in events[:-1])
    sids = {e.session_id for e in events}
    assert len(sids) == 1 and None not in sids
    end_s = t0 + conversation.spans[-1][1] / RATE
    partials = [(t, e) for t, e in received if e.is_final is False]
    assert partials and partials[0][0] < end_s, "partials must arrive while the audio is still being sent"
    finals = finals_of(received)
    texts = [e.transcript for _, e in finals]
    assert wer([" ".join(conversation.texts)], [" ".join(texts)]) <= 0.15, texts
    assert wer([" ".join(conversation.texts)], [events[-1].full_transcript or ""]) <= 0.15, events[
        -1
    ].full_transcript
    words = [w for _, e in finals for w in e.words or []]
    assert words and [w.start for w in words] == sorted(w.start for w in words)

    # Measured, not asserted: end of each phrase (in the audio timeline as sent) -> its final event.
    lat = []
    for _, end in conversation.spans:
        after = [t for t, e in finals if e.end is not None and e.end >= end / RATE - 0.4]
        if after:
            lat.append(after[0] - (t0 + end / RATE))
    ttfp = partials[0][0] - (t0 + conversation.spans[0][0] / RATE)
    print(
        f"\nlive stt (API + whisper tiny.en worker, 2-core CPU): end of phrase -> final "
        f"p50 {np.percentile(lat, 50) * 1000:.0f} ms, p95 {np.percentile(lat, 95) * 1000:.0f} ms "
        f"({', '.join(f'{x * 1000:.0f}' for x in lat)} ms; eou 600 ms); speech onset -> first partial "
        f"{ttfp * 1000:.0f} ms; {len(partials)} partials, {len(finals)} finals"
    )


def test_refusals_and_their_close_codes(api: ApiServer) -> None:
    cases = [
        ("", {}, 1008, "API key"),
        ("sample_rate=4000", AUTH, 1008, "sample_rate"),
        ("encoding=flac", AUTH, 1008, "encoding"),
        ("model=nope", AUTH, 1008, "nope"),
        (f"model={GHOST}", AUTH, 1013, "no worker"),
    ]
    for query, headers, code, needle in cases:
        with connect(ws_url(api, query), additional_headers=headers) as ws:
            messages, got, reason = drain(ws)
        assert got == code, (query, got, reason, messages)
        assert messages and messages[-1]["type"] == "error", (query, messages)
        assert needle.lower() in messages[-1]["message"].lower(), (query, messages)
    assert "retry" in reason  # the 1013 reason says when to reconnect


def test_bad_frames(api: ApiServer) -> None:
    url = ws_url(api, "language=en&sample_rate=16000")
    with connect(url, additional_headers=AUTH) as ws:
        ws.send("this is not json")
        _, code, _ = drain(ws)
    assert code == 1003
    with connect(url, additional_headers=AUTH, max_size=None) as ws:
        ws.send(b"\0" * (64 * 1024 + 2))
        messages, code, _ = drain(ws)
    assert code == 1009 and "exceeds" in messages[-1]["message"]
    # Unknown JSON and an odd byte count are answered with error events; the session goes on.
    with connect(url, additional_headers=AUTH) as ws:
        ws.send(orjson.dumps({"type": "nope"}).decode())
        first = orjson.loads(ws.recv(timeout=10))
        ws.send(b"\0" * 4095)
        second = orjson.loads(ws.recv(timeout=10))
        ws.send(b"\0" * 8192)
        ws.send(orjson.dumps({"type": "close_stream"}).decode())
        messages, code, _ = drain(ws)
    assert first["type"] == "error" and "nope" in first["message"]
    assert second["type"] == "error" and "4095" in second["message"]
    assert code == 1000 and messages[-1]["is_last"] is True and messages[-1]["type"] == "transcription"


def test_idle_timeout(api: ApiServer) -> None:
    started = time.monotonic()
    with connect(ws_url(api), additional_headers=AUTH) as ws:
        ws.send(b"\0" * 4096)
        messages, code, reason = drain(ws)
    assert code == 1008 and "idle" in reason, (code, reason, messages)
    assert 3 <= time.monotonic() - started < 10


def test_legacy_path_and_active_session_count(
    api: ApiServer, live_redis: RedisServer, conversation: Conversation
) -> None:
    async def count() -> int:
        client = Redis.from_url(live_redis.url)
        try:
            return await active_sessions(client, SessionKeys("ks"), WHISPER)
        finally:
            await client.aclose()

    pcm = conversation.pcm[: RATE * 2 * 4]  # the first sentence, as 8 kHz mu-law
    at_8k = soxr.resample(np.frombuffer(pcm, "<i2").astype(np.float32) / 32768, RATE, 8000)
    mulaw, _ = encode_audio(np.round(at_8k * 32767).astype("<i2").tobytes(), 8000, "mulaw")
    url = ws_url(api, "sample_rate=8000&encoding=mulaw", path="/api/v1/lightning/get_text")
    with connect(url, additional_headers=AUTH) as ws:
        for i in range(0, len(mulaw), 1024):
            ws.send(mulaw[i : i + 1024])
        assert asyncio.run(count()) == 1
        ws.send(orjson.dumps({"type": "close_stream"}).decode())
        messages, code, _ = drain(ws)
    assert code == 1000 and messages[-1]["is_last"] is True
    text = " ".join(m["transcript"] for m in messages if m.get("is_final"))
    assert wer([" ".join(conversation.texts[:1])], [text]) <= 0.25, text
    time.sleep(0.2)
    assert asyncio.run(count()) == 0


def test_g711_and_resampling_decode() -> None:
    tone = (np.sin(np.arange(8000) * 2 * np.pi * 440 / 8000) * 0.5 * 32767).astype("<i2")
    for enc in ("mulaw", "alaw"):
        coded, _ = encode_audio(tone.tobytes(), 8000, enc)
        out = np.frombuffer(PcmDecoder(enc, 16000).decode(coded), "<i2")
        assert np.abs(out.astype(np.int32) - tone).max() < 0.02 * 32767, enc
    decoder = PcmDecoder("linear16", 8000)
    out16 = decoder.decode(tone.tobytes()) + decoder.flush()
    assert abs(len(out16) // 2 - 16000) <= 16


def test_worker_killed_mid_session_goes_on_on_another(
    api: ApiServer, workers: dict[str, WorkerProcess], live_redis: RedisServer, conversation: Conversation
) -> None:
    store = redis_sync.Redis.from_url(live_redis.url)
    keys = SessionKeys("ks")
    killed: list[str] = []

    def on_event(event: Any) -> None:
        if killed or not (event.is_final and (event.transcript or "").strip()):
            return
        owner = store.hget(keys.state(event.session_id), "owner")
        assert owner is not None
        killed.append(owner.decode())
        workers[killed[0]].proc.kill()  # SIGKILL: no hand-off, its claim must time out

    received, _ = run_sdk_session(api, conversation, on_event)
    events = [e for _, e in received]
    assert killed, "no final arrived before the end"
    assert events[-1].is_last is True
    finals = [e for _, e in finals_of(received)]
    texts = [e.transcript for e in finals]
    # No final twice: their spans follow one another.
    assert all(a.end <= b.start + 0.05 for a, b in itertools.pairwise(finals)), texts
    assert len(texts) == len(set(texts)), texts
    assert wer([" ".join(conversation.texts)], [" ".join(texts)]) <= 0.15, texts
    assert wer([" ".join(conversation.texts)], [events[-1].full_transcript or ""]) <= 0.15
    owner = store.hget(keys.state(events[0].session_id), "owner")
    survivor = next(n for n in workers if n != killed[0])
    assert owner is not None and owner.decode() == survivor
