"""Operator benchmark: apply → all children created, and operator RSS idle and with many SpeechDeployments.

The operator runs as its own process (``kubespeech operator``, as in a pod) against a real kube-apiserver with
etcd, started by the test suite's harness (so this runs from a repository checkout); RSS is read from the
operator process alone. Also measured: a child's readiness change → the SpeechDeployment's status.
"""

from __future__ import annotations

import asyncio
import json
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
from kubespeech_operator.spec import parse_spec

NAMESPACE = "bench"

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


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 20 s: the operator drains its handlers on SIGTERM."""
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def _rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def _expected(name: str) -> set[tuple[str, str]]:
    built = build_children(name, NAMESPACE, parse_spec(BENCH_SPEC), redis_password="x")
    return {(c["kind"], c["metadata"]["name"]) for c in built if c["kind"] != "ServiceMonitor"}


async def _bench(sds: int, samples: int, resync_s: float) -> dict[str, Any]:
    try:
        from tests.envtest import (
            ApiServer,
            api_path,
            apply,
            ensure_namespace,
            start_apiserver,
            wait_crd_established,
        )
    except ImportError as exc:  # pragma: no cover - depends on where it runs
        raise RuntimeError(
            "the operator benchmark runs from a repository checkout: it starts the test suite's etcd + "
            "kube-apiserver (tests/envtest.py; KUBEBUILDER_ASSETS or ../shared/k8s)"
        ) from exc
    from kubespeech_operator.builders.crd import build_crd

    server: ApiServer = await asyncio.to_thread(start_apiserver)
    with server.client() as admin:
        crd = build_crd()
        response = apply(admin, crd, "customresourcedefinitions", manager="bench")
        if response.status_code not in (200, 201):
            raise RuntimeError(f"CRD refused: {response.text}")
        wait_crd_established(admin, crd["metadata"]["name"])
        ensure_namespace(admin, NAMESPACE)
    plurals = {kind: (api_version, plural) for api_version, kind, plural in CHILD_KINDS}
    sd_path = api_path("kubespeech.io/v1alpha1", "speechdeployments", NAMESPACE)
    try:
        with tempfile.TemporaryDirectory(prefix="kubespeech-bench-") as tmp:
            kubeconfig = server.kubeconfig(Path(tmp) / "kubeconfig")
            port = _free_port()
            env = {**os.environ, "KUBESPEECH_OPERATOR_LOG_LEVEL": "WARNING",
                   "KUBESPEECH_OPERATOR_METRICS_PORT": str(_free_port())}  # fmt: skip
            command = [sys.executable, "-m", "kubespeech.cli", "operator", "--kubeconfig", str(kubeconfig),
                       "--liveness-port", str(port), "--resync-interval", str(resync_s), "-n", NAMESPACE]  # fmt: skip
            started = time.monotonic()
            # Popen returns at once; the process is then only polled (never waited on) in the loop.
            process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # noqa: ASYNC220
            try:
                async with httpx.AsyncClient() as http, httpx.AsyncClient(
                    base_url=server.url, verify=server.ssl_context(),
                    headers={"Authorization": f"Bearer {server.admin_token}"}, timeout=30,
                ) as kube:  # fmt: skip

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

                    async def apply_sd(index: int) -> str:
                        name = f"sd{index:03d}"
                        body = {"apiVersion": "kubespeech.io/v1alpha1", "kind": "SpeechDeployment",
                                "metadata": {"name": name, "namespace": NAMESPACE}, "spec": BENCH_SPEC}  # fmt: skip
                        response = await kube.post(sd_path, json=body)
                        if response.status_code != 201:
                            raise RuntimeError(f"create {name}: HTTP {response.status_code} {response.text}")
                        return name

                    async def status_of(name: str) -> dict[str, Any]:
                        response = await kube.get(f"{sd_path}/{name}")
                        return dict(response.json().get("status") or {})

                    async def children_of(name: str) -> set[tuple[str, str]]:
                        async def one(kind: str, api_version: str, plural: str) -> set[tuple[str, str]]:
                            response = await kube.get(api_path(api_version, plural, NAMESPACE),
                                                      params={"labelSelector": f"app.kubernetes.io/instance={name}"})  # fmt: skip
                            if response.status_code != 200:
                                return set()
                            return {(kind, i["metadata"]["name"]) for i in response.json()["items"]}

                        found = await asyncio.gather(*(one(k, *ap) for k, ap in plurals.items()))
                        return set().union(*found)

                    # Apply → all children created, one SpeechDeployment at a time (the operator otherwise
                    # idle), polled on the server by listing every child kind at once.
                    times, follow = [], []
                    for index in range(samples):
                        t0 = time.monotonic()
                        name = await apply_sd(index)
                        want = _expected(name)
                        while not want <= await children_of(name):
                            if time.monotonic() - t0 > 30:
                                raise TimeoutError(f"operator bench: {name}'s children not created in 30 s")
                            await asyncio.sleep(0.01)
                        times.append(time.monotonic() - t0)
                        while (await status_of(name)).get("observedGeneration") != 1:
                            await asyncio.sleep(0.01)
                        missing = _expected(name) - await children_of(name)
                        if missing:
                            raise RuntimeError(f"operator bench: {name} lacks {sorted(missing)}")
                        # A child's readiness change → the SpeechDeployment's status (the watch, not the
                        # resync): both ASR pools report their pod ready.
                        t0 = time.monotonic()
                        for pool in ("l4", "cpu"):
                            await kube.patch(
                                api_path("apps/v1", "deployments", NAMESPACE, f"{name}-asr-{pool}") + "/status",
                                content=json.dumps({"status": {"replicas": 1, "readyReplicas": 1,
                                                               "updatedReplicas": 1, "availableReplicas": 1}}),
                                headers={"Content-Type": "application/merge-patch+json"},
                            )  # fmt: skip
                        while (await status_of(name)).get("asrReplicas") != "2/2":
                            if time.monotonic() - t0 > 30:
                                raise TimeoutError(
                                    f"operator bench: {name}'s status did not follow its pools"
                                )
                            await asyncio.sleep(0.005)
                        follow.append(time.monotonic() - t0)

                    # The rest up to ``sds`` at once; then a full resync cycle over all of them.
                    t0 = time.monotonic()
                    names = [await apply_sd(index) for index in range(samples, sds)]
                    for name in names:
                        while (await status_of(name)).get("observedGeneration") != 1:
                            if time.monotonic() - t0 > 600:
                                raise TimeoutError(f"operator bench: {sds} SpeechDeployments not reconciled")
                            await asyncio.sleep(0.1)
                    burst_s = time.monotonic() - t0
                    peak = _rss_mb(process.pid)
                    settle_until = time.monotonic() + resync_s * 1.5
                    while time.monotonic() < settle_until:
                        peak = max(peak, _rss_mb(process.pid))
                        await asyncio.sleep(0.25)
                    rss_loaded = _rss_mb(process.pid)
            finally:
                _stop(process)
    finally:
        server.stop()

    return {
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs, Python {platform.python_version()})",
        "api": "kube-apiserver v1.28 + etcd on loopback (no controllers, no kubelet)",
        "children_per_speechdeployment": len(_expected("sd000")),
        "operator_startup_s": round(startup_s, 3),
        "apply_to_all_children_s": {
            "median": round(statistics.median(times), 3),
            "max": round(max(times), 3),
            "samples": [round(t, 3) for t in times],
        },
        "child_ready_to_status_s": {
            "median": round(statistics.median(follow), 3),
            "max": round(max(follow), 3),
            "samples": [round(t, 3) for t in follow],
        },
        f"create_{sds}_speechdeployments_s": round(burst_s, 2),
        "speechdeployments": sds,
        "resync_interval_s": resync_s,
        "rss_idle_mb": round(rss_idle, 1),
        f"rss_with_{sds}_mb": round(rss_loaded, 1),
        f"rss_peak_with_{sds}_mb": round(peak, 1),
        "targets": {
            "apply_to_all_children_s": "< 2",
            "child_ready_to_status_s": "<= 2",
            f"rss_with_{sds}_mb": "< 150",
        },
    }


def run_operator_bench(sds: int = 100, samples: int = 5, resync_s: float = 10.0) -> dict[str, Any]:
    """Run the benchmark and return its numbers (times in seconds, memory in MiB)."""
    # From a checkout (an editable install), the repository root holds the test suite's harness.
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "tests" / "envtest.py").exists() and str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    return asyncio.run(_bench(sds, samples, resync_s))


AUTOSCALE_SPEC_POOL: dict[str, Any] = {
    "enabled": True, "minReplicas": 0, "maxReplicas": 8, "targetQueueDepthPerReplica": 2,
    "pollingIntervalSeconds": 1, "cooldownSeconds": 2,
}  # fmt: skip


async def _autoscale_bench(samples: int) -> dict[str, Any]:
    """Queue change → Deployment ``spec.replicas`` change, as the API server stores it: wake from zero on one
    job, and a burst of 8 (2 per replica → 4), each ``samples`` times; the operator is its own process."""
    from redis.asyncio import Redis
    from tests.conftest import start_redis
    from tests.envtest import (
        ApiServer,
        api_path,
        apply,
        ensure_namespace,
        start_apiserver,
        wait_crd_established,
    )

    from kubespeech.jobs import JobClient
    from kubespeech.jobs.protocol import Keys
    from kubespeech_operator.builders.crd import build_crd

    server: ApiServer = await asyncio.to_thread(start_apiserver)
    redis_server = start_redis()
    with server.client() as admin:
        apply(admin, build_crd(), "customresourcedefinitions", manager="bench")
        wait_crd_established(admin, build_crd()["metadata"]["name"])
        ensure_namespace(admin, NAMESPACE)
    redis = Redis.from_url(redis_server.url)
    wake: list[float] = []
    burst: list[float] = []
    try:
        with tempfile.TemporaryDirectory(prefix="kubespeech-bench-") as tmp:
            kubeconfig = server.kubeconfig(Path(tmp) / "kubeconfig")
            env = {**os.environ, "KUBESPEECH_OPERATOR_LOG_LEVEL": "WARNING",
                   "KUBESPEECH_OPERATOR_METRICS_PORT": str(_free_port())}  # fmt: skip
            command = [sys.executable, "-m", "kubespeech.cli", "operator", "--kubeconfig", str(kubeconfig),
                       "--liveness-port", str(_free_port()), "-n", NAMESPACE]  # fmt: skip
            process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # noqa: ASYNC220
            try:
                async with httpx.AsyncClient(
                    base_url=server.url, verify=server.ssl_context(),
                    headers={"Authorization": f"Bearer {server.admin_token}"}, timeout=30,
                ) as kube:  # fmt: skip
                    spec = {
                        **BENCH_SPEC,
                        "redis": {"mode": "external", "external": {"url": redis_server.url}},
                    }
                    spec["asr"] = {"pools": [{"name": "cpu", "engine": "whisper", "modelName": "whisper-tiny",
                                              "autoscaling": AUTOSCALE_SPEC_POOL}]}  # fmt: skip
                    body = {"apiVersion": "kubespeech.io/v1alpha1", "kind": "SpeechDeployment",
                            "metadata": {"name": "scaled", "namespace": NAMESPACE}, "spec": spec}  # fmt: skip
                    response = await kube.post(api_path("kubespeech.io/v1alpha1", "speechdeployments", NAMESPACE),
                                               json=body)  # fmt: skip
                    if response.status_code != 201:
                        raise RuntimeError(f"create: {response.text}")
                    path = api_path("apps/v1", "deployments", NAMESPACE, "scaled-asr-cpu")

                    async def until(replicas: int, started: float, what: str) -> float:
                        while True:
                            response = await kube.get(path)
                            if (
                                response.status_code == 200
                                and response.json()["spec"].get("replicas") == replicas
                            ):
                                return time.monotonic() - started
                            if time.monotonic() - started > 60:
                                raise TimeoutError(f"autoscaler bench: {what} not reached in 60 s")
                            await asyncio.sleep(0.02)

                    await until(0, time.monotonic(), "the pool at zero")
                    jobs = JobClient(redis)
                    queue = Keys().queue("whisper-tiny")
                    for _ in range(samples):
                        started = time.monotonic()
                        await jobs.submit("whisper-tiny", {"kind": "noop"}, b"x", timeout_s=120)
                        wake.append(await until(1, started, "wake from zero"))
                        started = time.monotonic()
                        for _ in range(7):
                            await jobs.submit("whisper-tiny", {"kind": "noop"}, b"x", timeout_s=120)
                        burst.append(await until(4, started, "burst → 4"))
                        await redis.delete(queue)
                        await until(0, time.monotonic(), "back to zero")
            finally:
                _stop(process)
    finally:
        await redis.aclose()
        if redis_server.process is not None:
            redis_server.process.terminate()
        server.stop()

    import dataclasses

    from kubespeech_operator.simulate import builtin_trace, simulate

    simulated = {
        trace: {who: dataclasses.asdict(result) for who, result in simulate(builtin_trace(trace)).items()}
        for trace in ("single", "burst", "ramp")
    }
    return {
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs, Python {platform.python_version()})",
        "api": "kube-apiserver v1.28 + etcd and redis-server on loopback; pollingIntervalSeconds 1",
        "wake_from_zero_s": {
            "median": round(statistics.median(wake), 3),
            "samples": [round(t, 3) for t in wake],
        },
        "burst_to_4_s": {
            "median": round(statistics.median(burst), 3),
            "samples": [round(t, 3) for t in burst],
        },
        "keda_hpa_defaults_reaction_s": "30 s KEDA polling, then 15 s HPA sync (up to 45 s)",
        "simulated": simulated,
    }


def run_autoscaler_bench(samples: int = 5) -> dict[str, Any]:
    """The autoscaler on a real API server, and the simulator's traces beside the KEDA+HPA model."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "tests" / "envtest.py").exists() and str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    return asyncio.run(_autoscale_bench(samples))
