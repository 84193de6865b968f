"""The escalation ladder: what to do after a step fails. Pure decisions over frozen facts.

====  ==========================================  =========================================
rung  when                                        what
====  ==========================================  =========================================
0     transient (or environmental, with refresh)  retry the same input, backoff with jitter
1     logical, or rung 0 spent                    re-run with the earlier errors in context
2     still failing                               switch to the next model tier / fallback
3     still failing                               before the pivot: compensate, notify;
                                                  after it: not applicable
4     a compensation failed past its retries,     page a human; the saga waits in
      an after-pivot step spent its budget, or    ``needs_human``
      an ``at_most_once`` step's outcome is
      unknown (never re-run, never undone blind)
====  ==========================================  =========================================

The ladder climbs one rung at a time and never comes down. A rung that does not apply to a
step (a plain API call has no model tier) is still passed through, as a rung marked not
applicable, so the timeline reads 0 → 1 (n/a) → 2 (n/a) → 3 and never jumps silently.
Compensations climb their own short ladder (rung 0 retries) and then go to rung 4.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields
from enum import Enum

from sagaq.failures import FailureClass, classify
from sagaq.machine import Direction

__all__ = [
    "DEFAULT_BOUNDS",
    "Attempt",
    "Bounds",
    "Decision",
    "FailureClass",
    "Rung",
    "StepFacts",
    "Then",
    "backoff",
    "classify",
    "decide",
]

_rng = random.Random()


class Then(str, Enum):
    """What happens after a failed run."""

    RETRY = "retry"
    ROLLBACK = "rollback"
    ESCALATE = "escalate"


@dataclass(frozen=True)
class Bounds:
    """Budgets per rung. ``None`` means "inherit": step → saga → settings → defaults."""

    retries: int | None = None  # rung 0: retries of the same input
    reprompts: int | None = None  # rung 1: re-runs with the errors in context
    per_tier: int | None = None  # rung 2: attempts on each further tier
    refreshes: int | None = None  # rung 0: environmental failures answered by a refresh
    compensation_retries: int | None = None
    base: float | None = None  # backoff, seconds
    cap: float | None = None

    def over(self, *lower: Bounds) -> Bounds:
        """These bounds, with every unset one taken from the first of ``lower`` that sets it."""
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            for other in lower:
                if value is not None:
                    break
                value = getattr(other, f.name)
            values[f.name] = value
        return Bounds(**values)


DEFAULT_BOUNDS = Bounds(
    retries=3, reprompts=2, per_tier=1, refreshes=2, compensation_retries=3, base=1.0, cap=30.0
)


@dataclass(frozen=True)
class StepFacts:
    direction: Direction
    rungs: frozenset[int]  # which of rungs 0, 1, 2 apply to this step
    tiers: tuple[str, ...] = ()  # model tiers in order, small → large; may end in "fallback"
    refresh: bool = False  # the saga has a refresh hook
    after_pivot: bool = False
    at_most_once: bool = False


@dataclass(frozen=True)
class Attempt:
    """One earlier run of the step in this round, oldest first; the last one just failed."""

    level: int
    tier: str | None
    failure: FailureClass
    unknown: bool = False  # its worker died mid-effect and nothing verified the outcome


@dataclass(frozen=True)
class Rung:
    level: int
    applicable: bool
    action: str
    reason: str


@dataclass(frozen=True)
class Decision:
    then: Then
    rungs: tuple[Rung, ...]  # every rung passed, in order: each one an event
    level: int  # the rung the next attempt runs at (retry), or 3 / 4
    tier: str | None = None
    delay: float = 0.0
    refresh: bool = False  # call the saga's refresh hook before the retry

    @property
    def reason(self) -> str:
        return self.rungs[-1].reason if self.rungs else ""


def backoff(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with bounded jitter: always within [base, cap], never immediate."""
    ceiling = min(cap, base * 2.0 ** min(max(attempt - 1, 0), 64))  # 2**64: past any cap
    jittered = ceiling * (0.5 + 0.5 * (rng or _rng).random())
    return max(base, min(cap, jittered))


