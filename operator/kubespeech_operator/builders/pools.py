"""Worker pools: one Deployment per pool, and the model cache (PVC + one fetch Job per model)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from kubespeech.config import LogSettings, WorkerSettings, env_name
from kubespeech_operator.builders.common import (
    MODEL_CACHE_DIR,
    WORKER_HEALTH_PORT,
    Context,
    Manifest,
    container_security_context,
    dns_fragment,
    env,
    label_value,
    metadata,
    pod_spec_base,
    pool_image,
    redis_env_and_mounts,
    resources,
    selector_labels,
    stable_hash,
    tmp_volume,
)
from kubespeech_operator.spec import PoolSpec

MODEL_CACHE_COMPONENT = "model-cache"
MODEL_FETCH_COMPONENT = "model-fetch"
# Marks every worker pod of either task (selected by the workers' metrics Service).
WORKER_LABEL = "kubespeech.io/worker"
# Seconds of a stopping worker's grace period kept back from the drain for the preStop pause and exit.
_PRE_STOP_SECONDS = 5
_EXIT_MARGIN_SECONDS = 5


def worker_component(task: str) -> str:
    return f"{task}-worker"


@dataclass(frozen=True)
class CachedModel:
    """One download into the cache by one Job, shared by every pool that loads it.

    A NeMo TTS model with a separate vocoder is two downloads: the vocoder lands in a ``vocoder``
    subdirectory of the model's directory, where the engine finds it.
    """

    key: str
    source: str
    sha256: str | None
    task: str
    model_name: str
    image: str
    part: str = "model"

    @property
    def directory(self) -> str:
        base = f"{MODEL_CACHE_DIR}/{self.key}"
        return base if self.part == "model" else f"{base}/{self.part}"


def model_key(pool: PoolSpec) -> str | None:
    """The cache directory name of a pool's model; it changes whenever what is downloaded changes."""
    model = pool.model
    if model.source is None:
        return None
    inputs: dict[str, Any] = {"source": model.source, "sha256": model.sha256}
    if model.vocoder is not None:
        inputs["vocoder"] = {"source": model.vocoder.source, "sha256": model.vocoder.sha256}
    return stable_hash(inputs, 12)


def cached_models(ctx: Context) -> list[CachedModel]:
    """Every distinct download in the spec, in pool order."""
    models: dict[tuple[str, str], CachedModel] = {}
    for task, pool in ctx.spec.pools():
        key = model_key(pool)
        if key is None or (key, "model") in models:
            continue
        assert pool.model.source is not None  # model_key is None without a source
        common = {
            "key": key,
            "task": task,
            "model_name": pool.queue_name,
            "image": pool_image(ctx.spec, task, pool),
        }
        models[(key, "model")] = CachedModel(source=pool.model.source, sha256=pool.model.sha256, **common)
        if pool.model.vocoder is not None:
            models[(key, "vocoder")] = CachedModel(
                source=pool.model.vocoder.source, sha256=pool.model.vocoder.sha256, part="vocoder", **common
            )
    return list(models.values())


def fetch_job_name(ctx: Context, model: CachedModel) -> str:
    # Jobs are immutable: a new source gets a new Job (the key is in the name), never an edited one.
    if model.part == "model":
        return f"{ctx.name}-fetch-{dns_fragment(model.model_name, 14)}-{model.key[:8]}"
    return f"{ctx.name}-fetch-{dns_fragment(model.model_name, 10)}-voc-{model.key[:8]}"


def build_model_cache_pvc(ctx: Context) -> Manifest | None:
    if not cached_models(ctx):
        return None
    cache = ctx.spec.model_cache
    spec: dict[str, Any] = {
        "accessModes": [cache.access_mode],
        "resources": {"requests": {"storage": cache.size}},
    }
    if cache.storage_class:
        spec["storageClassName"] = cache.storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata(ctx, ctx.model_cache_name, MODEL_CACHE_COMPONENT),
        "spec": spec,
    }


