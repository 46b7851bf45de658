"""The SpeechDeployment CRD on a real kube-apiserver v1.28 (tests/envtest.py): both copies install, examples
and golden inputs are admitted and defaulted as the models expect, and every invalid spec is refused by
admission or by the models, naming the same field.

This is the reference for test_crd.py's cel-python emulator: each case also checks that the emulator agrees.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from kubespeech_operator.builders.crd import CRD_NAME, PLURAL
from kubespeech_operator.render import load_speech_deployment
from kubespeech_operator.spec import parse_spec, validate_name
from tests.envtest import ApiServer, api_path, apply, ensure_namespace, wait_crd_established
from tests.operator.test_crd import (
    BASE,
    EDGE_CASES,
    EXAMPLES,
    INVALID,
    PYTHON_ONLY,
    admission_errors,
    python_error,
    strip_has_guards,
)

ROOT = Path(__file__).resolve().parents[2]
CRD_COPIES = {
    "crds": ROOT / "crds" / "kubespeech.io_speechdeployments.yaml",
    "chart": ROOT / "charts" / "kubespeech" / "crds" / "kubespeech.io_speechdeployments.yaml",
}
# Namespaces of this module only: the API server is shared with the operator tests.
VALID_NAMESPACE = "crd-admission"
INVALID_NAMESPACE = "crd-admission-invalid"
MANAGER = "crd-admission-test"

# Invalid specs the API server admits and only the operator's models refuse: `kubespeech render` fails and
# the operator sets Degraded (reason SpecInvalid) with the field path. Each compares pools with one another.
# CEL could express them within the cost budget (a pairwise rule over 16 pools is admitted on v1.28), but a
# CEL rule can only report the list, e.g. spec.asr.pools, where the models name the pool, its field and the
# pool it conflicts with. README.md ("What admission checks and what only the operator checks") lists them.
SERVER_ADMITS = {
    "shared queue with another engine": "two pools on one queue must run one engine: compares pools pairwise",
    "shared queue with another model": "two pools on one queue must load one model: compares pools pairwise",
    "asr and tts share a model name": "a model name belongs to one task: compares asr pools with tts pools",
    "alias equal to another model": "an alias is not another pool's model name: compares aliases with pools",
}
# Cases the server refuses while naming only an ancestor of the field the models name.
SERVER_NAMES_ANCESTOR = {
    "duplicate pool names": "server-side apply refuses duplicate list-map keys while building the patch, "
    "before validation, and names the list (spec.asr.pools), not the duplicate item",
}
CORPUS = [*INVALID, *PYTHON_ONLY]


@pytest.fixture(scope="module")
def client(apiserver: ApiServer) -> Iterator[httpx.Client]:
    with apiserver.client() as admin:
        yield admin


def _apply_crd(client: httpx.Client, path: Path) -> httpx.Response:
    return apply(client, yaml.safe_load(path.read_text()), "customresourcedefinitions", manager=MANAGER)


@pytest.fixture(scope="module")
def crd_installed(client: httpx.Client) -> None:
    """The canonical CRD applied (create or update: the operator tests install the same one)."""
    response = _apply_crd(client, CRD_COPIES["crds"])
    assert response.status_code in (200, 201), response.text
    wait_crd_established(client, CRD_NAME)
    ensure_namespace(client, VALID_NAMESPACE)
    ensure_namespace(client, INVALID_NAMESPACE)


def _dry_run_apply(client: httpx.Client, manifest: dict[str, Any], plural: str) -> httpx.Response:
    """Server-side apply with strict field validation, as `kubectl apply --server-side --dry-run=server`:
    full admission, nothing stored, so invalid cases leave the shared server as they found it."""
    meta = manifest["metadata"]
    return client.patch(
        api_path(str(manifest["apiVersion"]), plural, meta.get("namespace"), str(meta["name"])),
        content=json.dumps(manifest),
        params={"fieldManager": MANAGER, "force": "true", "fieldValidation": "Strict", "dryRun": "All"},
        headers={"Content-Type": "application/apply-patch+yaml"},
    )


# --- the CRD itself ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("copy_name", sorted(CRD_COPIES))
def test_crd_copy_is_accepted_and_established(client: httpx.Client, copy_name: str) -> None:
    response = _apply_crd(client, CRD_COPIES[copy_name])
    assert response.status_code in (200, 201), f"{copy_name} copy refused: {response.text}"
    established = wait_crd_established(client, CRD_NAME)
    # Stored as sent: every default, rule and fieldPath survives admission unchanged.
    sent = yaml.safe_load(CRD_COPIES[copy_name].read_text())["spec"]["versions"][0]["schema"]
    assert established["spec"]["versions"][0]["schema"] == sent


def _server_schema_path(walk_path: str) -> str:
    """`.spec.asr.pools[].autoscaling` as the API server names that schema node in a CRD error."""
    path = "spec.validation.openAPIV3Schema"
    for token in re.findall(r"\.[^.\[]+|\[\]", walk_path):
        path += ".items" if token == "[]" else f".properties[{token[1:]}]"
    return path


def test_rules_without_has_guards_are_refused_on_their_defaults(client: httpx.Client) -> None:
    """The failure this CRD had: a rule on an object defaulted to {} reading a field of it. Stripped of its
    has() guards, the CRD must be refused at every such object, the way test_crd.py's check predicts."""
    crd = yaml.safe_load(CRD_COPIES["crds"].read_text())
    schema = crd["spec"]["versions"][0]["schema"]
    schema["openAPIV3Schema"], guarded = strip_has_guards(schema["openAPIV3Schema"])
    response = _dry_run_apply(client, crd, "customresourcedefinitions")
    assert response.status_code == 422, response.text
    # A rule's fieldPath follows ".default" in the error (v1.28 even chains those of one object's rules).
    causes = response.json()["details"]["causes"]
    refused = {re.sub(r"\.default\..*$", ".default", cause["field"]) for cause in causes}
    assert refused == {f"{_server_schema_path(path)}.default" for path in guarded}, response.text


