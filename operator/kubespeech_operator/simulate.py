"""`kubespeech autoscale simulate`: our queue-depth autoscaler beside KEDA + HPA defaults, on synthetic load.

Both scalers drive the same model of a worker pool, event by event (deterministic, no randomness):

- a replica is requested, becomes ready ``startup_seconds`` later, then serves one job at a time, each taking
  ``service_seconds``, from one FIFO queue; on scale-down Kubernetes removes not-ready pods first, then the
  most recently ready; a removed pod that is running a job finishes it (graceful termination) and holds its
  GPU until then. GPU time counts from the request to the release, one GPU per replica.
- "ours": :class:`~kubespeech_operator.autoscaler.ModelAutoscaler`, the operator's own decision code, polled
  every ``poll_seconds`` (2 s) with waiting + in-flight jobs.
- "keda_hpa": KEDA with its defaults (polls every 30 s; wakes 0 to 1 when the metric is above 0 at a poll;
  back to 0 after ``cooldownPeriod`` 300 s without an active poll) and the HPA it creates (syncs every 15 s
  while above 0 replicas, desired = ceil(metric / target), default behaviour: up by max(4 pods, 100 %) per
  15 s, down after a 300 s stabilization window by 100 % per 15 s, between 1 and maxReplicas). KEDA's metrics
  server answers the HPA with a fresh reading at each sync. KEDA is given the right metric (the same
  waiting + in-flight count), so the comparison isolates the timing defaults.

All pollers start at t=0; at one instant, job completions come first, then pods becoming ready, then polls,
then arrivals (a job arriving exactly at a poll is seen at the next poll, by both).
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from kubespeech_operator.autoscaler import (
    Load,
    ModelAutoscaler,
    PoolPolicy,
    ReplicaHistory,
    default_scale_down,
    default_scale_up,
    hpa_default_scale_down,
)

BUILTIN_TRACES = ("burst", "ramp", "diurnal", "single")
_POOL_KEY = "sim/pool"


class TraceError(ValueError):
    """A trace name or file that cannot be turned into arrival times."""


@dataclass(frozen=True)
class SimConfig:
    """The pool and the pod model both scalers run against."""

    startup_seconds: float = 30.0
    service_seconds: float = 1.0
    poll_seconds: float = 2.0
    min_replicas: int = 0
    max_replicas: int = 20
    target_queue_depth_per_replica: int = 2
    activation_queue_depth: int = 0
    cooldown_seconds: int = 120
    keda_polling_interval: float = 30.0
    keda_cooldown_period: float = 300.0
    hpa_sync_period: float = 15.0
    # Past the last arrival, to let both scalers drain the queue and go back to zero.
    tail_seconds: float = 3600.0


@dataclass
class SimResult:
    """What one scaler achieved on one trace."""

    reaction_seconds: float | None
    p95_wait_seconds: float | None
    gpu_minutes: float
    jobs_served: int
    jobs_total: int
    mean_wait_seconds: float | None
    max_wait_seconds: float | None
    peak_replicas: int
    scale_changes: int
    replica_starts: int


# --- traces --------------------------------------------------------------------------------------------------


def _from_rate(rate: Callable[[float], float], duration: float, step: float = 0.01) -> list[float]:
    """Deterministic arrivals: the k-th job arrives when the integrated rate reaches k."""
    arrivals: list[float] = []
    integral, next_job = 0.0, 1
    for i in range(round(duration / step)):
        integral += rate((i + 0.5) * step) * step
        while integral >= next_job:
            arrivals.append(round((i + 1) * step, 6))
            next_job += 1
    return arrivals


def builtin_trace(name: str) -> list[float]:
    """Arrival times (seconds) of a built-in trace."""
    if name == "single":
        return [10.0]
    if name == "burst":
        return [60.0 + i * 10.0 / 200 for i in range(200)]
    if name == "ramp":
        return _from_rate(lambda t: 10.0 * (t if t < 600 else 1200 - t) / 600, 1200.0)
    if name == "diurnal":
        return _from_rate(lambda t: 10.0 * (1 - math.cos(2 * math.pi * t / 1800)) / 2, 1800.0)
    raise TraceError(f"unknown trace {name!r}: use {', '.join(BUILTIN_TRACES)} or a CSV/JSON file")


def _seconds(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TraceError(f"{where}: {value!r} is not a number of seconds")
    try:
        seconds = float(value)
    except ValueError:
        raise TraceError(f"{where}: {value!r} is not a number of seconds") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise TraceError(f"{where}: {value!r} is not a time of 0 s or later")
    return seconds


def load_trace_file(path: Path) -> list[float]:
    """Arrival times from a JSON list of seconds, or a CSV whose first column is seconds (header allowed)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot read: {exc}") from None
    arrivals: list[float] = []
    if path.suffix.lower() == ".json" or text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{path}: not valid JSON: {exc}") from None
        if not isinstance(data, list):
            raise TraceError(f"{path}: expected a JSON list of arrival times in seconds")
        arrivals = [_seconds(value, f"{path}: item {i}") for i, value in enumerate(data)]
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            cell = line.split(",", 1)[0].strip()
            if not cell or cell.startswith("#"):
                continue
            if not arrivals and number == 1 and not _is_number(cell):
                continue  # a header row
            arrivals.append(_seconds(cell, f"{path}: line {number}"))
    if not arrivals:
        raise TraceError(f"{path}: no arrival times")
    return sorted(arrivals)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def resolve_trace(trace: str) -> list[float]:
    """A built-in trace by name, else a file of arrival times."""
    if trace in BUILTIN_TRACES:
        return builtin_trace(trace)
    path = Path(trace)
    if not path.is_file():
        raise TraceError(
            f"unknown trace {trace!r}: use {', '.join(BUILTIN_TRACES)} or the path of a CSV/JSON file"
        )
    return load_trace_file(path)


