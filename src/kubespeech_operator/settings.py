"""Operator settings, from ``KUBESPEECH_OPERATOR_*`` environment variables or ``kubespeech operator`` flags."""

from __future__ import annotations

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
    resync_interval_s: float = Field(
        30.0,
        gt=0,
        description="Every SpeechDeployment is re-reconciled this often: restores deleted or "
        "hand-edited children and refreshes status (readiness, queue depth).",
    )
    apply_concurrency: int = Field(8, ge=1, le=64, description="Children applied in parallel per reconcile.")
    redis_timeout_s: float = Field(
        1.0, gt=0, description="Budget for reading queue depths from a stack's Redis during a status refresh."
    )
    log_level: str = Field("INFO", description="Log level of the operator.")
    log_format: str = Field("json", pattern="^(json|text)$", description="json (structured) or text logs.")

    def namespace_list(self) -> list[str]:
        return [ns.strip() for ns in self.namespaces.split(",") if ns.strip()]

    @property
    def clusterwide(self) -> bool:
        return not self.namespace_list()

    @property
    def liveness_endpoint(self) -> str | None:
        if not self.liveness_port:
            return None
        return f"http://{self.liveness_host}:{self.liveness_port}/healthz"
