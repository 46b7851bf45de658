"""kopf + the operator against the real kube-apiserver: create, update, drift, prune, invalid spec, status,
events, server-side apply beside other field managers, and deletion without a finalizer."""

from __future__ import annotations

import asyncio
import base64
import copy
import time
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from kubespeech.jobs import JobClient
from kubespeech_operator.builders import build_children
from kubespeech_operator.spec import parse_spec
from tests.conftest import RedisServer, free_port
from tests.operator.conftest import RunningOperator, operator_running, settings_for
from tests.operator.k8s import Kube, condition, cpu_spec, wait_for

CONDITION_TYPES = {"Ready", "Progressing", "Degraded", "LicenseValid", "ModelsReady", "ASRReady", "TTSReady"}


def expected_children(name: str, namespace: str, spec: dict[str, Any]) -> set[tuple[str, str]]:
    built = build_children(name, namespace, parse_spec(spec), redis_password="x")
    return {(c["kind"], c["metadata"]["name"]) for c in built if c["kind"] != "ServiceMonitor"}


async def wait_children(kube: Kube, name: str, want: set[tuple[str, str]], timeout: float = 15) -> None:
    async def exact() -> bool:
        return set(await kube.children(name)) == want

    try:
        await wait_for(exact, timeout=timeout, what="children")
    except AssertionError:
        have = set(await kube.children(name))
        raise AssertionError(f"missing {want - have}, unexpected {have - want}") from None


