#!/usr/bin/env python3
"""Write charts/kubespeech/README.md from the chart's values.yaml, its comments and Chart.yaml.

A comment block that starts with `# --` documents the key right below it (as helm-docs reads it); a plain
comment block above a top-level key introduces that section. `--check` exits 1 when the README is stale
(tests/chart/test_chart_readme.py runs the same comparison).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "kubespeech"
VALUES = CHART / "values.yaml"
README = CHART / "README.md"
# Defaults longer than this are left to values.yaml: a table cell is no place for a whole spec.
MAX_DEFAULT_LENGTH = 80
_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.-]+):(?:\s|$)")


@dataclass
class Value:
    """One documented key: its dotted path, default and description."""

    path: str
    default: Any
    description: str


@dataclass
class Section:
    """A top-level key of values.yaml with the documented keys under it."""

    key: str
    intro: str
    values: list[Value]


def _lookup(tree: Any, path: list[str]) -> Any:
    for part in path:
        tree = tree[part]
    return tree


def parse(text: str) -> list[Section]:
    """The sections of a values.yaml text with their documented keys; top-level keys that are not mappings go
    to a first section, "General". The file's leading comment, ended by a blank line, belongs to no key."""
    tree = yaml.safe_load(text) or {}
    lines = text.splitlines()
    general = Section("General", "", [])
    sections = [general]
    parents: list[tuple[int, str]] = []  # (indent, key) of the keys enclosing the current line
    comment: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped.lstrip("#").strip())
            continue
        match = _KEY.match(line)
        if not match:  # a blank line ends a comment block; list items are documented with their key
            comment = comment if stripped else []
            continue
        indent = len(match["indent"])
        while parents and parents[-1][0] >= indent:
            parents.pop()
        path = [key for _, key in parents] + [match["key"]]
        start = next((i for i, text in enumerate(comment) if text.startswith("--")), len(comment))
        intro, documented = comment[:start], comment[start:]
        if indent == 0 and isinstance(tree.get(match["key"]), dict):
            sections.append(Section(match["key"], " ".join(intro), []))
        if documented:
            section = general if indent == 0 and sections[-1].key != match["key"] else sections[-1]
            description = " ".join(documented).removeprefix("--").strip()
            section.values.append(Value(".".join(path), _lookup(tree, path), description))
        parents.append((indent, match["key"]))
        comment = []
    return sections


def _default(value: Any) -> str:
    rendered = json.dumps(value, ensure_ascii=False)
    if len(rendered) > MAX_DEFAULT_LENGTH:
        return "see [values.yaml](values.yaml)"
    return f"`{rendered}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render(values_text: str, chart_text: str) -> str:
    """The README for a values.yaml and Chart.yaml text."""
    chart = yaml.safe_load(chart_text)
    sections = parse(values_text)
    out = [
        "<!-- Generated from values.yaml by scripts/chart-readme.py (`make chart-readme`); do not edit. -->",
        f"# The {chart['name']} chart",
        "",
        " ".join(str(chart["description"]).split()),
        "",
        f"Chart version {chart['version']}, app version {chart['appVersion']}, Kubernetes {chart['kubeVersion']}.",
        "",
        "```bash",
        "helm install kubespeech charts/kubespeech --namespace kubespeech-system --create-namespace",
        "# or with a speech stack of its own (a CPU one by default):",
        "helm install kubespeech charts/kubespeech --namespace speech --create-namespace \\",
        "  --set speechDeployment.create=true --set-file speechDeployment.licenseKey=license.key",
        "```",
        "",
        "The install prints the next commands (port-forward, an API key, a TTS and an STT request). Install",
        "scenarios that CI renders and installs are in [ci/](ci/).",
        "",
        "## Values",
        "",
    ]
    for section in sections:
        if not section.values:
            continue
        out += [f"### {section.key}", ""]
        if section.intro:
            out += [section.intro, ""]
        out += ["| Key | Default | Description |", "|---|---|---|"]
        out += [
            f"| `{v.path}` | {_cell(_default(v.default))} | {_cell(v.description)} |" for v in section.values
        ]
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: list[str]) -> int:
    wanted = render(VALUES.read_text(), (CHART / "Chart.yaml").read_text())
    if "--check" in argv:
        if not README.exists() or README.read_text() != wanted:
            print(f"{README.relative_to(ROOT)} is stale: run scripts/chart-readme.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(wanted)
    print(f"wrote {README.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
