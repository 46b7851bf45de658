"""The Grafana dashboard asks only for metrics the components define, by labels those metrics carry, and
covers requests, latency, real-time factor, queue depth, replicas, license state and errors."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.metrics import MetricWrapperBase
from redis.asyncio import Redis

import kubespeech.api.metrics as api_metrics
import kubespeech_operator.metrics as operator_metrics
from kubespeech.license.proxy import LicenseProxy
from kubespeech.license.settings import ProxySettings
from kubespeech.worker.metrics import WorkerMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "charts" / "kubespeech" / "dashboards" / "kubespeech.json"
# Labels Prometheus adds to every scraped series (its target labels, as the Prometheus Operator sets them).
TARGET_LABELS = {"namespace", "pod", "service", "job", "instance", "endpoint", "container"}
# The series names one metric object is exposed as.
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
_METRIC = re.compile(r"\b(kubespeech_[a-z0-9_]+)")
_BY = re.compile(r"\bby\s*\(([^)]*)\)")
_MATCHER = re.compile(r"\b([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")


def _metric_objects(holder: Any) -> Iterator[MetricWrapperBase]:
    for value in vars(holder).values():
        if isinstance(value, MetricWrapperBase):
            yield value


def defined_series() -> dict[str, set[str]]:
    """Every series name the components expose, with the label names it carries: the real metric objects
    of the API server, a worker, the license proxy and the operator (none is started: building them is
    enough, and names come from the objects, not from reading their source)."""
    proxy = LicenseProxy(ProxySettings(), Redis.from_url("redis://127.0.0.1:1/0"))
    holders = [api_metrics, WorkerMetrics("model", "asr", "engine"), proxy, operator_metrics]
    series: dict[str, set[str]] = {}
    for holder in holders:
        for metric in _metric_objects(holder):
            for suffix in SUFFIXES[str(metric._type)]:
                series[metric._name + suffix] = set(metric._labelnames)
    return series


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query in the dashboard, the template variables' included."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append((f"${variable['name']}", variable["query"]["query"]))
    return queries


def test_the_collection_of_defined_metrics_is_real() -> None:
    series = defined_series()
    assert series["kubespeech_api_requests_total"] == {"route", "method", "status"}
    assert series["kubespeech_worker_real_time_factor_bucket"] == {"model", "task", "engine"}
    assert series["kubespeech_license_state"] == {"state"}
    assert series["kubespeech_autoscaler_decisions_total"] == {"reason"}
    assert "kubespeech_autoscaler_decisions" not in series  # counters are exposed with _total only


def test_every_queried_metric_is_defined() -> None:
    series = defined_series()
    unknown = [
        (title, name)
        for title, expr in dashboard_queries()
        for name in _METRIC.findall(expr)
        if name not in series
    ]
    assert unknown == []


def test_every_label_a_query_uses_is_on_its_metrics() -> None:
    """`by (...)` and `{label=...}` name labels that one of the query's metrics (or the scrape) carries."""
    series = defined_series()
    problems = []
    for title, expr in dashboard_queries():
        available = set(TARGET_LABELS)
        for name in _METRIC.findall(expr):
            available |= series.get(name, set())
            if name.endswith("_bucket"):
                available.add("le")
        grouped = {
            label.strip() for group in _BY.findall(expr) for label in group.split(",") if label.strip()
        }
        used = grouped | set(_MATCHER.findall(expr))
        problems += [(title, label) for label in sorted(used - available)]
    assert problems == []


def test_the_dashboard_covers_what_operators_watch() -> None:
    queried = {name for _, expr in dashboard_queries() for name in _METRIC.findall(expr)}
    wanted = {
        "requests": "kubespeech_api_requests_total",
        "latency percentiles": "kubespeech_api_request_duration_seconds_bucket",
        "real-time factor": "kubespeech_worker_real_time_factor_bucket",
        "queue depth": "kubespeech_autoscaler_queue_waiting_jobs",
        "replicas": "kubespeech_autoscaler_desired_replicas",
        "ready workers": "kubespeech_worker_ready",
        "license state": "kubespeech_license_state",
        "errors": "kubespeech_api_job_errors_total",
        "worker errors": "kubespeech_worker_errors_total",
    }
    assert {what: metric for what, metric in wanted.items() if metric not in queried} == {}
    latency = [expr for _, expr in dashboard_queries() if "kubespeech_api_request_duration_seconds" in expr]
    quantiles = {q for expr in latency for q in re.findall(r"histogram_quantile\(([0-9.]+)", expr)}
    assert quantiles >= {"0.5", "0.95", "0.99"}


def test_panels_use_the_datasource_variable_and_unique_ids() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
