"""The ladder's pure decisions: bounded backoff, retry / roll back / escalate."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sagaq.errors import (
    EnvironmentalError,
    LogicalError,
    TerminalError,
    TransientError,
)
from sagaq.ladder import Decision, Failure, FailureClass, Then, backoff, classify, decide
from sagaq.machine import Direction

FWD, BACK = Direction.FORWARD, Direction.COMPENSATE
TRANSIENT, TERMINAL = FailureClass.TRANSIENT, FailureClass.TERMINAL
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


# -- decide ------------------------------------------------------------------------------

# (direction, attempt, retries, failure, after_pivot) -> (then, level, reason)
DECISIONS = [
    pytest.param(FWD, 1, 3, TRANSIENT, False, Then.RETRY, 0, "retry 1 of 3", id="first-retry"),
    pytest.param(FWD, 3, 3, TRANSIENT, False, Then.RETRY, 0, "retry 3 of 3", id="last-retry"),
    pytest.param(
        FWD, 1, 10, TRANSIENT, True, Then.RETRY, 0, "retry 1 of 10", id="retry-after-pivot"
    ),
    pytest.param(
        BACK, 2, 3, TRANSIENT, False, Then.RETRY, 0, "retry 2 of 3", id="retry-compensation"
    ),
    pytest.param(
        FWD,
        4,
        3,
        TRANSIENT,
        False,
        Then.ROLLBACK,
        3,
        "before the pivot: roll back (retries exhausted)",
        id="exhausted-before-pivot",
    ),
    pytest.param(
        FWD,
        1,
        0,
        TRANSIENT,
        False,
        Then.ROLLBACK,
        3,
        "before the pivot: roll back (retries exhausted)",
        id="no-retries-before-pivot",
    ),
    pytest.param(
        FWD,
        11,
        10,
        TRANSIENT,
        True,
        Then.ESCALATE,
        4,
        "after the pivot, nothing is rolled back (retries exhausted)",
        id="exhausted-after-pivot",
    ),
    pytest.param(
        FWD,
        1,
        3,
        TERMINAL,
        False,
        Then.ROLLBACK,
        3,
        "before the pivot: roll back (terminal failure)",
        id="terminal-before-pivot",
    ),
    pytest.param(
        FWD,
        1,
        3,
        TERMINAL,
        True,
        Then.ESCALATE,
        4,
        "after the pivot, nothing is rolled back (terminal failure)",
        id="terminal-after-pivot",
    ),
    pytest.param(
        BACK,
        4,
        3,
        TRANSIENT,
        False,
        Then.ESCALATE,
        4,
        "compensation cannot succeed (retries exhausted)",
        id="compensation-exhausted",
    ),
    pytest.param(
        BACK,
        1,
        3,
        TERMINAL,
        False,
        Then.ESCALATE,
        4,
        "compensation cannot succeed (terminal failure)",
        id="compensation-terminal",
    ),
    pytest.param(
        BACK,
        1,
        3,
        TERMINAL,
        True,
        Then.ESCALATE,
        4,
        "compensation cannot succeed (terminal failure)",
        id="compensation-terminal-after-pivot",
    ),
]


@pytest.mark.parametrize(
    ("direction", "attempt", "retries", "failure", "after_pivot", "then", "level", "reason"),
    DECISIONS,
)
def test_decide(
    direction: Direction,
    attempt: int,
    retries: int,
    failure: FailureClass,
    after_pivot: bool,
    then: Then,
    level: int,
    reason: str,
) -> None:
    d = decide(
        Failure(direction, attempt, retries, failure, after_pivot),
        base=BASE,
        cap=CAP,
        rng=random.Random(7),
    )
    assert (d.then, d.level, d.reason) == (then, level, reason)
    if then is Then.RETRY:
        assert BASE <= d.delay <= CAP
        assert d.delay <= min(CAP, BASE * 2 ** (attempt - 1))
    else:
        assert d.delay == 0.0


def test_retry_delay_is_the_backoff_of_the_attempt() -> None:
    d = decide(Failure(FWD, 4, 5, TRANSIENT, False), base=BASE, cap=CAP, rng=FixedJitter(1.0))
    assert d == Decision(Then.RETRY, 0, "retry 4 of 5", 8.0)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (TerminalError(), TERMINAL),
        (TerminalError("card declined", step="charge"), TERMINAL),
        (ValueError(), TRANSIENT),
        (TransientError(), TRANSIENT),
        (KeyError("x"), TRANSIENT),
        (LogicalError(), TRANSIENT),
        (EnvironmentalError(), TRANSIENT),
    ],
)
def test_classify(exc: BaseException, expected: FailureClass) -> None:
    assert classify(exc) is expected


def test_classify_subclass_of_terminal() -> None:
    class Declined(TerminalError):
        pass

    assert classify(Declined()) is TERMINAL


# -- properties over a run of failures of one step ---------------------------------------


@st.composite
def failure_runs(draw: st.DrawFn) -> tuple[Direction, bool, int, list[FailureClass]]:
    direction = draw(st.sampled_from(list(Direction)))
    after_pivot = draw(st.booleans())
    retries = draw(st.integers(min_value=0, max_value=15))
    # enough failures to exhaust any budget: the run must end in a non-RETRY decision
    classes = draw(
        st.lists(st.sampled_from([TRANSIENT, TERMINAL]), min_size=retries + 1, max_size=retries + 5)
    )
    return direction, after_pivot, retries, classes


@given(run=failure_runs(), seed=st.integers(min_value=0, max_value=2**32))
def test_retries_before_giving_up(
    run: tuple[Direction, bool, int, list[FailureClass]], seed: int
) -> None:
    direction, after_pivot, retries, classes = run
    rng = random.Random(seed)
    decisions: list[Decision] = []
    for attempt, failure in enumerate(classes, start=1):
        d = decide(
            Failure(direction, attempt, retries, failure, after_pivot), base=0.5, cap=4.0, rng=rng
        )
        decisions.append(d)
        if d.then is not Then.RETRY:
            break

    first_terminal = classes.index(TERMINAL) if TERMINAL in classes else len(classes)
    expected_retries = min(retries, first_terminal)
    *retried, final = decisions
    assert len(retried) == expected_retries
    assert all(d.then is Then.RETRY and d.level == 0 and 0.5 <= d.delay <= 4.0 for d in retried)
    assert final.then is not Then.RETRY
    if direction is BACK or after_pivot:
        assert (final.then, final.level) == (Then.ESCALATE, 4)
    else:
        assert (final.then, final.level) == (Then.ROLLBACK, 3)


@given(
    attempt=st.integers(min_value=1, max_value=50),
    retries=st.integers(min_value=0, max_value=50),
    failure=st.sampled_from(list(FailureClass)),
    direction=st.sampled_from(list(Direction)),
)
def test_never_rollback_after_the_pivot_or_from_a_compensation(
    attempt: int, retries: int, failure: FailureClass, direction: Direction
) -> None:
    after = decide(Failure(FWD, attempt, retries, failure, True), base=1, cap=2)
    assert after.then is not Then.ROLLBACK
    back = decide(Failure(BACK, attempt, retries, failure, False), base=1, cap=2)
    assert back.then is not Then.ROLLBACK
    d = decide(Failure(direction, attempt, retries, failure, True), base=1, cap=2)
    assert d.then in (Then.RETRY, Then.ESCALATE)
    assert d.level == (0 if d.then is Then.RETRY else 4)
