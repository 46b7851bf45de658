"""Shared pieces of every child manifest: names, labels, owner references, pod security, images, hashing."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from kubespeech import __version__
from kubespeech.config import LogSettings, RedisSettings, env_name
from kubespeech_operator.spec import PoolSpec, ResourceRequirements, SpeechDeploymentSpec

Manifest = dict[str, Any]

PART_OF = "kubespeech"
MANAGED_BY = "kubespeech-operator"
INPUT_HASH_ANNOTATION = "kubespeech.io/input-hash"
OPERATOR_POD_LABEL = "kubespeech.io/operator"
"""Label on the operator's pods (the chart sets it to "true"): the NetworkPolicies let them read Redis."""
POOL_LABEL = "kubespeech.io/pool"
TASK_LABEL = "kubespeech.io/task"

API_PORT = 7100
LICENSE_PROXY_PORT = 3369
WORKER_HEALTH_PORT = 9090
REDIS_PORT = 6379

# Where mounted files land inside containers (the env contract points at these paths).
SECRETS_DIR = "/run/secrets/kubespeech"
CONFIG_DIR = "/etc/kubespeech"
MODEL_CACHE_DIR = "/models"
REDIS_PASSWORD_KEY = "password"

# Per-component defaults from the seed architecture (requests = lower bound, limits = upper bound).
DEFAULT_RESOURCES: dict[str, dict[str, dict[str, str]]] = {
    "api": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": "2", "memory": "2Gi"}},
    "license-proxy": {
        "requests": {"cpu": "250m", "memory": "256Mi"},
        "limits": {"cpu": "1", "memory": "512Mi"},
    },
    "redis": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": "1", "memory": "2Gi"}},
    "gpu-worker": {"requests": {"cpu": "4", "memory": "12Gi"}, "limits": {"cpu": "8", "memory": "16Gi"}},
    # CPU engines (whisper tiny/base, piper) need far less; the seed's figures assume a GPU model server.
    "cpu-worker": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "2Gi"}},
    "model-fetch": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
}


@dataclass(frozen=True)
class Context:
    """What every builder needs besides its own part of the spec."""

    name: str
    namespace: str
    spec: SpeechDeploymentSpec
    owner: dict[str, Any] | None = None
    operator_namespace: str | None = None

    # Names of the children (one place, so that references between children cannot drift apart).
    @property
    def api_name(self) -> str:
        return f"{self.name}-api"

    @property
    def license_proxy_name(self) -> str:
        return f"{self.name}-license-proxy"

    @property
    def redis_name(self) -> str:
        return f"{self.name}-redis"

    @property
    def redis_secret_name(self) -> str:
        return redis_secret_name(self.name)

    @property
    def config_name(self) -> str:
        return f"{self.name}-config"

    @property
    def model_cache_name(self) -> str:
        return f"{self.name}-model-cache"

    @property
    def worker_service_account(self) -> str:
        return f"{self.name}-worker"

    @property
    def model_fetch_service_account(self) -> str:
        return f"{self.name}-model-fetch"

    def pool_name(self, task: str, pool: PoolSpec) -> str:
        return f"{self.name}-{task}-{pool.name}"

    @property
    def redis_url(self) -> str:
        redis = self.spec.redis
        if redis.mode == "external":
            assert redis.external is not None  # guaranteed by the model's validator
            return redis.external.url
        return f"redis://{self.redis_name}:{REDIS_PORT}/0"


def redis_secret_name(name: str) -> str:
    """Name of the Secret holding the embedded Redis password (the operator creates it once and keeps it)."""
    return f"{name}-redis-auth"


def selector_labels(ctx: Context, component: str, pool: str | None = None) -> dict[str, str]:
    labels = {
        "app.kubernetes.io/name": PART_OF,
        "app.kubernetes.io/instance": ctx.name,
        "app.kubernetes.io/component": component,
    }
    if pool is not None:
        labels[POOL_LABEL] = pool
    return labels


def labels(ctx: Context, component: str, pool: str | None = None, task: str | None = None) -> dict[str, str]:
    result = selector_labels(ctx, component)
    result["app.kubernetes.io/part-of"] = PART_OF
    result["app.kubernetes.io/managed-by"] = MANAGED_BY
    result["app.kubernetes.io/version"] = image_tag(ctx.spec)
    if task is not None:
        result[TASK_LABEL] = task
    if pool is not None:
        result[POOL_LABEL] = pool
    return result


def stack_selector(ctx: Context) -> dict[str, str]:
    """Selects every pod of this stack (used by NetworkPolicies)."""
    return {"app.kubernetes.io/name": PART_OF, "app.kubernetes.io/instance": ctx.name}


