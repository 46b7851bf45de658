"""`kubespeech autoscale simulate`: ours against KEDA + HPA defaults through the CLI, and its input errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from kubespeech.cli import app
from kubespeech_operator.simulate import SimConfig, builtin_trace, simulate

runner = CliRunner()
KEYS = {"reaction_seconds", "p95_wait_seconds", "gpu_minutes", "jobs_served"}


def simulate_json(*args: str) -> dict[str, Any]:
    result = runner.invoke(app, ["autoscale", "simulate", *args, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    return data


@pytest.mark.parametrize("trace", ["burst", "ramp", "single"])
def test_ours_reacts_5x_faster_and_waits_no_longer(trace: str) -> None:
    data = simulate_json("--trace", trace)
    assert set(data) == {"ours", "keda_hpa"}
    jobs = len(builtin_trace(trace))
    for name in ("ours", "keda_hpa"):
        assert set(data[name]) >= KEYS, data[name]
        assert data[name]["jobs_served"] == jobs
        assert data[name]["gpu_minutes"] > 0
    ours, keda = data["ours"], data["keda_hpa"]
    assert ours["reaction_seconds"] * 5 <= keda["reaction_seconds"], data
    assert ours["p95_wait_seconds"] <= keda["p95_wait_seconds"], data


def test_single_job_numbers_follow_the_models() -> None:
    # One job at t=10: ours sees it at the 2 s poll at 12, KEDA at its 30 s poll; each pod needs 30 s to start.
    data = simulate_json("--trace", "single")
    assert data["ours"]["reaction_seconds"] == 2
    assert data["keda_hpa"]["reaction_seconds"] == 20
    assert data["ours"]["p95_wait_seconds"] == 32
    assert data["keda_hpa"]["p95_wait_seconds"] == 50
    # Ours: requested at 12, busy at 42, released 120 s cooldown after the last poll that saw the job.
    assert data["ours"]["gpu_minutes"] == 2.5


def test_startup_and_service_options_change_the_model() -> None:
    slow = simulate_json("--trace", "single", "--startup-seconds", "90", "--service-seconds", "5")
    assert slow["ours"]["p95_wait_seconds"] == 92


def test_deterministic() -> None:
    arrivals = builtin_trace("diurnal")
    assert simulate(arrivals, SimConfig()) == simulate(arrivals, SimConfig())


def test_table_names_both_scalers() -> None:
    result = runner.invoke(app, ["autoscale", "simulate", "--trace", "burst"])
    assert result.exit_code == 0, result.output
    assert "ours" in result.stdout and "keda_hpa" in result.stdout
    assert "reaction (s)" in result.stdout and "p95 wait (s)" in result.stdout


@pytest.mark.parametrize(
    ("name", "content"),
    [("trace.csv", "seconds\n5\n1.5, extra\n\n# a comment\n20\n"), ("trace.json", "[20, 5, 1.5]")],
    ids=["csv", "json"],
)
def test_file_trace(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    data = simulate_json("--trace", str(path))
    assert data["ours"]["jobs_served"] == data["keda_hpa"]["jobs_served"] == 3


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("bad.csv", "1\n2\nsoon\n", "line 3: 'soon' is not a number of seconds"),
        ("negative.csv", "1\n-2\n", "line 2: '-2' is not a time of 0 s or later"),
        ("bad.json", "[1, 2", "not valid JSON"),
        ("object.json", '{"arrivals": [1]}', "expected a JSON list"),
        ("item.json", '[1, "x"]', "item 1: 'x' is not a number of seconds"),
        ("empty.csv", "seconds\n", "no arrival times"),
    ],
    ids=["csv-word", "csv-negative", "json-syntax", "json-object", "json-item", "empty"],
)
def test_malformed_file_is_a_clear_error(tmp_path: Path, name: str, content: str, problem: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    result = runner.invoke(app, ["autoscale", "simulate", "--trace", str(path), "--json"])
    assert result.exit_code == 2
    assert problem in result.stderr
    assert str(path) in result.stderr
    assert result.stdout == ""


def test_unknown_trace_is_a_clear_error() -> None:
    result = runner.invoke(app, ["autoscale", "simulate", "--trace", "bursty"])
    assert result.exit_code == 2
    assert "unknown trace 'bursty'" in result.stderr
    assert "burst, ramp, diurnal, single" in result.stderr
