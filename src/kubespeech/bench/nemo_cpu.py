"""CPU numbers of the nemo tiny-model path: jobs/s against the worker's batch size, direct and through Redis.

"Direct" calls the nemo engine's ``transcribe_batch`` in micro-batches of the given size; "worker" runs the
real worker runtime (in this process) against a throwaway redis-server and keeps ``2 x batch`` jobs in
flight from an asyncio client, so the worker can fill its batches. The model is the random-weight char-CTC
model of the tests (~80k parameters): the figures show what batching saves in per-call overhead on a CPU,
not what a production model achieves (see ``kubespeech bench --gpu`` for that).

Run: ``python -m kubespeech.bench.nemo_cpu [--jobs N] [--batch-sizes 1,8,32]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kubespeech.bench.gpu import Echo, echo_stdout, measure_engine, speech_clips, table


async def _through_worker(
    model_path: Path, redis_url: str, clips: Sequence[np.ndarray], batch_size: int, threads: int | None
) -> dict[str, float]:
    from kubespeech.config import QueueSettings, RedisSettings, WorkerSettings
    from kubespeech.jobs import JobClient
    from kubespeech.jobs.messages import asr_meta, pcm16_from_float
    from kubespeech.redis_client import connect
    from kubespeech.worker.runtime import Worker

    model = f"nemo-cpu-b{batch_size}"
    redis_settings = RedisSettings(url=redis_url)
    worker = Worker(
        WorkerSettings(
            task="asr",
            model=model,
            engine="nemo",
            model_path=str(model_path),
            max_batch_size=batch_size,
            max_wait_ms=10,
            health_port=0,
            health_host="127.0.0.1",
            engine_options={"cpu_threads": threads} if threads else {},
        ),
        redis_settings,
        QueueSettings(),
    )
    task = asyncio.create_task(worker.run())
    while not worker.model_loaded:
        if task.done():
            raise RuntimeError(f"worker failed: {worker.load_error}")
        await asyncio.sleep(0.05)
    redis = connect(redis_settings)
    client = JobClient(redis)
    payloads = [pcm16_from_float(c) for c in clips]
    meta = asr_meta()
    try:
        await asyncio.gather(*(client.call(model, meta, p, timeout_s=120) for p in payloads[:batch_size]))
        worker.engine.batch_size_counts.clear()
        in_flight = asyncio.Semaphore(2 * batch_size)

        async def one(payload: bytes) -> None:
            async with in_flight:
                await client.call(model, meta, payload, timeout_s=120)

        started = time.perf_counter()
        await asyncio.gather(*(one(p) for p in payloads))
        wall = time.perf_counter() - started
        counts = worker.engine.batch_size_counts
        passes = sum(counts.values())
        mean_batch = sum(size * n for size, n in counts.items()) / passes if passes else 0.0
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 30)
        await redis.aclose()
    return {"jobs_per_s": len(clips) / wall, "mean_batch": mean_batch, "wall_s": wall}


def _start_redis() -> tuple[subprocess.Popen[bytes], str, str]:
    from kubespeech.dev import _free_port, _wait_tcp, find_redis_server

    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="ks-bench-redis-")
    proc = subprocess.Popen(
        [
            find_redis_server(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_tcp("127.0.0.1", port, 10)
    return proc, f"redis://127.0.0.1:{port}/0", workdir


def run_nemo_cpu_bench(
    batch_sizes: Sequence[int] = (1, 8, 32),
    *,
    jobs: int = 192,
    clip_seconds: float = 2.0,
    through_worker: bool = True,
    threads: int | None = None,
    echo: Echo | None = echo_stdout,
) -> dict[str, Any]:
    """Jobs/s of the tiny nemo model per batch size; prints a table and returns the rows."""
    import torch

    from kubespeech.bench.nemo_tiny import save_asr
    from kubespeech.engines.nemo_asr import NemoAsrEngine

    say = echo or (lambda _line: None)
    if threads:
        torch.set_num_threads(threads)
    clips = speech_clips(jobs, clip_seconds)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ks-nemo-cpu-") as tmp:
        model_path = save_asr(Path(tmp) / "ctc-tiny.nemo", "ctc")
        engine = NemoAsrEngine(model_path=str(model_path))
        engine.load()
        redis = _start_redis() if through_worker else None
        try:
            for size in batch_sizes:
                direct = measure_engine(engine, clips, size)
                row: dict[str, Any] = {
                    "batch": size,
                    "direct_jobs_s": round(direct["items_per_s"], 1),
                    "direct_rtfx": round(direct["rtfx"], 1),
                }
                if redis is not None:
                    via = asyncio.run(_through_worker(model_path, redis[1], clips, size, threads))
                    row["worker_jobs_s"] = round(via["jobs_per_s"], 1)
                    row["worker_mean_batch"] = round(via["mean_batch"], 1)
                rows.append(row)
        finally:
            if redis is not None:
                redis[0].terminate()
                redis[0].wait(5)
    result = {
        "machine": f"{os.cpu_count()} cores",
        "torch_threads": torch.get_num_threads(),
        "jobs": jobs,
        "clip_seconds": clip_seconds,
        "model": "random-weight char-CTC ConvASR (~80k parameters)",
        "rows": rows,
    }
    say(
        f"\n== nemo tiny char-CTC on CPU ({result['machine']}, {result['torch_threads']} torch threads): "
        f"{jobs} jobs of ~{clip_seconds:.0f} s =="
    )
    say(table(rows))
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=192)
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--clip-seconds", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-worker", action="store_true", help="only measure the engine called directly")
    args = parser.parse_args(argv)
    run_nemo_cpu_bench(
        [int(b) for b in args.batch_sizes.split(",")],
        jobs=args.jobs,
        clip_seconds=args.clip_seconds,
        through_worker=not args.no_worker,
        threads=args.threads,
    )


if __name__ == "__main__":
    main()
