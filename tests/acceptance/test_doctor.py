"""`sagaq doctor` (DESIGN §4.13): the sagas without a way forward, listed; the reconciler
gives them their way back.

A saga is stranded by hand (its scheduled run's outbox row deleted, its message never
consumed): doctor lists it with the reason and exits 1; one `sagaq reconcile --once` later
the row is written again and published, doctor exits 0, and a worker completes the saga.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import sqlalchemy as sa

from sagaq import Runtime, SagaState, Settings
from sagaq.notify import LogNotifier
from sagaq.store.models import OUTBOX
from sagaq.worker import embedded_worker
from tests.acceptance.test_cli import cli, env_for


def test_doctor_lists_a_stranded_saga_and_one_reconciler_pass_sets_it_moving(
    settings: Settings, make_database: Callable[[str], str]
) -> None:
    own = settings.with_(database_url=make_database("doctor"), queue=f"{settings.queue}-dr")
    env = {**env_for(own), "COLUMNS": "200"}
    rt = Runtime(own, notifiers=[LogNotifier()])
    try:
        healthy = cli("doctor", env=env)
        assert healthy.returncode == 0, healthy.stderr
        assert "every saga that is not finished has a way forward" in healthy.stdout

        saga_id = rt.engine.enqueue("quad", {})  # nobody consumes this queue yet
        with rt.store.engine.begin() as conn:  # stranded by hand: its message is lost too
            assert conn.execute(sa.delete(OUTBOX).where(OUTBOX.c.saga_id == saga_id)).rowcount
        listed = cli("doctor", env=env)
        assert listed.returncode == 1, (listed.stdout, listed.stderr)
        assert saga_id in listed.stdout
        assert "its message is lost (no outbox row)" in listed.stdout
        found = json.loads(cli("doctor", "--json", env=env).stdout)
        assert [(s["saga_id"], s["state"]) for s in found] == [(saga_id, "pending")]

        done = cli("reconcile", "--once", env=env)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["repaired"] == 1
        again = cli("doctor", env=env)
        assert again.returncode == 0, (again.stdout, again.stderr)
        assert [e.kind for e in rt.store.events(saga_id)][-1] == "saga.repaired"

        with embedded_worker(rt.app, concurrency=2):
            deadline = time.monotonic() + 30
            while rt.store.get_saga_or_raise(saga_id).state is not SagaState.COMPLETED:
                assert time.monotonic() < deadline, rt.store.get_saga_or_raise(saga_id)
                time.sleep(0.05)
    finally:
        rt.close()
