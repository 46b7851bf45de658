"""``kubespeech bench``: run the benchmark suites, print a table per suite, and write one JSON file."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import typer

from kubespeech.bench.report import table

SUITES = ("protocol", "engine", "surfaces", "streaming", "cache", "operator", "autoscaler", "gpu")


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench(
        suite: list[str] = typer.Option(
            ["protocol", "engine"], "--suite", "-s", help=f"Suites to run: {', '.join(SUITES)} (repeatable)."
        ),
        gpu: bool = typer.Option(
            False, "--gpu", help="Run the NeMo GPU suite (says so and exits 0 without a GPU)."
        ),
        operator: bool = typer.Option(
            False, "--operator", help="Also run the operator suite (a real kube-apiserver)."
        ),
        seconds: float = typer.Option(5.0, help="Measurement window per load level."),
        concurrency: list[int] = typer.Option([1, 8, 64], "--concurrency", "-c", help="Client counts."),
        out: Path = typer.Option(Path("bench-results"), help="Directory for the JSON results."),
    ) -> None:
        """Measure the stack (no-op protocol overhead, engine vs stack, memory, operator, GPU) and write JSON."""
        from kubespeech.bench import stack

        suites = ["gpu"] if gpu else list(suite)
        if operator and "operator" not in suites:
            suites.append("operator")
        unknown = [s for s in suites if s not in SUITES]
        if unknown:
            typer.echo(f"unknown suite(s): {', '.join(unknown)}; choose from {', '.join(SUITES)}", err=True)
            raise typer.Exit(2)
        results: dict[str, Any] = {"machine": stack.machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ")}
        if "protocol" in suites:
            res = asyncio.run(stack.protocol_overhead(seconds, tuple(concurrency)))
            results["protocol"] = res
            typer.echo(
                "\n== No-op engine: API -> Redis -> worker -> API (64 kB body) vs bare FastAPI route =="
            )
            typer.echo(table(res["load"]))
            typer.echo(f"memory: {res['memory']}")
        if "engine" in suites:
            res = asyncio.run(stack.engine_vs_stack())
            results["engine_vs_stack"] = res
            typer.echo(
                "\n== ~5 s utterance: whisper engine called directly vs through the stack (medians) =="
            )
            typer.echo(table([res]))
        if "surfaces" in suites:
            res = asyncio.run(stack.api_surfaces())
            results["surfaces"] = res
            typer.echo(
                "\n== API surfaces on CPU engines (2 s STT, one-sentence TTS); engine_ms = direct engine call =="
            )
            typer.echo(table(res["rows"]))
        if "streaming" in suites:
            from kubespeech.bench.streaming import streaming

            res = asyncio.run(streaming())
            results["streaming"] = res
            typer.echo(
                "\n== Live STT: end of phrase -> final event (whisper tiny.en, real-time paced clients) =="
            )
            typer.echo(table(res["stt_phrase_latency"]))
            typer.echo(
                f"\n== Live STT sessions on one worker (keeps up: every final within {res['lag_bound_s']} s) =="
            )
            typer.echo(table(res["sessions_per_worker"]))
            typer.echo(f"sessions one worker sustains: {res['sessions_one_worker_sustains']}")
            typer.echo("\n== Streaming TTS over SSE (piper): time to first audio vs whole synthesis ==")
            typer.echo(table([res["tts_streaming"]]))
        if "cache" in suites:
            from kubespeech.bench.cache import cache_bench

            res = asyncio.run(cache_bench(seconds))
            results["cache"] = res
            typer.echo(
                "\n== Result cache: p50 of a hit vs a miss (piper TTS, whisper tiny.en STT, one at a time) =="
            )
            typer.echo(table(res["latency"]))
            typer.echo(
                "\n== Result cache: TTS at 8 clients, 90 % repeats, cache vs no-store (medians of windows) =="
            )
            typer.echo(table(res["throughput"]))
            typer.echo(f"speed-up: {res['throughput_speedup']}x")
        if "operator" in suites:
            from kubespeech.bench.operator import run_operator_bench

            res = run_operator_bench()
            results["operator"] = res
            typer.echo("\n== Operator (real kube-apiserver) ==")
            typer.echo(json.dumps(res, indent=2))
        if "autoscaler" in suites:
            from kubespeech.bench.operator import run_autoscaler_bench

            res = run_autoscaler_bench()
            results["autoscaler"] = res
            typer.echo(
                "\n== Autoscaler: queue change → Deployment replicas (real kube-apiserver), simulator =="
            )
            typer.echo(json.dumps(res, indent=2))
        if "gpu" in suites:
            from kubespeech.bench.gpu import run_gpu_bench

            res = run_gpu_bench()
            results["gpu"] = res
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps(results, indent=2))
        typer.echo(f"\nmachine: {results['machine']}\nresults: {path}")
