"""The rendered Ingress exposes the client API surfaces only, and every client route of the real app is on one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fastapi.routing
import pytest
import yaml
from fastapi import FastAPI

from kubespeech.api.app import create_app
from kubespeech.api.settings import ApiSettings
from kubespeech_operator.builders import build_children
from kubespeech_operator.spec import parse_spec

ROOT = Path(__file__).resolve().parents[2]
INPUTS = sorted((ROOT / "examples").glob("*.yaml")) + sorted((Path(__file__).parent / "data").glob("*.yaml"))
OWNER = {"apiVersion": "kubespeech.io/v1alpha1", "kind": "SpeechDeployment", "name": "x", "uid": "0000-1111"}

API_PREFIXES = ["/waves", "/api/v1", "/v1"]
# Operations and documentation routes: for probes and Prometheus inside the cluster, never the internet.
OPS_PATHS = {"/health", "/ready", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}


def _ingresses(path: Path) -> list[dict[str, Any]]:
    (doc,) = [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "SpeechDeployment"]
    spec = parse_spec(doc["spec"])
    children = build_children(doc["metadata"]["name"], "default", spec, owner=OWNER, redis_password="pw")
    return [c for c in children if c["kind"] == "Ingress"]


def _all_ingresses() -> list[dict[str, Any]]:
    found = [ingress for path in INPUTS for ingress in _ingresses(path)]
    assert found, "some example or edge case enables the Ingress"
    return found


def matches(prefix: str, path: str) -> bool:
    """Kubernetes ``pathType: Prefix``: element-wise, so /v1 matches /v1 and /v1/x but not /v1x."""
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def test_the_ingress_routes_exactly_the_api_surfaces() -> None:
    for ingress in _all_ingresses():
        (rule,) = ingress["spec"]["rules"]
        paths = rule["http"]["paths"]
        assert [p["path"] for p in paths] == API_PREFIXES
        assert {p["pathType"] for p in paths} == {"Prefix"}
        service = ingress["metadata"]["name"]  # the API Service and its Ingress share the API's name
        assert all(p["backend"] == {"service": {"name": service, "port": {"name": "http"}}} for p in paths)
        for ops in OPS_PATHS:
            assert not any(matches(p["path"], ops) for p in paths), ops


@pytest.mark.parametrize(("prefix", "path", "expected"), [
    ("/v1", "/v1", True), ("/v1", "/v1/models", True), ("/v1", "/v1x", False), ("/waves", "/ready", False),
])  # fmt: skip
def test_prefix_semantics(prefix: str, path: str, expected: bool) -> None:
    assert matches(prefix, path) is expected


def _route_paths(app: FastAPI) -> set[str]:
    # FastAPI 0.165 keeps included routers as one lazy entry each in app.routes; this flattens them
    # (older releases list the routes themselves, which iterate the same way).
    flatten = getattr(fastapi.routing, "iter_route_contexts", None)
    routes = list(flatten(app.routes)) if flatten is not None else list(app.routes)
    paths = [getattr(route, "path", None) for route in routes]
    assert all(paths), f"a route without a path cannot be checked: {routes}"
    return {str(p) for p in paths}


def test_every_client_route_of_the_app_is_behind_the_ingress() -> None:
    app = create_app(ApiSettings(api_keys=[]))  # routes only: the lifespan (Redis) never runs
    paths = _route_paths(app)
    assert set(app.openapi()["paths"]) <= paths, "every documented route is seen"
    assert OPS_PATHS - {"/docs/oauth2-redirect", "/redoc"} <= paths, "the ops routes this test hides exist"
    client = paths - OPS_PATHS
    assert {"/waves/v1/tts", "/api/v1/lightning/get_text", "/v1/audio/speech"} <= client
    missed = sorted(p for p in client if not any(matches(prefix, p) for prefix in API_PREFIXES))
    assert not missed, f"routes the Ingress would not expose (add a prefix or an ops entry): {missed}"
