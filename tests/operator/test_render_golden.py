"""Golden tests: `kubespeech render` of every example and edge case equals the checked-in YAML, and every
rendered object is valid Kubernetes (kubernetes-validate --strict, oldest supported and newest known version).

Refresh the expected files with `make golden` (KUBESPEECH_UPDATE_GOLDEN=1).
"""

from __future__ import annotations

import difflib
import functools
import os
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import referencing
import typer
import yaml
from kubernetes_validate import utils as kv_utils
from typer.testing import CliRunner

from kubespeech_operator.render import load_speech_deployment, register_render, render

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
EDGE_CASES = sorted((Path(__file__).parent / "data").glob("*.yaml"))
GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("KUBESPEECH_UPDATE_GOLDEN") == "1"

OLDEST_VERSION = "1.28"
NEWEST_VERSION = kubernetes_validate.latest_version()
# Kinds defined by CRDs, which kubernetes-validate has no schema for: ServiceMonitor is checked by
# test_service_monitors_are_skipped_with_reason, the KEDA kinds by test_keda_manifests_have_the_crd_shape
# in test_keda_and_hpa.py (against the fields of KEDA's own CRDs, by hand).
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
}

CASES = [
    pytest.param(path, GOLDEN / "examples" / path.name, id=f"examples/{path.stem}") for path in EXAMPLES
] + [pytest.param(path, GOLDEN / path.name, id=path.stem) for path in EDGE_CASES]


def test_there_is_something_to_compare() -> None:
    assert {path.name for path in EXAMPLES} >= {
        "cpu.yaml",
        "single-gpu.yaml",
        "multi-pool.yaml",
        "external-redis.yaml",
    }
    assert len(EDGE_CASES) >= 4


@functools.cache
def rendered(input_path: Path) -> str:
    return render(load_speech_deployment(input_path.read_text(), str(input_path)))


@pytest.mark.parametrize(("input_path", "golden_path"), CASES)
def test_render_matches_golden(input_path: Path, golden_path: Path) -> None:
    actual = rendered(input_path)
    if UPDATE:
        golden_path.parent.mkdir(parents=True, exist_ok=True)
        golden_path.write_text(actual)
    assert golden_path.exists(), f"{golden_path} is missing: run `make golden`"
    expected = golden_path.read_text()
    if actual != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True),
                actual.splitlines(keepends=True),
                "golden",
                "rendered",
                n=2,
            )
        )
        pytest.fail(
            f"render of {input_path.name} differs from {golden_path.name} (run `make golden`):\n{diff[:6000]}"
        )


def test_no_stale_golden_files() -> None:
    expected = {GOLDEN / "examples" / path.name for path in EXAMPLES} | {
        GOLDEN / path.name for path in EDGE_CASES
    }
    present = set(GOLDEN.rglob("*.yaml"))
    if UPDATE:
        for stale in present - expected:
            stale.unlink()
        return
    assert present - expected == set(), "golden files without an input: run `make golden`"


@functools.cache
def _validator(version: str, api_version: str, kind: str) -> jsonschema.Draft202012Validator:
    """kubernetes-validate's strict schema for one kind, compiled once (validate() reloads it every call)."""
    schema_version = [v for v in kv_utils.all_versions() if kv_utils.major_minor(v) <= version][-1]
    group_version = api_version.split("/")
    prefix = group_version[0].split(".")[0] + "-" if len(group_version) == 2 else ""
    directory = f"kubernetes-json-schema/v{schema_version}-local-strict"
    schema = kv_utils.schema_contents(f"{directory}/{kind.lower()}-{prefix}{group_version[-1]}.json", version)
    definitions = kv_utils.schema_contents(f"{directory}/_definitions.json", version)
    registry = referencing.Resource.from_contents(schema) @ referencing.Registry()
    registry = referencing.Resource.from_contents(definitions) @ registry
    return jsonschema.Draft202012Validator(schema, registry=registry)


