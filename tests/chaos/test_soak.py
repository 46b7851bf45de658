"""Soak: steady mixed load on the whole stack while the memory (RSS) and open file descriptors of every
component are sampled; fails on a memory growth trend, on descriptors that keep growing, or on Redis keys
that do not return to their baseline once the load stops.

``make soak`` runs 10 minutes (KUBESPEECH_SOAK_S=600); ``make test`` runs a short variant (10 s) that
exercises the same measurements with a looser slope bound, since a short run is mostly warm-up. The slope
is a least-squares fit of RSS over time after the warm-up (the first third of the run), in MB per minute.
Engines are the noop ones: the soak is about the stack's own processes (API, worker runtime, Redis,
license proxy); the engines' libraries are not what would leak here.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import pytest

from tests.chaos.stack import (
    ASR_MODEL,
    TTS_MODEL,
    LoadGenerator,
    Outcome,
    RedisProcess,
    start_api,
    start_license,
    wait_live,
)
from tests.stack import WorkerProcess

DURATION_S = float(os.environ.get("KUBESPEECH_SOAK_S", "10"))
LONG = DURATION_S >= 300
# MB/min after warm-up. 10 minutes at 3 MB/min would be 20 MB more than the plateau: a leak, not noise.
# A 10 s run is mostly warm-up: its bound only catches a gross leak (a MB per second).
MAX_SLOPE_MB_MIN = float(os.environ.get("KUBESPEECH_SOAK_MAX_SLOPE_MB_MIN", "3" if LONG else "60"))
FD_SLACK = 8  # connections a pool may still open after warm-up
# A few texts repeat (the API's TTS result cache answers them); the rest bypass the cache, so it holds the
# same entries after the warm-up as at the end.
CACHED_TEXTS = 5
RESULT_TTL_S = 3  # results and markers expire quickly, so the key count can come back within the test

pytestmark = pytest.mark.timeout(int(DURATION_S) + 240)


@dataclass
class Samples:
    """RSS (MB) and open descriptors of one process over time."""

    times: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)

    def slope_mb_per_min(self, after: float) -> float:
        t = np.array([x for x in self.times if x >= after])
        y = np.array([m for x, m in zip(self.times, self.rss_mb, strict=True) if x >= after])
        return float(np.polyfit(t / 60.0, y, 1)[0])

    def fd_at(self, after: float) -> int:
        return next(f for x, f in zip(self.times, self.fds, strict=True) if x >= after)


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path / "redis", aof=True)
    server.start()
    yield server
    server.stop()


def test_soak(redis: RedisProcess, tmp_path: Path) -> None:
    queue_env = {"KUBESPEECH_QUEUE_RESULT_TTL_S": str(RESULT_TTL_S), "OMP_NUM_THREADS": "1"}
    lic = start_license(redis.url, tmp_path)
    workers = [
        WorkerProcess(redis.url, task=task, model=model, engine="noop", max_wait_ms=2, env=queue_env)
        for task, model in (("asr", ASR_MODEL), ("tts", TTS_MODEL))
    ]
    api = None
    try:
        api = start_api(redis.url, tmp_path, license_proxy_url=lic.proxy.url, extra_env=queue_env)
        for w in workers:
            w.wait_ready(60)
        wait_live(api.url, [ASR_MODEL, TTS_MODEL])
        processes = {
            "api": psutil.Process(api.proc.pid),
            "worker-asr": psutil.Process(workers[0].proc.pid),
            "worker-tts": psutil.Process(workers[1].proc.pid),
            "redis": psutil.Process(redis.pid),
            "license-proxy": psutil.Process(lic.proxy.proc.pid),
        }
        client = redis.client()

        # Baseline of the key count: after a first round of requests, once their results have expired.
        warm = LoadGenerator(api.url, 4, timeout_s=30, total=40, cached_texts=CACHED_TEXTS)
        first = asyncio.run(warm.run())
        assert all(o.status == 200 and o.correct for o in first), [o.detail for o in first][:5]
        time.sleep(RESULT_TTL_S + 2)
        baseline_keys = {k.decode() for k in client.scan_iter("*")}

        samples = {name: Samples() for name in processes}
        load = LoadGenerator(api.url, 4, timeout_s=30, pace_s=0.02, cached_texts=CACHED_TEXTS)
        started = time.monotonic()
        interval = max(DURATION_S / 120, 0.25)

        async def soak() -> list[Outcome]:
            runner = asyncio.create_task(load.run())
            while time.monotonic() - started < DURATION_S:
                now = time.monotonic() - started
                for name, proc in processes.items():
                    samples[name].times.append(now)
                    samples[name].rss_mb.append(proc.memory_info().rss / 2**20)
                    samples[name].fds.append(proc.num_fds())
                await asyncio.sleep(interval)
            load.stop()
            return await runner

        outcomes = asyncio.run(soak())
        # Once the load stops and the short-lived keys expire, Redis holds what it held before.
        until = time.monotonic() + RESULT_TTL_S + 20
        keys = {k.decode() for k in client.scan_iter("*")}
        while keys != baseline_keys and time.monotonic() < until:
            time.sleep(0.25)
            keys = {k.decode() for k in client.scan_iter("*")}
        final_rss = {name: proc.memory_info().rss / 2**20 for name, proc in processes.items()}
    finally:
        if api is not None:
            api.stop()
        for w in workers:
            w.stop()
        lic.stop()

    warm_up = DURATION_S / 3
    served = sum(o.status == 200 and o.correct for o in outcomes)
    lines = [
        f"\nsoak: {DURATION_S:.0f} s, {len(outcomes)} requests ({len(outcomes) / DURATION_S:.0f}/s), "
        f"{served} served correctly; Redis keys {len(baseline_keys)} before, {len(keys)} after; "
        f"slope bound {MAX_SLOPE_MB_MIN:g} MB/min after {warm_up:.0f} s of warm-up",
        f"{'component':<14} {'RSS start':>10} {'RSS end':>9} {'slope MB/min':>13} {'fds':>9}",
    ]
    slopes = {name: s.slope_mb_per_min(warm_up) for name, s in samples.items()}
    for name, s in samples.items():
        lines.append(
            f"{name:<14} {s.rss_mb[0]:>8.1f}MB {final_rss[name]:>7.1f}MB {slopes[name]:>13.2f} "
            f"{s.fd_at(warm_up):>4}->{s.fds[-1]:<4}"
        )
    print("\n".join(lines))
    assert served == len(outcomes) > 0, [(o.status, o.code, o.detail) for o in outcomes if not o.correct][:5]
    assert keys == baseline_keys, (sorted(keys - baseline_keys)[:10], sorted(baseline_keys - keys)[:10])
    for name, s in samples.items():
        assert slopes[name] <= MAX_SLOPE_MB_MIN, (name, slopes[name])
        after_warm_up = [f for x, f in zip(s.times, s.fds, strict=True) if x >= warm_up]
        assert max(after_warm_up) <= after_warm_up[0] + FD_SLACK, (name, after_warm_up)
