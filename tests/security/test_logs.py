"""Secrets never reach the logs: the API key (and a near miss of it), the license key and the Redis password,
grepped for in everything the API, the workers, the license proxy and its upstream wrote at DEBUG level
while serving, refusing and shutting down."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.chaos.stack import API_KEY, ASR_MODEL, TTS_MODEL, RedisProcess, start_api, start_license, wait_live
from tests.stack import WorkerProcess

pytestmark = pytest.mark.timeout(180)

REDIS_PASSWORD = "redis-pw-5e1f0c9a7d3b4e21"


def test_no_secret_in_any_log(tmp_path: Path) -> None:
    redis = RedisProcess(tmp_path / "redis", aof=False, password=REDIS_PASSWORD)
    redis.start()
    password_file = tmp_path / "redis-password"
    password_file.write_text(REDIS_PASSWORD)
    env = {"KUBESPEECH_REDIS_PASSWORD_FILE": str(password_file), "KUBESPEECH_LOG_LEVEL": "DEBUG"}
    lic = start_license(redis.url, tmp_path, extra_env=env)
    logs = [tmp_path / "worker-asr.log", tmp_path / "worker-tts.log"]
    workers = [
        WorkerProcess(redis.url, task=task, model=model, engine="noop", env=env, log=log)
        for (task, model), log in zip((("asr", ASR_MODEL), ("tts", TTS_MODEL)), logs, strict=True)
    ]
    api = None
    near_miss = API_KEY[:-1] + ("0" if API_KEY[-1] != "0" else "1")
    try:
        api = start_api(redis.url, tmp_path, license_proxy_url=lic.proxy.url, extra_env=env)
        for w in workers:
            w.wait_ready(60)
        wait_live(api.url, [ASR_MODEL, TTS_MODEL])
        with httpx.Client(base_url=api.url, timeout=30) as c:
            good = {"Authorization": f"Bearer {API_KEY}"}
            for headers in (good, {"Authorization": f"Bearer {near_miss}"}, {"Authorization": API_KEY}):
                r = c.post("/waves/v1/tts", json={"text": "A secret-free sentence."}, headers=headers)
                assert r.status_code == (200 if headers is good else 401), r.text
            pcm = bytes(3200)
            r = c.post("/waves/v1/stt/?encoding=linear16&sample_rate=16000", content=pcm, headers=good)
            assert r.status_code == 200, r.text
            r = c.get("/ready", headers=good)
            assert r.json()["license"]["state"] == "valid", r.text
            assert c.get("/metrics").status_code == 200
    finally:
        if api is not None:
            api.stop()
        for w in workers:
            w.stop()
        lic.stop()
        redis.stop()

    texts = {p.name: p.read_text(errors="replace") for p in [*logs, tmp_path / "api.log", lic.proxy.log,
                                                             lic.upstream.log]}  # fmt: skip
    assert all(texts.values()), [name for name, text in texts.items() if not text]
    assert '"level":"debug"' in "".join(texts.values()), "DEBUG logging was on"
    token_parts = [part[:24] for part in lic.token.split(".") if len(part) >= 24]
    secrets = {"API key": API_KEY, "near miss of the API key": near_miss, "Redis password": REDIS_PASSWORD,
               "license key": lic.token, **{f"license key part {i}": p for i, p in enumerate(token_parts)}}  # fmt: skip
    for name, text in texts.items():
        for what, secret in secrets.items():
            assert secret not in text, f"{what} in {name}"
