"""``kubespeech worker``: run one ASR or TTS worker (flags override KUBESPEECH_WORKER_* settings)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from typing import Any

import typer

from kubespeech.config import LogSettings

log = logging.getLogger("kubespeech.worker")


def register(app: typer.Typer) -> None:
    @app.command("worker")
    def worker(
        task: str = typer.Option(None, help="asr or tts (env KUBESPEECH_WORKER_TASK)."),
        model: str = typer.Option(None, help="Model (queue) name served (env KUBESPEECH_WORKER_MODEL)."),
        engine: str = typer.Option(None, help="whisper, piper, nemo or noop (env KUBESPEECH_WORKER_ENGINE)."),
        model_path: str = typer.Option(None, help="Local model path; the engine's bundled model when unset."),
        device: str = typer.Option(None, help="cpu or cuda[:N]."),
        max_batch_size: int = typer.Option(None, help="Most jobs per engine call."),
        max_wait_ms: int = typer.Option(None, help="Wait this long to fill a batch after the first job."),
        health_port: int = typer.Option(None, help="Port of /healthz, /readyz, /metrics (default 9090)."),
        engine_options: str = typer.Option(None, help="Engine options as JSON."),
        log_level: str = typer.Option(LogSettings().level, help="Log level."),
    ) -> None:
        """Run an ASR or TTS worker: load the engine once, then serve its model's queue until SIGTERM."""
        from kubespeech.config import QueueSettings, RedisSettings, WorkerSettings
        from kubespeech.logging_setup import setup_logging

        setup_logging(log_level)
        overrides: dict[str, Any] = {
            k: v
            for k, v in {
                "task": task,
                "model": model,
                "engine": engine,
                "model_path": model_path,
                "device": device,
                "max_batch_size": max_batch_size,
                "max_wait_ms": max_wait_ms,
                "health_port": health_port,
                "engine_options": json.loads(engine_options) if engine_options else None,
            }.items()
            if v is not None
        }
        try:
            settings = WorkerSettings(**overrides)
        except Exception as exc:
            typer.echo(f"invalid worker settings: {exc}", err=True)
            raise typer.Exit(2) from None
        code = asyncio.run(_serve(settings, RedisSettings(), QueueSettings()))
        raise typer.Exit(code)


async def _serve(settings: Any, redis_settings: Any, queue_settings: Any) -> int:
    from kubespeech.errors import KubespeechError
    from kubespeech.worker.runtime import Worker

    try:
        worker = Worker(settings, redis_settings, queue_settings)
    except KubespeechError as exc:
        log.error("cannot start worker", extra={"error": exc.message})
        return 2
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None

    def on_signal(signame: str) -> None:
        log.info("signal received", extra={"signal": signame})
        worker.request_stop()

        def hard_stop() -> None:
            log.error("drain timeout exceeded; exiting with work in flight (it will be reclaimed)")
            os._exit(1)

        loop.call_later(settings.drain_timeout_s, hard_stop)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    return await worker.run()
