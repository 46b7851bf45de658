"""End to end against a real cluster (KUBECONFIG): CRD, operator, examples/cpu.yaml, status, deletion.

Skipped unless KUBECONFIG is set. Needs kubectl on PATH and rights to create namespaces and CRDs. The pods
may not become ready (images may not be pullable from the cluster): this checks what the operator does
(children, owner references, status), then that garbage collection removes every child.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubespeech_operator.builders import CHILD_KINDS, build_children
from kubespeech_operator.spec import parse_spec
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not os.environ.get("KUBECONFIG"), reason="needs a real Kubernetes cluster: set KUBECONFIG"
    ),
]


def kubectl(*args: str, stdin: str | None = None, check: bool = True) -> str:
    binary = shutil.which("kubectl")
    if binary is None:
        pytest.skip("needs kubectl on PATH")
    result = subprocess.run([binary, *args], input=stdin, capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)}: {result.stderr}")
    return result.stdout


def get_json(*args: str) -> Any:
    return json.loads(kubectl("get", *args, "-o", "json"))


def eventually(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def namespace() -> Iterator[str]:
    name = f"kubespeech-e2e-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", name)
    kubectl("apply", "--server-side", "-f", str(ROOT / "crds" / "kubespeech.io_speechdeployments.yaml"))
    kubectl("wait", "--for=condition=Established", "crd/speechdeployments.kubespeech.io", "--timeout=60s")
    try:
        yield name
    finally:
        kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def operator(namespace: str) -> Iterator[subprocess.Popen[bytes]]:
    command = [sys.executable, "-m", "kubespeech.cli", "operator", "--namespace", namespace,
               "--liveness-port", str(free_port()), "--resync-interval", "5"]  # fmt: skip
    process = subprocess.Popen(
        command, env={**os.environ, "KUBESPEECH_OPERATOR_METRICS_PORT": str(free_port())}
    )
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def test_cpu_example_is_reconciled_and_cleaned_up(namespace: str, operator: subprocess.Popen[bytes]) -> None:
    example = yaml.safe_load((ROOT / "examples" / "cpu.yaml").read_text())
    example["metadata"]["namespace"] = namespace
    name = example["metadata"]["name"]
    spec = example["spec"]
    for ref in (spec["license"]["secretRef"], spec["api"]["apiKeysSecretRef"]):
        kubectl(
            "create", "secret", "generic", ref["name"], f"--from-literal={ref['key']}=e2e", "-n", namespace
        )
    kubectl("apply", "-f", "-", stdin=yaml.safe_dump(example))

    want = {(c["kind"], c["metadata"]["name"]) for c in build_children(name, namespace, parse_spec(spec))}
    want = {w for w in want if w[0] != "ServiceMonitor"}
    plurals = {kind: plural for _, kind, plural in CHILD_KINDS}

    def children() -> set[tuple[str, str]]:
        found = set()
        for kind in {k for k, _ in want}:
            for item in get_json(plurals[kind], "-n", namespace)["items"]:
                refs = item["metadata"].get("ownerReferences") or []
                if any(r["kind"] == "SpeechDeployment" and r["name"] == name for r in refs):
                    found.add((kind, item["metadata"]["name"]))
        return found

    eventually(lambda: want <= children(), 120, "every child with an owner reference")
    sd = eventually(lambda: (o := get_json("sd", name, "-n", namespace)).get("status", {}).get("conditions") and o,
                    120, "status conditions")  # fmt: skip
    status = sd["status"]
    assert status["observedGeneration"] == sd["metadata"]["generation"]
    assert {c["type"] for c in status["conditions"]} >= {"Ready", "Degraded", "ASRReady", "TTSReady"}
    assert status["endpoints"]["api"].startswith(f"http://{name}-api.{namespace}.svc")
    printed = kubectl("get", "sd", name, "-n", namespace)
    assert "READY" in printed and "ASR" in printed and "QUEUE" in printed

    kubectl("delete", "sd", name, "-n", namespace, "--wait=true", "--timeout=120s")
    eventually(lambda: not children(), 180, "garbage collection of every child")