def metadata(
    ctx: Context,
    name: str,
    component: str,
    *,
    pool: str | None = None,
    task: str | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": ctx.namespace,
        "labels": labels(ctx, component, pool, task),
    }
    if annotations:
        meta["annotations"] = dict(annotations)
    if ctx.owner is not None:
        meta["ownerReferences"] = [
            {
                "apiVersion": ctx.owner["apiVersion"],
                "kind": ctx.owner["kind"],
                "name": ctx.owner["name"],
                "uid": ctx.owner["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    return meta


def stable_hash(value: Any, length: int = 16) -> str:
    """A short hash of JSON-able data that does not depend on dict order."""
    encoded = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(encoded).hexdigest()[:length]


def with_input_hash(manifest: Manifest) -> Manifest:
    """Annotate a finished manifest with the hash of everything in it (the operator skips unchanged ones)."""
    meta = manifest["metadata"]
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k != INPUT_HASH_ANNOTATION}
    meta.pop("annotations", None)
    digest = stable_hash({**manifest, "metadata": {**meta, "annotations": annotations}}, 32)
    meta["annotations"] = {**annotations, INPUT_HASH_ANNOTATION: digest}
    return manifest


def image_tag(spec: SpeechDeploymentSpec) -> str:
    return spec.images.tag or __version__


def image(spec: SpeechDeploymentSpec, repository: str) -> str:
    return f"{spec.images.registry.rstrip('/')}/{repository}:{image_tag(spec)}"


def pool_image(spec: SpeechDeploymentSpec, task: str, pool: PoolSpec) -> str:
    return pool.image or image(spec, f"{task}-worker")


def dns_fragment(value: str, length: int) -> str:
    """A lowercase DNS-label fragment of at most ``length`` characters derived from any model name."""
    fragment = re.sub(r"[^a-z0-9-]+", "-", value.lower()).strip("-")
    return fragment[:length].strip("-") or "model"


_LABEL_VALUE_RE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def label_value(value: str) -> str:
    """``value`` itself when it is a valid label value, else a DNS fragment of it."""
    if len(value) <= 63 and _LABEL_VALUE_RE.match(value):
        return value
    return dns_fragment(value, 63)


def resources(
    given: ResourceRequirements | None, default_key: str, extra: dict[str, int] | None = None
) -> dict[str, Any]:
    """Container resources: the spec's when given (replacing the defaults whole), plus extended resources."""
    if given is not None:
        result: dict[str, Any] = {}
        if given.requests:
            result["requests"] = dict(given.requests)
        if given.limits:
            result["limits"] = dict(given.limits)
    else:
        defaults = DEFAULT_RESOURCES[default_key]
        result = {"requests": dict(defaults["requests"]), "limits": dict(defaults["limits"])}
    for resource_name, count in (extra or {}).items():
        # Extended resources (GPUs) must be equal in requests and limits.
        result.setdefault("requests", {})[resource_name] = count
        result.setdefault("limits", {})[resource_name] = count
    return result


def pod_security_context(spec: SpeechDeploymentSpec) -> dict[str, Any]:
    sc = spec.security_context
    return {
        "runAsNonRoot": True,
        "runAsUser": sc.run_as_user,
        "runAsGroup": sc.run_as_group,
        "fsGroup": sc.fs_group,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context(spec: SpeechDeploymentSpec) -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": spec.security_context.read_only_root_filesystem,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def tmp_volume() -> tuple[dict[str, Any], dict[str, Any]]:
    """The writable /tmp every container gets (the root filesystem is read-only)."""
    return {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}, {"name": "tmp", "mountPath": "/tmp"}


def pod_spec_base(ctx: Context, service_account: str) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "serviceAccountName": service_account,
        "automountServiceAccountToken": False,
        # Service links would inject e.g. KUBESPEECH_API_PORT=tcp://... and clash with the env contract.
        "enableServiceLinks": False,
        "securityContext": pod_security_context(ctx.spec),
    }
    if ctx.spec.images.pull_secrets:
        spec["imagePullSecrets"] = [{"name": secret} for secret in ctx.spec.images.pull_secrets]
    return spec


def env(name: str, value: str | int | float | bool) -> dict[str, str]:
    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return {"name": name, "value": text}


def redis_password_secret(ctx: Context) -> tuple[str, str] | None:
    """(Secret name, key) of the Redis password: the generated one when embedded, the admin's when external."""
    redis = ctx.spec.redis
    if redis.mode == "embedded":
        return ctx.redis_secret_name, REDIS_PASSWORD_KEY
    if redis.external is not None and redis.external.password_secret_ref is not None:
        return redis.external.password_secret_ref.name, redis.external.password_secret_ref.key
    return None


def redis_env_and_mounts(
    ctx: Context,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Env vars, volumes and mounts every component needs to reach Redis (password as a mounted file)."""
    redis = ctx.spec.redis
    variables = [
        env(env_name(RedisSettings, "url"), ctx.redis_url),
        env(env_name(RedisSettings, "key_prefix"), redis.key_prefix),
        env(env_name(LogSettings, "level"), ctx.spec.log_level),
    ]
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    secret = redis_password_secret(ctx)
    external = redis.external if redis.mode == "external" else None
    if external is not None and external.tls is not None and external.tls.insecure_skip_verify:
        variables.append(env(env_name(RedisSettings, "tls_insecure_skip_verify"), True))
    if secret is not None:
        volumes.append(
            {
                "name": "redis-auth",
                "secret": {"secretName": secret[0], "items": [{"key": secret[1], "path": "password"}]},
            }
        )
        mounts.append({"name": "redis-auth", "mountPath": f"{SECRETS_DIR}/redis", "readOnly": True})
        variables.append(env(env_name(RedisSettings, "password_file"), f"{SECRETS_DIR}/redis/password"))
    return variables, volumes, mounts
