"""Pure builders: a SpeechDeployment spec in, every child manifest (plain dicts) out, in apply order.

Nothing here talks to Kubernetes; the operator applies what :func:`build_children` returns and
``kubespeech render`` prints it, so the golden tests cover exactly what reaches a cluster.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubespeech_operator.builders.api import (
    build_api_deployment,
    build_api_service,
    build_config_map,
    build_ingress,
    models_file_entries,
)
from kubespeech_operator.builders.autoscaling import build_autoscalers
from kubespeech_operator.builders.common import (
    INPUT_HASH_ANNOTATION,
    Context,
    Manifest,
    redis_secret_name,
    with_input_hash,
)
from kubespeech_operator.builders.license_proxy import (
    build_license_proxy_deployment,
    build_license_proxy_service,
)
from kubespeech_operator.builders.policy import (
    build_network_policies,
    build_pdbs,
    build_service_accounts,
    build_service_monitor,
    build_worker_metrics_service,
)
from kubespeech_operator.builders.pools import (
    build_model_cache_pvc,
    build_model_fetch_job,
    build_pool_deployment,
    cached_models,
    default_replicas,
    fetch_job_name,
)
from kubespeech_operator.builders.redis import (
    build_redis_secret,
    build_redis_service,
    build_redis_statefulset,
)
from kubespeech_operator.spec import SpeechDeploymentSpec, validate_name

__all__ = [
    "CHILD_KINDS",
    "INPUT_HASH_ANNOTATION",
    "Manifest",
    "build_children",
    "default_replicas",
    "fetch_job_names",
    "models_file_entries",
    "pool_key",
    "pool_queue_names",
    "redis_secret_name",
]

# Every kind build_children can return, as (apiVersion, kind, plural), in apply order: what the operator
# must be allowed to create, patch and watch. The KEDA kinds after the Deployments they scale, the
# TriggerAuthentication before the ScaledObjects that reference it; ServiceMonitor and the KEDA kinds only
# where their CRDs are installed.
CHILD_KINDS: list[tuple[str, str, str]] = [
    ("v1", "ServiceAccount", "serviceaccounts"),
    ("v1", "Secret", "secrets"),
    ("v1", "ConfigMap", "configmaps"),
    ("v1", "PersistentVolumeClaim", "persistentvolumeclaims"),
    ("batch/v1", "Job", "jobs"),
    ("v1", "Service", "services"),
    ("apps/v1", "StatefulSet", "statefulsets"),
    ("apps/v1", "Deployment", "deployments"),
    ("autoscaling/v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers"),
    ("keda.sh/v1alpha1", "TriggerAuthentication", "triggerauthentications"),
    ("keda.sh/v1alpha1", "ScaledObject", "scaledobjects"),
    ("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets"),
    ("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies"),
    ("networking.k8s.io/v1", "Ingress", "ingresses"),
    ("monitoring.coreos.com/v1", "ServiceMonitor", "servicemonitors"),
]
_KIND_ORDER = {(api_version, kind): index for index, (api_version, kind, _) in enumerate(CHILD_KINDS)}


def pool_key(task: str, pool_name: str) -> str:
    """How pools are named across tasks (an ASR and a TTS pool may share a name): ``asr/l4``."""
    return f"{task}/{pool_name}"


def pool_queue_names(spec: SpeechDeploymentSpec) -> dict[str, str]:
    """Each pool (``asr/<pool>``, ``tts/<pool>``) mapped to the model queue it serves."""
    return {pool_key(task, pool.name): pool.queue_name for task, pool in spec.pools()}


def fetch_job_names(name: str, namespace: str, spec: SpeechDeploymentSpec) -> dict[str, str]:
    """Each model-fetch Job's name mapped to the model source it downloads (for the ModelsReady condition)."""
    ctx = Context(name=name, namespace=namespace, spec=spec)
    return {fetch_job_name(ctx, model): model.source for model in cached_models(ctx)}


def build_children(
    name: str,
    namespace: str,
    spec: SpeechDeploymentSpec,
    *,
    owner: dict[str, Any] | None = None,
    redis_password: str | None = None,
    replicas: Mapping[str, int] | None = None,
    operator_namespace: str | None = None,
) -> list[Manifest]:
    """Every child of one SpeechDeployment, in apply order (by CHILD_KINDS, then by name).

    ``owner`` ({apiVersion, kind, name, uid}) adds a controller ownerReference; ``redis_password`` adds the
    embedded Redis Secret (the operator generates it once and passes it on every reconcile; without it the
    Secret is left out and the StatefulSet still references it); ``replicas`` maps ``asr/<pool>`` to the
    autoscaler's replica count (pools not in it get ``replicas``, or ``autoscaling.minReplicas``);
    ``operator_namespace``: where the operator runs (its pods may read the embedded Redis; any namespace
    when None).
    Raises SpecError for a name that would make child names invalid.
    """
    validate_name(name)
    ctx = Context(
        name=name, namespace=namespace, spec=spec, owner=owner, operator_namespace=operator_namespace
    )
    models = cached_models(ctx)
    children: list[Manifest | None] = [
        *build_service_accounts(ctx, model_fetch=bool(models)),
        build_config_map(ctx),
        build_model_cache_pvc(ctx),
        *(build_model_fetch_job(ctx, model) for model in models),
        build_api_service(ctx),
        build_license_proxy_service(ctx),
        build_api_deployment(ctx),
        build_license_proxy_deployment(ctx),
        *(
            build_pool_deployment(ctx, task, pool, (replicas or {}).get(pool_key(task, pool.name)))
            for task, pool in spec.pools()
        ),
        *build_autoscalers(ctx),
        *build_pdbs(ctx),
        *build_network_policies(ctx),
        build_ingress(ctx),
    ]
    if spec.redis.mode == "embedded":
        if redis_password is not None:
            children.append(build_redis_secret(ctx, redis_password))
        children += [build_redis_service(ctx), build_redis_statefulset(ctx)]
    if spec.monitoring.service_monitor.enabled:
        children += [build_worker_metrics_service(ctx), build_service_monitor(ctx)]
    present = [child for child in children if child is not None]
    present.sort(
        key=lambda child: (_KIND_ORDER[(child["apiVersion"], child["kind"])], child["metadata"]["name"])
    )
    return [with_input_hash(child) for child in present]