def build_model_fetch_job(ctx: Context, model: CachedModel) -> Manifest:
    """A Job running `kubespeech model fetch SOURCE --to DIR [--sha256 X]` into the cache volume."""
    tmp, tmp_mount = tmp_volume()
    args = ["kubespeech", "model", "fetch", model.source, "--to", model.directory]
    if model.sha256:
        args += ["--sha256", model.sha256]
    job_labels = metadata(ctx, "", MODEL_FETCH_COMPONENT, task=model.task)["labels"]
    job_labels["kubespeech.io/model-key"] = model.key
    container = {
        "name": "fetch",
        "image": model.image,
        "imagePullPolicy": ctx.spec.images.pull_policy,
        "command": args,
        "env": [
            env(env_name(LogSettings, "level"), ctx.spec.log_level),
            env("HOME", "/tmp"),
            *(item.model_dump(by_alias=True, exclude_none=True) for item in ctx.spec.model_cache.env or []),
        ],
        "resources": resources(None, "model-fetch"),
        "securityContext": container_security_context(ctx.spec),
        "volumeMounts": [tmp_mount, {"name": "model-cache", "mountPath": MODEL_CACHE_DIR}],
    }
    pod_spec = pod_spec_base(ctx, ctx.model_fetch_service_account)
    pod_spec.update(
        {
            # Never, so that podFailurePolicy can tell a bad source from a network failure.
            "restartPolicy": "Never",
            "containers": [container],
            "volumes": [
                tmp,
                {"name": "model-cache", "persistentVolumeClaim": {"claimName": ctx.model_cache_name}},
            ],
        }
    )
    meta = metadata(ctx, fetch_job_name(ctx, model), MODEL_FETCH_COMPONENT, task=model.task)
    meta["labels"]["kubespeech.io/model-key"] = model.key
    meta["labels"]["kubespeech.io/model-part"] = model.part
    meta["annotations"] = {"kubespeech.io/model-source": model.source}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "backoffLimit": 6,
            # `kubespeech model fetch` exits 2 (bad source), 3 (not found), 4 (access denied) or 5 (checksum
            # mismatch) when retrying cannot help: fail the Job at once so the status says why.
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {"containerName": "fetch", "operator": "In", "values": [2, 3, 4, 5]},
                        # Required (possibly empty) in the Kubernetes 1.28 schema.
                        "onPodConditions": [],
                    },
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                ]
            },
            "template": {"metadata": {"labels": job_labels}, "spec": pod_spec},
        },
    }


def _model_path(pool: PoolSpec) -> str | None:
    if pool.model.path is not None:
        return pool.model.path
    key = model_key(pool)
    return None if key is None else f"{MODEL_CACHE_DIR}/{key}"


def _topology_spread(ctx: Context, task: str, pool: PoolSpec) -> list[dict[str, Any]]:
    constraints = []
    for constraint in pool.topology_spread_constraints or []:
        item = constraint.model_dump(by_alias=True, exclude_none=True)
        # Spreading "the pool's pods" is what an admin means when they give no selector.
        item.setdefault(
            "labelSelector", {"matchLabels": selector_labels(ctx, worker_component(task), pool.name)}
        )
        constraints.append(item)
    return constraints


def default_replicas(pool: PoolSpec) -> int:
    """Replicas of a pool before the autoscaler has decided anything."""
    if pool.autoscaling.enabled:
        return pool.autoscaling.min_replicas
    return pool.replicas


