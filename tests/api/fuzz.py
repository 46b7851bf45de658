"""Schemathesis against ``/openapi.json`` of a live API (real Redis, real no-op workers): no 5xx and no
response outside the documented schema, status codes, content types and headers.

``python -m tests.api.fuzz --max-examples 200`` runs the long version (the ``make fuzz`` target);
``tests/api/test_fuzz.py`` runs a bounded one inside the test suite.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.api.conftest import (
    API_KEY,
    NOOP_ASR,
    NOOP_MODELS,
    NOOP_TTS,
    Workers,
    api_settings,
    start_api,
    wait_live,
)
from tests.conftest import RedisServer, start_redis
from tests.stack import WorkerProcess

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "negative_data_rejection",
    ]
)


@dataclass
class FuzzResult:
    returncode: int
    cases: int
    output: str


def run_fuzz(redis_url: str, tmp: Path, max_examples: int, seed: int | None = 1) -> FuzzResult:
    """Serve the API on a free port and run ``st run`` against it; the workers must already be live."""
    server = start_api(api_settings(redis_url, NOOP_MODELS, tmp, limits={"max_text_chars": 2000}))
    try:
        wait_live(server, [NOOP_ASR, NOOP_TTS])
        st = str(Path(sys.executable).with_name("st"))
        cmd = [
            st, "run", f"{server.url}/openapi.json",
            "--checks", CHECKS,
            "--phases", "examples,coverage,fuzzing",
            "--max-examples", str(max_examples),
            "--header", f"Authorization: Bearer {API_KEY}",
            "--request-timeout", "30",
            "--workers", "1",
            "--suppress-health-check", "all",
            "--continue-on-failure",
            "--no-color",
        ]  # fmt: skip
        if seed is not None:
            cmd += ["--seed", str(seed)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    finally:
        server.stop()
    output = proc.stdout + proc.stderr
    match = re.search(r"Test cases:\s*\n?\s*(\d+) generated", output) or re.search(r"(\d+) generated", output)
    return FuzzResult(proc.returncode, int(match.group(1)) if match else 0, output)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-examples", type=int, default=200, help="Examples per operation and phase.")
    parser.add_argument("--seed", type=int, default=None, help="Hypothesis seed (random when unset).")
    args = parser.parse_args()
    redis: RedisServer = start_redis()
    workers = Workers(
        [
            WorkerProcess(redis.url, task="asr", model=NOOP_ASR, engine="noop", max_wait_ms=0),
            WorkerProcess(redis.url, task="tts", model=NOOP_TTS, engine="noop", max_wait_ms=0),
        ]
    )
    try:
        for w in workers.procs:
            w.wait_ready(60)
        result = run_fuzz(redis.url, Path(tempfile.mkdtemp()), args.max_examples, args.seed)
    finally:
        workers.stop()
        if redis.process is not None:
            redis.process.terminate()
    sys.stdout.write(result.output)
    sys.stdout.write(f"\n{result.cases} test cases; exit code {result.returncode}\n")
    return result.returncode


if __name__ == "__main__":
    raise SystemExit(main())
