"""The operator's Prometheus metrics: autoscaler decisions, queue gauges and cold starts, served on their own
port (``KUBESPEECH_OPERATOR_METRICS_PORT``, 8081) beside kopf's liveness endpoint."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry()

DESIRED_REPLICAS = Gauge(
    "kubespeech_autoscaler_desired_replicas",
    "Replicas the autoscaler decided for a pool at its last poll.",
    ["namespace", "speechdeployment", "pool"],
    registry=REGISTRY,
)
QUEUE_WAITING = Gauge(
    "kubespeech_autoscaler_queue_waiting_jobs",
    "Jobs waiting (not yet taken by a worker) in a model queue, as the autoscaler last read them.",
    ["namespace", "speechdeployment", "model"],
    registry=REGISTRY,
)
QUEUE_IN_FLIGHT = Gauge(
    "kubespeech_autoscaler_queue_in_flight_jobs",
    "Jobs taken by a worker and not yet answered in a model queue, as the autoscaler last read them.",
    ["namespace", "speechdeployment", "model"],
    registry=REGISTRY,
)
QUEUE_JOBS = Gauge(
    "kubespeech_queue_jobs",
    "Jobs waiting or in flight in a model queue whose pool an HPA scales (autoscaling.mode hpa): the external "
    "metric a metrics adapter serves to that HPA, with the label model.",
    ["namespace", "speechdeployment", "model"],
    registry=REGISTRY,
)
DECISIONS = Counter(
    "kubespeech_autoscaler_decisions",
    "Autoscaler decisions per pool and poll, by reason (ScaleUp, ScaleDown, WakeFromZero, Steady...).",
    ["reason"],
    registry=REGISTRY,
)
COLD_START_SECONDS = Histogram(
    "kubespeech_autoscaler_cold_start_seconds",
    "From the first job queued for a model at zero replicas to its first ready worker.",
    ["model"],
    buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600),
    registry=REGISTRY,
)


def serve(host: str, port: int) -> None:
    """Serve /metrics on ``host:port`` from a daemon thread (0: off)."""
    if port:
        start_http_server(port, addr=host, registry=REGISTRY)
