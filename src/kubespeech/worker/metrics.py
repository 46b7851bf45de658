"""Prometheus metrics of one worker process (own registry, served on the health port)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class WorkerMetrics:
    def __init__(self, model: str, task: str, engine: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"model": model, "task": task, "engine": engine}
        names = list(labels)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, [*names, *extra], registry=self.registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, names, registry=self.registry, buckets=buckets)

        self.jobs = counter(
            "kubespeech_worker_jobs_total",
            "Jobs finished, by outcome (ok, error, expired: dropped unprocessed, nobody waited for it).",
            ("status",),
        )
        self.errors = counter("kubespeech_worker_errors_total", "Jobs that failed, by error code.", ("code",))
        self.reclaimed = counter("kubespeech_worker_reclaimed_total", "Jobs taken over from silent workers.")
        self.dead_lettered = counter(
            "kubespeech_worker_dead_lettered_total", "Jobs moved to the dead-letter stream."
        )
        self.duplicates = counter(
            "kubespeech_worker_duplicate_results_total",
            "Results not delivered because another worker already had.",
        )
        self.batch_size = histogram(
            "kubespeech_worker_batch_size", "Jobs per engine call.", (1, 2, 4, 8, 16, 32, 64, 128, 256)
        )
        self.processing = histogram(
            "kubespeech_worker_processing_seconds", "Engine time per micro-batch.", _LATENCY_BUCKETS
        )
        self.queue_wait = histogram(
            "kubespeech_worker_queue_wait_seconds",
            "Time from enqueue to start of processing.",
            _LATENCY_BUCKETS,
        )
        self.rtf = histogram(
            "kubespeech_worker_real_time_factor",
            "Engine seconds per second of audio (lower is faster).",
            (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5),
        )
        self.audio_seconds = counter("kubespeech_worker_audio_seconds_total", "Seconds of audio processed.")
        self.ready = Gauge("kubespeech_worker_ready", "1 when the model is loaded and Redis reachable.", names,
                           registry=self.registry)  # fmt: skip
        self.in_flight = Gauge(
            "kubespeech_worker_in_flight_jobs",
            "Jobs this worker holds: claimed and not yet published.",
            names,
            registry=self.registry,
        )
        self.in_flight.labels(**labels).set(0)
        self.labels = labels
