"""Pools scaled by KEDA or a HorizontalPodAutoscaler: what the builders render for autoscaling.mode keda and
hpa, that KEDA's trigger reads exactly the operator autoscaler's count on a real Redis, and that the KEDA
manifests have the shape KEDA's CRDs require.

kubernetes-validate ships only built-in Kubernetes schemas (the HPA is validated by test_render_golden.py,
and dry-run applied to a real API server here), so the ScaledObject and TriggerAuthentication are checked
against the fields of KEDA's own CRDs (scaledobjects.keda.sh / triggerauthentications.keda.sh v1alpha1, from
KEDA's Helm chart), written out by hand: required fields, types, no field KEDA does not define, and the
checks of KEDA's admission webhook.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml
from redis.asyncio import Redis

from kubespeech.config import QueueSettings
from kubespeech.jobs import GROUP, JobClient, JobConsumer, Keys, Result, queue_depth
from kubespeech_operator.builders import CHILD_KINDS, build_children
from kubespeech_operator.spec import FALLBACK_AFTER_FAILED_POLLS, SpecError, parse_spec
from tests.conftest import RedisServer
from tests.envtest import ApiServer, api_path, ensure_namespace

ROOT = Path(__file__).resolve().parents[2]
INPUT = Path(__file__).parent / "data" / "keda-and-hpa-pools.yaml"
PASSWORD = "s3cr3t-password-value"


def _load(path: Path = INPUT) -> tuple[str, str, dict[str, Any]]:
    (doc,) = [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "SpeechDeployment"]
    return doc["metadata"]["name"], doc["metadata"].get("namespace", "default"), doc["spec"]


def _children(raw: dict[str, Any] | None = None, **kwargs: Any) -> list[dict[str, Any]]:
    name, namespace, spec = _load()
    return build_children(name, namespace, parse_spec(raw if raw is not None else spec), **kwargs)


def _one(children: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    (found,) = [c for c in children if c["kind"] == kind and (name is None or c["metadata"]["name"] == name)]
    return found


def _of_kind(children: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [c for c in children if c["kind"] == kind]


def _raw() -> dict[str, Any]:
    return copy.deepcopy(_load()[2])


# --- the model ------------------------------------------------------------------------------------------


def test_new_fields_and_defaults() -> None:
    _, _, raw = _load(ROOT / "examples" / "cpu.yaml")
    scaling = parse_spec(raw).asr.pools[0].autoscaling
    assert scaling.mode == "operator"
    assert scaling.polling_interval_seconds == 2
    assert scaling.fallback_replicas is None and scaling.cold_start_wait_seconds is None
    keda = parse_spec(_raw()).asr.pools[0]
    assert (keda.autoscaling.mode, keda.autoscaling.fallback_replicas) == ("keda", 2)
    assert keda.termination_grace_period_seconds == 300


@pytest.mark.parametrize(
    ("autoscaling", "field_path"),
    [
        ({"mode": "hpa", "minReplicas": 0}, "spec.asr.pools[0].autoscaling.minReplicas"),
        ({"maxReplicas": 3, "fallbackReplicas": 4}, "spec.asr.pools[0].autoscaling.fallbackReplicas"),
        ({"pollingIntervalSeconds": 0}, "spec.asr.pools[0].autoscaling.pollingIntervalSeconds"),
        ({"mode": "keda", "minReplicas": 2, "idleReplicas": 1}, "spec.asr.pools[0].autoscaling.idleReplicas"),
    ],
)
def test_invalid_autoscaling_names_its_field(autoscaling: dict[str, Any], field_path: str) -> None:
    raw = _raw()
    raw["asr"]["pools"][0]["autoscaling"] = {"enabled": True, **autoscaling}
    with pytest.raises(SpecError) as info:
        parse_spec(raw)
    assert info.value.field_path == field_path


@pytest.mark.parametrize(
    "autoscaling",
    [
        {"mode": "hpa", "minReplicas": 1},
        {"mode": "keda", "minReplicas": 0, "idleReplicas": 0},
        {"mode": "keda", "minReplicas": 3, "idleReplicas": 3},
        {"mode": "keda", "minReplicas": 3, "idleReplicas": 0, "fallbackReplicas": 0},
        {"mode": "operator", "minReplicas": 3, "idleReplicas": 1, "maxReplicas": 4, "fallbackReplicas": 4},
    ],
)
def test_valid_autoscaling_is_accepted(autoscaling: dict[str, Any]) -> None:
    raw = _raw()
    raw["asr"]["pools"][0]["autoscaling"] = {"enabled": True, **autoscaling}
    parse_spec(raw)


# --- what is rendered -------------------------------------------------------------------------------------


def test_child_kinds_include_the_autoscaling_kinds() -> None:
    kinds = {(api_version, kind): plural for api_version, kind, plural in CHILD_KINDS}
    assert kinds[("keda.sh/v1alpha1", "ScaledObject")] == "scaledobjects"
    assert kinds[("keda.sh/v1alpha1", "TriggerAuthentication")] == "triggerauthentications"
    assert kinds[("autoscaling/v2", "HorizontalPodAutoscaler")] == "horizontalpodautoscalers"
    order = [kind for _, kind, _ in CHILD_KINDS]
    # A ScaledObject references its TriggerAuthentication and its Deployment: those are applied first.
    assert order.index("Deployment") < order.index("TriggerAuthentication") < order.index("ScaledObject")


def test_scaled_object_targets_the_pool_and_reads_its_stream() -> None:
    children = _children(redis_password=PASSWORD)
    scaled = _one(children, "ScaledObject")
    deployment = _one(children, "Deployment", "scaled-asr-gpu")
    target = scaled["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        deployment["kind"],
        deployment["metadata"]["name"],
    )
    assert scaled["metadata"]["name"] == deployment["metadata"]["name"]
    assert scaled["spec"] | {"triggers": None, "advanced": None} == {
        "scaleTargetRef": target,
        "pollingInterval": 2,
        "cooldownPeriod": 120,
        "minReplicaCount": 1,
        "maxReplicaCount": 6,
        "idleReplicaCount": 0,
        "fallback": {"failureThreshold": FALLBACK_AFTER_FAILED_POLLS, "replicas": 2},
        "triggers": None,
        "advanced": None,
    }
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis-streams"
    assert trigger["metricType"] == "AverageValue"
    assert trigger["metadata"] == {
        # KEDA's operator runs in its own namespace: the Service name carries the stack's namespace.
        "address": "scaled-redis.speech.svc:6379",
        "databaseIndex": "0",
        "stream": Keys("speech").queue("parakeet-tdt"),
        "streamLength": "8",
        "activationLagCount": "1",  # activationQueueDepth 2: KEDA activates above 1
    }
    # With a consumer group the scaler reads XPENDING (0 while no worker runs) instead of XLEN.
    assert "consumerGroup" not in trigger["metadata"] and GROUP not in trigger["metadata"].values()


def test_scaled_object_behavior_is_the_pools_scale_up_and_down() -> None:
    scaled = _one(_children(), "ScaledObject")
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior == {
        "scaleUp": {
            "stabilizationWindowSeconds": 0,
            "policies": [{"type": "Pods", "value": 2, "periodSeconds": 30}],
        },
        "scaleDown": {
            "stabilizationWindowSeconds": 300,
            "selectPolicy": "Max",
            "policies": [{"type": "Percent", "value": 50, "periodSeconds": 60}],
        },
    }


def test_keda_reads_the_password_from_the_secret_only() -> None:
    children = _children(redis_password=PASSWORD)
    auth = _one(children, "TriggerAuthentication")
    secret = _one(children, "Secret")
    assert auth["spec"] == {
        "secretTargetRef": [{"parameter": "password", "name": secret["metadata"]["name"], "key": "password"}]
    }
    (trigger,) = _one(children, "ScaledObject")["spec"]["triggers"]
    assert trigger["authenticationRef"] == {"name": auth["metadata"]["name"]}
    for child in (auth, _one(children, "ScaledObject")):
        text = yaml.safe_dump(child)
        assert PASSWORD not in text and "passwordFromEnv" not in text
        assert "password" not in trigger["metadata"]


def test_hpa_scales_the_pool_on_the_queue_metric() -> None:
    children = _children()
    hpa = _one(children, "HorizontalPodAutoscaler")
    deployment = _one(children, "Deployment", "scaled-tts-piper")
    assert hpa["metadata"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"] == {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "scaled-tts-piper"},
        "minReplicas": 1,
        "maxReplicas": 5,
        "metrics": [
            {
                "type": "External",
                "external": {
                    "metric": {
                        "name": "kubespeech_queue_jobs",
                        "selector": {"matchLabels": {"model": "piper"}},
                    },
                    "target": {"type": "AverageValue", "averageValue": "10"},
                },
            }
        ],
        "behavior": {"scaleDown": {"stabilizationWindowSeconds": 120}},
    }


def test_pool_deployments_start_at_min_replicas_and_keep_their_grace_period() -> None:
    children = _children()
    keda = _one(children, "Deployment", "scaled-asr-gpu")
    hpa = _one(children, "Deployment", "scaled-tts-piper")
    assert keda["spec"]["replicas"] == 1 and hpa["spec"]["replicas"] == 1
    assert keda["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 300
    assert hpa["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 90  # the default


def test_one_autoscaler_per_pool_and_only_in_its_mode() -> None:
    raw = _raw()
    raw["asr"]["pools"][0]["autoscaling"]["enabled"] = False
    raw["tts"]["pools"][0]["autoscaling"]["mode"] = "operator"
    kinds = {c["kind"] for c in _children(raw, redis_password=PASSWORD)}
    assert not kinds & {"ScaledObject", "TriggerAuthentication", "HorizontalPodAutoscaler"}
    raw = _raw()
    raw["asr"]["pools"].append({**raw["asr"]["pools"][0], "name": "spot"})
    children = _children(raw, redis_password=PASSWORD)
    assert sorted(c["metadata"]["name"] for c in _of_kind(children, "ScaledObject")) == [
        "scaled-asr-gpu",
        "scaled-asr-spot",
    ]
    assert len(_of_kind(children, "TriggerAuthentication")) == 1, "one per stack, shared"


def test_keda_idle_and_fallback_follow_keda_semantics() -> None:
    raw = _raw()
    scaling = raw["asr"]["pools"][0]["autoscaling"]
    scaling.update(minReplicas=0, idleReplicas=0, fallbackReplicas=0)
    spec = _one(_children(raw), "ScaledObject")["spec"]
    # Idle equal to min is plain minReplicaCount (KEDA wants idle < min); a fallback of 0 is none: KEDA then
    # keeps the current count while Redis cannot be read, as the operator's autoscaler does.
    assert "idleReplicaCount" not in spec and "fallback" not in spec
    assert spec["minReplicaCount"] == 0
    del scaling["scaleUp"], scaling["scaleDown"]
    assert "advanced" not in _one(_children(raw), "ScaledObject")["spec"]


def test_external_redis_connection_and_auth() -> None:
    raw = _raw()
    raw["redis"] = {
        "mode": "external",
        "external": {
            "url": "rediss://cache.example.com:6380/3",
            "passwordSecretRef": {"name": "redis-creds", "key": "pw"},
            "tls": {"enabled": True, "insecureSkipVerify": True},
        },
    }
    children = _children(raw)
    (trigger,) = _one(children, "ScaledObject")["spec"]["triggers"]
    assert {k: v for k, v in trigger["metadata"].items() if k not in ("stream", "streamLength")} == {
        "address": "cache.example.com:6380",
        "databaseIndex": "3",
        "enableTLS": "true",
        "unsafeSsl": "true",
        "activationLagCount": "1",
    }
    assert trigger["metadata"]["stream"] == "ks:q:parakeet-tdt"  # keyPrefix dropped with redis: the default
    auth = _one(children, "TriggerAuthentication")
    assert auth["spec"]["secretTargetRef"] == [{"parameter": "password", "name": "redis-creds", "key": "pw"}]
    policies = {c["metadata"]["name"] for c in _of_kind(children, "NetworkPolicy")}
    assert "scaled-redis" not in policies, "no NetworkPolicy for a Redis the stack does not run"

    raw["redis"]["external"] = {"url": "redis://[fd00::5]/0"}
    children = _children(raw)
    (trigger,) = _one(children, "ScaledObject")["spec"]["triggers"]
    assert trigger["metadata"]["address"] == "[fd00::5]:6379"
    assert "enableTLS" not in trigger["metadata"]
    # No AUTH: nothing to authenticate with, so no TriggerAuthentication and no reference to one.
    assert not _of_kind(children, "TriggerAuthentication") and "authenticationRef" not in trigger


def _dry_run(client: httpx.Client, manifest: dict[str, Any], plural: str) -> httpx.Response:
    meta = manifest["metadata"]
    return client.patch(
        api_path(manifest["apiVersion"], plural, meta["namespace"], meta["name"]),
        content=yaml.safe_dump(manifest),
        params={
            "fieldManager": "keda-hpa-test",
            "force": "true",
            "fieldValidation": "Strict",
            "dryRun": "All",
        },
        headers={"Content-Type": "application/apply-patch+yaml"},
    )


def test_hpa_is_admitted_by_a_real_api_server(apiserver: ApiServer) -> None:
    """Beyond the schema (test_render_golden.py): the server's own validation of metric, selector, behavior."""
    hpa = copy.deepcopy(_one(_children(), "HorizontalPodAutoscaler"))
    hpa["metadata"]["namespace"] = "keda-hpa-render"
    with apiserver.client() as client:
        ensure_namespace(client, "keda-hpa-render")
        response = _dry_run(client, hpa, "horizontalpodautoscalers")
        assert response.status_code in (200, 201), response.text
        assert response.json()["spec"]["metrics"] == hpa["spec"]["metrics"]
        # Why mode hpa needs minReplicas >= 1: without the HPAScaleToZero feature gate the server refuses 0.
        hpa["spec"]["minReplicas"] = 0
        refused = _dry_run(client, hpa, "horizontalpodautoscalers")
        assert refused.status_code == 422 and "minReplicas" in refused.text, refused.text


