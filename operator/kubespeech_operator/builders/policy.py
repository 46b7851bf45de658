"""Identity and protection: ServiceAccounts, PodDisruptionBudgets, NetworkPolicies and the ServiceMonitor."""

from __future__ import annotations

from typing import Any

from kubespeech_operator.builders.autoscaling import KEDA_OPERATOR_POD_LABELS, pools_in_mode
from kubespeech_operator.builders.common import (
    API_PORT,
    LICENSE_PROXY_PORT,
    OPERATOR_POD_LABEL,
    REDIS_PORT,
    WORKER_HEALTH_PORT,
    Context,
    Manifest,
    metadata,
    selector_labels,
    stack_selector,
)
from kubespeech_operator.builders.pools import WORKER_LABEL, worker_component
from kubespeech_operator.spec import PoolSpec

WORKER_METRICS_COMPONENT = "worker-metrics"


def build_service_accounts(ctx: Context, *, model_fetch: bool) -> list[Manifest]:
    """One ServiceAccount per component, without API tokens: data-plane pods never call the Kubernetes API.

    Separate accounts let an admin bind cloud identities narrowly (e.g. s3:// read access for model-fetch only).
    """
    accounts = [
        (ctx.api_name, "api"),
        (ctx.license_proxy_name, "license-proxy"),
        (ctx.worker_service_account, "worker"),
    ]
    if ctx.spec.redis.mode == "embedded":
        accounts.append((ctx.redis_name, "redis"))
    if model_fetch:
        accounts.append((ctx.model_fetch_service_account, "model-fetch"))
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": metadata(ctx, name, component),
            "automountServiceAccountToken": False,
        }
        for name, component in accounts
    ]


def _pdb(
    ctx: Context,
    name: str,
    component: str,
    match: dict[str, str],
    pool: str | None = None,
    task: str | None = None,
) -> Manifest:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(ctx, name, component, pool=pool, task=task),
        "spec": {
            "maxUnavailable": ctx.spec.pod_disruption_budgets.max_unavailable,
            "selector": {"matchLabels": match},
            # A pod that never became ready (e.g. stuck loading a model) must not block node drains.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def build_pdbs(ctx: Context) -> list[Manifest]:
    if not ctx.spec.pod_disruption_budgets.enabled:
        return []
    pdbs = [
        _pdb(ctx, ctx.api_name, "api", selector_labels(ctx, "api")),
        _pdb(ctx, ctx.license_proxy_name, "license-proxy", selector_labels(ctx, "license-proxy")),
    ]
    for task, pool in ctx.spec.pools():
        pdbs.append(build_pool_pdb(ctx, task, pool))
    return pdbs


def build_pool_pdb(ctx: Context, task: str, pool: PoolSpec) -> Manifest:
    component = worker_component(task)
    return _pdb(
        ctx, ctx.pool_name(task, pool), component, selector_labels(ctx, component, pool.name), pool.name, task
    )


def _port(number: int) -> dict[str, Any]:
    return {"protocol": "TCP", "port": number}


def _network_policy(
    ctx: Context, name: str, component: str, pod_selector: dict[str, Any], ingress: list[dict[str, Any]]
) -> Manifest:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(ctx, name, component),
        "spec": {"podSelector": pod_selector, "policyTypes": ["Ingress"], "ingress": ingress},
    }


def _operator_peer(ctx: Context) -> dict[str, Any]:
    """The operator's pods: labelled by the chart, in the operator's namespace when it is known."""
    namespaces: dict[str, Any] = {}
    if ctx.operator_namespace:
        namespaces = {"matchLabels": {"kubernetes.io/metadata.name": ctx.operator_namespace}}
    return {"namespaceSelector": namespaces, "podSelector": {"matchLabels": {OPERATOR_POD_LABEL: "true"}}}


