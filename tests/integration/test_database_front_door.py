"""Database trouble as app code meets it (issue 12.4): one clear error, nothing written."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy.engine import make_url

import sagaq
from sagaq import DatabaseUnavailable, InputError, Runtime, SagaqError
from sagaq.notify import LogNotifier


def _count(url: str) -> int:
    plain = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(plain) as conn:
        row = conn.execute("SELECT count(*) FROM sagaq_sagas").fetchone()
        assert row is not None
        return int(row[0])


@pytest.fixture(scope="module")
def own_db(make_database, settings) -> tuple[str, Runtime]:
    """A database of this module only: terminating its backends disturbs nobody else."""
    url = make_database("stale")
    rt = Runtime(settings.with_(database_url=url, queue=f"{settings.queue}-stale"),
                 notifiers=[LogNotifier()])
    yield url, rt
    rt.close()


def test_enqueue_after_the_server_dropped_every_pooled_connection(own_db, pg_admin_url) -> None:
    url, rt = own_db
    # Fill both pools (transactions and the single-statement hot path) with live connections.
    first = [rt.engine.enqueue("order_flow", {"customer": "a@x", "amount": i}) for i in range(3)]
    dbname = make_url(url).database
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()", (dbname,)
        ).fetchone()
    assert killed is not None and killed[0] >= 1  # the pool really held connections
    # The first enqueue after a failover must not fail, nor any after it.
    after = [rt.engine.enqueue("order_flow", {"customer": "b@x", "amount": i}) for i in range(3)]
    assert len(set(first + after)) == 6
    assert rt.store.get_saga_or_raise(after[0]).name == "order_flow"


def test_an_unreachable_database_is_DatabaseUnavailable_from_enqueue(settings) -> None:
    rt = Runtime(settings.with_(database_url="postgresql://ops:hunter2@127.0.0.1:1/nowhere"),
                 notifiers=[LogNotifier()])
    try:
        with pytest.raises(DatabaseUnavailable) as caught:
            rt.engine.enqueue("order_flow", {"customer": "a@x", "amount": 1})
    finally:
        rt.close()
    assert isinstance(caught.value, SagaqError) and sagaq.DatabaseUnavailable is DatabaseUnavailable
    message = str(caught.value)
    assert "cannot reach the database at postgresql+psycopg://ops:***@127.0.0.1:1/" in message
    assert "hunter2" not in message and "\n" not in message


@pytest.mark.parametrize(
    ("payload", "key", "where"),
    [
        ({"customer": "a\x00b", "amount": 1}, None, "$['customer']"),
        ({"customer": "a@x", "amount": 1, "no\x00te": "x"}, None, "a key in $"),
        ({"customer": "a@x", "amount": 1, "lines": ["ok", "b\x00d"]}, None, "$['lines'][1]"),
        ({"customer": "a@x", "amount": 1}, "order-\x00-1", "the key"),
    ],
    ids=["value", "key-of-a-mapping", "list-item", "idempotency-key"],
)
def test_a_nul_character_is_an_input_error_and_writes_nothing(
    own_db, payload, key, where
) -> None:
    url, rt = own_db
    before = _count(url)
    with pytest.raises(InputError) as caught:
        rt.engine.enqueue("order_flow", payload, key=key)
    assert "U+0000" in str(caught.value) and where in str(caught.value)
    assert "\x00" not in str(caught.value)
    assert _count(url) == before
