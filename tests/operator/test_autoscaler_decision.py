"""The autoscaler's pure decision code: activation, targets, windows, rate limits, overflow, cooldown, fallback."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

import pytest

from kubespeech_operator.autoscaler import (
    LicenseLimits,
    Load,
    ModelAutoscaler,
    PoolDecision,
    PoolPolicy,
    ScalingBehavior,
    ScalingPolicyRule,
    SelectPolicy,
    clamp_to_license,
    default_scale_down,
    default_scale_up,
)

Pods: Final = "Pods"
Percent: Final = "Percent"


def rules(
    window: int = 0, select: SelectPolicy = "Max", *policies: tuple[Literal["Pods", "Percent"], int, int]
) -> ScalingBehavior:
    return ScalingBehavior(
        stabilization_window_seconds=window,
        select_policy=select,
        policies=tuple(ScalingPolicyRule(kind, value, period) for kind, value, period in policies),
    )


# Most cases isolate one rule: scale down as fast as the HPA allows at all, unless the case says otherwise.
FAST_DOWN = rules(0, "Max", (Percent, 100, 15))


def pool(
    key: str = "asr/l4",
    *,
    min: int = 0,
    max: int = 20,
    idle: int | None = None,
    target: int = 2,
    activation: int = 0,
    streams: int | None = None,
    cooldown: int = 120,
    up: ScalingBehavior | None = None,
    down: ScalingBehavior | None = None,
    fallback: int | None = None,
    gpus: int = 0,
) -> PoolPolicy:
    return PoolPolicy(
        key=key,
        min_replicas=min,
        max_replicas=max,
        idle_replicas=idle,
        target_queue_depth_per_replica=target,
        activation_queue_depth=activation,
        target_active_streams=streams,
        cooldown_seconds=cooldown,
        scale_up=up or default_scale_up(),
        scale_down=down or FAST_DOWN,
        fallback_replicas=fallback,
        gpus_per_replica=gpus,
    )


def jobs(waiting: int, in_flight: int = 0, streams: int = 0) -> Load:
    return Load(waiting=waiting, in_flight=in_flight, streams=streams)


@dataclass(frozen=True)
class Case:
    """Polls in order; each poll's decisions are applied before the next, as the operator does."""

    pools: tuple[PoolPolicy, ...]
    start: tuple[int, ...]
    polls: tuple[tuple[float, Load | None], ...]
    desired: tuple[int, ...]
    reasons: tuple[str, ...]
    missing_data_polls: int = 3
    message_has: tuple[str, ...] = field(default=())


def run(case: Case) -> list[PoolDecision]:
    autoscaler = ModelAutoscaler("asr", case.pools, missing_data_polls=case.missing_data_polls)
    current = {p.key: n for p, n in zip(case.pools, case.start, strict=True)}
    decisions: list[PoolDecision] = []
    for now, load in case.polls:
        decisions = autoscaler.decide(now, load, current)
        current = {d.key: d.desired for d in decisions}
    return decisions


RESERVED = pool("asr/reserved", max=2)
SPOT = pool("asr/spot", max=10)