# --- the pool model -------------------------------------------------------------------------------------------

_DONE, _READY, _POLL, _SYNC, _ARRIVE = range(5)


@dataclass(eq=False)
class _Replica:
    requested_at: float
    ready_at: float
    job_done_at: float | None = None
    removed: bool = False


@dataclass
class _Cluster:
    """One worker Deployment, its queue and the pods' lives; scalers call :meth:`scale_to`."""

    config: SimConfig
    arrivals: list[float]
    queue: deque[float] = field(default_factory=deque)
    live: list[_Replica] = field(default_factory=list)
    stopping: list[_Replica] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)
    gpu_seconds: float = 0.0
    first_increase: float | None = None
    peak: int = 0
    changes: int = 0
    starts: int = 0
    now: float = 0.0
    _heap: list[tuple[float, int, int, Any]] = field(default_factory=list)
    _seq: itertools.count[int] = field(default_factory=itertools.count)
    _pending_arrivals: int = 0

    @property
    def replicas(self) -> int:
        return len(self.live)

    def in_flight(self) -> int:
        return sum(r.job_done_at is not None for r in itertools.chain(self.live, self.stopping))

    def idle(self) -> bool:
        """Nothing left to do or to run: the simulation can stop."""
        return not (self._pending_arrivals or self.queue or self.live or self.stopping)

    def push(self, at: float, kind: int, payload: Any) -> None:
        heapq.heappush(self._heap, (at, kind, next(self._seq), payload))

    def scale_to(self, desired: int) -> None:
        now, count = self.now, len(self.live)
        if desired == count:
            return
        self.changes += 1
        if desired > count:
            if self.first_increase is None:
                self.first_increase = now
            for _ in range(desired - count):
                replica = _Replica(requested_at=now, ready_at=now + self.config.startup_seconds)
                self.live.append(replica)
                self.push(replica.ready_at, _READY, replica)
            self.starts += desired - count
            self.peak = max(self.peak, desired)
            return
        for replica in self._victims(count - desired):
            self.live.remove(replica)
            replica.removed = True
            if replica.job_done_at is not None:
                self.stopping.append(replica)
            else:
                self.gpu_seconds += now - replica.requested_at

    def _victims(self, n: int) -> list[_Replica]:
        now = self.now
        # The ReplicaSet controller's order: pods not ready yet first, then those ready for the least time.
        ranked = sorted(self.live, key=lambda r: (r.ready_at <= now, -r.ready_at))
        return ranked[:n]

    def _dispatch(self) -> None:
        now = self.now
        for replica in self.live:
            if not self.queue:
                return
            if replica.ready_at <= now and replica.job_done_at is None:
                arrived = self.queue.popleft()
                self.waits.append(now - arrived)
                replica.job_done_at = now + self.config.service_seconds
                self.push(replica.job_done_at, _DONE, replica)

    def run(self, pollers: list[tuple[float, int, Callable[[_Cluster], None]]]) -> float:
        """Run until every job is served and the pool is back at zero (or the tail ends); returns the end."""
        for at in self.arrivals:
            self.push(at, _ARRIVE, None)
        self._pending_arrivals = len(self.arrivals)
        for interval, kind, poll in pollers:
            self.push(0.0, kind, (interval, poll))
        horizon = (self.arrivals[-1] if self.arrivals else 0.0) + self.config.tail_seconds
        while self._heap and self._heap[0][0] <= horizon:
            at, kind, _, payload = heapq.heappop(self._heap)
            self.now = at
            if kind == _ARRIVE:
                self._pending_arrivals -= 1
                self.queue.append(at)
            elif kind == _DONE:
                replica = payload
                replica.job_done_at = None
                if replica.removed:
                    self.stopping.remove(replica)
                    self.gpu_seconds += at - replica.requested_at
            elif kind == _READY and payload.removed:
                continue
            elif kind in (_POLL, _SYNC):
                interval, poll = payload
                poll(self)
                if not self.idle():
                    self.push(at + interval, kind, payload)
            self._dispatch()
        end = self.now if self.idle() else horizon
        self.gpu_seconds += sum(end - r.requested_at for r in itertools.chain(self.live, self.stopping))
        return end

    def result(self) -> SimResult:
        waits = sorted(self.waits)
        first = self.arrivals[0] if self.arrivals else None
        reaction = None
        if first is not None and self.first_increase is not None:
            reaction = round(self.first_increase - first, 3)
        return SimResult(
            reaction_seconds=reaction,
            p95_wait_seconds=round(waits[math.ceil(0.95 * len(waits)) - 1], 3) if waits else None,
            gpu_minutes=round(self.gpu_seconds / 60, 2),
            jobs_served=len(waits),
            jobs_total=len(self.arrivals),
            mean_wait_seconds=round(sum(waits) / len(waits), 3) if waits else None,
            max_wait_seconds=round(waits[-1], 3) if waits else None,
            peak_replicas=self.peak,
            scale_changes=self.changes,
            replica_starts=self.starts,
        )


