"""Least privilege, proven on an RBAC-enforcing kube-apiserver: the operator runs with a real token of the
chart's ServiceAccount under the chart's own (Cluster)Roles, rendered by `helm template`, through a scenario
that exercises every path (create, update, prune, Job replacement, status follow-up, ServiceMonitor, delete).
The server's audit log then says which requests it made: none may be refused, and every granted verb must
have been used, so a missing verb and an extra verb both fail."""

from __future__ import annotations

import asyncio
import copy
import itertools
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from redis.asyncio import Redis

from kubespeech.jobs import JobClient
from kubespeech.jobs.protocol import Keys
from kubespeech_operator.scaler import DELETION_COST
from tests.chart.test_chart import CHART, render
from tests.conftest import RedisServer, free_port
from tests.envtest import ApiServer, api_path, ensure_namespace
from tests.operator.conftest import operator_running, settings_for
from tests.operator.k8s import Kube, condition, cpu_spec, wait_for

_installs = itertools.count(1)
RBAC_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}


def grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) triples a list of PolicyRules grants."""
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def install_rbac(server: ApiServer, release_ns: str, docs: list[dict[str, Any]]) -> None:
    """What `helm install` creates for RBAC, applied as the cluster admin."""
    paths = {"ServiceAccount": ("v1", "serviceaccounts"), "ClusterRole": ("rbac.authorization.k8s.io/v1", "clusterroles"),
             "ClusterRoleBinding": ("rbac.authorization.k8s.io/v1", "clusterrolebindings"),
             "Role": ("rbac.authorization.k8s.io/v1", "roles"), "RoleBinding": ("rbac.authorization.k8s.io/v1", "rolebindings")}  # fmt: skip
    with server.client() as client:
        for doc in docs:
            if doc["kind"] not in RBAC_KINDS:
                continue
            api_version, plural = paths[doc["kind"]]
            namespace = doc["metadata"].get("namespace") or (
                release_ns if doc["kind"] == "ServiceAccount" else None
            )
            if namespace:
                doc["metadata"]["namespace"] = namespace
            response = client.post(api_path(api_version, plural, namespace), json=doc)
            assert response.status_code == 201, response.text


def used_requests(server: ApiServer, username: str) -> tuple[set[tuple[str, str, str]], list[str]]:
    """(apiGroup, resource[/subresource], verb) of every request ``username`` made, and those refused."""
    used: set[tuple[str, str, str]] = set()
    refused: list[str] = []
    for event in server.audit_events():
        if event.get("user", {}).get("username") != username or event.get("stage") != "ResponseComplete":
            continue
        ref = event.get("objectRef") or {}
        if not ref.get("resource"):
            continue  # discovery (/api, /apis): open to every authenticated client
        resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        triple = (ref.get("apiGroup") or "", resource, event["verb"])
        code = (event.get("responseStatus") or {}).get("code")
        if code == 403:
            refused.append(f"{triple} {event.get('requestURI')}")
        used.add(triple)
        if event["verb"] == "patch" and code == 201:
            # A server-side apply that created the object was authorized for create too.
            used.add((triple[0], triple[1], "create"))
    return used, refused


class InFlightEndpoint:
    """A worker's health port as the autoscaler reads it before a scale-down (``GET /inflight``)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.hits = 0
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> InFlightEndpoint:
        async def inflight(_: web.Request) -> web.Response:
            self.hits += 1
            return web.json_response({"in_flight": 0, "draining": False})

        app = web.Application()
        app.router.add_get("/inflight", inflight)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def scale_down_with_a_pod(kube: Kube, redis_url: str, spec: dict[str, Any]) -> None:
    """The built-in autoscaler wakes a pool on queued jobs, then scales it down when they are gone, first
    pricing its pods by their in-flight work (pods are read and annotated)."""
    prefix = f"rb{uuid.uuid4().hex[:6]}"
    spec["redis"] = {"mode": "external", "external": {"url": redis_url}, "keyPrefix": prefix}
    spec["asr"]["pools"][0]["autoscaling"] = {
        "enabled": True, "minReplicas": 0, "maxReplicas": 3, "targetQueueDepthPerReplica": 1,
        "pollingIntervalSeconds": 1, "cooldownSeconds": 1}  # fmt: skip
    await kube.update_sd("rb", spec)
    redis = Redis.from_url(redis_url)
    try:
        jobs = JobClient(redis, prefix=prefix)
        for _ in range(2):
            await jobs.submit("whisper-tiny", {"kind": "noop"}, b"x", timeout_s=60)

        async def scaled_to(n: int) -> bool:
            dep = await kube.child("Deployment", "rb-asr-cpu")
            return bool(dep) and dep["spec"].get("replicas") == n

        await wait_for(lambda: scaled_to(2), what="woken by queued jobs")
        dep = await kube.child("Deployment", "rb-asr-cpu")
        async with InFlightEndpoint() as endpoint:
            await kube.create("v1", "pods", {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "rb-asr-cpu-1", "labels": dep["spec"]["selector"]["matchLabels"]},
                "spec": {"containers": [{"name": "worker", "image": "example.com/w:1",
                                         "ports": [{"name": "health", "containerPort": endpoint.port}]}]}})  # fmt: skip
            await kube.merge_patch("v1", "pods", "rb-asr-cpu-1", {"status": {"podIP": "127.0.0.1"}},
                                   subresource="status", manager="kubelet")  # fmt: skip
            await redis.delete(Keys(prefix).queue("whisper-tiny"))
            await wait_for(lambda: scaled_to(0), timeout=30, what="scaled down once the queue is empty")

            async def priced() -> bool:
                pod = await kube.get("v1", "pods", "rb-asr-cpu-1")
                return (pod or {}).get("metadata", {}).get("annotations", {}).get(DELETION_COST) == "0"

            await wait_for(priced, what="pod-deletion-cost set from the worker's in-flight count")
            assert endpoint.hits >= 1
    finally:
        await redis.aclose()


