"""Result caching end to end: a real API and real workers (Piper TTS, faster-whisper STT, the no-op engine for
exact byte sizes) over a real Redis; what reaches a worker is read from the worker's own job counter."""

from __future__ import annotations

import base64
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_sync
from pydantic import ValidationError

from kubespeech.api.cache import InvalidCacheKey, cache_control, load_cache_key, normalize_text
from kubespeech.api.settings import ApiSettings, CacheSettings
from kubespeech.license.keys import LicenseKeys
from kubespeech.license.usage import decode_event
from tests.api.conftest import (
    NOOP_TTS,
    PIPER,
    WHISPER,
    ApiServer,
    Workers,
    api_settings,
    start_api,
    wait_live,
)
from tests.conftest import RedisServer
from tests.stack import WorkerProcess

MODELS = [
    {"name": WHISPER, "task": "asr", "default": True},
    {"name": PIPER, "task": "tts", "default": True, "voices": ["joe"]},
    {"name": NOOP_TTS, "task": "tts"},
]
SECRET_WORDS = "Please send the quarterly invoice to Margaret before Friday."


def worker_jobs(worker: WorkerProcess) -> float:
    """Jobs the worker finished (any outcome), from its own /metrics."""
    status, text = worker.get("/metrics")
    assert status == 200
    return sum(
        float(m.group(1)) for m in re.finditer(r"^kubespeech_worker_jobs_total\{[^}]*\} (\S+)$", text, re.M)
    )


