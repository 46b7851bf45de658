"""``kubespeech operator``: run the kopf operator (in-cluster or against a kubeconfig); adds ``render`` too."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import signal
import weakref
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from kubespeech_operator.settings import OperatorSettings


class _QuietResync(logging.Filter):
    """Drops kopf's "Timer 'resync' succeeded." line: one per object per interval says nothing new."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timer 'resync' succeeded")


class _DropKopfSettings(logging.Filter):
    """kopf attaches its whole settings object to every per-object record; keep k8s_ref, drop that."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.pop("settings", None)
        return True


_IN_OPERATOR: contextvars.ContextVar[bool] = contextvars.ContextVar("kubespeech_in_operator", default=False)


class _NotSpawnedBy(Collection[asyncio.Task[Any]]):
    """kopf's ``ignored`` tasks: every task the operator did not spawn (kopf only asks ``in``)."""

    def __init__(self, ours: weakref.WeakSet[asyncio.Task[Any]]) -> None:
        self._ours = ours

    def __contains__(self, task: object) -> bool:
        return task not in self._ours

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(())

    def __len__(self) -> int:
        return 0


async def run_operator(
    settings: OperatorSettings,
    *,
    stop_flag: asyncio.Event | None = None,
    ready_flag: asyncio.Event | None = None,
    shared_loop: bool = False,
) -> None:
    """Run kopf with the operator's handlers in the current event loop until ``stop_flag`` is set.

    ``shared_loop``: the loop also runs other work (tests, benchmarks). On exit kopf waits for, then cancels,
    every task created after it started, which would include the caller's own; here it only sees the tasks
    it spawned itself (tracked through a context variable inherited by every task it creates).
    """
    import kopf

    from kubespeech_operator.handlers import build_registry

    namespaces = settings.namespace_list()
    options: dict[str, Any] = {
        "registry": build_registry(settings),
        "clusterwide": not namespaces,
        "namespaces": namespaces,
        "standalone": True,
        # Explicit: kopf's default identity calls getpass.getuser(), which raises for a uid without a
        # passwd entry (the chart's 65532), and the pod would crash-loop.
        "identity": settings.identity,
        "liveness_endpoint": settings.liveness_endpoint,
        "stop_flag": stop_flag,
        "ready_flag": ready_flag,
    }
    if not shared_loop:
        await kopf.operator(**options)
        return
    loop = asyncio.get_running_loop()
    ours: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()
    previous = loop.get_task_factory()

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Future[Any]:
        task = previous(loop, coro, **kwargs) if previous else asyncio.Task(coro, loop=loop, **kwargs)
        if _IN_OPERATOR.get() and isinstance(task, asyncio.Task):
            ours.add(task)
        return task

    token = _IN_OPERATOR.set(True)
    loop.set_task_factory(factory)
    try:
        tasks = await kopf.spawn_tasks(**options)
        await kopf.run_tasks(tasks, ignored=_NotSpawnedBy(ours))
    finally:
        loop.set_task_factory(previous)
        _IN_OPERATOR.reset(token)


def operator(
    namespace: Annotated[
        list[str] | None,
        typer.Option(
            "--namespace", "-n", help="Namespace to watch (repeatable; globs allowed). Default: all."
        ),
    ] = None,
    all_namespaces: Annotated[
        bool,
        typer.Option("--all-namespaces", "-A", help="Watch every namespace (overrides the environment)."),
    ] = False,
    kubeconfig: Annotated[
        Path | None, typer.Option(help="kubeconfig file (default: in-cluster, then $KUBECONFIG).")
    ] = None,
    liveness_port: Annotated[
        int | None, typer.Option(help="Liveness probe port (0: off). Default 8080.")
    ] = None,
    resync_interval: Annotated[
        float | None, typer.Option(help="Seconds between re-reconciles of every SpeechDeployment.")
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = None,
) -> None:
    """Run the SpeechDeployment operator (KUBESPEECH_OPERATOR_* variables configure it too)."""
    from kubespeech.logging_setup import setup_logging

    overrides: dict[str, object] = {}
    if all_namespaces:
        overrides["namespaces"] = ""
    elif namespace:
        overrides["namespaces"] = ",".join(namespace)
    if kubeconfig is not None:
        overrides["kubeconfig"] = kubeconfig
    if liveness_port is not None:
        overrides["liveness_port"] = liveness_port
    if resync_interval is not None:
        overrides["resync_interval_s"] = resync_interval
    if log_level is not None:
        overrides["log_level"] = log_level
    settings = OperatorSettings(**overrides)  # type: ignore[arg-type]
    setup_logging(settings.log_level, json=settings.log_format == "json")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropKopfSettings())
    if settings.log_level.upper() != "DEBUG":
        logging.getLogger("kopf.objects").addFilter(_QuietResync())
        # One line per API request is debugging detail; the reconciler logs what it changed.
        logging.getLogger("httpx").setLevel(logging.WARNING)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await run_operator(settings, stop_flag=stop)

    asyncio.run(main())


def register(app: typer.Typer) -> None:
    app.command("operator")(operator)
    from kubespeech_operator.simulate import register_autoscale

    register_autoscale(app)
    try:
        from kubespeech_operator.render import register_render
    except ImportError:
        return  # the render command lands with the builders
    register_render(app)