def decide(
    step: StepFacts,
    history: tuple[Attempt, ...],
    bounds: Bounds,
    rng: random.Random | None = None,
) -> Decision:
    """The next move after ``history[-1]`` failed."""
    b = bounds.over(DEFAULT_BOUNDS)
    # For mypy: DEFAULT_BOUNDS sets every field, so none is None (no test can tell `or` here).
    assert b.retries is not None and b.reprompts is not None  # pragma: no mutate
    assert b.per_tier is not None  # pragma: no mutate
    assert b.refreshes is not None and b.compensation_retries is not None  # pragma: no mutate
    assert b.base is not None and b.cap is not None  # pragma: no mutate
    base, cap = b.base, b.cap  # as given: a step's Bounds(cap=0) is not replaced by 30 s
    last = history[-1]
    at = [a for a in history if a.level == last.level]

    def wait(n: int) -> float:
        return backoff(n, base, cap, rng)

    if step.direction is Direction.COMPENSATE:
        if last.failure is not FailureClass.TERMINAL and len(history) <= b.compensation_retries:
            n = len(history)
            return Decision(Then.RETRY, (Rung(0, True, "retry compensation",
                            f"{last.failure.value}; retry {n} of {b.compensation_retries}"),),
                            0, delay=wait(n))
        why = "terminal" if last.failure is FailureClass.TERMINAL else "retries spent"
        return Decision(Then.ESCALATE, (Rung(4, True, "page", f"compensation failed ({why})"),), 4)

    passed: list[Rung] = []
    if step.at_most_once and last.unknown:
        # DESIGN §4.8: never re-executed blind, and its effect may have landed: page.
        for level in range(last.level + 1, 3):
            passed.append(Rung(level, False, "not applicable",
                               "outcome unknown: an at_most_once step is never re-run blind"))
        passed.append(Rung(3, False, "not applicable",
                           "its effect may have landed: nothing is undone before a human looks"))
        passed.append(Rung(4, True, "page", "outcome unknown and the step is at_most_once"))
        return Decision(Then.ESCALATE, tuple(passed), 4)
    if last.failure is FailureClass.TERMINAL:
        for level in range(last.level + 1, 3):
            passed.append(Rung(level, False, "not applicable", "terminal failure: no retry helps"))
        return _top(step, passed, "terminal failure")

    # Stay on the current rung while it has budget and fits the failure.
    if last.level == 0 and 0 in step.rungs:
        refreshes = sum(1 for a in history if a.failure is FailureClass.ENVIRONMENTAL)
        if last.failure is FailureClass.TRANSIENT and len(at) <= b.retries:
            n = len(at)
            return Decision(Then.RETRY, (Rung(0, True, "retry",
                            f"transient failure; retry {n} of {b.retries}"),), 0, last.tier,
                            wait(n))
        if (last.failure is FailureClass.ENVIRONMENTAL and step.refresh
                and refreshes <= b.refreshes):
            return Decision(Then.RETRY, (Rung(0, True, "refresh",
                            f"the world changed; refresh {refreshes} of {b.refreshes}"),), 0,
                            last.tier, wait(1), refresh=True)
    if last.level == 1 and len(at) < b.reprompts:
        n = len(at) + 1
        return Decision(Then.RETRY, (Rung(1, True, "re-prompt",
                        f"{last.failure.value} failure; re-prompt {n} of {b.reprompts}"),), 1,
                        last.tier, wait(1))
    if last.level == 2:
        same = sum(1 for a in at if a.tier == last.tier)
        if same < b.per_tier:
            return Decision(Then.RETRY, (Rung(2, True, "retry tier",
                            f"again on tier {last.tier}"),), 2, last.tier, wait(1))
        nxt = _next_tier(step.tiers, last.tier)
        if nxt is not None:
            return Decision(Then.RETRY, (Rung(2, True, "switch tier",
                            f"{last.tier} → {nxt}"),), 2, nxt, wait(1))

    # Climb, one rung at a time.
    for level in range(last.level + 1, 3):
        if level not in step.rungs:
            passed.append(Rung(level, False, "not applicable", f"rung {level} is not declared"))
        elif level == 1 and b.reprompts > 0:
            passed.append(Rung(1, True, "re-prompt",
                               f"{last.failure.value} failure; re-prompt 1 of {b.reprompts}"))
            return Decision(Then.RETRY, tuple(passed), 1, last.tier, wait(1))
        elif level == 2 and b.per_tier > 0 and _next_tier(step.tiers, last.tier) is not None:
            nxt = _next_tier(step.tiers, last.tier)
            passed.append(Rung(2, True, "switch tier", f"{last.tier or 'default'} → {nxt}"))
            return Decision(Then.RETRY, tuple(passed), 2, nxt, wait(1))
        else:
            passed.append(Rung(level, False, "not applicable", "no budget or no further tier"))
    return _top(step, passed, f"{last.failure.value} failure, rungs 0-2 spent")


def _next_tier(tiers: tuple[str, ...], current: str | None) -> str | None:
    if not tiers:
        return None
    # Not yet on a tier: the default one; a lone "fallback" is not a default, rung 2 goes to it.
    default = -1 if tiers[0] == "fallback" else 0
    index = tiers.index(current) if current in tiers else default
    return tiers[index + 1] if index + 1 < len(tiers) else None


def _top(step: StepFacts, passed: list[Rung], why: str) -> Decision:
    if not step.after_pivot:
        passed.append(Rung(3, True, "compensate", f"{why}: roll back before the pivot"))
        return Decision(Then.ROLLBACK, tuple(passed), 3)
    passed.append(Rung(3, False, "not applicable", "after the pivot nothing is compensated"))
    passed.append(Rung(4, True, "page", f"{why} after the pivot: a human decides"))
    return Decision(Then.ESCALATE, tuple(passed), 4)
