"""The operator's pure parts: field-manager bookkeeping, scheduler messages, conditions, kubeconfig."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import yaml

from kubespeech_operator.conditions import Condition, merge_conditions, transitions
from kubespeech_operator.errors import (
    ChildRejectedError,
    ClusterUnavailableError,
    ForbiddenError,
    from_api_error,
    retry_delay,
)
from kubespeech_operator.kube import ApiError, CredentialsError, Resource, load_connection_info
from kubespeech_operator.reconciler import owned_by, replicas_owner, touched_by_others
from kubespeech_operator.scheduling import pool_scheduling_message, summarize_scheduler_message

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


def managed(*entries: tuple[str, dict[str, object], str | None]) -> dict[str, object]:
    return {"metadata": {"managedFields": [
        {"manager": m, "operation": "Apply", "fieldsV1": f, **({"subresource": sub} if sub else {})}
        for m, f, sub in entries]}}  # fmt: skip


def test_only_foreign_spec_or_metadata_writes_count_as_drift() -> None:
    ours = ("kubespeech-operator", {"f:spec": {"f:replicas": {}}}, None)
    assert not touched_by_others(managed(ours))
    # Status writers and the Deployment controller's revision annotation are bookkeeping, not drift.
    assert not touched_by_others(managed(ours, ("kube-controller-manager", {"f:status": {}}, "status")))
    revision = {"f:metadata": {"f:annotations": {"f:deployment.kubernetes.io/revision": {}}}}
    assert not touched_by_others(managed(ours, ("kube-controller-manager", revision, None)))
    assert touched_by_others(managed(ours, ("kubectl-edit", {"f:spec": {"f:template": {}}}, None)))
    assert touched_by_others(managed(ours, ("team-tool", {"f:metadata": {"f:labels": {"f:team": {}}}}, None)))


def test_replicas_owner_and_controller_owner_reference() -> None:
    obj = managed(("kubespeech-autoscaler", {"f:spec": {"f:replicas": {}}}, None))
    assert replicas_owner(obj, "kubespeech-autoscaler") and not replicas_owner(obj, "kubespeech-operator")
    ref = {"kind": "SpeechDeployment", "uid": "u1", "controller": True}
    assert owned_by({"metadata": {"ownerReferences": [ref]}}, "u1")
    assert not owned_by({"metadata": {"ownerReferences": [ref]}}, "u2")
    assert not owned_by({"metadata": {"ownerReferences": [{**ref, "controller": False}]}}, "u1")
    assert not owned_by({"metadata": {}}, "")