CASES = {
    # Activation: a model asleep at zero wakes on max(1, activationQueueDepth) jobs.
    "activation-0-one-job-wakes": Case((pool(),), (0,), ((0, jobs(1)),), (1,), ("WakeFromZero",)),
    "activation-1-one-job-wakes": Case((pool(activation=1),), (0,), ((0, jobs(1)),), (1,), ("WakeFromZero",)),
    "activation-5-four-jobs-wait": Case(
        (pool(activation=5),), (0,), ((0, jobs(4)),), (0,), ("BelowActivation",), message_has=("5 jobs",)
    ),
    "activation-5-five-jobs-wake": Case(
        (pool(activation=5),), (0,), ((0, jobs(5)),), (3,), ("WakeFromZero",)
    ),
    "activation-counts-in-flight": Case(
        (pool(activation=5),), (0,), ((0, jobs(2, in_flight=3)),), (3,), ("WakeFromZero",)
    ),
    "asleep-no-jobs": Case((pool(),), (0,), ((0, jobs(0)),), (0,), ("Steady",)),
    "asleep-with-idle-floor-comes-back": Case((pool(min=1),), (0,), ((0, jobs(0)),), (1,), ("ScaleUp",)),
    "wake-is-rate-limited-from-zero": Case(
        (pool(),), (0,), ((0, jobs(40)),), (4,), ("WakeFromZero",), message_has=("not 20",)
    ),
    # Targets: work is waiting + in flight, divided by the target, within maxReplicas.
    "work-counts-in-flight": Case(
        (pool(),), (4,), ((0, jobs(2, in_flight=8)),), (5,), ("ScaleUp",), message_has=("10 jobs",)
    ),
    "target-rounds-up": Case((pool(target=4),), (1,), ((0, jobs(9)),), (3,), ("ScaleUp",)),
    "clamped-to-max": Case((pool(max=6),), (4,), ((0, jobs(100)),), (6,), ("ScaleUp",)),
    "above-max-after-spec-change": Case(
        (pool(max=6),), (9,), ((0, jobs(100)),), (6,), ("ScaleDown",), message_has=("maxReplicas 6",)
    ),
    "steady-at-target": Case((pool(),), (5,), ((0, jobs(6, in_flight=4)),), (5,), ("Steady",)),
    # Stabilization windows, as in the HPA.
    "scale-down-window-holds": Case(
        (pool(down=rules(60, "Max", (Percent, 100, 15))),),
        (10,),
        ((0, jobs(20)), (30, jobs(2))),
        (10,),
        ("Stabilizing",),
        message_has=("60 s scaleDown window",),
    ),
    "scale-down-window-then-drops": Case(
        (pool(down=rules(60, "Max", (Percent, 100, 15))),),
        (10,),
        ((0, jobs(20)), (30, jobs(2)), (61, jobs(2))),
        (1,),
        ("ScaleDown",),
    ),
    "scale-up-window-holds": Case(
        (pool(up=rules(30, "Max", (Pods, 100, 15))),),
        (2,),
        ((0, jobs(4)), (10, jobs(20))),
        (2,),
        ("Stabilizing",),
    ),
    "scale-up-window-then-rises": Case(
        (pool(up=rules(30, "Max", (Pods, 100, 15))),),
        (2,),
        ((0, jobs(4)), (10, jobs(20)), (31, jobs(20))),
        (10,),
        ("ScaleUp",),
    ),
    # Rate limits relative to the count at the start of each policy's period.
    "pods-limit-up": Case(
        (pool(up=rules(0, "Max", (Pods, 2, 60))),), (2,), ((0, jobs(40)),), (4,), ("RateLimited",)
    ),
    "percent-limit-up": Case(
        (pool(up=rules(0, "Max", (Percent, 50, 60))),), (4,), ((0, jobs(40)),), (6,), ("RateLimited",)
    ),
    "select-max-most-permissive": Case(
        (pool(up=rules(0, "Max", (Pods, 2, 60), (Percent, 50, 60))),),
        (10,),
        ((0, jobs(100)),),
        (15,),
        ("RateLimited",),
    ),
    "select-min-least-permissive": Case(
        (pool(up=rules(0, "Min", (Pods, 2, 60), (Percent, 50, 60))),),
        (10,),
        ((0, jobs(100)),),
        (12,),
        ("RateLimited",),
    ),
    "select-disabled-up": Case(
        (pool(up=rules(0, "Disabled", (Pods, 4, 15))),), (10,), ((0, jobs(100)),), (10,), ("RateLimited",)
    ),
    "period-remembers-earlier-change": Case(
        (pool(up=rules(0, "Max", (Pods, 4, 60))),),
        (2,),
        ((0, jobs(40)), (10, jobs(40))),
        (6,),
        ("RateLimited",),
    ),
    "period-over-allows-more": Case(
        (pool(up=rules(0, "Max", (Pods, 4, 60))),),
        (2,),
        ((0, jobs(40)), (10, jobs(40)), (61, jobs(40))),
        (10,),
        ("RateLimited",),
    ),
    "percent-only-from-zero-allows-one": Case(
        (pool(up=rules(0, "Max", (Percent, 100, 15))),), (0,), ((0, jobs(10)),), (1,), ("WakeFromZero",)
    ),
    "pods-limit-down": Case(
        (pool(down=rules(0, "Max", (Pods, 1, 15))),), (10,), ((0, jobs(2)),), (9,), ("RateLimited",)
    ),
    "select-max-down-most-permissive": Case(
        (pool(down=rules(0, "Max", (Pods, 1, 15), (Percent, 50, 15))),),
        (10,),
        ((0, jobs(2)),),
        (5,),
        ("RateLimited",),
    ),
    "select-min-down-least-permissive": Case(
        (pool(down=rules(0, "Min", (Pods, 1, 15), (Percent, 50, 15))),),
        (10,),
        ((0, jobs(2)),),
        (9,),
        ("RateLimited",),
    ),
    "select-disabled-down": Case(
        (pool(down=rules(0, "Disabled", (Pods, 1, 15))),), (10,), ((0, jobs(2)),), (10,), ("RateLimited",)
    ),
    "default-down-10-percent": Case(
        (pool(down=default_scale_down()),), (20,), ((0, jobs(2)),), (18,), ("RateLimited",)
    ),
    "default-down-one-pod-below-10": Case(
        (pool(down=default_scale_down()),), (5,), ((0, jobs(2)),), (4,), ("RateLimited",)
    ),
    "default-down-next-period": Case(
        (pool(down=default_scale_down()),),
        (5,),
        ((0, jobs(2)), (2, jobs(2)), (16, jobs(2))),
        (3,),
        ("RateLimited",),
    ),
    # Ordered overflow: earlier pools fill first, later pools empty first.
    "overflow-reserved-then-spot": Case(
        (RESERVED, SPOT), (2, 0), ((0, jobs(10)),), (2, 3), ("Steady", "ScaleUp")
    ),
    "overflow-fills-first-pool-first": Case(
        (RESERVED, SPOT), (0, 0), ((0, jobs(2)),), (1, 0), ("WakeFromZero", "Steady")
    ),
    "overflow-beyond-all-max": Case(
        (RESERVED, pool("asr/spot", max=3)), (2, 3), ((0, jobs(100)),), (2, 3), ("Steady", "Steady")
    ),
    "scale-down-last-pool-first": Case(
        (RESERVED, SPOT), (2, 3), ((0, jobs(4)),), (2, 0), ("Steady", "ScaleDown")
    ),
    "scale-down-spot-partly": Case(
        (RESERVED, SPOT), (2, 6), ((0, jobs(8)),), (2, 2), ("Steady", "ScaleDown")
    ),
    "floors-of-each-pool": Case(
        (pool("asr/reserved", min=1, max=2), SPOT), (1, 0), ((0, jobs(0)),), (1, 0), ("Steady", "Steady")
    ),
    # Cooldown: min 0 keeps one replica until the cooldown is over, then zero; idleReplicas after it.
    "cooldown-keeps-one": Case((pool(),), (3,), ((0, jobs(6)), (10, jobs(0))), (1,), ("ScaleDown",)),
    "cooldown-held": Case(
        (pool(),),
        (3,),
        ((0, jobs(6)), (10, jobs(0)), (100, jobs(0))),
        (1,),
        ("Held",),
        message_has=("20 s of the cooldown left",),
    ),
    "cooldown-then-zero": Case(
        (pool(),),
        (3,),
        ((0, jobs(6)), (10, jobs(0)), (100, jobs(0)), (120, jobs(0))),
        (0,),
        ("ScaleToZero",),
    ),
    "cooldown-restarts-on-work": Case(
        (pool(),), (1,), ((0, jobs(2)), (100, jobs(1)), (200, jobs(0))), (1,), ("Held",)
    ),
    "min-floor-during-cooldown": Case(
        (pool(min=2, idle=1),), (4,), ((0, jobs(8)), (10, jobs(0)), (60, jobs(0))), (2,), ("Held",)
    ),
    "idle-replicas-after-cooldown": Case(
        (pool(min=2, idle=1),),
        (4,),
        ((0, jobs(8)), (10, jobs(0)), (60, jobs(0)), (120, jobs(0))),
        (1,),
        ("ScaleDown",),
    ),
    "idle-replicas-zero-scales-to-zero": Case(
        (pool(min=2, idle=0),), (2,), ((0, jobs(1)), (120, jobs(0))), (0,), ("ScaleToZero",)
    ),
    "min-without-idle-stays": Case((pool(min=2),), (2,), ((0, jobs(1)), (500, jobs(0))), (2,), ("Steady",)),
    "keeps-one-in-first-pool-that-has-one": Case(
        (RESERVED, SPOT), (0, 3), ((0, jobs(0)),), (0, 1), ("Steady", "ScaleDown")
    ),
    "fresh-autoscaler-waits-a-cooldown": Case(
        (RESERVED, SPOT), (0, 3), ((0, jobs(0)), (119, jobs(0))), (0, 1), ("Steady", "Held")
    ),
    "fresh-autoscaler-then-zero": Case(
        (RESERVED, SPOT), (0, 3), ((0, jobs(0)), (120, jobs(0))), (0, 0), ("Steady", "ScaleToZero")
    ),
    "cooldown-of-first-pool": Case(
        (pool("asr/a", max=2, cooldown=30), pool("asr/b", cooldown=600)),
        (1, 0),
        ((0, jobs(1)), (30, jobs(0))),
        (0, 0),
        ("ScaleToZero", "Steady"),
    ),
    # Missing data: hold, then fallbackReplicas after N misses; never to zero.
    "missing-data-holds-before-n": Case(
        (pool(fallback=5),), (3,), ((0, None), (2, None)), (3,), ("MissingData",), message_has=("2 polls",)
    ),
    "missing-data-fallback-after-n": Case(
        (pool(fallback=5),), (3,), ((0, None), (2, None), (4, None)), (5,), ("Fallback",)
    ),
    "missing-data-fallback-down": Case(
        (pool(fallback=2),), (6,), ((0, None), (2, None), (4, None)), (2,), ("Fallback",)
    ),
    "missing-data-n-is-configurable": Case(
        (pool(fallback=5),), (3,), ((0, None),), (5,), ("Fallback",), missing_data_polls=1
    ),
    "missing-data-no-fallback-holds": Case(
        (pool(),), (3,), ((0, None), (2, None), (4, None), (6, None)), (3,), ("MissingData",)
    ),
    "missing-data-fallback-zero-never-stops": Case(
        (pool(fallback=0),),
        (3,),
        ((0, None), (2, None), (4, None)),
        (3,),
        ("MissingData",),
        message_has=("never scales to zero",),
    ),
    "missing-data-fallback-clamped-to-max": Case(
        (pool(max=10, fallback=50),), (3,), ((0, None), (2, None), (4, None)), (10,), ("Fallback",)
    ),
    "missing-data-fallback-wakes": Case(
        (pool(fallback=2),), (0,), ((0, None), (2, None), (4, None)), (2,), ("Fallback",)
    ),
    "missing-data-resets-on-success": Case(
        (pool(fallback=5),), (3,), ((0, None), (2, None), (4, jobs(6)), (6, None)), (3,), ("MissingData",)
    ),
    "missing-data-restarts-cooldown": Case(
        (pool(),), (1,), ((0, jobs(0)), (100, None), (200, None), (250, jobs(0))), (1,), ("Held",)
    ),
    "missing-data-fallback-per-pool": Case(
        (RESERVED, pool("asr/spot", max=10, fallback=4)),
        (2, 1),
        ((0, None), (2, None), (4, None)),
        (2, 4),
        ("MissingData", "Fallback"),
    ),
    # Streams: counted only with targetActiveStreams.
    "streams-only": Case((pool(streams=2),), (1,), ((0, jobs(0, streams=5)),), (3,), ("ScaleUp",)),
    "streams-or-jobs-whichever-needs-more": Case(
        (pool(streams=2),), (1,), ((0, jobs(8, streams=5)),), (4,), ("ScaleUp",)
    ),
    "streams-wake": Case((pool(streams=2),), (0,), ((0, jobs(0, streams=1)),), (1,), ("WakeFromZero",)),
    "streams-ignored-without-target": Case((pool(),), (0,), ((0, jobs(0, streams=5)),), (0,), ("Steady",)),
    "streams-keep-the-cooldown-open": Case(
        (pool(streams=2),), (1,), ((0, jobs(0, streams=1)), (200, jobs(0, streams=1))), (1,), ("Steady",)
    ),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_decision(case: Case) -> None:
    decisions = run(case)
    assert [d.key for d in decisions] == [p.key for p in case.pools]
    assert tuple(d.desired for d in decisions) == case.desired, [d.message for d in decisions]
    assert tuple(d.reason for d in decisions) == case.reasons, [d.message for d in decisions]
    for text in case.message_has:
        assert any(text in d.message for d in decisions), (text, [d.message for d in decisions])


def test_current_missing_for_a_pool_counts_as_zero() -> None:
    autoscaler = ModelAutoscaler("asr", [RESERVED, SPOT])
    decisions = autoscaler.decide(0, jobs(10), {"asr/reserved": 2})
    assert [(d.current, d.desired) for d in decisions] == [(2, 2), (0, 3)]


def test_update_pools_keeps_history_of_remaining_pools() -> None:
    slow_down = rules(60, "Max", (Percent, 100, 15))
    autoscaler = ModelAutoscaler("asr", [pool("asr/a", down=slow_down)])
    autoscaler.decide(0, jobs(20), {"asr/a": 10})
    autoscaler.update_pools([pool("asr/a", down=slow_down), pool("asr/b")])
    a, b = autoscaler.decide(30, jobs(2), {"asr/a": 10, "asr/b": 0})
    assert (a.desired, a.reason) == (10, "Stabilizing")  # the 60 s window still remembers 10
    assert b.desired == 0
    autoscaler.update_pools([pool("asr/b")])
    (b,) = autoscaler.decide(32, jobs(2), {"asr/b": 0})
    assert b.desired == 1


def test_history_stays_bounded() -> None:
    autoscaler = ModelAutoscaler("asr", [pool(down=rules(60, "Max", (Pods, 1, 30)))])
    current = {"asr/l4": 0}
    sizes = []
    for step in range(3000):
        load = jobs((step * 7) % 23)
        (decision,) = autoscaler.decide(step * 2.0, load, current)
        current = {"asr/l4": decision.desired}
        sizes.append(autoscaler.history_size())
    # Entries older than the longest window or period (60 s = 30 polls) are dropped: one recommendation per
    # poll within it, and at most one replica change per poll.
    assert all(30 <= n <= 2 * 30 for n in sizes[100:])


def test_invalid_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="minReplicas"):
        pool(min=5, max=2)
    with pytest.raises(ValueError, match="idleReplicas"):
        pool(min=1, idle=2)


