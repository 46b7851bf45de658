"""LicenseValid tells the truth: a real license proxy (real signed keys) publishes its verdict in the stack's
Redis, and the operator, on the real API server, reports valid, expired and missing licenses as they are."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.conftest import RedisServer
from tests.license.conftest import StartProxy, Vendor, prefix, start_proxy, vendor  # noqa: F401 - fixtures
from tests.operator.conftest import RunningOperator
from tests.operator.k8s import Kube, condition, cpu_spec, wait_for


async def license_condition(kube: Kube, name: str, status: str) -> dict[str, Any]:
    async def reported() -> Any:
        c = condition(await kube.sd(name), "LicenseValid")
        return c if c and c["status"] == status else None

    return await wait_for(reported, what=f"LicenseValid={status}")  # type: ignore[no-any-return]


@pytest.mark.parametrize("case", ["valid", "expired"])
async def test_license_condition_reads_the_proxys_verdict(
    kube: Kube,
    operator: RunningOperator,
    redis_server: RedisServer,
    vendor: Vendor,  # noqa: F811
    start_proxy: StartProxy,  # noqa: F811
    prefix: str,  # noqa: F811
    case: str,
) -> None:
    if case == "valid":
        token = vendor.token(mode="offline", license_id="lic_op_valid", expires_in=3600)
    else:
        token = vendor.token(mode="offline", license_id="lic_op_old", now=time.time() - 7200, expires_in=3600)
    await start_proxy(token)
    await kube.create_license_secret()
    spec = cpu_spec(redis={"mode": "external", "external": {"url": redis_server.url}, "keyPrefix": prefix})
    await kube.create_sd("lic", spec)

    if case == "valid":
        c = await license_condition(kube, "lic", "True")
        assert c["reason"] == "LicenseValid" and "lic_op_valid" in c["message"]
        assert condition(await kube.sd("lic"), "Degraded")["status"] == "False"
    else:
        c = await license_condition(kube, "lic", "False")
        assert c["reason"] == "LicenseExpired" and "lic_op_old" in c["message"] and "expired" in c["message"]
        degraded = condition(await kube.sd("lic"), "Degraded")
        assert degraded["status"] == "True" and degraded["reason"] == "LicenseExpired"
        assert condition(await kube.sd("lic"), "Ready")["status"] == "False"
    assert token not in str(await kube.sd("lic"))


async def test_license_condition_names_a_missing_secret(kube: Kube, operator: RunningOperator) -> None:
    await kube.create_sd("nolic", cpu_spec())
    c = await license_condition(kube, "nolic", "False")
    assert c["reason"] == "LicenseSecretMissing"
    assert c["message"] == f"license Secret 'license' not found in namespace {kube.namespace}"


async def test_license_condition_is_unknown_without_a_verdict_or_a_ready_proxy(
    kube: Kube, operator: RunningOperator, redis_server: RedisServer
) -> None:
    """Redis reachable but no proxy ever published: not reported as valid (the old behaviour said True as
    soon as the proxy's TCP port answered)."""
    await kube.create_license_secret()
    spec = cpu_spec(redis={"mode": "external", "external": {"url": redis_server.url}, "keyPrefix": "noproxy"})
    await kube.create_sd("unk", spec)
    c = await license_condition(kube, "unk", "Unknown")
    assert c["reason"] == "LicenseProxyNotReady"