async def scenario(kube: Kube, redis_url: str) -> None:
    """Everything the operator does for a stack, so that every permission it needs is exercised."""
    spec = cpu_spec(monitoring={"serviceMonitor": {"enabled": True}})
    spec["api"]["ingress"] = {"enabled": True, "host": "speech.example.com"}
    spec["asr"]["pools"][0]["model"] = {"source": "https://models.example.com/tiny.bin"}
    # Pools sized by KEDA and by an HPA: their ScaledObject, TriggerAuthentication and HPA are applied.
    spec["asr"]["pools"].append({"name": "kd", "engine": "whisper", "modelName": "whisper-kd",
                                 "autoscaling": {"enabled": True, "mode": "keda", "minReplicas": 0}})  # fmt: skip
    spec["tts"]["pools"].append({"name": "hp", "engine": "piper", "modelName": "joe-hp",
                                 "autoscaling": {"enabled": True, "mode": "hpa", "minReplicas": 1}})  # fmt: skip
    await kube.create_license_secret()
    await kube.create_sd("rb", spec)

    async def created() -> bool:
        kinds = {k for k, _ in await kube.children("rb")}
        return {"Deployment", "Job", "Ingress", "ServiceMonitor", "StatefulSet", "ScaledObject",
                "TriggerAuthentication", "HorizontalPodAutoscaler"} <= kinds  # fmt: skip

    await wait_for(created, what="children created")
    # A changed download replaces its Job.
    changed = copy.deepcopy(spec)
    changed["asr"]["pools"][0]["model"] = {"source": "https://models.example.com/tiny-v2.bin"}
    await kube.update_sd("rb", changed)

    async def job_replaced() -> bool:
        jobs = [o for (k, _), o in (await kube.children("rb")).items() if k == "Job"]
        return bool(jobs) and all("tiny-v2" in str(j["spec"]["template"]) for j in jobs)

    await wait_for(job_replaced, what="Job replaced")
    # Every kind is pruned once: features off, the embedded Redis replaced, a pool removed, and a ConfigMap
    # an earlier operator version created (ours by owner reference, no longer rendered).
    owner = (await kube.sd("rb"))["metadata"]
    await kube.create("v1", "configmaps", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": "rb-legacy", "labels": {"app.kubernetes.io/instance": "rb",
                                        "app.kubernetes.io/managed-by": "kubespeech-operator"},
        "ownerReferences": [{"apiVersion": "kubespeech.io/v1alpha1", "kind": "SpeechDeployment", "name": "rb",
                             "uid": owner["uid"], "controller": True}]}})  # fmt: skip
    minimal = copy.deepcopy(changed)
    minimal["api"]["ingress"] = {"enabled": False}
    minimal["monitoring"] = {"serviceMonitor": {"enabled": False}}
    minimal["networkPolicy"] = {"enabled": False}
    minimal["podDisruptionBudgets"] = {"enabled": False}
    minimal["redis"] = {"mode": "external", "external": {"url": "redis://redis.example:6379/0"}}
    minimal["asr"]["pools"] = minimal["asr"]["pools"][:1]
    minimal["asr"]["pools"][0]["model"] = {}
    minimal["tts"] = {"pools": []}
    await kube.update_sd("rb", minimal)

    async def pruned() -> bool:
        kinds = {k for k, _ in await kube.children("rb")}
        return not kinds & {"Ingress", "ServiceMonitor", "NetworkPolicy", "PodDisruptionBudget", "StatefulSet",
                            "Job", "PersistentVolumeClaim", "ScaledObject", "TriggerAuthentication",
                            "HorizontalPodAutoscaler"} and ("ConfigMap", "rb-legacy") not in await kube.children("rb")  # fmt: skip

    await wait_for(pruned, what="children pruned")
    await scale_down_with_a_pod(kube, redis_url, minimal)
    # Workloads turning ready reach the status through the watch.
    await kube.set_workloads_ready("rb")

    async def reported() -> bool:
        c = condition(await kube.sd("rb"), "ASRReady")
        return bool(c and c["status"] == "True")

    try:
        await wait_for(reported, what="ASRReady")
    except AssertionError:
        raise AssertionError(str((await kube.sd("rb"))["status"])) from None
    await asyncio.sleep(1.5)  # a few resync ticks
    await kube.delete("kubespeech.io/v1alpha1", "speechdeployments", "rb")
    await asyncio.sleep(0.5)


