"""What a step's code receives: its identity, its idempotency key, and the saga so far."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from sagaq.machine import Direction


@dataclass
class StepContext:
    """Handed to every action, compensation and verify as their first argument.

    ``idempotency_key`` is the key to send to the external system: the same for every retry
    and redelivery of this step, different for its compensation, different in every saga.
    ``checkpoint`` is the saga's own JSON dict; what a step writes into it is saved with the
    step's result, in the same transaction, and seen by every later step.
    """

    saga_id: str
    saga: str
    step: str
    direction: Direction
    idempotency_key: str
    attempt: int
    input: Any
    results: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    checkpoint: dict[str, Any] = field(default_factory=dict)
    result: Any = None  # for a compensation (or verify): the forward result being undone
    worker: str | None = None
    task_id: str | None = None
    level: int = 0  # the ladder rung this attempt runs at
    tier: str | None = None  # the model tier to use (rung 2 switches it)
    errors: tuple[str, ...] = ()  # earlier attempts' errors, oldest first: for a re-prompt
    on_heartbeat: Callable[[], bool] | None = field(default=None, repr=False, compare=False)
    on_resource: Callable[[str, str], bool] | None = field(
        default=None, repr=False, compare=False
    )

    @property
    def key(self) -> str:
        return self.idempotency_key

    @property
    def compensating(self) -> bool:
        return self.direction is Direction.COMPENSATE

    def heartbeat(self) -> bool:
        """Extend this step's lease; a long step calls it well within its timeout.

        False means the lease was lost (it expired and another worker took over): stop.
        """
        return self.on_heartbeat() if self.on_heartbeat is not None else True

    def resource(self, kind: str, external_id: str) -> None:
        """Register an external resource this step created, right away (its own commit).

        If the saga ends without a compensation undoing this step, the reconciler releases
        the resource with the saga's ``@saga.releaser(kind)``, or pages when that fails.
        """
        if self.on_resource is not None:
            self.on_resource(kind, str(external_id))


@dataclass(frozen=True)
class ReleaseContext:
    """Handed to a ``@saga.releaser(kind)``: which resource to release, and the key to use."""

    saga_id: str
    saga: str
    step: str
    kind: str
    external_id: str
    idempotency_key: str  # sha256(saga_id:resource:kind:id:release), stable across retries
    attempt: int
