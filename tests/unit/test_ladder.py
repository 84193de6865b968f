"""The escalation ladder's pure decisions (issue 4, DESIGN §4.6, §4.9).

The ladder is driven here the way the engine drives it: the first run of a step is at rung 0
on its first tier; after every RETRY decision the next run is at ``decision.level`` on
``decision.tier``, and when it fails too, ``decide`` sees the whole round so far.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator, Sequence
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sagaq.definition import Registry, Saga
from sagaq.ladder import (
    DEFAULT_BOUNDS,
    Attempt,
    Bounds,
    Decision,
    FailureClass,
    StepFacts,
    Then,
    backoff,
    decide,
)
from sagaq.machine import Direction
from sagaq.settings import Settings

FWD, BACK = Direction.FORWARD, Direction.COMPENSATE
T, L, E, X = (
    FailureClass.TRANSIENT,
    FailureClass.LOGICAL,
    FailureClass.ENVIRONMENTAL,
    FailureClass.TERMINAL,
)
BASE, CAP = 1.0, 30.0


class FixedJitter(random.Random):
    """A Random whose random() always returns one value: pins the jitter."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


# -- backoff -----------------------------------------------------------------------------

positive = st.floats(min_value=1e-3, max_value=1e4, allow_nan=False, allow_infinity=False)
base_cap = st.tuples(positive, positive).map(sorted)  # base <= cap


@given(
    attempt=st.integers(min_value=1, max_value=20),
    bounds=base_cap,
    seed=st.integers(min_value=0, max_value=2**64),
)
def test_backoff_within_base_and_cap(attempt: int, bounds: list[float], seed: int) -> None:
    base, cap = bounds
    rng = random.Random(seed)
    for _ in range(5):
        delay = backoff(attempt, base, cap, rng)
        assert base <= delay <= cap
        # the jitter stays within half of the exponential ceiling and the ceiling itself
        ceiling = min(cap, base * 2 ** (attempt - 1))
        assert max(base, ceiling / 2) <= delay <= ceiling


@given(attempt=st.integers(min_value=1, max_value=20), bounds=base_cap)
def test_backoff_within_base_and_cap_with_global_random(attempt: int, bounds: list[float]) -> None:
    base, cap = bounds
    assert base <= backoff(attempt, base, cap) <= cap


@pytest.mark.parametrize(
    ("jitter", "expected"),
    [
        (0.0, [1, 1, 2, 4, 8, 15, 15, 15, 15, 15]),  # lowest jitter: half the ceiling, >= base
        (1.0, [1, 2, 4, 8, 16, 30, 30, 30, 30, 30]),  # highest: the ceiling, capped at 30
        (0.5, [1, 1.5, 3, 6, 12, 22.5, 22.5, 22.5, 22.5, 22.5]),
    ],
)
def test_backoff_grows_then_caps(jitter: float, expected: list[float]) -> None:
    rng = FixedJitter(jitter)
    assert [backoff(a, BASE, CAP, rng) for a in range(1, 11)] == expected


@given(jitter=st.floats(min_value=0.0, max_value=0.999999), bounds=base_cap)
def test_backoff_never_shrinks_for_a_fixed_jitter(jitter: float, bounds: list[float]) -> None:
    base, cap = bounds
    rng = FixedJitter(jitter)
    delays = [backoff(a, base, cap, rng) for a in range(1, 21)]
    assert delays == sorted(delays)
    top = min(cap, base * 2**19)
    assert delays[-1] == pytest.approx(max(base, top * (0.5 + 0.5 * jitter)))


@pytest.mark.parametrize("attempt", [0, -3])
def test_backoff_of_a_nonsense_attempt_is_still_base(attempt: int) -> None:
    assert backoff(attempt, BASE, CAP, FixedJitter(0.99)) == BASE


