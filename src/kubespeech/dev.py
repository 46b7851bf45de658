"""``kubespeech dev``: run a SpeechDeployment on this machine (by default the built-in CPU stack).

The components are the operator's own rendering of the SpeechDeployment (kubespeech.localrun), each run as
its own process, exactly as in a cluster, under a supervisor that starts them in dependency order, waits
until each reports ready, and on Ctrl-C / SIGTERM (or when any child dies) stops them all: SIGTERM first,
SIGKILL for a child that hangs. Children also get PR_SET_PDEATHSIG, so even a SIGKILLed supervisor leaves
no orphans behind.
"""

from __future__ import annotations

import ctypes
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

from kubespeech.config import LogSettings, env_name
from kubespeech.localrun import find_redis_server


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


REDIS_CHILD = "redis"


@dataclass
class Child:
    name: str
    args: list[str]
    ready_url: str | None
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    ready_tcp: int | None = None  # a loopback port that accepts connections once the child is ready


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
            if child.ready_tcp is not None:
                if _tcp_ok("127.0.0.1", child.ready_tcp):
                    return
            elif child.ready_url is None or _http_ok(child.ready_url):
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


def _tcp_ok(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _kubespeech() -> list[str]:
    exe = Path(sys.executable).with_name("kubespeech")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "kubespeech.cli"]


# The stack `kubespeech dev` runs when no file is given: examples/cpu.yaml (a test keeps the two equal).
DEFAULT_SPEECH_DEPLOYMENT = """\
apiVersion: kubespeech.io/v1alpha1
kind: SpeechDeployment
metadata:
  name: speech-cpu
  namespace: speech
spec:
  license:
    secretRef: {name: kubespeech-license, key: license.key}
  api:
    replicas: 1
    apiKeysSecretRef: {name: kubespeech-api-keys, key: keys}
    resources:
      requests: {cpu: 200m, memory: 256Mi}
      limits: {cpu: "1", memory: 1Gi}
  licenseProxy:
    resources:
      requests: {cpu: 50m, memory: 96Mi}
      limits: {cpu: 500m, memory: 256Mi}
  redis:
    mode: embedded
    embedded:
      resources:
        requests: {cpu: 50m, memory: 64Mi}
        limits: {cpu: 500m, memory: 512Mi}
      persistence:
        enabled: false
  asr:
    pools:
      - name: whisper
        modelName: whisper-tiny-en
        engine: whisper
        default: true
        aliases: [whisper-1]
        replicas: 1
        resources:
          requests: {cpu: 300m, memory: 768Mi}
          limits: {cpu: "2", memory: 1536Mi}
        batching: {maxBatchSize: 4, maxWaitMs: 10}
  tts:
    pools:
      - name: piper
        modelName: piper-joe-en
        engine: piper
        default: true
        aliases: [tts-1]
        voices: [joe]
        replicas: 1
        resources:
          requests: {cpu: 300m, memory: 512Mi}
          limits: {cpu: "2", memory: 1Gi}
"""


def run_dev(
    *,
    port: int,
    host: str,
    api_key: str | None,
    redis_url: str | None,
    license_file: Path | None,
    spec_text: str,
    verbose: bool,
    ready_timeout: float,
) -> int:
    from kubespeech.localrun import load_speech_deployment, plan

    runtime_dir = Path(tempfile.mkdtemp(prefix="kubespeech-dev-"))
    runtime_dir.chmod(0o700)  # Secrets are materialized below it
    log_dir = runtime_dir / "logs"
    log_dir.mkdir()
    key = api_key or "ks-dev-" + secrets.token_urlsafe(24)
    sup = Supervisor(runtime_dir, log_dir, verbose)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        sup.stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        sd = load_speech_deployment(spec_text)
        stack = plan(
            sd, runtime_dir, api_key=key, api_port=port, host=host, free_port=_free_port,
            executables={"kubespeech": _kubespeech(), "redis-server": [find_redis_server()]},
            license_file=license_file, redis_url=redis_url,
        )  # fmt: skip
        log_level = os.environ.get(env_name(LogSettings, "level"))  # the spec's level, unless set here
        for proc in stack.processes:
            env = {**proc.env, **({env_name(LogSettings, "level"): log_level} if log_level else {})}
            child = Child(proc.name, proc.args, proc.ready_url, env=env, ready_tcp=proc.ready_tcp)
            sup.start(child)
            if proc.component == "redis":
                sup.wait_ready(child, ready_timeout)  # everything else connects to it at start
        for child in sup.children:
            sup.wait_ready(child, ready_timeout)
        if sup.stopping:
            return 0
        url = f"http://{host}:{port}"
        pools = ", ".join(p.name for p in stack.processes if p.component.endswith("-worker"))
        typer.echo(
            f"\nkubespeech dev is ready: SpeechDeployment {sd['metadata']['name']}\n"
            f"  API:      {url}   (docs: {url}/docs)\n"
            f"  API key:  {key}\n"
            f"  pools:    {pools}\n"
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
    except (RuntimeError, OSError) as exc:
        typer.echo(f"kubespeech dev: {exc}", err=True)
        return 1
    finally:
        typer.echo("stopping the stack…", err=True)
        sup.stop_all()
        # The materialized Secrets (API key hash, Redis password) go with the stack; the logs stay.
        for entry in runtime_dir.iterdir():
            if entry != log_dir:
                shutil.rmtree(entry, ignore_errors=True)


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
        file: Path = typer.Option(
            None, "--file", "-f", help="A SpeechDeployment YAML to run (default: the built-in CPU stack)."
        ),
        port: int = typer.Option(7100, help="API port."),
        host: str = typer.Option("127.0.0.1", help="API bind address."),
        api_key: str = typer.Option(None, "--api-key", help="API key to accept (generated when unset)."),
        redis_url: str = typer.Option(None, "--redis-url", help="Use this Redis instead of the spec's."),
        license_file: Path = typer.Option(
            None, "--license-file", help="License key file (default: the built-in dev license)."
        ),
        verbose: bool = typer.Option(
            False, "--verbose", "-v", help="Show component logs here, not in files."
        ),
        ready_timeout: float = typer.Option(180.0, help="Seconds to wait for every component to be ready."),
    ) -> None:
        """Run a SpeechDeployment on this machine: the operator's rendered components as local processes."""
        try:
            text = file.read_text() if file is not None else DEFAULT_SPEECH_DEPLOYMENT
        except OSError as exc:
            typer.echo(f"kubespeech dev: cannot read {file}: {exc.strerror}", err=True)
            raise typer.Exit(2) from None
        raise typer.Exit(
            run_dev(
                port=port,
                host=host,
                api_key=api_key,
                redis_url=redis_url,
                license_file=license_file,
                spec_text=text,
                verbose=verbose,
                ready_timeout=ready_timeout,
            )
        )
