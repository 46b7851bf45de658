"""The operator's pure parts: drift detection and merge patches, scheduler messages, conditions, kubeconfig."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import pytest
import yaml

from kubespeech_operator.conditions import Condition, merge_conditions, transitions
from kubespeech_operator.diffing import INPUT_HASH, contains, merge_patch_for, normalized
from kubespeech_operator.errors import (
    ChildRejectedError,
    ClusterUnavailableError,
    ForbiddenError,
    from_api_error,
    retry_delay,
)
from kubespeech_operator.kube import ApiError, CredentialsError, Resource, load_connection_info
from kubespeech_operator.scheduling import pool_scheduling_message, summarize_scheduler_message


def deployment(**pod_spec: object) -> dict[str, object]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "d", "labels": {"app.kubernetes.io/name": "kubespeech"}, "annotations": {INPUT_HASH: "h1"}},
        "spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "c", "image": "i:1",
                 "resources": {"requests": {"cpu": "1000m", "memory": "1Gi"}}}], **pod_spec}}},
    }  # fmt: skip


def test_contains_tolerates_server_defaults_and_quantity_normalisation() -> None:
    want = deployment()
    live = deployment(dnsPolicy="ClusterFirst", schedulerName="default-scheduler")
    live["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"] = {
        "cpu": "1",
        "memory": "1024Mi",
    }
    live["spec"]["template"]["spec"]["containers"][0]["terminationMessagePath"] = "/dev/termination-log"
    assert contains(live, want)
    assert merge_patch_for(live, want) is None


def test_hand_edit_is_drift_even_with_the_same_input_hash() -> None:
    live = deployment()
    live["spec"]["template"]["spec"]["containers"][0]["image"] = "evil:1"
    patch = merge_patch_for(live, deployment())
    assert patch is not None and patch["spec"]["template"]["spec"]["containers"][0]["image"] == "i:1"


def test_removed_scheduling_fields_and_owned_labels_are_nulled() -> None:
    live = deployment(nodeSelector={"a": "1", "b": "2"}, runtimeClassName="nvidia")
    live["metadata"]["labels"].update({"kubespeech.io/pool": "old", "team": "ml"})
    want = deployment(nodeSelector={"b": "2"})
    want["metadata"]["annotations"][INPUT_HASH] = "h2"
    patch = merge_patch_for(live, want)
    assert patch is not None
    pod = patch["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"b": "2", "a": None}
    assert pod["runtimeClassName"] is None
    # Owned label prefixes are cleaned; labels others added are left alone.
    assert patch["metadata"]["labels"]["kubespeech.io/pool"] is None
    assert "team" not in patch["metadata"]["labels"]


def test_secret_string_data_is_compared_as_the_server_stores_it() -> None:
    want = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "annotations": {INPUT_HASH: "h"}},
            "stringData": {"password": "pw"}}  # fmt: skip
    stored = normalized(want)
    assert stored["data"] == {"password": base64.b64encode(b"pw").decode()} and "stringData" not in stored
    assert merge_patch_for(stored, want) is None


GPU_MESSAGE = (
    "0/3 nodes are available: 1 node(s) had untolerated taint {nvidia.com/gpu: present}, 2 Insufficient "
    "nvidia.com/gpu. preemption: 0/3 nodes are available: 3 No preemption victims found for incoming pod."
)


@pytest.mark.parametrize(
    ("message", "summary"),
    [
        (GPU_MESSAGE, "untolerated taint nvidia.com/gpu (1 node), Insufficient nvidia.com/gpu (2 nodes)"),
        ("0/3 nodes are available: 3 Insufficient nvidia.com/gpu.", "Insufficient nvidia.com/gpu (3 nodes)"),
        ("0/5 nodes are available: 5 node(s) didn't match Pod's node affinity/selector.",
         "nodeSelector/affinity matches no node (5 nodes)"),
        ("pod has unbound immediate PersistentVolumeClaims", "pod has unbound immediate PersistentVolumeClaims"),
    ],
)  # fmt: skip
def test_scheduler_messages_are_summarised(message: str, summary: str) -> None:
    assert summarize_scheduler_message(message) == summary


def test_pool_message_counts_scheduled_pods() -> None:
    pending = {"status": {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": GPU_MESSAGE}]}}  # fmt: skip
    running = {"status": {"phase": "Running", "conditions": [{"type": "PodScheduled", "status": "True"}]}}
    assert pool_scheduling_message("asr/l4", [running]) is None
    assert pool_scheduling_message("asr/l4", [pending, pending, running]) == (
        "asr/l4: 1/3 pods scheduled: untolerated taint nvidia.com/gpu (1 node), Insufficient nvidia.com/gpu (2 nodes)"
    )


def test_last_transition_time_is_kept_while_the_status_does_not_change() -> None:
    first = merge_conditions([], [Condition("Ready", "False", "A")], observed_generation=1, now="t1")
    same = merge_conditions(first, [Condition("Ready", "False", "B", "m")], observed_generation=2, now="t2")
    flipped = merge_conditions(same, [Condition("Ready", "True", "C")], observed_generation=2, now="t3")
    assert first[0]["lastTransitionTime"] == "t1"
    assert (
        same[0]["lastTransitionTime"] == "t1"
        and same[0]["reason"] == "B"
        and same[0]["observedGeneration"] == 2
    )
    assert flipped[0]["lastTransitionTime"] == "t3"
    assert [c["reason"] for c in transitions(first, same)] == ["B"]
    assert transitions(same, same) == []


def test_api_errors_map_to_retry_policies() -> None:
    assert isinstance(from_api_error(ApiError(422, "PATCH", "/x", "bad"), "apply"), ChildRejectedError)
    assert from_api_error(ApiError(422, "PATCH", "/x", "bad"), "apply").permanent
    assert isinstance(from_api_error(ApiError(403, "GET", "/x", "no"), "apply"), ForbiddenError)
    unavailable = from_api_error(ApiError(503, "GET", "/x", "down"), "apply")
    assert isinstance(unavailable, ClusterUnavailableError) and not unavailable.permanent
    assert [retry_delay(unavailable, n) for n in (0, 1, 3, 10)] == [1, 2, 8, 60]
    assert retry_delay(from_api_error(ApiError(403, "GET", "/x", "no"), "apply"), 0) == 60


def test_kubeconfig_is_read_at_call_time_with_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_text("x")
    config = {
        "current-context": "c",
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u", "namespace": "ns"}}],
        "clusters": [
            {"name": "k", "cluster": {"server": "https://k:6443", "certificate-authority": "ca.crt"}}
        ],
        "users": [{"name": "u", "user": {"token": "t"}}],
    }
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(config))
    info = load_connection_info(tmp_path / "kubeconfig")
    assert (info.server, info.token, info.default_namespace) == ("https://k:6443", "t", "ns")
    assert info.ca_path == str(tmp_path / "ca.crt")
    config["users"] = [{"name": "u", "user": {"exec": {"command": "aws"}}}]
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(config))
    with pytest.raises(CredentialsError, match="exec"):
        load_connection_info(tmp_path / "kubeconfig")


def test_resource_paths() -> None:
    assert Resource("v1", "pods").path("ns", "p") == "/api/v1/namespaces/ns/pods/p"
    assert Resource("apps/v1", "deployments").path("ns") == "/apis/apps/v1/namespaces/ns/deployments"
    assert (
        Resource("kubespeech.io/v1alpha1", "speechdeployments").path("n", "x", "status").endswith("/x/status")
    )


async def test_rotated_service_account_token_is_reread(tmp_path: Path) -> None:
    from aiohttp import web

    from kubespeech_operator.kube import FileTokenAuth

    expected = {"token": "first"}

    async def handler(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {expected['token']}":
            return web.json_response({"message": "Unauthorized"}, status=401)
        return web.json_response({"kind": "Namespace", "metadata": {"name": "ok"}})

    app = web.Application()
    app.router.add_get("/api/v1/namespaces/ok", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    token = tmp_path / "token"
    token.write_text("first\n")
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", auth=FileTokenAuth(token, refresh_s=3600))
    try:
        assert (await client.get("/api/v1/namespaces/ok")).status_code == 200
        token.write_text("second")
        expected["token"] = "second"  # the kubelet rotated the token; the cached one is now refused
        assert (await client.get("/api/v1/namespaces/ok")).status_code == 200
    finally:
        await client.aclose()
        await runner.cleanup()
