"""Every example fits a 2-CPU, 8 GiB single-node cluster (kind, minikube) unless its first comment line says
what it needs instead: the sum of the resource requests of everything it runs, plus the operator's own pod,
stays within what such a node has left after its control-plane pods."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubespeech_operator.builders import build_children
from kubespeech_operator.spec import parse_spec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
# A 2-CPU, 8 GiB node, less what a kind control-plane node's own pods request (etcd, apiserver,
# controller-manager, scheduler, coredns x2, kindnet, kube-proxy: about 950m CPU and 300 MiB; rounded up).
NODE_CPU = Decimal(2) - Decimal(1)
NODE_MEMORY = Decimal(8 * 2**30) - Decimal(2 * 2**30)
_SUFFIXES = {"m": Decimal("0.001"), "Ki": Decimal(2**10), "Mi": Decimal(2**20), "Gi": Decimal(2**30),
             "k": Decimal(10**3), "M": Decimal(10**6), "G": Decimal(10**9)}  # fmt: skip


def quantity(value: Any) -> Decimal:
    text = str(value)
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if text.endswith(suffix):
            return Decimal(text[: -len(suffix)]) * _SUFFIXES[suffix]
    return Decimal(text)


def requested(example: Path) -> tuple[Decimal, Decimal, list[str]]:
    """CPU and memory requested by every pod the example runs at once, and containers without requests."""
    doc = yaml.safe_load(example.read_text())
    children = build_children(doc["metadata"]["name"], "speech", parse_spec(doc["spec"]), redis_password="x")
    cpu = memory = Decimal(0)
    unrequested = []
    for child in children:
        if child["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        replicas = 1 if child["kind"] == "Job" else child["spec"].get("replicas", 1)
        pod = child["spec"]["template"]["spec"]
        for container in pod["containers"]:
            requests = (container.get("resources") or {}).get("requests") or {}
            if not {"cpu", "memory"} <= set(requests):
                unrequested.append(f"{child['metadata']['name']}/{container['name']}")
            cpu += quantity(requests.get("cpu", 0)) * replicas
            memory += quantity(requests.get("memory", 0)) * replicas
    values = yaml.safe_load((ROOT / "charts" / "kubespeech" / "values.yaml").read_text())
    operator = values["operator"]["resources"]["requests"]
    return cpu + quantity(operator["cpu"]), memory + quantity(operator["memory"]), unrequested


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_fits_a_two_cpu_node_or_says_what_it_needs(example: Path) -> None:
    cpu, memory, unrequested = requested(example)
    assert unrequested == [], "every container must request CPU and memory (the scheduler needs them)"
    first = example.read_text().splitlines()[0]
    if first.startswith("# Needs "):
        assert cpu > NODE_CPU or memory > NODE_MEMORY or "GPU" in first, (
            f"{example.name} says it needs more than a laptop cluster, but fits one: drop that line"
        )
        return
    assert cpu <= NODE_CPU, f"{example.name} requests {cpu} CPU; a 2-CPU node has {NODE_CPU} left"
    assert memory <= NODE_MEMORY, f"{example.name} requests {memory / 2**30:.2f} GiB"


def test_the_cpu_example_is_for_laptops() -> None:
    cpu, memory, _ = requested(ROOT / "examples" / "cpu.yaml")
    assert (cpu, round(memory / 2**30, 1)) == (Decimal("0.95"), Decimal("1.8"))  # as its header says
