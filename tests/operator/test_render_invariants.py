"""Properties every set of children must have, checked across all examples and edge cases (beyond golden
equality): labels, owner references, input hashes, pod security, secrets never inline, GPU requests,
scheduling fields, network isolation, and the models file the API reads.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubespeech_operator.builders import (
    CHILD_KINDS,
    INPUT_HASH_ANNOTATION,
    build_children,
    fetch_job_names,
    pool_queue_names,
)
from kubespeech_operator.spec import SpecError, SpeechDeploymentSpec, parse_spec

ROOT = Path(__file__).resolve().parents[2]
INPUTS = sorted((ROOT / "examples").glob("*.yaml")) + sorted((Path(__file__).parent / "data").glob("*.yaml"))
OWNER = {"apiVersion": "kubespeech.io/v1alpha1", "kind": "SpeechDeployment", "name": "x", "uid": "0000-1111"}
PASSWORD = "s3cr3t-password-value"


def load(path: Path) -> tuple[str, str, dict[str, Any]]:
    (doc,) = [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "SpeechDeployment"]
    return doc["metadata"]["name"], doc["metadata"].get("namespace", "default"), doc["spec"]


def children_of(path: Path, **kwargs: Any) -> tuple[SpeechDeploymentSpec, list[dict[str, Any]]]:
    name, namespace, raw = load(path)
    spec = parse_spec(raw)
    return spec, build_children(name, namespace, spec, owner=OWNER, redis_password=PASSWORD, **kwargs)


def pod_specs(children: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{c['kind']}/{c['metadata']['name']}", c["spec"]["template"]["spec"])
        for c in children
        if c["kind"] in ("Deployment", "StatefulSet", "Job")
    ]


@pytest.fixture(params=INPUTS, ids=lambda p: p.stem)
def case(request: pytest.FixtureRequest) -> tuple[SpeechDeploymentSpec, list[dict[str, Any]]]:
    return children_of(request.param)


def test_labels_owner_and_hash(case: tuple[SpeechDeploymentSpec, list[dict[str, Any]]]) -> None:
    _, children = case
    kinds = [(c["apiVersion"], c["kind"]) for c in children]
    order = [(api_version, kind) for api_version, kind, _ in CHILD_KINDS]
    assert all(kind in order for kind in kinds), "every child kind is in CHILD_KINDS"
    assert [order.index(k) for k in kinds] == sorted(order.index(k) for k in kinds), "apply order"
    names = [(c["kind"], c["metadata"]["name"]) for c in children]
    assert len(names) == len(set(names))
    for child in children:
        meta = child["metadata"]
        labels = meta["labels"]
        assert labels["app.kubernetes.io/part-of"] == "kubespeech"
        assert labels["app.kubernetes.io/managed-by"] == "kubespeech-operator"
        assert {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component"} <= set(
            labels
        )
        assert meta["ownerReferences"] == [{**OWNER, "controller": True, "blockOwnerDeletion": True}]
        assert len(meta["annotations"][INPUT_HASH_ANNOTATION]) == 32
        assert len(meta["name"]) <= 63


def test_pods_are_locked_down(case: tuple[SpeechDeploymentSpec, list[dict[str, Any]]]) -> None:
    spec, children = case
    for where, pod in pod_specs(children):
        assert pod["automountServiceAccountToken"] is False, where
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        mounts_tmp = False
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is spec.security_context.read_only_root_filesystem, where
            assert not container["image"].endswith(":latest"), where
            mounts_tmp = any(m["mountPath"] == "/tmp" for m in container.get("volumeMounts", []))
        assert mounts_tmp, f"{where}: a read-only root needs a writable /tmp"
    accounts = [c for c in children if c["kind"] == "ServiceAccount"]
    assert accounts and all(a["automountServiceAccountToken"] is False for a in accounts)
    used = {pod["serviceAccountName"] for _, pod in pod_specs(children)}
    assert used <= {a["metadata"]["name"] for a in accounts}


def test_no_secret_values_outside_secrets(case: tuple[SpeechDeploymentSpec, list[dict[str, Any]]]) -> None:
    _, children = case
    for child in children:
        if child["kind"] == "Secret":
            continue
        text = json.dumps(child)
        assert PASSWORD not in text, f"{child['kind']}/{child['metadata']['name']}"
    for where, pod in pod_specs(children):
        for container in pod["containers"]:
            for variable in container.get("env", []):
                assert "PASSWORD" not in variable["name"] or variable["name"].endswith("_FILE"), where
                assert not variable["name"].endswith(("_KEY", "_TOKEN")) or "valueFrom" in variable, where


def test_redis_secret_only_with_a_password() -> None:
    name, namespace, raw = load(ROOT / "examples" / "cpu.yaml")
    spec = parse_spec(raw)
    with_password = build_children(name, namespace, spec, redis_password=PASSWORD)
    secrets = [c for c in with_password if c["kind"] == "Secret"]
    assert len(secrets) == 1 and secrets[0]["metadata"]["name"] == f"{name}-redis-auth"
    assert "ownerReferences" not in secrets[0]["metadata"], "no owner given, none set"
    assert not [c for c in build_children(name, namespace, spec) if c["kind"] == "Secret"]
    external = parse_spec({**raw, "redis": {"mode": "external", "external": {"url": "redis://r:6379/0"}}})
    kinds = {c["kind"] for c in build_children(name, namespace, external, redis_password=PASSWORD)}
    assert "Secret" not in kinds and "StatefulSet" not in kinds


def test_worker_pods_follow_the_pool(case: tuple[SpeechDeploymentSpec, list[dict[str, Any]]]) -> None:
    spec, children = case
    deployments = {c["metadata"]["name"]: c for c in children if c["kind"] == "Deployment"}
    name = children[0]["metadata"]["labels"]["app.kubernetes.io/instance"]
    for task, pool in spec.pools():
        deployment = deployments[f"{name}-{task}-{pool.name}"]
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = {v["name"]: v.get("value") for v in container["env"]}
        assert container["command"] == ["kubespeech", "worker", "--task", task]
        assert env["KUBESPEECH_WORKER_MODEL"] == pool.queue_name
        assert env["KUBESPEECH_WORKER_TASK"] == task
        if pool.gpu_count:
            assert pool.gpu is not None
            resource = pool.gpu.resource_name
            assert container["resources"]["requests"][resource] == pool.gpu.count
            assert container["resources"]["limits"][resource] == pool.gpu.count
        else:
            assert not any("gpu" in key for key in container["resources"].get("limits", {}))
        assert pod.get("nodeSelector") == pool.node_selector
        assert len(pod.get("tolerations", [])) == len(pool.tolerations or [])
        assert pod.get("runtimeClassName") == pool.runtime_class_name
        assert pod.get("priorityClassName") == pool.priority_class_name
        assert pod["terminationGracePeriodSeconds"] == pool.termination_grace_period_seconds
        assert float(env["KUBESPEECH_WORKER_DRAIN_TIMEOUT_S"]) < pool.termination_grace_period_seconds
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= pool.startup_timeout_seconds
        assert container["ports"] == [{"name": "health", "containerPort": 9090, "protocol": "TCP"}]
        assert "preStop" in container["lifecycle"]


def test_autoscalers_follow_the_pools(case: tuple[SpeechDeploymentSpec, list[dict[str, Any]]]) -> None:
    """One ScaledObject per keda pool and one HPA per hpa pool, each on its pool's Deployment; none otherwise."""
    spec, children = case
    name = children[0]["metadata"]["labels"]["app.kubernetes.io/instance"]
    deployments = {c["metadata"]["name"] for c in children if c["kind"] == "Deployment"}
    for kind, mode in (("ScaledObject", "keda"), ("HorizontalPodAutoscaler", "hpa")):
        scalers = {c["metadata"]["name"]: c for c in children if c["kind"] == kind}
        pools = {
            f"{name}-{task}-{pool.name}": pool
            for task, pool in spec.pools()
            if pool.autoscaling.enabled and pool.autoscaling.mode == mode
        }
        assert set(scalers) == set(pools)
        for scaler_name, scaler in scalers.items():
            target = scaler["spec"]["scaleTargetRef"]
            assert (target["apiVersion"], target["kind"], target["name"]) == (
                "apps/v1",
                "Deployment",
                scaler_name,
            )
            assert scaler_name in deployments
            bounds = (
                ("minReplicaCount", "maxReplicaCount") if mode == "keda" else ("minReplicas", "maxReplicas")
            )
            scaling = pools[scaler_name].autoscaling
            assert [scaler["spec"][key] for key in bounds] == [scaling.min_replicas, scaling.max_replicas]
    auths = [c for c in children if c["kind"] == "TriggerAuthentication"]
    assert len(auths) <= 1
    for auth in auths:
        for ref in auth["spec"]["secretTargetRef"]:
            # KEDA reads the password from a Secret: only a reference is rendered, never a value.
            assert set(ref) == {"parameter", "name", "key"}


