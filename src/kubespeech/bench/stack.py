"""Benchmarks of the data plane: protocol overhead (no-op engine), engine vs stack, and memory.

The stack under test is real: redis-server, ``kubespeech api`` and ``kubespeech worker`` processes, started
by the same supervisor as ``kubespeech dev``; load comes from an asyncio client in this process.
"""

from __future__ import annotations

import asyncio
import io
import os
import secrets
import statistics
import tempfile
import time
import wave
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kubespeech.dev import Child, Supervisor, _free_port, _kubespeech


@dataclass
class LoadResult:
    name: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        data = sorted(self.latencies_ms)
        return data[min(int(q * len(data)), len(data) - 1)]

    def row(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "concurrency": self.concurrency,
            "requests": self.requests,
            "errors": self.errors,
            "rps": round(self.rps, 1),
            "p50_ms": round(self.percentile(0.50), 2),
            "p99_ms": round(self.percentile(0.99), 2),
        }


async def run_load(
    name: str, request: Callable[[], Awaitable[bool]], concurrency: int, seconds: float, warmup_s: float = 0.5
) -> LoadResult:
    """Closed-loop load: ``concurrency`` clients each send the next request when the previous one returns."""
    latencies: list[float] = []
    errors = 0
    count = 0
    measuring = False
    stop_at = 0.0

    async def client() -> None:
        nonlocal errors, count
        while True:
            now = time.perf_counter()
            if measuring and now >= stop_at:
                return
            ok = await request()
            took = (time.perf_counter() - now) * 1000
            if measuring:
                count += 1
                latencies.append(took)
                if not ok:
                    errors += 1

    # Warm up with the same concurrency, then measure a fixed window.
    warm = [asyncio.create_task(client()) for _ in range(concurrency)]
    await asyncio.sleep(warmup_s)
    measuring = True
    started = time.perf_counter()
    stop_at = started + seconds
    await asyncio.gather(*warm)
    elapsed = time.perf_counter() - started
    return LoadResult(name, concurrency, count, errors, elapsed, latencies)