def _metric(cluster: _Cluster) -> int:
    return len(cluster.queue) + cluster.in_flight()


def _run_ours(arrivals: list[float], config: SimConfig) -> SimResult:
    policy = PoolPolicy(
        key=_POOL_KEY,
        min_replicas=config.min_replicas,
        max_replicas=config.max_replicas,
        idle_replicas=None,
        target_queue_depth_per_replica=config.target_queue_depth_per_replica,
        activation_queue_depth=config.activation_queue_depth,
        target_active_streams=None,
        cooldown_seconds=config.cooldown_seconds,
        scale_up=default_scale_up(),
        scale_down=default_scale_down(),
    )
    autoscaler = ModelAutoscaler("sim", [policy])

    def poll(cluster: _Cluster) -> None:
        load = Load(waiting=len(cluster.queue), in_flight=cluster.in_flight())
        (decision,) = autoscaler.decide(cluster.now, load, {_POOL_KEY: cluster.replicas})
        cluster.scale_to(decision.desired)

    cluster = _Cluster(config, arrivals)
    cluster.run([(config.poll_seconds, _POLL, poll)])
    return cluster.result()


def _run_keda_hpa(arrivals: list[float], config: SimConfig) -> SimResult:
    up, down = default_scale_up(), hpa_default_scale_down()
    history = ReplicaHistory()
    last_active: list[float | None] = [None]

    def keda_poll(cluster: _Cluster) -> None:
        if _metric(cluster) > 0:
            last_active[0] = cluster.now
            if cluster.replicas == 0:
                cluster.scale_to(1)
        elif cluster.replicas > 0:
            since = last_active[0]
            if since is None or cluster.now - since >= config.keda_cooldown_period:
                cluster.scale_to(0)

    def hpa_sync(cluster: _Cluster) -> None:
        now, current = cluster.now, cluster.replicas
        history.prune(now, max(up.memory_seconds, down.memory_seconds))
        if current == 0:
            return  # the HPA does nothing at 0 replicas: waking is KEDA's job
        recommendation = math.ceil(_metric(cluster) / config.target_queue_depth_per_replica)
        stabilized = history.stabilize(now, recommendation, current, up, down)
        desired = min(max(history.limit(now, current, stabilized, up, down), 1), config.max_replicas)
        history.record(now, desired - current)
        cluster.scale_to(desired)

    cluster = _Cluster(config, arrivals)
    cluster.run([(config.keda_polling_interval, _POLL, keda_poll), (config.hpa_sync_period, _SYNC, hpa_sync)])
    return cluster.result()