def test_network_policies_expose_only_the_api(
    case: tuple[SpeechDeploymentSpec, list[dict[str, Any]]],
) -> None:
    spec, children = case
    policies = [c for c in children if c["kind"] == "NetworkPolicy"]
    if not spec.network_policy.enabled:
        assert policies == []
        return
    open_ports = set()
    for policy in policies:
        for rule in policy["spec"]["ingress"]:
            if "from" not in rule:
                open_ports |= {port["port"] for port in rule["ports"]}
    # From anywhere: the API, and the workers' health/metrics port (probes, Prometheus).
    assert open_ports == {7100, 9090}
    by_name = {p["metadata"]["name"]: p for p in policies}
    name = children[0]["metadata"]["labels"]["app.kubernetes.io/instance"]
    from_stack = [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "kubespeech",
                                                   "app.kubernetes.io/instance": name}}}]  # fmt: skip
    (rule,) = by_name[f"{name}-license-proxy"]["spec"]["ingress"]
    assert rule["from"] == from_stack
    if spec.redis.mode == "embedded":
        # Redis: the stack's pods, the operator's (it reads queue depths), labelled by the chart, and KEDA's
        # operator when a pool is scaled by KEDA (its scaler reads the stream length).
        stack_rule, operator_rule, *keda_rules = by_name[f"{name}-redis"]["spec"]["ingress"]
        assert stack_rule["from"] == from_stack
        assert operator_rule["from"] == [
            {"namespaceSelector": {}, "podSelector": {"matchLabels": {"kubespeech.io/operator": "true"}}}
        ]
        keda = any(p.autoscaling.enabled and p.autoscaling.mode == "keda" for _, p in spec.pools())
        assert [rule["from"] for rule in keda_rules] == (
            [[{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "keda-operator"}}}]]
            if keda
            else []
        )
        for rule in [operator_rule, *keda_rules]:
            assert rule["ports"] == stack_rule["ports"] == [{"port": 6379, "protocol": "TCP"}]


