"""The store's connection to PostgreSQL: the clock, the retry, and the one place that commits.

Every operation of the store is a function over a :class:`Database`. Each write is one
transaction (or one autocommit statement) opened by :meth:`Database.write`, which is also the
crash-point hook (:mod:`sagaq.store.faults`): no other code in ``sagaq/`` begins or commits.

A state change is a guarded UPDATE (``WHERE state = :expected``) that reports whether it won;
a loser raises :class:`Lost`, which rolls its whole transaction back. Whatever should run
next (a step run, a notification) is written with its outbox row in the same transaction and
handed back as a :class:`~sagaq.store.records.Dispatch`, to publish after the commit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.orm import Session

from sagaq.kinds import Kind
from sagaq.store.database import autocommit_engine
from sagaq.store.faults import FaultHook, Phase, Write, no_faults
from sagaq.store.models import SAGAS, UTCDateTime
from sagaq.store.records import Gatekeeper, Outcome, SagaRecord
from sagaq.store.timeline import Timeline, saga_record

T = TypeVar("T")

Channels = Mapping[Kind, tuple[str, ...]]
"""Which notification channels receive which kind of notice."""


def utcnow() -> datetime:
    return datetime.now(UTC)


class Lost(Exception):
    """A guard did not match: roll the transaction back and report ``won=False``."""

    def __init__(self, note: str) -> None:
        super().__init__(note)
        self.note = note


class Database:
    """Pools, clock and configuration that every store operation reads."""

    def __init__(
        self,
        engine: sa.Engine,
        *,
        clock: Callable[[], datetime] | None = None,
        channels: Channels | None = None,
        gate: Gatekeeper | None = None,
        approval_deadline: float = 86400.0,
    ) -> None:
        self.engine = engine
        # Leases and deadlines are compared with the database's clock, never a host's: a
        # worker whose clock is ahead must not expire another's lease. A test may set a clock
        # of its own (to move time past every lease); it then rules everywhere.
        self.clock = clock or utcnow
        self.fixed_clock = clock is not None
        self.fault: FaultHook = no_faults  # the crash-point hook (see sagaq.store.faults)
        self.channels: Channels = channels or {Kind.PAGE: ("log",), Kind.NOTIFY: ("log",)}
        self.gate = gate  # the policy gate before every dispatch; None: allow everything
        self.approval_deadline = approval_deadline
        # One-statement writes run in autocommit on a pool of their own (switching a pooled
        # connection in and out of autocommit costs round trips).
        self.autocommit = autocommit_engine(engine)
        # Reads need no transaction either, and may not write: the server refuses it.
        self.reads = autocommit_engine(engine, read_only=True)

    def dispose(self, *, close: bool = True) -> None:
        """Forget pooled connections; ``close=False`` after a fork (the parent owns them)."""
        for engine in (self.engine, self.autocommit, self.reads):
            engine.dispose(close=close)

    @property
    def gated(self) -> bool:
        return self.gate is not None and self.gate.active

    # -- clocks ---------------------------------------------------------------------------

    def db_now(self) -> Any:
        """``now()`` as SQL: the database's clock, or the test's clock when one is set."""
        if self.fixed_clock:
            return sa.literal(self.clock(), UTCDateTime())
        return sa.func.now()

    def db_in(self, seconds: float) -> Any:
        """``now() + seconds`` as SQL, on the same clock as :meth:`db_now`."""
        if self.fixed_clock:
            return sa.literal(self.clock() + timedelta(seconds=seconds), UTCDateTime())
        return sa.func.now() + sa.func.make_interval(0, 0, 0, 0, 0, 0, sa.literal(float(seconds)))

    # -- the one place that commits -------------------------------------------------------

    @contextmanager
    def write(
        self, name: Write, *, session: Session | None = None, autocommit: bool = False
    ) -> Iterator[sa.Connection]:
        """Open the write ``name``; leaving the block commits it. Every crash point is here.

        ``before``: the statements ran, the commit has not (raising rolls them back; on an
        autocommit connection it is before the one statement); ``after``: committed.
        With ``session``, the caller's transaction: the caller commits, or not.
        """
        if session is not None:
            yield session.connection()
            self.fault(name, Phase.BEFORE)
            return
        if autocommit:
            with self.autocommit.connect() as conn:
                self.fault(name, Phase.BEFORE)
                yield conn
        else:
            with self.engine.begin() as conn:
                yield conn
                self.fault(name, Phase.BEFORE)
        self.fault(name, Phase.AFTER)

    @contextmanager
    def read(self) -> Iterator[sa.Connection]:
        """A connection for reads: read-only, so it needs no crash point."""
        with self.reads.connect() as conn:
            yield conn

    def retrying(self, op: Callable[[], T], attempts: int = 4) -> T:
        """Run ``op`` again after a deadlock, a serialization failure or a dropped connection.

        Every operation is one transaction of guarded writes, so running it again is safe: if
        the first try did commit, the guards make the second a no-op that reports it lost.
        """
        for attempt in range(1, attempts + 1):
            try:
                return op()
            except sa.exc.DBAPIError as exc:
                code = getattr(exc.orig, "sqlstate", None)
                again = exc.connection_invalidated or code in ("40P01", "40001")
                if attempt == attempts or not again:
                    raise
                time.sleep(0.01 * 2**attempt)
        raise AssertionError("unreachable")

    def on_saga(
        self,
        name: Write,
        saga_id: str,
        op: Callable[[sa.Connection, SagaRecord, Timeline], list[Any]],
        worker: str | None = None,
        task_id: str | None = None,
        **saga_values: Any,
    ) -> Outcome:
        """Run ``op`` in one transaction holding the saga row's lock, always taken first.

        ``saga_values`` are written with the lock (a checkpoint): if ``op`` loses its guard,
        the whole transaction rolls back and they with it.
        """

        def attempt() -> Outcome:
            now = self.clock()
            try:
                with self.write(name) as conn:
                    row = conn.execute(
                        sa.update(SAGAS)
                        .where(SAGAS.c.id == saga_id)
                        .values(updated_at=now, **saga_values)
                        .returning(*SAGAS.c)
                    ).first()
                    if row is None:
                        raise Lost(f"saga {saga_id} does not exist")
                    tl = Timeline(saga_id, now, worker=worker, task_id=task_id)
                    saga = saga_record(row)
                    dispatches = op(conn, saga, tl)
                    tl.flush(conn)
            except Lost as lost:
                return Outcome(False, note=lost.note)
            return Outcome(True, tl.entered or saga.state, dispatches, entered=tl.entered)

        return self.retrying(attempt)
