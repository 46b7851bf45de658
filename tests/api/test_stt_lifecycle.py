"""Live STT session lifecycle against real processes: a worker SIGTERMed mid-session hands the session to
another, an API SIGTERMed mid-session delivers the last final and closes with 1012, and a client that never
reads its events is closed with 1008 while another session goes on."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis as redis_sync
from redis.asyncio import Redis
from websockets.asyncio.client import connect as aconnect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.sync.client import connect
from websockets.uri import parse_uri

from kubespeech.api.stt_live import LiveSttSettings
from kubespeech.jobs.sessions import SessionKeys
from kubespeech.license.proxy import create_proxy_app
from kubespeech.license.settings import ProxySettings
from kubespeech.license.token import generate_private_key, public_key_pem
from tests.api.conftest import API_KEY, WHISPER, ApiServer, api_settings, start_api, wait_live
from tests.api.test_realtime import at_24k
from tests.api.test_stt_live import (  # noqa: F401  (conversation is a fixture)
    AUTH,
    RATE,
    Conversation,
    conversation,
    drain,
    finals_of,
    own_redis,
    run_sdk_session,
    whisper_workers,
    ws_url,
)
from tests.conftest import RedisServer, free_port
from tests.engines.conftest import wer
from tests.license.conftest import FAST, Served, Vendor
from tests.stack import KUBESPEECH, WorkerProcess, stack_env

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def life_redis() -> Iterator[RedisServer]:
    yield from own_redis()


@pytest.fixture(scope="module")
def workers(life_redis: RedisServer) -> Iterator[dict[str, WorkerProcess]]:
    yield from whisper_workers(life_redis.url, ("life-a", "life-b"))


@pytest.fixture(scope="module")
def api(
    life_redis: RedisServer, workers: dict[str, WorkerProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ApiServer]:
    models = [{"name": WHISPER, "task": "asr", "default": True}]
    server = start_api(api_settings(life_redis.url, models, tmp_path_factory.mktemp("life")))
    app: Any = server.server.config.app
    app.state.stt_live = LiveSttSettings(idle_timeout_s=10, max_pending_events=8)
    wait_live(server, [WHISPER])
    yield server
    server.stop()


def _first_sentences(conv: Conversation, n: int) -> tuple[bytes, str]:
    end = min(conv.spans[n - 1][1] + int(0.3 * RATE), len(conv.pcm) // 2)
    return conv.pcm[: end * 2], " ".join(conv.texts[:n])


def test_client_that_never_reads_is_closed_while_another_session_goes_on(
    api: ApiServer,
    conversation: Conversation,  # noqa: F811
) -> None:
    pcm, text = _first_sentences(conversation, 1)
    normal: dict[str, Any] = {}

    def normal_session() -> None:
        with connect(ws_url(api), additional_headers=AUTH) as ws:
            for i in range(0, len(pcm), 4096):
                ws.send(pcm[i : i + 4096])
                time.sleep(0.02)
            ws.send(orjson.dumps({"type": "close_stream"}).decode())
            normal["result"] = drain(ws)

    other = threading.Thread(target=normal_session, daemon=True)
    other.start()

    # A raw client that never reads (the websockets clients read in a background thread), with a tiny
    # receive window, so the server's writes back up at once.
    host, port = api.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.settimeout(10)
    sock.connect((host, int(port)))
    proto = ClientProtocol(parse_uri(ws_url(api)))
    request = proto.connect()
    request.headers["Authorization"] = AUTH["Authorization"]
    proto.send_request(request)
    sock.sendall(b"".join(proto.data_to_send()))
    while proto.state is State.CONNECTING:
        proto.receive_data(sock.recv(4096))
    assert proto.state is State.OPEN, proto.handshake_exc
    proto.events_received()
    sent = 0
    try:
        proto.send_binary(pcm[: 16000 * 2])
        # Every 1-byte frame is answered with an error event: events pile up fast and nobody reads them.
        # (the server's kernel send buffer alone holds a few MB of them first).
        for _ in range(400):
            for _ in range(1000):
                proto.send_binary(b"\0")
            sock.sendall(b"".join(proto.data_to_send()))
            sent += 1000
    except OSError:
        pass  # the server closed and stopped reading
    received = 0
    while proto.close_rcvd is None:
        data = sock.recv(65536)
        if not data:
            break
        proto.receive_data(data)
        received += sum(isinstance(e, Frame) and e.opcode is Opcode.TEXT for e in proto.events_received())
    sock.close()
    close = proto.close_rcvd
    code, reason = (close.code, close.reason) if close else (None, "")
    messages = range(received)
    assert code == 1008 and "not reading" in reason, (code, reason, sent, len(messages))
    assert len(messages) < sent  # it was cut off, not served to the end

    other.join(60)
    messages, code, _ = normal["result"]
    assert code == 1000 and messages[-1]["is_last"] is True, (code, messages[-3:])
    said = " ".join(m["transcript"] for m in messages if m.get("is_final"))
    assert wer([text], [said]) <= 0.25, said


def test_api_sigterm_delivers_the_last_finals_and_closes_waves_and_realtime_with_1012(
    life_redis: RedisServer,
    workers: dict[str, WorkerProcess],
    tmp_path: Path,
    conversation: Conversation,  # noqa: F811
) -> None:
    models = tmp_path / "models.json"
    models.write_text(orjson.dumps([{"name": WHISPER, "task": "asr", "default": True}]).decode())
    port = free_port()
    env = stack_env(
        life_redis.url,
        {"KUBESPEECH_API_MODELS_FILE": str(models), "KUBESPEECH_API_REFRESH_INTERVAL_S": "0.2"},
    )
    proc = subprocess.Popen(
        [KUBESPEECH, "api", "--host", "127.0.0.1", "--port", str(port), "--api-key", API_KEY], env=env
    )
    url = f"http://127.0.0.1:{port}"
    try:
        until = time.monotonic() + 30
        while True:
            assert time.monotonic() < until, "API did not see a live worker"
            assert proc.poll() is None, proc.returncode
            try:
                body = httpx.get(f"{url}/ready", timeout=2).json()
                if any(n > 0 for t in body.get("tasks", {}).values() for n in t["models"].values()):
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)

        pcm, text = _first_sentences(conversation, 2)
        rt_pcm, rt_text = _first_sentences(conversation, 1)
        with (
            connect(f"ws://127.0.0.1:{port}/waves/v1/stt/live", additional_headers=AUTH) as ws,
            connect(f"ws://127.0.0.1:{port}/v1/realtime?intent=transcription", additional_headers=AUTH) as rt,
        ):
            # An OpenAI Realtime session beside it, its turn left open (no server VAD, no commit): only the
            # drain ends it.
            assert orjson.loads(rt.recv(timeout=10))["type"] == "transcription_session.created"
            rt.send(orjson.dumps({"type": "transcription_session.update", "session": {
                "input_audio_transcription": {"model": "whisper-1", "language": "en"},
                "turn_detection": None}}).decode())  # fmt: skip
            assert orjson.loads(rt.recv(timeout=10))["type"] == "transcription_session.updated"
            rt_audio = at_24k(rt_pcm)
            for i in range(0, len(rt_audio), 4800):
                chunk = base64.b64encode(rt_audio[i : i + 4800]).decode()
                rt.send(orjson.dumps({"type": "input_audio_buffer.append", "audio": chunk}).decode())
            for i in range(0, len(pcm), 4096):
                ws.send(pcm[i : i + 4096])
            first = orjson.loads(ws.recv(timeout=30))  # the worker runs the session now
            proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            messages, code, reason = drain(ws, timeout=30)
            took = time.monotonic() - started
            rt_messages, rt_code, rt_reason = drain(rt, timeout=30)
        assert rt_code == 1012 and "reconnect" in rt_reason, (rt_code, rt_reason, rt_messages[-3:])
        completed = [
            m for m in rt_messages if m["type"] == "conversation.item.input_audio_transcription.completed"
        ]
        assert len(completed) == 1 and wer([rt_text], [completed[0]["transcript"]]) <= 0.25, rt_messages
        assert code == 1012 and "reconnect" in reason, (code, reason, messages[-3:])
        assert took < 15, took
        events = [first, *messages]
        said = " ".join(m["transcript"] for m in events if m.get("is_final") and m["transcript"])
        assert wer([text], [said]) <= 0.25, said  # all the audio sent was transcribed
        assert events[-1]["is_last"] is True
        proc.wait(20)  # and the process goes on to exit
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_license_stream_limit_refuses_a_second_session_until_the_first_closes(
    life_redis: RedisServer,
    workers: dict[str, WorkerProcess],
    tmp_path: Path,
    conversation: Conversation,  # noqa: F811
) -> None:
    signer = generate_private_key()
    public = public_key_pem(signer.public_key()).decode()
    token = Vendor(signer, public, tmp_path / "vendor.pem").token(limits={"max_concurrent_streams": 1})
    store = Redis.from_url(life_redis.url)
    proxy_settings = ProxySettings(key=token, public_key=public, **FAST)  # type: ignore[arg-type]
    proxy = await Served(create_proxy_app(proxy_settings, store, key_prefix="ks")).start()
    models = [{"name": WHISPER, "task": "asr", "default": True}]
    settings = api_settings(life_redis.url, models, tmp_path)
    settings.license_proxy_url = proxy.url
    api = await asyncio.to_thread(start_api, settings)
    pcm, _ = _first_sentences(conversation, 1)
    close_stream = orjson.dumps({"type": "close_stream"}).decode()

    async def finish(ws: Any) -> tuple[list[dict[str, Any]], int | None, str]:
        messages = []
        try:
            while True:
                messages.append(orjson.loads(await asyncio.wait_for(ws.recv(), 30)))
        except ConnectionClosed as exc:
            return messages, exc.rcvd.code if exc.rcvd else None, exc.rcvd.reason if exc.rcvd else ""

    try:
        await asyncio.to_thread(wait_live, api, [WHISPER])
        async with aconnect(ws_url(api), additional_headers=AUTH) as first:
            await first.send(pcm[: RATE * 2])
            second = await aconnect(ws_url(api), additional_headers=AUTH)
            with contextlib.suppress(ConnectionClosed):
                await second.send(pcm[: RATE * 2])  # the refusal may already be on its way
            messages, code, reason = await finish(second)
            assert code == 1013 and "concurrent stream limit" in reason, (code, reason, messages)
            assert messages and "1 concurrent streams" in messages[-1]["message"], messages
            await first.send(close_stream)
            messages, code, _ = await finish(first)
            assert code == 1000 and messages[-1]["is_last"] is True, (code, messages[-2:])
        # The first one's lease is released: a new session is served.
        async with aconnect(ws_url(api), additional_headers=AUTH) as third:
            await third.send(pcm[: RATE * 2])
            await third.send(close_stream)
            messages, code, reason = await finish(third)
        assert code == 1000 and messages[-1]["is_last"] is True, (code, reason, messages[-2:])
    finally:
        await asyncio.to_thread(api.stop)
        await proxy.stop()
        await store.aclose()


def test_worker_sigterm_hands_the_session_to_another_worker(
    api: ApiServer,
    workers: dict[str, WorkerProcess],
    life_redis: RedisServer,
    conversation: Conversation,  # noqa: F811
) -> None:
    store = redis_sync.Redis.from_url(life_redis.url, decode_responses=True)
    keys = SessionKeys("ks")
    stopped: list[str] = []

    def on_event(event: Any) -> None:
        if stopped or not (event.is_final and (event.transcript or "").strip()):
            return
        owner = store.hget(keys.state(event.session_id), "owner")
        assert owner is not None
        stopped.append(str(owner))
        workers[stopped[0]].proc.send_signal(signal.SIGTERM)

    received, _ = run_sdk_session(api, conversation, on_event)
    events = [e for _, e in received]
    assert stopped, "no final arrived before the end"
    assert workers[stopped[0]].proc.wait(30) == 0
    assert events[-1].is_last is True
    finals = [e for _, e in finals_of(received)]
    texts = [e.transcript for e in finals]
    assert all(a.end <= b.start + 0.05 for a, b in itertools.pairwise(finals)), texts
    assert len(texts) == len(set(texts)), texts
    assert wer([" ".join(conversation.texts)], [" ".join(texts)]) <= 0.15, texts
    assert wer([" ".join(conversation.texts)], [events[-1].full_transcript or ""]) <= 0.15
    owner = store.hget(keys.state(events[0].session_id), "owner")
    survivor = next(n for n in workers if n != stopped[0])
    assert owner == survivor
