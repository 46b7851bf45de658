"""`kubespeech dev`'s supervisor stops dependents before Redis: a worker still draining when Ctrl-C comes
can publish what it holds. The "worker" here is a real child process that, on SIGTERM, takes a moment and
then writes to the real Redis the supervisor started; its exit code says whether that write succeeded."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

from kubespeech.dev import Child, Supervisor

DRAINING_WORKER = textwrap.dedent(
    """
    import signal, sys, time
    import redis

    url = sys.argv[1]
    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    client.ping()
    stop = False

    def on_term(*_):
        global stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    print("ready", flush=True)
    while not stop:
        time.sleep(0.05)
    time.sleep(1.0)  # finishing the batch it holds
    try:
        client.set("drained", "1")
    except Exception as exc:
        print(f"publish failed: {exc!r}", flush=True)
        sys.exit(1)
    sys.exit(0)
    """
)


def test_redis_outlives_a_draining_worker(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    sup = Supervisor(tmp_path, logs, verbose=False)
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    url = sup.start_redis(redis_dir)
    worker = Child("asr-worker", [sys.executable, "-c", DRAINING_WORKER, url], ready_url=None)
    sup.start(worker)
    deadline = time.monotonic() + 20
    while "ready" not in (logs / "asr-worker.log").read_text(errors="replace"):
        assert worker.proc is not None and worker.proc.poll() is None, (logs / "asr-worker.log").read_text()
        assert time.monotonic() < deadline, "the worker did not start"
        time.sleep(0.05)

    sup.stop_all(grace_s=10)

    assert worker.proc is not None
    output = (logs / "asr-worker.log").read_text(errors="replace")
    assert worker.proc.returncode == 0, f"the draining worker could not publish: {output}"
    redis_child = next(c for c in sup.children if c.name == "redis")
    assert redis_child.proc is not None and redis_child.proc.returncode is not None, (
        "Redis must be stopped too"
    )
