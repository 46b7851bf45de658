"""`helm install` of the chart on a real kube-apiserver v1.28 (RBAC on), as a user would: the CRD from
crds/, the operator's Deployment, ServiceAccount and RBAC, for every ci/ scenario (a SpeechDeployment from
values, which the API server admits against the CRD helm installed just before; the operator's ServiceMonitor
once the Prometheus Operator's CRD is there; the dashboard ConfigMap); then `kubectl apply` of
examples/cpu.yaml is admitted. No kubelet here: pods stay Pending; what runs in them is tested by the
operator tests (as the chart runs it: its uid, its token, its RBAC)."""

from __future__ import annotations

import base64
import itertools
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.chart.test_chart import CHART, CI_VALUES, helm
from tests.envtest import ApiServer, apply, ensure_namespace, wait_crd_established

ROOT = Path(__file__).resolve().parents[2]
_releases = itertools.count(1)


def run(*command: str, kubeconfig: Path) -> str:
    result = subprocess.run(
        [*command, "--kubeconfig", str(kubeconfig)], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


SERVICE_MONITOR_CRD = "servicemonitors.monitoring.coreos.com"


@pytest.fixture
def service_monitor_crd(apiserver: ApiServer) -> Iterator[None]:
    """The ServiceMonitor CRD, as the Prometheus Operator installs it before any chart may use the kind (its
    schema left open: kubespeech does not ship the Prometheus Operator's). Deleted afterwards: the operator
    tests on this server expect it absent unless they add it."""
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": SERVICE_MONITOR_CRD},
        "spec": {
            "group": "monitoring.coreos.com",
            "scope": "Namespaced",
            "names": {"kind": "ServiceMonitor", "listKind": "ServiceMonitorList", "plural": "servicemonitors",
                      "singular": "servicemonitor"},
            "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}],
        },
    }  # fmt: skip
    with apiserver.client() as client:
        assert apply(client, crd, "customresourcedefinitions").status_code in (200, 201)
        wait_crd_established(client, SERVICE_MONITOR_CRD)
    yield
    path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{SERVICE_MONITOR_CRD}"
    with apiserver.client() as client:
        client.delete(path)
        deadline = time.monotonic() + 30
        while client.get(path).status_code != 404:
            assert time.monotonic() < deadline, "the ServiceMonitor CRD was not deleted in 30 s"
            time.sleep(0.1)


def get_object(client: httpx.Client, path: str) -> dict[str, Any]:
    response = client.get(path)
    assert response.status_code == 200, f"{path}: {response.status_code} {response.text}"
    result: dict[str, Any] = response.json()
    return result


