"""The env contract: every variable a builder renders is one its component's settings read, and every
required setting is rendered (for all examples and edge-case specs, and the chart's operator Deployment)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic_settings import BaseSettings

from kubespeech.api.settings import ApiSettings
from kubespeech.api.stt_live import LiveSttSettings
from kubespeech.config import LogSettings, QueueSettings, RedisSettings, WorkerSettings, env_name, env_names
from kubespeech.jobs.sessions import SessionSettings
from kubespeech.license.settings import ProxySettings
from kubespeech_operator.builders import build_children
from kubespeech_operator.settings import OperatorSettings
from kubespeech_operator.spec import parse_spec

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted((ROOT / "examples").glob("*.yaml")) + sorted((Path(__file__).parent / "data").glob("*.yaml"))
COMPONENT = "app.kubernetes.io/component"

# What each component's process reads its settings from.
READS: dict[str, list[type[BaseSettings]]] = {
    "api": [ApiSettings, RedisSettings, QueueSettings, SessionSettings, LiveSttSettings, LogSettings],
    "asr-worker": [WorkerSettings, RedisSettings, QueueSettings, SessionSettings, LogSettings],
    "tts-worker": [WorkerSettings, RedisSettings, QueueSettings, SessionSettings, LogSettings],
    "license-proxy": [ProxySettings, RedisSettings, LogSettings],
    "model-fetch": [LogSettings],
    "operator": [OperatorSettings, LogSettings],
}


def contract_violations(component: str, container: dict[str, Any]) -> list[str]:
    """Rendered KUBESPEECH_* variables no settings of ``component`` read, and required settings not rendered."""
    classes = READS[component]
    accepted = set().union(*(env_names(cls) for cls in classes))
    rendered = {item["name"] for item in container.get("env") or []}
    problems = [f"{name} is read by none of {[c.__name__ for c in classes]}" for name in sorted(rendered)
                if name.startswith("KUBESPEECH_") and name not in accepted]  # fmt: skip
    for cls in classes:
        for field, info in cls.model_fields.items():
            if info.is_required() and env_name(cls, field) not in rendered:
                problems.append(f"required {env_name(cls, field)} is not rendered")
    return problems


def _containers(path: Path) -> list[tuple[str, str, dict[str, Any]]]:
    doc = next(d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "SpeechDeployment")
    children = build_children(doc["metadata"]["name"], "speech", parse_spec(doc["spec"]), redis_password="pw")
    out = []
    for child in children:
        if child["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        component = child["metadata"]["labels"][COMPONENT]
        if component == "redis":
            continue  # third-party: configured by its command line
        for container in child["spec"]["template"]["spec"]["containers"]:
            out.append((child["metadata"]["name"], component, container))
    return out


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_every_rendered_variable_is_read_and_every_required_one_is_rendered(path: Path) -> None:
    containers = _containers(path)
    assert {c for _, c, _ in containers} >= {"api", "license-proxy"}
    for name, component, container in containers:
        assert contract_violations(component, container) == [], name


def test_the_check_catches_a_stray_or_missing_variable() -> None:
    doc = yaml.safe_load((ROOT / "examples" / "cpu.yaml").read_text())
    _, _, worker = next(c for c in _containers(ROOT / "examples" / "cpu.yaml") if c[1] == "asr-worker")
    assert doc and contract_violations("asr-worker", worker) == []
    stray = {**worker, "env": [*worker["env"], {"name": "KUBESPEECH_WORKER_BATCH", "value": "4"}]}
    assert contract_violations("asr-worker", stray) == [
        "KUBESPEECH_WORKER_BATCH is read by none of "
        "['WorkerSettings', 'RedisSettings', 'QueueSettings', 'SessionSettings', 'LogSettings']"
    ]
    missing = {**worker, "env": [e for e in worker["env"] if e["name"] != "KUBESPEECH_WORKER_ENGINE"]}
    assert contract_violations("asr-worker", missing) == ["required KUBESPEECH_WORKER_ENGINE is not rendered"]


def test_env_name_refuses_a_setting_that_does_not_exist() -> None:
    assert env_name(ApiSettings, "cache", "asr", "key_file") == "KUBESPEECH_API_CACHE__ASR__KEY_FILE"
    with pytest.raises(KeyError, match="no setting"):
        env_name(ApiSettings, "keys_path")
    with pytest.raises(KeyError, match="nested"):
        env_name(WorkerSettings, "engine_options", "x")


def test_the_charts_operator_deployment_keeps_the_contract(tmp_path: Path) -> None:
    from tests.chart.test_chart import helm

    out = subprocess.run(
        [helm(), "template", "kubespeech", str(ROOT / "charts" / "kubespeech")],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    deployments = [d for d in yaml.safe_load_all(out.stdout) if d and d.get("kind") == "Deployment"]
    assert deployments
    for deployment in deployments:
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            assert contract_violations("operator", container) == [], deployment["metadata"]["name"]
