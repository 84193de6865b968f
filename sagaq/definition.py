"""Saga definitions: ordered steps, their kinds, and the rules their order must follow.

A definition is declared once, at import time, in app code::

    provision = Saga("provision_agent")

    @provision.step(compensate="delete_identity", verify="identity_exists")
    def create_identity(ctx, inp): ...

    @provision.compensation
    def delete_identity(ctx, inp): ...

Every rule that can be checked when a step is added is checked then, so a bad definition
fails on import with a :class:`~sagaq.errors.DefinitionError` naming the saga, the step and
the rule. Names given as strings (``compensate="delete_identity"``) are resolved when the
saga is *sealed*: on first use (enqueue, worker start) or by calling :meth:`Saga.seal`.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol, overload

from sagaq.errors import ConfigurationError, DefinitionError, UnknownSagaError
from sagaq.failures import Classifier
from sagaq.ladder import Bounds
from sagaq.step import (
    NAME,
    Action,
    Pending,
    Releaser,
    Step,
    StepKind,
    Validate,
    Verify,
    check_options,
    check_order,
    classifiers,
    ladder_options,
    queue_name,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

__all__ = [
    "Action", "Enqueue", "Registry", "Releaser", "Saga", "Step", "StepKind", "Validate",
    "Verify", "sagas", "use_enqueue",
]


class Saga:
    """A named, versioned, ordered list of steps."""

    def __init__(
        self,
        name: str,
        *,
        ladder: Bounds | None = None,
        classify: Classifier | tuple[Classifier, ...] = (),
        registry: Registry | None = None,
        queue: str | None = None,
    ) -> None:
        if not isinstance(name, str) or not NAME.match(name):
            raise DefinitionError(
                str(name), None, "a saga name is letters, digits and underscores, not a digit first"
            )
        self.name = name
        self.queue = queue_name(name, None, queue)  # its steps' default Celery queue
        self.ladder = ladder or Bounds()
        self.classify = classifiers(name, None, classify)
        self.refresh_hook: Action | None = None
        self.releasers: dict[str, Releaser] = {}
        self._pending: list[Pending] = []
        self._helpers: dict[str, Callable[..., Any]] = {}
        self._steps: tuple[Step, ...] | None = None
        self._lock = threading.Lock()
        (registry if registry is not None else sagas).add(self)

    def __repr__(self) -> str:
        return f"<Saga {self.name} steps={[p.name for p in self._pending]}>"

    # -- declaring ---------------------------------------------------------------------

    @overload
    def step(self, fn: Action, /) -> Action: ...

    @overload
    def step(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        kind: StepKind | str = StepKind.COMPENSABLE,
        compensate: str | Action | None = None,
        verify: str | Verify | None = None,
        at_most_once: bool = False,
        no_rollback: str | None = None,
        side_effect: bool = True,
        retries: int | None = None,
        timeout: float | None = None,
        rungs: tuple[int, ...] | None = None,
        tiers: tuple[str, ...] = (),
        fallback: Action | None = None,
        validate: Validate | None = None,
        ladder: Bounds | None = None,
        classify: Classifier | tuple[Classifier, ...] = (),
        topic: str | None = None,
        tags: tuple[str, ...] = (),
        queue: str | None = None,
    ) -> Callable[[Action], Action]: ...

    def step(
        self,
        fn: Action | None = None,
        /,
        *,
        name: str | None = None,
        kind: StepKind | str = StepKind.COMPENSABLE,
        compensate: str | Action | None = None,
        verify: str | Verify | None = None,
        at_most_once: bool = False,
        no_rollback: str | None = None,
        side_effect: bool = True,
        retries: int | None = None,
        timeout: float | None = None,
        rungs: tuple[int, ...] | None = None,
        tiers: tuple[str, ...] = (),
        fallback: Action | None = None,
        validate: Validate | None = None,
        ladder: Bounds | None = None,
        classify: Classifier | tuple[Classifier, ...] = (),
        topic: str | None = None,
        tags: tuple[str, ...] = (),
        queue: str | None = None,
    ) -> Action | Callable[[Action], Action]:
        """Declare the next step; use as ``@saga.step`` or ``@saga.step(...)``.

        ``compensate`` undoes it (a function or the name of a ``@saga.compensation``);
        ``verify`` reads back whether its effect landed; ``kind`` places it relative to the
        pivot. Ladder options: ``retries`` (rung 0), ``tiers`` and ``fallback`` (rung 2),
        ``rungs`` (which of 0-2 apply; default 0, plus 1 and 2 for a step with tiers),
        ``validate`` (reject a result as a logical failure), ``ladder`` (all budgets),
        ``classify`` (map this step's own exceptions to failure classes). Policy facts:
        ``topic`` and ``tags``. ``queue``: the Celery queue of the step and its compensation
        (default: the saga's ``queue=``, else ``SAGAQ_QUEUE``), so heavy steps can go to
        their own workers (``sagaq worker -Q heavy``).
        """

        def add(action: Action) -> Action:
            self._add(
                name or str(getattr(action, "__name__", "")),
                action,
                kind=kind,
                compensate=compensate,
                verify=verify,
                at_most_once=at_most_once,
                no_rollback=no_rollback,
                side_effect=side_effect,
                retries=retries,
                timeout=timeout,
                rungs=rungs,
                tiers=tiers,
                fallback=fallback,
                validate=validate,
                ladder=ladder,
                classify=classify,
                topic=topic,
                tags=tags,
                queue=queue_name(self.name, name or getattr(action, "__name__", None), queue)
                or self.queue,
            )
            return action

        return add(fn) if fn is not None else add

    def compensation(self, fn: Action) -> Action:
        """Register a compensation that steps name with ``compensate="..."``."""
        self._helper(fn)
        return fn

    def verifier(self, fn: Verify) -> Verify:
        """Register a read-back that steps name with ``verify="..."``."""
        self._helper(fn)
        return fn

    def refresh(self, fn: Action) -> Action:
        """Register the hook that re-reads the world after an environmental failure.

        It receives the failing step's context; what it writes into ``ctx.checkpoint`` (or
        returns, as a dict) is saved, and the step restarts with that state.
        """
        if not callable(fn):
            raise DefinitionError(self.name, None, "the refresh hook must be callable")
        self.refresh_hook = fn
        return fn

    def releaser(self, kind: str) -> Callable[[Releaser], Releaser]:
        """Register how to release a resource of ``kind`` that a step registered with
        ``ctx.resource(kind, id)`` and that no compensation undid (an orphan)."""
        if not isinstance(kind, str) or not kind:
            raise DefinitionError(self.name, None, "a releaser needs a resource kind")

        def register(fn: Releaser) -> Releaser:
            if not callable(fn):
                raise DefinitionError(self.name, None, f"the releaser of {kind!r} is not callable")
            self.releasers[kind] = fn
            return fn

        return register

    def _helper(self, fn: Callable[..., Any]) -> None:
        name = getattr(fn, "__name__", "")
        if not callable(fn) or not NAME.match(name):
            raise DefinitionError(self.name, None, f"{fn!r} is not a named function")
        if name in self._helpers and self._helpers[name] is not fn:
            raise DefinitionError(self.name, None, f"two helpers are named {name!r}")
        self._helpers[name] = fn

    def _add(
        self,
        name: str,
        action: Action,
        *,
        kind: StepKind | str,
        compensate: str | Action | None,
        verify: str | Verify | None,
        **options: Any,
    ) -> None:
        if self._steps is not None:
            raise DefinitionError(
                self.name, name, "the saga is already sealed (in use); declare steps at import"
            )
        if not NAME.match(name):
            raise DefinitionError(
                self.name, name or None, "a step name is letters, digits and underscores"
            )
        if not callable(action):
            raise DefinitionError(self.name, name, "the step's action is not callable")
        if any(p.name == name for p in self._pending):
            raise DefinitionError(self.name, name, "step names must be unique")
        try:
            step_kind = StepKind(kind)
        except ValueError:
            kinds = ", ".join(k.value for k in StepKind)
            raise DefinitionError(
                self.name, name, f"unknown kind {kind!r} (one of {kinds})"
            ) from None
        check_options(self.name, name, step_kind, compensate, options)
        options = ladder_options(self.name, name, options)
        check_order(self.name, name, step_kind, [p.kind for p in self._pending])
        self._pending.append(Pending(name, action, step_kind, compensate, verify, options))

    # -- using -------------------------------------------------------------------------

    def seal(self) -> tuple[Step, ...]:
        """Resolve helper names and freeze the step list; idempotent."""
        with self._lock:
            if self._steps is None:
                if not self._pending:
                    raise DefinitionError(self.name, None, "a saga needs at least one step")
                self._steps = tuple(self._resolve(i, p) for i, p in enumerate(self._pending))
            return self._steps

    def _resolve(self, index: int, p: Pending) -> Step:
        compensate, compensate_name = self._lookup(p.name, p.compensate, "compensation")
        verify, verify_name = self._lookup(p.name, p.verify, "verifier")
        return Step(
            saga=self.name,
            name=p.name,
            index=index,
            action=p.action,
            kind=p.kind,
            compensate=compensate,
            compensate_name=compensate_name,
            verify=verify,
            verify_name=verify_name,
            **p.options,
        )

    def _lookup(
        self, step: str, ref: str | Callable[..., Any] | None, what: str
    ) -> tuple[Any, str | None]:
        if ref is None:
            return None, None
        if isinstance(ref, str):
            if ref not in self._helpers:
                raise DefinitionError(
                    self.name,
                    step,
                    f"{what} {ref!r} is not defined (decorate it with @{self.name}.{what})",
                )
            return self._helpers[ref], ref
        if not callable(ref):
            raise DefinitionError(self.name, step, f"{what} {ref!r} is neither a name nor callable")
        return ref, getattr(ref, "__name__", what)

    @property
    def steps(self) -> tuple[Step, ...]:
        return self.seal()

    def step_named(self, name: str) -> Step:
        for s in self.steps:
            if s.name == name:
                return s
        raise UnknownSagaError(
            f"saga {self.name!r} has no step {name!r}", saga=self.name, step=name
        )

    @property
    def pivot_index(self) -> int | None:
        """Index of the point of no return: the pivot, else the first non-compensable step."""
        for s in self.steps:
            if s.kind is not StepKind.COMPENSABLE:
                return s.index
        return None

    @property
    def version(self) -> str:
        """A stable hash of the structure; recorded on every saga this definition starts."""
        body = json.dumps(
            {"saga": self.name, "steps": [s.structure() for s in self.steps]}, sort_keys=True
        )
        return hashlib.sha256(body.encode()).hexdigest()[:16]

    def enqueue(
        self,
        input: Mapping[str, Any] | None = None,
        *,
        key: str | None = None,
        session: Session | None = None,
    ) -> str:
        """Start a run of this saga on the default runtime; returns the saga id."""
        if _enqueue is None:
            raise ConfigurationError("no runtime to enqueue on: `import sagaq` installs it")
        return _enqueue(self, input, key=key, session=session)


class Enqueue(Protocol):
    """What :meth:`Saga.enqueue` hands a run to: the default runtime's engine.enqueue."""

    def __call__(
        self,
        saga: Saga,
        input: Mapping[str, Any] | None,
        *,
        key: str | None,
        session: Session | None,
    ) -> str: ...


_enqueue: Enqueue | None = None


def use_enqueue(fn: Enqueue | None) -> None:
    """Install what ``Saga.enqueue`` calls. The runtime installs itself when imported, so
    that this module, below it, never imports it; None uninstalls."""
    global _enqueue
    _enqueue = fn




class Registry:
    """The saga definitions a process knows, by name."""

    def __init__(self) -> None:
        self._sagas: dict[str, Saga] = {}
        self._lock = threading.Lock()

    def add(self, saga: Saga) -> None:
        with self._lock:
            if saga.name in self._sagas and self._sagas[saga.name] is not saga:
                raise DefinitionError(saga.name, None, "another saga already has this name")
            self._sagas[saga.name] = saga

    def get(self, name: str) -> Saga:
        try:
            return self._sagas[name]
        except KeyError:
            known = ", ".join(sorted(self._sagas)) or "none (import the module that defines it)"
            raise UnknownSagaError(f"no saga named {name!r}; known: {known}", saga=name) from None

    def __contains__(self, name: object) -> bool:
        return name in self._sagas

    def __iter__(self) -> Iterator[Saga]:
        return iter(list(self._sagas.values()))

    def __len__(self) -> int:
        return len(self._sagas)


sagas = Registry()
"""The process-wide registry every :class:`Saga` joins unless given another."""
