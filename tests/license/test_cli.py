"""The license CLI: keygen/issue/inspect in-process, usage-export, and the proxy and server as real processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis
from typer.testing import CliRunner

from kubespeech.cli import app
from kubespeech.license.export import verify_export
from kubespeech.license.token import load_public_key, verify
from kubespeech.license.usage import UsageRecorder
from tests.conftest import RedisServer, free_port
from tests.license.conftest import Vendor

pytestmark = pytest.mark.timeout(60)
KUBESPEECH = str(Path(sys.executable).with_name("kubespeech"))
runner = CliRunner()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("keys")
    priv, pub = d / "vendor.pem", d / "vendor.pub"
    result = runner.invoke(app, ["license", "keygen", "--private-key", str(priv), "--public-key", str(pub)])
    assert result.exit_code == 0, result.output
    return priv, pub


def _issue(priv: Path, *extra: str) -> str:
    args = ["license", "issue", "--private-key", str(priv), "--customer", "ACME", "--expires", "2099-12-31"]
    result = runner.invoke(app, [*args, *extra])
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def test_keygen_protects_the_private_key_and_refuses_to_overwrite(keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    assert priv.stat().st_mode & 0o777 == 0o600
    assert b"PRIVATE KEY" in priv.read_bytes() and b"PUBLIC KEY" in pub.read_bytes()
    again = runner.invoke(app, ["license", "keygen", "--private-key", str(priv), "--public-key", str(pub)])
    assert again.exit_code == 1 and "exists" in again.output


def test_issue_and_inspect(keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    token = _issue(
        priv, "--features", "asr,streaming", "--limit", "max_concurrent_streams=5", "--limit",
        "audio_hours_per_day=2.5", "--grace-hours", "6", "--upstream", "https://lic.example.com",
    )  # fmt: skip
    claims = verify(token, load_public_key(pub))
    assert claims.features == ["asr", "streaming"] and claims.limits.max_concurrent_streams == 5
    assert claims.checkin.grace_hours == 6 and claims.checkin.mode == "grace"
    assert claims.exp == int(time.mktime(time.strptime("2100-01-01", "%Y-%m-%d")) - time.timezone)
    result = runner.invoke(app, ["license", "inspect", "--public-key", str(pub), token])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["customer"] == "ACME" and shown["exp_utc"] == "2100-01-01T00:00:00Z"
    offline = verify(_issue(priv, "--offline"), load_public_key(pub))
    assert offline.checkin.mode == "offline"


@pytest.mark.parametrize("case", ["tampered", "wrong_key", "malformed", "expired", "not_yet_valid"])
def test_inspect_fails_with_the_reason(case: str, keys: tuple[Path, Path], vendor: Vendor) -> None:
    priv, pub = keys
    if case == "tampered":
        token = _issue(priv)
        token = token[:-6] + ("A" if token[-6] != "A" else "B") + token[-5:]
        reason = "bad_signature"
    elif case == "wrong_key":
        token, reason = vendor.token(), "wrong_key"
    elif case == "malformed":
        token, reason = "ksl1.nope", "malformed"
    elif case == "expired":
        token = _issue(priv, "--not-before", "2000-01-01", "--expires", "2000-12-31")
        reason = "expired"
    else:
        token, reason = _issue(priv, "--not-before", "2099-01-01"), "not_yet_valid"
    result = runner.invoke(app, ["license", "inspect", "--public-key", str(pub), token])
    assert result.exit_code == 1
    assert f"invalid: {reason}" in result.stderr


def test_issue_rejects_bad_input(keys: tuple[Path, Path]) -> None:
    priv, _ = keys
    base = ["license", "issue", "--private-key", str(priv), "--customer", "A"]
    assert runner.invoke(app, [*base, "--expires", "2099-13-01"]).exit_code == 2
    assert runner.invoke(app, [*base, "--expires", "2099-01-01", "--limit", "max_gpus"]).exit_code == 2
    assert runner.invoke(app, [*base, "--expires", "2099-01-01", "--limit", "colour=3"]).exit_code == 2
    assert runner.invoke(app, [*base, "--expires", "2099-01-01", "--features", "asr,magic"]).exit_code == 2
    assert runner.invoke(app, [*base, "--expires", "2099-01-01", "--offline", "--online"]).exit_code == 2


def test_usage_export_command(vendor: Vendor, redis_server: RedisServer, tmp_path: Path) -> None:
    redis_server.flush()
    prefix = "cliexport"

    async def record() -> None:
        client = Redis.from_url(redis_server.url)
        for i in range(4):
            await UsageRecorder(client, prefix).record(
                feature="asr", model="m", audio_seconds=2.0, characters=i, status_code=200
            )
        await client.aclose()

    asyncio.run(record())
    token = vendor.token(mode="offline", license_id="lic_cli_export")
    env = {
        "KUBESPEECH_REDIS_URL": redis_server.url,
        "KUBESPEECH_REDIS_KEY_PREFIX": prefix,
        "KUBESPEECH_LICENSE_KEY": token,
        "KUBESPEECH_LICENSE_PUBLIC_KEY": vendor.public_pem,
    }
    out = tmp_path / "usage.json"
    result = runner.invoke(app, ["license", "usage-export", "--out", str(out)], env=env)
    assert result.exit_code == 0, result.output
    claims, _, events = verify_export(json.loads(out.read_text()), vendor.key.public_key())
    assert claims.lid == "lic_cli_export" and len(events) == 4
    bad = runner.invoke(
        app, ["license", "usage-export", "--out", str(out)], env={**env, "KUBESPEECH_LICENSE_KEY": "x"}
    )
    assert bad.exit_code == 1 and "malformed" in bad.output


class Proc:
    def __init__(self, args: list[str], env: dict[str, str], port: int, log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.proc = subprocess.Popen(
            [KUBESPEECH, *args], env={**os.environ, **env}, stdout=log.open("wb"), stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(log.read_text())

    def get(self, path: str) -> dict[str, object]:
        return dict(httpx.get(f"{self.url}{path}", timeout=2).json())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()


def _wait(probe: object, check: object, timeout: float = 10.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()  # type: ignore[operator]
        if check(value):  # type: ignore[operator]
            return value  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, value
        time.sleep(0.05)


def test_proxy_and_server_processes_with_sighup_reload_and_no_secrets_in_logs(
    vendor: Vendor, redis_server: RedisServer, tmp_path: Path, procs: list[Proc]
) -> None:
    server_port, proxy_port = free_port(), free_port()
    procs.append(
        Proc(["license-server", "--public-key", str(vendor.public_file), "--host", "127.0.0.1", "--port",
              str(server_port)], {}, server_port, tmp_path / "server.log")
    )  # fmt: skip
    upstream = f"http://127.0.0.1:{server_port}"
    first = vendor.token(features=["asr"], upstream=upstream, license_id="lic_proc")
    second = vendor.token(features=["asr", "tts"], upstream=upstream, license_id="lic_proc")
    key_file = tmp_path / "license.key"
    key_file.write_text(first)
    env = {
        "KUBESPEECH_REDIS_URL": redis_server.url,
        "KUBESPEECH_REDIS_KEY_PREFIX": "proc",
        "KUBESPEECH_LICENSE_KEY_FILE": str(key_file),
        "KUBESPEECH_LICENSE_PUBLIC_KEY_FILE": str(vendor.public_file),
        "KUBESPEECH_LICENSE_RELOAD_POLL_S": "3600",  # only SIGHUP reloads in this test
        "KUBESPEECH_LICENSE_CHECKIN_INTERVAL_S": "0.5",
        "KUBESPEECH_LOG_LEVEL": "DEBUG",
    }
    proxy = Proc(["license-proxy", "--host", "127.0.0.1", "--port", str(proxy_port)], env, proxy_port,
                 tmp_path / "proxy.log")  # fmt: skip
    procs.append(proxy)
    answer = proxy.get("/v1/license")
    assert answer["state"] == "valid" and answer["features"] == ["asr"]
    assert answer["checkin"]["last_ok"] is not None  # type: ignore[index]
    key_file.write_text(second)
    proxy.proc.send_signal(signal.SIGHUP)
    _wait(lambda: proxy.get("/v1/license"), lambda a: a["features"] == ["asr", "tts"])
    assert proxy.get("/v1/license")["state"] == "valid"
    for p in procs:
        p.stop()
    logs = "".join(p.log.read_text() for p in procs)
    assert "license key loaded" in logs and "reloading" in logs
    for secret in (first, second, first.split(".")[1][:24], first.split(".")[2][:24]):
        assert secret not in logs
    assert "Traceback" not in logs