def test_redis_policy_admits_operator_pods_from_its_namespace_only_when_known() -> None:
    spec = parse_spec({"license": {"secretRef": {"name": "l", "key": "k"}},
                       "api": {"apiKeysSecretRef": {"name": "a", "key": "k"}},
                       "asr": {"pools": [{"name": "cpu", "engine": "whisper"}]}})  # fmt: skip
    children = build_children("s", "speech", spec, redis_password="x", operator_namespace="kubespeech-system")
    (policy,) = [c for c in children if c["kind"] == "NetworkPolicy" and c["metadata"]["name"] == "s-redis"]
    peer = policy["spec"]["ingress"][1]["from"][0]
    assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "kubespeech-system"}}


def test_models_file_lists_each_queue_once(case: tuple[SpeechDeploymentSpec, list[dict[str, Any]]]) -> None:
    spec, children = case
    (config,) = [c for c in children if c["kind"] == "ConfigMap"]
    entries = json.loads(config["data"]["models.json"])
    assert sorted(e["name"] for e in entries) == sorted(set(pool_queue_names(spec).values()))
    for task in ("asr", "tts"):
        of_task = [e for e in entries if e["task"] == task]
        assert not of_task or sum(e["default"] for e in of_task) == 1
    for entry in entries:
        assert {"name", "task", "default", "aliases", "voices"} <= set(entry) <= {
            "name", "task", "default", "aliases", "voices", "cold_start_wait_s"}  # fmt: skip


def test_input_hash_tracks_inputs_only() -> None:
    path = ROOT / "examples" / "multi-pool.yaml"
    name, namespace, raw = load(path)
    first = build_children(name, namespace, parse_spec(raw), owner=OWNER)
    again = build_children(name, namespace, parse_spec(copy.deepcopy(raw)), owner=OWNER)
    assert first == again
    changed = copy.deepcopy(raw)
    changed["asr"]["pools"][1]["batching"]["maxBatchSize"] = 4
    rebuilt = build_children(name, namespace, parse_spec(changed), owner=OWNER)
    after = {(c["kind"], c["metadata"]["name"]): c for c in rebuilt}

    def digest(child: dict[str, Any]) -> str:
        return str(child["metadata"]["annotations"][INPUT_HASH_ANNOTATION])

    differing = {
        (c["kind"], c["metadata"]["name"])
        for c in first
        if digest(c) != digest(after[(c["kind"], c["metadata"]["name"])])
    }
    assert differing == {("Deployment", f"{name}-asr-spot")}


def test_autoscaler_replicas_override() -> None:
    name, namespace, raw = load(ROOT / "examples" / "multi-pool.yaml")
    spec = parse_spec(raw)
    default = {
        c["metadata"]["name"]: c for c in build_children(name, namespace, spec) if c["kind"] == "Deployment"
    }
    assert default[f"{name}-asr-l4"]["spec"]["replicas"] == 1  # autoscaling.minReplicas
    assert default[f"{name}-asr-spot"]["spec"]["replicas"] == 0
    scaled = build_children(name, namespace, spec, replicas={"asr/spot": 5})
    replicas = {c["metadata"]["name"]: c["spec"]["replicas"] for c in scaled if c["kind"] == "Deployment"}
    assert replicas[f"{name}-asr-spot"] == 5 and replicas[f"{name}-asr-l4"] == 1