@pytest.mark.parametrize("attempt", [64, 1024, 1025, 5000, 10**6])
def test_backoff_of_a_huge_attempt_is_capped_not_an_error(attempt: int) -> None:
    # A retryable step may be given a large budget (retries=10_000, "until it succeeds");
    # its backoff must stay at the cap instead of overflowing the float conversion.
    assert backoff(attempt, BASE, CAP, FixedJitter(1.0)) == CAP
    assert backoff(attempt, BASE, CAP, FixedJitter(0.0)) == CAP / 2


# -- driving the ladder like the engine ----------------------------------------------------


FIRST = object()  # drive(): start on the step's first tier


def first_tier(step: StepFacts) -> str | None:
    """The tier of a step's first run: its first model tier, or none (never the fallback)."""
    real = [t for t in step.tiers if t != "fallback"]
    return real[0] if real else None


def drive(
    step: StepFacts,
    failures: Sequence[FailureClass] | Iterator[FailureClass],
    bounds: Bounds,
    rng: random.Random | None = None,
    *,
    tier: str | object | None = FIRST,
    limit: int = 200,
) -> tuple[list[Decision], list[Attempt]]:
    """Fail every run with the next failure until the ladder stops retrying (or the
    failures run out). Returns the decisions and, for each one, the attempt that had failed.
    """
    it = iter(failures)
    start = first_tier(step) if tier is FIRST else tier
    assert start is None or isinstance(start, str)
    history: tuple[Attempt, ...] = (Attempt(0, start, next(it)),)
    decisions: list[Decision] = []
    failed: list[Attempt] = []
    for _ in range(limit):
        d = decide(step, history, bounds, rng)
        decisions.append(d)
        failed.append(history[-1])
        following = next(it, None)
        if d.then is not Then.RETRY or following is None:
            return decisions, failed
        history = (*history, Attempt(d.level, d.tier, following))
    raise AssertionError(f"the ladder did not stop within {limit} decisions")


Summary = tuple[tuple[tuple[int, bool, str], ...], Then, int, str | None, bool]


def summary(d: Decision) -> Summary:
    """A decision as (rungs as (level, applicable, action), then, level, tier, refresh)."""
    return (
        tuple((r.level, r.applicable, r.action) for r in d.rungs),
        d.then,
        d.level,
        d.tier,
        d.refresh,
    )


# Rungs, as (level, applicable, action).
R0 = (0, True, "retry")
REFRESH = (0, True, "refresh")
R0C = (0, True, "retry compensation")
R1 = (1, True, "re-prompt")
SWITCH = (2, True, "switch tier")
AGAIN = (2, True, "retry tier")
NA1 = (1, False, "not applicable")
NA2 = (2, False, "not applicable")
NA3 = (3, False, "not applicable")
ROLL = (3, True, "compensate")
PAGE = (4, True, "page")


def retry(rung: tuple[int, bool, str], tier: str | None = None, refresh: bool = False) -> Summary:
    return ((rung,), Then.RETRY, rung[0], tier, refresh)


def climb(*rungs: tuple[int, bool, str], tier: str | None = None) -> Summary:
    return (tuple(rungs), Then.RETRY, rungs[-1][0], tier, False)


def rollback(*passed: tuple[int, bool, str]) -> Summary:
    return ((*passed, ROLL), Then.ROLLBACK, 3, None, False)


def page(*passed: tuple[int, bool, str]) -> Summary:
    return ((*passed, PAGE), Then.ESCALATE, 4, None, False)


PLAIN = StepFacts(FWD, frozenset({0}))
MODEL = StepFacts(FWD, frozenset({0, 1, 2}), ("small", "large"))
AFTER = dict(after_pivot=True)