async def test_create_builds_every_child_with_owner_references(kube: Kube, operator: RunningOperator) -> None:
    spec = cpu_spec()
    want = expected_children("demo", kube.namespace, spec)
    await kube.create_license_secret()
    started = time.monotonic()
    sd = await kube.create_sd("demo", spec)

    await wait_children(kube, "demo", want)
    elapsed = time.monotonic() - started
    for (kind, name), obj in (await kube.children("demo")).items():
        refs = obj["metadata"].get("ownerReferences") or []
        assert refs == [
            {"apiVersion": "kubespeech.io/v1alpha1", "kind": "SpeechDeployment", "name": "demo",
             "uid": sd["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
        ], (kind, name)  # fmt: skip
        assert obj["metadata"]["annotations"]["kubespeech.io/input-hash"], (kind, name)
        # Written with server-side apply under the operator's field manager.
        managers = {(m["manager"], m["operation"]) for m in obj["metadata"]["managedFields"]}
        assert ("kubespeech-operator", "Apply") in managers, (kind, name, managers)

    # The generated Redis password is stored base64-encoded in the Secret the Redis pods read.
    secret = await kube.child("Secret", "demo-redis-auth")
    assert secret is not None
    password = base64.b64decode(secret["data"]["password"]).decode()
    assert len(password) >= 32

    async def status_written() -> Any:
        obj = await kube.sd("demo")
        return obj if obj and (obj.get("status") or {}).get("pools") else None

    obj = await wait_for(status_written, what="status written")
    status = obj["status"]
    assert status["observedGeneration"] == 1
    assert {c["type"] for c in status["conditions"]} == CONDITION_TYPES
    for c in status["conditions"]:
        assert c["status"] in ("True", "False", "Unknown") and c["reason"] and c["lastTransitionTime"]
        assert c["observedGeneration"] == 1
    assert condition(obj, "Ready")["status"] == "False"  # this server runs no pods
    assert condition(obj, "Degraded")["status"] == "False", condition(obj, "Degraded")
    assert status["asrReplicas"] == "0/1" and status["ttsReplicas"] == "0/1"
    assert status["queueDepth"] == 0
    assert {(p["task"], p["name"], p["modelName"]) for p in status["pools"]} == {
        ("asr", "cpu", "whisper-tiny"), ("tts", "cpu", "joe")}  # fmt: skip
    assert status["endpoints"]["api"] == f"http://demo-api.{kube.namespace}.svc:7100"
    # kopf's bookkeeping lives under kubespeech.io, and no finalizer holds a deletion hostage.
    annotations = obj["metadata"].get("annotations") or {}
    assert all(not k.startswith("kopf.zalando.org") for k in annotations)
    assert not obj["metadata"].get("finalizers")

    async def created_event() -> bool:  # kopf posts Events from a queue, a moment after the handler
        events = await kube.events()
        return any(e["reason"] == "ChildrenCreated" and e["involvedObject"]["name"] == "demo" for e in events)

    await wait_for(created_event, what="ChildrenCreated event")
    print(f"apply → all {len(want)} children created in {elapsed:.3f} s")


async def test_spec_update_applies_children_and_keeps_the_password(
    kube: Kube, operator: RunningOperator
) -> None:
    spec = cpu_spec()
    await kube.create_sd("upd", spec)
    await wait_for(lambda: kube.child("Deployment", "upd-asr-cpu"), what="pool")
    secret = await wait_for(lambda: kube.child("Secret", "upd-redis-auth"), what="secret")
    password = secret["data"]["password"]

    spec["asr"]["pools"][0].update(replicas=3, nodeSelector={"pool": "cpu-big"})
    await kube.update_sd("upd", spec)

    async def updated() -> bool:
        dep = await kube.child("Deployment", "upd-asr-cpu")
        pod = dep["spec"]["template"]["spec"]
        return dep["spec"]["replicas"] == 3 and pod.get("nodeSelector") == {"pool": "cpu-big"}

    await wait_for(updated, what="pool Deployment updated")

    async def generation_2() -> bool:
        obj = await kube.sd("upd")
        return obj["status"]["observedGeneration"] == 2 and obj["status"]["asrReplicas"] == "0/3"

    await wait_for(generation_2, what="observedGeneration 2")

    # A field the spec no longer sets disappears from the child (server-side apply drops what we owned).
    del spec["asr"]["pools"][0]["nodeSelector"]
    await kube.update_sd("upd", spec)

    async def removed() -> bool:
        dep = await kube.child("Deployment", "upd-asr-cpu")
        return "nodeSelector" not in dep["spec"]["template"]["spec"]

    await wait_for(removed, what="nodeSelector removed")
    assert (await kube.child("Secret", "upd-redis-auth"))["data"]["password"] == password


async def test_deleted_and_hand_edited_children_are_restored(kube: Kube, operator: RunningOperator) -> None:
    await kube.create_sd("drift", cpu_spec())
    original = await wait_for(lambda: kube.child("Deployment", "drift-api"), what="api")
    image = original["spec"]["template"]["spec"]["containers"][0]["image"]
    password = (await wait_for(lambda: kube.child("Secret", "drift-redis-auth")))["data"]

    await kube.delete("apps/v1", "deployments", "drift-api")
    assert await kube.child("Deployment", "drift-api") is None
    await wait_for(lambda: kube.child("Deployment", "drift-api"), what="restored")

    edited = {"spec": {"template": {"spec": {"containers": [{"name": "api", "image": "evil/image:1"}]}}}}
    await kube.merge_patch("apps/v1", "deployments", "drift-api", edited, manager="kubectl-edit")

    async def image_back() -> bool:
        dep = await kube.child("Deployment", "drift-api")
        return dep["spec"]["template"]["spec"]["containers"][0]["image"] == image

    await wait_for(image_back, what="hand edit reverted")
    # The Redis password Secret is never rewritten while it exists.
    assert (await kube.child("Secret", "drift-redis-auth"))["data"] == password


async def test_other_field_managers_keep_their_fields(kube: Kube, operator: RunningOperator) -> None:
    """Server-side apply: annotations and labels others add, and an autoscaled pool's replicas, survive
    every reconcile; a hand edit of a fixed pool's replicas is reverted."""
    spec = cpu_spec()
    spec["asr"]["pools"][0]["autoscaling"] = {"enabled": True, "minReplicas": 1, "maxReplicas": 5}
    await kube.create_license_secret()
    await kube.create_sd("auto", spec)
    await wait_for(lambda: kube.child("Deployment", "auto-tts-cpu"), what="pools")
    created = await wait_for(lambda: kube.child("Deployment", "auto-asr-cpu"), what="autoscaled pool")
    assert created["spec"]["replicas"] == 1  # created at minReplicas
    await kube.merge_patch("apps/v1", "deployments", "auto-asr-cpu", {"spec": {"replicas": 4}},
                           manager="some-autoscaler")  # fmt: skip
    await kube.merge_patch("apps/v1", "deployments", "auto-tts-cpu", {"spec": {"replicas": 4}},
                           manager="kubectl-scale")  # fmt: skip
    await kube.merge_patch("apps/v1", "deployments", "auto-api", {"metadata": {
        "annotations": {"example.com/owner": "team-a"}, "labels": {"team": "speech"}}},
        manager="other-controller")  # fmt: skip

    async def fixed_restored() -> bool:
        return (await kube.child("Deployment", "auto-tts-cpu"))["spec"]["replicas"] == 1

    await wait_for(fixed_restored, what="fixed pool's replicas restored")
    await asyncio.sleep(1.2)  # two more resync ticks
    assert (await kube.child("Deployment", "auto-asr-cpu"))["spec"]["replicas"] == 4
    api = await kube.child("Deployment", "auto-api")
    assert api["metadata"]["annotations"]["example.com/owner"] == "team-a"
    assert api["metadata"]["labels"]["team"] == "speech"

    async def desired_from_live() -> bool:
        return (await kube.sd("auto"))["status"]["asrReplicas"] == "0/4"

    await wait_for(desired_from_live, what="desired from the live object")

    # Turning autoscaling off hands replicas back to the spec; on again keeps the live count.
    spec["asr"]["pools"][0]["autoscaling"] = {"enabled": False}
    spec["asr"]["pools"][0]["replicas"] = 2
    await kube.update_sd("auto", spec)

    async def replicas_from_spec() -> bool:
        return (await kube.child("Deployment", "auto-asr-cpu"))["spec"]["replicas"] == 2

    await wait_for(replicas_from_spec, what="replicas from the spec")
    spec["asr"]["pools"][0]["autoscaling"] = {"enabled": True, "minReplicas": 1, "maxReplicas": 5}
    await kube.update_sd("auto", spec)
    await wait_for(lambda: kube.sd("auto"), what="sd")
    await asyncio.sleep(1.5)
    assert (await kube.child("Deployment", "auto-asr-cpu"))["spec"]["replicas"] == 2


PRUNE_CASES: dict[str, Any] = {
    "pool-removed": lambda s: s["tts"].update(pools=[]),
    "pool-renamed": lambda s: s["asr"]["pools"][0].update(name="cpu2"),
    "ingress-off": lambda s: s["api"].update(ingress={"enabled": False}),
    "network-policy-off": lambda s: s.update(networkPolicy={"enabled": False}),
    "pdb-off": lambda s: s.update(podDisruptionBudgets={"enabled": False}),
    "model-cache-off": lambda s: s["asr"]["pools"][0].update(model={"path": "/models/in-image"}),
    "redis-external": lambda s: s.update(redis={"mode": "external", "external": {"url": "redis://r:6379/0"}}),
}


@pytest.mark.parametrize("case", sorted(PRUNE_CASES))
async def test_children_no_longer_rendered_are_pruned(
    kube: Kube, operator: RunningOperator, case: str
) -> None:
    spec = cpu_spec()
    spec["api"]["ingress"] = {"enabled": True, "host": "speech.example.com"}
    spec["asr"]["pools"][0]["model"] = {"source": "https://models.example.com/tiny.bin"}
    await kube.create_license_secret()
    await kube.create_sd("pr", spec)
    before = expected_children("pr", kube.namespace, spec)
    await wait_children(kube, "pr", before)
    # Something a person created with the stack's labels but without our owner reference is never ours.
    await kube.create("v1", "configmaps", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": "pr-notes", "labels": {"app.kubernetes.io/instance": "pr",
                                       "app.kubernetes.io/managed-by": "kubespeech-operator"}}})  # fmt: skip

    changed = copy.deepcopy(spec)
    PRUNE_CASES[case](changed)
    after = expected_children("pr", kube.namespace, changed)
    assert before - after, f"{case} must render fewer or other children"
    await kube.update_sd("pr", changed)
    await wait_children(kube, "pr", after | {("ConfigMap", "pr-notes")})

    async def reported() -> bool:
        obj = await kube.sd("pr")
        return obj["status"].get("observedGeneration") == 2

    await wait_for(reported, what="status after pruning")
    assert condition(await kube.sd("pr"), "Degraded")["status"] == "False", condition(
        await kube.sd("pr"), "Degraded"
    )


