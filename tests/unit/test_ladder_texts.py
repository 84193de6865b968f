"""The ladder's rungs as an operator reads them on the timeline, and the delays they wait.

Every rung passed is an event (DESIGN §4.9), so its action and reason are part of the
contract: each decision's rungs are compared whole here. The delays of rungs 1 and 2 are
the first backoff step (``base``), whatever the jitter: a pinned jitter near 1 tells them
from a second step, which may wait up to twice ``base``.
"""

from __future__ import annotations

import random

import pytest

from sagaq.ladder import Attempt, Bounds, Decision, FailureClass, StepFacts, Then, decide
from sagaq.machine import Direction

FWD, BACK = Direction.FORWARD, Direction.COMPENSATE
T, L, E, X = (
    FailureClass.TRANSIENT,
    FailureClass.LOGICAL,
    FailureClass.ENVIRONMENTAL,
    FailureClass.TERMINAL,
)
NA = "not applicable"


class HighJitter(random.Random):
    """random() is always 0.99: a second backoff step would wait 1.99 * base, not base."""

    def random(self) -> float:
        return 0.99


def rungs(d: Decision) -> list[tuple[int, bool, str, str]]:
    return [(r.level, r.applicable, r.action, r.reason) for r in d.rungs]


def facts(*levels: int, tiers: tuple[str, ...] = (), **kw: bool) -> StepFacts:
    return StepFacts(FWD, frozenset(levels), tiers=tiers, **kw)


# -- compensations -------------------------------------------------------------------------


def test_a_compensation_retry_names_the_failure_and_the_budget() -> None:
    d = decide(StepFacts(BACK, frozenset({0})), (Attempt(0, None, T),), Bounds())
    assert (d.then, d.level) == (Then.RETRY, 0)
    assert rungs(d) == [(0, True, "retry compensation", "transient; retry 1 of 3")]


def test_a_terminal_compensation_failure_pages_saying_terminal() -> None:
    d = decide(StepFacts(BACK, frozenset({0})), (Attempt(0, None, X),), Bounds())
    assert (d.then, d.level) == (Then.ESCALATE, 4)
    assert rungs(d) == [(4, True, "page", "compensation failed (terminal)")]
    assert d.reason == "compensation failed (terminal)"


def test_a_compensation_out_of_retries_pages_saying_so() -> None:
    history = tuple(Attempt(0, None, T) for _ in range(3))
    d = decide(StepFacts(BACK, frozenset({0})), history, Bounds(compensation_retries=2))
    assert (d.then, d.level) == (Then.ESCALATE, 4)
    assert rungs(d) == [(4, True, "page", "compensation failed (retries spent)")]


# -- the three ways to the top ---------------------------------------------------------------


def test_an_unknown_at_most_once_step_passes_every_rung_and_pages() -> None:
    step = facts(0, 1, 2, tiers=("small", "large"), at_most_once=True)
    d = decide(step, (Attempt(0, None, T, unknown=True),), Bounds())
    blind = "outcome unknown: an at_most_once step is never re-run blind"
    assert rungs(d) == [
        (1, False, NA, blind),
        (2, False, NA, blind),
        (3, False, NA, "its effect may have landed: nothing is undone before a human looks"),
        (4, True, "page", "outcome unknown and the step is at_most_once"),
    ]
    assert (d.then, d.level) == (Then.ESCALATE, 4)


def test_a_terminal_failure_before_the_pivot_rolls_back_saying_why() -> None:
    d = decide(facts(0, 1, 2, tiers=("small", "large")), (Attempt(0, None, X),), Bounds())
    assert rungs(d) == [
        (1, False, NA, "terminal failure: no retry helps"),
        (2, False, NA, "terminal failure: no retry helps"),
        (3, True, "compensate", "terminal failure: roll back before the pivot"),
    ]
    assert (d.then, d.level) == (Then.ROLLBACK, 3)


def test_a_terminal_failure_after_the_pivot_pages_and_says_nothing_is_undone() -> None:
    d = decide(facts(0, after_pivot=True), (Attempt(0, None, X),), Bounds())
    assert rungs(d) == [
        (1, False, NA, "terminal failure: no retry helps"),
        (2, False, NA, "terminal failure: no retry helps"),
        (3, False, NA, "after the pivot nothing is compensated"),
        (4, True, "page", "terminal failure after the pivot: a human decides"),
    ]
    assert (d.then, d.level) == (Then.ESCALATE, 4)


