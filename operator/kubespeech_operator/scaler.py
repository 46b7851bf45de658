"""The operator's built-in queue-depth autoscaler: read each model queue's load, decide, write ``replicas``.

Every ``pollingIntervalSeconds`` (per stack: the shortest of its pools) the scaler reads, from the stack's
Redis, the jobs waiting and in flight of each model queue whose pools have ``autoscaling.mode: operator``,
hands them to :class:`~kubespeech_operator.autoscaler.ModelAutoscaler` (the pure decision: activation,
ordered overflow, cooldown, HPA-style windows and rate limits, missing data), clamps the result to the
license's ``max_worker_replicas`` / ``max_gpus``, and writes each changed pool's ``spec.replicas`` with
server-side apply under the field manager ``kubespeech-autoscaler`` — the only writer of that field while
autoscaling is on (the reconciler's own apply leaves it out). Before a pool shrinks, its pods get a
``controller.kubernetes.io/pod-deletion-cost`` from each worker's in-flight count, so the ReplicaSet
removes idle workers first; the workers themselves drain on SIGTERM. Each decision that changes replicas
posts an Event and asks for a status refresh; what the scaler knows per pool is merged into the status.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from kubespeech_operator import metrics
from kubespeech_operator.autoscaler import (
    LicenseLimits,
    Load,
    ModelAutoscaler,
    PoolDecision,
    PoolPolicy,
    ScalingBehavior,
    ScalingPolicyRule,
    clamp_to_license,
    default_scale_down,
    default_scale_up,
)
from kubespeech_operator.builders.common import Context
from kubespeech_operator.kube import ApiError, KubeClient, Resource
from kubespeech_operator.queues import QueueDepthReader
from kubespeech_operator.spec import PoolSpec, ScalingRules, SpecError, SpeechDeploymentSpec, parse_spec

logger = logging.getLogger(__name__)

DEPLOYMENTS = Resource("apps/v1", "deployments")
PODS = Resource("v1", "pods")
AUTOSCALER_MANAGER = "kubespeech-autoscaler"
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"


def _behavior(rules: ScalingRules | None, default: ScalingBehavior) -> ScalingBehavior:
    if rules is None:
        return default
    return ScalingBehavior(
        stabilization_window_seconds=(
            rules.stabilization_window_seconds
            if rules.stabilization_window_seconds is not None
            else default.stabilization_window_seconds
        ),
        select_policy=rules.select_policy or default.select_policy,
        policies=(
            tuple(ScalingPolicyRule(p.type, p.value, p.period_seconds) for p in rules.policies)
            if rules.policies
            else default.policies
        ),
    )


def pool_policy(task: str, pool: PoolSpec) -> PoolPolicy:
    """The decision inputs of one pool, from its spec."""
    scaling = pool.autoscaling
    return PoolPolicy(
        key=f"{task}/{pool.name}",
        min_replicas=scaling.min_replicas,
        max_replicas=scaling.max_replicas,
        idle_replicas=scaling.idle_replicas,
        target_queue_depth_per_replica=scaling.target_queue_depth_per_replica,
        activation_queue_depth=scaling.activation_queue_depth,
        target_active_streams=scaling.target_active_streams,
        cooldown_seconds=scaling.cooldown_seconds,
        scale_up=_behavior(scaling.scale_up, default_scale_up()),
        scale_down=_behavior(scaling.scale_down, default_scale_down()),
        fallback_replicas=scaling.fallback_replicas,
        gpus_per_replica=pool.gpu_count,
    )


def operator_scaled_pools(spec: SpeechDeploymentSpec) -> list[tuple[str, PoolSpec]]:
    """Pools whose replicas the built-in autoscaler decides, in declaration order (ASR, then TTS)."""
    return [
        (task, pool)
        for task, pool in spec.pools()
        if pool.autoscaling.enabled and getattr(pool.autoscaling, "mode", "operator") == "operator"
    ]


def _rfc3339(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class PoolScaling:
    """What the autoscaler last saw and did for one pool (merged into the SpeechDeployment's status)."""

    model: str
    desired: int = 0
    waiting: int = 0
    in_flight: int = 0
    streams: int = 0
    reason: str = ""
    message: str = ""
    last_scale_time: str | None = None
    last_scale_reason: str | None = None
    cold_start_since: float | None = None
    last_cold_start_seconds: float | None = None

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "desiredReplicas": self.desired,
            "queueDepth": self.waiting,
            "inFlight": self.in_flight,
            "activeStreams": self.streams,
            "autoscalerReason": self.reason,
        }
        if self.last_scale_time:
            result["lastScaleTime"] = self.last_scale_time
            result["lastScaleReason"] = self.last_scale_reason
        if self.cold_start_since is not None:
            result["state"] = "ColdStarting"
        if self.last_cold_start_seconds is not None:
            result["lastColdStartSeconds"] = round(self.last_cold_start_seconds, 3)
        return result