def test_overrides_keep_unset_fields() -> None:
    behavior = default_scale_up().with_overrides(stabilization_window_seconds=30)
    assert behavior.stabilization_window_seconds == 30
    assert behavior.policies == default_scale_up().policies
    assert behavior.with_overrides(policies=[]).policies == ()


def decision(key: str, desired: int) -> PoolDecision:
    return PoolDecision(key, desired, desired, "Steady", f"{key} stays at {desired}.")


LICENSE_POOLS = (
    pool("asr/reserved", max=10, gpus=1),
    pool("asr/spot", max=10, gpus=1),
    pool("tts/big", max=10, gpus=2),
    pool("tts/piper", max=10, gpus=0),
)


@dataclass(frozen=True)
class LicenseCase:
    desired: tuple[int, int, int, int]
    limits: LicenseLimits | None
    expected: tuple[int, int, int, int]
    summary_has: str | None


LICENSE_CASES = {
    "within-limits": LicenseCase((2, 2, 1, 1), LicenseLimits(10, 10), (2, 2, 1, 1), None),
    "no-license-limits": LicenseCase((9, 9, 9, 9), None, (9, 9, 9, 9), None),
    "no-caps-in-license": LicenseCase((9, 9, 9, 9), LicenseLimits(), (9, 9, 9, 9), None),
    "replicas-cut-last-pool-first": LicenseCase(
        (2, 2, 1, 3), LicenseLimits(max_worker_replicas=6), (2, 2, 1, 1), "maxWorkerReplicas 6"
    ),
    "replicas-cut-spills-backwards": LicenseCase(
        (2, 3, 1, 1), LicenseLimits(max_worker_replicas=3), (2, 1, 0, 0), "maxWorkerReplicas 3"
    ),
    "gpus-skip-cpu-pool": LicenseCase((2, 2, 2, 5), LicenseLimits(max_gpus=6), (2, 2, 1, 5), "maxGpus 6"),
    # Whole replicas of the last GPU pool first, even where that leaves a GPU unused.
    "gpus-cut-whole-replicas": LicenseCase(
        (2, 2, 2, 5), LicenseLimits(max_gpus=5), (2, 2, 0, 5), "maxGpus 5"
    ),
    "gpus-spill-backwards": LicenseCase((3, 3, 2, 0), LicenseLimits(max_gpus=2), (2, 0, 0, 0), "maxGpus 2"),
    "both-limits": LicenseCase(
        (2, 2, 2, 5), LicenseLimits(max_worker_replicas=8, max_gpus=4), (2, 2, 0, 2), "maxGpus 4"
    ),
}


