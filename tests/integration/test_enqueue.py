"""Starting a saga: one transaction, published after it commits, or nothing at all (§4.2, §4.12).

The row-count tests use an engine on a database of their own, so that nothing the session
worker does for other tests can move the counts; the tests of ``session=`` use the shared
runtime and its real worker.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from sagaq import (
    DatabaseUnavailable,
    Direction,
    InputError,
    SagaState,
    StepStatus,
    UnknownSagaError,
)
from sagaq.engine import Engine
from sagaq.keys import idempotency_key
from sagaq.store import Dispatch, Store
from sagaq.store.database import check, create_engine, upgrade
from sagaq.store.models import EventModel, OutboxModel, SagaModel, StepRunModel
from tests.sagas import ledger, quad

TABLES = (SagaModel, StepRunModel, EventModel, OutboxModel)


def count_rows(engine: sa.Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            m.__tablename__: int(
                conn.execute(sa.select(sa.func.count()).select_from(m.__table__)).scalar_one()
            )
            for m in TABLES
        }


def rows(engine: sa.Engine, model: Any, saga_id: str) -> list[dict[str, Any]]:
    table = model.__table__
    with engine.connect() as conn:
        result = conn.execute(
            sa.select(table).where(table.c.saga_id == saga_id).order_by(table.c.id)
        )
        return [dict(r._mapping) for r in result]


@dataclass
class Published:
    """A publisher that records what it is given and whether the saga was visible then."""

    store: Store  # reads through its own engine, so it is not counted as the writer's
    forward: Any = None
    dispatches: list[Dispatch] = field(default_factory=list)
    visible: list[bool] = field(default_factory=list)

    def __call__(self, dispatches: Sequence[Dispatch]) -> None:
        for d in dispatches:
            self.dispatches.append(d)
            # Read from another connection: true only once the enqueue has committed.
            self.visible.append(self.store.get_saga(d.args[0]) is not None)
        if self.forward is not None:
            self.forward(dispatches)

    def for_saga(self, saga_id: str) -> list[Dispatch]:
        return [d for d in self.dispatches if d.args[0] == saga_id]


@dataclass
class Private:
    store: Store
    engine: Engine
    published: Published


@pytest.fixture(scope="module")
def private_stores(make_database) -> Iterator[tuple[Store, Store]]:
    url = make_database("enqueue")
    writer, reader = Store(create_engine(url)), Store(create_engine(url))
    yield writer, reader
    writer.dispose()
    reader.dispose()


@pytest.fixture
def private(private_stores, settings) -> Private:
    """An engine on a database of its own; its messages are recorded, not sent."""
    store, reader = private_stores
    published = Published(reader)
    return Private(store, Engine(store, settings, publish=published), published)


def writers(engine: sa.Engine, saga_id: str) -> set[str]:
    """The transactions (xmin) that wrote every row of one saga: one means atomic."""
    found: set[str] = set()
    with engine.connect() as conn:
        for table in ("sagaq_sagas", "sagaq_step_runs", "sagaq_events", "sagaq_outbox"):
            column = "id" if table == "sagaq_sagas" else "saga_id"
            found |= set(
                conn.execute(
                    sa.text(f"SELECT xmin::text FROM {table} WHERE {column} = :id"),
                    {"id": saga_id},
                ).scalars()
            )
    return found


# -- what enqueue writes --------------------------------------------------------------------


def test_enqueue_writes_saga_run_outbox_and_event_in_one_transaction(private):
    store, db = private.store, private.store.engine
    before = count_rows(db)
    saga_id = private.engine.enqueue("quad", {"n": 1, "tags": ("a", "b")})
    assert len(writers(db, saga_id)) == 1  # saga, run, events, outbox: one transaction
    after = count_rows(db)
    assert {t: after[t] - before[t] for t in after} == {
        "sagaq_sagas": 1,
        "sagaq_step_runs": 1,
        "sagaq_events": 2,
        "sagaq_outbox": 1,
    }

    saga = store.get_saga_or_raise(saga_id)
    assert (saga.name, saga.version, saga.state) == ("quad", quad.version, SagaState.PENDING)
    assert saga.input == {"n": 1, "tags": ["a", "b"]}  # stored as JSON gives it back
    assert saga.checkpoint == {"results": {}, "data": {}}
    assert saga.key is None and saga.error is None and saga.finished_at is None

    (run,) = store.step_runs(saga_id)
    assert (run.step, run.step_index, run.direction, run.attempt, run.status) == (
        "s1",
        0,
        Direction.FORWARD,
        1,
        StepStatus.SCHEDULED,
    )
    assert (run.task_name, run.compensate_task) == ("sagaq.quad.s1", "sagaq.quad.s1.compensate")
    assert run.idempotency_key == idempotency_key(saga_id, "s1")
    assert run.deliveries == 0 and run.worker is None and run.started_at is None

    (outbox,) = rows(db, OutboxModel, saga_id)
    assert outbox["step_run_id"] == run.id and outbox["args"] == [saga_id, run.id]
    assert (outbox["task_name"], outbox["message_id"]) == ("sagaq.quad.s1", run.message_id)

    events = store.events(saga_id)
    assert [(e.kind, e.step, e.step_run_id) for e in events] == [
        ("saga.enqueued", None, None),
        ("step.scheduled", "s1", run.id),
    ]
    assert events[0].data == {"version": quad.version, "key": None}
    # Everything carries the one transaction's timestamp.
    assert {saga.created_at, run.scheduled_at, outbox["created_at"], *(e.at for e in events)} == {
        saga.created_at
    }

    # Published once, after the commit, with the outbox row's message id and ids only.
    assert private.published.dispatches == [
        Dispatch("sagaq.quad.s1", (saga_id, run.id), run.message_id, 0.0)
    ]
    assert private.published.visible == [True]


def test_unknown_saga_name_raises_and_writes_nothing(private):
    db = private.store.engine
    before = count_rows(db)
    with pytest.raises(UnknownSagaError, match="no_such_saga") as err:
        private.engine.enqueue("no_such_saga", {"x": 1})
    assert "quad" in str(err.value)  # names what is known
    assert count_rows(db) == before
    assert private.published.dispatches == []


@pytest.mark.parametrize(
    "bad",
    [
        {"x": object()},
        {"x": float("nan")},
        {"x": float("inf")},
        {"x": {1, 2}},
        {"x": b"bytes"},
        {("a", "b"): 1},
    ],
    ids=["object", "nan", "inf", "set", "bytes", "tuple_key"],
)
def test_input_that_is_not_json_raises_and_writes_nothing(private, bad):
    db = private.store.engine
    before = count_rows(db)
    with pytest.raises(InputError, match="JSON") as err:
        private.engine.enqueue("quad", bad)
    assert "quad" in str(err.value)
    assert count_rows(db) == before
    assert private.published.dispatches == []


@pytest.mark.parametrize("key", ["", "k" * 256, 42], ids=["empty", "too_long", "not_a_string"])
def test_bad_key_raises_and_writes_nothing(private, key):
    db = private.store.engine
    before = count_rows(db)
    with pytest.raises(InputError, match="key"):
        private.engine.enqueue("quad", {}, key=key)
    assert count_rows(db) == before
    assert private.published.dispatches == []


def test_enqueue_with_a_key_twice_returns_the_first_saga_and_writes_nothing(private):
    db = private.store.engine
    key = f"order:{uuid.uuid4()}"
    first = private.engine.enqueue("quad", {"n": 1}, key=key)
    after_first = count_rows(db)

    again = private.engine.enqueue("quad", {"n": 2}, key=key)  # even with other input

    assert again == first
    assert count_rows(db) == after_first
    assert len(private.published.dispatches) == 1
    assert private.store.get_saga_or_raise(first).input == {"n": 1}
    assert private.store.get_saga_or_raise(first).key == key

    # The key is per saga name: another saga may use the same key.
    other = private.engine.enqueue("racer", {}, key=key)
    assert other != first and private.store.get_saga_or_raise(other).name == "racer"
    assert len(private.published.dispatches) == 2


# -- joining the caller's transaction -------------------------------------------------------


@pytest.fixture
def recorded(runtime) -> Iterator[Published]:
    """Record every dispatch the shared runtime publishes, then send it as usual."""
    original = runtime.engine.publish
    published = Published(runtime.store, forward=original)
    runtime.engine.publish = published
    try:
        yield published
    finally:
        runtime.engine.publish = original


def test_enqueue_in_a_caller_transaction_that_rolls_back_leaves_no_saga_and_no_message(
    runtime, worker, wait_settled, recorded, caplog
):
    caplog.set_level(logging.WARNING, logger="sagaq.engine")
    ids: list[str] = []
    session = Session(runtime.store.engine)
    try:
        with pytest.raises(RuntimeError, match="the caller changed its mind"), session.begin():
            ids.append(runtime.engine.enqueue("quad", {"n": 1}, session=session))
            assert runtime.store.get_saga(ids[0]) is None  # not committed yet
            raise RuntimeError("the caller changed its mind")

        # The same session commits its next transaction: only that saga exists and runs.
        with session.begin():
            ids.append(runtime.engine.enqueue("quad", {"n": 2}, session=session))
    finally:
        session.close()
    rolled_back, committed = ids

    assert runtime.store.get_saga(rolled_back) is None
    assert runtime.store.step_runs(rolled_back) == []
    assert runtime.store.events(rolled_back) == []
    assert runtime.store.count_outbox(rolled_back) == 0
    assert recorded.for_saga(rolled_back) == []

    assert wait_settled(committed) == [SagaState.COMPLETED]
    assert len(recorded.for_saga(committed)) == 4  # one message per step
    assert [c.step for c in ledger.effects(saga_id=committed)] == ["s1", "s2", "s3", "s4"]
    # Nothing ran for the rolled-back saga, and no worker saw a message naming it.
    assert [c for c in ledger.calls if c.saga_id == rolled_back] == []
    assert not [r for r in caplog.records if rolled_back in r.getMessage()]


def test_enqueue_in_a_caller_transaction_publishes_only_after_its_commit(
    runtime, worker, wait_settled, recorded
):
    session = Session(runtime.store.engine)
    try:
        with session.begin():
            saga_id = runtime.engine.enqueue("quad", {}, session=session)
            second = runtime.engine.enqueue("quad", {}, session=session)
            assert recorded.dispatches == []  # nothing leaves before the commit
            assert runtime.store.get_saga(saga_id) is None
    finally:
        session.close()

    first_messages = [d for d in recorded.dispatches if d.task_name == "sagaq.quad.s1"]
    assert [d.args[0] for d in first_messages] == [saga_id, second]
    assert recorded.visible[:2] == [True, True]  # the rows were committed when published
    assert wait_settled(saga_id, second) == [SagaState.COMPLETED] * 2
    for s in (saga_id, second):
        assert [c.step for c in ledger.effects(saga_id=s)] == ["s1", "s2", "s3", "s4"]
        assert runtime.store.get_saga_or_raise(s).state is SagaState.COMPLETED


def test_enqueue_with_a_key_in_a_caller_transaction_shares_it_and_dedups_within_it(
    runtime, recorded
):
    key = f"order:{uuid.uuid4()}"
    session = Session(runtime.store.engine)
    try:
        with session.begin():
            caller_tx = session.execute(sa.text("SELECT txid_current()::text")).scalar_one()
            first = runtime.engine.enqueue("quad", {"n": 1}, key=key, session=session)
            again = runtime.engine.enqueue("quad", {"n": 2}, key=key, session=session)
            assert again == first  # the key is seen inside the same, uncommitted transaction
            # The caller's transaction wrote every row of the saga (read before any worker
            # can touch them: nothing is published before the commit).
            written = {
                session.execute(
                    sa.text(f"SELECT xmin::text FROM {table} WHERE {column} = :id"),
                    {"id": first},
                ).scalar_one()
                for table, column in (("sagaq_sagas", "id"), ("sagaq_step_runs", "saga_id"),
                                      ("sagaq_outbox", "saga_id"))
            }
            assert written == {caller_tx}
            assert recorded.dispatches == []
    finally:
        session.close()

    assert [d.args[0] for d in recorded.dispatches if d.task_name == "sagaq.quad.s1"] == [first]
    assert runtime.store.get_saga_or_raise(first).input == {"n": 1}


def test_enqueue_in_a_savepoint_publishes_only_after_the_outer_commit(
    runtime, worker, wait_settled, recorded
):
    """Releasing a savepoint is not a commit: the row is still invisible to every worker."""
    session = Session(runtime.store.engine)
    try:
        with session.begin():
            with session.begin_nested():
                saga_id = runtime.engine.enqueue("quad", {}, session=session)
            assert runtime.store.get_saga(saga_id) is None  # not committed yet...
            assert recorded.for_saga(saga_id) == []  # ...so no message may have left
    finally:
        session.close()

    assert recorded.visible[:1] == [True]
    assert [d.task_name for d in recorded.for_saga(saga_id)][:1] == ["sagaq.quad.s1"]
    assert wait_settled(saga_id, timeout=10) == [SagaState.COMPLETED]


def test_a_rolled_back_savepoint_keeps_the_message_of_the_outer_transaction(
    runtime, worker, wait_settled, recorded
):
    """Only the savepoint's saga is undone; the one enqueued before it still starts."""
    session = Session(runtime.store.engine)
    try:
        with session.begin():
            kept = runtime.engine.enqueue("quad", {}, session=session)
            with pytest.raises(RuntimeError), session.begin_nested():
                undone = runtime.engine.enqueue("quad", {}, session=session)
                raise RuntimeError("undo the savepoint only")
    finally:
        session.close()

    assert runtime.store.get_saga(undone) is None
    assert recorded.for_saga(undone) == []
    assert runtime.store.get_saga(kept) is not None
    assert [d.task_name for d in recorded.for_saga(kept)][:1] == ["sagaq.quad.s1"]
    assert wait_settled(kept, timeout=10) == [SagaState.COMPLETED]


# -- an unreachable database ----------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["postgresql://u:secret@127.0.0.1:1/x", "postgresql+psycopg://u:secret@127.0.0.1:1/x"]
)
def test_unreachable_database_gives_one_line_without_the_password(url):
    engine = create_engine(url)
    try:
        with pytest.raises(DatabaseUnavailable) as err:
            check(engine)
    finally:
        engine.dispose()
    message = str(err.value)
    assert "secret" not in message
    assert "\n" not in message
    assert "u:***@127.0.0.1:1/x" in message
    assert message.startswith("cannot reach the database at ")


def test_upgrade_of_an_unreachable_database_says_so_without_the_password():
    with pytest.raises(DatabaseUnavailable) as err:
        upgrade("postgresql://u:secret@127.0.0.1:1/x")
    assert "secret" not in str(err.value) and "127.0.0.1:1/x" in str(err.value)