@pytest.mark.parametrize("values", [p.name for p in CI_VALUES])
def test_helm_install_on_a_real_api_server(
    apiserver: ApiServer, tmp_path: Path, values: str, request: pytest.FixtureRequest
) -> None:
    if values == "servicemonitor-values.yaml":
        request.getfixturevalue("service_monitor_crd")
    index = next(_releases)
    kubeconfig = apiserver.kubeconfig(tmp_path / "kubeconfig")
    namespace = f"kubespeech-install-{index}"
    with apiserver.client() as client:
        # The namespaced scenario's Roles live in the watched namespaces; the dashboard goes to monitoring.
        for existing in ("speech-prod", "speech-staging", "monitoring"):
            ensure_namespace(client, existing)
    out = run(helm(), "install", f"ks{index}", str(CHART), "--namespace", namespace, "--create-namespace",
              "-f", str(CHART / "ci" / values), "--wait=false", kubeconfig=kubeconfig)  # fmt: skip
    assert "STATUS: deployed" in out, out
    check_scenario(apiserver, kubeconfig, values, release=f"ks{index}", namespace=namespace, notes=out)
    with apiserver.client() as client:
        crd = wait_crd_established(client, "speechdeployments.kubespeech.io")
        assert crd["spec"]["names"]["shortNames"] == ["sd", "speech"]
        deployments = client.get(f"/apis/apps/v1/namespaces/{namespace}/deployments").json()["items"]
        (operator,) = deployments
        pod = operator["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == 65532
        assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["KUBESPEECH_OPERATOR_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert operator["spec"]["template"]["metadata"]["labels"]["kubespeech.io/operator"] == "true"
    run(helm(), "uninstall", f"ks{index}", "--namespace", namespace, kubeconfig=kubeconfig)
    with apiserver.client() as client:
        # The CRD stays after uninstall (helm keeps crds/), so SpeechDeployments are never deleted with it.
        assert (
            client.get(
                "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/speechdeployments.kubespeech.io"
            ).status_code
            == 200
        )


def test_kubectl_applies_the_crd_and_the_cpu_example(apiserver: ApiServer, tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("needs kubectl on PATH")
    kubeconfig = apiserver.kubeconfig(tmp_path / "kubeconfig")
    run(kubectl, "apply", "--server-side", "-f", str(ROOT / "crds" / "kubespeech.io_speechdeployments.yaml"),
        kubeconfig=kubeconfig)  # fmt: skip
    with apiserver.client() as client:
        wait_crd_established(client, "speechdeployments.kubespeech.io")
        ensure_namespace(client, "speech")
    out = run(kubectl, "apply", "--server-side", "--field-manager", "user", "-f", str(ROOT / "examples" / "cpu.yaml"),
              kubeconfig=kubeconfig)  # fmt: skip
    assert "speechdeployment.kubespeech.io/speech-cpu serverside-applied" in out
    listed = run(kubectl, "get", "sd", "-n", "speech", kubeconfig=kubeconfig)
    assert listed.split()[:5] == ["NAME", "READY", "ASR", "TTS", "QUEUE"], listed


def check_scenario(apiserver: ApiServer, kubeconfig: Path, values: str, *, release: str, namespace: str,
                   notes: str) -> None:  # fmt: skip
    """What each optional part of the chart leaves on the server, and the next commands NOTES.txt prints."""
    assert "port-forward" in notes and "/waves/v1/tts" in notes and "/waves/v1/stt/" in notes, notes
    with apiserver.client() as client:
        if values.startswith("speechdeployment"):
            listed = client.get(f"/apis/kubespeech.io/v1alpha1/namespaces/{namespace}/speechdeployments")
            (stack,) = listed.json()["items"]
            name = stack["metadata"]["name"]
            assert f"svc/{name}-api" in notes, notes
            # The API server applied the CRD's defaults: the CRD was installed and served before the object.
            assert stack["spec"]["redis"]["mode"] == "embedded" and "networkPolicy" in stack["spec"]
            secrets = {
                s["metadata"]["name"]: s["data"]
                for s in client.get(f"/api/v1/namespaces/{namespace}/secrets").json()["items"]
                if s["type"] != "helm.sh/release.v1"  # helm's record of the release
            }
            ref = stack["spec"]["api"]["apiKeysSecretRef"]
            if values == "speechdeployment-values.yaml":
                assert f"{name}-api-keys" in notes, notes
                assert stack["spec"]["license"]["secretRef"]["name"] in secrets
                key = secrets[ref["name"]][ref["key"]]
                assert base64.b64decode(key).startswith(b"ks_")
                # An upgrade keeps the key clients already hold.
                run(helm(), "upgrade", release, str(CHART), "--namespace", namespace,
                    "-f", str(CHART / "ci" / values), kubeconfig=kubeconfig)  # fmt: skip
                after = get_object(client, f"/api/v1/namespaces/{namespace}/secrets/{ref['name']}")
                assert after["data"][ref["key"]] == key
            else:
                assert not secrets  # the user brings both Secrets
        if values == "servicemonitor-values.yaml":
            monitor = get_object(
                client,
                f"/apis/monitoring.coreos.com/v1/namespaces/{namespace}/servicemonitors/{release}-kubespeech",
            )
            service = get_object(
                client, f"/api/v1/namespaces/{namespace}/services/{release}-kubespeech-metrics"
            )
            assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"] == "metrics"
        if values == "dashboard-values.yaml":
            config_map = get_object(
                client, f"/api/v1/namespaces/monitoring/configmaps/{release}-kubespeech-dashboard"
            )
            assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
            assert '"uid": "kubespeech-overview"' in config_map["data"]["kubespeech.json"]
