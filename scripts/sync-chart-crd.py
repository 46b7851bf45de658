#!/usr/bin/env python3
"""Copy the canonical CRD (crds/) into the Helm chart (charts/kubespeech/crds/), marked to survive uninstall.

`--check` exits 1 when the chart's copy is stale (tests/chart runs the same comparison).
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CANONICAL = ROOT / "crds" / "kubespeech.io_speechdeployments.yaml"
CHART_COPY = ROOT / "charts" / "kubespeech" / "crds" / "kubespeech.io_speechdeployments.yaml"
HEADER = (
    "# Generated from crds/kubespeech.io_speechdeployments.yaml by scripts/sync-chart-crd.py; do not edit.\n"
    "# Helm installs files in crds/ before the templates and never deletes or upgrades them: upgrade the CRD\n"
    "# with `kubectl apply --server-side -f` on this file. resource-policy keep states the same intent.\n"
)


def render(canonical_text: str) -> str:
    """The chart's copy of the CRD: the canonical object plus the keep annotation."""
    crd = yaml.safe_load(canonical_text)
    metadata = crd.setdefault("metadata", {})
    metadata["annotations"] = {**(metadata.get("annotations") or {}), "helm.sh/resource-policy": "keep"}
    return HEADER + yaml.safe_dump(crd, sort_keys=False, width=120, allow_unicode=True)


def main(argv: list[str]) -> int:
    wanted = render(CANONICAL.read_text())
    if "--check" in argv:
        if not CHART_COPY.exists() or CHART_COPY.read_text() != wanted:
            print(f"{CHART_COPY.relative_to(ROOT)} is stale: run scripts/sync-chart-crd.py", file=sys.stderr)
            return 1
        return 0
    CHART_COPY.parent.mkdir(parents=True, exist_ok=True)
    CHART_COPY.write_text(wanted)
    print(f"wrote {CHART_COPY.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
