"""sagaq: durable sagas on Celery and PostgreSQL.

Declare a :class:`Saga`, enqueue it from app code, run ``sagaq worker``; when a step fails
for good, the steps before it are undone in reverse order, each exactly once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sagaq.context import StepContext
from sagaq.definition import Registry, Saga, Step, StepKind, sagas
from sagaq.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    DefinitionError,
    EnvironmentalError,
    IllegalTransition,
    InputError,
    LogicalError,
    SagaqError,
    StepError,
    TerminalError,
    TransientError,
    UnknownSagaError,
)
from sagaq.machine import Direction, SagaState, StepStatus
from sagaq.runtime import Runtime, configure, default_runtime  # installs Saga.enqueue's hook
from sagaq.secrets import Secret
from sagaq.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

__version__ = "0.1.0"


def enqueue(
    saga: Saga | str,
    input: Any = None,
    *,
    key: str | None = None,
    session: Session | None = None,
) -> str:
    """Start a saga on the default runtime; see :meth:`sagaq.engine.Engine.enqueue`."""
    return default_runtime().engine.enqueue(saga, input, key=key, session=session)


__all__ = [
    "ConfigurationError",
    "DatabaseUnavailable",
    "DefinitionError",
    "Direction",
    "EnvironmentalError",
    "IllegalTransition",
    "InputError",
    "LogicalError",
    "Registry",
    "Runtime",
    "Saga",
    "SagaState",
    "SagaqError",
    "Secret",
    "Settings",
    "Step",
    "StepContext",
    "StepError",
    "StepKind",
    "StepStatus",
    "TerminalError",
    "TransientError",
    "UnknownSagaError",
    "__version__",
    "configure",
    "default_runtime",
    "enqueue",
    "sagas",
]
