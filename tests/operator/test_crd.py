"""The SpeechDeployment CRD: generated file up to date, a valid structural schema, examples accepted, and a
table of invalid specs rejected by the schema and CEL rules (evaluated with cel-python) and by the Python
models alike, so `kubespeech render` and the operator refuse exactly what admission refuses.

The emulator here is fast and runs without binaries; test_crd_apiserver.py runs the same tables through a
real kube-apiserver, which is the reference (and checks that this emulator agrees with it case by case).
"""

from __future__ import annotations

import copy
import functools
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml

from kubespeech_operator.builders.crd import CRD_PATH, build_crd, crd_yaml
from kubespeech_operator.spec import SpecError, parse_spec, validate_name

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / CRD_PATH
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
EDGE_CASES = sorted((Path(__file__).parent / "data").glob("*.yaml"))
UPDATE = os.environ.get("KUBESPEECH_UPDATE_GOLDEN") == "1"


def test_crd_file_matches_models_golden() -> None:
    expected = crd_yaml()
    if UPDATE:
        CRD_FILE.write_text(expected)
    assert CRD_FILE.read_text() == expected, f"{CRD_PATH} is stale: run `make golden`"


@functools.cache
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_FILE.read_text())


def openapi() -> dict[str, Any]:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("version", ["1.28", kubernetes_validate.latest_version()])
def test_crd_is_a_valid_custom_resource_definition(version: str) -> None:
    kubernetes_validate.validate(crd(), version, strict=True)


def test_crd_names_and_columns() -> None:
    spec = crd()["spec"]
    assert crd()["metadata"]["name"] == "speechdeployments.kubespeech.io"
    assert spec["names"]["kind"] == "SpeechDeployment"
    assert spec["names"]["shortNames"] == ["sd", "speech"]
    assert spec["names"]["categories"] == ["kubespeech"]
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1" and version["storage"] and version["served"]
    assert version["subresources"] == {"status": {}}
    columns = {column["name"]: column["jsonPath"] for column in version["additionalPrinterColumns"]}
    assert columns["Ready"] == '.status.conditions[?(@.type=="Ready")].status'
    assert {"ASR", "TTS", "Queue", "Age"} <= set(columns)
    # Every printer column must point at a field the status schema declares (else it is pruned).
    status = openapi()["properties"]["status"]["properties"]
    for name in ("ASR", "TTS", "Queue"):
        assert columns[name].removeprefix(".status.") in status


def _walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from _walk(child, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}.*")
    if "items" in node:
        yield from _walk(node["items"], f"{path}[]")


def test_schema_is_structural_and_documented() -> None:
    undocumented, untyped = [], []
    for path, node in _walk(openapi()):
        forbidden = {"$ref", "oneOf", "allOf", "not", "additionalProperties"} & set(node)
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string"), f"{path}: anyOf only for int-or-string"
        assert not forbidden - {"additionalProperties"}, f"{path}: {forbidden}"
        if "additionalProperties" in node:
            assert "properties" not in node, f"{path}: properties and additionalProperties together"
        if "type" not in node and not node.get("x-kubernetes-int-or-string"):
            untyped.append(path)
        if (
            path.startswith((".spec", ".status"))
            and not path.endswith(("*", "[]"))
            and not node.get("description")
        ):
            undocumented.append(path)
    assert untyped == []
    assert undocumented == [], "kubectl explain needs a description on every field"


def test_strings_used_by_cel_rules_are_bounded() -> None:
    """The API server estimates each rule's cost from maxLength/maxItems; unbounded ones exceed the budget."""
    unbounded = []
    for path, node in _walk(openapi()):
        rules = " ".join(rule["rule"] for rule in node.get("x-kubernetes-validations", []))
        rules = re.sub(r"has\(self\.\w+\)", "", rules)  # a presence test costs the same for any length
        for name, child in node.get("properties", {}).items():
            if f"self.{name}" not in rules:
                continue
            if child.get("type") == "string" and "maxLength" not in child:
                unbounded.append(f"{path}.{name}")
            if child.get("type") == "array" and "maxItems" not in child:
                unbounded.append(f"{path}.{name}")
    assert unbounded == []


