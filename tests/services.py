"""Find PostgreSQL and Redis for a test run, or start throwaway ones, or stop with one line.

Order: the URLs in SAGAQ_TEST_DATABASE_URL / SAGAQ_TEST_REDIS_URL (defaults: the local
servers on their standard ports); if nothing answers there, a throwaway server from locally
installed binaries (pytest-postgresql / pytest-redis executors) in a temporary directory;
if there are none, :func:`pytest.exit` with what to install or run.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from contextlib import closing

import psycopg
import pytest
import redis

HINT = (
    "start them (`docker compose up -d postgres redis`, then SAGAQ_TEST_DATABASE_URL="
    "postgresql://postgres:$POSTGRES_PASSWORD@127.0.0.1:5432/postgres and SAGAQ_TEST_REDIS_URL="
    "redis://:$REDIS_PASSWORD@127.0.0.1:6379/0) or install postgresql and redis-server"
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


def postgres_admin_url() -> tuple[str, Callable[[], None]]:
    """A URL on which the test run may CREATE DATABASE, and how to clean up after."""
    url = os.environ.get("SAGAQ_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    if _pg_answers(url):
        return url, lambda: None
    pg_ctl = shutil.which("pg_ctl") or next(
        iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))), None
    )
    if pg_ctl is None or os.geteuid() == 0:
        why = "no pg_ctl found" if pg_ctl is None else "initdb refuses to run as root"
        pytest.exit(
            f"PostgreSQL does not answer at {url} and cannot start a throwaway one ({why}): {HINT}",
            returncode=2,
        )
    from pytest_postgresql.executors import PostgreSQLExecutor

    tmp = tempfile.mkdtemp(prefix="sagaq-pg-")
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


def redis_url() -> tuple[str, Callable[[], None]]:
    url = os.environ.get("SAGAQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    if _redis_answers(url):
        return url, lambda: None
    server = shutil.which("redis-server")
    if server is None:
        pytest.exit(
            f"Redis does not answer at {url} and no redis-server is installed: {HINT}", returncode=2
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
        datadir=tmp,
    )  # type: ignore[arg-type]
    executor.start()
    return f"redis://127.0.0.1:{port}/0", lambda: (executor.stop(), shutil.rmtree(tmp, True))


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
