"""Pools scaled by KEDA or a HorizontalPodAutoscaler (``autoscaling.mode`` keda or hpa) instead of the operator.

**keda** renders, per pool, a ``keda.sh/v1alpha1`` ScaledObject on the pool's Deployment, and once per stack
a TriggerAuthentication that hands KEDA the Redis password from its Secret (``secretTargetRef``; the
password never appears in a manifest). The trigger measures what the operator's own autoscaler measures,
the model queue's waiting + in-flight jobs::

    type: redis-streams
    metricType: AverageValue
    metadata:
      address: <name>-redis.<namespace>.svc:6379    # embedded; host:port of redis.external.url otherwise
      databaseIndex: "0"                             # the URL's database when external
      stream: <keyPrefix>:q:<modelName>              # kubespeech.jobs.Keys(prefix).queue(model)
      streamLength: "<targetQueueDepthPerReplica>"
      activationLagCount: "<max(1, activationQueueDepth) - 1>"
      enableTLS: "true"                              # only for a rediss:// URL (+ unsafeSsl: "true")
    authenticationRef: {name: <name>-keda-redis}     # secretTargetRef parameter "password"

With ``streamLength`` and no ``consumerGroup`` KEDA's redis-streams scaler reads ``XLEN``. The job protocol
(``kubespeech.jobs.protocol``) XACKs *and* XDELs every entry once its result is published, so ``XLEN`` is
exactly waiting + in flight, on Redis 6.2 as on 7; it is the sum ``queue_depth()`` returns. The scaler's
other modes do not fit: ``pendingEntriesCount`` (``XPENDING``) counts only delivered, unacknowledged
entries, 0 while no worker exists, so a pool at zero would never wake; ``lagCount`` (group lag, Redis 7+)
counts only undelivered entries, so in-flight jobs would not hold their replicas, and Redis reports the lag
as unknown once an undelivered entry is deleted (the API abandons jobs that way); two triggers (lag and
pending) would be scaled on the larger of the two, not their sum. The consumer group
(``kubespeech.jobs.GROUP``) is therefore deliberately left out: setting it switches the scaler to
``XPENDING``. KEDA activates the pool (from zero or ``idleReplicaCount`` 0) when ``XLEN`` exceeds
``activationLagCount``, which current KEDA applies to every mode of this scaler. ``fallbackReplicas``
becomes ``fallback`` after :data:`~kubespeech_operator.spec.FALLBACK_AFTER_FAILED_POLLS` failed reads;
without it (or with 0) KEDA keeps the current count while Redis cannot be read. The embedded Redis's
NetworkPolicy admits KEDA's operator pods (label ``app: keda-operator``, any namespace) when a pool uses KEDA.

**hpa** renders an ``autoscaling/v2`` HorizontalPodAutoscaler on the External metric
``kubespeech_queue_jobs`` with selector ``{model: <modelName>}`` and an ``AverageValue`` target of
``targetQueueDepthPerReplica`` (so desired = ceil(jobs / target), as in the other modes). Kubernetes does not
serve that metric itself: a metrics adapter (e.g. prometheus-adapter) must expose it on
``external.metrics.k8s.io`` from the workers'/operator's Prometheus metrics (waiting + in-flight jobs per
model). An HPA cannot scale to zero, so mode hpa requires ``minReplicas >= 1`` (a CEL rule and the model).

In both modes ``scaleUp`` / ``scaleDown`` become the HPA's ``behavior``, and the pool Deployment's
``replicas`` belongs to KEDA / the HPA once they act: the operator sets it only when it creates the
Deployment (``minReplicas``) and leaves it out of later applies, as for any autoscaled pool.
"""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import urlsplit