# --- KEDA's CRDs, by hand -----------------------------------------------------------------------------------


def _obj(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    # additionalProperties false: the API server's strict field validation refuses unknown fields.
    return {
        "type": "object",
        "properties": properties,
        "required": required or [],
        "additionalProperties": False,
    }


_INT = {"type": "integer"}
_STR = {"type": "string"}
_SCALING_RULES = _obj(
    {
        "policies": {
            "type": "array",
            "items": _obj(
                {"periodSeconds": _INT, "type": _STR, "value": _INT}, ["periodSeconds", "type", "value"]
            ),
        },
        "selectPolicy": _STR,
        "stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
    }
)
_METADATA = _obj(
    {
        "name": _STR,
        "namespace": _STR,
        "labels": {"type": "object", "additionalProperties": _STR},
        "annotations": {"type": "object", "additionalProperties": _STR},
        "ownerReferences": {"type": "array"},
    },
    ["name"],
)
SCALED_OBJECT = _obj(
    {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": _METADATA,
        "spec": _obj(
            {
                "advanced": _obj(
                    {
                        "horizontalPodAutoscalerConfig": _obj(
                            {
                                "behavior": _obj({"scaleDown": _SCALING_RULES, "scaleUp": _SCALING_RULES}),
                                "name": _STR,
                            }
                        ),
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                    }
                ),
                "cooldownPeriod": _INT,
                "fallback": _obj(
                    {"failureThreshold": _INT, "replicas": _INT}, ["failureThreshold", "replicas"]
                ),
                "idleReplicaCount": _INT,
                "initialCooldownPeriod": _INT,
                "maxReplicaCount": _INT,
                "minReplicaCount": _INT,
                "pollingInterval": _INT,
                "scaleTargetRef": _obj(
                    {"apiVersion": _STR, "envSourceContainerName": _STR, "kind": _STR, "name": _STR}, ["name"]
                ),
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": _obj(
                        {
                            "authenticationRef": _obj({"kind": _STR, "name": _STR}, ["name"]),
                            # Trigger metadata is a map of strings: a number here is refused.
                            "metadata": {"type": "object", "additionalProperties": _STR},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "name": _STR,
                            "type": _STR,
                            "useCachedMetrics": {"type": "boolean"},
                        },
                        ["metadata", "type"],
                    ),
                },
            },
            ["scaleTargetRef", "triggers"],
        ),
    },
    ["apiVersion", "kind", "metadata", "spec"],
)
TRIGGER_AUTHENTICATION = _obj(
    {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "TriggerAuthentication"},
        "metadata": _METADATA,
        # Only secretTargetRef of the CRD's many sources is used (and so allowed) here.
        "spec": _obj(
            {
                "secretTargetRef": {
                    "type": "array",
                    "items": _obj(
                        {"parameter": _STR, "name": _STR, "key": _STR}, ["parameter", "name", "key"]
                    ),
                }
            },
            ["secretTargetRef"],
        ),
    },
    ["apiVersion", "kind", "metadata", "spec"],
)
# Parameters KEDA's redis-streams scaler reads from trigger metadata (pkg/scalers/redis_streams_scaler.go and
# its address parser); anything else is ignored by KEDA, so a misspelt one would silently change nothing.
REDIS_STREAMS_PARAMETERS = {
    "address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv", "usernameFromEnv",
    "passwordFromEnv", "stream", "consumerGroup", "pendingEntriesCount", "streamLength", "lagCount",
    "activationLagCount", "databaseIndex", "enableTLS", "unsafeSsl",
}  # fmt: skip
SCHEMAS = {"ScaledObject": SCALED_OBJECT, "TriggerAuthentication": TRIGGER_AUTHENTICATION}


