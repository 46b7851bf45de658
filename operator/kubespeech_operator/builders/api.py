"""The API server's children: config (models file), Deployment, Service and optional Ingress."""

from __future__ import annotations

from typing import Any

from kubespeech.api.models_file import ModelEntry, dump_models_file
from kubespeech.api.settings import ApiSettings
from kubespeech.config import env_name
from kubespeech_operator.builders.common import (
    API_PORT,
    CONFIG_DIR,
    LICENSE_PROXY_PORT,
    SECRETS_DIR,
    Context,
    Manifest,
    container_security_context,
    env,
    image,
    metadata,
    pod_spec_base,
    redis_env_and_mounts,
    resources,
    selector_labels,
    tmp_volume,
)

COMPONENT = "api"
MODELS_FILE = "models.json"
# The client API surfaces (Waves, legacy self-host, OpenAI). The operations routes (/health, /ready,
# /metrics, /docs, /openapi.json) stay inside the cluster, so the Ingress names the surfaces, not "/".
INGRESS_PATH_PREFIXES = ("/waves", "/api/v1", "/v1")


def models_file_entries(ctx: Context) -> list[ModelEntry]:
    """The API's model list (models.json): one entry per queue, with "cold_start_wait_s" where an
    autoscaled pool sets coldStartWaitSeconds.

    Pools sharing a modelName collapse into one entry; the default of a task is the pool marked default, or
    else the task's first model.
    """
    entries: dict[str, ModelEntry] = {}
    for task, pool in ctx.spec.pools():
        entry = entries.setdefault(pool.queue_name, ModelEntry(name=pool.queue_name, task=task))
        entry.default = entry.default or pool.default
        wait = pool.autoscaling.cold_start_wait_seconds if pool.autoscaling.enabled else None
        if wait is not None:
            # Pools sharing a queue: the request is held as long as the most patient of them asks.
            entry.cold_start_wait_s = max(float(wait), entry.cold_start_wait_s or 0.0)
        for alias in pool.aliases or []:
            if alias not in entry.aliases:
                entry.aliases.append(alias)
        for voice in getattr(pool, "voices", None) or []:
            if voice not in entry.voices:
                entry.voices.append(voice)
    result = list(entries.values())
    for task in ("asr", "tts"):
        of_task = [entry for entry in result if entry.task == task]
        if of_task and not any(entry.default for entry in of_task):
            of_task[0].default = True
    return result


def config_data(ctx: Context) -> dict[str, str]:
    return {MODELS_FILE: dump_models_file(models_file_entries(ctx))}


