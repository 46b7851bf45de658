"""Chaos: mixed STT/TTS requests at steady concurrency while a worker is SIGKILLed every few seconds and
restarted; every accepted request gets exactly one correct answer, none is lost or duplicated.

Engines: the noop ones, on purpose. What is under test is the job protocol (claim, reclaim after a kill,
publish once), and the noop answers are exact functions of each request (the sample count for STT, 10 ms of
audio per character for TTS), so every answer is checked against its own request; a mix-up between two
requests, a lost job or a second answer cannot hide in a word error rate. Whisper and Piper would also make
1000 requests take far longer than the suite's few minutes on two cores. The engines log every request
they receive, which shows the kills did interrupt work in flight (some requests ran twice) and that each
request reached an engine.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.stack import (
    ASR_MODEL,
    TTS_MODEL,
    LoadGenerator,
    RedisProcess,
    call_key,
    engine_calls,
    long_run,
    start_api,
    wait_live,
)
from tests.stack import WorkerProcess

LONG = long_run()
REQUESTS = 1000 if LONG else 160
CONCURRENCY = 8
KILL_EVERY_S = 3.0 if LONG else 1.5
REQUEST_TIMEOUT_S = 30.0
# Workers reclaim a killed worker's jobs after the visibility timeout (30 s in production: shortened so a
# kill costs the waiting callers seconds, not the suite minutes).
WORKER_ENV = {"KUBESPEECH_QUEUE_VISIBILITY_TIMEOUT_S": "2", "OMP_NUM_THREADS": "1"}
# Each batch takes a while, so a kill almost always lands on jobs in flight.
ENGINE_DELAY_S = 0.5 if LONG else 0.2

pytestmark = pytest.mark.timeout(900 if LONG else 180)


class Pools:
    """Two ASR and two TTS noop workers; a killed one is replaced by a new process with its own call log."""

    def __init__(self, redis_url: str, tmp: Path) -> None:
        self.redis_url = redis_url
        self.tmp = tmp
        self.call_logs: list[Path] = []
        self.slots: list[tuple[str, WorkerProcess]] = []
        self.kills = 0
        for task in ("asr", "asr", "tts", "tts"):
            self.slots.append((task, self._spawn(task)))
        for _, w in self.slots:
            w.wait_ready(60)

    def _spawn(self, task: str) -> WorkerProcess:
        calls = self.tmp / f"calls-{len(self.call_logs)}.log"
        self.call_logs.append(calls)
        return WorkerProcess(
            self.redis_url,
            task=task,
            model=ASR_MODEL if task == "asr" else TTS_MODEL,
            engine="noop",
            max_batch_size=4,
            max_wait_ms=0,
            engine_options={"delay_s": ENGINE_DELAY_S, "calls_file": str(calls)},
            env=WORKER_ENV,
        )

    def kill_one_busy(self) -> None:
        """SIGKILL a worker that holds jobs (the worst moment), then start its replacement."""
        busy: list[int] = []
        until = time.monotonic() + 2.0
        while not busy and time.monotonic() < until:
            for i, (_, w) in enumerate(self.slots):
                try:
                    status, body = w.get("/inflight")
                    if status == 200 and '"in_flight":0' not in body:
                        busy.append(i)
                except OSError:
                    pass
            if not busy:
                time.sleep(0.02)
        index = random.choice(busy or range(len(self.slots)))
        task, victim = self.slots[index]
        victim.proc.kill()
        victim.proc.wait()
        self.kills += 1
        replacement = self._spawn(task)
        self.slots[index] = (task, replacement)
        replacement.wait_ready(60)

    def stop(self) -> None:
        for _, w in self.slots:
            w.stop()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def test_worker_kills_lose_and_duplicate_nothing(redis: RedisProcess, tmp_path: Path) -> None:
    pools = Pools(redis.url, tmp_path)
    api = start_api(redis.url, tmp_path, request_timeout_s=REQUEST_TIMEOUT_S)
    done = threading.Event()
    killer_errors: list[BaseException] = []

    def killer() -> None:
        try:
            while not done.wait(KILL_EVERY_S):
                pools.kill_one_busy()
        except BaseException as exc:  # surfaced by the assertion below
            killer_errors.append(exc)

    try:
        wait_live(api.url, [ASR_MODEL, TTS_MODEL])
        load = LoadGenerator(api.url, CONCURRENCY, timeout_s=REQUEST_TIMEOUT_S + 10, total=REQUESTS)
        thread = threading.Thread(target=killer, name="killer", daemon=True)
        started = time.monotonic()
        thread.start()
        outcomes = asyncio.run(load.run())
        elapsed = time.monotonic() - started
        done.set()
        thread.join(90)
        api_alive = api.proc.poll() is None
    finally:
        done.set()
        api.stop()
        pools.stop()

    assert not killer_errors, killer_errors
    assert api_alive, api.tail()
    by_tag = Counter(o.tag for o in outcomes)
    accepted = [o for o in outcomes if o.status == 200]
    refused = [o for o in outcomes if o.status in (429, 503)]
    failed = [o for o in outcomes if o.status not in (200, 429, 503)]
    wrong = [o for o in accepted if not o.correct]
    calls = engine_calls(pools.call_logs)
    never_ran = [o.tag for o in accepted if calls.get(call_key(o.tag), 0) == 0]
    ran_twice = sum(1 for o in accepted if calls.get(call_key(o.tag), 0) > 1)
    # A job answered twice would leave a second result in its reply list (the first was popped): none may
    # remain once every caller has its answer.
    leftover_results = list(redis.client().scan_iter("ks:r:*"))
    print(
        f"\nworker kills: sent {len(outcomes)}, accepted {len(accepted)}, refused {len(refused)}, "
        f"failed {len(failed)}, wrong {len(wrong)}, lost {len(outcomes) - len(accepted) - len(refused)}, "
        f"duplicated {len(leftover_results)}; {pools.kills} kills in {elapsed:.1f} s, "
        f"{ran_twice} requests re-run by the engine after a kill"
    )
    assert len(outcomes) == REQUESTS and set(by_tag) == set(range(REQUESTS)), "each request sent once"
    assert not failed, [(o.tag, o.status, o.code, o.detail) for o in failed[:10]]
    assert not wrong, [(o.tag, o.detail) for o in wrong[:10]]
    # Workers are never all down (one of four is replaced at a time), so nothing is refused either.
    assert not refused, [(o.tag, o.status, o.code) for o in refused[:10]]
    assert not never_ran, never_ran[:10]
    assert not leftover_results, leftover_results[:10]
    assert pools.kills >= (10 if LONG else 2)
    # The kills hit work in flight: those jobs were reclaimed and run again by another worker, yet answered once.
    assert ran_twice > 0
