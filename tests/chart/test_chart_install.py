"""`helm install` of the chart on a real kube-apiserver v1.28 (RBAC on), as a user would: the CRD from
crds/, the operator's Deployment, ServiceAccount and RBAC, for the cluster-wide and namespaced scenarios;
then `kubectl apply` of examples/cpu.yaml is admitted. No kubelet here: pods stay Pending; what runs in
them is tested by the operator tests (as the chart runs it: its uid, its token, its RBAC)."""

from __future__ import annotations

import itertools
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.chart.test_chart import CHART, helm
from tests.envtest import ApiServer, ensure_namespace, wait_crd_established

ROOT = Path(__file__).resolve().parents[2]
_releases = itertools.count(1)


def run(*command: str, kubeconfig: Path) -> str:
    result = subprocess.run(
        [*command, "--kubeconfig", str(kubeconfig)], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.parametrize("values", ["default-values.yaml", "namespaced-values.yaml"])
def test_helm_install_on_a_real_api_server(apiserver: ApiServer, tmp_path: Path, values: str) -> None:
    index = next(_releases)
    kubeconfig = apiserver.kubeconfig(tmp_path / "kubeconfig")
    namespace = f"kubespeech-install-{index}"
    with apiserver.client() as client:
        for watched in ("speech-prod", "speech-staging"):  # the namespaced scenario's Roles live there
            ensure_namespace(client, watched)
    out = run(helm(), "install", f"ks{index}", str(CHART), "--namespace", namespace, "--create-namespace",
              "-f", str(CHART / "ci" / values), "--wait=false", kubeconfig=kubeconfig)  # fmt: skip
    assert "STATUS: deployed" in out, out
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