# --- valid documents ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [*EXAMPLES, *EDGE_CASES], ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_valid_document_is_admitted_and_stored_as_the_models_default_it(
    client: httpx.Client, crd_installed: None, path: Path
) -> None:
    document = copy.deepcopy(load_speech_deployment(path.read_text(), str(path)))
    document["metadata"]["namespace"] = VALID_NAMESPACE
    url = api_path(document["apiVersion"], PLURAL, VALID_NAMESPACE, document["metadata"]["name"])
    response = apply(client, document, PLURAL, manager=MANAGER)
    assert response.status_code in (200, 201), response.text
    try:
        stored = client.get(url)
        assert stored.status_code == 200, stored.text
        validate_name(stored.json()["metadata"]["name"])
        parsed = parse_spec(stored.json()["spec"])
        # The API server's defaulting and the models' defaults agree: the operator sees what the user sees.
        assert stored.json()["spec"] == parsed.model_dump(by_alias=True, exclude_none=True)
        assert parsed == parse_spec(document["spec"])
    finally:
        # Nothing left for an operator under test to reconcile (no finalizer: none watches this namespace).
        client.delete(url)


# --- the invalid-spec table -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """What the API server and the models say about one case."""

    status: int
    server_fields: tuple[str, ...]
    server_message: str
    model_field: str | None
    emulator_refuses: bool

    @property
    def server_refuses(self) -> bool:
        return self.status >= 400

    def describe(self) -> str:
        server = (
            f"refused ({self.status}) at {list(self.server_fields)}" if self.server_refuses else "admitted"
        )
        return f"server {server}: {self.server_message}; models: {self.model_field or 'accepted'}"


_SSA_PATH = re.compile(
    r"failed to create typed patch object \([^)]*\): (\.(?:[\w-]+|\[[^\]]*\])(?:\.[\w-]+|\[[^\]]*\])*)"
)


