"""What to do after a step fails: a pure decision over frozen facts, no I/O.

This is the bounded core of the escalation ladder: level 0 (retry with capped, jittered
backoff), level 3 (give up before the pivot: roll back) and level 4 (a human: after the
pivot, or when a compensation cannot succeed).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum

from sagaq.errors import TerminalError
from sagaq.machine import Direction

_rng = random.Random()


class Then(str, Enum):
    """What happens after a failed run."""

    RETRY = "retry"
    ROLLBACK = "rollback"
    ESCALATE = "escalate"


class FailureClass(str, Enum):
    TRANSIENT = "transient"
    TERMINAL = "terminal"


def classify(exc: BaseException) -> FailureClass:
    """Terminal if the step said so; anything else is worth a bounded retry."""
    return FailureClass.TERMINAL if isinstance(exc, TerminalError) else FailureClass.TRANSIENT


@dataclass(frozen=True)
class Failure:
    direction: Direction
    attempt: int  # 1 for the first try
    retries: int  # retries allowed after the first try
    failure: FailureClass
    after_pivot: bool


@dataclass(frozen=True)
class Decision:
    then: Then
    level: int
    reason: str
    delay: float = 0.0


def backoff(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with bounded jitter: always within [base, cap], never immediate."""
    ceiling = min(cap, base * 2.0 ** min(max(attempt - 1, 0), 64))  # 2**64: past any cap
    jittered = ceiling * (0.5 + 0.5 * (rng or _rng).random())
    return max(base, min(cap, jittered))


def decide(f: Failure, *, base: float, cap: float, rng: random.Random | None = None) -> Decision:
    retry_left = f.failure is not FailureClass.TERMINAL and f.attempt <= f.retries
    if retry_left:
        return Decision(
            Then.RETRY,
            0,
            f"retry {f.attempt} of {f.retries}",
            backoff(f.attempt, base, cap, rng),
        )
    why = "terminal failure" if f.failure is FailureClass.TERMINAL else "retries exhausted"
    if f.direction is Direction.COMPENSATE:
        return Decision(Then.ESCALATE, 4, f"compensation cannot succeed ({why})")
    if f.after_pivot:
        return Decision(Then.ESCALATE, 4, f"after the pivot, nothing is rolled back ({why})")
    return Decision(Then.ROLLBACK, 3, f"before the pivot: roll back ({why})")