def simulate(arrivals: list[float], config: SimConfig | None = None) -> dict[str, SimResult]:
    """Both scalers on the same arrivals: ``{"ours": ..., "keda_hpa": ...}``."""
    config = config or SimConfig()
    arrivals = sorted(arrivals)
    return {"ours": _run_ours(arrivals, config), "keda_hpa": _run_keda_hpa(arrivals, config)}


# --- CLI ------------------------------------------------------------------------------------------------------

_ROWS = (
    ("reaction_seconds", "reaction (s)"),
    ("p95_wait_seconds", "p95 wait (s)"),
    ("mean_wait_seconds", "mean wait (s)"),
    ("max_wait_seconds", "max wait (s)"),
    ("gpu_minutes", "GPU-minutes"),
    ("jobs_served", "jobs served"),
    ("peak_replicas", "peak replicas"),
    ("replica_starts", "replica starts"),
)


def format_table(trace: str, results: dict[str, SimResult], config: SimConfig) -> str:
    """The human-readable comparison."""
    rows = [
        f"trace {trace}: {results['ours'].jobs_total} jobs; pod start-up {config.startup_seconds:g} s, "
        f"{config.service_seconds:g} s per job, {config.target_queue_depth_per_replica} jobs per replica, "
        f"0-{config.max_replicas} replicas",
        f"{'':16}{'ours':>12}{'keda_hpa':>12}",
    ]
    for name, label in _ROWS:
        cells = []
        for result in (results["ours"], results["keda_hpa"]):
            value = getattr(result, name)
            cells.append("-" if value is None else f"{value:g}")
        rows.append(f"{label:16}{cells[0]:>12}{cells[1]:>12}")
    return "\n".join(rows)


def register_autoscale(app: typer.Typer) -> None:
    """Add `kubespeech autoscale simulate` to the kubespeech CLI."""
    autoscale = typer.Typer(no_args_is_help=True)

    @autoscale.callback()
    def _autoscale() -> None:
        """Queue-depth autoscaling tools."""

    @autoscale.command("simulate")
    def simulate_command(
        trace: Annotated[
            str,
            typer.Option(
                help="burst, ramp, diurnal, single, or a CSV/JSON file of arrival times in seconds."
            ),
        ],
        as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
        startup_seconds: Annotated[
            float, typer.Option(min=0, help="Seconds from a replica's request to its readiness.")
        ] = 30.0,
        service_seconds: Annotated[
            float, typer.Option(min=0.001, help="Seconds a replica takes per job (one at a time).")
        ] = 1.0,
    ) -> None:
        """Compare our autoscaler with KEDA + HPA defaults on a synthetic load (deterministic)."""
        try:
            arrivals = resolve_trace(trace)
        except TraceError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        config = SimConfig(startup_seconds=startup_seconds, service_seconds=service_seconds)
        results = simulate(arrivals, config)
        if as_json:
            typer.echo(json.dumps({name: asdict(result) for name, result in results.items()}, indent=2))
        else:
            typer.echo(format_table(trace, results, config))

    app.add_typer(autoscale, name="autoscale", help="Queue-depth autoscaling tools.")
