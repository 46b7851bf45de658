"""``kubespeech dev`` end to end: the whole stack as real processes, a TTS→STT round trip, and a clean stop."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jiwer
import numpy as np
import psutil
import pytest
import soundfile

from tests.api.test_stt_live import paced_sender
from tests.conftest import free_port
from tests.stack import KUBESPEECH, stack_env

os.environ["SMALLESTAI_TELEMETRY"] = "0"  # no network calls from the SDK

SENTENCES = [
    "The weather is lovely today.",
    "Please send the report by Friday morning.",
    "Our team will meet in the large conference room.",
    "She bought three apples and a loaf of bread.",
    "Turn left at the next traffic light.",
    "The train to Boston leaves at noon.",
]


@dataclass
class DevStack:
    proc: subprocess.Popen[str]
    url: str
    key: str
    output: list[str]


def _normalize(text: str) -> str:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).strip()


def _start_dev(extra: list[str] | None = None) -> DevStack:
    port = free_port()
    key = "test-key-" + os.urandom(6).hex()
    proc = subprocess.Popen(
        [KUBESPEECH, "dev", "--port", str(port), "--api-key", key, *(extra or [])],
        env=stack_env("redis://unused"),  # dev starts its own Redis and sets the URL for its children
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            if "is ready" in line:
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    until = time.monotonic() + 240
    while not ready.is_set():
        if proc.poll() is not None or time.monotonic() > until:
            proc.kill()
            raise AssertionError("kubespeech dev did not become ready:\n" + "".join(output[-40:]))
        time.sleep(0.1)
    return DevStack(proc, f"http://127.0.0.1:{port}", key, output)


@pytest.fixture(scope="module")
def dev_stack() -> Iterator[DevStack]:
    # The example a platform engineer applies to a cluster, run here by the same builders.
    stack = _start_dev(["-f", str(Path(__file__).resolve().parents[2] / "examples" / "cpu.yaml")])
    yield stack
    if stack.proc.poll() is None:
        stack.proc.kill()


def test_dev_prints_the_url_and_the_key(dev_stack: DevStack) -> None:
    text = "".join(dev_stack.output)
    assert dev_stack.url in text and dev_stack.key in text


def test_tts_then_stt_round_trip_through_the_whole_stack(dev_stack: DevStack) -> None:
    auth = {"Authorization": f"Bearer {dev_stack.key}"}
    hypotheses = []
    with httpx.Client(base_url=dev_stack.url, headers=auth, timeout=60) as http:
        for sentence in SENTENCES:
            tts = http.post("/waves/v1/tts", json={"text": sentence, "sample_rate": 16000})
            assert tts.status_code == 200, tts.text
            assert tts.headers["content-type"].startswith("audio/")
            stt = http.post(
                "/waves/v1/stt/?language=en", content=tts.content, headers={"Content-Type": "audio/wav"}
            )
            assert stt.status_code == 200, stt.text
            hypotheses.append(stt.json()["transcription"])
    wer = jiwer.wer([_normalize(s) for s in SENTENCES], [_normalize(h) for h in hypotheses])
    print(f"round-trip WER over {len(SENTENCES)} sentences: {wer:.3f}")
    assert wer <= 0.15, list(zip(SENTENCES, hypotheses, strict=True))


def test_requests_without_the_key_are_refused(dev_stack: DevStack) -> None:
    resp = httpx.post(f"{dev_stack.url}/waves/v1/tts", json={"text": "hi"}, timeout=10)
    assert resp.status_code == 401


def _sdk(stack: DevStack) -> Any:
    """The unmodified smallestai SDK pointed at the dev stack (its base URLs are the only setting)."""
    from smallestai import SmallestAI
    from smallestai.environment import SmallestAIEnvironment

    ws = stack.url.replace("http://", "ws://")
    env = SmallestAIEnvironment(atoms=stack.url, waves=stack.url, waves_ws=ws, payment=stack.url)
    return SmallestAI(environment=env, api_key=stack.key, max_retries=0)


def _transcribe(stack: DevStack, pcm: bytes, rate: int) -> str:
    buf = io.BytesIO()
    soundfile.write(buf, np.frombuffer(pcm, dtype="<i2"), rate, format="WAV", subtype="PCM_16")
    resp = httpx.post(
        f"{stack.url}/waves/v1/stt/?language=en", content=buf.getvalue(), timeout=60,
        headers={"Authorization": f"Bearer {stack.key}", "Content-Type": "audio/wav"},
    )  # fmt: skip
    assert resp.status_code == 200, resp.text
    return str(resp.json()["transcription"])


def test_sdk_streaming_tts_over_sse_and_websocket(dev_stack: DevStack) -> None:
    from smallestai.core.http_sse._api import EventSource
    from smallestai.waves.tts.types import TtsRequestMessage

    text = " ".join(SENTENCES[:3])
    client = _sdk(dev_stack)
    # SSE through the SDK's own request and SSE parser (its typed iterator skips the documented objects).
    sse_pcm, sse_chunks = b"", 0
    with client.waves.with_raw_response.synthesize_sse_tts(
        text=text, voice_id="joe", sample_rate=16000
    ) as resp:
        for sse in EventSource(resp._response).iter_sse():
            if sse.event == "audio":
                sse_pcm += base64.b64decode(json.loads(sse.data)["audio"])
                sse_chunks += 1
    # WebSocket: chunk messages, then complete, all carrying the request id.
    ws_chunks = []
    with client.waves.tts.connect() as socket:
        socket.synthesize_streaming_tts(
            TtsRequestMessage(voice_id="joe", text=text, sample_rate=16000, request_id="dev-1")
        )
        while (msg := socket.recv()).status == "chunk":
            ws_chunks.append(msg)
    assert msg.status == "complete" and msg.request_id == "dev-1"
    assert sse_chunks >= 3 and len(ws_chunks) >= 3  # one chunk per sentence at least
    ws_pcm = b"".join(base64.b64decode(m.data.audio) for m in ws_chunks)
    for pcm in (sse_pcm, ws_pcm):
        heard = _transcribe(dev_stack, pcm, 16000)
        assert jiwer.wer(_normalize(text), _normalize(heard)) <= 0.15, heard


def test_sdk_live_stt_partials_and_finals(dev_stack: DevStack) -> None:
    from smallestai.waves.helpers import stream_speech_to_text
    from smallestai.waves.speech_to_text.types import CloseStream

    # Speech from the dev stack's own TTS, with pauses that end each phrase.
    auth = {"Authorization": f"Bearer {dev_stack.key}"}
    gap = np.zeros(int(0.9 * 16000), dtype="<i2").tobytes()
    pcm = gap[: len(gap) // 2]
    texts = SENTENCES[3:5]
    for sentence in texts:
        tts = httpx.post(
            f"{dev_stack.url}/waves/v1/tts", headers=auth, timeout=60,
            json={"text": sentence, "sample_rate": 16000, "output_format": "wav"},
        )  # fmt: skip
        assert tts.status_code == 200, tts.text
        audio, rate = soundfile.read(io.BytesIO(tts.content), dtype="int16")
        assert rate == 16000
        pcm += audio.tobytes() + gap
    events: list[Any] = []
    t0: list[float] = []
    with stream_speech_to_text(
        _sdk(dev_stack), language="en", sample_rate=16000, encoding="linear16", full_transcript=True,
    ) as socket:  # fmt: skip
        sender = paced_sender(
            pcm, socket.send_audio_chunk_out,
            lambda: socket.send_close_stream(CloseStream(type="close_stream")), t0,
        )  # fmt: skip
        for event in socket:
            events.append(event)
            if getattr(event, "is_last", False) or getattr(event, "type", None) == "error":
                break
        sender.join(60)
    assert events and events[-1].is_last is True, events[-5:]
    assert any(e.is_final is False for e in events), "no partial result arrived"
    finals = [e.transcript for e in events if e.is_final and (e.transcript or "").strip()]
    assert len(finals) >= 2, finals  # a final per phrase, at its pause
    assert jiwer.wer(_normalize(" ".join(texts)), _normalize(" ".join(finals))) <= 0.15, finals
    assert jiwer.wer(_normalize(" ".join(texts)), _normalize(events[-1].full_transcript or "")) <= 0.15


def test_sigterm_stops_every_process_it_started(dev_stack: DevStack) -> None:
    parent = psutil.Process(dev_stack.proc.pid)
    children = parent.children(recursive=True)
    assert len(children) >= 5, [c.name() for c in children]  # redis, license proxy, 2 workers, api
    dev_stack.proc.send_signal(signal.SIGTERM)
    assert dev_stack.proc.wait(30) == 0
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"orphans left: {[p.pid for p in alive]}"


def test_a_killed_supervisor_leaves_no_orphans() -> None:
    stack = _start_dev()
    children = psutil.Process(stack.proc.pid).children(recursive=True)
    assert children
    stack.proc.send_signal(signal.SIGKILL)
    stack.proc.wait(10)
    _, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, f"orphans left after SIGKILL: {[p.pid for p in alive]}"