def wav_bytes(audio: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def rss_mb(pid: int) -> float:
    """Resident memory of one process in MB (from /proc; no extra dependency)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class BenchStack:
    """A SpeechDeployment of the given pools, run as ``kubespeech dev`` runs it (kubespeech.localrun).

    ``workers``: one pool each, ``{"task", "model", "engine", "max_batch_size", "max_wait_ms", "env"}``;
    ``models``: the API's view of them (``default``, ``aliases``, ``voices``); ``spec``: more of the
    SpeechDeployment's spec (``cache``, say). The result cache is off unless ``spec`` turns it on, so the
    engines are what is measured. The ``noop`` engine is not a SpeechDeployment engine (it exists to measure
    the stack's own overhead): its pool is rendered as a CPU pool and its worker's engine variable replaced.
    ``api_env`` adds variables to the API server's environment.
    """

    def __init__(
        self,
        workers: list[dict[str, Any]],
        models: list[dict[str, Any]],
        api_env: dict[str, str] | None = None,
        spec: dict[str, Any] | None = None,
    ) -> None:
        self.workers = workers
        self.models = {m["name"]: m for m in models}
        self.api_env = api_env or {}
        self.spec = spec or {}
        self.dir = Path(tempfile.mkdtemp(prefix="kubespeech-bench-"))
        self.dir.chmod(0o700)
        (self.dir / "logs").mkdir()
        self.sup = Supervisor(self.dir, self.dir / "logs", verbose=False)
        self.key = "ks-bench-" + secrets.token_urlsafe(16)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._names: dict[str, str] = {}  # local process name -> what pids() calls it

    def speech_deployment(self) -> dict[str, Any]:
        pools: dict[str, list[dict[str, Any]]] = {"asr": [], "tts": []}
        for w in self.workers:
            model = self.models.get(w["model"], {})
            engine = w["engine"] if w["engine"] != "noop" else ("whisper" if w["task"] == "asr" else "piper")
            pool: dict[str, Any] = {
                "name": w["model"], "modelName": w["model"], "engine": engine, "replicas": 1,
                "default": bool(model.get("default")), "aliases": list(model.get("aliases") or []),
                "batching": {"maxBatchSize": w.get("max_batch_size", 32), "maxWaitMs": w.get("max_wait_ms", 0)},
            }  # fmt: skip
            if w["task"] == "tts":
                pool["voices"] = list(model.get("voices") or []) or ["default"]
            pools[w["task"]].append(pool)
        spec: dict[str, Any] = {
            "license": {"secretRef": {"name": "bench-license", "key": "license.key"}},
            "api": {"apiKeysSecretRef": {"name": "bench-api-keys", "key": "keys"}},
            "redis": {"mode": "embedded", "embedded": {"persistence": {"enabled": False}}},
            "cache": {"tts": {"enabled": False}},
            **{task: {"pools": p} for task, p in pools.items() if p},
            **self.spec,
        }
        return {"apiVersion": "kubespeech.io/v1alpha1", "kind": "SpeechDeployment",
                "metadata": {"name": "bench", "namespace": "bench"}, "spec": spec}  # fmt: skip

    def start(self) -> None:
        from kubespeech.config import LogSettings, WorkerSettings, env_name
        from kubespeech.localrun import find_redis_server, plan

        stack = plan(
            self.speech_deployment(), self.dir, api_key=self.key, api_port=self.port, host="127.0.0.1",
            free_port=_free_port, executables={"kubespeech": _kubespeech(), "redis-server": [find_redis_server()]},
        )  # fmt: skip
        by_model = {w["model"]: w for w in self.workers}
        for proc in stack.processes:
            env = {**proc.env, env_name(LogSettings, "level"): "WARNING"}
            name = proc.component
            if proc.component.endswith("-worker"):
                w = by_model[proc.env[env_name(WorkerSettings, "model")]]
                name = f"worker-{w['model']}"
                env.update(w.get("env") or {})
                if w["engine"] == "noop":
                    env[env_name(WorkerSettings, "engine")] = "noop"
            elif proc.component == "api":
                env.update(self.api_env)
            self._names[proc.name] = name
            child = Child(proc.name, proc.args, proc.ready_url, env=env, ready_tcp=proc.ready_tcp)
            self.sup.start(child)
            if proc.component == "redis":
                self.sup.wait_ready(child, 30)
        for child in self.sup.children:
            self.sup.wait_ready(child, 180)

    def stop(self) -> None:
        self.sup.stop_all()

    def pids(self) -> dict[str, int]:
        """Process ids by role: ``api``, ``redis``, ``license-proxy``, ``worker-<model>``."""
        return {self._names.get(c.name, c.name): c.proc.pid for c in self.sup.children if c.proc is not None}


async def protocol_overhead(seconds: float, concurrencies: tuple[int, ...]) -> dict[str, Any]:
    """No-op engine through API → Redis → worker → API with a 64 kB body, beside a bare FastAPI route."""
    from kubespeech.api.loadgen import HttpConnection

    stack = BenchStack(
        workers=[{"task": "asr", "model": "noop", "engine": "noop", "max_batch_size": 64}],
        models=[{"name": "noop", "task": "asr", "default": True, "aliases": []}],
    )
    stack.start()
    try:
        body = wav_bytes(np.zeros(32000 - 22, dtype=np.float32), 16000)  # 64 kB on the wire
        host = f"127.0.0.1:{stack.port}"
        stt_head = (
            f"POST /waves/v1/stt/?model=noop HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {stack.key}\r\n"
            f"Content-Type: audio/wav\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        bare_head = f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        rows = []
        for c in concurrencies:
            # A raw keep-alive HTTP/1.1 client per simulated caller: the client's own cost stays in microseconds.
            conns = [HttpConnection("127.0.0.1", stack.port) for _ in range(c)]
            pool = list(conns)

            def requester(
                head: bytes, payload: bytes, pool: list[HttpConnection] = pool
            ) -> Callable[[], Awaitable[bool]]:
                async def one() -> bool:
                    conn = pool.pop()
                    try:
                        status, _ = await conn.request(head, payload)
                    finally:
                        pool.append(conn)
                    return status == 200

                return one

            stt = requester(stt_head, body)
            assert await stt(), "the no-op STT request failed; see " + str(stack.dir / "logs")
            rows.append((await run_load("noop-stt-64kB", stt, c, seconds)).row())
            rows.append((await run_load("bare-fastapi-health", requester(bare_head, b""), c, seconds)).row())
            for conn in conns:
                await conn.close()
        pids = stack.pids()
        memory = {
            "api_rss_mb": round(rss_mb(pids["api"]), 1),
            "noop_worker_rss_mb": round(rss_mb(pids["worker-noop"]), 1),
        }
        memory["together_mb"] = round(memory["api_rss_mb"] + memory["noop_worker_rss_mb"], 1)
        return {"load": rows, "memory": memory}
    finally:
        stack.stop()


async def engine_vs_stack(repeats: int = 5) -> dict[str, Any]:
    """Median time of a ~5 s utterance: the whisper engine called directly vs the same request via the stack."""
    import aiohttp

    from kubespeech.engines.base import AsrRequest, TtsRequest
    from kubespeech.engines.registry import EngineSpec, load_engine

    tts = load_engine(EngineSpec(task="tts", engine="piper"))
    tts.load()
    text = "The quick brown fox jumps over the lazy dog, and then it runs far away into the quiet forest."
    (speech,) = tts.synthesize_batch([TtsRequest(text=text)])
    import soxr

    audio16 = np.asarray(soxr.resample(speech.audio, speech.sample_rate, 16000), dtype=np.float32)
    audio16 = audio16[: 16000 * 5] if len(audio16) > 16000 * 5 else audio16
    seconds = len(audio16) / 16000

    asr = load_engine(EngineSpec(task="asr", engine="whisper"))
    asr.load()
    direct = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        asr.transcribe_batch([AsrRequest(audio=audio16, language="en")])
        direct.append(time.perf_counter() - t)
    del asr

    stack = BenchStack(
        workers=[{"task": "asr", "model": "whisper-tiny-en", "engine": "whisper", "max_batch_size": 8}],
        models=[{"name": "whisper-tiny-en", "task": "asr", "default": True, "aliases": []}],
    )
    stack.start()
    try:
        body = wav_bytes(audio16, 16000)
        headers = {"Authorization": f"Bearer {stack.key}", "Content-Type": "audio/wav"}
        via = []
        async with aiohttp.ClientSession() as session:
            for _ in range(repeats + 1):
                t = time.perf_counter()
                async with session.post(
                    f"{stack.url}/waves/v1/stt/?model=whisper-tiny-en&language=en", data=body, headers=headers
                ) as r:
                    await r.read()
                    assert r.status == 200, await r.text()
                via.append(time.perf_counter() - t)
    finally:
        stack.stop()
    d, s = statistics.median(direct[1:]), statistics.median(via[1:])
    return {
        "utterance_seconds": round(seconds, 2),
        "engine_direct_median_s": round(d, 4),
        "through_stack_median_s": round(s, 4),
        "ratio": round(s / d, 4),
    }


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}"


async def api_surfaces(concurrencies: tuple[int, ...] = (1, 8, 32)) -> dict[str, Any]:
    """Small STT (2 s of speech) and TTS (one sentence) requests through each surface on the CPU engines,
    with the engine's own time for the same input beside them, so the API's overhead is visible."""
    import soxr

    from kubespeech.api.loadgen import SURFACES, measure, prepare
    from kubespeech.engines.base import AsrRequest, TtsRequest
    from kubespeech.engines.registry import EngineSpec, load_engine

    sentence = "The quick brown fox jumps over the lazy dog."
    tts = load_engine(EngineSpec(task="tts", engine="piper"))
    tts.load()
    (speech,) = tts.synthesize_batch([TtsRequest(text="Please call me back this afternoon.")])
    audio16 = np.asarray(soxr.resample(speech.audio, speech.sample_rate, 16000), dtype=np.float32)
    audio16 = np.pad(audio16, (0, max(0, 32000 - len(audio16))))[:32000]  # exactly 2 s
    tts_direct = []
    for _ in range(6):
        t = time.perf_counter()
        tts.synthesize_batch([TtsRequest(text=sentence)])
        tts_direct.append(time.perf_counter() - t)
    del tts
    asr = load_engine(EngineSpec(task="asr", engine="whisper"))
    asr.load()
    asr_direct = []
    for _ in range(6):
        t = time.perf_counter()
        asr.transcribe_batch([AsrRequest(audio=audio16, language="en")])
        asr_direct.append(time.perf_counter() - t)
    del asr
    engine_ms = {
        "stt": round(statistics.median(asr_direct[1:]) * 1000, 1),
        "tts": round(statistics.median(tts_direct[1:]) * 1000, 1),
    }

    stack = BenchStack(
        workers=[
            {"task": "asr", "model": "whisper-tiny-en", "engine": "whisper", "max_batch_size": 8},
            {"task": "tts", "model": "piper-joe", "engine": "piper", "max_batch_size": 8},
        ],
        models=[
            {"name": "whisper-tiny-en", "task": "asr", "default": True, "aliases": []},
            {"name": "piper-joe", "task": "tts", "default": True, "aliases": [], "voices": ["joe"]},
        ],
    )
    stack.start()
    rows = []
    try:
        wav = wav_bytes(audio16, 16000)
        for surface in SURFACES:
            kind = "stt" if surface.endswith("stt") else "tts"
            req = prepare(surface, audio=wav, text=sentence)
            for c in concurrencies:
                res = await measure(stack.url, stack.key, surface, concurrency=c, requests=max(2 * c, 12),
                                    warmup=2, prepared=req)  # fmt: skip
                rows.append(
                    {
                        "surface": surface,
                        "concurrency": c,
                        "requests": res.requests,
                        "errors": res.errors,
                        "rps": round(res.rps, 2),
                        "p50_ms": res.p50_ms,
                        "p99_ms": res.p99_ms,
                        "engine_ms": engine_ms[kind],
                    }
                )
    finally:
        stack.stop()
    return {"rows": rows, "engine_direct_median_ms": engine_ms}
