"""Decide whether a live child differs from its desired manifest, and the JSON merge patch that fixes it.

The API server defaults and normalises what it stores (extra fields, ``1000m`` → ``1``, Secret
``stringData`` → base64 ``data``, omitted empty values), so "equal" means: every field of the desired
manifest is present in the live object with an equivalent value. A JSON merge patch cannot remove a key
unless it says ``null``; keys the operator owns but no longer wants are nulled explicitly.
"""

from __future__ import annotations

import base64
import copy
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

INPUT_HASH = "kubespeech.io/input-hash"
OWNED_LABEL_PREFIXES = ("app.kubernetes.io/", "kubespeech.io/")

# Subtrees wholly written by the builders: a key there that the desired manifest lacks is removed.
# (Elsewhere, extra keys are server defaults or other controllers' business and are left alone.)
OWNED_SUBTREES: tuple[tuple[str, ...], ...] = (
    ("spec", "template", "spec", "nodeSelector"),
    ("spec", "template", "spec", "affinity"),
    ("spec", "template", "spec", "tolerations"),
    ("spec", "template", "spec", "topologySpreadConstraints"),
    ("spec", "template", "spec", "runtimeClassName"),
    ("spec", "template", "spec", "priorityClassName"),
    ("spec", "template", "spec", "imagePullSecrets"),
    ("data",),
)

_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([KMGTPE]i|[numkMGTPE])?$")
_SUFFIX = {
    "": Decimal(1), "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"),
    "k": Decimal(10) ** 3, "M": Decimal(10) ** 6, "G": Decimal(10) ** 9, "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15, "E": Decimal(10) ** 18, "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20,
    "Gi": Decimal(2) ** 30, "Ti": Decimal(2) ** 40, "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60,
}  # fmt: skip


def _quantity(value: Any) -> Decimal | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return Decimal(str(value))
    if isinstance(value, str) and (match := _QUANTITY.match(value)):
        try:
            return Decimal(match.group(1)) * _SUFFIX[match.group(2) or ""]
        except InvalidOperation:
            return None
    return None


def _empty(value: Any) -> bool:
    return value is None or value is False or value == 0 or value == "" or value == [] or value == {}


def contains(live: Any, desired: Any) -> bool:
    """Whether ``live`` holds everything ``desired`` says (extra live fields are fine)."""
    if isinstance(desired, Mapping):
        if not isinstance(live, Mapping):
            return False
        for key, value in desired.items():
            if key not in live:
                if not _empty(value):
                    return False
            elif not contains(live[key], value):
                return False
        return True
    if isinstance(desired, list):
        return (
            isinstance(live, list)
            and len(live) == len(desired)
            and all(contains(a, b) for a, b in zip(live, desired, strict=True))
        )
    if live == desired:
        return True
    if isinstance(live, str) and isinstance(desired, str) and live != desired:
        # "1000m" and "1" are one quantity; other strings must match exactly.
        a, b = _quantity(live), _quantity(desired)
        return a is not None and b is not None and a == b
    a, b = _quantity(live), _quantity(desired)
    return a is not None and b is not None and a == b


def normalized(desired: Mapping[str, Any]) -> dict[str, Any]:
    """The desired manifest as the API server will store it (Secret ``stringData`` becomes ``data``)."""
    result = copy.deepcopy(dict(desired))
    if result.get("kind") == "Secret" and result.get("stringData"):
        data = dict(result.get("data") or {})
        for key, value in result.pop("stringData").items():
            data[key] = base64.b64encode(str(value).encode()).decode()
        result["data"] = data
    return result


def _get(obj: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def _removals(live: Any, desired: Any) -> Any:
    """The merge-patch fragment that deletes what ``live`` has and ``desired`` lacks (None: nothing)."""
    if isinstance(live, Mapping) and isinstance(desired, Mapping):
        patch: dict[str, Any] = {}
        for key, value in live.items():
            if key not in desired:
                patch[key] = None
            else:
                sub = _removals(value, desired[key])
                if isinstance(sub, dict) and sub:
                    patch[key] = sub
        return patch
    return None


def _set(patch: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = patch
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    last = path[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        _deep_merge(node[last], value)
    elif value is not None or last not in node:
        node[last] = value


def _deep_merge(into: dict[str, Any], other: Mapping[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        elif key not in into or into[key] is not None or value is None:
            into[key] = value if not isinstance(value, Mapping) else dict(value)


def merge_patch_for(live: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any] | None:
    """The JSON merge patch turning ``live`` into ``desired``, or None when it already matches.

    It is skipped when the input-hash annotations agree and nothing was hand-edited; otherwise it is the
    whole desired manifest plus ``null`` for owned keys that are no longer desired.
    """
    want = normalized(desired)
    live_hash = ((live.get("metadata") or {}).get("annotations") or {}).get(INPUT_HASH)
    want_hash = ((want.get("metadata") or {}).get("annotations") or {}).get(INPUT_HASH)
    if live_hash == want_hash and contains(live, want):
        return None
    patch = copy.deepcopy(want)
    patch.pop("status", None)
    for path in OWNED_SUBTREES:
        live_value = _get(live, path)
        if live_value is None:
            continue
        want_value = _get(want, path)
        if want_value is None:
            _set(patch, path, None)
        elif isinstance(live_value, Mapping) and isinstance(want_value, Mapping):
            removal = _removals(live_value, want_value)
            if removal:
                _set(patch, path, removal)
    for path in (("metadata", "labels"), ("spec", "template", "metadata", "labels")):
        live_labels = _get(live, path) or {}
        want_labels = _get(want, path) or {}
        stale = {
            key: None
            for key in live_labels
            if key.startswith(OWNED_LABEL_PREFIXES) and key not in want_labels
        }
        if stale and _get(want, path[:-1]) is not None:
            _set(patch, path, stale)
    return patch