def _keda_problems(manifest: dict[str, Any]) -> list[str]:
    problems = [
        f"{error.json_path}: {error.message}"
        for error in jsonschema.Draft7Validator(SCHEMAS[manifest["kind"]]).iter_errors(manifest)
    ]
    if manifest["kind"] != "ScaledObject" or problems:
        return problems
    spec = manifest["spec"]
    # What KEDA's admission webhook checks beyond the schema.
    if spec.get("minReplicaCount", 0) > spec.get("maxReplicaCount", 100):
        problems.append("minReplicaCount above maxReplicaCount")
    if "idleReplicaCount" in spec and not spec["idleReplicaCount"] < spec.get("minReplicaCount", 0):
        problems.append("idleReplicaCount must be below minReplicaCount")
    for trigger in spec["triggers"]:
        if "fallback" in spec and trigger.get("metricType", "AverageValue") != "AverageValue":
            problems.append("fallback needs AverageValue triggers")
        if trigger["type"] == "redis-streams":
            problems += [
                f"unknown redis-streams parameter {key}"
                for key in set(trigger["metadata"]) - REDIS_STREAMS_PARAMETERS
            ]
    return problems


def _keda_manifests() -> list[dict[str, Any]]:
    inputs = sorted((ROOT / "examples").glob("*.yaml")) + sorted(
        (Path(__file__).parent / "data").glob("*.yaml")
    )
    manifests = []
    for path in inputs:
        name, namespace, raw = _load(path)
        children = build_children(name, namespace, parse_spec(raw), redis_password=PASSWORD)
        manifests += [c for c in children if c["apiVersion"] == "keda.sh/v1alpha1"]
    return manifests