def build_config_map(ctx: Context) -> Manifest:
    """Non-secret configuration: the API's models file."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(ctx, ctx.config_name, COMPONENT),
        "data": config_data(ctx),
    }


CACHE_KEY_DIR = f"{SECRETS_DIR}/cache-key"


def cache_env_and_mounts(
    ctx: Context,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """The API's result cache settings (``KUBESPEECH_API_CACHE__*``) and the STT cache key, mounted as a file
    from its Secret (never an env value)."""
    cache = ctx.spec.cache
    envs: list[dict[str, Any]] = []
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    for task, spec in (("tts", cache.tts), ("asr", cache.asr)):
        envs += [
            env(env_name(ApiSettings, "cache", task, "enabled"), spec.enabled),
            env(env_name(ApiSettings, "cache", task, "max_bytes"), spec.max_bytes),
            env(env_name(ApiSettings, "cache", task, "ttl_s"), spec.ttl_seconds),
        ]
    asr = cache.asr
    if asr.enabled and asr.encryption_key_secret_ref is not None:
        ref = asr.encryption_key_secret_ref
        volumes.append(
            {
                "name": "cache-key",
                "secret": {"secretName": ref.name, "items": [{"key": ref.key, "path": "key"}]},
            }
        )
        mounts.append({"name": "cache-key", "mountPath": CACHE_KEY_DIR, "readOnly": True})
        envs.append(env(env_name(ApiSettings, "cache", "asr", "key_file"), f"{CACHE_KEY_DIR}/key"))
    elif asr.enabled and ctx.spec.redis.mode == "embedded":
        # Only this stack reaches its embedded Redis (NetworkPolicies); the models refuse this for external.
        envs.append(env(env_name(ApiSettings, "cache", "asr", "unencrypted_in_embedded_redis"), True))
    return envs, volumes, mounts


def build_api_deployment(ctx: Context) -> Manifest:
    api = ctx.spec.api
    redis_env, volumes, mounts = redis_env_and_mounts(ctx)
    cache_env, cache_volumes, cache_mounts = cache_env_and_mounts(ctx)
    tmp, tmp_mount = tmp_volume()
    keys_ref = api.api_keys_secret_ref
    volumes = [
        tmp,
        {
            "name": "config",
            "configMap": {"name": ctx.config_name, "items": [{"key": MODELS_FILE, "path": MODELS_FILE}]},
        },
        {
            "name": "api-keys",
            "secret": {"secretName": keys_ref.name, "items": [{"key": keys_ref.key, "path": "keys"}]},
        },
        *volumes,
        *cache_volumes,
    ]
    mounts = [
        tmp_mount,
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "api-keys", "mountPath": f"{SECRETS_DIR}/api-keys", "readOnly": True},
        *mounts,
        *cache_mounts,
    ]
    container = {
        "name": "api",
        "image": image(ctx.spec, "api-server"),
        "imagePullPolicy": ctx.spec.images.pull_policy,
        "command": ["kubespeech", "api"],
        "ports": [{"name": "http", "containerPort": API_PORT, "protocol": "TCP"}],
        "env": [
            *redis_env,
            env(env_name(ApiSettings, "host"), "0.0.0.0"),
            env(env_name(ApiSettings, "port"), API_PORT),
            env(env_name(ApiSettings, "keys_file"), f"{SECRETS_DIR}/api-keys/keys"),
            env(env_name(ApiSettings, "models_file"), f"{CONFIG_DIR}/{MODELS_FILE}"),
            env(
                env_name(ApiSettings, "license_proxy_url"),
                f"http://{ctx.license_proxy_name}:{LICENSE_PROXY_PORT}",
            ),
            *cache_env,
        ],
        "resources": resources(api.resources, "api"),
        "startupProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": 2,
            "failureThreshold": 30,
        },
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": 10,
            "timeoutSeconds": 3,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": "http"},
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 2,
        },
        # Let the Service and Ingress stop routing here before the server starts shutting down.
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", "5"]}}},
        "securityContext": container_security_context(ctx.spec),
        "volumeMounts": mounts,
    }
    pod_spec = pod_spec_base(ctx, ctx.api_name)
    pod_spec.update({"containers": [container], "volumes": volumes, "terminationGracePeriodSeconds": 60})
    # Losing one node should not take the whole API tier (and every WebSocket session) with it.
    pod_spec["topologySpreadConstraints"] = [
        {
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": selector_labels(ctx, COMPONENT)},
        }
    ]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(ctx, ctx.api_name, COMPONENT),
        "spec": {
            "replicas": api.replicas,
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": selector_labels(ctx, COMPONENT)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                # No config hash here: the API server reloads the models and keys files when they change,
                # and a rollout would cut every WebSocket session.
                "metadata": {"labels": metadata(ctx, ctx.api_name, COMPONENT)["labels"]},
                "spec": pod_spec,
            },
        },
    }


def build_api_service(ctx: Context) -> Manifest:
    service = ctx.spec.api.service
    meta = metadata(ctx, ctx.api_name, COMPONENT, annotations=service.annotations)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "type": service.type,
            "selector": selector_labels(ctx, COMPONENT),
            "ports": [{"name": "http", "port": service.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def build_ingress(ctx: Context) -> Manifest | None:
    ingress = ctx.spec.api.ingress
    if not ingress.enabled:
        return None
    spec: dict[str, Any] = {
        "rules": [
            {
                "host": ingress.host,
                "http": {
                    "paths": [
                        {
                            "path": path,
                            "pathType": "Prefix",
                            "backend": {"service": {"name": ctx.api_name, "port": {"name": "http"}}},
                        }
                        for path in INGRESS_PATH_PREFIXES
                    ]
                },
            }
        ]
    }
    if ingress.class_name:
        spec["ingressClassName"] = ingress.class_name
    if ingress.tls_secret_name:
        spec["tls"] = [{"hosts": [ingress.host], "secretName": ingress.tls_secret_name}]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": metadata(ctx, ctx.api_name, COMPONENT, annotations=ingress.annotations),
        "spec": spec,
    }
