"""Queue-depth autoscaling decisions for the worker pools of one model queue: pure, time passed in.

One :class:`ModelAutoscaler` covers every pool that serves one model queue, in declaration order. Each poll
the caller passes the queue's :class:`Load` (or ``None`` when Redis could not be read) and each pool's current
replica count (a pool missing from the mapping counts as 0); :meth:`ModelAutoscaler.decide` returns one
:class:`PoolDecision` per pool. No I/O, no clock: ``now`` is seconds on any monotonic clock.

Load and targets
    Work is waiting + in-flight jobs: a job a worker is running still occupies a replica, so counting only
    pending (delivered, unacknowledged) or only waiting entries under-counts and scales down busy pools.
    The model's total is ``ceil(max(work / targetQueueDepthPerReplica, streams / targetActiveStreams))``,
    streams ignored when ``targetActiveStreams`` is unset. Pools on one queue should share their targets;
    the FIRST pool's targets, activation depth and cooldown are the model's.

Activation
    When every pool is at 0 replicas the model is asleep: it wakes only when work (+ counted streams) reaches
    ``max(1, activationQueueDepth)`` (so 0 and 1 both mean one queued job wakes it), reason ``WakeFromZero``;
    below that it stays asleep (reason ``BelowActivation``) unless a pool's idle floor (below) is above 0.

Ordered overflow and floors
    The total is handed out in declaration order: each pool gets ``clamp(remaining, floor, maxReplicas)``
    and the remainder goes on to the next, so earlier pools (reserved, on-demand) fill first and later pools
    (spot) empty first on the way down. A pool's floor is ``minReplicas`` while there is work or streams and
    until ``cooldownSeconds`` have passed since the last poll that saw any; after that it is
    ``idleReplicas`` when set, else ``minReplicas``. When every floor is 0 the model still keeps one replica
    (in the first pool that has one) until the cooldown has passed, then goes to zero (``ScaleToZero``).
    A poll that cannot read Redis counts as a poll that saw work (the cooldown restarts): a model is never
    put to sleep for lack of data. A fresh autoscaler starts its cooldown at its first poll, so an operator
    restart does not scale anything to zero at once.

Per pool, as the HorizontalPodAutoscaler does
    Stabilization: the recommendation is held between the lowest recommendation of the scale-up window and
    the highest of the scale-down window (both including this poll), starting from the current count. Then
    rate limits: each policy allows, relative to the count at the start of its period (current minus the
    changes this autoscaler made within the period), ``+/- value`` pods or ``value`` percent of that count;
    ``Max`` picks the most permissive policy, ``Min`` the least, ``Disabled`` allows no change in that
    direction, and no policies means no limit. A Percent policy always allows at least one pod more than
    the period's start: any percentage of 0 is 0, and the HPA never has to scale up from 0 (KEDA does that
    step for it). Like the HPA, a limit never moves the count the other way. The result is clamped to
    ``[0, maxReplicas]`` (a lowered ``maxReplicas`` applies at once). Since the recommendations include the
    floors, going to ``idleReplicas`` or zero takes the cooldown, then the scale-down window and rate limits.
    The changes remembered are the ones this autoscaler decided, as in the HPA: when a decision is not
    applied (license clamp, failed write), the period looks busier than it was, so limits only get stricter.

Defaults (a pool that gives no rules)
    Scale up: the HPA's default, window 0, the larger of 4 pods or 100 % per 15 s. Scale down: window 0 and
    10 % per 15 s, which is one pod per 15 s below 10 replicas (the remaining count is rounded down, as in
    the HPA). Pod start-up delays the effect of every change, so a queue-depth loop that drops capacity as
    soon as the queue empties oscillates: the queue builds again, new pods cold-start, then are dropped
    again. Releasing capacity gradually damps that while still following the load down; a window (the HPA's
    300 s) holds the whole peak for its length instead. ``kubespeech autoscale simulate`` (30 s start-up,
    1 s jobs) on the ramp trace: 100 % per 15 s starts 349 pods for a peak of 20, p95 wait 15 s, 258
    GPU-minutes; 10 % per 15 s starts 84, p95 wait 4.6 s, 167 GPU-minutes (a 60 s window: 145, 13 s, 285).
    The cooldown, not these rules, guards the last step to idle or zero.

Missing data (``load=None``)
    Every pool holds its current count (reason ``MissingData``). From ``missing_data_polls`` consecutive
    misses on, a pool with ``fallbackReplicas`` goes to it, clamped to ``maxReplicas``, without rate limits
    (reason ``Fallback``; the admin's answer to "Redis is down"), except that a fallback of 0 never stops a
    running pool: it holds instead. Nothing is ever scaled to zero on missing data.

Reasons
    ``ScaleUp``, ``ScaleDown``, ``WakeFromZero``, ``ScaleToZero`` (the model's last replicas after the
    cooldown), ``Held`` (the cooldown keeps replicas the load no longer needs), ``Stabilizing`` (a window
    holds the count), ``RateLimited`` (a policy holds or slows the change), ``BelowActivation``,
    ``MissingData``, ``Fallback``, ``LicenseClamp``, ``Steady``.

License
    :func:`clamp_to_license` caps the decisions of all pools of a stack at the license's worker-replica and
    GPU limits, cutting from the last pool backwards (reason ``LicenseClamp``).
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

SelectPolicy = Literal["Max", "Min", "Disabled"]


@dataclass(frozen=True)
class ScalingPolicyRule:
    """One HPA-style rate limit: ``value`` pods or ``value`` percent per ``period_seconds``."""

    type: Literal["Pods", "Percent"]
    value: int
    period_seconds: int


@dataclass(frozen=True)
class ScalingBehavior:
    """Stabilization window and rate limits for one direction (up or down)."""

    stabilization_window_seconds: int
    select_policy: SelectPolicy
    policies: tuple[ScalingPolicyRule, ...]

    @property
    def memory_seconds(self) -> int:
        """How far back this behaviour ever looks (window or longest period)."""
        return max([self.stabilization_window_seconds, *(p.period_seconds for p in self.policies)])

    def with_overrides(
        self,
        stabilization_window_seconds: int | None = None,
        select_policy: SelectPolicy | None = None,
        policies: Sequence[ScalingPolicyRule] | None = None,
    ) -> ScalingBehavior:
        """This behaviour with the fields a spec sets replaced (unset fields keep the default, as in the HPA)."""
        return ScalingBehavior(
            stabilization_window_seconds=(
                self.stabilization_window_seconds
                if stabilization_window_seconds is None
                else stabilization_window_seconds
            ),
            select_policy=self.select_policy if select_policy is None else select_policy,
            policies=self.policies if policies is None else tuple(policies),
        )


def default_scale_up() -> ScalingBehavior:
    """The HPA's default scale-up: no window, the larger of 4 pods or 100 % per 15 s."""
    return ScalingBehavior(
        stabilization_window_seconds=0,
        select_policy="Max",
        policies=(ScalingPolicyRule("Pods", 4, 15), ScalingPolicyRule("Percent", 100, 15)),
    )


