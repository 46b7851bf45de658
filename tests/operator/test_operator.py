"""kopf + the operator against KMock over real HTTP: create, update, drift, invalid spec, status, events."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from kubespeech.jobs import JobClient
from kubespeech_operator.builders import build_children
from kubespeech_operator.models import parse_spec
from tests.conftest import RedisServer, free_port
from tests.operator.conftest import Cluster, RunningOperator
from tests.operator.kmock_cluster import (
    SD_PATH,
    SD_RESOURCE,
    condition,
    cpu_spec,
    get_object,
    operator_patches,
    requests_to,
    speech_deployment,
    stored_children,
    wait_for,
)

NS = "speech"
CONDITION_TYPES = {"Ready", "Progressing", "Degraded", "LicenseValid", "ModelsReady", "ASRReady", "TTSReady"}


def expected_children(name: str, spec: dict[str, Any]) -> set[tuple[str, str]]:
    built = build_children(name, NS, parse_spec(spec), redis_password="x")
    return {(c["kind"], c["metadata"]["name"]) for c in built if c["kind"] != "ServiceMonitor"}


def sd(cluster: Cluster, name: str) -> dict[str, Any] | None:
    return get_object(cluster.api, "kubespeech.io/v1alpha1", "speechdeployments", NS, name)


async def create_sd(cluster: Cluster, name: str, spec: dict[str, Any], **kwargs: Any) -> None:
    response = await cluster.api.post(
        SD_PATH.format(namespace=NS), json=speech_deployment(name, NS, spec, **kwargs)
    )
    assert response.status == 200, await response.text()


async def create_license(cluster: Cluster) -> None:
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "license", "namespace": NS},
              "data": {"key": base64.b64encode(b"license-key").decode()}}  # fmt: skip
    response = await cluster.api.post(f"/api/v1/namespaces/{NS}/secrets", json=secret)
    assert response.status == 200, await response.text()


async def patch(cluster: Cluster, path: str, body: dict[str, Any]) -> None:
    response = await cluster.api.patch(
        path, json=body, headers={"Content-Type": "application/merge-patch+json"}
    )
    assert response.status == 200, await response.text()


async def test_create_builds_every_child_with_owner_references(
    cluster: Cluster, operator: RunningOperator
) -> None:
    spec = cpu_spec()
    want = expected_children("demo", spec) | {("Secret", "license")}
    await create_license(cluster)
    started = time.monotonic()
    await create_sd(cluster, "demo", spec, uid="uid-demo-1")

    await wait_for(lambda: want <= set(stored_children(cluster.api, NS)), what="every child created")
    elapsed = time.monotonic() - started
    children = stored_children(cluster.api, NS)
    assert set(children) == want, set(children) ^ want
    for (kind, name), obj in children.items():
        if (kind, name) == ("Secret", "license"):
            continue
        refs = obj["metadata"].get("ownerReferences") or []
        assert refs == [
            {"apiVersion": "kubespeech.io/v1alpha1", "kind": "SpeechDeployment", "name": "demo",
             "uid": "uid-demo-1", "controller": True, "blockOwnerDeletion": True}
        ], (kind, name)  # fmt: skip
        assert obj["metadata"]["annotations"]["kubespeech.io/input-hash"], (kind, name)
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == "demo"

    # The generated Redis password is stored base64-encoded in the Secret the Redis pods read.
    secret = children[("Secret", "demo-redis-auth")]
    password = base64.b64decode(secret["data"]["password"]).decode()
    assert len(password) >= 32 and "stringData" not in secret

    # Status: observedGeneration, all seven conditions, printer-column fields, pools and endpoints.
    obj = await wait_for(lambda: (o := sd(cluster, "demo")) and o.get("status", {}).get("pools") and o,
                         what="status written")  # fmt: skip
    status = obj["status"]
    assert status["observedGeneration"] == 1
    assert {c["type"] for c in status["conditions"]} == CONDITION_TYPES
    for c in status["conditions"]:
        assert c["status"] in ("True", "False", "Unknown") and c["reason"] and c["lastTransitionTime"]
        assert c["observedGeneration"] == 1
    assert condition(obj, "Ready")["status"] == "False"  # KMock runs no pods
    assert condition(obj, "Degraded")["status"] == "False", condition(obj, "Degraded")
    assert status["asrReplicas"] == "0/1" and status["ttsReplicas"] == "0/1"
    assert status["queueDepth"] == 0
    assert {(p["task"], p["name"], p["modelName"]) for p in status["pools"]} == {
        ("asr", "cpu", "whisper-tiny"), ("tts", "cpu", "joe")}  # fmt: skip
    assert status["endpoints"]["api"] == f"http://demo-api.{NS}.svc:7100"
    # kopf's bookkeeping lives under kubespeech.io, nothing under kopf.zalando.org.
    annotations = await wait_for(
        lambda: (a := sd(cluster, "demo")["metadata"].get("annotations")) and "kubespeech.io/last-handled-configuration" in a and a,
        what="kopf's diff-base annotation")  # fmt: skip
    assert all(not k.startswith("kopf.zalando.org") for k in annotations)
    # Only POST and JSON merge patch: KMock ignores server-side apply and rejects PUT silently.
    assert not requests_to(cluster.api, "PUT", "/")
    ours = operator_patches(list(cluster.api))
    assert ours and all(r.headers["Content-Type"] == "application/merge-patch+json" for r in ours)
    print(f"apply → all {len(want)} children created in {elapsed:.3f} s")


async def test_spec_update_patches_children_and_keeps_the_password(
    cluster: Cluster, operator: RunningOperator
) -> None:
    spec = cpu_spec()
    await create_sd(cluster, "upd", spec)
    await wait_for(lambda: get_object(cluster.api, "apps/v1", "deployments", NS, "upd-asr-cpu"), what="pool")
    secret = await wait_for(
        lambda: get_object(cluster.api, "v1", "secrets", NS, "upd-redis-auth"), what="secret"
    )
    password = secret["data"]["password"]

    spec["asr"]["pools"][0].update(replicas=3, nodeSelector={"pool": "cpu-big"})
    await patch(cluster, f"{SD_PATH.format(namespace=NS)}/upd", {"spec": spec, "metadata": {"generation": 2}})

    def updated() -> Any:
        dep = get_object(cluster.api, "apps/v1", "deployments", NS, "upd-asr-cpu")
        pod = dep["spec"]["template"]["spec"]
        return dep["spec"]["replicas"] == 3 and pod.get("nodeSelector") == {"pool": "cpu-big"}

    await wait_for(updated, what="pool Deployment patched")
    await wait_for(
        lambda: sd(cluster, "upd")["status"]["observedGeneration"] == 2, what="observedGeneration 2"
    )
    assert sd(cluster, "upd")["status"]["asrReplicas"] == "0/3"

    # Removing a field removes it from the child (merge patch with null), not only adding does.
    del spec["asr"]["pools"][0]["nodeSelector"]
    await patch(cluster, f"{SD_PATH.format(namespace=NS)}/upd", {"spec": spec, "metadata": {"generation": 3}})

    def removed() -> bool:
        dep = get_object(cluster.api, "apps/v1", "deployments", NS, "upd-asr-cpu")
        return "nodeSelector" not in dep["spec"]["template"]["spec"]

    await wait_for(removed, what="nodeSelector removed")
    assert get_object(cluster.api, "v1", "secrets", NS, "upd-redis-auth")["data"]["password"] == password


async def test_deleted_and_hand_edited_children_are_restored_by_the_timer(
    cluster: Cluster, operator: RunningOperator
) -> None:
    await create_sd(cluster, "drift", cpu_spec())
    path = f"/apis/apps/v1/namespaces/{NS}/deployments"
    original = await wait_for(
        lambda: get_object(cluster.api, "apps/v1", "deployments", NS, "drift-api"), what="api"
    )
    image = original["spec"]["template"]["spec"]["containers"][0]["image"]
    password = (await wait_for(lambda: get_object(cluster.api, "v1", "secrets", NS, "drift-redis-auth")))[
        "data"
    ]

    response = await cluster.api.delete(f"{path}/drift-api")
    assert response.status == 200
    assert get_object(cluster.api, "apps/v1", "deployments", NS, "drift-api") is None
    await wait_for(
        lambda: get_object(cluster.api, "apps/v1", "deployments", NS, "drift-api"), what="restored"
    )

    edited = {"spec": {"template": {"spec": {"containers": [{"name": "api", "image": "evil/image:1"}]}}}}
    await patch(cluster, f"{path}/drift-api", edited)
    assert get_object(cluster.api, "apps/v1", "deployments", NS, "drift-api")["spec"]["template"]["spec"][
        "containers"][0]["image"] == "evil/image:1"  # fmt: skip

    def image_back() -> bool:
        dep = get_object(cluster.api, "apps/v1", "deployments", NS, "drift-api")
        return dep["spec"]["template"]["spec"]["containers"][0]["image"] == image

    await wait_for(image_back, what="hand edit reverted")

    # The Redis password Secret deleted by hand comes back with a new password only because it was lost;
    # while it exists, it is never rewritten.
    assert get_object(cluster.api, "v1", "secrets", NS, "drift-redis-auth")["data"] == password


async def test_invalid_spec_is_degraded_without_hot_loop_and_recovers(
    cluster: Cluster, operator: RunningOperator
) -> None:
    spec = cpu_spec()
    spec["tts"]["pools"][0]["modelName"] = "whisper-tiny"  # one queue cannot be both an ASR and a TTS model
    await create_license(cluster)
    await create_sd(cluster, "bad", spec)

    obj = await wait_for(
        lambda: condition(sd(cluster, "bad"), "Degraded") and sd(cluster, "bad"), what="Degraded"
    )
    degraded = condition(obj, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "SpecInvalid"
    assert degraded["message"].startswith("spec.tts.pools[0].modelName:")
    assert condition(obj, "Ready")["status"] == "False"
    assert set(stored_children(cluster.api, NS)) == {("Secret", "license")}

    # No hot loop: with a 0.5 s resync, 2 s bring at most a handful of reconciles and no status rewrite.
    writes_before = len(requests_to(cluster.api, "PATCH", "/speechdeployments/bad/status"))
    await asyncio.sleep(2)
    assert len(requests_to(cluster.api, "PATCH", "/speechdeployments/bad/status")) == writes_before
    assert len(requests_to(cluster.api, "PATCH", "/speechdeployments/bad")) < 12

    spec["tts"]["pools"][0]["modelName"] = "joe"
    await patch(cluster, f"{SD_PATH.format(namespace=NS)}/bad", {"spec": spec, "metadata": {"generation": 2}})
    await wait_for(lambda: condition(sd(cluster, "bad"), "Degraded")["status"] == "False", what="recovered")
    assert ("Deployment", "bad-asr-cpu") in stored_children(cluster.api, NS)
    warnings = [
        r for r in requests_to(cluster.api, "POST", "/events") if r.data.get("reason") == "SpecInvalid"
    ]
    assert warnings and warnings[0].data["type"] == "Warning"


async def test_status_reports_unschedulable_pods_then_ready(
    cluster: Cluster, operator: RunningOperator
) -> None:
    await create_license(cluster)
    await create_sd(cluster, "st", cpu_spec())
    deployment = await wait_for(lambda: get_object(cluster.api, "apps/v1", "deployments", NS, "st-asr-cpu"))
    pod_labels = deployment["spec"]["selector"]["matchLabels"]
    message = ("0/3 nodes are available: 1 node(s) had untolerated taint {nvidia.com/gpu: present}, "
               "2 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available: 3 No preemption victims.")  # fmt: skip
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "st-asr-cpu-abc", "namespace": NS, "labels": pod_labels},
        "status": {"phase": "Pending", "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}]},
    }  # fmt: skip
    response = await cluster.api.post(f"/api/v1/namespaces/{NS}/pods", json=pod)
    assert response.status == 200

    def unschedulable() -> Any:
        return (c := condition(sd(cluster, "st"), "Degraded")) and c["reason"] == "PodsUnschedulable" and c

    degraded = await wait_for(unschedulable, what="PodsUnschedulable")
    assert degraded["message"] == (
        "asr/cpu: 0/1 pods scheduled: untolerated taint nvidia.com/gpu (1 node), Insufficient nvidia.com/gpu (3 nodes)".replace(
            "(3 nodes)", "(2 nodes)"
        )
    )
    pool = next(p for p in sd(cluster, "st")["status"]["pools"] if p["task"] == "asr")
    assert pool["message"].startswith(degraded["message"])

    # Everything becomes ready: the pod is gone, workloads report ready replicas.
    await cluster.api.delete(f"/api/v1/namespaces/{NS}/pods/st-asr-cpu-abc")
    for (kind, name), obj in stored_children(cluster.api, NS).items():
        if kind in ("Deployment", "StatefulSet"):
            replicas = obj["spec"].get("replicas", 1)
            plural = "deployments" if kind == "Deployment" else "statefulsets"
            await patch(cluster, f"/apis/apps/v1/namespaces/{NS}/{plural}/{name}/status",
                        {"status": {"replicas": replicas, "readyReplicas": replicas, "updatedReplicas": replicas}})  # fmt: skip

    ready = await wait_for(lambda: (c := condition(sd(cluster, "st"), "Ready")) and c["status"] == "True" and c,
                           what="Ready=True")  # fmt: skip
    assert ready["reason"] == "AllComponentsReady"
    status = sd(cluster, "st")["status"]
    assert status["asrReplicas"] == "1/1" and status["ttsReplicas"] == "1/1"
    for type_ in ("ASRReady", "TTSReady", "LicenseValid", "ModelsReady"):
        assert condition(sd(cluster, "st"), type_)["status"] == "True", type_
    assert condition(sd(cluster, "st"), "Progressing")["status"] == "False"
    # kopf posts Events from a queue, a moment after the handler.
    await wait_for(lambda: any(r.data.get("reason") == "AllComponentsReady" and r.data.get("type") == "Normal"
                               for r in requests_to(cluster.api, "POST", "/events")), what="Ready event")  # fmt: skip


@pytest.mark.monitoring
async def test_service_monitor_created_when_the_crd_exists(
    cluster: Cluster, operator: RunningOperator
) -> None:
    spec = cpu_spec(monitoring={"serviceMonitor": {"enabled": True}})
    await create_sd(cluster, "mon", spec)
    await wait_for(lambda: ("ServiceMonitor", "mon-workers") in stored_children(cluster.api, NS)
                   or any(k == "ServiceMonitor" for k, _ in stored_children(cluster.api, NS)),
                   what="ServiceMonitor")  # fmt: skip


async def test_service_monitor_skipped_without_the_crd(cluster: Cluster, operator: RunningOperator) -> None:
    spec = cpu_spec(monitoring={"serviceMonitor": {"enabled": True}})
    await create_license(cluster)
    await create_sd(cluster, "nomon", spec)
    await wait_for(lambda: sd(cluster, "nomon") and condition(sd(cluster, "nomon"), "Ready"), what="status")
    kinds = {k for k, _ in stored_children(cluster.api, NS)}
    assert "Deployment" in kinds and "ServiceMonitor" not in kinds
    assert condition(sd(cluster, "nomon"), "Degraded")["status"] == "False"


async def test_liveness_endpoint_answers(operator: RunningOperator) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{operator.settings.liveness_port}/healthz")
    assert response.status_code == 200
    assert "reconciler" in response.text


def test_sd_resource_matches_crd_names() -> None:
    assert SD_RESOURCE == "kubespeech.io/v1alpha1/speechdeployments"


async def test_queue_depth_is_read_from_the_stacks_redis(
    cluster: Cluster, operator: RunningOperator, redis_server: RedisServer
) -> None:
    redis_server.flush()
    spec = cpu_spec(redis={"mode": "external", "external": {"url": redis_server.url}})
    await create_license(cluster)
    await create_sd(cluster, "q", spec)
    await wait_for(lambda: condition(sd(cluster, "q"), "Ready"), what="status")
    assert not [k for k, _ in stored_children(cluster.api, NS) if k == "StatefulSet"]  # no embedded Redis

    client = Redis.from_url(redis_server.url)
    try:
        jobs = JobClient(client)
        for _ in range(3):
            await jobs.submit("whisper-tiny", {"kind": "noop"}, b"x")
        await jobs.submit("joe", {"kind": "noop"}, b"y")

        def depths() -> Any:
            status = sd(cluster, "q")["status"]
            pools = {p["modelName"]: p["queueDepth"] for p in status["pools"]}
            return pools == {"whisper-tiny": 3, "joe": 1} and status["queueDepth"] == 4

        await wait_for(depths, what="queue depths in the status")
    finally:
        await client.aclose()


async def test_queue_depth_unknown_when_redis_is_unreachable(
    cluster: Cluster, operator: RunningOperator
) -> None:
    spec = cpu_spec(redis={"mode": "external", "external": {"url": f"redis://127.0.0.1:{free_port()}/0"}})
    await create_license(cluster)
    await create_sd(cluster, "noq", spec)
    obj = await wait_for(
        lambda: (o := sd(cluster, "noq")) and o.get("status", {}).get("pools") and o, what="status"
    )
    assert obj["status"]["queueDepth"] == 0
    assert all(
        "queue depth unknown" in p["message"] or "pods ready" in p["message"] for p in obj["status"]["pools"]
    )


async def test_autoscaled_pool_replicas_belong_to_the_autoscaler(
    cluster: Cluster, operator: RunningOperator
) -> None:
    spec = cpu_spec()
    spec["asr"]["pools"][0]["autoscaling"] = {"enabled": True, "minReplicas": 1, "maxReplicas": 5}
    await create_license(cluster)
    await create_sd(cluster, "auto", spec)
    path = f"/apis/apps/v1/namespaces/{NS}/deployments"
    await wait_for(lambda: get_object(cluster.api, "apps/v1", "deployments", NS, "auto-asr-cpu"), what="pool")
    await patch(cluster, f"{path}/auto-asr-cpu", {"spec": {"replicas": 4}})  # what the autoscaler does
    await patch(cluster, f"{path}/auto-tts-cpu", {"spec": {"replicas": 4}})  # a hand edit of a fixed pool
    await wait_for(
        lambda: (
            get_object(cluster.api, "apps/v1", "deployments", NS, "auto-tts-cpu")["spec"]["replicas"] == 1
        ),
        what="fixed pool restored",
    )
    await asyncio.sleep(1.0)  # two more resync ticks
    assert get_object(cluster.api, "apps/v1", "deployments", NS, "auto-asr-cpu")["spec"]["replicas"] == 4
    await wait_for(
        lambda: sd(cluster, "auto")["status"]["asrReplicas"] == "0/4", what="desired from the live object"
    )