@pytest.mark.parametrize("case", list(LICENSE_CASES.values()), ids=list(LICENSE_CASES))
def test_clamp_to_license(case: LicenseCase) -> None:
    decisions = [decision(p.key, n) for p, n in zip(LICENSE_POOLS, case.desired, strict=True)]
    clamped, summary = clamp_to_license(decisions, LICENSE_POOLS, case.limits)
    assert tuple(d.desired for d in clamped) == case.expected
    assert [d.key for d in clamped] == [p.key for p in LICENSE_POOLS]
    for before, after in zip(decisions, clamped, strict=True):
        if after.desired != before.desired:
            assert after.reason == "LicenseClamp"
            assert "maxWorkerReplicas" in after.message or "maxGpus" in after.message
            assert f"{after.key} {before.desired} to {after.desired}" in after.message
        else:
            assert after == before
    if case.summary_has is None:
        assert summary is None
    else:
        assert summary is not None and case.summary_has in summary
    if case.limits and case.limits.max_worker_replicas is not None:
        assert sum(case.expected) <= case.limits.max_worker_replicas
    if case.limits and case.limits.max_gpus is not None:
        assert (
            sum(n * p.gpus_per_replica for n, p in zip(case.expected, LICENSE_POOLS, strict=True))
            <= case.limits.max_gpus
        )


def test_license_refuses_decisions_for_unknown_pools() -> None:
    with pytest.raises(ValueError, match="asr/ghost"):
        clamp_to_license([decision("asr/ghost", 1)], LICENSE_POOLS, LicenseLimits(1))