# (step, bounds, the failure of each run in turn, the expected decision after each one)
LADDER = [
    pytest.param(
        PLAIN,
        Bounds(),
        [T, T, T, T],
        [retry(R0), retry(R0), retry(R0), rollback(NA1, NA2)],
        id="0-transient-retries-then-climbs-past-inapplicable-1-2-to-3",
    ),
    pytest.param(
        PLAIN,
        Bounds(retries=1),
        [T, T],
        [retry(R0), rollback(NA1, NA2)],
        id="0-transient-retries-bound-is-the-steps",
    ),
    pytest.param(
        PLAIN,
        Bounds(retries=0),
        [T],
        [rollback(NA1, NA2)],
        id="0-no-retries-climbs-at-once",
    ),
    pytest.param(
        MODEL,
        Bounds(),
        [T, T, T, T, T, T, T],
        [
            retry(R0, "small"),
            retry(R0, "small"),
            retry(R0, "small"),
            climb(R1, tier="small"),
            retry(R1, "small"),
            climb(SWITCH, tier="large"),
            rollback(),
        ],
        id="0-transient-on-a-model-step-climbs-every-rung",
    ),
    pytest.param(
        MODEL,
        Bounds(),
        [L, L, L, L],
        [
            climb(R1, tier="small"),
            retry(R1, "small"),
            climb(SWITCH, tier="large"),
            rollback(),
        ],
        id="1-2-3-logical-reprompts-then-switches-tier-then-rolls-back",
    ),
    pytest.param(
        StepFacts(FWD, frozenset({0, 1, 2}), ("small", "medium", "large")),
        Bounds(reprompts=1, per_tier=2),
        [L, L, L, L, L, L],
        [
            climb(R1, tier="small"),
            climb(SWITCH, tier="medium"),
            retry(AGAIN, "medium"),
            retry(SWITCH, "large"),
            retry(AGAIN, "large"),
            rollback(),
        ],
        id="2-per-tier-attempts-on-each-further-tier",
    ),
    pytest.param(
        StepFacts(FWD, frozenset({0, 1, 2}), ("small", "large"), after_pivot=True),
        Bounds(),
        [L, L, L, L],
        [
            climb(R1, tier="small"),
            retry(R1, "small"),
            climb(SWITCH, tier="large"),
            page(NA3),
        ],
        id="after-pivot-logical-climbs-0-2-then-3-not-applicable-then-4-page",
    ),
    pytest.param(
        StepFacts(FWD, frozenset({0}), after_pivot=True),
        Bounds(retries=10),
        [T] * 11,
        [retry(R0)] * 10 + [page(NA1, NA2, NA3)],
        id="after-pivot-retryable-budget-then-page",
    ),
    pytest.param(
        PLAIN,
        Bounds(),
        [X],
        [rollback(NA1, NA2)],
        id="3-terminal-on-a-plain-step",
    ),
    pytest.param(
        MODEL,
        Bounds(),
        [X],
        [rollback(NA1, NA2)],
        id="3-terminal-on-a-model-step-passes-1-2-as-not-applicable",
    ),
    pytest.param(
        MODEL,
        Bounds(),
        [L, X],
        [climb(R1, tier="small"), rollback(NA2)],
        id="3-terminal-at-rung-1",
    ),
    pytest.param(
        StepFacts(FWD, frozenset({0}), after_pivot=True),
        Bounds(),
        [T, X],
        [retry(R0), page(NA1, NA2, NA3)],
        id="4-terminal-after-pivot-pages",
    ),
    pytest.param(
        StepFacts(FWD, frozenset({0}), refresh=True),
        Bounds(),
        [E, E, E],
        [retry(REFRESH, refresh=True), retry(REFRESH, refresh=True), rollback(NA1, NA2)],
        id="0-environmental-refreshes-within-bound-then-climbs",
    ),
    pytest.param(
        StepFacts(FWD, frozenset({0}), refresh=True),
        Bounds(refreshes=1),
        [E, E],
        [retry(REFRESH, refresh=True), rollback(NA1, NA2)],
        id="0-environmental-refreshes-bound-is-the-steps",
    ),
    pytest.param(
        StepFacts(FWD, frozenset({0, 1, 2}), ("small", "large"), refresh=True),
        Bounds(),
        [E, T, E, E],
        [
            retry(REFRESH, "small", refresh=True),
            retry(R0, "small"),
            retry(REFRESH, "small", refresh=True),
            climb(R1, tier="small"),
        ],
        id="0-environmental-and-transient-share-rung-0",
    ),
    pytest.param(
        PLAIN,
        Bounds(),
        [E],
        [rollback(NA1, NA2)],
        id="0-environmental-without-a-refresh-hook-climbs",
    ),
    pytest.param(
        MODEL,
        Bounds(),
        [E],
        [climb(R1, tier="small")],
        id="0-environmental-without-a-refresh-hook-climbs-to-1",
    ),
    pytest.param(
        StepFacts(BACK, frozenset({0})),
        Bounds(),
        [T, T, T, T],
        [retry(R0C), retry(R0C), retry(R0C), ((PAGE,), Then.ESCALATE, 4, None, False)],
        id="compensation-retries-then-4-page",
    ),
    pytest.param(
        StepFacts(BACK, frozenset({0, 1, 2}), ("small", "large"), after_pivot=True),
        Bounds(compensation_retries=2, retries=9),
        [L, E, T],
        [retry(R0C), retry(R0C), ((PAGE,), Then.ESCALATE, 4, None, False)],
        id="compensation-has-its-own-budget-and-no-model-rungs",
    ),
    pytest.param(
        StepFacts(BACK, frozenset({0})),
        Bounds(),
        [X],
        [((PAGE,), Then.ESCALATE, 4, None, False)],
        id="compensation-terminal-pages-at-once",
    ),
    pytest.param(
        StepFacts(BACK, frozenset({0})),
        Bounds(),
        [T, X],
        [retry(R0C), ((PAGE,), Then.ESCALATE, 4, None, False)],
        id="compensation-terminal-after-a-retry-pages",
    ),
    pytest.param(
        StepFacts(FWD, frozenset({0, 1, 2}), ("small", "large", "fallback")),
        Bounds(),
        [L, L, L, L, L],
        [
            climb(R1, tier="small"),
            retry(R1, "small"),
            climb(SWITCH, tier="large"),
            retry(SWITCH, "fallback"),
            rollback(),
        ],
        id="2-fallback-after-the-real-tiers",
    ),
    pytest.param(
        StepFacts(FWD, frozenset({0, 2}), ("small", "large")),
        Bounds(),
        [L, L],
        [climb(NA1, SWITCH, tier="large"), rollback()],
        id="2-undeclared-rung-1-is-passed-as-not-applicable",
    ),
    pytest.param(
        StepFacts(FWD, frozenset({0, 1, 2}), ("small", "large")),
        Bounds(reprompts=0, per_tier=0),
        [L],
        [rollback(NA1, NA2)],
        id="rungs-with-no-budget-are-not-applicable",
    ),
    pytest.param(
        StepFacts(FWD, frozenset({0, 1, 2})),
        Bounds(),
        [L, L, L],
        [climb(R1), retry(R1), rollback(NA2)],
        id="2-declared-but-no-tiers-is-not-applicable",
    ),
]