def test_keda_manifests_have_the_crd_shape() -> None:
    manifests = _keda_manifests()
    assert {m["kind"] for m in manifests} == {"ScaledObject", "TriggerAuthentication"}
    assert {m["metadata"]["name"]: _keda_problems(m) for m in manifests} == {
        m["metadata"]["name"]: [] for m in manifests
    }


@pytest.mark.parametrize(
    ("mutate", "problem"),
    [
        (lambda m: m["spec"].pop("scaleTargetRef"), "'scaleTargetRef' is a required property"),
        (lambda m: m["spec"]["triggers"][0]["metadata"].update(streamLength=8), "8 is not of type 'string'"),
        (lambda m: m["spec"]["triggers"][0]["metadata"].update(activationStreamLength="1"), "unknown"),
        (lambda m: m["spec"].update(idleReplicaCount=1), "idleReplicaCount must be below minReplicaCount"),
        (lambda m: m["spec"]["fallback"].pop("replicas"), "'replicas' is a required property"),
        (lambda m: m["spec"].update(pollingIntervalSeconds=2), "Additional properties are not allowed"),
    ],
)
def test_keda_shape_check_can_fail(mutate: Any, problem: str) -> None:
    manifest = copy.deepcopy(_one(_children(), "ScaledObject"))
    mutate(manifest)
    assert any(problem in found for found in _keda_problems(manifest)), _keda_problems(manifest)


