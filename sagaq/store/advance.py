"""The two transitions most sagas are made of, as one statement each: a saga starts with its
first step dispatched; a forward step succeeds while its saga runs, and the next step is
dispatched (or the saga completes).

Each is one round trip and one commit, in plain SQL: the guards are in the statement (the
saga row locked first; the run ``running`` under this attempt's token, not yet resolved, a
forward run; the saga ``running``), and when one does not hold nothing is written. The policy
gate's verdict on the dispatched step is taken before, and its event goes in with the others.

These transitions are written here only. Every other outcome takes the transactional way
(:mod:`sagaq.store.results`, :func:`sagaq.store.sagas.create_saga`): a compensation, a success
while the saga rolls back, a step that must wait (a delay, an approval, a denial), a key that
is taken; when this statement's guard does not hold, that way finds out why (a zombie loses).
"""

from __future__ import annotations

import uuid
from typing import Any

import sqlalchemy as sa
from psycopg.types.json import Jsonb

from sagaq.machine import SagaState, next_state
from sagaq.store.db import Database
from sagaq.store.dispatch import NEXT_RUN, gate_verdict, run_params
from sagaq.store.faults import Write
from sagaq.store.records import Dispatch, NewRun, Outcome
from sagaq.store.sql import execute
from sagaq.store.timeline import Timeline, as_jsonb

EVENT_ROWS = (
    "jsonb_to_recordset(%(events)s) AS t(saga_id varchar, at timestamptz, kind varchar, "
    "step varchar, step_run_id bigint, worker varchar, task_id varchar, message text, "
    "data jsonb)"
)
EVENT_COLUMNS = "saga_id, at, kind, step, step_run_id, worker, task_id, message, data"

SCHEDULED_EVENT = """
  UNION ALL SELECT saga_id, %(now)s, 'step.scheduled', %(step)s, id, %(worker)s,
    %(task_id)s, %(reason)s, jsonb_build_object('attempt', %(attempt)s::int, 'delay', 0.0,
    'level', %(level)s::int, 'tier', %(tier)s::text) FROM nxt"""

ENQUEUE = f"""
WITH saga AS (
  INSERT INTO sagaq_sagas (id, name, version, state, key, input, checkpoint, created_at,
    updated_at, incident)
  VALUES (%(saga_id)s, %(name)s, %(version)s, 'pending', %(key)s, %(input)s,
    '{{"results": {{}}, "data": {{}}}}', %(now)s, %(now)s, 0)
  ON CONFLICT (name, key) DO NOTHING
  RETURNING id AS saga_id
), {NEXT_RUN.format(source="saga").strip()}, events AS (
  INSERT INTO sagaq_events ({EVENT_COLUMNS})
  SELECT t.* FROM {EVENT_ROWS} WHERE EXISTS (SELECT 1 FROM saga){SCHEDULED_EVENT}
)
SELECT (SELECT id FROM nxt)"""

_ADVANCE = """
WITH lock AS (
  SELECT id, state FROM sagaq_sagas WHERE id = %(saga_id)s FOR UPDATE
), done AS (
  UPDATE sagaq_step_runs SET status = 'succeeded', result = %(result)s,
    finished_at = %(now)s, lease_expires_at = NULL
  WHERE id = %(run_id)s AND status = 'running' AND deliveries = %(token)s
    AND finished_at IS NULL AND direction = 'forward'
    AND EXISTS (SELECT 1 FROM lock WHERE state = 'running')
  RETURNING id, saga_id, step, attempt
), saga AS (
  UPDATE sagaq_sagas SET checkpoint = %(checkpoint)s, updated_at = %(now)s{finish}
  WHERE id = %(saga_id)s AND EXISTS (SELECT 1 FROM done)
  RETURNING id
), gone AS (
  DELETE FROM sagaq_outbox WHERE step_run_id IN (SELECT id FROM done)
){next_run}, events AS (
  INSERT INTO sagaq_events ({columns})
  SELECT saga_id, %(now)s, 'step.succeeded', step, id, %(worker)s, %(task_id)s, '',
    jsonb_build_object('attempt', attempt) FROM done
  UNION ALL SELECT t.* FROM {rows} WHERE EXISTS (SELECT 1 FROM done){next_event}
)
SELECT (SELECT state FROM lock), (SELECT id FROM done), {next_id}"""