async def test_invalid_spec_is_degraded_without_hot_loop_and_recovers(
    kube: Kube, operator: RunningOperator
) -> None:
    spec = cpu_spec()
    spec["tts"]["pools"][0]["modelName"] = "whisper-tiny"  # one queue cannot be both an ASR and a TTS model
    await kube.create_license_secret()
    await kube.create_sd("bad", spec)

    async def degraded() -> Any:
        obj = await kube.sd("bad")
        return obj if condition(obj, "Degraded") else None

    obj = await wait_for(degraded, what="Degraded")
    c = condition(obj, "Degraded")
    assert c["status"] == "True" and c["reason"] == "SpecInvalid"
    assert c["message"].startswith("spec.tts.pools[0].modelName:")
    assert condition(obj, "Ready")["status"] == "False"
    assert await kube.children("bad") == {}

    # No hot loop: with a 0.5 s resync, 2 s bring no write to the object at all.
    await asyncio.sleep(1)  # kopf records the handler's permanent failure once
    before = await kube.sd("bad")
    await asyncio.sleep(2)
    after = await kube.sd("bad")
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"], (before, after)

    spec["tts"]["pools"][0]["modelName"] = "joe"
    await kube.update_sd("bad", spec)

    async def recovered() -> bool:
        return condition(await kube.sd("bad"), "Degraded")["status"] == "False"

    await wait_for(recovered, what="recovered")
    assert ("Deployment", "bad-asr-cpu") in await kube.children("bad")

    async def warned() -> bool:
        return any(e["reason"] == "SpecInvalid" and e["type"] == "Warning" for e in await kube.events())

    await wait_for(warned, what="SpecInvalid warning event")


