"""Every error sagaq raises, under one root.

::

    SagaqError
    ├── DefinitionError          a saga definition breaks a rule (raised at import time)
    ├── UnknownSagaError         a name or id that no definition / row answers to
    ├── InputError               saga input that is not JSON, or bad operator input
    ├── IllegalTransition        the lifecycle table forbids a move
    ├── ConfigurationError       settings that cannot work (named in the message)
    ├── DatabaseUnavailable      the database URL does not answer
    └── StepError                raised *by step code* to tell the engine what happened
        ├── TransientError       try again with the same input (network, 429, 5xx)
        ├── LogicalError         the output was wrong; re-prompt / switch tier
        ├── EnvironmentalError   the world changed; refresh and restart the step
        └── TerminalError        give up now; roll back if before the pivot

Exceptions carry the context an operator needs (``saga``, ``saga_id``, ``step``) as
attributes, and name it in their message.
"""

from __future__ import annotations


class SagaqError(Exception):
    """Root of every sagaq error."""

    def __init__(
        self,
        message: str,
        *,
        saga: str | None = None,
        saga_id: str | None = None,
        step: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.saga = saga
        self.saga_id = saga_id
        self.step = step


class DefinitionError(SagaqError):
    """A saga definition breaks a rule; the message names the saga, the step and the rule."""

    def __init__(self, saga: str, step: str | None, rule: str) -> None:
        where = f"saga {saga!r}" + (f", step {step!r}" if step else "")
        super().__init__(f"{where}: {rule}", saga=saga, step=step)
        self.rule = rule


class UnknownSagaError(SagaqError):
    """No saga definition has this name, or no saga row has this id."""


class InputError(SagaqError):
    """Input that sagaq cannot accept (not JSON-serialisable, malformed)."""


class IllegalTransition(SagaqError):
    """The lifecycle table has no move for this trigger from this state."""

    def __init__(self, trigger: str, state: str, *, saga_id: str | None = None) -> None:
        super().__init__(
            f"cannot {trigger!r} a saga in state {state!r}", saga_id=saga_id
        )
        self.trigger = trigger
        self.state = state


class ConfigurationError(SagaqError):
    """Settings that cannot work; the message names the setting."""


class DatabaseUnavailable(SagaqError):
    """The database does not answer at the configured URL (password hidden)."""


class StepError(SagaqError):
    """Base for errors that step code raises to classify its own failure."""

    def __init__(self, message: str = "", **context: str | None) -> None:
        super().__init__(message or type(self).__name__, **context)


class TransientError(StepError):
    """A failure worth retrying with the same input (network, timeout, 429, 5xx)."""


class LogicalError(StepError):
    """The step ran but its output was wrong (a bad tool call, invalid output)."""


class EnvironmentalError(StepError):
    """The world changed under the step (schema migrated, resource gone)."""


class TerminalError(StepError):
    """The step cannot succeed; roll back now if the saga is before its pivot."""