def test_preserve_unknown_fields_only_where_unavoidable() -> None:
    free = sorted(path for path, node in _walk(openapi()) if node.get("x-kubernetes-preserve-unknown-fields"))
    assert [path.split(".")[-1] for path in free] == ["affinity", "engineOptions", "labelSelector"] * 2


# --- an admission emulator: defaulting, schema (strict: unknown fields rejected), list maps, CEL rules ----


def _strict(node: dict[str, Any], path: str = "") -> dict[str, Any]:
    """Reject unknown fields as the API server does with field validation Strict (kubectl's default).

    Not in metadata: the CRD schema restricts only its name, the rest is ObjectMeta.
    """
    node = dict(node)
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields") and path != ".metadata":
        node["additionalProperties"] = False
    if "properties" in node:
        node["properties"] = {
            name: _strict(child, f"{path}.{name}") for name, child in node["properties"].items()
        }
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = _strict(node["additionalProperties"], f"{path}.*")
    if "items" in node:
        node["items"] = _strict(node["items"], f"{path}[]")
    return node


@functools.cache
def schema_validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(_strict(openapi()))


def apply_defaults(node: dict[str, Any], value: Any) -> Any:
    """Structural defaulting, as the API server does before validating."""
    if isinstance(value, dict) and "properties" in node:
        for name, child in node["properties"].items():
            if name not in value and "default" in child:
                value[name] = copy.deepcopy(child["default"])
            if name in value:
                value[name] = apply_defaults(child, value[name])
    elif isinstance(value, list) and "items" in node:
        return [apply_defaults(node["items"], item) for item in value]
    return value


_CEL_ENV = celpy.Environment()


@functools.cache
def _cel_program(rule: str) -> Callable[[Any], Any]:
    program = _CEL_ENV.program(_CEL_ENV.compile(rule))
    return lambda value: program.evaluate({"self": celpy.json_to_cel(value)})


def rule_violations(node: dict[str, Any], value: Any, path: str = "") -> list[str]:
    errors = []
    for rule in node.get("x-kubernetes-validations", []):
        try:
            passed = bool(_cel_program(rule["rule"])(value))
        except celpy.CELEvalError as exc:
            # The API server fails a rule whose evaluation fails, e.g. one reading a missing key.
            errors.append(f"{path or '<root>'}: {rule['message']} ({exc.args[0]})")
            continue
        if not passed:
            errors.append(f"{path or '<root>'}: {rule['message']}")
    if node.get("x-kubernetes-list-type") == "map" and isinstance(value, list):
        keys = [tuple(item.get(key) for key in node["x-kubernetes-list-map-keys"]) for item in value]
        errors += [f"{path}: duplicate key {key}" for key in set(keys) if keys.count(key) > 1]
    if isinstance(value, dict):
        for name, child in node.get("properties", {}).items():
            if name in value:
                errors += rule_violations(child, value[name], f"{path}.{name}")
    if isinstance(value, list) and "items" in node:
        for index, item in enumerate(value):
            errors += rule_violations(node["items"], item, f"{path}[{index}]")
    return errors


def admission_errors(document: dict[str, Any]) -> list[str]:
    document = apply_defaults(openapi(), copy.deepcopy(document))
    errors = [f"{e.json_path}: {e.message}" for e in schema_validator().iter_errors(document)]
    if errors:
        return errors  # the API server runs CEL only on objects that pass the schema
    return rule_violations(openapi(), document)


def python_error(document: dict[str, Any]) -> SpecError | None:
    try:
        validate_name(document["metadata"]["name"])
        parse_spec(document.get("spec") or {})
    except SpecError as exc:
        return exc
    return None


def test_every_cel_rule_compiles() -> None:
    rules = [
        rule["rule"] for _, node in _walk(openapi()) for rule in node.get("x-kubernetes-validations", [])
    ]
    assert len(rules) >= 15
    for rule in rules:
        _cel_program(rule)


@pytest.mark.parametrize("path", [*EXAMPLES, *EDGE_CASES], ids=lambda p: p.stem)
def test_valid_documents_pass_admission_and_python(path: Path) -> None:
    document = yaml.safe_load_all(path.read_text())
    (speech,) = [doc for doc in document if doc and doc.get("kind") == "SpeechDeployment"]
    assert admission_errors(speech) == []
    assert python_error(speech) is None


