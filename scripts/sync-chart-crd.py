#!/usr/bin/env python3
"""Copy the canonical CRD (crds/) into the Helm chart (charts/kubespeech/crds/), marked to survive uninstall.

It also writes the schema of its name and spec into the chart's values.schema.json (`definitions`), which
checks `speechDeployment.name` and `.spec` before anything is installed. `--check` exits 1 when either is stale
(tests/chart runs the same comparisons).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CANONICAL = ROOT / "crds" / "kubespeech.io_speechdeployments.yaml"
CHART_COPY = ROOT / "charts" / "kubespeech" / "crds" / "kubespeech.io_speechdeployments.yaml"
VALUES_SCHEMA = ROOT / "charts" / "kubespeech" / "values.schema.json"
# Required in the CRD, but the chart fills them when they are left out (from speechDeployment.licenseKey and
# speechDeployment.generateApiKey); the template fails with a message when it cannot, and the API server
# still enforces the CRD's own `required`.
FILLED_BY_CHART = {(): {"license"}, ("api",): {"apiKeysSecretRef"}}
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


def json_schema(node: Any, path: tuple[str, ...] = ()) -> Any:
    """A CRD's structural OpenAPI schema as JSON Schema (draft 7) for helm: objects reject unknown keys (the
    API server would silently prune them, so a typo in values would vanish), int-or-string stays `anyOf`,
    and the Kubernetes extensions (CEL rules, list types) are left to the API server."""
    if isinstance(node, list):
        return [json_schema(item, path) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "description":
            continue
        if key == "properties":
            out[key] = {name: json_schema(sub, (*path, name)) for name, sub in value.items()}
        elif key == "required":
            kept = [name for name in value if name not in FILLED_BY_CHART.get(path, set())]
            if kept:
                out[key] = kept
        else:
            out[key] = json_schema(value, path)
    open_object = node.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in node
    if "properties" in node and not open_object:
        out["additionalProperties"] = False
    return out


def render_values_schema(canonical_text: str, values_schema_text: str) -> str:
    """values.schema.json with `definitions.speechDeploymentName` and `speechDeploymentSpec` generated from
    the canonical CRD."""
    crd = yaml.safe_load(canonical_text)
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    root = version["schema"]["openAPIV3Schema"]["properties"]
    schema = json.loads(values_schema_text)
    definitions = schema.setdefault("definitions", {})
    definitions["speechDeploymentName"] = json_schema(root["metadata"]["properties"]["name"])
    definitions["speechDeploymentSpec"] = json_schema(root["spec"])
    return json.dumps(schema, indent=2) + "\n"


def main(argv: list[str]) -> int:
    canonical = CANONICAL.read_text()
    wanted = {
        CHART_COPY: render(canonical),
        VALUES_SCHEMA: render_values_schema(canonical, VALUES_SCHEMA.read_text()),
    }
    if "--check" in argv:
        stale = [path for path, text in wanted.items() if not path.exists() or path.read_text() != text]
        for path in stale:
            print(f"{path.relative_to(ROOT)} is stale: run scripts/sync-chart-crd.py", file=sys.stderr)
        return 1 if stale else 0
    for path, text in wanted.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