def api_metric(server: ApiServer, name: str, task: str, **labels: str) -> float:
    """The sum of a metric's samples with these labels, from the API's /metrics."""
    total = 0.0
    for m in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", httpx.get(f"{server.url}/metrics").text, re.M):
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if found.get("task") == task and all(found.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


def forget_cache(redis_url: str) -> None:
    client = redis_sync.Redis.from_url(redis_url)
    keys = list(client.scan_iter("ks:cache:*"))
    if keys:
        client.delete(*keys)


@pytest.fixture(scope="module")
def cached_api(
    api_redis: RedisServer,
    real_workers: Workers,
    noop_workers: Workers,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ApiServer]:
    """TTS cache on (its default), STT cache off (its default)."""
    settings = api_settings(
        api_redis.url, MODELS, tmp_path_factory.mktemp("cache"), limits={"request_timeout_s": 60.0}, cache={}
    )
    server = start_api(settings)
    wait_live(server, [WHISPER, PIPER, NOOP_TTS])
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _fresh_cache(api_redis: RedisServer) -> None:
    forget_cache(api_redis.url)


def speak(
    client: httpx.Client, text: str, headers: dict[str, str] | None = None, **body: Any
) -> httpx.Response:
    r = client.post("/waves/v1/tts", json={"text": text, **body}, headers=headers or {})
    assert r.status_code == 200, r.text
    return r


def test_repeated_tts_is_a_hit_byte_identical_and_never_reaches_a_worker(
    cached_api: ApiServer, real_workers: Workers
) -> None:
    piper = real_workers.procs[1]
    text = "Thank you for calling. Your call is important to us."
    with cached_api.client() as c:
        before = worker_jobs(piper)
        first = speak(c, text, voice_id="joe")
        assert first.headers["x-cache"] == "miss"
        assert worker_jobs(piper) == before + 1
        second = speak(c, text, voice_id="joe")
        assert second.headers["x-cache"] == "hit"
        assert second.content == first.content
        assert second.headers["content-type"] == first.headers["content-type"]
        assert second.headers["x-sample-rate"] == first.headers["x-sample-rate"]
        # The OpenAI surface shares the service layer: its own format is its own entry, then a hit.
        body = {"model": "tts-1", "voice": "alloy", "input": text, "response_format": "mp3"}
        a = c.post("/v1/audio/speech", json=body)
        b = c.post("/v1/audio/speech", json=body)
        assert (a.headers["x-cache"], b.headers["x-cache"]) == ("miss", "hit")
        assert a.content == b.content and len(a.content) > 1000
        assert worker_jobs(piper) == before + 2


def test_text_differing_only_in_whitespace_is_the_same_entry(cached_api: ApiServer) -> None:
    assert normalize_text("  Hello,\n\tworld.  ") == "Hello, world."
    with cached_api.client() as c:
        first = speak(c, "Your order has shipped.")
        again = speak(c, "  Your   order has\nshipped. ")
        assert (first.headers["x-cache"], again.headers["x-cache"]) == ("miss", "hit")
        assert again.content == first.content


@pytest.mark.parametrize(
    "changed",
    [
        {"text": "Your table is ready now."},
        {"speed": 1.25},
        {"sample_rate": 16000},
        {"output_format": "pcm"},
        {"model": NOOP_TTS},
    ],
    ids=["text", "speed", "sample_rate", "format", "model"],
)
def test_a_changed_parameter_misses(cached_api: ApiServer, changed: dict[str, Any]) -> None:
    base = {"text": "Your table is ready.", "speed": 1.0, "sample_rate": 22050, "output_format": "wav"}
    with cached_api.client() as c:
        assert speak(c, **base).headers["x-cache"] == "miss"
        assert speak(c, **base).headers["x-cache"] == "hit"
        variant = speak(c, **{**base, **changed})
        assert variant.headers["x-cache"] == "miss"
        assert speak(c, **{**base, **changed}).headers["x-cache"] == "hit"


def test_no_cache_bypasses_and_no_store_keeps_nothing(cached_api: ApiServer, real_workers: Workers) -> None:
    piper = real_workers.procs[1]
    text = "Press one for sales."
    with cached_api.client() as c:
        before_bypass = api_metric(cached_api, "kubespeech_api_cache_lookups_total", "tts", result="bypass")
        speak(c, text)
        jobs = worker_jobs(piper)
        fresh = speak(c, text, headers={"Cache-Control": "no-cache"})
        assert fresh.headers["x-cache"] == "miss"
        assert worker_jobs(piper) == jobs + 1
        assert speak(c, text).headers["x-cache"] == "hit"
        # no-store: neither read nor written.
        other = "Press two for support."
        assert speak(c, other, headers={"Cache-Control": "no-store"}).headers["x-cache"] == "miss"
        assert speak(c, other).headers["x-cache"] == "miss"
        bypassed = api_metric(cached_api, "kubespeech_api_cache_lookups_total", "tts", result="bypass")
        assert bypassed == before_bypass + 2


def sse_audio(response: httpx.Response) -> tuple[list[bytes], dict[str, Any]]:
    chunks: list[bytes] = []
    done: dict[str, Any] = {}
    for block in response.text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if lines.get("event") == "audio":
            chunks.append(base64.b64decode(json.loads(lines["data"])["audio"]))
        elif lines.get("event") == "done":
            done = json.loads(lines["data"])
    return chunks, done


def test_streaming_tts_hit_replays_the_chunks_without_a_worker(
    cached_api: ApiServer, real_workers: Workers
) -> None:
    piper = real_workers.procs[1]
    body = {"text": "Welcome back. Your balance is forty two dollars.", "sample_rate": 16000}
    with cached_api.client() as c:
        first = c.post("/waves/v1/tts/live", json=body)
        assert first.status_code == 200 and first.headers["x-cache"] == "miss"
        chunks, done = sse_audio(first)
        assert len(chunks) >= 2 and done["done"] is True
        jobs = worker_jobs(piper)
        second = c.post("/waves/v1/tts/live", json=body)
        assert second.status_code == 200 and second.headers["x-cache"] == "hit"
        again, done_again = sse_audio(second)
        assert again == chunks
        assert done_again["chunks"] == done["chunks"] and done_again["duration"] == done["duration"]
        assert worker_jobs(piper) == jobs


def test_the_byte_bound_evicts_least_recently_used_first(
    api_redis: RedisServer, noop_workers: Workers, tmp_path: Path
) -> None:
    # The no-op engine speaks 10 ms of silence per character: 100 characters are 32,000 bytes of PCM16 at
    # 16 kHz, so three entries fit in 100,000 bytes and a fourth must evict one.
    cache = {"tts": {"enabled": True, "max_bytes": 100_000}}
    server = start_api(api_settings(api_redis.url, MODELS, tmp_path, cache=cache))
    try:
        wait_live(server, [NOOP_TTS])
        texts = {name: (name * 100)[:99] + "." for name in ("alpha", "bravo", "charlie", "delta")}
        evictions = api_metric(server, "kubespeech_api_cache_evictions_total", "tts")
        client = redis_sync.Redis.from_url(api_redis.url)
        with server.client() as c:

            def say(name: str) -> str:
                r = speak(c, texts[name], model=NOOP_TTS, output_format="pcm", sample_rate=16000)
                assert len(r.content) == 32_000
                return str(r.headers["x-cache"])

            assert [say(n) for n in ("alpha", "bravo", "charlie")] == ["miss"] * 3
            # What the bound counts: the stored values, audio plus a small header each.
            held = int(client.get("ks:cache:tts:bytes") or 0)
            assert 96_000 < held <= 100_000
            assert say("alpha") == "hit"  # alpha is now the most recently used
            assert say("delta") == "miss"  # stored by evicting bravo, the least recently used
            assert int(client.get("ks:cache:tts:bytes") or 0) == held
            assert (say("alpha"), say("charlie"), say("delta")) == ("hit", "hit", "hit")
            assert say("bravo") == "miss"
        assert api_metric(server, "kubespeech_api_cache_evictions_total", "tts") == evictions + 2
        assert api_metric(server, "kubespeech_api_cache_bytes", "tts") <= 100_000
        assert int(client.get("ks:cache:tts:evictions") or 0) == 2
    finally:
        server.stop()


def test_a_new_model_revision_never_serves_the_old_entry(
    api_redis: RedisServer, noop_workers: Workers, tmp_path: Path
) -> None:
    model = "cache-rev-tts"
    models = [{"name": model, "task": "tts"}]
    server = start_api(
        api_settings(api_redis.url, models, tmp_path, cache={}, limits={"cold_start_wait_s": 0})
    )
    client = redis_sync.Redis.from_url(api_redis.url)
    calls_a, calls_b = tmp_path / "a.calls", tmp_path / "b.calls"
    old = WorkerProcess(api_redis.url, task="tts", model=model, engine="noop", max_wait_ms=0,
                        engine_options={"calls_file": str(calls_a)})  # fmt: skip
    new: WorkerProcess | None = None
    try:
        old.wait_ready(60)
        wait_live(server, [model])
        with server.client() as c:
            text = "Your appointment is confirmed."
            assert speak(c, text, model=model).headers["x-cache"] == "miss"
            old_revision = json.loads(client.hget("ks:models", model) or b"{}")["revision"]
            old.stop()
            # No worker left: a cached answer still needs none.
            assert speak(c, text, model=model).headers["x-cache"] == "hit"
            # A new model file or option is a new revision: new keys, the old audio is never served.
            new = WorkerProcess(api_redis.url, task="tts", model=model, engine="noop", max_wait_ms=0,
                                engine_options={"calls_file": str(calls_b)})  # fmt: skip
            new.wait_ready(60)
            until = time.monotonic() + 30
            while json.loads(client.hget("ks:models", model) or b"{}").get("revision") == old_revision:
                assert time.monotonic() < until, "the new worker never published its revision"
                time.sleep(0.05)
            wait_live(server, [model])
            time.sleep(3 * server.settings.refresh_interval_s)  # the registry's next refresh
            fresh = speak(c, text, model=model)
            assert fresh.headers["x-cache"] == "miss"
            assert calls_b.read_text().count(text) == 1
            assert speak(c, text, model=model).headers["x-cache"] == "hit"
        assert calls_a.read_text().count(text) == 1
    finally:
        old.stop()
        if new is not None:
            new.stop()
        server.stop()


def test_a_hit_is_metered_as_usage_flagged_cached(cached_api: ApiServer, api_redis: RedisServer) -> None:
    client = redis_sync.Redis.from_url(api_redis.url)
    stream = LicenseKeys("ks").usage_stream
    last = client.xrevrange(stream, count=1)
    after = last[0][0] if last else b"0-0"
    with cached_api.client() as c:
        speak(c, "Goodbye.")
        speak(c, "Goodbye.")
    until = time.monotonic() + 10
    events: list[dict[str, Any]] = []
    while time.monotonic() < until and len(events) < 2:
        entries = client.xrange(stream, min=b"(" + after)
        events = [e for e in (decode_event(f) for _, f in entries) if e is not None and e["feature"] == "tts"]
        time.sleep(0.05)
    assert len(events) == 2
    assert [e.get("cached", False) for e in events] == [False, True]
    assert events[0]["characters"] == events[1]["characters"] == len("Goodbye.")
    assert events[1]["audio_seconds"] == events[0]["audio_seconds"] > 0


def test_cache_metrics_show_hit_ratio_bytes_and_evictions(cached_api: ApiServer) -> None:
    with cached_api.client() as c:
        speak(c, "Metrics please.")
        speak(c, "Metrics please.")
    text = httpx.get(f"{cached_api.url}/metrics").text
    ratio = re.search(r'^kubespeech_api_cache_hit_ratio\{task="tts"\} (\S+)$', text, re.M)
    assert ratio is not None and 0 < float(ratio.group(1)) < 1
    assert api_metric(cached_api, "kubespeech_api_cache_bytes", "tts") > 0
    assert "kubespeech_api_cache_evictions_total" in text


# --- speech to text -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def speech_wav(cached_api: ApiServer) -> bytes:
    with cached_api.client() as c:
        return speak(c, SECRET_WORDS, sample_rate=16000, headers={"Cache-Control": "no-store"}).content


def transcribe(server: ApiServer, wav: bytes) -> httpx.Response:
    with server.client() as c:
        r = c.post("/waves/v1/stt/?language=en", content=wav, headers={"Content-Type": "audio/wav"})
    assert r.status_code == 200, r.text
    return r


def test_stt_caching_is_off_unless_enabled(
    cached_api: ApiServer, real_workers: Workers, speech_wav: bytes, api_redis: RedisServer
) -> None:
    whisper = real_workers.procs[0]
    jobs = worker_jobs(whisper)
    first, second = transcribe(cached_api, speech_wav), transcribe(cached_api, speech_wav)
    assert "x-cache" not in first.headers and "x-cache" not in second.headers
    assert worker_jobs(whisper) == jobs + 2
    assert not list(redis_sync.Redis.from_url(api_redis.url).scan_iter("ks:cache:asr:*"))


def test_stt_cache_when_enabled_is_encrypted(
    api_redis: RedisServer, real_workers: Workers, speech_wav: bytes, tmp_path: Path
) -> None:
    whisper = real_workers.procs[0]
    key_file = tmp_path / "cache.key"
    key_file.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    cache = {"tts": {"enabled": False}, "asr": {"enabled": True, "key_file": str(key_file)}}
    server = start_api(api_settings(api_redis.url, MODELS, tmp_path, cache=cache))
    try:
        wait_live(server, [WHISPER])
        jobs = worker_jobs(whisper)
        first = transcribe(server, speech_wav)
        second = transcribe(server, speech_wav)
        assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
        assert worker_jobs(whisper) == jobs + 1
        text = first.json()["transcription"]
        assert len(text.split()) >= 4 and second.json()["transcription"] == text
        client = redis_sync.Redis.from_url(api_redis.url)
        entries = list(client.scan_iter("ks:cache:asr:e:*"))
        assert len(entries) == 1
        stored = client.get(entries[0]) or b""
        assert stored.startswith(b"KSE1")
        for word in [text, *(w.strip(".,") for w in text.split() if len(w.strip(".,")) >= 4)]:
            assert word.lower().encode() not in stored.lower()
    finally:
        server.stop()
    # Another key cannot read the entry: a miss, answered by the worker again.
    other_key = tmp_path / "other.key"
    other_key.write_text(os.urandom(32).hex())
    cache["asr"]["key_file"] = str(other_key)
    server = start_api(api_settings(api_redis.url, MODELS, tmp_path, cache=cache))
    try:
        wait_live(server, [WHISPER])
        assert transcribe(server, speech_wav).headers["x-cache"] == "miss"
        assert worker_jobs(whisper) == jobs + 2
    finally:
        server.stop()


# --- settings ------------------------------------------------------------------------------------------------


def test_enabling_the_stt_cache_without_protection_is_refused() -> None:
    with pytest.raises(ValidationError, match="key_file"):
        CacheSettings.model_validate({"asr": {"enabled": True}})
    assert CacheSettings.model_validate({"asr": {"enabled": True, "unencrypted_in_embedded_redis": True}})
    with pytest.raises(ValidationError, match="max_bytes"):
        CacheSettings.model_validate({"tts": {"max_bytes": 0}})
    with pytest.raises(ValidationError, match="ttl_s"):
        CacheSettings.model_validate({"tts": {"ttl_s": 0}})


def test_cache_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_bytes(os.urandom(32))
    monkeypatch.setenv("KUBESPEECH_API_CACHE__TTS__MAX_BYTES", "1048576")
    monkeypatch.setenv("KUBESPEECH_API_CACHE__ASR__ENABLED", "true")
    monkeypatch.setenv("KUBESPEECH_API_CACHE__ASR__KEY_FILE", str(key))
    settings = ApiSettings()
    assert settings.cache.tts.enabled and settings.cache.tts.max_bytes == 1048576
    assert settings.cache.asr.enabled and settings.cache.asr.key_file == key
    monkeypatch.delenv("KUBESPEECH_API_CACHE__ASR__KEY_FILE")
    with pytest.raises(ValidationError, match="key_file"):
        ApiSettings()


def test_the_cache_key_file_must_hold_32_bytes(tmp_path: Path) -> None:
    raw = os.urandom(32)
    for content in (base64.b64encode(raw), raw.hex().encode() + b"\n", raw):
        (tmp_path / "k").write_bytes(content)
        assert load_cache_key(tmp_path / "k") == raw
    (tmp_path / "short").write_text("c2hvcnQ=")
    with pytest.raises(InvalidCacheKey, match="32 bytes") as info:
        load_cache_key(tmp_path / "short")
    assert "c2hvcnQ" not in str(info.value)
    with pytest.raises(InvalidCacheKey, match="cannot read"):
        load_cache_key(tmp_path / "missing")


def test_cache_control_directives() -> None:
    assert cache_control(None) == (True, True)
    assert cache_control("max-age=0") == (True, True)
    assert cache_control("No-Cache") == (False, True)
    assert cache_control("private, no-store") == (False, False)