def default_scale_down() -> ScalingBehavior:
    """No window, 10 % (at least one pod) per 15 s: a gradual release damps oscillation (module docstring)."""
    return ScalingBehavior(
        stabilization_window_seconds=0,
        select_policy="Max",
        policies=(ScalingPolicyRule("Percent", 10, 15),),
    )


def hpa_default_scale_down() -> ScalingBehavior:
    """The HPA's own default scale-down: a 300 s window, then 100 % per 15 s."""
    return ScalingBehavior(
        stabilization_window_seconds=300,
        select_policy="Max",
        policies=(ScalingPolicyRule("Percent", 100, 15),),
    )


@dataclass(frozen=True)
class PoolPolicy:
    """One pool's autoscaling settings, keyed e.g. ``asr/l4``."""

    key: str
    min_replicas: int
    max_replicas: int
    idle_replicas: int | None
    target_queue_depth_per_replica: int
    activation_queue_depth: int
    target_active_streams: int | None
    cooldown_seconds: int
    scale_up: ScalingBehavior
    scale_down: ScalingBehavior
    fallback_replicas: int | None = None
    gpus_per_replica: int = 0

    def __post_init__(self) -> None:
        if self.max_replicas < 1 or not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"{self.key}: need 0 <= minReplicas <= maxReplicas and maxReplicas >= 1")
        if self.idle_replicas is not None and not 0 <= self.idle_replicas <= self.min_replicas:
            raise ValueError(f"{self.key}: need 0 <= idleReplicas <= minReplicas")
        if self.target_queue_depth_per_replica < 1 or (
            self.target_active_streams is not None and self.target_active_streams < 1
        ):
            raise ValueError(f"{self.key}: targets must be at least 1")

    @property
    def idle_floor(self) -> int:
        return self.min_replicas if self.idle_replicas is None else self.idle_replicas

    @property
    def memory_seconds(self) -> int:
        return max(self.scale_up.memory_seconds, self.scale_down.memory_seconds)