@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced"])
async def test_operator_needs_exactly_the_chart_rbac(
    k8s: ApiServer,
    monitoring_crd: None,
    keda_crds: None,
    redis_server: RedisServer,
    tmp_path: Path,
    mode: str,
) -> None:
    index = next(_installs)
    release_ns, stack_ns = f"ks-system-{index}", f"speech-rbac-{index}"
    with k8s.client() as client:
        ensure_namespace(client, release_ns)
        ensure_namespace(client, stack_ns)
    args = ["--namespace", release_ns, "--set", f"fullnameOverride=ks-{index}"]
    if mode == "namespaced":
        args += ["--set", f"operator.watchNamespaces={{{stack_ns}}}"]
    docs = [d for d in render(*args) if d]
    install_rbac(k8s, release_ns, docs)
    account = next(d for d in docs if d["kind"] == "ServiceAccount")["metadata"]["name"]
    token = k8s.service_account_token(release_ns, account)
    settings = settings_for(
        k8s.kubeconfig(tmp_path / "kubeconfig", token=token),
        stack_ns if mode == "namespaced" else "",
        pod_namespace=release_ns,
    )
    async with Kube.admin(k8s, stack_ns) as kube, operator_running(settings):
        await scenario(kube, redis_server.url)

    used, refused = used_requests(k8s, f"system:serviceaccount:{release_ns}:{account}")
    assert refused == [], "the operator was refused: the chart's RBAC misses these"
    granted: set[tuple[str, str, str]] = set()
    for doc in docs:
        if doc["kind"] in ("ClusterRole", "Role"):
            granted |= grants(doc["rules"])
    unused = granted - used
    assert unused == set(), f"granted but never used by the operator: {sorted(unused)}"
    print(f"{mode}: {len(used)} (group, resource, verb) used, all granted, none extra")


def test_chart_renders_rbac_from_one_rule_list() -> None:
    """Each Role of a namespaced install grants exactly the namespaced part of the cluster-wide install;
    its ClusterRole keeps only cluster-scoped reads (CRDs, and namespaces, which kopf watches then)."""
    cluster_wide = grants(next(d for d in render() if d["kind"] == "ClusterRole")["rules"])
    docs = render("-f", str(CHART / "ci" / "namespaced-values.yaml"))
    cluster_part = grants(next(d for d in docs if d["kind"] == "ClusterRole")["rules"])
    roles = [grants(d["rules"]) for d in docs if d["kind"] == "Role"]
    assert {r for r in cluster_part if r[1] != "namespaces"} <= cluster_wide
    assert {r[1] for r in cluster_part} == {"customresourcedefinitions", "namespaces"}
    assert len(roles) == 2 and all(role == cluster_wide - cluster_part for role in roles)
