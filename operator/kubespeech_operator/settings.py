"""Operator settings, from ``KUBESPEECH_OPERATOR_*`` environment variables or ``kubespeech operator`` flags."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DOMAIN = "kubespeech.io"
GROUP = "kubespeech.io"
VERSION = "v1alpha1"
PLURAL = "speechdeployments"
FINALIZER = f"{DOMAIN}/finalizer"


class OperatorSettings(BaseSettings):
    """How the operator watches, how often it re-reconciles, and where it answers its liveness probe."""

    model_config = SettingsConfigDict(env_prefix="KUBESPEECH_OPERATOR_", extra="ignore")

    namespaces: str = Field(
        "",
        description="Comma-separated namespaces (glob patterns allowed) to watch; empty: every namespace.",
    )
    kubeconfig: Path | None = Field(
        None,
        description="kubeconfig file; unset: in-cluster service account, then $KUBECONFIG, ~/.kube/config.",
    )
    liveness_host: str = Field("0.0.0.0", description="Address of the liveness endpoint.")
    liveness_port: int = Field(
        8080, ge=0, le=65535, description="Port of the liveness endpoint (0: disabled)."
    )
    metrics_host: str = Field("0.0.0.0", description="Address of the Prometheus metrics endpoint.")
    metrics_port: int = Field(
        8081, ge=0, le=65535, description="Port of the Prometheus metrics endpoint (autoscaler; 0: disabled)."
    )
    resync_interval_s: float = Field(
        30.0,
        gt=0,
        description="Every SpeechDeployment is re-reconciled this often: restores deleted or "
        "hand-edited children and refreshes status (readiness, queue depth).",
    )
    apply_concurrency: int = Field(8, ge=1, le=64, description="Children applied in parallel per reconcile.")
    max_concurrent_reconciles: int = Field(
        4,
        ge=1,
        le=64,
        description="SpeechDeployments reconciled at the same time (the others wait their turn).",
    )
    redis_timeout_s: float = Field(
        1.0, gt=0, description="Budget for reading queue depths from a stack's Redis during a status refresh."
    )
    pod_name: str = Field(
        "",
        description="Name of the operator's pod (the chart sets it from the downward API): the operator's "
        "identity towards the API server; hostname and process id when unset.",
    )
    pod_namespace: str = Field(
        "",
        description="Namespace of the operator's pod (the chart sets it): the stacks' NetworkPolicies let "
        "operator pods from exactly this namespace read Redis queue depths; any namespace when unset.",
    )
    log_level: str = Field("INFO", description="Log level of the operator.")
    log_format: str = Field("json", pattern="^(json|text)$", description="json (structured) or text logs.")

    def namespace_list(self) -> list[str]:
        return [ns.strip() for ns in self.namespaces.split(",") if ns.strip()]

    @property
    def identity(self) -> str:
        """Who this operator is (kopf's peering identity), never derived from the passwd database: a
        container's uid often has no entry there, and ``getpass.getuser()`` raises for it."""
        return self.pod_name or f"kubespeech-operator@{socket.gethostname()}/{os.getpid()}"

    @property
    def clusterwide(self) -> bool:
        return not self.namespace_list()

    @property
    def liveness_endpoint(self) -> str | None:
        if not self.liveness_port:
            return None
        return f"http://{self.liveness_host}:{self.liveness_port}/healthz"
