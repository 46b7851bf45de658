"""The license proxy's pod is ready only while its license is usable, yet stays reachable for the API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kubespeech_operator.builders import build_children
from kubespeech_operator.spec import parse_spec

ROOT = Path(__file__).resolve().parents[2]
INPUTS = sorted((ROOT / "examples").glob("*.yaml")) + sorted((Path(__file__).parent / "data").glob("*.yaml"))
OWNER = {"apiVersion": "kubespeech.io/v1alpha1", "kind": "SpeechDeployment", "name": "x", "uid": "0000-1111"}


def _proxy_objects(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    (doc,) = [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "SpeechDeployment"]
    children = build_children(
        doc["metadata"]["name"], "default", parse_spec(doc["spec"]), owner=OWNER, redis_password="pw"
    )
    (deployment,) = [
        c for c in children if c["kind"] == "Deployment" and c["metadata"]["name"].endswith("-license-proxy")
    ]
    (service,) = [
        c for c in children if c["kind"] == "Service" and c["metadata"]["name"].endswith("-license-proxy")
    ]
    return deployment, service


@pytest.mark.parametrize("path", INPUTS, ids=lambda p: p.stem)
def test_readiness_follows_the_license_and_liveness_the_process(path: Path) -> None:
    deployment, service = _proxy_objects(path)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    # The API must still get the proxy's specific answer (expired, revoked) from a not-ready proxy.
    assert service["spec"]["publishNotReadyAddresses"] is True
