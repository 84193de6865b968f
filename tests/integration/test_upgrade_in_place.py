"""A database made by the old head (migration 0004) upgrades in place, with sagas in flight.

The sagas are written at 0004, before any worker runs; the schema is then upgraded to the
head under them, and a worker of today's code takes them to their ends: one completes, one
rolls back in reverse order. Nothing is left without a way forward.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from alembic.script import ScriptDirectory
from sqlalchemy.engine import make_url

from sagaq import SagaState
from sagaq.notify.log import LogNotifier
from sagaq.runtime import Runtime
from sagaq.settings import Settings
from sagaq.store.database import alembic_config, current_revision, upgrade
from sagaq.worker import embedded_worker
from tests.sagas import ledger

OLD_HEAD = "0004"


@pytest.fixture
def old_database(pg_admin_url: str) -> Iterator[str]:
    name = f"sagaq_test_upgrade_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(pg_admin_url).set(drivername="postgresql+psycopg", database=name)
    rendered = url.render_as_string(hide_password=False)
    upgrade(rendered, OLD_HEAD)
    yield rendered
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_sagas_written_at_the_old_head_finish_after_an_upgrade_in_place(
    old_database: str, settings: Settings
) -> None:
    rt = Runtime(settings.with_(database_url=old_database, queue=f"upgrade-{uuid.uuid4().hex}"),
                 notifiers=[LogNotifier()])
    try:
        assert current_revision(rt.store.engine) == OLD_HEAD
        happy = rt.engine.enqueue("quad", {})
        failing = rt.engine.enqueue("quad", {"simulate": {"fail": "s3"}})
        assert rt.store.get_saga_or_raise(happy).state is SagaState.PENDING

        upgrade(old_database)  # in place, under the sagas
        head = ScriptDirectory.from_config(alembic_config(old_database)).get_current_head()
        assert head != OLD_HEAD and current_revision(rt.store.engine) == head

        with embedded_worker(rt.app, concurrency=2, hostname="upgrade@test"):
            states = _settle(rt, happy, failing)
        assert states == [SagaState.COMPLETED, SagaState.COMPENSATED]
        undo = [c.step for c in ledger.effects(saga_id=failing, op="undo")]
        assert undo == ["s2", "s1"]
        assert [c.step for c in ledger.effects(saga_id=happy, op="do")] == ["s1", "s2", "s3",
                                                                             "s4"]
        assert rt.store.stranded() == []
    finally:
        rt.close()


def _settle(rt: Runtime, *saga_ids: str, timeout: float = 60.0) -> list[SagaState]:
    settled = {SagaState.COMPLETED, SagaState.COMPENSATED, SagaState.NEEDS_HUMAN}
    deadline = time.monotonic() + timeout
    while True:
        states = [rt.store.get_saga_or_raise(i).state for i in saga_ids]
        if all(s in settled for s in states) or time.monotonic() > deadline:
            return states
        time.sleep(0.05)