from kubespeech.jobs import Keys
from kubespeech_operator.builders.common import (
    REDIS_PORT,
    Context,
    Manifest,
    metadata,
    redis_password_secret,
)
from kubespeech_operator.builders.pools import worker_component
from kubespeech_operator.spec import (
    FALLBACK_AFTER_FAILED_POLLS,
    PoolSpec,
    ScalingRules,
    SpeechDeploymentSpec,
)

KEDA_API_VERSION = "keda.sh/v1alpha1"
QUEUE_METRIC = "kubespeech_queue_jobs"
"""External metric of hpa mode: waiting + in-flight jobs of one model queue, labelled ``model``."""
QUEUE_METRIC_MODEL_LABEL = "model"
KEDA_OPERATOR_POD_LABELS = {"app": "keda-operator"}
"""Pod labels of KEDA's operator (its release manifests and Helm chart): the pods that run the scalers."""
AUTOSCALING_COMPONENT = "autoscaling"


def pools_in_mode(
    spec: SpeechDeploymentSpec, mode: Literal["operator", "keda", "hpa"]
) -> list[tuple[str, PoolSpec]]:
    """Autoscaled pools (``autoscaling.enabled``) whose replicas ``mode`` decides, in spec order."""
    return [
        (task, pool)
        for task, pool in spec.pools()
        if pool.autoscaling.enabled and pool.autoscaling.mode == mode
    ]


def keda_trigger_authentication_name(ctx: Context) -> str:
    return f"{ctx.name}-keda-redis"


def _behavior(scale_up: ScalingRules | None, scale_down: ScalingRules | None) -> dict[str, Any]:
    """The pool's scaleUp / scaleDown as an HPA ``behavior`` (same field names, HPA defaults for the rest)."""
    behavior: dict[str, Any] = {}
    for key, rules in (("scaleUp", scale_up), ("scaleDown", scale_down)):
        if rules is not None:
            behavior[key] = rules.model_dump(by_alias=True, exclude_none=True)
    return behavior


def _scale_target(ctx: Context, task: str, pool: PoolSpec) -> dict[str, str]:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "name": ctx.pool_name(task, pool)}


def _pool_metadata(ctx: Context, task: str, pool: PoolSpec) -> dict[str, Any]:
    return metadata(ctx, ctx.pool_name(task, pool), worker_component(task), pool=pool.name, task=task)


def redis_trigger_connection(ctx: Context) -> dict[str, str]:
    """The redis-streams trigger's connection metadata: where KEDA's operator (in its own namespace) finds
    the stack's Redis."""
    redis = ctx.spec.redis
    if redis.mode == "embedded":
        # KEDA resolves names from its own namespace: the Service needs its namespace in the name.
        return {"address": f"{ctx.redis_name}.{ctx.namespace}.svc:{REDIS_PORT}", "databaseIndex": "0"}
    assert redis.external is not None  # guaranteed by the model's validator
    url = urlsplit(redis.external.url)
    host = url.hostname or ""
    address = f"[{host}]" if ":" in host else host
    database = url.path.strip("/") or "0"
    connection = {"address": f"{address}:{url.port or REDIS_PORT}", "databaseIndex": database}
    if url.scheme == "rediss":
        connection["enableTLS"] = "true"
        if redis.external.tls is not None and redis.external.tls.insecure_skip_verify:
            connection["unsafeSsl"] = "true"
    return connection


def build_keda_trigger_authentication(ctx: Context) -> Manifest | None:
    """KEDA's access to the Redis password: a reference to the Secret, never its value (None without AUTH)."""
    secret = redis_password_secret(ctx)
    if secret is None or not pools_in_mode(ctx.spec, "keda"):
        return None
    name, key = secret
    return {
        "apiVersion": KEDA_API_VERSION,
        "kind": "TriggerAuthentication",
        "metadata": metadata(ctx, keda_trigger_authentication_name(ctx), AUTOSCALING_COMPONENT),
        "spec": {"secretTargetRef": [{"parameter": "password", "name": name, "key": key}]},
    }


