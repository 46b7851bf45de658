"""Operator benchmark: apply → all children created, and operator RSS idle and with many SpeechDeployments.

The operator runs as its own process (``kubespeech operator``, as in a pod) against KMock, a fake
Kubernetes API over real HTTP served by this process; RSS is read from the operator process alone.
KMock is a development dependency (``pip install kmock==0.8``).
"""

from __future__ import annotations

import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from kubespeech_operator.builders import CHILD_KINDS, build_children
from kubespeech_operator.models import parse_spec

NAMESPACE = "bench"
SD_PATH = f"/apis/kubespeech.io/v1alpha1/namespaces/{NAMESPACE}/speechdeployments"

BENCH_SPEC: dict[str, Any] = {
    "license": {"secretRef": {"name": "license", "key": "key"}},
    "api": {"apiKeysSecretRef": {"name": "api-keys", "key": "keys"}},
    "asr": {
        "pools": [
            {"name": "l4", "engine": "nemo", "modelName": "parakeet", "gpu": {"count": 1},
             "model": {"source": "hf://nvidia/parakeet-tdt-0.6b-v2"}},
            {"name": "cpu", "engine": "whisper", "modelName": "whisper-tiny"},
        ]
    },
    "tts": {"pools": [{"name": "cpu", "engine": "piper", "modelName": "joe"}]},
}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def _expected(name: str) -> set[tuple[str, str]]:
    built = build_children(name, NAMESPACE, parse_spec(BENCH_SPEC), redis_password="x")
    return {(c["kind"], c["metadata"]["name"]) for c in built if c["kind"] != "ServiceMonitor"}


async def _wait(predicate: Any, timeout: float, what: str, poll: float = 0.005) -> float:
    """Seconds until ``predicate()`` holds (polled); raises TimeoutError after ``timeout``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"operator bench: {what} not reached in {timeout} s")
        await asyncio.sleep(poll)
    return time.monotonic() - started


async def _bench(sds: int, samples: int, resync_s: float) -> dict[str, Any]:
    try:
        import kmock

        from kubespeech_operator.fakecluster import Emulator, declare_resources, write_kubeconfig
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("the operator benchmark needs kmock==0.8 (a development dependency)") from exc

    plurals = {kind: (api_version, plural) for api_version, kind, plural in CHILD_KINDS}

    def keys(children: set[tuple[str, str]]) -> list[tuple[Any, str, str]]:
        # Direct keys into KMock's store: a scan of every object on each poll would starve the fake API,
        # which shares this process's event loop.
        return [(kmock.resource(f"{plurals[k][0]}/{plurals[k][1]}"), NAMESPACE, n) for k, n in children]

    def all_present(api: Any, wanted: list[tuple[Any, str, str]]) -> bool:
        store = api.objects._objects
        return all((obj := store.get(key)) is not None and not obj.deleted for key in wanted)

    async with Emulator() as api, kmock.Server(api) as server:
        api.keep_request_log = False
        declare_resources(api)
        with tempfile.TemporaryDirectory(prefix="kubespeech-bench-") as tmp:
            kubeconfig = write_kubeconfig(Path(tmp) / "kubeconfig", str(server.url))
            port = _free_port()
            env = {**os.environ, "KUBESPEECH_OPERATOR_LOG_LEVEL": "WARNING"}
            command = [sys.executable, "-m", "kubespeech.cli", "operator", "--kubeconfig", str(kubeconfig),
                       "--liveness-port", str(port), "--resync-interval", str(resync_s), "--all-namespaces"]  # fmt: skip
            started = time.monotonic()
            # Popen returns at once; the process is then only polled (never waited on) in the loop.
            process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # noqa: ASYNC220
            try:
                async with httpx.AsyncClient() as http:

                    async def alive() -> bool:
                        try:
                            return (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
                        except httpx.HTTPError:
                            return False

                    while not await alive():
                        if process.poll() is not None or time.monotonic() - started > 60:
                            raise RuntimeError(f"operator did not start: {process.stderr.read()[-2000:]!r}")  # type: ignore[union-attr]
                        await asyncio.sleep(0.05)
                startup_s = time.monotonic() - started
                await asyncio.sleep(2.0)
                rss_idle = _rss_mb(process.pid)

                async def apply(index: int) -> set[tuple[str, str]]:
                    name = f"sd{index:03d}"
                    body = {"apiVersion": "kubespeech.io/v1alpha1", "kind": "SpeechDeployment",
                            "metadata": {"name": name, "namespace": NAMESPACE, "uid": f"uid-{name}",
                                         "generation": 1}, "spec": BENCH_SPEC}  # fmt: skip
                    response = await api.post(SD_PATH, json=body)
                    if response.status != 200:
                        raise RuntimeError(f"create {name}: HTTP {response.status}")
                    return _expected(name)

                # Apply → all children created, one SpeechDeployment at a time (the operator otherwise idle).
                times = []
                for index in range(samples):
                    t0 = time.monotonic()
                    want = await apply(index)
                    wanted_keys = keys(want)
                    await _wait(
                        lambda w=wanted_keys: all_present(api, w), 30, "children of one SpeechDeployment"
                    )
                    times.append(time.monotonic() - t0)

                # The rest up to ``sds`` at once; then a full resync cycle over all of them.
                t0 = time.monotonic()
                wanted: set[tuple[str, str]] = set()
                for index in range(samples):
                    wanted |= _expected(f"sd{index:03d}")
                for index in range(samples, sds):
                    wanted |= await apply(index)
                all_keys = keys(wanted)
                await _wait(
                    lambda: all_present(api, all_keys), 600, f"children of {sds} SpeechDeployments", 0.1
                )
                burst_s = time.monotonic() - t0
                peak = _rss_mb(process.pid)
                settle_until = time.monotonic() + resync_s * 1.5
                while time.monotonic() < settle_until:
                    peak = max(peak, _rss_mb(process.pid))
                    await asyncio.sleep(0.25)
                rss_loaded = _rss_mb(process.pid)
            finally:
                process.terminate()
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)

    return {
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs, Python {platform.python_version()})",
        "api": "KMock 0.8 over loopback HTTP (in the benchmark process)",
        "children_per_speechdeployment": len(_expected("sd000")),
        "operator_startup_s": round(startup_s, 3),
        "apply_to_all_children_s": {
            "median": round(statistics.median(times), 3),
            "max": round(max(times), 3),
            "samples": [round(t, 3) for t in times],
        },
        f"create_{sds}_speechdeployments_s": round(burst_s, 2),
        "speechdeployments": sds,
        "resync_interval_s": resync_s,
        "rss_idle_mb": round(rss_idle, 1),
        f"rss_with_{sds}_mb": round(rss_loaded, 1),
        f"rss_peak_with_{sds}_mb": round(peak, 1),
        "targets": {"apply_to_all_children_s": "< 2", f"rss_with_{sds}_mb": "< 150"},
    }


def run_operator_bench(sds: int = 100, samples: int = 5, resync_s: float = 10.0) -> dict[str, Any]:
    """Run the benchmark and return its numbers (times in seconds, memory in MiB)."""
    return asyncio.run(_bench(sds, samples, resync_s))
