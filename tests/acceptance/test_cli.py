"""The front door: `sagaq demo`, the operator commands, and workers started as a user would."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from sagaq import Runtime, SagaState, Settings
from sagaq.store.database import create_engine, current_revision
from tests.unit.test_migrations import LATEST

ROOT = Path(__file__).resolve().parents[2]
SAGAQ = [sys.executable, "-m", "sagaq"]


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SAGAQ, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def env_for(settings: Settings) -> dict[str, str]:
    return {
        "SAGAQ_DATABASE_URL": settings.database_url,
        "SAGAQ_BROKER_URL": settings.broker_url,
        "SAGAQ_REDIS_PREFIX": settings.redis_prefix,
        "SAGAQ_QUEUE": settings.queue,
        "SAGAQ_IMPORTS": ",".join(settings.imports),
        "SAGAQ_RETRY_BASE": "0.02",
        "SAGAQ_RETRY_CAP": "0.1",
        "SAGAQ_STEP_TIMEOUT": "20",
        "SAGAQ_LEASE_MARGIN": "2",
        "SAGAQ_VISIBILITY_TIMEOUT": "120",
        "SAGAQ_SECRET_KEY": settings.secret_key,
    }


# -- the embedded demo -----------------------------------------------------------------------


def test_demo_json_reports_each_saga_with_its_story() -> None:
    done = cli("demo", "--json")
    assert done.returncode == 0, done.stderr
    sagas = json.loads(done.stdout)
    assert [(s["name"], s["state"]) for s in sagas] == [
        ("provision_agent", "completed"),
        ("order_flow", "completed"),
        ("ticket_triage", "completed"),
        ("provision_agent", "compensated"),
        ("subscription", "needs_human"),
        ("offboard_agent", "completed"),
        ("offboard_agent", "compensated"),
        ("provision_agent", "needs_human"),
    ]
    assert {"id", "name", "state", "succeeded", "compensated", "rungs", "pages"} <= set(sagas[0])
    ok, flaky, model, undone, pivot, approved, denied, stuck = sagas
    steps = ["create_identity", "assign_roles", "allocate_runtime", "inject_credentials"]
    assert ok["succeeded"] == steps and ok["compensated"] == [] and ok["rungs"] == []
    # the invoice API timed out twice: rung 0, twice, then it answered
    assert flaky["succeeded"] == ["create_crm_record", "create_invoice", "notify_customer"]
    assert flaky["rungs"] == [0, 0] and flaky["pages"] == 0
    # prose from the small model: re-prompted (rung 1), then the large tier (rung 2)
    assert model["rungs"] == [1, 2] and model["pages"] == 0
    # failed for good at the last step: 1 and 2 do not apply, 3 undoes the rest, LIFO
    assert undone["succeeded"] == steps[:3]
    assert undone["compensated"] == ["allocate_runtime", "assign_roles", "create_identity"]
    assert undone["rungs"] == [1, 2, 3] and undone["pages"] == 0
    # after the pivot: rung 0 spent, 1-3 do not apply, 4 pages; nothing is undone
    assert pivot["compensated"] == [] and pivot["pages"] == 1
    assert pivot["rungs"] == [0, 0, 0, 1, 2, 3, 4]
    assert pivot["succeeded"] == ["reserve_seat", "charge_card"]
    # the undo of assign_roles keeps failing: it stops there and pages, once
    assert stuck["compensated"] == ["allocate_runtime"]
    assert stuck["rungs"] == [1, 2, 3, 4] and stuck["pages"] == 1
    assert "assign_roles" in stuck["error"]
    # the policy asks a human before the workspace is deleted: yes completes it, no rolls
    # back what came before (LIFO), and the delete never ran
    assert approved["succeeded"] == ["revoke_keys", "snapshot_data", "delete_workspace"]
    assert denied["succeeded"] == ["revoke_keys", "snapshot_data"]
    assert denied["compensated"] == ["snapshot_data", "revoke_keys"]
    assert len({s["id"] for s in sagas}) == 8


def test_demo_prints_each_timeline() -> None:
    done = cli("demo", env={"COLUMNS": "160"})
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for marker in (
        "saga.completed",
        "rollback.plan",
        "compensation.succeeded",
        "saga.needs_human",
        "step.failed",
        "ladder.rung",
        "re-prompt",
        "switch tier",
        "page.sent",
    ):
        assert marker in out, marker
    assert "PAGE trigger" in done.stderr  # the log notifier's page, one per incident
    assert "UNEXPECTED" not in out


def test_piped_output_is_120_columns_wide_unless_columns_says_otherwise() -> None:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    piped = subprocess.run([*SAGAQ, "demo"], capture_output=True, text=True, timeout=120,
                           cwd=ROOT, env=env)
    assert piped.returncode == 0, piped.stderr
    widths = {len(line) for line in piped.stdout.splitlines()}
    assert max(widths) == 120
    # The timeline reads on one line per event at that width.
    assert any("step.claimed" in line and "attempt 1, delivery 1" in line
               for line in piped.stdout.splitlines())
    narrow = cli("demo", env={"COLUMNS": "90"})
    assert narrow.returncode == 0, narrow.stderr
    assert max(len(line) for line in narrow.stdout.splitlines()) <= 90
    # Narrow, every step run still shows whole: id, step, status, worker and task id ...
    run_line = re.compile(
        r"│\s+\d+\s+inject_credentials\s+→\s+1\s+failed\s+\S+/\d+\s+[0-9a-f]{8}\s"
    )
    assert any(run_line.search(line) for line in narrow.stdout.splitlines()), narrow.stdout
    # ... and the errors move under the table.
    assert re.search(r"#\d+ inject_credentials: TerminalError: inject_credentials", narrow.stdout)


# -- operator commands on the test database --------------------------------------------------


def test_ls_show_and_enqueue(runtime, worker, settings, wait_settled) -> None:
    env = env_for(settings)
    made = cli(
        "enqueue", "order_flow", '{"customer": "c@x", "amount": 3}', "--key", "cli-1", env=env
    )
    assert made.returncode == 0, made.stderr
    saga_id = made.stdout.strip()
    assert wait_settled(saga_id) == [SagaState.COMPLETED]
    again = cli(
        "enqueue", "order_flow", '{"customer": "c@x", "amount": 3}', "--key", "cli-1", env=env
    )
    assert again.stdout.strip() == saga_id  # the key makes enqueueing idempotent

    listed = cli("ls", "--json", "--name", "order_flow", "--state", "completed", env=env)
    assert listed.returncode == 0, listed.stderr
    assert saga_id in [s["id"] for s in json.loads(listed.stdout)]

    shown = cli("show", saga_id[:8], "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    story = json.loads(shown.stdout)
    assert story["saga"]["id"] == saga_id and story["saga"]["state"] == "completed"
    assert story["succeeded"] == ["create_crm_record", "create_invoice", "notify_customer"]
    kinds = [e["kind"] for e in story["events"]]
    assert kinds[0] == "saga.enqueued" and kinds[-1] == "saga.completed"
    claimed = [e for e in story["events"] if e["kind"] == "step.claimed"]
    assert len(claimed) == 3 and all(e["worker"] and e["task_id"] for e in claimed)
    assert all(r["task_id"] and r["worker"] for r in story["step_runs"])

    text = cli("show", saga_id, env={**env, "COLUMNS": "160"})
    assert text.returncode == 0 and "step.claimed" in text.stdout and "completed" in text.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("enqueue", "no_such_saga", "{}"), "no saga named 'no_such_saga'"),
        (("enqueue", "order_flow", "{not json"), "input is not valid JSON"),
        (("show", "ffffffff-0000"), "no saga with id"),
        (("ls", "--state", "exploded"), "unknown state 'exploded'"),
    ],
)
def test_bad_input_is_one_clear_line_and_writes_nothing(settings, args, message) -> None:
    engine = create_engine(settings.database_url)
    with engine.connect() as conn:
        before = conn.exec_driver_sql("SELECT count(*) FROM sagaq_sagas").scalar_one()
    done = cli(*args, env=env_for(settings))
    assert done.returncode == 1
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM sagaq_sagas").scalar_one() == before
    engine.dispose()


def test_unreachable_database_is_named_in_one_line() -> None:
    done = cli("--database-url", "postgresql://ops:hunter2@127.0.0.1:1/nowhere", "ls")
    assert done.returncode == 1
    assert (
        "cannot reach the database at postgresql+psycopg://ops:***@127.0.0.1:1/nowhere"
        in done.stderr
    )
    assert "hunter2" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_worker_refuses_the_in_process_broker() -> None:
    done = cli("--broker-url", "memory://", "worker")
    assert done.returncode == 1
    assert "only works inside one process" in done.stderr


def test_db_upgrade_and_current(pg_admin_url) -> None:
    from sqlalchemy.engine import make_url

    name = f"sagaq_test_upgrade_{os.getpid()}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(pg_admin_url).set(database=name).render_as_string(hide_password=False)
    try:
        up = cli("--database-url", url, "db", "upgrade")
        assert up.returncode == 0, up.stderr
        engine = create_engine(url)
        assert current_revision(engine) == LATEST
        engine.dispose()
        now = cli("--database-url", url, "db", "current")
        assert now.stdout.strip() == LATEST
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_help_reads_well() -> None:
    done = cli("--help")
    assert done.returncode == 0
    for command in ("demo", "worker", "db", "ls", "show", "enqueue", "diagram"):
        assert f"  {command} " in done.stdout


# -- workers started the way a user starts them ----------------------------------------------


@pytest.fixture
def own_queue(settings) -> Iterator[tuple[Settings, Runtime]]:
    """A queue no in-process worker of this run consumes: only the subprocess runs steps."""
    mine = settings.with_(queue=f"{settings.queue}-sub")
    rt = Runtime(mine)
    yield mine, rt
    rt.close()


@pytest.fixture
def subprocess_worker(own_queue) -> Iterator[callable]:
    settings, _ = own_queue
    procs: list[subprocess.Popen[str]] = []

    def start(argv: list[str], hostname: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [*argv, "--hostname", hostname],
            cwd=ROOT,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env_for(settings)},
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.parametrize(
    "argv",
    [
        [*SAGAQ, "worker", "--pool", "prefork", "--concurrency", "2", "--loglevel", "WARNING"],
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "sagaq",
            "worker",
            "--pool",
            "prefork",
            "--concurrency",
            "2",
            "--loglevel",
            "WARNING",
            "-Q",
            "{queue}",
        ],
    ],
    ids=["sagaq-worker", "celery-A-sagaq"],
)
def test_a_subprocess_worker_runs_and_compensates(own_queue, subprocess_worker, argv) -> None:
    settings, runtime = own_queue
    host = f"sub-{argv[2]}-{os.getpid()}@test"
    subprocess_worker([a.replace("{queue}", settings.queue) for a in argv], host)
    ok = runtime.engine.enqueue("provision_agent", {"agent": "sub-1"})
    bad = runtime.engine.enqueue(
        "provision_agent", {"agent": "sub-2", "simulate": {"fail": "allocate_runtime"}}
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        states = [runtime.store.get_saga_or_raise(i).state for i in (ok, bad)]
        if states == [SagaState.COMPLETED, SagaState.COMPENSATED]:
            break
        time.sleep(0.1)
    assert states == [SagaState.COMPLETED, SagaState.COMPENSATED]
    runs = runtime.store.step_runs(bad)
    assert [(r.step, r.direction.value) for r in runs if r.status.value == "succeeded"] == [
        ("create_identity", "forward"),
        ("assign_roles", "forward"),
        ("assign_roles", "compensate"),
        ("create_identity", "compensate"),
    ]
    workers = {r.worker for r in runtime.store.step_runs(ok)}
    assert workers and all(w.startswith(host) for w in workers), workers
