"""The first hour of a new user (issue 12): every stumble, each pinned as a user meets it.

Commands run as subprocesses (`python -m sagaq`, the `sagaq` console script, `celery -A
sagaq`) against this run's real PostgreSQL and Redis.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from sagaq import SagaState
from tests.acceptance.test_cli import ROOT, SAGAQ, cli, env_for
from tests.unit.test_migrations import LATEST

SAGAQ_SCRIPT = str(Path(sys.executable).with_name("sagaq"))
CELERY = [sys.executable, "-m", "celery", "-A", "sagaq"]


def run(argv: list[str], *, env: dict[str, str] | None = None, cwd: Path = ROOT,
        timeout: float = 90, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, **(env or {})}, input=stdin)


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    """The command failed with exactly one line on stderr, and no traceback."""
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


# -- 1. no secret key: workers and beat refuse to start --------------------------------------


@pytest.mark.parametrize(
    "argv",
    [[*SAGAQ, "worker"], [*SAGAQ, "beat"], [*CELERY, "worker"], [*CELERY, "beat"]],
    ids=["sagaq-worker", "sagaq-beat", "celery-worker", "celery-beat"],
)
def test_workers_and_beat_refuse_to_start_without_a_secret_key(settings, argv) -> None:
    env = {**env_for(settings), "SAGAQ_SECRET_KEY": ""}
    done = run([*argv, "--loglevel", "WARNING"], env=env, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert ("Error: SAGAQ_SECRET_KEY is not set" in done.stderr
            and "`sagaq keygen`" in done.stderr), done.stderr


# -- 2. the console script imports the user's modules from the current directory -------------


def test_the_sagaq_command_imports_saga_modules_from_the_current_directory(
    settings, tmp_path
) -> None:
    app = tmp_path / "myapp"
    app.mkdir()
    (app / "__init__.py").write_text("")
    (app / "sagas.py").write_text(
        "from sagaq import Saga\n"
        "mine = Saga('from_cwd')\n"
        "@mine.step(side_effect=False)\n"
        "def look(ctx, inp):\n"
        "    return {}\n"
    )
    env = {**env_for(settings), "SAGAQ_IMPORTS": "myapp.sagas", "PYTHONPATH": ""}
    done = run([SAGAQ_SCRIPT, "policy", "explain", "from_cwd", "look", "--json"], env=env,
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["facts"]["saga"] == "from_cwd"


# -- 3. no top-level `tasks` in the wheel; the demo runs beside a user's own tasks.py ---------


def test_the_wheel_has_no_top_level_tasks_and_every_sagaq_package(tmp_path) -> None:
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                 "-q", ".", "-w", str(tmp_path)], timeout=240)
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("sagaq-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"sagaq"}, tops
    assert not any(n.startswith("tasks/") for n in names)
    # Every package of the source tree is in it (the list in pyproject.toml is explicit).
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "sagaq").rglob("*.py")
               if "__pycache__" not in p.parts}
    assert sources <= set(names), sorted(sources - set(names))
    examples = {f"sagaq/examples/{p.name}" for p in (ROOT / "tasks").iterdir()
                if p.suffix in (".py", ".yaml")}
    assert examples <= set(names), sorted(examples - set(names))


def test_the_demo_runs_beside_a_users_own_tasks_py(tmp_path) -> None:
    (tmp_path / "tasks.py").write_text("raise SystemExit('the user tasks.py was imported')\n")
    done = run([*SAGAQ, "demo", "--json"], cwd=tmp_path, timeout=120,
               env={"PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)) == 8


# -- 4. database trouble: one line each ------------------------------------------------------


@pytest.fixture(scope="module")
def empty_database(pg_admin_url) -> Iterator[str]:
    """A database without sagaq's tables (before `sagaq db upgrade`)."""
    name = f"sagaq_test_empty_{os.getpid()}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    yield make_url(pg_admin_url).set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.parametrize(
    "args",
    [("ls",), ("enqueue", "order_flow", "{}"), ("show", "abcd1234"), ("approvals",),
     ("reconcile",), ("retry", "abcd1234")],
    ids=lambda a: a[0],
)
def test_before_db_upgrade_each_command_says_so_in_one_line(settings, empty_database,
                                                          args) -> None:
    env = {**env_for(settings), "SAGAQ_DATABASE_URL": empty_database}
    line = one_line(cli(*args, env=env))
    assert line.endswith("has no sagaq schema: run `sagaq db upgrade`"), line


