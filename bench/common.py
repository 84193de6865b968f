"""What every benchmark shares: a private database and Redis key space, worker processes,
commit counting, percentiles, and a table."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import redis
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
ADMIN_URL = os.environ.get("SAGAQ_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("SAGAQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@dataclass(frozen=True)
class Scratch:
    """A database and a Redis prefix of one benchmark run, removed afterwards."""

    dbname: str
    url: str  # SQLAlchemy URL (postgresql+psycopg://)
    dsn: str  # libpq URL for psycopg
    prefix: str
    queue: str


@contextlib.contextmanager
def scratch(label: str) -> Iterator[Scratch]:
    tag = f"{label}_{os.getpid()}_{secrets.token_hex(3)}"
    dbname = f"sagaq_bench_{tag}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{dbname}"')
    base = make_url(ADMIN_URL).set(database=dbname)
    url = base.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    dsn = base.set(drivername="postgresql").render_as_string(hide_password=False)
    s = Scratch(dbname, url, dsn, f"sagaq-bench-{tag}:", f"bench-{tag}")
    try:
        yield s
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(match=f"{s.prefix}*"):
            client.delete(key)
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


def commits(dbname: str) -> int:
    """Committed transactions of one database so far (pg_stat_database.xact_commit).

    Backends report their counts when they finish a transaction at most once a second, and
    when they exit (which a client does not wait for): read this after the workers stopped
    and pools were disposed, and until two readings a moment apart agree.
    """
    def read() -> int:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            row = conn.execute(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (dbname,)
            ).fetchone()
        return int(row[0]) if row else 0

    last = read()
    for _ in range(10):  # a database that is never idle (a poller) never agrees: stop trying
        time.sleep(0.5)
        now = read()
        if now == last:
            return now
        last = now
    return last


class Workers:
    """Celery worker processes, started as a user would start them, stopped for good."""

    def __init__(self, app: str, env: dict[str, str], *, queue: str, pool: str,
                 concurrency: int, count: int = 1, log: Path | None = None) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        for i in range(count):
            out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", app, "worker", "--pool", pool,
                 "--concurrency", str(concurrency), "-Q", queue, "--loglevel", "WARNING",
                 "--without-mingle", "--without-gossip", "--without-heartbeat",
                 "--hostname", f"bench{i}-{secrets.token_hex(2)}@%h"],
                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            ))

    def ready(self, prefix: str, queue: str, timeout: float = 60.0) -> None:
        """Wait until a worker consumes the queue (it declared the queue's binding)."""
        client = redis.Redis.from_url(REDIS_URL)
        if not wait_until(lambda: client.exists(f"{prefix}_kombu.binding.{queue}"), timeout):
            raise RuntimeError(f"no worker consumes {queue} after {timeout:g}s")
        time.sleep(0.5)  # every process of the pool is up, not only the first

    def stop(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(values, 0.5) * 1000, 1),
        "p99_ms": round(percentile(values, 0.99) * 1000, 1),
        "mean_ms": round(statistics.fmean(values) * 1000, 1) if values else float("nan"),
    }


def wait_until(check: Any, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return False


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    line = "  ".join(c.ljust(widths[c]) for c in columns)
    out = [line, "  ".join("-" * widths[c] for c in columns)]
    for r in rows:
        out.append("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns))
    return "\n".join(out)


def machine() -> dict[str, Any]:
    import platform

    with psycopg.connect(ADMIN_URL) as conn:
        pg = conn.execute("SHOW server_version").fetchone()
    info = redis.Redis.from_url(REDIS_URL).info("server")
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "postgres": pg[0] if pg else "?",
        "redis": info.get("redis_version"),
        "platform": platform.platform(),
    }
