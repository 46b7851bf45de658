"""``kubespeech dev`` end to end: the whole stack as real processes, a TTS→STT round trip, and a clean stop."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import jiwer
import psutil
import pytest

from tests.conftest import free_port
from tests.stack import KUBESPEECH, stack_env

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
    stack = _start_dev()
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


def test_sigterm_stops_every_process_it_started(dev_stack: DevStack) -> None:
    parent = psutil.Process(dev_stack.proc.pid)
    children = parent.children(recursive=True)
    assert len(children) >= 5, [c.name() for c in children]  # redis, license proxy, 2 workers, api
    dev_stack.proc.send_signal(signal.SIGTERM)
    assert dev_stack.proc.wait(30) == 0
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"orphans left: {[p.pid for p in alive]}"


def test_a_killed_supervisor_leaves_no_orphans() -> None:
    stack = _start_dev(["--no-license-proxy"])
    children = psutil.Process(stack.proc.pid).children(recursive=True)
    assert children
    stack.proc.send_signal(signal.SIGKILL)
    stack.proc.wait(10)
    _, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, f"orphans left after SIGKILL: {[p.pid for p in alive]}"