@dataclass
class _Stack:
    generation: Any
    spec: SpeechDeploymentSpec
    policies: list[PoolPolicy]
    deployments: dict[str, str]  # pool key → Deployment name
    models: dict[str, ModelAutoscaler]
    pools: dict[str, PoolScaling]
    replicas: dict[str, int] = field(default_factory=dict)  # what the autoscaler last wrote (or saw)
    next_due: float = 0.0
    interval_s: float = 2.0
    missing_note: str | None = None
    license_note: str | None = None
    exported_models: set[str] = field(default_factory=set)


class Scaler:
    """Runs the decision for every SpeechDeployment with operator-scaled pools; one per operator."""

    def __init__(
        self,
        kube: KubeClient,
        queues: QueueDepthReader,
        *,
        live: Callable[[str, str], Mapping[str, Mapping[str, Any]]],
        redis_password: Callable[[str, str], str | None],
        on_scaled: Callable[[Mapping[str, Any], list[PoolDecision]], Awaitable[None]],
        probe_timeout_s: float = 0.5,
    ) -> None:
        self.kube = kube
        self.queues = queues
        self._live = live  # (namespace, name) → Deployment name → live object, from the last reconcile
        self._redis_password = redis_password
        self._on_scaled = on_scaled
        self.probe_timeout_s = probe_timeout_s
        self._stacks: dict[tuple[str, str], _Stack] = {}

    def forget(self, namespace: str, name: str) -> None:
        self._stacks.pop((namespace, name), None)

    def pool_status(self, namespace: str, name: str) -> dict[str, dict[str, Any]]:
        """Pool key (``asr/l4``) → the autoscaler's fields for the status."""
        stack = self._stacks.get((namespace, name))
        return {key: pool.status() for key, pool in stack.pools.items()} if stack else {}

    def conditions(self, namespace: str, name: str) -> tuple[str | None, str | None]:
        """(missing-data note, license-clamp note) of the stack's last decision."""
        stack = self._stacks.get((namespace, name))
        return (stack.missing_note, stack.license_note) if stack else (None, None)

    def _stack(self, body: Mapping[str, Any]) -> _Stack | None:
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace") or ""), str(meta.get("name")))
        generation = meta.get("generation")
        stack = self._stacks.get(key)
        if stack is not None and stack.generation == generation:
            return stack
        try:
            spec = parse_spec(dict(body.get("spec") or {}))
        except SpecError:
            self._stacks.pop(key, None)
            return None  # the reconciler reports it
        scaled = operator_scaled_pools(spec)
        # HPA-mode pools: the operator only exports their queue's jobs for the HPA's metrics adapter.
        hpa = [
            pool for _, pool in spec.pools() if pool.autoscaling.enabled and pool.autoscaling.mode == "hpa"
        ]
        if not scaled and not hpa:
            self._stacks.pop(key, None)
            return None
        ctx = Context(name=key[1], namespace=key[0], spec=spec)
        policies = [pool_policy(task, pool) for task, pool in scaled]
        by_model: dict[str, list[PoolPolicy]] = {}
        for (_task, pool), policy in zip(scaled, policies, strict=True):
            by_model.setdefault(pool.queue_name, []).append(policy)
        models = stack.models if stack is not None else {}
        for model, pools in by_model.items():
            if model in models:
                models[model].update_pools(pools)
            else:
                models[model] = ModelAutoscaler(model, pools)
        for model in set(models) - set(by_model):
            del models[model]
        pools_state = {
            policy.key: (stack.pools.get(policy.key) if stack else None) or PoolScaling(pool.queue_name)
            for (_task, pool), policy in zip(scaled, policies, strict=True)
        }
        fresh = _Stack(
            generation=generation,
            spec=spec,
            policies=policies,
            deployments={
                policy.key: ctx.pool_name(task, pool)
                for (task, pool), policy in zip(scaled, policies, strict=True)
            },
            models=models,
            pools=pools_state,
            replicas=dict(stack.replicas) if stack else {},
            next_due=stack.next_due if stack else 0.0,
            interval_s=float(
                min(pool.autoscaling.polling_interval_seconds for pool in [*(p for _, p in scaled), *hpa])
            ),
            exported_models={pool.queue_name for pool in hpa},
        )
        self._stacks[key] = fresh
        return fresh

    def due(self, body: Mapping[str, Any], now: float) -> bool:
        stack = self._stack(body)
        return stack is not None and now >= stack.next_due

    async def tick(self, body: Mapping[str, Any], *, now: float | None = None) -> list[PoolDecision]:
        """One poll of one stack: read, decide, write. Returns the decisions that changed replicas."""
        stack = self._stack(body)
        if stack is None:
            return []
        meta = body.get("metadata") or {}
        namespace, name = str(meta.get("namespace") or ""), str(meta.get("name"))
        clock = time.monotonic() if now is None else now
        stack.next_due = clock + stack.interval_s
        live = self._live(namespace, name)
        # Deployments not created yet: the reconciler has not run; nothing to scale.
        if any(dep not in live for dep in stack.deployments.values()) or not live:
            return []
        for key, dep in stack.deployments.items():
            if key not in stack.replicas:
                stack.replicas[key] = int((live[dep].get("spec") or {}).get("replicas") or 0)
        reading = await self.queues.read(
            name, namespace, stack.spec, embedded_password=self._redis_password(namespace, name)
        )
        for model in stack.exported_models:
            if reading.reachable:
                jobs = reading.depths.get(model, 0) + reading.in_flight.get(model, 0)
                metrics.QUEUE_JOBS.labels(namespace, name, model).set(jobs)
        decisions: list[PoolDecision] = []
        for model, autoscaler in stack.models.items():
            load = (
                Load(
                    reading.depths.get(model, 0),
                    reading.in_flight.get(model, 0),
                    reading.streams.get(model, 0),
                )
                if reading.reachable
                else None
            )
            current = {p.key: stack.replicas.get(p.key, 0) for p in autoscaler.pools}
            decisions += autoscaler.decide(clock, load, current)
            for policy in autoscaler.pools:
                pool = stack.pools[policy.key]
                if load is not None:
                    pool.waiting, pool.in_flight, pool.streams = load.waiting, load.in_flight, load.streams
        order = {p.key: i for i, p in enumerate(stack.policies)}
        decisions.sort(key=lambda d: order.get(d.key, 0))
        verdict = reading.verdict
        limits = (
            LicenseLimits(verdict.max_worker_replicas, verdict.max_gpus)
            if verdict is not None
            and (verdict.max_worker_replicas is not None or verdict.max_gpus is not None)
            else None
        )
        decisions, stack.license_note = clamp_to_license(decisions, stack.policies, limits)
        stack.missing_note = (
            None
            if reading.reachable
            else f"queue depth unavailable ({reading.note}); replicas held, never scaled to zero on missing data"
        )
        changed = [d for d in decisions if d.desired != stack.replicas.get(d.key, 0)]
        for decision in decisions:
            pool = stack.pools[decision.key]
            pool.desired, pool.reason, pool.message = decision.desired, decision.reason, decision.message
            metrics.DESIRED_REPLICAS.labels(namespace, name, decision.key).set(decision.desired)
            metrics.QUEUE_WAITING.labels(namespace, name, pool.model).set(pool.waiting)
            metrics.QUEUE_IN_FLIGHT.labels(namespace, name, pool.model).set(pool.in_flight)
            metrics.DECISIONS.labels(decision.reason).inc()
        self._track_cold_starts(stack, live, clock)
        for decision in changed:
            dep = stack.deployments[decision.key]
            if decision.desired < stack.replicas.get(decision.key, 0):
                await self._set_deletion_costs(namespace, live.get(dep) or {})
            try:
                await self._write_replicas(namespace, dep, decision.desired)
            except ApiError as exc:
                logger.warning("cannot scale %s/%s to %d: %s", namespace, dep, decision.desired, exc)
                continue
            stack.replicas[decision.key] = decision.desired
            pool = stack.pools[decision.key]
            pool.last_scale_time, pool.last_scale_reason = _rfc3339(time.time()), decision.reason
            logger.info("scaled %s/%s %s: %s", namespace, name, decision.key, decision.message)
        if changed:
            await self._on_scaled(body, changed)
        return changed

    def _track_cold_starts(self, stack: _Stack, live: Mapping[str, Mapping[str, Any]], now: float) -> None:
        """ColdStarting from the first queued job at zero replicas to the first ready worker of the model."""
        for model in stack.models:
            keys = [p.key for p in stack.models[model].pools]
            ready = sum(
                int(((live.get(stack.deployments[k]) or {}).get("status") or {}).get("readyReplicas") or 0)
                for k in keys
            )
            work = sum(stack.pools[k].waiting + stack.pools[k].in_flight for k in keys[:1])
            first = stack.pools[keys[0]]
            if first.cold_start_since is None and ready == 0 and work > 0:
                for k in keys:
                    stack.pools[k].cold_start_since = now
            elif first.cold_start_since is not None and ready == 0 and work == 0:
                # The work went away (served elsewhere, expired, drained) before a worker was ready.
                for k in keys:
                    stack.pools[k].cold_start_since = None
            elif first.cold_start_since is not None and ready > 0:
                seconds = now - first.cold_start_since
                metrics.COLD_START_SECONDS.labels(model).observe(seconds)
                for k in keys:
                    stack.pools[k].cold_start_since = None
                    stack.pools[k].last_cold_start_seconds = seconds

    async def _write_replicas(self, namespace: str, deployment: str, replicas: int) -> None:
        body = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": deployment, "namespace": namespace},
            "spec": {"replicas": replicas},
        }
        await self.kube.apply(DEPLOYMENTS, namespace, deployment, body, field_manager=AUTOSCALER_MANAGER)

    async def _set_deletion_costs(self, namespace: str, deployment: Mapping[str, Any]) -> None:
        """Busy workers cost more to delete: the ReplicaSet removes the idle ones first. Best effort."""
        selector = ((deployment.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        if not selector:
            return
        try:
            pods = await self.kube.list(
                PODS, namespace, label_selector=",".join(f"{k}={v}" for k, v in sorted(selector.items()))
            )
        except ApiError as exc:
            logger.info("cannot list pods for deletion costs: %s", exc)
            return
        async with httpx.AsyncClient(timeout=self.probe_timeout_s) as http:
            counts = await asyncio.gather(*(self._in_flight(http, pod) for pod in pods))
        for pod, count in zip(pods, counts, strict=True):
            if count is None:
                continue
            meta = pod.get("metadata") or {}
            if (meta.get("annotations") or {}).get(DELETION_COST) == str(count):
                continue
            with contextlib.suppress(ApiError):
                await self.kube.merge_patch(
                    PODS,
                    namespace,
                    str(meta.get("name")),
                    {"metadata": {"annotations": {DELETION_COST: str(count)}}},
                )

    @staticmethod
    async def _in_flight(http: httpx.AsyncClient, pod: Mapping[str, Any]) -> int | None:
        ip = (pod.get("status") or {}).get("podIP")
        ports = [
            port.get("containerPort")
            for container in (pod.get("spec") or {}).get("containers") or []
            for port in container.get("ports") or []
            if port.get("name") == "health"
        ]
        if not ip or not ports:
            return None
        try:
            response = await http.get(f"http://{ip}:{ports[0]}/inflight")
            value = response.json().get("in_flight")
            return int(value) if isinstance(value, int | float) and math.isfinite(value) else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None


def decisions_message(decisions: Sequence[PoolDecision]) -> str:
    return "; ".join(f"{d.key}: {d.current} → {d.desired} ({d.reason}: {d.message})" for d in decisions)