def test_validator_shortcut_agrees_with_kubernetes_validate() -> None:
    """The cached validator above must reject what `kubernetes-validate --strict` rejects."""
    bad = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {"replicas": "2"},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, OLDEST_VERSION, strict=True)
    assert list(_validator(OLDEST_VERSION, "apps/v1", "Deployment").iter_errors(bad))
    unknown = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"bogus": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(unknown, NEWEST_VERSION, strict=True)
    assert list(_validator(NEWEST_VERSION, "v1", "Service").iter_errors(unknown))


@pytest.mark.parametrize("version", [OLDEST_VERSION, NEWEST_VERSION])
@pytest.mark.parametrize(("input_path", "golden_path"), CASES)
def test_rendered_objects_are_valid_kubernetes(input_path: Path, golden_path: Path, version: str) -> None:
    objects = [doc for doc in yaml.safe_load_all(rendered(input_path)) if doc]
    assert objects
    problems = []
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            continue  # no schema to validate against: see CRD_KINDS
        errors = list(_validator(version, obj["apiVersion"], obj["kind"]).iter_errors(obj))
        problems += [
            f"{obj['kind']}/{obj['metadata']['name']}: {error.json_path}: {error.message}" for error in errors
        ]
    assert problems == []


def test_service_monitors_are_skipped_with_reason() -> None:
    monitors = [
        doc
        for path in [*EXAMPLES, *EDGE_CASES]
        for doc in yaml.safe_load_all(rendered(path))
        if doc and doc["kind"] == "ServiceMonitor"
    ]
    assert monitors, "some case must enable the ServiceMonitor"
    for monitor in monitors:
        assert {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]} == {"http", "health"}
    pytest.skip(
        "ServiceMonitor (monitoring.coreos.com/v1) is a CRD kind: kubernetes-validate ships only built-in "
        "Kubernetes schemas, so its structure is checked above but not validated against a schema"
    )


# --- the CLI ------------------------------------------------------------------------------------------


@pytest.fixture
def cli() -> typer.Typer:
    app = typer.Typer()
    register_render(app)

    @app.command("noop")
    def _noop() -> None:
        """Keeps typer from collapsing a one-command app into that command."""

    return app


def _run(cli: typer.Typer, *args: str, stdin: str | None = None) -> Any:
    return CliRunner().invoke(cli, ["render", *args], input=stdin)


def test_cli_prints_what_render_returns(cli: typer.Typer) -> None:
    path = ROOT / "examples" / "cpu.yaml"
    result = _run(cli, "-f", str(path))
    assert result.exit_code == 0, result.output
    assert result.stdout == rendered(path)


def test_cli_namespace_flag_overrides_the_file(cli: typer.Typer) -> None:
    result = _run(cli, "-f", str(ROOT / "examples" / "cpu.yaml"), "--namespace", "other")
    assert result.exit_code == 0, result.output
    namespaces = {doc["metadata"]["namespace"] for doc in yaml.safe_load_all(result.stdout) if doc}
    assert namespaces == {"other"}


def test_cli_reports_field_path_and_fails(cli: typer.Typer) -> None:
    document = yaml.safe_load((ROOT / "examples" / "cpu.yaml").read_text())
    document["spec"]["tts"]["pools"][0]["gpu"] = {"count": 1}
    result = _run(cli, "-f", "-", stdin=yaml.safe_dump(document))
    assert result.exit_code == 1
    assert "spec.tts.pools[0].gpu.count" in result.stderr
    assert result.stdout == ""


def test_cli_rejects_a_file_without_a_speech_deployment(cli: typer.Typer, tmp_path: Path) -> None:
    path = tmp_path / "secret.yaml"
    path.write_text("apiVersion: v1\nkind: Secret\nmetadata: {name: x}\n")
    result = _run(cli, "-f", str(path))
    assert result.exit_code == 1
    assert "exactly one SpeechDeployment" in result.stderr


def test_cli_missing_file_is_an_error(cli: typer.Typer, tmp_path: Path) -> None:
    result = _run(cli, "-f", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 2
    assert "cannot read" in result.stderr