@dataclass(frozen=True)
class Load:
    """One poll of a model queue: jobs waiting, jobs being run, live streaming sessions."""

    waiting: int
    in_flight: int
    streams: int = 0


@dataclass(frozen=True)
class LicenseLimits:
    """The license's caps over all worker pools of a stack (None: no cap)."""

    max_worker_replicas: int | None = None
    max_gpus: int | None = None


@dataclass(frozen=True)
class PoolDecision:
    """What one pool should run, and why (``reason`` is one CamelCase word, ``message`` has the numbers)."""

    key: str
    current: int
    desired: int
    reason: str
    message: str


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class ReplicaHistory:
    """One scaler's memory for HPA-style rules: recent recommendations and the replica changes it made."""

    def __init__(self) -> None:
        self._recommendations: deque[tuple[float, int]] = deque()
        self._changes: deque[tuple[float, int]] = deque()

    def __len__(self) -> int:
        return len(self._recommendations) + len(self._changes)

    def prune(self, now: float, keep_seconds: float) -> None:
        """Forget entries no window or period of ``keep_seconds`` can reach any more."""
        cutoff = now - keep_seconds
        for entries in (self._recommendations, self._changes):
            while entries and entries[0][0] <= cutoff:
                entries.popleft()

    def stabilize(
        self, now: float, recommendation: int, current: int, up: ScalingBehavior, down: ScalingBehavior
    ) -> int:
        """The HPA's stabilization; remembers ``recommendation``."""
        up_rec = down_rec = recommendation
        for at, past in self._recommendations:
            if at > now - up.stabilization_window_seconds:
                up_rec = min(up_rec, past)
            if at > now - down.stabilization_window_seconds:
                down_rec = max(down_rec, past)
        self._recommendations.append((now, recommendation))
        return min(max(current, up_rec), down_rec)

    def limit(self, now: float, current: int, target: int, up: ScalingBehavior, down: ScalingBehavior) -> int:
        """``target`` cut to what the rate-limit policies allow from ``current``."""
        if target > current:
            return min(target, self._up_limit(now, current, up))
        if target < current:
            return max(target, self._down_limit(now, current, down))
        return current

    def record(self, now: float, change: int) -> None:
        if change:
            self._changes.append((now, change))

    def _period_start(self, now: float, current: int, period: int) -> int:
        return current - sum(change for at, change in self._changes if at > now - period)

    def _up_limit(self, now: float, current: int, rules: ScalingBehavior) -> int:
        if rules.select_policy == "Disabled":
            return current
        if not rules.policies:
            return sys.maxsize
        proposals = []
        for policy in rules.policies:
            start = self._period_start(now, current, policy.period_seconds)
            if policy.type == "Pods":
                proposals.append(start + policy.value)
            else:
                proposals.append(max(start + 1, _ceil_div(start * (100 + policy.value), 100)))
        limit = max(proposals) if rules.select_policy == "Max" else min(proposals)
        # As in the HPA: changes made earlier in the period never turn a scale-up into a scale-down.
        return max(limit, current)

    def _down_limit(self, now: float, current: int, rules: ScalingBehavior) -> int:
        if rules.select_policy == "Disabled":
            return current
        if not rules.policies:
            return 0
        proposals = []
        for policy in rules.policies:
            start = self._period_start(now, current, policy.period_seconds)
            if policy.type == "Pods":
                proposals.append(start - policy.value)
            else:
                proposals.append(start * (100 - policy.value) // 100)
        limit = min(proposals) if rules.select_policy == "Max" else max(proposals)
        return max(0, min(limit, current))


@dataclass(frozen=True)
class _Plan:
    """The model-level step of one poll: load, floors and the per-pool recommendations."""

    summary: str
    recommendations: list[int]
    waking: bool
    below_activation: bool
    held: list[bool]
    cooldown_seconds: int
    cooldown_left: float
    quiet: bool


class ModelAutoscaler:
    """All pools serving one model queue, in declaration order, with the history the rules need."""

    def __init__(self, model: str, pools: Sequence[PoolPolicy], *, missing_data_polls: int = 3) -> None:
        if missing_data_polls < 1:
            raise ValueError("missing_data_polls must be at least 1")
        self.model = model
        self.missing_data_polls = missing_data_polls
        self._pools: tuple[PoolPolicy, ...] = ()
        self._history: dict[str, ReplicaHistory] = {}
        self._last_active: float | None = None
        self._misses = 0
        self.update_pools(pools)

    @property
    def pools(self) -> tuple[PoolPolicy, ...]:
        return self._pools

    def update_pools(self, pools: Sequence[PoolPolicy]) -> None:
        """Take a changed spec; pools that remain (same key) keep their history."""
        keys = [pool.key for pool in pools]
        if len(set(keys)) != len(keys):
            raise ValueError(f"{self.model}: duplicate pool keys in {keys}")
        self._pools = tuple(pools)
        self._history = {key: self._history.get(key) or ReplicaHistory() for key in keys}

    def history_size(self) -> int:
        """Entries kept over all pools (bounded by the longest window or period)."""
        return sum(len(history) for history in self._history.values())

    def decide(self, now: float, load: Load | None, current: Mapping[str, int]) -> list[PoolDecision]:
        """One poll: each pool's desired replicas given ``load`` (None: Redis unreadable) at time ``now``."""
        counts = [max(0, current.get(pool.key, 0)) for pool in self._pools]
        for pool in self._pools:
            self._history[pool.key].prune(now, pool.memory_seconds)
        if not self._pools:
            return []
        if load is None:
            return self._missing(now, counts)
        self._misses = 0
        plan = self._plan(now, load, counts)
        return [
            self._decide_pool(now, pool, count, index, plan)
            for index, (pool, count) in enumerate(zip(self._pools, counts, strict=True))
        ]

    def _plan(self, now: float, load: Load, counts: list[int]) -> _Plan:
        first = self._pools[0]
        work = max(0, load.waiting) + max(0, load.in_flight)
        streams = max(0, load.streams) if first.target_active_streams is not None else 0
        counted = work + streams
        if self._last_active is None or counted > 0:
            self._last_active = now
        quiet_for = now - self._last_active
        cooled = quiet_for >= first.cooldown_seconds
        total = _ceil_div(work, first.target_queue_depth_per_replica)
        if first.target_active_streams is not None:
            total = max(total, _ceil_div(streams, first.target_active_streams))
        threshold = max(1, first.activation_queue_depth)
        asleep = not any(counts)
        waking = asleep and counted >= threshold
        below_activation = asleep and 0 < counted < threshold
        idle_floors = [pool.idle_floor for pool in self._pools]
        if asleep and not waking:
            floors, total = idle_floors, 0
        else:
            floors = idle_floors if cooled else [pool.min_replicas for pool in self._pools]
        recommendations = _distribute(total, floors, self._pools)
        if not cooled and not asleep and not any(recommendations):
            keep = next(index for index, count in enumerate(counts) if count > 0)
            recommendations[keep] = 1
        after_cooldown = _distribute(total, idle_floors, self._pools)
        held = [
            counted == 0 and not cooled and rec > idle
            for rec, idle in zip(recommendations, after_cooldown, strict=True)
        ]
        target = f"{first.target_queue_depth_per_replica} jobs per replica"
        if first.target_active_streams is not None:
            target += f", {first.target_active_streams} streams per replica"
        summary = (
            f"{self.model}: {work} jobs ({load.waiting} waiting, {load.in_flight} in flight)"
            + (f" and {streams} streams" if first.target_active_streams is not None else "")
            + f" need {total} replicas at {target}"
        )
        if waking:
            summary += f"; the activation depth {threshold} is reached, waking from zero"
        elif below_activation:
            summary += f"; asleep at zero until {threshold} jobs wait (activationQueueDepth)"
        return _Plan(
            summary=summary,
            recommendations=recommendations,
            waking=waking,
            below_activation=below_activation,
            held=held,
            cooldown_seconds=first.cooldown_seconds,
            cooldown_left=max(0.0, first.cooldown_seconds - quiet_for),
            quiet=counted == 0,
        )

    def _decide_pool(self, now: float, pool: PoolPolicy, count: int, index: int, plan: _Plan) -> PoolDecision:
        history = self._history[pool.key]
        rec = plan.recommendations[index]
        stabilized = history.stabilize(now, rec, count, pool.scale_up, pool.scale_down)
        limited = history.limit(now, count, stabilized, pool.scale_up, pool.scale_down)
        desired = min(max(limited, 0), pool.max_replicas)
        history.record(now, desired - count)
        change = f"{pool.key} {count} to {desired}"
        if desired > count:
            # Waking says more than RateLimited: a wake above 4 replicas is nearly always rate-limited too.
            reason = "WakeFromZero" if plan.waking else "RateLimited" if limited < stabilized else "ScaleUp"
            detail = change
            if limited < stabilized:
                detail += f", not {stabilized}: scaleUp policies allow no more yet"
        elif desired < count:
            if count > pool.max_replicas and desired == pool.max_replicas:
                reason, detail = "ScaleDown", f"{change}: above maxReplicas {pool.max_replicas}"
            elif limited > stabilized:
                reason = "RateLimited"
                detail = f"{change}, not {stabilized}: scaleDown policies allow no fewer yet"
            elif desired == 0 and plan.quiet and plan.cooldown_left <= 0:
                reason = "ScaleToZero"
                detail = f"{change}: no jobs or streams for the {plan.cooldown_seconds} s cooldown"
            else:
                reason, detail = "ScaleDown", change
        elif stabilized != rec:
            direction = "scaleDown" if rec < count else "scaleUp"
            window = (pool.scale_down if rec < count else pool.scale_up).stabilization_window_seconds
            reason = "Stabilizing"
            detail = f"{pool.key} stays at {count}, not {rec}: the {window} s {direction} window holds it"
        elif limited != stabilized:
            direction = "scaleUp" if stabilized > count else "scaleDown"
            reason = "RateLimited"
            detail = (
                f"{pool.key} stays at {count}, not {stabilized}: {direction} policies allow no change yet"
            )
        elif plan.held[index]:
            reason = "Held"
            detail = f"{pool.key} keeps {count} with no work: {plan.cooldown_left:.0f} s of the cooldown left"
        elif plan.below_activation:
            reason, detail = "BelowActivation", f"{pool.key} stays at {count}"
        else:
            reason, detail = "Steady", f"{pool.key} stays at {count}"
        return PoolDecision(pool.key, count, desired, reason, f"{plan.summary}; {detail}.")

    def _missing(self, now: float, counts: list[int]) -> list[PoolDecision]:
        self._misses += 1
        # Unknown load may be load: restart the cooldown so that an outage never ends in a scale to zero.
        self._last_active = now
        decisions = []
        for pool, count in zip(self._pools, counts, strict=True):
            held = min(count, pool.max_replicas)
            misses = f"{self.model}: the queue could not be read ({self._misses} polls in a row)"
            if self._misses < self.missing_data_polls or pool.fallback_replicas is None:
                desired, reason = held, "MissingData"
                message = f"{misses}; {pool.key} holds {desired}."
            else:
                fallback = min(max(pool.fallback_replicas, 0), pool.max_replicas)
                if fallback == 0 and count > 0:
                    desired, reason = held, "MissingData"
                    message = f"{misses}; {pool.key} holds {desired}: missing data never scales to zero."
                else:
                    desired, reason = fallback, "Fallback"
                    message = f"{misses}; {pool.key} {count} to fallbackReplicas {desired}."
            self._history[pool.key].record(now, desired - count)
            decisions.append(PoolDecision(pool.key, count, desired, reason, message))
        return decisions


def _distribute(total: int, floors: Sequence[int], pools: Sequence[PoolPolicy]) -> list[int]:
    """Ordered overflow: each pool in turn takes what remains, within its floor and maxReplicas."""
    shares = []
    remaining = total
    for floor, pool in zip(floors, pools, strict=True):
        share = min(max(remaining, floor), pool.max_replicas)
        shares.append(share)
        remaining = max(0, remaining - share)
    return shares


def clamp_to_license(
    decisions: Sequence[PoolDecision], pools: Sequence[PoolPolicy], limits: LicenseLimits | None
) -> tuple[list[PoolDecision], str | None]:
    """Cap the decisions of all pools of a stack (``pools`` in declaration order) at the license's limits.

    Replicas are taken from the last pool backwards until the total is within ``max_worker_replicas`` and
    replicas x ``gpus_per_replica`` within ``max_gpus`` (pools without GPUs are skipped for the GPU cap).
    Pools without a decision count as 0; a decision for a pool not in ``pools`` is a caller error.
    Returns the decisions in their given order and a summary, or None when nothing was cut.
    """
    by_key = {pool.key: pool for pool in pools}
    unknown = [decision.key for decision in decisions if decision.key not in by_key]
    if unknown:
        raise ValueError(f"decisions for pools not given: {unknown}")
    result = {decision.key: decision for decision in decisions}
    if limits is None:
        return list(decisions), None
    gpus = {key: by_key[key].gpus_per_replica for key in result}
    asked_replicas = sum(d.desired for d in result.values())
    asked_gpus = sum(d.desired * gpus[d.key] for d in result.values())
    replicas, gpu_total = asked_replicas, asked_gpus
    cuts: list[str] = []
    for pool in reversed(pools):
        decision = result.get(pool.key)
        if decision is None or decision.desired == 0:
            continue
        cut = 0
        if limits.max_worker_replicas is not None:
            cut = max(cut, replicas - limits.max_worker_replicas)
        if limits.max_gpus is not None and pool.gpus_per_replica > 0:
            cut = max(cut, _ceil_div(gpu_total - limits.max_gpus, pool.gpus_per_replica))
        cut = min(cut, decision.desired)
        if cut <= 0:
            continue
        names = []  # the limits this cut serves
        if limits.max_worker_replicas is not None and replicas > limits.max_worker_replicas:
            names.append(f"maxWorkerReplicas {limits.max_worker_replicas} ({asked_replicas} asked for)")
        if limits.max_gpus is not None and gpu_total > limits.max_gpus and pool.gpus_per_replica > 0:
            names.append(f"maxGpus {limits.max_gpus} ({asked_gpus} asked for)")
        replicas -= cut
        gpu_total -= cut * pool.gpus_per_replica
        desired = decision.desired - cut
        result[pool.key] = replace(
            decision,
            desired=desired,
            reason="LicenseClamp",
            message=f"{decision.message} The license caps {' and '.join(names)}: "
            f"{pool.key} {decision.desired} to {desired}.",
        )
        cuts.append(f"{pool.key} by {cut}")
    if not cuts:
        return list(decisions), None
    limit_names = []
    if limits.max_worker_replicas is not None:
        limit_names.append(f"maxWorkerReplicas {limits.max_worker_replicas}")
    if limits.max_gpus is not None:
        limit_names.append(f"maxGpus {limits.max_gpus}")
    summary = (
        f"License limits ({', '.join(limit_names)}): {asked_replicas} replicas and {asked_gpus} GPUs asked for,"
        f" {replicas} replicas and {gpu_total} GPUs allowed; cut {', '.join(cuts)}."
    )
    return [result[decision.key] for decision in decisions], summary