def test_admission_defaults_equal_python_defaults() -> None:
    """The API server's defaulting and the models' defaults produce the same spec."""
    for path in [*EXAMPLES, *EDGE_CASES]:
        (speech,) = [
            doc
            for doc in yaml.safe_load_all(path.read_text())
            if doc and doc.get("kind") == "SpeechDeployment"
        ]
        defaulted = apply_defaults(openapi(), copy.deepcopy(speech))["spec"]
        from_python = parse_spec(speech["spec"]).model_dump(by_alias=True, exclude_none=True)
        assert defaulted == from_python, path.name


# --- the invalid-spec table -----------------------------------------------------------------------------

BASE = yaml.safe_load((ROOT / "examples" / "cpu.yaml").read_text())


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(document: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = document
        for part in parents:
            node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
        if value is _DELETE:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


_DELETE = object()
ASR0 = "spec.asr.pools.0"
TTS0 = "spec.tts.pools.0"
WHISPER = BASE["spec"]["asr"]["pools"][0]

# (id, mutation, field path the Python models must name)
INVALID: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("negative api replicas", _set("spec.api.replicas", -1), "spec.api.replicas"),
    ("replicas as a string", _set("spec.api.replicas", "2"), "spec.api.replicas"),
    ("unknown field", _set(f"{ASR0}.gpus", 1), "spec.asr.pools[0].gpus"),
    ("negative pool replicas", _set(f"{ASR0}.replicas", -2), "spec.asr.pools[0].replicas"),
    (
        "min above max replicas",
        _set(f"{ASR0}.autoscaling", {"enabled": True, "minReplicas": 5, "maxReplicas": 2}),
        "spec.asr.pools[0].autoscaling.minReplicas",
    ),
    (
        "idle above min replicas",
        _set(f"{ASR0}.autoscaling", {"minReplicas": 1, "maxReplicas": 2, "idleReplicas": 2}),
        "spec.asr.pools[0].autoscaling.idleReplicas",
    ),
    (
        "hpa with min replicas 0",
        _set(f"{ASR0}.autoscaling", {"enabled": True, "mode": "hpa", "minReplicas": 0}),
        "spec.asr.pools[0].autoscaling.minReplicas",
    ),
    (
        "fallback above max replicas",
        _set(f"{ASR0}.autoscaling", {"enabled": True, "maxReplicas": 4, "fallbackReplicas": 5}),
        "spec.asr.pools[0].autoscaling.fallbackReplicas",
    ),
    (
        # maxReplicas left to its default (4): the API server fills it in before the rule reads it.
        "fallback above the default max replicas",
        _set(f"{ASR0}.autoscaling", {"fallbackReplicas": 5}),
        "spec.asr.pools[0].autoscaling.fallbackReplicas",
    ),
    (
        "polling interval 0",
        _set(f"{ASR0}.autoscaling", {"enabled": True, "pollingIntervalSeconds": 0}),
        "spec.asr.pools[0].autoscaling.pollingIntervalSeconds",
    ),
    (
        "keda with idle replicas between 0 and min",
        _set(f"{ASR0}.autoscaling", {"mode": "keda", "minReplicas": 3, "maxReplicas": 6, "idleReplicas": 1}),
        "spec.asr.pools[0].autoscaling.idleReplicas",
    ),
    (
        "unknown autoscaling mode",
        _set(f"{ASR0}.autoscaling", {"mode": "vpa"}),
        "spec.asr.pools[0].autoscaling.mode",
    ),
    (
        "cold start wait too long",
        _set(f"{ASR0}.autoscaling", {"coldStartWaitSeconds": 601}),
        "spec.asr.pools[0].autoscaling.coldStartWaitSeconds",
    ),
    ("external redis without external", _set("spec.redis", {"mode": "external"}), "spec.redis.external"),
    (
        "external redis without url",
        _set(
            "spec.redis", {"mode": "external", "external": {"passwordSecretRef": {"name": "r", "key": "p"}}}
        ),
        "spec.redis.external.url",
    ),
    (
        "redis url scheme",
        _set("spec.redis", {"mode": "external", "external": {"url": "http://r:6379"}}),
        "spec.redis.external.url",
    ),
    (
        "tls with plain redis url",
        _set(
            "spec.redis",
            {"mode": "external", "external": {"url": "redis://r:6379/0", "tls": {"enabled": True}}},
        ),
        "spec.redis.external.url",
    ),
    ("gpu on a piper pool", _set(f"{TTS0}.gpu", {"count": 1}), "spec.tts.pools[0].gpu.count"),
    (
        # Not a second default pool as well: one broken rule per case.
        "duplicate pool names",
        _set("spec.asr.pools", [WHISPER, {**WHISPER, "modelName": "other", "default": False}]),
        "spec.asr.pools[1].name",
    ),
    (
        "model uri scheme",
        _set(f"{ASR0}.model", {"source": "ftp://models/x.bin"}),
        "spec.asr.pools[0].model.source",
    ),
    ("relative model path", _set(f"{ASR0}.model", {"path": "models/x.bin"}), "spec.asr.pools[0].model.path"),
    (
        "source and path",
        _set(f"{ASR0}.model", {"source": "hf://a/b", "path": "/m"}),
        "spec.asr.pools[0].model.path",
    ),
    ("sha256 without source", _set(f"{ASR0}.model", {"sha256": "a" * 64}), "spec.asr.pools[0].model.sha256"),
    (
        "bad sha256",
        _set(f"{ASR0}.model", {"source": "hf://a/b", "sha256": "xyz"}),
        "spec.asr.pools[0].model.sha256",
    ),
    (
        "vocoder without source",
        _set(f"{TTS0}.model", {"path": "/m", "vocoder": {"source": "hf://a/b"}}),
        "spec.tts.pools[0].model.vocoder",
    ),
    (
        "vocoder on a piper pool",
        _set(f"{TTS0}.model", {"source": "hf://a/b", "vocoder": {"source": "hf://a/c"}}),
        "spec.tts.pools[0].model.vocoder",
    ),
    (
        "vocoder on an asr pool",
        _set(f"{ASR0}.model", {"source": "hf://a/b", "vocoder": {"source": "hf://a/c"}}),
        "spec.asr.pools[0].model.vocoder",
    ),
    ("tts engine on an asr pool", _set(f"{ASR0}.engine", "piper"), "spec.asr.pools[0].engine"),
    ("latest image tag", _set("spec.images", {"tag": "latest"}), "spec.images.tag"),
    (
        "latest redis image",
        _set("spec.redis", {"embedded": {"image": "redis:latest"}}),
        "spec.redis.embedded.image",
    ),
    (
        "unpinned pool image",
        _set(f"{ASR0}.image", "registry.example.com/asr-worker"),
        "spec.asr.pools[0].image",
    ),
    ("ingress without host", _set("spec.api.ingress", {"enabled": True}), "spec.api.ingress.host"),
    (
        "two default pools",
        _set("spec.asr.pools", [WHISPER, {**WHISPER, "name": "b", "modelName": "b"}]),
        "spec.asr.pools",
    ),
    ("no pools", lambda d: (d["spec"].pop("asr"), d["spec"].pop("tts")), "spec"),
    (
        "bad quantity",
        _set(f"{ASR0}.resources", {"limits": {"cpu": "two"}}),
        "spec.asr.pools[0].resources.limits.cpu",
    ),
    (
        "exists toleration with value",
        _set(f"{ASR0}.tolerations", [{"key": "k", "operator": "Exists", "value": "v"}]),
        "spec.asr.pools[0].tolerations[0].value",
    ),
    (
        "env value and valueFrom",
        _set(
            f"{ASR0}.env",
            [{"name": "A", "value": "x", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
        ),
        "spec.asr.pools[0].env[0].valueFrom",
    ),
    (
        "env valueFrom with two sources",
        _set(
            f"{ASR0}.env",
            [
                {
                    "name": "A",
                    "valueFrom": {"fieldRef": {"fieldPath": "x"}, "secretKeyRef": {"name": "s", "key": "k"}},
                }
            ],
        ),
        "spec.asr.pools[0].env[0].valueFrom",
    ),
    ("pool name not a dns label", _set(f"{ASR0}.name", "GPU_pool"), "spec.asr.pools[0].name"),
    (
        "batch size zero",
        _set(f"{ASR0}.batching", {"maxBatchSize": 0}),
        "spec.asr.pools[0].batching.maxBatchSize",
    ),
    ("too many gpus", _set(f"{ASR0}.gpu", {"count": 17}), "spec.asr.pools[0].gpu.count"),
    ("service port out of range", _set("spec.api.service", {"port": 70000}), "spec.api.service.port"),
    ("missing license", _set("spec.license", _DELETE), "spec.license"),
    ("unknown redis mode", _set("spec.redis", {"mode": "sentinel"}), "spec.redis.mode"),
    (
        "license upstream not https",
        _set("spec.licenseProxy", {"upstreamUrl": "http://lic"}),
        "spec.licenseProxy.upstreamUrl",
    ),
    (
        "stt cache on external redis without a key",
        lambda d: (
            _set("spec.redis", {"mode": "external", "external": {"url": "redis://r:6379/0"}})(d),
            _set("spec.cache", {"asr": {"enabled": True}})(d),
        ),
        "spec.cache.asr.encryptionKeySecretRef",
    ),
    (
        "cache max bytes below 1 MiB",
        _set("spec.cache", {"tts": {"maxBytes": 1000}}),
        "spec.cache.tts.maxBytes",
    ),
    ("cache ttl of zero", _set("spec.cache", {"asr": {"ttlSeconds": 0}}), "spec.cache.asr.ttlSeconds"),
    ("cache unknown task", _set("spec.cache", {"stt": {"enabled": True}}), "spec.cache.stt"),
    ("name too long", _set("metadata.name", "s" * 31), "metadata.name"),
    ("name not a dns label", _set("metadata.name", "Speech.1"), "metadata.name"),
]


@pytest.mark.parametrize(("mutate", "field_path"), [pytest.param(m, f, id=i) for i, m, f in INVALID])
def test_invalid_spec_is_rejected_by_admission_and_python(
    mutate: Callable[[dict[str, Any]], None], field_path: str
) -> None:
    document = copy.deepcopy(BASE)
    mutate(document)
    assert admission_errors(document), "the CRD schema and CEL rules accept it"
    error = python_error(document)
    assert error is not None, "the Python models accept it"
    assert error.field_path == field_path, error


def test_invalid_table_is_large_and_distinct() -> None:
    assert len(INVALID) >= 15
    assert len({case[0] for case in INVALID}) == len(INVALID)


# Rules only Python checks (across pools and tasks, where the error names both pools): the operator reports
# them as a Degraded condition. The CRD accepts these; `render` and the operator refuse them with a field
# path. test_crd_apiserver.py checks that a real API server admits exactly these.
PYTHON_ONLY: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    (
        "shared queue with another engine",
        _set(
            "spec.asr.pools", [WHISPER, {"name": "gpu", "modelName": WHISPER["modelName"], "engine": "nemo"}]
        ),
        "spec.asr.pools[1].engine",
    ),
    (
        "shared queue with another model",
        _set(
            "spec.asr.pools", [WHISPER, {**WHISPER, "name": "b", "default": False, "model": {"path": "/m"}}]
        ),
        "spec.asr.pools[1].model",
    ),
    (
        "asr and tts share a model name",
        _set(f"{TTS0}.modelName", WHISPER["modelName"]),
        "spec.tts.pools[0].modelName",
    ),
    (
        "alias equal to another model",
        _set(f"{TTS0}.aliases", [WHISPER["modelName"]]),
        "spec.tts.pools[0].aliases[0]",
    ),
]


@pytest.mark.parametrize(("mutate", "field_path"), [pytest.param(m, f, id=i) for i, m, f in PYTHON_ONLY])
def test_cross_pool_rules_are_checked_in_python(
    mutate: Callable[[dict[str, Any]], None], field_path: str
) -> None:
    document = copy.deepcopy(BASE)
    mutate(document)
    assert admission_errors(document) == []
    error = python_error(document)
    assert error is not None and error.field_path == field_path, error


def test_emulator_can_fail() -> None:
    """The admission emulator rejects a CEL-only violation through CEL, not through the schema."""
    document = copy.deepcopy(BASE)
    document["spec"]["tts"]["pools"][0]["gpu"] = {"count": 1}
    defaulted = apply_defaults(openapi(), copy.deepcopy(document))
    assert list(schema_validator().iter_errors(defaulted)) == []
    assert rule_violations(openapi(), defaulted) == [".spec.tts.pools[0]: piper pools run on CPU: remove gpu"]


def test_crd_built_in_memory_equals_file() -> None:
    assert build_crd() == crd()


def test_status_schema_keeps_what_the_operator_writes() -> None:
    """A real API server prunes status fields the schema does not declare: the operator's shape must fit."""
    document = copy.deepcopy(BASE)
    document["status"] = {
        "observedGeneration": 3,
        "conditions": [
            {
                "type": "Ready",
                "status": "False",
                "reason": "PodsUnschedulable",
                "message": "asr/whisper: 0/1 pods scheduled: Insufficient nvidia.com/gpu (3 nodes)",
                "lastTransitionTime": "2026-11-25T10:00:00Z",
                "observedGeneration": 3,
            }
        ],
        "asrReplicas": "0/1",
        "ttsReplicas": "1/1",
        "queueDepth": 7,
        "pools": [
            {
                "name": "whisper",
                "task": "asr",
                "modelName": "whisper-tiny-en",
                "replicas": 1,
                "readyReplicas": 0,
                "desiredReplicas": 1,
                "queueDepth": 7,
                "activeStreams": 0,
                "message": "0/1 pods scheduled",
            }
        ],
        "endpoints": {
            "api": "http://speech-cpu-api.speech.svc:7100",
            "external": "https://speech.example.com",
        },
    }
    assert admission_errors(document) == []
    document["status"]["pools"][0]["unknown"] = 1
    assert admission_errors(document), "the emulator must see undeclared status fields"


def default_violations(schema: dict[str, Any]) -> list[str]:
    """What the API server checks of every default when it admits the CRD: the default as written (nested
    defaults are not applied first) against its node's schema and CEL rules; a rule that reads a key missing
    from the default fails, as ``self.mode`` does on ``{}``."""
    problems = []
    for path, node in _walk(schema):
        if "default" not in node:
            continue
        value = copy.deepcopy(node["default"])
        validator = jsonschema.Draft7Validator(_strict(node))
        problems += [f"{path}: {error.message}" for error in validator.iter_errors(value)]
        problems += rule_violations(node, value, path)
    return problems


_HAS_GUARD = re.compile(r"!has\(self\.\w+\) \|\| ")


def strip_has_guards(schema: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """A copy of ``schema`` whose rules on defaulted objects lose their ``!has(self.x) ||`` guards, and the
    paths of the objects that had one (every one of them must then fail on its default ``{}``)."""
    stripped = copy.deepcopy(schema)
    guarded = set()
    for path, node in _walk(stripped):
        rules = node.get("x-kubernetes-validations", [])
        if "default" in node and any(_HAS_GUARD.search(rule["rule"]) for rule in rules):
            guarded.add(path)
            for rule in rules:
                rule["rule"] = _HAS_GUARD.sub("", rule["rule"])
    return stripped, guarded


def test_defaults_as_written_pass_schema_and_rules() -> None:
    """The API server evaluates each rule on the default as written ({}), not on the defaulted object."""
    assert default_violations(openapi()) == []


def test_default_check_fails_rules_without_has_guards() -> None:
    """Without its has() guards the CRD is what the API server refused: the check must fail every such rule."""
    stripped, guarded = strip_has_guards(openapi())
    assert {
        ".spec.redis",
        ".spec.redis.embedded",
        ".spec.api.ingress",
        ".spec.asr.pools[].autoscaling",
    } <= guarded
    failing = {problem.split(":", 1)[0] for problem in default_violations(stripped)}
    assert failing == guarded
    assert ".spec.redis: mode external needs external.url (no such member in mapping: 'mode')" in (
        default_violations(stripped)
    )


def test_crd_fits_client_side_apply() -> None:
    """`kubectl apply` stores the whole object in an annotation limited to 256 KiB (total annotations)."""
    import json

    assert len(json.dumps(crd(), separators=(",", ":"))) < 200_000
