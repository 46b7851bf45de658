"""Queue-depth autoscaling end to end on the real API server with a real Redis: the operator reads the model
queue and writes the pool Deployment's ``spec.replicas`` (as the field manager kubespeech-autoscaler), the
status and Events say why, and other field managers never reset it."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from redis.asyncio import Redis

from kubespeech.jobs import JobClient
from kubespeech.jobs.protocol import Keys
from tests.conftest import RedisServer, start_redis
from tests.operator.conftest import RunningOperator
from tests.operator.k8s import Kube, condition, cpu_spec, wait_for


def scaled_spec(redis_url: str, prefix: str, **autoscaling: Any) -> dict[str, Any]:
    spec = cpu_spec(redis={"mode": "external", "external": {"url": redis_url}, "keyPrefix": prefix})
    spec["asr"]["pools"][0]["autoscaling"] = {
        "enabled": True, "minReplicas": 0, "maxReplicas": 6, "targetQueueDepthPerReplica": 2,
        "pollingIntervalSeconds": 1, "cooldownSeconds": 3, **autoscaling}  # fmt: skip
    return spec


async def replicas_become(kube: Kube, deployment: str, want: int, what: str, timeout: float = 20) -> float:
    started = time.monotonic()

    async def reached() -> bool:
        dep = await kube.child("Deployment", deployment)
        return bool(dep) and dep["spec"].get("replicas") == want

    await wait_for(reached, timeout=timeout, what=what)
    return time.monotonic() - started


async def _api_replicas(kube: Kube, want: int) -> bool:
    dep = await kube.child("Deployment", "auto-api")
    return bool(dep) and dep["spec"].get("replicas") == want


async def test_a_pool_wakes_from_zero_scales_on_a_burst_and_returns_to_zero(
    kube: Kube, operator: RunningOperator, redis_server: RedisServer
) -> None:
    prefix = f"as{uuid.uuid4().hex[:6]}"
    await kube.create_license_secret()
    await kube.create_sd("auto", scaled_spec(redis_server.url, prefix))
    await replicas_become(kube, "auto-asr-cpu", 0, "the pool created at zero")
    redis = Redis.from_url(redis_server.url)
    jobs = JobClient(redis, prefix=prefix)
    try:
        # One queued job wakes the pool.
        await jobs.submit("whisper-tiny", {"kind": "noop"}, b"x", timeout_s=60)
        woke = await replicas_become(kube, "auto-asr-cpu", 1, "wake from zero on one job")
        dep = await kube.child("Deployment", "auto-asr-cpu")
        owners = {
            m["manager"] for m in dep["metadata"]["managedFields"] if "f:replicas" in str(m.get("fieldsV1"))
        }
        assert "kubespeech-autoscaler" in owners, owners

        async def cold_starting() -> Any:
            pool = next(p for p in (await kube.sd("auto"))["status"]["pools"] if p["task"] == "asr")
            # The pool's state and the scaler's reason may reach the status in two writes: wait for both.
            return pool if pool.get("state") == "ColdStarting" and "lastScaleReason" in pool else None

        pool = await wait_for(cold_starting, what="the pool reads ColdStarting")
        assert pool["lastScaleReason"] == "WakeFromZero" and pool["queueDepth"] == 1
        assert condition(await kube.sd("auto"), "ASRReady")["reason"] == "ColdStarting"
        # The first worker turns ready: the cold start ends and its duration is recorded.
        await kube.merge_patch("apps/v1", "deployments", "auto-asr-cpu", {"status": {
            "replicas": 1, "readyReplicas": 1, "updatedReplicas": 1, "availableReplicas": 1}},
            subresource="status", manager="kube-controller-manager")  # fmt: skip

        async def cold_start_over() -> Any:
            pool = next(p for p in (await kube.sd("auto"))["status"]["pools"] if p["task"] == "asr")
            return pool if "state" not in pool and pool.get("lastColdStartSeconds") is not None else None

        pool = await wait_for(cold_start_over, what="the cold start recorded")
        assert 0 < pool["lastColdStartSeconds"] < 30

        # A burst of 8 with 2 per replica asks for 4 (7 more, plus the first).
        for _ in range(7):
            await jobs.submit("whisper-tiny", {"kind": "noop"}, b"x", timeout_s=60)
        burst = await replicas_become(kube, "auto-asr-cpu", 4, "burst of 8 → 4 replicas")

        # Another field manager touching the Deployment, and a reconcile after a spec change, do not reset
        # the replicas.
        await kube.merge_patch("apps/v1", "deployments", "auto-asr-cpu",
                               {"metadata": {"annotations": {"example.com/touched": "yes"}}}, manager="other-tool")  # fmt: skip
        changed = scaled_spec(redis_server.url, prefix)
        changed["api"]["replicas"] = 2
        await kube.update_sd("auto", changed)
        await wait_for(lambda: _api_replicas(kube, 2), what="a spec change reconciled")
        assert (await kube.child("Deployment", "auto-asr-cpu"))["spec"]["replicas"] == 4

        # The queue drains: back to zero after the cooldown, with an Event for each decision.
        await redis.delete(Keys(prefix).queue("whisper-tiny"))
        await replicas_become(kube, "auto-asr-cpu", 0, "back to zero after the cooldown", timeout=30)

        async def events() -> set[str] | None:
            reasons = {e["reason"] for e in await kube.events()}
            return reasons if {"ScaledWakeFromZero", "ScaledScaleToZero"} <= reasons else None

        try:
            await wait_for(events, what="scale Events")
        except AssertionError:
            raise AssertionError(
                f"events: {[(e['reason'], e['message']) for e in await kube.events()]}"
            ) from None
        print(f"wake from zero in {woke:.2f} s; burst → 4 replicas in {burst:.2f} s")
    finally:
        await redis.aclose()


async def test_missing_queue_data_holds_replicas_and_says_so(kube: Kube, operator: RunningOperator) -> None:
    """Redis goes away with the pool at 1 and an empty queue: past the cooldown, where data would take it to
    zero, the pool holds (never to zero on missing data) and ScalingActive is False with the reason."""
    server = start_redis()
    prefix = f"as{uuid.uuid4().hex[:6]}"
    try:
        await kube.create_license_secret()
        await kube.create_sd("hold", scaled_spec(server.url, prefix, cooldownSeconds=2))
        await replicas_become(kube, "hold-asr-cpu", 0, "the pool created at zero")
        redis = Redis.from_url(server.url)
        try:
            await JobClient(redis, prefix=prefix).submit("whisper-tiny", {"kind": "noop"}, b"x", timeout_s=60)
            await replicas_become(kube, "hold-asr-cpu", 1, "woken by one job")
            await redis.delete(Keys(prefix).queue("whisper-tiny"))
        finally:
            await redis.aclose()
    finally:
        assert server.process is not None
        server.process.kill()
        server.process.wait(5)

    async def unavailable() -> Any:
        c = condition(await kube.sd("hold"), "ScalingActive")
        return c if c and c["status"] == "False" else None

    c = await wait_for(unavailable, what="ScalingActive=False")
    assert c["reason"] == "QueueDepthUnavailable" and "never scaled to zero" in c["message"]
    for _ in range(10):  # 5 s: more than twice the cooldown
        assert (await kube.child("Deployment", "hold-asr-cpu"))["spec"]["replicas"] == 1
        await asyncio.sleep(0.5)


async def test_keda_mode_without_keda_says_so(kube: Kube, operator: RunningOperator) -> None:
    """mode keda on a cluster without KEDA: nothing fails to apply; the status names what is missing."""
    spec = cpu_spec()
    spec["asr"]["pools"][0]["autoscaling"] = {"enabled": True, "mode": "keda", "minReplicas": 0}
    await kube.create_license_secret()
    await kube.create_sd("nokeda", spec)

    async def degraded() -> Any:
        c = condition(await kube.sd("nokeda"), "Degraded")
        return c if c and c["status"] == "True" else None

    c = await wait_for(degraded, what="Degraded: KEDA missing")
    assert c["reason"] == "KedaNotInstalled" and "ScaledObject/nokeda-asr-cpu" in c["message"], c
    assert ("Deployment", "nokeda-asr-cpu") in await kube.children("nokeda")


async def test_keda_mode_with_keda_applies_the_scaled_object(
    kube: Kube, keda_crds: None, operator: RunningOperator
) -> None:
    spec = cpu_spec()
    spec["asr"]["pools"][0]["autoscaling"] = {"enabled": True, "mode": "keda", "minReplicas": 0}
    await kube.create_license_secret()
    await kube.create_sd("keda", spec)

    async def applied() -> Any:
        children = await kube.children("keda")
        return children if ("ScaledObject", "keda-asr-cpu") in children else None

    children = await wait_for(applied, what="ScaledObject applied")
    scaled = children[("ScaledObject", "keda-asr-cpu")]
    assert scaled["spec"]["scaleTargetRef"]["name"] == "keda-asr-cpu"

    async def not_degraded() -> bool:
        c = condition(await kube.sd("keda"), "Degraded")
        return bool(c and c["status"] == "False")

    await wait_for(not_degraded, what="Degraded=False with KEDA installed")


async def test_operator_metrics_show_decisions_and_the_hpa_queue_metric(
    kube: Kube, k8s: Any, tmp_path: Any, redis_server: RedisServer
) -> None:
    """/metrics on the operator's metrics port: the desired replicas and queue gauges of operator-scaled
    pools, the decision counter, and kubespeech_queue_jobs for an HPA-scaled pool's metrics adapter."""
    import httpx

    from tests.conftest import free_port
    from tests.operator.conftest import operator_running, settings_for

    port = free_port()
    settings = settings_for(k8s.kubeconfig(tmp_path / "kubeconfig"), kube.namespace, metrics_port=port,
                            metrics_host="127.0.0.1")  # fmt: skip
    prefix = f"as{uuid.uuid4().hex[:6]}"
    spec = scaled_spec(redis_server.url, prefix)
    spec["tts"]["pools"][0]["autoscaling"] = {
        "enabled": True,
        "mode": "hpa",
        "minReplicas": 1,
        "pollingIntervalSeconds": 1,
    }
    redis = Redis.from_url(redis_server.url)
    try:
        async with operator_running(settings):
            await kube.create_license_secret()
            await kube.create_sd("met", spec)
            await JobClient(redis, prefix=prefix).submit("joe", {"kind": "noop"}, b"x", timeout_s=60)
            want = [
                f'kubespeech_autoscaler_desired_replicas{{namespace="{kube.namespace}",pool="asr/cpu",speechdeployment="met"}}',
                f'kubespeech_queue_jobs{{model="joe",namespace="{kube.namespace}",speechdeployment="met"}} 1.0',
                "kubespeech_autoscaler_decisions_total{",
            ]

            async def scraped() -> str | None:
                async with httpx.AsyncClient() as http:
                    text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
                return text if all(w in text for w in want) else None

            await wait_for(scraped, what="operator metrics")
    finally:
        await redis.aclose()


