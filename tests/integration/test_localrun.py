"""``kubespeech dev``'s plan: a SpeechDeployment's rendered children mapped onto local processes.

Only the mapping is checked here (nothing is started); tests/integration/test_dev_stack.py runs the
examples/cpu.yaml stack through ``kubespeech dev -f`` and speaks to it.
"""

from __future__ import annotations

import itertools
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubespeech.api.auth import hash_key
from kubespeech.dev import DEFAULT_SPEECH_DEPLOYMENT
from kubespeech.localrun import LocalRunError, LocalStack, load_speech_deployment, plan
from tests.stack import KUBESPEECH

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
KEY = "ks-test-" + "x" * 24


def make_plan(path: Path, tmp_path: Path, **kw: Any) -> LocalStack:
    ports = itertools.count(20000)
    return plan(
        load_speech_deployment(path.read_text(), str(path)), tmp_path, api_key=KEY, api_port=7311,
        host="127.0.0.1", free_port=lambda _preferred: next(ports),
        executables={"kubespeech": ["/opt/bin/kubespeech"], "redis-server": ["/opt/bin/redis-server"]}, **kw,
    )  # fmt: skip


def test_the_builtin_stack_is_examples_cpu() -> None:
    example = yaml.safe_load((EXAMPLES / "cpu.yaml").read_text())
    builtin = yaml.safe_load(DEFAULT_SPEECH_DEPLOYMENT)
    assert builtin == example


def test_cpu_example_maps_every_component_onto_loopback(tmp_path: Path) -> None:
    stack = make_plan(EXAMPLES / "cpu.yaml", tmp_path)
    names = [p.name for p in stack.processes]
    assert names == [
        "speech-cpu-redis", "speech-cpu-license-proxy", "speech-cpu-asr-whisper", "speech-cpu-tts-piper",
        "speech-cpu-api",
    ]  # fmt: skip
    # Nothing of the cluster is left: no container paths, no Service DNS names, no container ports.
    for proc in stack.processes:
        text = " ".join([*proc.args, *proc.env.values()])
        for cluster_only in (
            "/run/secrets",
            "/etc/kubespeech",
            "speech-cpu-redis:",
            "speech-cpu-license-proxy:",
        ):
            assert cluster_only not in text, (proc.name, cluster_only, text)
        assert "0.0.0.0" not in proc.env.values(), proc.env
    local_ports = [port for p in stack.processes for port in p.ports.values()]
    assert len(local_ports) == len(set(local_ports)) == 5
    api = stack.processes[-1]
    assert api.ports == {7100: 7311} and api.ready_url == "http://127.0.0.1:7311/ready"
    assert api.args == ["/opt/bin/kubespeech", "api"]
    redis_port = stack.processes[0].ports[6379]
    assert stack.processes[0].ready_tcp == redis_port
    assert (
        f"--port {redis_port}" in stack.processes[0].args[-1]
        and "/opt/bin/redis-server" in stack.processes[0].args[-1]
    )
    assert api.env["KUBESPEECH_REDIS_URL"] == f"redis://127.0.0.1:{redis_port}/0"
    proxy = stack.processes[1]
    assert api.env["KUBESPEECH_API_LICENSE_PROXY_URL"] == f"http://127.0.0.1:{proxy.ports[3369]}"
    assert proxy.env["KUBESPEECH_LICENSE_PORT"] == str(proxy.ports[3369])
    assert proxy.env["KUBESPEECH_LICENSE_DEV"] == "true" and "KUBESPEECH_LICENSE_KEY_FILE" not in proxy.env
    workers = stack.processes[2:4]
    for w in workers:
        assert w.ready_url == f"http://127.0.0.1:{w.env['KUBESPEECH_WORKER_HEALTH_PORT']}/readyz"

    # Secrets: materialized as private files; the API key only as its hash.
    keys = Path(api.env["KUBESPEECH_API_KEYS_FILE"])
    assert keys.read_text() == hash_key(KEY) + "\n" and KEY not in keys.read_text()
    password = Path(api.env["KUBESPEECH_REDIS_PASSWORD_FILE"])
    assert len(password.read_text()) >= 24
    for secret in (keys, password):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    # Every component reads the same Redis password; the Redis server is given it too.
    for w in workers:
        assert Path(w.env["KUBESPEECH_REDIS_PASSWORD_FILE"]).read_text() == password.read_text()
    models = yaml.safe_load(Path(api.env["KUBESPEECH_API_MODELS_FILE"]).read_text())
    assert {m["name"] for m in models} == {"whisper-tiny-en", "piper-joe-en"}


def test_a_license_file_is_used_instead_of_the_dev_license(tmp_path: Path) -> None:
    license_file = tmp_path / "license.key"
    license_file.write_text("eyJ-a-license-token")
    stack = make_plan(EXAMPLES / "cpu.yaml", tmp_path / "run", license_file=license_file)
    proxy = next(p for p in stack.processes if p.component == "license-proxy")
    assert "KUBESPEECH_LICENSE_DEV" not in proxy.env
    assert Path(proxy.env["KUBESPEECH_LICENSE_KEY_FILE"]).read_text() == "eyJ-a-license-token"


def test_external_redis_example_runs_on_a_given_redis(tmp_path: Path) -> None:
    stack = make_plan(EXAMPLES / "external-redis.yaml", tmp_path, redis_url="redis://127.0.0.1:6390/0")
    assert all(p.component != "redis" for p in stack.processes)
    for p in stack.processes:
        assert p.env["KUBESPEECH_REDIS_URL"] == "redis://127.0.0.1:6390/0"
        assert p.env["KUBESPEECH_REDIS_KEY_PREFIX"] == "speech-prod"  # two stacks may share a Redis
        assert not {"KUBESPEECH_REDIS_PASSWORD_FILE", "KUBESPEECH_REDIS_TLS_INSECURE_SKIP_VERIFY"} & set(
            p.env
        )


@pytest.mark.parametrize("example", ["single-gpu.yaml", "multi-pool.yaml"])
def test_gpu_examples_are_refused_with_the_reason(example: str, tmp_path: Path) -> None:
    with pytest.raises(LocalRunError, match="downloads models"):
        make_plan(EXAMPLES / example, tmp_path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kind: ConfigMap\n", "exactly one SpeechDeployment"),
        (": not yaml: [", "not valid YAML"),
        ("apiVersion: kubespeech.io/v1alpha1\nkind: SpeechDeployment\nspec: {}\n", "metadata.name"),
        (
            "apiVersion: kubespeech.io/v1alpha1\nkind: SpeechDeployment\nmetadata: {name: x}\n"
            "spec: {license: {secretRef: {name: l, key: k}}, api: {apiKeysSecretRef: {name: k, key: k}},\n"
            "       asr: {pools: [{name: a, modelName: m, engine: nope}]}}\n",
            "engine",
        ),
    ],
)
def test_bad_speech_deployments_get_a_clear_error(text: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(LocalRunError, match=message):
        plan(
            load_speech_deployment(text), tmp_path, api_key=KEY, api_port=7311, host="127.0.0.1",
            free_port=lambda _p: 20000, executables={},
        )  # fmt: skip


def test_dev_cli_reports_a_missing_or_invalid_file(tmp_path: Path) -> None:
    missing = subprocess.run(
        [KUBESPEECH, "dev", "-f", str(tmp_path / "nope.yaml")], capture_output=True, text=True, timeout=60
    )
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: ConfigMap\n")
    result = subprocess.run([KUBESPEECH, "dev", "-f", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "exactly one SpeechDeployment" in result.stderr