def build_network_policies(ctx: Context) -> list[Manifest]:
    """Only the API is reachable from outside the stack; Redis and the license proxy only from its pods
    (and Redis from the operator's, which reads queue depths there).

    The first policy isolates every pod of the stack (ingress denied unless another policy allows it);
    the others open exactly one port each. Egress is left alone (the license proxy calls its upstream,
    the fetch Jobs download models).
    """
    if not ctx.spec.network_policy.enabled:
        return []
    from_stack = [{"podSelector": {"matchLabels": stack_selector(ctx)}}]
    policies = [
        _network_policy(
            ctx, f"{ctx.name}-default-deny", "network-policy", {"matchLabels": stack_selector(ctx)}, []
        ),
        _network_policy(
            ctx,
            ctx.api_name,
            "api",
            {"matchLabels": selector_labels(ctx, "api")},
            [{"ports": [_port(API_PORT)]}],
        ),
        _network_policy(
            ctx,
            ctx.license_proxy_name,
            "license-proxy",
            {"matchLabels": selector_labels(ctx, "license-proxy")},
            [{"from": from_stack, "ports": [_port(LICENSE_PROXY_PORT)]}],
        ),
        # Workers listen only for health and metrics: open for kubelet probes and Prometheus anywhere.
        _network_policy(
            ctx,
            f"{ctx.name}-workers",
            "worker",
            {
                "matchLabels": stack_selector(ctx),
                "matchExpressions": [
                    {
                        "key": "app.kubernetes.io/component",
                        "operator": "In",
                        "values": [worker_component("asr"), worker_component("tts")],
                    }
                ],
            },
            [{"ports": [_port(WORKER_HEALTH_PORT)]}],
        ),
    ]
    if ctx.spec.redis.mode == "embedded":
        policies.append(
            _network_policy(
                ctx,
                ctx.redis_name,
                "redis",
                {"matchLabels": selector_labels(ctx, "redis")},
                [
                    {"from": from_stack, "ports": [_port(REDIS_PORT)]},
                    # The operator reads queue depths (for the status and the autoscaler) from here.
                    {"from": [_operator_peer(ctx)], "ports": [_port(REDIS_PORT)]},
                    *_keda_rules(ctx),
                ],
            )
        )
    return policies


def _keda_rules(ctx: Context) -> list[dict[str, Any]]:
    """KEDA's scalers run in its operator's pods, in a namespace the stack does not know: any namespace,
    selected by the label KEDA's manifests and chart give them (Redis still asks them for the password)."""
    if not pools_in_mode(ctx.spec, "keda"):
        return []
    peer = {"namespaceSelector": {}, "podSelector": {"matchLabels": dict(KEDA_OPERATOR_POD_LABELS)}}
    return [{"from": [peer], "ports": [_port(REDIS_PORT)]}]


def build_worker_metrics_service(ctx: Context) -> Manifest:
    """A headless Service over every worker pod, so that a ServiceMonitor can find their /metrics."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(ctx, f"{ctx.name}-workers", WORKER_METRICS_COMPONENT),
        "spec": {
            "clusterIP": "None",
            "selector": {**stack_selector(ctx), WORKER_LABEL: "true"},
            "ports": [
                {"name": "health", "port": WORKER_HEALTH_PORT, "targetPort": "health", "protocol": "TCP"}
            ],
        },
    }


def build_service_monitor(ctx: Context) -> Manifest:
    """Scrapes the API server and every worker (applied only when the monitoring.coreos.com CRD exists)."""
    monitor = ctx.spec.monitoring.service_monitor
    meta = metadata(ctx, ctx.name, "monitoring")
    meta["labels"].update(monitor.labels or {})
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": meta,
        "spec": {
            "selector": {
                "matchLabels": stack_selector(ctx),
                "matchExpressions": [
                    {
                        "key": "app.kubernetes.io/component",
                        "operator": "In",
                        "values": ["api", WORKER_METRICS_COMPONENT],
                    }
                ],
            },
            "namespaceSelector": {"matchNames": [ctx.namespace]},
            "endpoints": [
                {"port": "http", "path": "/metrics", "interval": monitor.interval},
                {"port": "health", "path": "/metrics", "interval": monitor.interval},
            ],
        },
    }