async def test_live_sessions_are_load_and_reach_the_status(
    kube: Kube, operator: RunningOperator, redis_server: RedisServer
) -> None:
    """Open live STT sessions (as the API counts them in Redis) scale a pool with an empty job queue and show
    as activeStreams."""
    from kubespeech.jobs.sessions import SessionKeys

    prefix = f"as{uuid.uuid4().hex[:6]}"
    await kube.create_license_secret()
    await kube.create_sd("streams", scaled_spec(redis_server.url, prefix, targetActiveStreams=2))
    await replicas_become(kube, "streams-asr-cpu", 0, "the pool created at zero")
    redis = Redis.from_url(redis_server.url)
    try:
        expiry_ms = (time.time() + 60) * 1000
        await redis.zadd(SessionKeys(prefix).active("whisper-tiny"), {f"s{i}": expiry_ms for i in range(5)})
        await replicas_become(kube, "streams-asr-cpu", 3, "5 sessions at 2 per replica → 3")

        async def reported() -> Any:
            pool = next(p for p in (await kube.sd("streams"))["status"]["pools"] if p["task"] == "asr")
            return pool if pool.get("activeStreams") == 5 and pool.get("queueDepth") == 0 else None

        await wait_for(reported, what="activeStreams 5 in the status")
    finally:
        await redis.aclose()