@pytest.mark.parametrize(("step", "bounds", "failures", "expected"), LADDER)
def test_rung_sequence(
    step: StepFacts, bounds: Bounds, failures: list[FailureClass], expected: list[Summary]
) -> None:
    decisions, _ = drive(step, failures, bounds, random.Random(4))
    assert [summary(d) for d in decisions] == expected
    for d in decisions:
        if d.then is Then.RETRY:
            assert BASE <= d.delay <= CAP  # never an immediate retry
        else:
            assert d.delay == 0.0
        assert d.reason == d.rungs[-1].reason and d.reason


def test_rung_0_delays_grow_with_each_retry() -> None:
    decisions, _ = drive(PLAIN, [T] * 6, Bounds(retries=5, base=1.0, cap=10.0), FixedJitter(1.0))
    assert [d.delay for d in decisions] == [1.0, 2.0, 4.0, 8.0, 10.0, 0.0]
    decisions, _ = drive(StepFacts(BACK, frozenset()), [T] * 4, Bounds(base=0.5), FixedJitter(1.0))
    assert [d.delay for d in decisions] == [0.5, 1.0, 2.0, 0.0]


def test_reasons_count_the_budget() -> None:
    decisions, _ = drive(MODEL, [T, T, L, L, L, L], Bounds(retries=2), random.Random(1))
    assert [d.reason for d in decisions] == [
        "transient failure; retry 1 of 2",
        "transient failure; retry 2 of 2",
        "logical failure; re-prompt 1 of 2",
        "logical failure; re-prompt 2 of 2",
        "small → large",
        "logical failure, rungs 0-2 spent: roll back before the pivot",
    ]