def build_scaled_object(ctx: Context, task: str, pool: PoolSpec) -> Manifest:
    """A KEDA ScaledObject sizing one pool on its queue's XLEN (waiting + in-flight jobs)."""
    scaling = pool.autoscaling
    trigger: dict[str, Any] = {
        "type": "redis-streams",
        "name": "queue-jobs",
        # AverageValue: desired = ceil(XLEN / streamLength); also what KEDA's fallback requires.
        "metricType": "AverageValue",
        "metadata": {
            **redis_trigger_connection(ctx),
            "stream": Keys(ctx.spec.redis.key_prefix).queue(pool.queue_name),
            "streamLength": str(scaling.target_queue_depth_per_replica),
            # KEDA activates above this value; ours at max(1, activationQueueDepth): one less says the same.
            "activationLagCount": str(max(scaling.activation_queue_depth, 1) - 1),
        },
    }
    if redis_password_secret(ctx) is not None:
        trigger["authenticationRef"] = {"name": keda_trigger_authentication_name(ctx)}
    spec: dict[str, Any] = {
        "scaleTargetRef": _scale_target(ctx, task, pool),
        "pollingInterval": scaling.polling_interval_seconds,
        "cooldownPeriod": scaling.cooldown_seconds,
        "minReplicaCount": scaling.min_replicas,
        "maxReplicaCount": scaling.max_replicas,
    }
    # KEDA wants idleReplicaCount below minReplicaCount, and supports only 0 (the model refuses others).
    if scaling.idle_replicas == 0 and scaling.min_replicas > 0:
        spec["idleReplicaCount"] = 0
    # KEDA reads a fallback of 0 as none; without one it keeps the current count, as the operator does.
    if scaling.fallback_replicas:
        spec["fallback"] = {
            "failureThreshold": FALLBACK_AFTER_FAILED_POLLS,
            "replicas": scaling.fallback_replicas,
        }
    behavior = _behavior(scaling.scale_up, scaling.scale_down)
    if behavior:
        spec["advanced"] = {"horizontalPodAutoscalerConfig": {"behavior": behavior}}
    spec["triggers"] = [trigger]
    return {
        "apiVersion": KEDA_API_VERSION,
        "kind": "ScaledObject",
        "metadata": _pool_metadata(ctx, task, pool),
        "spec": spec,
    }


def build_horizontal_pod_autoscaler(ctx: Context, task: str, pool: PoolSpec) -> Manifest:
    """An HPA sizing one pool on the external metric kubespeech_queue_jobs{model=<queue>} (needs an adapter)."""
    scaling = pool.autoscaling
    spec: dict[str, Any] = {
        "scaleTargetRef": _scale_target(ctx, task, pool),
        "minReplicas": scaling.min_replicas,
        "maxReplicas": scaling.max_replicas,
        "metrics": [
            {
                "type": "External",
                "external": {
                    "metric": {
                        "name": QUEUE_METRIC,
                        "selector": {"matchLabels": {QUEUE_METRIC_MODEL_LABEL: pool.queue_name}},
                    },
                    "target": {
                        "type": "AverageValue",
                        "averageValue": str(scaling.target_queue_depth_per_replica),
                    },
                },
            }
        ],
    }
    behavior = _behavior(scaling.scale_up, scaling.scale_down)
    if behavior:
        spec["behavior"] = behavior
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _pool_metadata(ctx, task, pool),
        "spec": spec,
    }


def build_autoscalers(ctx: Context) -> list[Manifest | None]:
    """Every ScaledObject and HPA of the stack, and the TriggerAuthentication the ScaledObjects share."""
    return [
        build_keda_trigger_authentication(ctx),
        *(build_scaled_object(ctx, task, pool) for task, pool in pools_in_mode(ctx.spec, "keda")),
        *(build_horizontal_pod_autoscaler(ctx, task, pool) for task, pool in pools_in_mode(ctx.spec, "hpa")),
    ]
