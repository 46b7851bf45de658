"""The SpeechDeployment CRD, generated from the pydantic models so that schema, docs and checks cannot drift.

``crds/kubespeech.io_speechdeployments.yaml`` is this function's output, checked in (a test fails when
they differ; ``make golden`` rewrites it). The pydantic JSON schema is turned into a Kubernetes structural
schema: references inlined, optional fields unwrapped from ``anyOf [X, null]``, titles dropped, and
sub-objects that have defaults get ``default: {}`` so the API server fills in their fields.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from kubespeech_operator.spec import (
    API_VERSION,
    DNS_LABEL_PATTERN,
    KIND,
    MAX_NAME_LENGTH,
    SpeechDeploymentSpec,
    SpeechDeploymentStatus,
)

GROUP, VERSION = API_VERSION.split("/")
PLURAL = "speechdeployments"
CRD_NAME = f"{PLURAL}.{GROUP}"
CRD_PATH = "crds/kubespeech.io_speechdeployments.yaml"

# Keys of pydantic's JSON schema that a structural schema keeps as they are.
_KEPT = {
    "type",
    "description",
    "default",
    "enum",
    "pattern",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "required",
    "x-kubernetes-validations",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-int-or-string",
}


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline a ``$ref`` (and single-member ``allOf``), keeping the referring node's own keys on top."""
    node = dict(node)
    if "allOf" in node and len(node["allOf"]) == 1:
        node = {**node.pop("allOf")[0], **node}
    ref = node.pop("$ref", None)
    if ref is not None:
        target = defs[ref.rsplit("/", 1)[-1]]
        node = {**target, **node}
    return node


def _structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    node = _resolve(node, defs)
    if node.get("x-kubernetes-int-or-string"):
        return {k: v for k, v in node.items() if k in _KEPT or k == "anyOf"}
    if "anyOf" in node:
        members = [member for member in node["anyOf"] if member.get("type") != "null"]
        outer = {k: v for k, v in node.items() if k != "anyOf"}
        if outer.get("default", "") is None:
            del outer["default"]
        if len(members) != 1:
            raise ValueError(f"cannot express a union in a structural schema: {node}")
        return _structural({**_resolve(members[0], defs), **outer}, defs)
    result = {k: copy.deepcopy(v) for k, v in node.items() if k in _KEPT}
    if result.get("enum") and "maxLength" not in result and all(isinstance(v, str) for v in result["enum"]):
        # Bounds the CEL cost estimate of rules comparing this field (an unbounded string is costed at the
        # request size limit, and the sum over all pools must stay within the CRD's budget).
        result["maxLength"] = max(len(value) for value in result["enum"])
    if "description" in result:
        # Docstrings wrap lines; kubectl explain re-wraps text itself.
        result["description"] = " ".join(result["description"].split())
    if result.get("default", "") is None:
        del result["default"]
    if "properties" in node:
        required = set(node.get("required", []))
        properties = {}
        for name, child in node["properties"].items():
            built = _structural(child, defs)
            nullable = "anyOf" in child and any(m.get("type") == "null" for m in child["anyOf"])
            # A sub-object with its own defaults: default it to {} so the API server fills it in.
            if name not in required and not nullable and "default" not in built and "properties" in built:
                built = _ordered({**built, "default": {}})
            properties[name] = built
        result["properties"] = properties
    elif isinstance(node.get("additionalProperties"), dict):
        result["additionalProperties"] = _structural(node["additionalProperties"], defs)
    if "items" in node:
        result["items"] = _structural(node["items"], defs)
    return _ordered(result)


# Order of keys in the generated YAML: what a reader looks for first comes first.
_ORDER = ["type", "description", "required", "default", "enum", "x-kubernetes-int-or-string", "anyOf"]


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    first = {key: node[key] for key in _ORDER if key in node}
    return {**first, **{key: value for key, value in node.items() if key not in first}}


def _schema_of(model: type[SpeechDeploymentSpec] | type[SpeechDeploymentStatus]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(raw, raw.get("$defs", {}))


def openapi_schema() -> dict[str, Any]:
    """The openAPIV3Schema of the SpeechDeployment kind."""
    return {
        "type": "object",
        "description": (
            "A self-hosted speech stack: API server, ASR/TTS worker pools scaled on queue depth, license proxy "
            "and Redis, reconciled by the kubespeech operator."
        ),
        "required": ["spec"],
        "properties": {
            "apiVersion": {
                "type": "string",
                "description": "APIVersion of this object: kubespeech.io/v1alpha1.",
            },
            "kind": {"type": "string", "description": "Kind of this object: SpeechDeployment."},
            # Kubernetes lets a CRD restrict only metadata.name (and generateName) here; a schema limit rather
            # than a CEL rule, whose estimated cost on an unbounded name exceeds the budget on older servers.
            "metadata": {
                "type": "object",
                "properties": {
                    "name": {
                        "type": "string",
                        "description": "Name of the stack; children are named <name>-<component>, so a DNS label "
                        f"of at most {MAX_NAME_LENGTH} characters.",
                        "maxLength": MAX_NAME_LENGTH,
                        "pattern": DNS_LABEL_PATTERN,
                    }
                },
            },
            "spec": _schema_of(SpeechDeploymentSpec),
            "status": _schema_of(SpeechDeploymentStatus),
        },
    }


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition manifest."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/name": "kubespeech", "app.kubernetes.io/part-of": "kubespeech"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": ["sd", "speech"],
                "categories": ["kubespeech"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {
                            "name": "Ready",
                            "type": "string",
                            "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
                            "description": "Whether the whole stack serves requests.",
                        },
                        {
                            "name": "ASR",
                            "type": "string",
                            "jsonPath": ".status.asrReplicas",
                            "description": "ASR worker pods ready/desired.",
                        },
                        {
                            "name": "TTS",
                            "type": "string",
                            "jsonPath": ".status.ttsReplicas",
                            "description": "TTS worker pods ready/desired.",
                        },
                        {
                            "name": "Queue",
                            "type": "integer",
                            "jsonPath": ".status.queueDepth",
                            "description": "Jobs waiting across all model queues.",
                        },
                        {
                            "name": "Reason",
                            "type": "string",
                            "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
                            "priority": 1,
                            "description": "Why the stack is (not) ready.",
                        },
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


CRD_HEADER = (
    "# Generated from operator/kubespeech_operator/spec.py by kubespeech_operator.builders.crd (`make golden`).\n"
    "# Do not edit by hand: change the models; tests/operator/test_crd.py fails when this file is stale.\n"
)


class _NoAliasDumper(yaml.SafeDumper):
    """Writes repeated sub-trees out in full (YAML anchors confuse readers and some tools)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str_representer(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    # Multi-line strings (the models file, scripts) as literal blocks, readable in golden files and kubectl.
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_NoAliasDumper.add_representer(str, _str_representer)


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_NoAliasDumper, sort_keys=False, width=120, allow_unicode=True)


def crd_yaml() -> str:
    return CRD_HEADER + dump_yaml(build_crd())