def test_an_at_most_once_step_whose_outcome_is_unknown_pages_and_is_neither_rerun_nor_undone():
    blind = StepFacts(FWD, frozenset({0, 1, 2}), ("small", "large"), at_most_once=True)
    for failure in (T, X):  # a lease that expired, or a verify that raised
        d = decide(blind, (Attempt(0, None, failure, unknown=True),), Bounds())
        assert d.then is Then.ESCALATE and d.level == 4
        assert [(r.level, r.applicable) for r in d.rungs] == [
            (1, False), (2, False), (3, False), (4, True),  # no rung skipped silently
        ]
    # Known failures of the same step climb as usual; unknown outcomes of others retry.
    assert decide(blind, (Attempt(0, None, T),), Bounds()).then is Then.RETRY
    assert decide(MODEL, (Attempt(0, None, T, unknown=True),), Bounds()).then is Then.RETRY
    assert decide(MODEL, (Attempt(0, None, X, unknown=True),), Bounds()).then is Then.ROLLBACK


def test_a_first_run_without_a_recorded_tier_is_on_the_first_tier() -> None:
    """The engine records no tier on a step's first run: rung 2 still goes to the 2nd tier."""
    step = StepFacts(FWD, frozenset({0, 1, 2}), ("small", "medium", "large"))
    decisions, _ = drive(step, [L] * 6, Bounds(), random.Random(0), tier=None)
    assert [summary(d) for d in decisions] == [
        climb(R1),
        retry(R1),
        climb(SWITCH, tier="medium"),
        retry(SWITCH, "large"),
        rollback(),
    ]


def test_a_step_with_only_a_fallback_reaches_it_at_rung_2() -> None:
    """``fallback=`` without tiers: rung 2 runs the fallback (issue 4: "or a fallback action").

    ``_ladder_options`` makes the tiers ``("fallback",)`` and rungs 0, 1, 2; the first run
    has no tier, so the fallback is the next one.
    """
    step = StepFacts(FWD, frozenset({0, 1, 2}), ("fallback",))
    decisions, _ = drive(step, [L] * 5, Bounds(), random.Random(0), tier=None)
    assert [summary(d) for d in decisions] == [
        climb(R1),
        retry(R1),
        climb(SWITCH, tier="fallback"),
        rollback(),
    ]


def test_empty_bounds_use_the_defaults() -> None:
    defaults = Bounds(
        retries=3, reprompts=2, per_tier=1, refreshes=2, compensation_retries=3, base=1.0, cap=30.0
    )
    assert defaults == DEFAULT_BOUNDS
    plain, _ = drive(PLAIN, [T] * 10, Bounds(), random.Random(0))
    assert [d.then for d in plain].count(Then.RETRY) == 3
    back, _ = drive(StepFacts(BACK, frozenset({0})), [T] * 10, Bounds(), random.Random(0))
    assert [d.then for d in back].count(Then.RETRY) == 3
    model, _ = drive(MODEL, [L] * 10, Bounds(), random.Random(0))
    assert [d.level for d in model] == [1, 1, 2, 3]


# -- properties over random failure sequences -------------------------------------------

TIER_NAMES = ["t1", "t2", "t3"]