ADVANCE = _ADVANCE.format(finish="", next_run=", " + NEXT_RUN.format(source="done").strip(),
                          columns=EVENT_COLUMNS, rows=EVENT_ROWS, next_event=SCHEDULED_EVENT,
                          next_id="(SELECT id FROM nxt)")
FINISH = _ADVANCE.format(
    finish=", state = %(finished_state)s, finished_at = %(now)s, wake_at = NULL",
    next_run="", columns=EVENT_COLUMNS, rows=EVENT_ROWS, next_event="", next_id="NULL")


def dispatchable(db: Database, name: str, saga_id: str, new: NewRun, tl: Timeline) -> bool:
    """Whether ``new`` goes out now: no delay, and the gate (if any) allows it."""
    if new.delay > 0:
        return False  # a backoff or a durable wait: the transactional way
    if not db.gated:
        return True
    with db.read() as conn:
        verdict = gate_verdict(db, conn, name, saga_id, new, tl)
    return bool(verdict.decision.value == "allow")  # parked or denied: asked again there


def start(
    db: Database, conn: sa.Connection, *, saga_id: str, name: str, version: str, input: Any,
    key: str | None, first: NewRun, tl: Timeline,
) -> list[Dispatch] | None:
    """Write the saga with its first run dispatched (:func:`dispatchable` said it goes out now)
    on ``conn``, the caller's write; None when the key is taken (nothing was written)."""
    message_id = str(uuid.uuid4())
    run_id = execute(conn, ENQUEUE, {
        "saga_id": saga_id, "name": name, "version": version, "key": key,
        "input": Jsonb(input), "now": tl.now, "worker": None, "task_id": None,
        "events": as_jsonb(tl.rows), **run_params(first, message_id),
    }).fetchone()[0]
    if run_id is None:
        return None
    return [Dispatch(first.task_name, (saga_id, run_id), message_id, 0.0)]


def advance(
    db: Database, saga_id: str, run_id: int, *, name: str, token: int, result: Any,
    checkpoint: dict[str, Any], new: NewRun | None, worker: str | None, task_id: str | None,
) -> Outcome | None:
    """Record the success and dispatch ``new`` (or complete the saga); None when this
    transition does not apply (nothing was written): the transactional way decides."""
    tl = Timeline(saga_id, db.clock(), worker=worker, task_id=task_id)
    if new is not None and not dispatchable(db, name, saga_id, new, tl):
        return None
    params: dict[str, Any] = {
        "saga_id": saga_id, "run_id": run_id, "token": token, "result": Jsonb(result),
        "checkpoint": Jsonb(checkpoint), "now": tl.now, "worker": worker, "task_id": task_id,
    }
    message_id = str(uuid.uuid4())
    finished = next_state(name, SagaState.RUNNING, "finish") if new is None else None
    if finished is not None:
        tl.add(f"saga.{finished.value}", message=f"running → {finished.value}",
               data={"from": "running", "to": finished.value, "trigger": "finish"})
        params["finished_state"] = finished.value
    else:
        assert new is not None
        params.update(run_params(new, message_id))
    params["events"] = as_jsonb(tl.rows)

    def attempt() -> Any:
        with db.write(Write.SUCCEED, autocommit=True) as conn:
            return execute(conn, FINISH if new is None else ADVANCE, params).fetchone()

    state, done, nxt = db.retrying(attempt)
    if done is None and state == SagaState.RUNNING.value:
        # The saga runs, so the run's own guard lost: its attempt was taken over (a zombie),
        # or its outcome is recorded already. Nothing was written; nothing more to do.
        return Outcome(False, note=f"run {run_id} is no longer running under delivery {token}")
    if done is None:
        return None  # the saga moved on (a rollback, an operator): results decides
    if finished is not None:
        return Outcome(True, finished, [], entered=finished)
    assert new is not None
    return Outcome(True, SagaState.RUNNING,
                   [Dispatch(new.task_name, (saga_id, nxt), message_id, 0.0)])