# --- the trigger's count on a real Redis ------------------------------------------------------------------


async def test_keda_trigger_reads_waiting_plus_in_flight_on_real_redis(
    redis_client: Redis, redis_server: RedisServer
) -> None:
    """XLEN of the stream the ScaledObject names is the operator autoscaler's count at every step of a job's
    life; XPENDING (pendingEntriesCount) and the group lag (lagCount) each miss part of it."""
    spec = parse_spec(_load()[2])
    (trigger,) = _one(_children(), "ScaledObject")["spec"]["triggers"]
    stream = trigger["metadata"]["stream"]
    model, prefix = spec.asr.pools[0].queue_name, spec.redis.key_prefix
    settings = QueueSettings(max_length=50, visibility_timeout_s=30, max_deliveries=1, result_ttl_s=30)
    client = JobClient(redis_client, settings, prefix)
    worker = JobConsumer(redis_client, model, "w1", settings, prefix)

    async def counts() -> tuple[int, int, int]:
        depth = await queue_depth(redis_client, Keys(prefix), model)
        pending = int((await redis_client.xpending(stream, GROUP))["pending"])
        return int(await redis_client.xlen(stream)), depth.total, pending

    for n in range(5):
        await client.submit(model, {"n": n}, b"audio")
    # No worker yet: the pending count KEDA's pendingEntriesCount mode reads is 0, and would never wake it.
    assert await counts() == (5, 5, 0)
    assert int(trigger["metadata"]["activationLagCount"]) < 5, "this depth activates the pool"

    jobs = await worker.read_batch(max_batch=2, max_wait_ms=0, block_ms=100)
    assert len(jobs) == 2
    assert await counts() == (5, 5, 2)
    if int(redis_server.version.split(".")[0]) >= 7:
        (group,) = await redis_client.xinfo_groups(stream)
        assert group["lag"] == 3, "the group lag (lagCount mode) leaves out the 2 jobs in flight"

    await worker.publish([(jobs[0], Result(header={"ok": True}))])
    assert await counts() == (4, 4, 1)
    await worker.dead_letter(jobs[1], "failed")
    assert await counts() == (3, 3, 0)
    rest = await worker.read_batch(max_batch=10, max_wait_ms=0, block_ms=100)
    await worker.publish([(job, Result(header={})) for job in rest])
    assert await counts() == (0, 0, 0)