async def test_status_follows_child_readiness_without_waiting_for_the_resync(
    kube: Kube, k8s: Any, tmp_path: Any
) -> None:
    """Unschedulable pods degrade the status; workloads turning ready make it Ready within 2 s, with the
    resync interval at 10 minutes (the watch on owned workloads does it, not the timer)."""
    settings = settings_for(k8s.kubeconfig(tmp_path / "kubeconfig"), kube.namespace, resync_interval_s=600)
    async with operator_running(settings):
        await kube.create_license_secret()
        await kube.create_sd("st", cpu_spec())
        deployment = await wait_for(lambda: kube.child("Deployment", "st-asr-cpu"))
        await wait_for(lambda: kube.sd("st"), what="sd")
        pod_labels = deployment["spec"]["selector"]["matchLabels"]
        message = ("0/3 nodes are available: 1 node(s) had untolerated taint {nvidia.com/gpu: present}, "
                   "2 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available: 3 No preemption victims.")  # fmt: skip
        await kube.create("v1", "pods", {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "st-asr-cpu-abc", "labels": pod_labels},
            "spec": {"containers": [{"name": "w", "image": "example.com/w:1"}]}})  # fmt: skip
        await kube.merge_patch("v1", "pods", "st-asr-cpu-abc", {"status": {"phase": "Pending", "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}]}},
            subresource="status", manager="kube-scheduler")  # fmt: skip
        # The pod's scheduling state shows at the next reconcile of the stack: a workload event triggers one.
        await kube.merge_patch("apps/v1", "deployments", "st-asr-cpu",
                               {"status": {"replicas": 1, "unavailableReplicas": 1}},
                               subresource="status", manager="kube-controller-manager")  # fmt: skip

        async def unschedulable() -> Any:
            c = condition(await kube.sd("st"), "Degraded")
            return c if c and c["reason"] == "PodsUnschedulable" else None

        degraded = await wait_for(unschedulable, what="PodsUnschedulable")
        assert degraded["message"] == (
            "asr/cpu: 0/1 pods scheduled: untolerated taint nvidia.com/gpu (1 node), "
            "Insufficient nvidia.com/gpu (2 nodes)"
        )

        await kube.delete("v1", "pods", "st-asr-cpu-abc")
        started = time.monotonic()
        await kube.set_workloads_ready("st")

        async def ready() -> Any:
            c = condition(await kube.sd("st"), "Ready")
            return c if c and c["status"] == "True" else None

        c = await wait_for(ready, timeout=5, what="Ready=True")
        lag = time.monotonic() - started
        assert c["reason"] == "AllComponentsReady"
        assert lag <= 2.0, f"status followed the children after {lag:.2f} s"
        status = (await kube.sd("st"))["status"]
        assert status["asrReplicas"] == "1/1" and status["ttsReplicas"] == "1/1"
        assert condition(await kube.sd("st"), "Progressing")["status"] == "False"
        print(f"child readiness → SpeechDeployment Ready in {lag:.3f} s")


async def test_deleting_needs_no_running_operator(kube: Kube, operator_settings: Any) -> None:
    """No finalizer: with the operator stopped, a delete completes at once; children carry the owner
    reference the garbage collector deletes them by."""
    async with operator_running(operator_settings):
        sd = await kube.create_sd("gone", cpu_spec())
        await wait_for(lambda: kube.child("Deployment", "gone-api"), what="children")
        await wait_for(lambda: kube.sd("gone"), what="sd")
    assert not (await kube.sd("gone"))["metadata"].get("finalizers")
    await kube.delete("kubespeech.io/v1alpha1", "speechdeployments", "gone")
    assert await kube.sd("gone") is None
    api = await kube.child("Deployment", "gone-api")
    assert api["metadata"]["ownerReferences"][0]["uid"] == sd["metadata"]["uid"]


async def test_service_monitor_created_when_the_crd_exists(
    kube: Kube, monitoring_crd: None, operator: RunningOperator
) -> None:
    spec = cpu_spec(monitoring={"serviceMonitor": {"enabled": True}})
    await kube.create_sd("mon", spec)

    async def monitor() -> bool:
        return any(kind == "ServiceMonitor" for kind, _ in await kube.children("mon"))

    await wait_for(monitor, what="ServiceMonitor")


async def test_service_monitor_skipped_without_the_crd(kube: Kube, operator: RunningOperator) -> None:
    spec = cpu_spec(monitoring={"serviceMonitor": {"enabled": True}})
    await kube.create_license_secret()
    await kube.create_sd("nomon", spec)
    await wait_for(lambda: condition_of(kube, "nomon", "Ready"), what="status")
    kinds = {k for k, _ in await kube.children("nomon")}
    assert "Deployment" in kinds and "ServiceMonitor" not in kinds
    assert (await condition_of(kube, "nomon", "Degraded"))["status"] == "False"


async def condition_of(kube: Kube, name: str, type_: str) -> dict[str, Any] | None:
    return condition(await kube.sd(name), type_)


async def test_liveness_endpoint_answers(operator: RunningOperator) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{operator.settings.liveness_port}/healthz")
    assert response.status_code == 200
    assert "reconciler" in response.text


async def test_queue_depth_is_read_from_the_stacks_redis(
    kube: Kube, operator: RunningOperator, redis_server: RedisServer
) -> None:
    redis_server.flush()
    spec = cpu_spec(redis={"mode": "external", "external": {"url": redis_server.url}})
    await kube.create_license_secret()
    await kube.create_sd("q", spec)
    await wait_for(lambda: condition_of(kube, "q", "Ready"), what="status")
    assert not [k for k, _ in await kube.children("q") if k == "StatefulSet"]  # no embedded Redis

    client = Redis.from_url(redis_server.url)
    try:
        jobs = JobClient(client)
        for _ in range(3):
            await jobs.submit("whisper-tiny", {"kind": "noop"}, b"x")
        await jobs.submit("joe", {"kind": "noop"}, b"y")

        async def depths() -> bool:
            status = (await kube.sd("q"))["status"]
            pools = {p["modelName"]: p["queueDepth"] for p in status["pools"]}
            return pools == {"whisper-tiny": 3, "joe": 1} and status["queueDepth"] == 4

        await wait_for(depths, what="queue depths in the status")
    finally:
        await client.aclose()


async def test_queue_depth_unknown_when_redis_is_unreachable(kube: Kube, operator: RunningOperator) -> None:
    spec = cpu_spec(redis={"mode": "external", "external": {"url": f"redis://127.0.0.1:{free_port()}/0"}})
    await kube.create_license_secret()
    await kube.create_sd("noq", spec)

    async def pools() -> Any:
        obj = await kube.sd("noq")
        return obj if obj and (obj.get("status") or {}).get("pools") else None

    obj = await wait_for(pools, what="status")
    assert obj["status"]["queueDepth"] == 0
    assert all(
        "queue depth unknown" in p["message"] or "pods ready" in p["message"] for p in obj["status"]["pools"]
    )