@st.composite
def ladders(draw: st.DrawFn) -> tuple[StepFacts, Bounds]:
    tiers = tuple(draw(st.lists(st.sampled_from(TIER_NAMES), unique=True, max_size=3)))
    if draw(st.booleans()):
        tiers += ("fallback",)
    step = StepFacts(
        FWD,
        frozenset(draw(st.sets(st.sampled_from([0, 1, 2])))),
        tiers,
        refresh=draw(st.booleans()),
        after_pivot=draw(st.booleans()),
    )
    small = st.integers(min_value=0, max_value=4)
    base = draw(st.floats(min_value=0.01, max_value=5.0))
    bounds = Bounds(
        retries=draw(small),
        reprompts=draw(small),
        per_tier=draw(small),
        refreshes=draw(small),
        compensation_retries=draw(small),
        base=base,
        cap=base * draw(st.floats(min_value=1.0, max_value=100.0)),
    )
    return step, bounds


failure_classes = st.sampled_from(list(FailureClass))


@given(
    ladder=ladders(),
    failures=st.lists(failure_classes, min_size=60, max_size=60),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_ladder_properties(
    ladder: tuple[StepFacts, Bounds], failures: list[FailureClass], seed: int
) -> None:
    step, bounds = ladder
    b = bounds
    assert b.retries is not None and b.reprompts is not None and b.per_tier is not None
    assert b.refreshes is not None and b.base is not None and b.cap is not None
    # Every RETRY spends a budget: the whole round is bounded by their sum.
    budget = b.retries + b.refreshes + b.reprompts + b.per_tier * len(step.tiers)
    decisions, failed = drive(step, failures, bounds, random.Random(seed), limit=budget + 1)

    # it ends, and only at the end
    assert len(decisions) <= budget + 1
    *retries, last = decisions
    assert all(d.then is Then.RETRY for d in retries)
    assert last.then is not Then.RETRY

    # no level skipped: from each failed run's level through every rung passed, in order
    levels: list[int] = []
    for attempt, d in zip(failed, decisions, strict=True):
        levels.append(attempt.level)
        levels.extend(r.level for r in d.rungs)
        assert d.rungs, "every decision passes at least one rung"
    assert all(0 <= b2 - a <= 1 for a, b2 in pairwise(levels)), levels

    # each rung's budget holds, and only declared rungs are used
    for attempt, d in zip(failed, decisions, strict=True):
        if attempt.failure is X:
            assert d.then is not Then.RETRY  # a terminal failure never retries
        if d.refresh:
            assert step.refresh and attempt.failure is E and d.level == 0
        for r in d.rungs:
            if r.level in (1, 2) and r.level not in step.rungs:
                assert not r.applicable
        if d.then is Then.RETRY:
            assert d.level in step.rungs
            assert b.base <= d.delay <= b.cap
        else:
            assert d.delay == 0.0
    actions = Counter((d.level, d.rungs[-1].action) for d in retries)
    assert actions[(0, "retry")] <= b.retries
    assert actions[(0, "refresh")] <= b.refreshes
    assert actions[(1, "re-prompt")] <= b.reprompts
    at_2 = Counter(d.tier for d in retries if d.level == 2)
    assert all(n <= b.per_tier for n in at_2.values()), at_2
    # tiers only move forward, one declared tier at a time, from the step's first tier
    tiers = list(dict.fromkeys(d.tier for d in retries if d.level == 2))
    start = first_tier(step)  # a step with only a fallback starts on no tier, before it
    after = step.tiers.index(start) + 1 if start in step.tiers else 0
    assert tiers == list(step.tiers[after : after + len(tiers)])

    # pivot semantics: after the pivot nothing is compensated; before it, a rollback
    if step.after_pivot:
        assert all(d.then is not Then.ROLLBACK for d in decisions)
        assert last.then is Then.ESCALATE and last.level == 4
        assert [(r.level, r.applicable) for r in last.rungs[-2:]] == [(3, False), (4, True)]
    else:
        assert last.then is Then.ROLLBACK and last.level == 3
        assert (last.rungs[-1].level, last.rungs[-1].applicable) == (3, True)
        assert all(r.level < 4 for d in decisions for r in d.rungs)


@given(
    ladder=ladders(),
    failures=st.lists(failure_classes, min_size=10, max_size=10),
)
def test_compensation_properties(
    ladder: tuple[StepFacts, Bounds], failures: list[FailureClass]
) -> None:
    forward, bounds = ladder
    step = StepFacts(BACK, forward.rungs, forward.tiers, forward.refresh, forward.after_pivot)
    assert bounds.compensation_retries is not None
    decisions, failed = drive(step, failures, bounds, random.Random(0))
    *retries, last = decisions
    assert last.then is not Then.RETRY
    assert len(retries) <= bounds.compensation_retries
    assert all(summary(d)[:4] == ((R0C,), Then.RETRY, 0, None) for d in retries)
    assert all(a.failure is not X for a in failed[:-1])
    assert summary(last) == ((PAGE,), Then.ESCALATE, 4, None, False)
    if failed[-1].failure is not X:
        assert len(retries) == bounds.compensation_retries


# -- bounds: step over saga over settings over defaults ------------------------------------


def test_over_takes_each_unset_bound_from_the_first_lower_that_sets_it() -> None:
    step = Bounds(retries=0)
    saga = Bounds(retries=5, reprompts=4)
    settings = Bounds(retries=6, reprompts=7, per_tier=8, base=0.5)
    merged = step.over(saga, settings, DEFAULT_BOUNDS)
    assert merged == Bounds(
        retries=0,  # 0 is a bound, not "unset"
        reprompts=4,
        per_tier=8,
        refreshes=DEFAULT_BOUNDS.refreshes,
        compensation_retries=DEFAULT_BOUNDS.compensation_retries,
        base=0.5,
        cap=DEFAULT_BOUNDS.cap,
    )
    assert step.over(saga, settings, DEFAULT_BOUNDS) == step.over(saga).over(settings).over(
        DEFAULT_BOUNDS
    )
    assert Bounds().over() == Bounds()
    assert Bounds().over(DEFAULT_BOUNDS) == DEFAULT_BOUNDS
    assert DEFAULT_BOUNDS.over(Bounds(retries=99)) == DEFAULT_BOUNDS


def test_settings_bounds() -> None:
    s = Settings(
        retries=2,
        retryable_retries=11,
        reprompts=3,
        per_tier=4,
        refreshes=5,
        compensation_retries=6,
        retry_base=0.25,
        retry_cap=7.0,
    )
    common: dict[str, Any] = dict(
        reprompts=3, per_tier=4, refreshes=5, compensation_retries=6, base=0.25, cap=7.0
    )
    assert s.bounds() == Bounds(retries=2, **common)
    assert s.bounds(retryable=False) == Bounds(retries=2, **common)
    assert s.bounds(retryable=True) == Bounds(retries=11, **common)
    assert Settings().bounds(retryable=True).retries == Settings().retryable_retries == 10


def test_step_and_saga_bounds_sit_on_top_of_the_settings() -> None:
    saga = Saga("bounded", ladder=Bounds(reprompts=5, per_tier=2), registry=Registry())
    saga.step(name="a", side_effect=False, retries=1, ladder=Bounds(per_tier=3))(
        lambda ctx, inp: None
    )
    saga.step(name="b", side_effect=False)(lambda ctx, inp: None)
    a, b = saga.steps
    settings = Settings(retries=2, reprompts=9, refreshes=4)
    assert a.ladder.over(saga.ladder, settings.bounds()) == Bounds(
        retries=1, reprompts=5, per_tier=3, refreshes=4, compensation_retries=3, base=1.0, cap=30.0
    )
    assert b.ladder.over(saga.ladder, settings.bounds()).retries == 2
    decisions, _ = drive(PLAIN, [T] * 5, a.ladder.over(saga.ladder, settings.bounds()))
    assert [d.then for d in decisions] == [Then.RETRY, Then.ROLLBACK]