def test_shared_model_is_fetched_once() -> None:
    name, namespace, raw = load(ROOT / "examples" / "multi-pool.yaml")
    spec = parse_spec(raw)
    assert pool_queue_names(spec) == {"asr/l4": "parakeet-tdt", "asr/spot": "parakeet-tdt"}
    jobs = fetch_job_names(name, namespace, spec)
    assert list(jobs.values()) == ["hf://nvidia/parakeet-tdt-0.6b-v2"]
    (job,) = [c for c in build_children(name, namespace, spec) if c["kind"] == "Job"]
    assert job["metadata"]["name"] in jobs
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][:4] == [
        "kubespeech",
        "model",
        "fetch",
        jobs[job["metadata"]["name"]],
    ]


def test_vocoder_is_fetched_next_to_its_model() -> None:
    name, namespace, raw = load(ROOT / "examples" / "single-gpu.yaml")
    spec = parse_spec(raw)
    children = build_children(name, namespace, spec)
    (tts,) = [
        c for c in children if c["metadata"]["name"] == f"{name}-tts-fastpitch" and c["kind"] == "Deployment"
    ]
    env = {v["name"]: v.get("value") for v in tts["spec"]["template"]["spec"]["containers"][0]["env"]}
    model_dir = env["KUBESPEECH_WORKER_MODEL_PATH"]
    targets = sorted(
        c["spec"]["template"]["spec"]["containers"][0]["command"][5] for c in children if c["kind"] == "Job"
    )
    assert model_dir in targets and f"{model_dir}/vocoder" in targets
    assert len(targets) == 3  # ASR model, TTS model, TTS vocoder


def test_model_source_change_makes_a_new_job() -> None:
    name, namespace, raw = load(ROOT / "examples" / "single-gpu.yaml")
    before = fetch_job_names(name, namespace, parse_spec(raw))
    changed = copy.deepcopy(raw)
    changed["asr"]["pools"][0]["model"]["source"] = "hf://nvidia/parakeet-tdt-1.1b"
    after = fetch_job_names(name, namespace, parse_spec(changed))
    assert len(before) == len(after) == 3  # ASR model, TTS model and its vocoder
    assert len(set(before) & set(after)) == 2, "only the changed model gets a new (immutable) Job"


def test_bad_name_is_a_spec_error() -> None:
    _, namespace, raw = load(ROOT / "examples" / "cpu.yaml")
    with pytest.raises(SpecError) as info:
        build_children("x" * 31, namespace, parse_spec(raw))
    assert info.value.field_path == "metadata.name"


def test_upgrading_kubespeech_does_not_restart_redis() -> None:
    name, namespace, raw = load(ROOT / "examples" / "cpu.yaml")

    def redis_pod_spec(tag: str) -> Any:
        spec = parse_spec({**raw, "images": {"tag": tag}})
        (redis,) = [c for c in build_children(name, namespace, spec) if c["kind"] == "StatefulSet"]
        return redis["spec"]

    assert redis_pod_spec("0.1.0") == redis_pod_spec("0.2.0")


def test_cold_start_wait_reaches_the_models_file() -> None:
    """coldStartWaitSeconds of autoscaled pools: per queue, the longest of the pools sharing it."""
    pools = [
        {"name": "a", "engine": "whisper", "modelName": "m",
         "autoscaling": {"enabled": True, "minReplicas": 0, "coldStartWaitSeconds": 20}},
        {"name": "b", "engine": "whisper", "modelName": "m",
         "autoscaling": {"enabled": True, "minReplicas": 0, "coldStartWaitSeconds": 45}},
        {"name": "c", "engine": "whisper", "modelName": "n"},
    ]  # fmt: skip
    spec = parse_spec({"license": {"secretRef": {"name": "l", "key": "k"}},
                       "api": {"apiKeysSecretRef": {"name": "a", "key": "k"}}, "asr": {"pools": pools}})  # fmt: skip
    (config,) = [
        c for c in build_children("s", "speech", spec, redis_password="x") if c["kind"] == "ConfigMap"
    ]
    entries = {e["name"]: e for e in json.loads(config["data"]["models.json"])}
    assert entries["m"]["cold_start_wait_s"] == 45 and "cold_start_wait_s" not in entries["n"]
