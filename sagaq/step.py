"""One step of a saga: its kind, its options, and the rules a declaration must follow.

Split from :mod:`sagaq.definition` (which re-exports :class:`Step` and :class:`StepKind`):
everything checked when a step is declared, before the saga it belongs to is sealed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from sagaq.errors import DefinitionError
from sagaq.failures import Classifier
from sagaq.ladder import Bounds

if TYPE_CHECKING:
    from sagaq.context import ReleaseContext, StepContext

Action = Callable[["StepContext", Any], Any]
Verify = Callable[["StepContext", Any], bool]
Validate = Callable[["StepContext", Any], Any]  # (ctx, result) -> False or raise to reject
Releaser = Callable[["ReleaseContext"], Any]  # releases one orphaned resource, idempotently

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
QUEUE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,199}$")


class StepKind(str, Enum):
    """Where a step stands relative to the point of no return."""

    COMPENSABLE = "compensable"  # undoable; comes first
    PIVOT = "pivot"  # the point of no return; at most one
    RETRYABLE = "retryable"  # after the pivot; idempotent, retried until it succeeds
    NONCOMPENSABLE = "noncompensable"  # cannot be undone; comes last


@dataclass(frozen=True)
class Step:
    """One forward action, its way back (or the reason there is none), and its read-back."""

    saga: str
    name: str
    index: int
    action: Action
    kind: StepKind = StepKind.COMPENSABLE
    compensate: Action | None = None
    compensate_name: str | None = None
    verify: Verify | None = None
    verify_name: str | None = None
    at_most_once: bool = False
    no_rollback: str | None = None
    side_effect: bool = True
    retries: int | None = None  # None: the settings' default for the kind
    timeout: float | None = None  # seconds the action may run; None: the settings' default
    rungs: frozenset[int] = frozenset({0})  # which of ladder rungs 0-2 apply
    tiers: tuple[str, ...] = ()  # model tiers, small → large; the first is the default
    fallback: Action | None = None  # run at rung 2 once the tiers are spent
    validate: Validate | None = None  # rejects a result: a logical failure
    ladder: Bounds = field(default_factory=Bounds)
    classify: tuple[Classifier, ...] = ()
    topic: str | None = None  # for the policy gate, e.g. "infra.delete"
    tags: tuple[str, ...] = ()  # for the policy gate, e.g. ("payments", "prod-write")
    queue: str | None = None  # the Celery queue of its tasks; None: SAGAQQUEUE

    @property
    def task_name(self) -> str:
        return f"sagaq.{self.saga}.{self.name}"

    @property
    def compensate_task_name(self) -> str | None:
        return f"sagaq.{self.saga}.{self.name}.compensate" if self.compensate_name else None

    def structure(self) -> dict[str, Any]:
        """The parts of the step that change what the engine does; hashed into the version."""
        return {
            "name": self.name,
            "kind": self.kind.value,
            "compensate": self.compensate_name,
            "verify": self.verify_name,
            "at_most_once": self.at_most_once,
            "no_rollback": self.no_rollback,
            "side_effect": self.side_effect,
        }


@dataclass
class Pending:
    """A step as declared, before names are resolved."""

    name: str
    action: Action
    kind: StepKind
    compensate: str | Action | None
    verify: str | Verify | None
    options: dict[str, Any] = field(default_factory=dict)



def check_options(
    saga: str,
    step: str,
    kind: StepKind,
    compensate: object,
    options: dict[str, Any],
) -> None:
    no_rollback = options.get("no_rollback")
    if no_rollback is not None and (not isinstance(no_rollback, str) or not no_rollback.strip()):
        raise DefinitionError(saga, step, "no_rollback must be a non-empty reason")
    if compensate is not None and kind is not StepKind.COMPENSABLE:
        raise DefinitionError(
            saga, step, f"only compensable steps take a compensation; this one is {kind.value}"
        )
    if compensate is not None and no_rollback is not None:
        raise DefinitionError(saga, step, "give compensate or no_rollback, not both")
    if (
        kind is StepKind.COMPENSABLE
        and options.get("side_effect", True)
        and compensate is None
        and no_rollback is None
    ):
        raise DefinitionError(
            saga,
            step,
            "a step with side effects needs compensate=... or no_rollback='reason' "
            "(or side_effect=False if it only reads)",
        )
    retries = options.get("retries")
    # bool is an int to Python, never a count or a duration to an author: refused too.
    if retries is not None and (
        not isinstance(retries, int) or isinstance(retries, bool) or retries < 0
    ):
        raise DefinitionError(saga, step, "retries must be a whole number >= 0")
    timeout = options.get("timeout")
    if timeout is not None and (
        not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0
    ):
        raise DefinitionError(saga, step, "timeout must be a positive number of seconds")


def ladder_options(saga: str, step: str, options: dict[str, Any]) -> dict[str, Any]:
    """Normalise the ladder options of one step; raise on the ones that cannot work."""
    tiers = options.get("tiers") or ()
    if not isinstance(tiers, tuple | list) or not all(isinstance(t, str) and t for t in tiers):
        raise DefinitionError(saga, step, "tiers is a tuple of tier names, small → large")
    tiers = tuple(tiers)
    if len(set(tiers)) != len(tiers) or "fallback" in tiers:
        raise DefinitionError(saga, step, "tier names are unique and not 'fallback'")
    fallback = options.get("fallback")
    if fallback is not None and not callable(fallback):
        raise DefinitionError(saga, step, "fallback must be callable")
    rungs = options.get("rungs")
    if rungs is None:
        rungs = (0, 1, 2) if tiers or fallback else (0,)
    if not isinstance(rungs, tuple | list | set | frozenset) or not set(rungs) <= {0, 1, 2}:
        raise DefinitionError(saga, step, "rungs names which of ladder rungs 0, 1, 2 apply")
    ladder = options.get("ladder")
    ladder = Bounds() if ladder is None else ladder
    if not isinstance(ladder, Bounds):
        raise DefinitionError(saga, step, "ladder must be a sagaq.ladder.Bounds")
    if options.get("retries") is not None:
        ladder = Bounds(retries=options["retries"]).over(ladder)
    classify = classifiers(saga, step, options.get("classify") or ())
    validate = options.get("validate")
    if validate is not None and not callable(validate):
        raise DefinitionError(saga, step, "validate must be callable")
    topic = options.get("topic")
    if topic is not None and (not isinstance(topic, str) or not topic):
        raise DefinitionError(saga, step, "topic must be a non-empty text, e.g. 'infra.delete'")
    tags = options.get("tags") or ()
    if isinstance(tags, str) or not all(isinstance(t, str) and t for t in tags):
        raise DefinitionError(saga, step, "tags is a tuple of non-empty texts")
    return {
        **options,
        "tiers": tiers + (("fallback",) if fallback else ()),
        "rungs": frozenset(rungs),
        "ladder": ladder,
        "classify": classify,
        "tags": tuple(tags),
    }


def queue_name(saga: str, step: str | None, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not QUEUE.match(value):
        raise DefinitionError(
            saga, step, f"queue {value!r} is not a queue name (letters, digits, . _ -)"
        )
    return value


def classifiers(saga: str, step: str | None, value: Any) -> tuple[Classifier, ...]:
    found = (value,) if callable(value) else value
    if not isinstance(found, tuple | list) or not all(callable(c) for c in found):
        raise DefinitionError(saga, step, "classify takes a function (or a tuple of them) "
                              "mapping an exception to a FailureClass or None")
    return tuple(found)


def check_order(saga: str, step: str, kind: StepKind, before: list[StepKind]) -> None:
    seen = set(before)
    if kind is StepKind.COMPENSABLE and seen - {StepKind.COMPENSABLE}:
        raise DefinitionError(
            saga, step, "compensable steps come before the pivot and any step that cannot be undone"
        )
    if kind is StepKind.PIVOT and StepKind.PIVOT in seen:
        raise DefinitionError(saga, step, "a saga has at most one pivot")
    if kind is StepKind.PIVOT and seen & {StepKind.RETRYABLE, StepKind.NONCOMPENSABLE}:
        raise DefinitionError(
            saga, step, "the pivot comes before retryable and noncompensable steps"
        )
    if kind is StepKind.RETRYABLE and StepKind.PIVOT not in seen:
        raise DefinitionError(saga, step, "retryable steps come after the pivot")
    if kind is not StepKind.NONCOMPENSABLE and StepKind.NONCOMPENSABLE in seen:
        raise DefinitionError(saga, step, "noncompensable steps come last")
