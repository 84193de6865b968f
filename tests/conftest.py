"""Fixtures: each test run gets its own PostgreSQL database and its own Redis key space.

Everything is real: PostgreSQL, Redis, Celery workers (threads in this process; subprocess
workers where a test kills one). The external systems are the recording stand-ins.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterator

import psycopg
import pytest
import redis
from sqlalchemy.engine import make_url

from sagaq import Runtime, SagaState, Settings
from sagaq.notify import LogNotifier
from sagaq.store.database import upgrade
from sagaq.worker import embedded_worker
from tests import services

RUN = f"{os.getpid()}_{secrets.token_hex(3)}"
TEST_SECRET_KEY = "q6nEJ8tZ0h3hV2b8QyX1c0m9d3s7a2k5f8g1j4l6p0w="  # tests only: a fixed Fernet key
SETTLED = (SagaState.COMPLETED, SagaState.COMPENSATED, SagaState.NEEDS_HUMAN, SagaState.RESOLVED)


@pytest.fixture(scope="session", autouse=True)
def _private_sagaq_home() -> Iterator[None]:
    with services.private_sagaq_home():
        yield


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    url, cleanup = services.postgres_admin_url()
    yield url
    cleanup()


@pytest.fixture(scope="session")
def redis_base_url() -> Iterator[str]:
    url, cleanup = services.redis_url()
    yield url
    cleanup()


@pytest.fixture(scope="session")
def make_database(pg_admin_url: str) -> Iterator[Callable[[str], str]]:
    """Create migrated databases private to this run; all are dropped at the end."""
    created: list[str] = []

    def make(label: str) -> str:
        name = f"sagaq_test_{RUN}_{label}"
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        url = make_url(pg_admin_url).set(drivername="postgresql+psycopg", database=name)
        rendered = url.render_as_string(hide_password=False)
        upgrade(rendered)
        return rendered

    yield make
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        for name in created:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_prefix(redis_base_url: str) -> Iterator[str]:
    prefix = f"sagaq-test-{RUN}:"
    yield prefix
    client = redis.Redis.from_url(redis_base_url)
    for key in client.scan_iter(match=f"{prefix}*"):
        client.delete(key)
    # Every worker of the run has stopped: nothing may write here any more, and the chaos
    # runs (prefix sagaq-chaos-<this pid>_...) must have removed their own key spaces.
    time.sleep(0.5)
    left = sorted(k.decode() for pattern in (f"{prefix}*", f"sagaq-chaos-{os.getpid()}_*")
                  for k in client.scan_iter(match=pattern))
    for key in left:
        client.delete(key)
    client.close()
    assert not left, f"the test run left Redis keys behind: {left}"


@pytest.fixture(scope="session")
def settings(
    make_database: Callable[[str], str], redis_base_url: str, redis_prefix: str
) -> Settings:
    return Settings(
        database_url=make_database("main"),
        broker_url=redis_base_url,
        redis_prefix=redis_prefix,
        imports=(
            "tasks.provisioning",
            "tasks.orders",
            "tasks.triage",
            "tasks.subscription",
            "tests.sagas",
        ),
        queue=f"sagaq-test-{RUN}",
        retries=2,
        retryable_retries=3,
        compensation_retries=2,
        retry_base=0.02,
        retry_cap=0.1,
        countdown_max=1.0,  # so that a 2 s backoff is a durable wait in a test
        secret_key=TEST_SECRET_KEY,
        reconcile_interval=0.5,
        step_timeout=20.0,
        lease_margin=2.0,
        visibility_timeout=120.0,
    )


@pytest.fixture(scope="session")
def runtime(settings: Settings) -> Iterator[Runtime]:
    rt = Runtime(settings, notifiers=[LogNotifier()])
    yield rt
    rt.close()


@pytest.fixture(scope="session")
def worker(runtime: Runtime) -> Iterator[object]:
    """A real Celery worker (threads pool) consuming this run's queue on the real Redis."""
    with embedded_worker(runtime.app, concurrency=4) as w:
        yield w


@pytest.fixture(autouse=True)
def _fresh_stand_ins() -> None:
    from tasks import services as stand_ins
    from tests import sagas

    stand_ins.reset()
    sagas.ledger.reset()
    sagas.overlaps.clear()


@pytest.fixture
def wait_settled(runtime: Runtime) -> Callable[..., list[SagaState]]:
    """Wait until every saga is in a state nothing moves it out of without a human."""

    def wait(
        *saga_ids: str, timeout: float = 30.0, states: tuple[SagaState, ...] = SETTLED
    ) -> list[SagaState]:
        deadline = time.monotonic() + timeout
        while True:
            current = [runtime.store.get_saga_or_raise(i).state for i in saga_ids]
            if all(s in states for s in current):
                return current
            if time.monotonic() > deadline:
                where = dict(zip(saga_ids, current, strict=True))
                raise AssertionError(f"sagas did not settle in {timeout}s: {where}")
            time.sleep(0.02)

    return wait


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    # Which throwaway servers this run started: their setup output is captured otherwise.
    for line in services.NOTES:
        terminalreporter.write_line(f"sagaq tests: {line}")
