"""The license proxy's children: Deployment and Service (reachable only from the stack's pods)."""

from __future__ import annotations

from kubespeech.config import env_name
from kubespeech.license.settings import ProxySettings
from kubespeech_operator.builders.common import (
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

COMPONENT = "license-proxy"


def build_license_proxy_deployment(ctx: Context) -> Manifest:
    spec = ctx.spec
    redis_env, redis_volumes, redis_mounts = redis_env_and_mounts(ctx)
    tmp, tmp_mount = tmp_volume()
    key_ref = spec.license.secret_ref
    volumes = [
        tmp,
        {
            "name": "license",
            "secret": {"secretName": key_ref.name, "items": [{"key": key_ref.key, "path": "license.key"}]},
        },
    ]
    mounts = [tmp_mount, {"name": "license", "mountPath": f"{SECRETS_DIR}/license", "readOnly": True}]
    variables = [
        *redis_env,
        # The port the container listens on, said where the process reads it (not only its default).
        env(env_name(ProxySettings, "port"), LICENSE_PROXY_PORT),
        env(env_name(ProxySettings, "key_file"), f"{SECRETS_DIR}/license/license.key"),
    ]
    public_ref = spec.license.public_key_secret_ref
    if public_ref is not None:
        volumes.append(
            {
                "name": "license-public-key",
                "secret": {
                    "secretName": public_ref.name,
                    "items": [{"key": public_ref.key, "path": "public.pem"}],
                },
            }
        )
        mounts.append(
            {"name": "license-public-key", "mountPath": f"{SECRETS_DIR}/license-public-key", "readOnly": True}
        )
        variables.append(
            env(env_name(ProxySettings, "public_key_file"), f"{SECRETS_DIR}/license-public-key/public.pem")
        )
    if spec.license_proxy.upstream_url:
        variables.append(env(env_name(ProxySettings, "upstream_url"), spec.license_proxy.upstream_url))
    container = {
        "name": "license-proxy",
        "image": image(spec, "license-proxy"),
        "imagePullPolicy": spec.images.pull_policy,
        "command": ["kubespeech", "license-proxy"],
        "ports": [{"name": "http", "containerPort": LICENSE_PROXY_PORT, "protocol": "TCP"}],
        "env": variables,
        "resources": resources(spec.license_proxy.resources, "license-proxy"),
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": 10,
            "timeoutSeconds": 3,
            "failureThreshold": 3,
        },
        # Ready only while the license is usable, so an expired or revoked license shows on the pod.
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": "http"},
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 2,
        },
        "securityContext": container_security_context(spec),
        "volumeMounts": [*mounts, *redis_mounts],
    }
    pod_spec = pod_spec_base(ctx, ctx.license_proxy_name)
    pod_spec.update({"containers": [container], "volumes": [*volumes, *redis_volumes]})
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(ctx, ctx.license_proxy_name, COMPONENT),
        "spec": {
            "replicas": spec.license_proxy.replicas,
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": selector_labels(ctx, COMPONENT)},
            "template": {
                "metadata": {"labels": metadata(ctx, ctx.license_proxy_name, COMPONENT)["labels"]},
                "spec": pod_spec,
            },
        },
    }


def build_license_proxy_service(ctx: Context) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(ctx, ctx.license_proxy_name, COMPONENT),
        "spec": {
            "type": "ClusterIP",
            # Not-ready proxies (license unusable) must stay reachable: the API asks them why, and answers
            # clients with the specific error; without an answer it would decide on its cached one.
            "publishNotReadyAddresses": True,
            "selector": selector_labels(ctx, COMPONENT),
            "ports": [{"name": "http", "port": LICENSE_PROXY_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }
