"""A real Kubernetes API server for tests: etcd + kube-apiserver on loopback, as controller-runtime's envtest.

Binaries come from ``$KUBEBUILDER_ASSETS`` (the envtest convention: ``kube-apiserver`` and ``etcd`` in one
folder), else ``kube-apiserver`` from the project's ``../shared/k8s/`` (a compressed v1.28.0 build, unpacked
once into ``.tools/k8s/``) and ``etcd`` from PATH (Debian's ``etcd-server``). :func:`find_binaries` says what
is missing when neither is there, so fixtures can skip with that reason.

The server runs with RBAC authorization, a throwaway CA and serving certificate, static tokens for an admin
(``system:masters``), ServiceAccount token signing (so ``TokenRequest`` mints real tokens) and an audit log
of every request at Metadata level, which the RBAC tests read to compare granted and used verbs.
No controllers run: no garbage collection, no ReplicaSets, no pods scheduled.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import lzma
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parents[1]
SHARED_APISERVER = ROOT.parent / "shared" / "k8s" / "kube-apiserver-v1.28.0-linux-amd64.xz"
UNPACKED = ROOT / ".tools" / "k8s"

AUDIT_POLICY = """apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Metadata
"""


class BinariesMissing(Exception):
    """etcd or kube-apiserver cannot be found; the message names what is missing and where it was looked for."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_binaries() -> tuple[Path, Path]:
    """(kube-apiserver, etcd), or BinariesMissing naming what is missing."""
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets:
        in_assets = Path(assets) / "kube-apiserver", Path(assets) / "etcd"
        if all(path.exists() for path in in_assets):
            return in_assets
    apiserver = UNPACKED / "kube-apiserver"
    if not apiserver.exists():
        if not SHARED_APISERVER.exists():
            raise BinariesMissing(
                "no kube-apiserver: set KUBEBUILDER_ASSETS (setup-envtest) or provide "
                f"../shared/k8s/{SHARED_APISERVER.name}"
            )
        UNPACKED.mkdir(parents=True, exist_ok=True)
        partial = apiserver.with_suffix(".partial")
        with lzma.open(SHARED_APISERVER) as source, partial.open("wb") as target:
            shutil.copyfileobj(source, target, 1 << 20)
        partial.chmod(0o755)
        partial.rename(apiserver)
    etcd = shutil.which("etcd") or ("/usr/bin/etcd" if Path("/usr/bin/etcd").exists() else None)
    if etcd is None:
        raise BinariesMissing("no etcd: install Debian's etcd-server (apt-get install -y etcd-server)")
    return apiserver, Path(etcd)


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _certificates(workdir: Path) -> None:
    """A throwaway CA, and a serving certificate for 127.0.0.1/localhost signed by it."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubespeech-envtest-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = _key()
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (workdir / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (workdir / "srv.crt").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (workdir / "srv.key").write_bytes(_pem_key(server_key))
    sa_key = _key()
    (workdir / "sa.key").write_bytes(_pem_key(sa_key))
    (workdir / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def write_kubeconfig(path: Path, server: str, ca_file: Path, token: str, namespace: str = "default") -> Path:
    """A kubeconfig with one context: ``token`` against ``server``, trusting ``ca_file``."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "envtest", "cluster": {"server": server, "certificate-authority": str(ca_file)}}
        ],
        "users": [{"name": "user", "user": {"token": token}}],
        "contexts": [
            {"name": "envtest", "context": {"cluster": "envtest", "user": "user", "namespace": namespace}}
        ],
        "current-context": "envtest",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


@dataclass
class ApiServer:
    """A running etcd + kube-apiserver pair, with an admin token and helpers for tests."""

    url: str
    workdir: Path
    admin_token: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def ca_file(self) -> Path:
        return self.workdir / "ca.crt"

    @property
    def audit_log(self) -> Path:
        return self.workdir / "audit.log"

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def client(self, token: str | None = None, **kwargs: Any) -> httpx.Client:
        """A synchronous client authenticated as the admin (or with ``token``)."""
        return httpx.Client(
            base_url=self.url,
            verify=self.ssl_context(),
            headers={"Authorization": f"Bearer {token or self.admin_token}"},
            timeout=30,
            **kwargs,
        )

    def kubeconfig(self, path: Path, token: str | None = None, namespace: str = "default") -> Path:
        return write_kubeconfig(path, self.url, self.ca_file, token or self.admin_token, namespace)

    def service_account_token(self, namespace: str, name: str, *, seconds: int = 3600) -> str:
        """A real ServiceAccount token (TokenRequest API), as a pod of that ServiceAccount gets."""
        with self.client() as client:
            response = client.post(
                f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
                json={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                      "spec": {"expirationSeconds": seconds}},
            )  # fmt: skip
            response.raise_for_status()
            return str(response.json()["status"]["token"])

    def audit_events(self) -> Iterator[dict[str, Any]]:
        """Every request the server audited so far (one JSON event per line)."""
        if not self.audit_log.exists():
            return
        with self.audit_log.open() as log:
            for line in log:
                if line.strip():
                    yield json.loads(line)

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _wait_ready(url: str, ca_file: Path, token: str, processes: list[subprocess.Popen[bytes]],
                logs: list[Path], timeout_s: float = 60.0) -> None:  # fmt: skip
    context = ssl.create_default_context(cafile=str(ca_file))
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        for process, log in zip(processes, logs, strict=True):
            if process.poll() is not None:
                raise RuntimeError(f"{log.stem} exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            response = httpx.get(
                f"{url}/readyz", verify=context, headers={"Authorization": f"Bearer {token}"}, timeout=2
            )
            if response.status_code == 200:
                return
            last = response.text[-500:]
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.2)
    raise RuntimeError(f"kube-apiserver not ready in {timeout_s:.0f} s: {last}")


def start_apiserver(*, authorization: str = "RBAC") -> ApiServer:
    """Start etcd and kube-apiserver on free loopback ports; BinariesMissing when they cannot be found."""
    apiserver_bin, etcd_bin = find_binaries()
    workdir = Path(tempfile.mkdtemp(prefix="ks-envtest-"))
    _certificates(workdir)
    admin_token = secrets.token_hex(16)
    (workdir / "tokens.csv").write_text(f"{admin_token},admin,admin,system:masters\n")
    (workdir / "audit-policy.yaml").write_text(AUDIT_POLICY)
    etcd_port, peer_port, api_port = _free_port(), _free_port(), _free_port()
    etcd_log, api_log = workdir / "etcd.log", workdir / "kube-apiserver.log"
    processes: list[subprocess.Popen[bytes]] = []
    server = ApiServer(f"https://127.0.0.1:{api_port}", workdir, admin_token, processes)
    try:
        processes.append(
            subprocess.Popen(
                [str(etcd_bin), "--name", "t", "--data-dir", str(workdir / "etcd"),
                 "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
                 "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
                 "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
                 "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
                 "--initial-cluster", f"t=http://127.0.0.1:{peer_port}",
                 # etcd fsyncs every write; a test cluster trades durability for speed.
                 "--unsafe-no-fsync"],
                stdout=etcd_log.open("wb"), stderr=subprocess.STDOUT,
            )
        )  # fmt: skip
        processes.append(
            subprocess.Popen(
                [str(apiserver_bin), f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                 "--bind-address=127.0.0.1", f"--secure-port={api_port}",
                 f"--tls-cert-file={workdir / 'srv.crt'}", f"--tls-private-key-file={workdir / 'srv.key'}",
                 f"--client-ca-file={workdir / 'ca.crt'}", f"--token-auth-file={workdir / 'tokens.csv'}",
                 f"--authorization-mode={authorization}",
                 "--service-account-issuer=https://kubernetes.default.svc",
                 f"--service-account-key-file={workdir / 'sa.pub'}",
                 f"--service-account-signing-key-file={workdir / 'sa.key'}",
                 "--service-cluster-ip-range=10.96.0.0/24",
                 "--disable-admission-plugins=ServiceAccount", "--enable-priority-and-fairness=false",
                 f"--audit-policy-file={workdir / 'audit-policy.yaml'}",
                 f"--audit-log-path={workdir / 'audit.log'}", "--audit-log-format=json",
                 "--audit-log-mode=blocking"],
                stdout=api_log.open("wb"), stderr=subprocess.STDOUT,
            )
        )  # fmt: skip
        _wait_ready(server.url, server.ca_file, admin_token, processes, [etcd_log, api_log])
    except BaseException:
        server.stop()
        raise
    return server


# ---- helpers tests use against the server -------------------------------------------------------------


def api_path(api_version: str, plural: str, namespace: str | None = None, name: str | None = None) -> str:
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if namespace:
        base += f"/namespaces/{namespace}"
    base += f"/{plural}"
    return f"{base}/{name}" if name else base


def apply(client: httpx.Client, manifest: Mapping[str, Any], plural: str, *, manager: str = "test",
          force: bool = True, strict: bool = True) -> httpx.Response:  # fmt: skip
    """Server-side apply ``manifest`` as ``kubectl apply --server-side`` does (strict field validation)."""
    meta = manifest.get("metadata") or {}
    params = {"fieldManager": manager, "force": "true" if force else "false"}
    if strict:
        params["fieldValidation"] = "Strict"
    return client.patch(
        api_path(str(manifest["apiVersion"]), plural, meta.get("namespace"), str(meta["name"])),
        content=json.dumps(manifest),
        params=params,
        headers={"Content-Type": "application/apply-patch+yaml"},
    )


def wait_crd_established(client: httpx.Client, name: str, timeout_s: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        crd = client.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}").json()
        conditions = {c["type"]: c["status"] for c in (crd.get("status") or {}).get("conditions") or []}
        if conditions.get("Established") == "True":
            # Discovery and the REST handler follow the condition by a moment.
            group, version = crd["spec"]["group"], crd["spec"]["versions"][0]["name"]
            plural = crd["spec"]["names"]["plural"]
            if client.get(f"/apis/{group}/{version}/{plural}").status_code == 200:
                return crd
        if time.monotonic() > deadline:
            raise AssertionError(f"CRD {name} not Established in {timeout_s} s: {crd.get('status')}")
        time.sleep(0.1)


def ensure_namespace(client: httpx.Client, name: str) -> None:
    response = client.post("/api/v1/namespaces", json={"apiVersion": "v1", "kind": "Namespace",
                                                        "metadata": {"name": name}})  # fmt: skip
    assert response.status_code in (201, 409), response.text


def b64(value: str | bytes) -> str:
    return base64.b64encode(value.encode() if isinstance(value, str) else value).decode()