def _ssa_field(message: str, document: dict[str, Any]) -> str | None:
    """The field a server-side apply error names before validation (type mismatch, unknown field, duplicate
    list-map key: the server answers 500 without causes), e.g. `.spec.asr.pools[name="whisper"].gpus`, as a
    field path with list indexes: spec.asr.pools[0].gpus."""
    match = _SSA_PATH.search(message)
    if match is None:
        return None
    field, node = "", document
    for name, key in re.findall(r"\.([\w-]+)|\[([^\]]*)\]", match.group(1)):
        if name:
            field += f".{name}" if field else name
            node = node.get(name) if isinstance(node, dict) else None
            continue
        wanted = dict(re.findall(r'(\w+)="([^"]*)"', key))
        items = node if isinstance(node, list) else []
        index = next((i for i, item in enumerate(items) if wanted.items() <= item.items()), None)
        if index is None:
            return None
        field += f"[{index}]"
        node = items[index]
    return field


def _verdict(client: httpx.Client, mutate: Callable[[dict[str, Any]], None]) -> Verdict:
    document = copy.deepcopy(BASE)
    document["metadata"]["namespace"] = INVALID_NAMESPACE
    mutate(document)
    response = _dry_run_apply(client, document, PLURAL)
    body = response.json()
    fields: tuple[str, ...] = ()
    message = ""
    if response.status_code >= 400:
        message = body.get("message", "")
        # "<nil>": the server's note that CEL rules were skipped because the schema already failed.
        causes = (body.get("details") or {}).get("causes") or []
        fields = tuple(cause["field"] for cause in causes if cause.get("field") not in (None, "", "<nil>"))
        if not fields:
            fields = tuple(field for field in [_ssa_field(message, document)] if field)
    error = python_error(document)
    return Verdict(
        status=response.status_code,
        server_fields=fields,
        server_message=message,
        model_field=error.field_path if error else None,
        emulator_refuses=bool(admission_errors(document)),
    )


@pytest.fixture(scope="module")
def verdicts(client: httpx.Client, crd_installed: None) -> dict[str, Verdict]:
    return {case: _verdict(client, mutate) for case, mutate, _ in CORPUS}


@pytest.mark.parametrize(("case", "field_path"), [pytest.param(c, f, id=c) for c, _, f in CORPUS])
def test_invalid_spec_is_refused_by_the_server_or_the_models(
    verdicts: dict[str, Verdict], case: str, field_path: str
) -> None:
    verdict = verdicts[case]
    assert verdict.server_refuses or verdict.model_field, f"nothing refuses it: {verdict.describe()}"
    # The models refuse everything admission refuses, naming the same field.
    assert verdict.model_field == field_path, verdict.describe()
    if verdict.server_refuses:
        assert case not in SERVER_ADMITS, (
            f"now refused at admission: drop it from SERVER_ADMITS; {verdict.describe()}"
        )
        if case in SERVER_NAMES_ANCESTOR:
            ancestors = [
                field for field in verdict.server_fields if field_path.startswith((f"{field}.", f"{field}["))
            ]
            assert ancestors, verdict.describe()
            assert field_path not in verdict.server_fields, "exact now: drop it from SERVER_NAMES_ANCESTOR"
        else:
            assert field_path in verdict.server_fields, verdict.describe()
    else:
        assert case in SERVER_ADMITS, f"admitted but not a known model-only rule: {verdict.describe()}"
    # cel-python with jsonschema (test_crd.py) must reach the server's verdict, or it proves nothing.
    assert verdict.emulator_refuses == verdict.server_refuses, verdict.describe()


def test_server_admits_exactly_the_known_model_only_cases(verdicts: dict[str, Verdict]) -> None:
    admitted = {case for case, verdict in verdicts.items() if not verdict.server_refuses}
    assert admitted == set(SERVER_ADMITS)
    assert set(SERVER_NAMES_ANCESTOR) <= set(verdicts)
