"""Prometheus metrics of the API server (process-wide, registered once on the default registry)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "kubespeech_api_requests_total",
    "HTTP requests by route template, method and status.",
    ["route", "method", "status"],
)
LATENCY = Histogram(
    "kubespeech_api_request_duration_seconds",
    "HTTP request latency by route template and method.",
    ["route", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
AUDIO_SECONDS_IN = Counter(
    "kubespeech_api_audio_seconds_in_total",
    "Seconds of audio received for transcription.",
    ["surface", "model"],
)
CHARACTERS_IN = Counter(
    "kubespeech_api_characters_in_total", "Characters of text received for synthesis.", ["surface", "model"]
)
AUDIO_SECONDS_OUT = Counter(
    "kubespeech_api_audio_seconds_out_total", "Seconds of synthesized audio returned.", ["surface", "model"]
)
JOB_ERRORS = Counter(
    "kubespeech_api_job_errors_total", "Failed jobs by model and error code.", ["model", "code"]
)
COLD_STARTS = Counter(
    "kubespeech_api_cold_start_waits_total",
    "Requests held for a cold start, by outcome (served, unavailable, disconnected).",
    ["model", "outcome"],
)
COLD_START_WAIT = Histogram(
    "kubespeech_api_cold_start_wait_seconds",
    "How long a request was held for a worker of its model (served or unavailable).",
    ["model", "outcome"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300),
)
IN_FLIGHT = Gauge("kubespeech_api_requests_in_flight", "HTTP requests being served.")
LIVE_WORKERS = Gauge(
    "kubespeech_api_live_workers", "Live workers per model as last seen by this API.", ["model"]
)
CACHE_LOOKUPS = Counter(
    "kubespeech_api_cache_lookups_total",
    "Result cache lookups by task and result (hit, miss, or bypass for Cache-Control: no-cache/no-store).",
    ["task", "result"],
)
CACHE_HIT_RATIO = Gauge(
    "kubespeech_api_cache_hit_ratio", "Hits / (hits + misses) of this API process since it started.", ["task"]
)
CACHE_BYTES = Gauge(
    "kubespeech_api_cache_bytes",
    "Bytes of cached values in Redis, all API replicas together (an upper bound until expired entries are reaped).",
    ["task"],
)
CACHE_EVICTIONS = Counter(
    "kubespeech_api_cache_evictions_total",
    "Cache entries this API process evicted to stay within max_bytes.",
    ["task"],
)
CACHE_STORES = Counter("kubespeech_api_cache_stores_total", "Results stored in the cache.", ["task"])