def build_pool_deployment(ctx: Context, task: str, pool: PoolSpec, replicas: int | None = None) -> Manifest:
    """One worker pool; ``replicas`` is the autoscaler's decision when it has made one."""
    spec = ctx.spec
    component = worker_component(task)
    name = ctx.pool_name(task, pool)
    redis_env, redis_volumes, redis_mounts = redis_env_and_mounts(ctx)
    tmp, tmp_mount = tmp_volume()
    grace = pool.termination_grace_period_seconds
    drain = max(grace - _PRE_STOP_SECONDS - _EXIT_MARGIN_SECONDS, 1)
    variables = [
        *redis_env,
        env(env_name(WorkerSettings, "task"), task),
        env(env_name(WorkerSettings, "model"), pool.queue_name),
        env(env_name(WorkerSettings, "engine"), pool.engine),  # type: ignore[attr-defined]
        env(env_name(WorkerSettings, "device"), "cuda" if pool.gpu_count > 0 else "cpu"),
        env(env_name(WorkerSettings, "max_batch_size"), pool.batching.max_batch_size),
        env(env_name(WorkerSettings, "max_wait_ms"), pool.batching.max_wait_ms),
        env(env_name(WorkerSettings, "health_port"), WORKER_HEALTH_PORT),
        env(env_name(WorkerSettings, "drain_timeout_s"), drain),
        # Models come only from the cache or the image: never download at worker start.
        env("HF_HUB_OFFLINE", "1"),
        env("HOME", "/tmp"),
    ]
    model_path = _model_path(pool)
    if model_path is not None:
        variables.append(env(env_name(WorkerSettings, "model_path"), model_path))
    if pool.engine_options:
        variables.append(
            env(env_name(WorkerSettings, "engine_options"), json.dumps(pool.engine_options, sort_keys=True))
        )
    # The admin's env comes last and replaces an operator-set variable of the same name.
    extra = [item.model_dump(by_alias=True, exclude_none=True) for item in pool.env or []]
    overridden = {item["name"] for item in extra}
    variables = [item for item in variables if item["name"] not in overridden] + extra

    volumes: list[dict[str, Any]] = [tmp, *redis_volumes]
    mounts: list[dict[str, Any]] = [tmp_mount, *redis_mounts]
    if pool.model.source is not None:
        volumes.append(
            {
                "name": "model-cache",
                "persistentVolumeClaim": {"claimName": ctx.model_cache_name, "readOnly": True},
            }
        )
        mounts.append({"name": "model-cache", "mountPath": MODEL_CACHE_DIR, "readOnly": True})

    if pool.engine == "nemo":  # type: ignore[attr-defined]
        # PyTorch uses /dev/shm between threads and for pinned memory; the container default is 64 MiB.
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})

    gpu = {pool.gpu.resource_name: pool.gpu.count} if pool.gpu is not None and pool.gpu.count > 0 else {}
    probe_period = 10
    container = {
        "name": "worker",
        "image": pool_image(spec, task, pool),
        "imagePullPolicy": spec.images.pull_policy,
        "command": ["kubespeech", "worker", "--task", task],
        "ports": [{"name": "health", "containerPort": WORKER_HEALTH_PORT, "protocol": "TCP"}],
        "env": variables,
        "resources": resources(pool.resources, "gpu-worker" if gpu else "cpu-worker", gpu),
        # Model loading can take minutes on a cold node; liveness only starts once this has passed.
        "startupProbe": {
            "httpGet": {"path": "/healthz", "port": "health"},
            "periodSeconds": probe_period,
            "timeoutSeconds": 5,
            "failureThreshold": math.ceil(pool.startup_timeout_seconds / probe_period),
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "health"},
            "periodSeconds": probe_period,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "health"},
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 2,
        },
        # SIGTERM makes the worker stop pulling jobs and finish those in flight within DRAIN_TIMEOUT_S; the
        # pause first lets the pod leave the metrics endpoints and the autoscaler's view of live workers.
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(_PRE_STOP_SECONDS)]}}},
        "securityContext": container_security_context(spec),
        "volumeMounts": mounts,
    }
    pod_spec = pod_spec_base(ctx, ctx.worker_service_account)
    pod_spec.update({"containers": [container], "volumes": volumes, "terminationGracePeriodSeconds": grace})
    if pool.node_selector:
        pod_spec["nodeSelector"] = dict(pool.node_selector)
    if pool.tolerations:
        pod_spec["tolerations"] = [
            item.model_dump(by_alias=True, exclude_none=True) for item in pool.tolerations
        ]
    if pool.affinity:
        pod_spec["affinity"] = pool.affinity
    spread = _topology_spread(ctx, task, pool)
    if spread:
        pod_spec["topologySpreadConstraints"] = spread
    if pool.runtime_class_name:
        pod_spec["runtimeClassName"] = pool.runtime_class_name
    if pool.priority_class_name:
        pod_spec["priorityClassName"] = pool.priority_class_name

    pod_labels = metadata(ctx, name, component, pool=pool.name, task=task)["labels"]
    pod_labels["kubespeech.io/model"] = label_value(pool.queue_name)
    pod_labels[WORKER_LABEL] = "true"
    # A GPU pool usually has no spare GPU to surge onto: replace pods one at a time instead.
    strategy = (
        {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
        if gpu
        else {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    )
    meta = metadata(ctx, name, component, pool=pool.name, task=task)
    meta["labels"]["kubespeech.io/model"] = pod_labels["kubespeech.io/model"]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": default_replicas(pool) if replicas is None else replicas,
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": selector_labels(ctx, component, pool.name)},
            "strategy": strategy,
            "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec},
        },
    }
