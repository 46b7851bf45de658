"""Embedded Redis: a one-replica StatefulSet, its headless Service, and the Secret with its password."""

from __future__ import annotations

import base64
from typing import Any

from kubespeech_operator.builders.common import (
    REDIS_PASSWORD_KEY,
    REDIS_PORT,
    Context,
    Manifest,
    container_security_context,
    metadata,
    pod_spec_base,
    resources,
    selector_labels,
    tmp_volume,
)

COMPONENT = "redis"

# The password is read from the mounted Secret into a config file under /tmp, so it never appears in the
# process list or in an env literal; an empty or unreadable Secret stops the container instead of starting a
# Redis without a password. Persistence is AOF: queued jobs survive a restart of the pod.
_START_SCRIPT = (
    'p="$(cat /run/secrets/redis/password)" && [ -n "$p" ]'
    " || { echo 'refusing to start: the Redis password Secret is empty or unreadable' >&2; exit 1; };"
    ' printf \'requirepass "%s"\\n\' "$p" > /tmp/redis.conf'
    " && exec redis-server /tmp/redis.conf --port 6379 --dir /data --appendonly yes --save ''"
    " --protected-mode no"
)


def build_redis_secret(ctx: Context, password: str) -> Manifest:
    """The Secret with the generated password; the operator creates it once and never rotates it silently."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": metadata(ctx, ctx.redis_secret_name, COMPONENT),
        "data": {REDIS_PASSWORD_KEY: base64.b64encode(password.encode()).decode()},
    }


def build_redis_service(ctx: Context) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(ctx, ctx.redis_name, COMPONENT),
        "spec": {
            # Headless: the StatefulSet's governing Service; the one pod answers the name directly.
            "clusterIP": "None",
            "publishNotReadyAddresses": False,
            "selector": selector_labels(ctx, COMPONENT),
            "ports": [{"name": "redis", "port": REDIS_PORT, "targetPort": "redis", "protocol": "TCP"}],
        },
    }


def build_redis_statefulset(ctx: Context) -> Manifest:
    embedded = ctx.spec.redis.embedded
    tmp, tmp_mount = tmp_volume()
    volumes: list[dict[str, Any]] = [
        tmp,
        {
            "name": "redis-auth",
            "secret": {
                "secretName": ctx.redis_secret_name,
                "items": [{"key": REDIS_PASSWORD_KEY, "path": "password"}],
            },
        },
    ]
    statefulset_spec: dict[str, Any] = {
        "replicas": 1,
        "serviceName": ctx.redis_name,
        "selector": {"matchLabels": selector_labels(ctx, COMPONENT)},
    }
    persistence = embedded.persistence
    if persistence.enabled:
        claim_spec: dict[str, Any] = {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": persistence.size}},
        }
        if persistence.storage_class:
            claim_spec["storageClassName"] = persistence.storage_class
        statefulset_spec["volumeClaimTemplates"] = [
            {"metadata": {"name": "data", "labels": selector_labels(ctx, COMPONENT)}, "spec": claim_spec}
        ]
        statefulset_spec["persistentVolumeClaimRetentionPolicy"] = {
            "whenDeleted": "Delete",
            "whenScaled": "Retain",
        }
    else:
        volumes.append({"name": "data", "emptyDir": {}})
    container = {
        "name": "redis",
        "image": embedded.image,
        "imagePullPolicy": ctx.spec.images.pull_policy,
        "command": ["sh", "-c", _START_SCRIPT],
        "ports": [{"name": "redis", "containerPort": REDIS_PORT, "protocol": "TCP"}],
        "resources": resources(embedded.resources, "redis"),
        # TCP probes: an authenticated redis-cli probe would need the password on its command line.
        "livenessProbe": {"tcpSocket": {"port": "redis"}, "periodSeconds": 10, "failureThreshold": 6},
        "readinessProbe": {"tcpSocket": {"port": "redis"}, "periodSeconds": 5, "failureThreshold": 2},
        "securityContext": container_security_context(ctx.spec),
        "volumeMounts": [
            tmp_mount,
            {"name": "data", "mountPath": "/data"},
            {"name": "redis-auth", "mountPath": "/run/secrets/redis", "readOnly": True},
        ],
    }
    pod_spec = pod_spec_base(ctx, ctx.redis_name)
    pod_spec.update({"containers": [container], "volumes": volumes, "terminationGracePeriodSeconds": 30})
    template_labels = metadata(ctx, ctx.redis_name, COMPONENT)["labels"]
    # Not the stack's version: upgrading kubespeech must not restart Redis (and pause every queue).
    template_labels.pop("app.kubernetes.io/version")
    statefulset_spec["template"] = {
        "metadata": {"labels": template_labels},
        "spec": pod_spec,
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": metadata(ctx, ctx.redis_name, COMPONENT),
        "spec": statefulset_spec,
    }