@pytest.mark.parametrize(
    "argv", [[*SAGAQ, "worker"], [*CELERY, "worker"], [*SAGAQ, "beat"]],
    ids=["sagaq-worker", "celery-worker", "sagaq-beat"],
)
def test_a_worker_refuses_an_unmigrated_schema(settings, empty_database, argv) -> None:
    env = {**env_for(settings), "SAGAQ_DATABASE_URL": empty_database}
    done = run([*argv, "--loglevel", "WARNING"], env=env, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "has no sagaq schema: run `sagaq db upgrade`" in done.stderr


def test_a_worker_refuses_an_outdated_schema(settings, pg_admin_url) -> None:
    name = f"sagaq_test_old_{os.getpid()}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(pg_admin_url).set(database=name).render_as_string(hide_password=False)
    previous = f"{int(LATEST) - 1:04d}"
    try:
        assert cli("--database-url", url, "db", "upgrade", previous).returncode == 0
        env = {**env_for(settings), "SAGAQ_DATABASE_URL": url}
        done = run([*SAGAQ, "worker", "--loglevel", "WARNING"], env=env, timeout=60)
        line = one_line(done)
        assert f"is at schema revision {previous}, this sagaq needs {LATEST}" in line
        assert line.endswith("run `sagaq db upgrade`")
        assert f"needs {LATEST}: run `sagaq db upgrade`" in one_line(cli("ls", env=env))
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.parametrize(
    ("url", "said"),
    [("not a url", "is not a URL"),
     ("mysql://ops:hunter2@db.example/app", "is a 'mysql' URL; sagaq runs on PostgreSQL"),
     ("sqlite:///sagaq.db", "is a SQLite URL; sagaq needs PostgreSQL")],
    ids=["not-a-url", "mysql", "sqlite"],
)
@pytest.mark.parametrize("args", [("ls",), ("enqueue", "order_flow", "{}"), ("db", "upgrade")],
                         ids=lambda a: a[0])
def test_a_malformed_database_url_is_one_line_naming_the_variable(url, said, args) -> None:
    line = one_line(cli(*args, env={"SAGAQ_DATABASE_URL": url}))
    assert line.startswith("Error: SAGAQ_DATABASE_URL (or --database-url)") and said in line
    assert "expected postgresql://USER[:PASSWORD]@HOST[:PORT]/DBNAME" in line
    assert "hunter2" not in line


# -- 7. the CLI ------------------------------------------------------------------------------


def test_reconcile_alone_runs_one_pass(settings) -> None:
    done = cli("reconcile", env=env_for(settings))
    assert done.returncode == 0, done.stderr
    assert "republished" in json.loads(done.stdout)
    assert cli("reconcile", "--once", env=env_for(settings)).returncode == 0  # as before


@pytest.mark.parametrize("ref", ["5", "abc"])
def test_show_of_a_too_short_prefix_says_the_rule(settings, ref) -> None:
    line = one_line(cli("show", ref, env=env_for(settings)))
    assert "a prefix of at least 4 characters" in line and "no saga with id" not in line


def test_enqueue_reads_stdin_and_files_beyond_the_argument_limit(settings, runtime, tmp_path,
                                                                worker, wait_settled) -> None:
    env = env_for(settings)
    big = {"customer": "big@x", "amount": 1, "notes": "x" * 300_000}  # > the OS's ~128 KB
    piped = cli_stdin(["enqueue", "order_flow", "-", "--json"], json.dumps(big), env)
    assert piped.returncode == 0, piped.stderr
    made = json.loads(piped.stdout)
    assert set(made) == {"id", "name", "key"} and made["name"] == "order_flow"
    assert runtime.store.get_saga_or_raise(made["id"]).input["notes"] == big["notes"]

    path = tmp_path / "input.json"
    path.write_text(json.dumps({"customer": "file@x", "amount": 2}))
    from_file = cli("enqueue", "order_flow", f"@{path}", env=env)
    assert from_file.returncode == 0, from_file.stderr
    saga_id = from_file.stdout.strip()
    assert runtime.store.get_saga_or_raise(saga_id).input["customer"] == "file@x"
    assert wait_settled(made["id"], saga_id) == [SagaState.COMPLETED] * 2

    missing = one_line(cli("enqueue", "order_flow", f"@{tmp_path / 'gone.json'}", env=env))
    assert "cannot read the input file" in missing and "gone.json" in missing
    bad = one_line(cli_stdin(["enqueue", "order_flow", "-"], "{nope", env))
    assert "input is not valid JSON" in bad


def cli_stdin(args: list[str], text: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run([*SAGAQ, *args], env=env, stdin=text)


def test_beat_writes_no_schedule_file_in_the_current_directory(settings, tmp_path) -> None:
    env = {**env_for(settings), "PYTHONPATH": str(ROOT), "SAGAQ_RECONCILE_INTERVAL": "1"}
    proc = subprocess.Popen([*SAGAQ, "beat", "--loglevel", "INFO"], cwd=tmp_path,
                            env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(8)  # beat is up and has sent its first ticks
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert "Scheduler: Sending due task sagaq-reconcile" in out, out
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_demo_help_names_all_eight_sagas() -> None:
    done = cli("demo", "--help")
    assert done.returncode == 0
    for line in ("provision_agent  completes", "order_flow", "ticket_triage", "subscription",
                 "offboard_agent   the policy asks a human, who approves",
                 "offboard_agent   the human denies", "the undo of one step keeps failing"):
        assert line in done.stdout, done.stdout
    assert "Exits 1 if any saga ends in a state other than" in done.stdout


def test_demo_summary_shows_its_marks_and_exits_1_on_an_unexpected_end() -> None:
    done = cli("demo", env={"COLUMNS": "160"})
    assert done.returncode == 0, done.stderr
    summary = done.stdout.split("summary")[-1]
    assert summary.count("[ok]") == 8, summary
    # Approval requests name approve / deny, not retry / resolve.
    asks = [line for line in done.stderr.splitlines() if "waits for a human decision" in line]
    assert asks and all("commands: sagaq show" in a and "| sagaq approve " in a
                        and "| sagaq deny " in a and "sagaq retry" not in a for a in asks), asks
    # A rung that does not apply says so once.
    assert "not applicable (not applicable)" not in done.stdout
    assert "rung 1: not applicable:" in done.stdout

    flip = ("import sys, dataclasses; from sagaq import demo, cli;"
            "from sagaq.machine import SagaState;"
            "demo.SCENARIOS = (dataclasses.replace(demo.SCENARIOS[0], "
            "expect=SagaState.COMPENSATED), *demo.SCENARIOS[1:]);"
            "cli.main(['demo'], prog_name='sagaq')")
    wrong = run([sys.executable, "-c", flip], env={"COLUMNS": "160"}, timeout=120)
    assert wrong.returncode == 1, wrong.stderr
    assert "[UNEXPECTED]" in wrong.stdout
    assert "Error: 1 saga(s) did not end as expected: provisioning that completes" in wrong.stderr
