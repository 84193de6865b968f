"""The store's read connections cannot write: a write there would bypass the crash points
(every commit goes through ``Database.write``) and the server refuses it."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import sqlalchemy as sa

from sagaq.store import Store
from sagaq.store.database import create_engine


def test_a_write_on_a_read_connection_is_refused_by_the_server(
    make_database: Callable[[str], str],
) -> None:
    store = Store(create_engine(make_database("pools")))
    try:
        with store.read() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM sagaq_sagas")).scalar() == 0
            with pytest.raises(sa.exc.DBAPIError, match="read-only transaction"):
                conn.execute(sa.text(
                    "INSERT INTO sagaq_events (saga_id, at, kind, message, data) "
                    "VALUES (NULL, now(), 'x', '', '{}')"))
    finally:
        store.dispose()