def test_a_climb_names_each_rung_it_passes() -> None:
    # Rung 1 declared without budget, rung 2 not declared at all.
    d = decide(facts(0, 1), (Attempt(0, None, L),), Bounds(reprompts=0))
    assert rungs(d) == [
        (1, False, NA, "no budget or no further tier"),
        (2, False, NA, "rung 2 is not declared"),
        (3, True, "compensate", "logical failure, rungs 0-2 spent: roll back before the pivot"),
    ]
    d = decide(facts(0), (Attempt(0, None, T),) * 4, Bounds())
    assert rungs(d)[:2] == [(1, False, NA, "rung 1 is not declared"),
                            (2, False, NA, "rung 2 is not declared")]


# -- which tier comes next -------------------------------------------------------------------


def test_a_climb_to_rung_2_switches_from_the_tier_it_is_on() -> None:
    # Re-prompts spent on the middle tier: the next is the large one, not the middle again.
    step = facts(0, 1, 2, tiers=("small", "medium", "large"))
    history = (Attempt(1, "medium", L), Attempt(1, "medium", L))
    d = decide(step, history, Bounds(reprompts=2))
    assert rungs(d) == [(2, True, "switch tier", "medium → large")]
    assert (d.then, d.level, d.tier) == (Then.RETRY, 2, "large")


def test_a_climb_from_the_last_tier_finds_no_further_tier() -> None:
    step = facts(0, 1, 2, tiers=("small", "large"))
    history = (Attempt(1, "large", L), Attempt(1, "large", L))
    d = decide(step, history, Bounds(reprompts=2))
    assert rungs(d)[0] == (2, False, NA, "no budget or no further tier")
    assert d.then is Then.ROLLBACK


def test_a_climb_from_no_tier_names_the_default() -> None:
    d = decide(facts(0, 2, tiers=("small", "large")), (Attempt(0, None, L),), Bounds())
    assert rungs(d) == [(1, False, NA, "rung 1 is not declared"),
                        (2, True, "switch tier", "default → large")]
    assert d.tier == "large"


# -- delays -------------------------------------------------------------------------------


def _delay(step: StepFacts, history: tuple[Attempt, ...], **bounds: float | int) -> Decision:
    return decide(step, history, Bounds(base=2.0, cap=60.0, **bounds), HighJitter())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("step", "history", "action"),
    [
        (facts(0, refresh=True), (Attempt(0, None, E),), "refresh"),
        (facts(0, 1), (Attempt(1, None, L),), "re-prompt"),
        (facts(0, 1), (Attempt(0, None, L),), "re-prompt"),
        (facts(0, 2, tiers=("s", "l")), (Attempt(2, "s", L),), "retry tier"),
        (facts(0, 2, tiers=("s", "m", "l")), (Attempt(2, "s", L), Attempt(2, "s", L)),
         "switch tier"),
        (facts(0, 2, tiers=("s", "l")), (Attempt(0, None, L),), "switch tier"),
    ],
)
def test_rungs_above_0_and_refreshes_wait_one_backoff_step(
    step: StepFacts, history: tuple[Attempt, ...], action: str
) -> None:
    d = _delay(step, history, per_tier=1 if action != "retry tier" else 2)
    assert d.then is Then.RETRY
    assert d.rungs[-1].action == action
    assert d.delay == 2.0  # base: a second step would be 1.99 * 2.0


def test_a_step_s_own_zero_backoff_is_kept() -> None:
    # Bounds(base=0, cap=0) on a step means "retry at once"; it used to become 1 s to 30 s.
    d = decide(facts(0), (Attempt(0, None, T),), Bounds(base=0.0, cap=0.0), HighJitter())
    assert (d.then, d.delay) == (Then.RETRY, 0.0)
    d = decide(facts(0), (Attempt(0, None, T),) * 3, Bounds(base=1.0, cap=0.0), HighJitter())
    assert d.delay == 1.0  # never below base, even when the cap is
