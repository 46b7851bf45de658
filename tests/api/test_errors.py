"""Every error path of the API, with its status, stable code, envelope and headers, through real HTTP,
real Redis and real workers (a deliberately slow no-op worker for the queue-full and deadline cases)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_sync

from kubespeech.jobs import Keys
from kubespeech.license.keys import LicenseKeys
from tests.api.conftest import (
    NOOP_ASR,
    NOOP_MODELS,
    NOOP_TTS,
    ApiServer,
    Workers,
    api_settings,
    start_api,
    wait_live,
)
from tests.audio.conftest import sndfile
from tests.conftest import RedisServer
from tests.stack import WorkerProcess

SLOW = "slow-asr"
GHOST = "ghost-asr"


def wav(seconds: float) -> bytes:
    return sndfile("WAV", "PCM_16", seconds=seconds, rate=16000, channels=1)


@pytest.fixture(scope="module")
def slow_worker(api_redis: RedisServer) -> Iterator[WorkerProcess]:
    w = WorkerProcess(api_redis.url, task="asr", model=SLOW, engine="noop", max_batch_size=1, max_wait_ms=0,
                      engine_options={"delay_s": 2.0})  # fmt: skip
    w.wait_ready(60)
    yield w
    w.stop()


@pytest.fixture(scope="module")
def strict_api(
    api_redis: RedisServer,
    noop_workers: Workers,
    slow_worker: WorkerProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ApiServer]:
    tmp = tmp_path_factory.mktemp("strict")
    keys_file = tmp / "keys"
    keys_file.write_text("# test keys\n")
    models = [*NOOP_MODELS, {"name": SLOW, "task": "asr"}, {"name": GHOST, "task": "asr"}]
    settings = api_settings(
        api_redis.url, models, tmp, keys_file=keys_file,
        limits={"max_upload_bytes": 200_000, "max_audio_seconds": 3.0, "max_text_chars": 100,
                "request_timeout_s": 1.0, "cold_start_wait_s": 0.5, "retry_after_s": 7},
        queue={"max_length": 1},
    )  # fmt: skip
    server = start_api(settings)
    wait_live(server, [NOOP_ASR, NOOP_TTS, SLOW])
    yield server
    server.stop()


SURFACES = {
    "waves": ("/waves/v1/stt/", "raw"),
    "legacy": ("/api/v1/lightning/get_text", "raw"),
    "openai": ("/v1/audio/transcriptions", "multipart"),
}


def post_audio(c: httpx.Client, surface: str, data: bytes, query: str = "", **kw: Any) -> httpx.Response:
    path, kind = SURFACES[surface]
    if kind == "raw":
        return c.post(path + query, content=data, **kw)
    form = {"model": "whisper-1"}
    for part in filter(None, query.lstrip("?").split("&")):
        k, _, v = part.partition("=")
        form[k] = v
    return c.post(path, files={"file": ("audio", data)}, data=form, **kw)


def error_code(r: httpx.Response, surface: str) -> str:
    body = r.json()
    if surface == "openai":
        assert set(body["error"]) == {"message", "type", "param", "code"}
        return str(body["error"]["code"])
    assert body["status"] == "error" and body["request_id"] == r.headers["x-request-id"]
    assert body["error"]["message"]
    return str(body["error"]["code"])


@pytest.mark.parametrize("surface", sorted(SURFACES))
def test_audio_errors_on_every_surface(strict_api: ApiServer, surface: str) -> None:
    cases = [
        (wav(0.5)[:30], 400, "CORRUPT_AUDIO", ""),
        (b"", 400, "EMPTY_AUDIO", ""),
        (b"not audio at all, just some text" * 10, 415, "UNSUPPORTED_AUDIO_FORMAT", ""),
        (wav(4.0), 413, "AUDIO_TOO_LONG", ""),
        (wav(0.5), 422, "INVALID_PARAMETER", "?language=e%20n!"),
        (wav(0.5), 404, "MODEL_NOT_FOUND", "?model=no-such-model"),
    ]
    with strict_api.client() as c:
        for data, status, code, query in cases:
            r = post_audio(c, surface, data, query)
            assert (r.status_code, error_code(r, surface)) == (status, code), (code, r.text)


@pytest.mark.parametrize("surface", sorted(SURFACES))
def test_oversize_upload_is_413_with_or_without_content_length(strict_api: ApiServer, surface: str) -> None:
    big = b"\0" * 300_000
    with strict_api.client() as c:
        r = post_audio(c, surface, big)
        assert r.status_code == 413 and error_code(r, surface) == "PAYLOAD_TOO_LARGE"
        if SURFACES[surface][1] == "raw":

            def chunks() -> Iterator[bytes]:
                for _ in range(30):
                    yield b"\0" * 10_000

            r = c.post(SURFACES[surface][0], content=chunks())
            assert r.status_code == 413 and error_code(r, surface) == "PAYLOAD_TOO_LARGE"


def test_tts_parameter_errors(strict_api: ApiServer) -> None:
    cases = [
        ({"text": ""}, 422, "EMPTY_INPUT"),
        ({"text": "x" * 101}, 422, "TEXT_TOO_LONG"),
        ({"text": "hi", "sample_rate": 12345}, 422, "INVALID_PARAMETER"),
        ({"text": "hi", "speed": 3}, 422, "INVALID_PARAMETER"),
        ({"text": "hi", "output_format": "ogg"}, 422, "INVALID_PARAMETER"),
        ({"voice_id": "emily"}, 422, "INVALID_PARAMETER"),
        ({"text": "hi", "model": "nope"}, 404, "MODEL_NOT_FOUND"),
        ({"text": "hi", "model": NOOP_ASR}, 404, "MODEL_NOT_FOUND"),
        ({"text": "hi", "voice_id": "nobody"}, 404, "VOICE_NOT_FOUND"),
    ]
    with strict_api.client() as c:
        for body, status, code in cases:
            r = c.post("/waves/v1/tts", json=body)
            assert (r.status_code, error_code(r, "waves")) == (status, code), (body, r.text)
        r = c.post("/waves/v1/tts", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and error_code(r, "waves") == "INVALID_JSON"
        r = c.post("/v1/audio/speech", json={"model": "tts-1", "input": "x" * 101, "voice": "alloy"})
        assert r.status_code == 422 and error_code(r, "openai") == "TEXT_TOO_LONG"


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/waves/v1/stt/"), ("POST", "/waves/v1/tts"), ("GET", "/waves/v1/lightning-v3.1/get_voices"),
     ("POST", "/api/v1/lightning/get_text"), ("POST", "/api/v1/lightning-v2/get_speech"),
     ("POST", "/v1/audio/transcriptions"), ("POST", "/v1/audio/speech"), ("GET", "/v1/models")],
)  # fmt: skip
def test_missing_or_wrong_key_is_401_in_the_surface_envelope(
    strict_api: ApiServer, method: str, path: str
) -> None:
    surface = "openai" if path.startswith("/v1/") else "waves"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
        r = httpx.request(method, strict_api.url + path, headers=headers, json={"text": "hi"})
        assert r.status_code == 401, r.text
        assert r.headers["www-authenticate"] == "Bearer"
        assert error_code(r, surface) == "UNAUTHORIZED"


def test_keys_file_is_reloaded_and_accepts_hashed_keys(strict_api: ApiServer) -> None:
    import hashlib

    keys_file = strict_api.settings.keys_file
    assert keys_file is not None
    plain, hashed = "file-key-plain", "file-key-hashed"
    keys_file.write_text(f"{plain}\nsha256:{hashlib.sha256(hashed.encode()).hexdigest()}\n")

    def status(key: str) -> int:
        return httpx.get(
            strict_api.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}
        ).status_code

    deadline = time.monotonic() + 5
    while status(plain) != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status(plain) == 200 and status(hashed) == 200
    keys_file.write_text(f"{plain}\n")
    deadline = time.monotonic() + 5
    while status(hashed) != 401 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status(hashed) == 401 and status(plain) == 200
    assert status(strict_api.key) == 200  # keys from settings stay


def test_queue_full_is_429_and_a_missed_deadline_504(strict_api: ApiServer) -> None:
    results: dict[str, httpx.Response] = {}

    def first() -> None:
        with strict_api.client() as c:
            results["first"] = c.post(f"/waves/v1/stt/?model={SLOW}", content=wav(0.2))

    t = threading.Thread(target=first)
    t.start()
    time.sleep(0.3)  # the slow worker has taken the first job; the queue (bound 1) is full
    with strict_api.client() as c:
        r = c.post("/v1/audio/transcriptions", files={"file": ("a", wav(0.2))}, data={"model": SLOW})
    t.join(10)
    assert r.status_code == 429 and error_code(r, "openai") == "QUEUE_FULL"
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert int(r.headers["retry-after"]) >= 1
    first_r = results["first"]
    assert first_r.status_code == 504 and error_code(first_r, "waves") == "DEADLINE_EXCEEDED"
    time.sleep(2.0)  # let the slow worker finish so later tests find the queue empty


def test_cold_start_holds_then_503_with_retry_after_and_leaves_demand_visible(
    strict_api: ApiServer, api_redis: RedisServer
) -> None:
    started = time.monotonic()
    with strict_api.client() as c:
        r = c.post(f"/waves/v1/stt/?model={GHOST}", content=wav(0.2))
    held = time.monotonic() - started
    assert r.status_code == 503 and error_code(r, "waves") == "WORKERS_UNAVAILABLE"
    assert r.headers["retry-after"] == "7"
    assert 0.45 <= held < 3
    # The job was queued, so an autoscaler watching queue depth sees the demand for this model.
    assert redis_sync.Redis.from_url(api_redis.url).xlen(Keys().queue(GHOST)) >= 1
    ready = httpx.get(strict_api.url + "/ready").json()
    assert ready["status"] == "ready" and ready["tasks"]["asr"]["models"][GHOST] == 0


def test_cold_start_is_served_when_a_worker_arrives(api_redis: RedisServer, tmp_path: Path) -> None:
    late = "late-asr"
    settings = api_settings(api_redis.url, [{"name": late, "task": "asr"}], tmp_path,
                            limits={"cold_start_wait_s": 30.0, "request_timeout_s": 40.0})  # fmt: skip
    server = start_api(settings)
    worker = None
    try:
        results: dict[str, httpx.Response] = {}

        def call() -> None:
            with server.client() as c:
                results["r"] = c.post("/waves/v1/stt/", content=wav(0.5))

        t = threading.Thread(target=call)
        t.start()
        time.sleep(0.3)
        worker = WorkerProcess(api_redis.url, task="asr", model=late, engine="noop", max_wait_ms=0)
        t.join(40)
        assert results["r"].status_code == 200, results["r"].text
        assert results["r"].json()["transcription"] == "8000 samples"
    finally:
        if worker is not None:
            worker.stop()
        server.stop()


def test_request_id_is_echoed_when_valid(strict_api: ApiServer) -> None:
    with strict_api.client() as c:
        r = c.get("/v1/models", headers={"X-Request-ID": "client-id.42"})
        assert r.headers["x-request-id"] == "client-id.42"
        r = c.post("/waves/v1/tts", json={"text": ""}, headers={"X-Request-ID": "bad id with spaces"})
        assert r.headers["x-request-id"] != "bad id with spaces"
        assert r.json()["request_id"] == r.headers["x-request-id"]


def test_unknown_route_and_method(strict_api: ApiServer) -> None:
    with strict_api.client() as c:
        r = c.get("/v1/nothing-here")
        assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND"
        r = c.get("/waves/v1/tts")
        assert r.status_code == 405 and r.json()["error"]["code"] == "METHOD_NOT_ALLOWED"


def test_metrics_count_requests_audio_and_characters(strict_api: ApiServer) -> None:
    with strict_api.client() as c:
        assert c.post("/waves/v1/stt/", content=wav(1.0)).status_code == 200
        assert c.post("/waves/v1/tts", json={"text": "twelve chars"}).status_code == 200
        text = c.get("/metrics").text
    assert 'kubespeech_api_requests_total{method="POST",route="/waves/v1/stt/",status="200"}' in text
    assert (
        'kubespeech_api_request_duration_seconds_bucket{le="0.01",method="POST",route="/waves/v1/tts"}'
        in text
    )
    assert f'kubespeech_api_audio_seconds_in_total{{model="{NOOP_ASR}",surface="waves"}}' in text
    assert f'kubespeech_api_characters_in_total{{model="{NOOP_TTS}",surface="waves"}}' in text


def test_ready_can_require_workers(api_redis: RedisServer, tmp_path: Path) -> None:
    settings = api_settings(api_redis.url, [{"name": GHOST, "task": "asr"}], tmp_path)
    settings.ready_requires_workers = True
    server = start_api(settings)
    try:
        r = httpx.get(server.url + "/ready")
        assert r.status_code == 503, r.text
        assert r.json()["tasks"]["asr"]["state"] == "cold_start"
        assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    finally:
        server.stop()


# --- license gate and usage metering, against a stand-in license proxy over real HTTP -----------------------

ANSWERS = {
    "expired": {
        "state": "expired",
        "reason": "expired",
        "message": "The license expired.",
        "features": ["asr"],
    },
    "invalid": {"state": "invalid", "reason": "bad_signature", "message": "The license is not valid."},
    "tts-only": {"state": "valid", "features": ["tts"], "expires_at_unix": time.time() + 86400},
}


@pytest.fixture(scope="module")
def license_proxy() -> Iterator[str]:
    """Serves canned ``GET /<case>/v1/license`` answers in the license proxy's documented shape."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            case = self.path.strip("/").split("/")[0]
            body = json.dumps(ANSWERS.get(case, {})).encode()
            self.send_response(200 if case in ANSWERS else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.mark.parametrize(
    ("case", "stt", "tts"),
    [("expired", (403, "LICENSE_EXPIRED"), (403, "LICENSE_EXPIRED")),
     ("invalid", (401, "INVALID_LICENSE"), (401, "INVALID_LICENSE")),
     ("tts-only", (403, "FEATURE_NOT_LICENSED"), (200, None))],
)  # fmt: skip
def test_license_errors_and_usage_metering(
    api_redis: RedisServer, noop_workers: Workers, license_proxy: str, tmp_path: Path,
    case: str, stt: tuple[int, str], tts: tuple[int, str | None],
) -> None:  # fmt: skip
    settings = api_settings(api_redis.url, NOOP_MODELS, tmp_path)
    settings.license_proxy_url = f"{license_proxy}/{case}"
    server = start_api(settings)
    usage = LicenseKeys("ks").usage_stream
    r = redis_sync.Redis.from_url(api_redis.url)
    before = r.xlen(usage)
    try:
        wait_live(server, [NOOP_ASR, NOOP_TTS])
        with server.client() as c:
            s = c.post("/waves/v1/stt/", content=wav(0.5))
            assert (s.status_code, s.json()["error"]["code"]) == stt
            t = c.post("/v1/audio/speech", json={"model": "tts-1", "input": "hello", "voice": "alloy"})
            assert t.status_code == tts[0]
            if tts[1]:
                assert t.json()["error"]["code"] == tts[1]
        deadline = time.monotonic() + 5
        while r.xlen(usage) < before + 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        events = [fields for _, fields in r.xrange(usage)][before:]
        got = sorted((e[b"feature"].decode(), int(e[b"status_code"])) for e in events)
        assert got == sorted([("asr", stt[0]), ("tts", tts[0])])
        for e in events:
            assert b"text" not in e and b"audio" not in e  # metadata only
    finally:
        server.stop()


def test_redis_unreachable_is_503_not_500(tmp_path: Path) -> None:
    from tests.conftest import free_port

    settings = api_settings(f"redis://127.0.0.1:{free_port()}/0", NOOP_MODELS, tmp_path)
    server = start_api(settings)
    try:
        with server.client(timeout=30) as c:
            r = c.post("/waves/v1/stt/", content=wav(0.2))
            assert r.status_code == 503 and error_code(r, "waves") == "SERVICE_UNAVAILABLE", r.text
            assert int(r.headers["retry-after"]) >= 1
            r = c.post("/v1/audio/speech", json={"model": "tts-1", "input": "hi", "voice": "alloy"})
            assert r.status_code == 503 and error_code(r, "openai") == "SERVICE_UNAVAILABLE"
            ready = c.get("/ready")
            assert ready.status_code == 503 and ready.json()["redis"] == "unreachable"
            assert c.get("/waves/v1/health").json()["status"] == "degraded"
    finally:
        server.stop()
