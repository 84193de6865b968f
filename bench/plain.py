"""Cases A and B of the throughput benchmark: plain Celery chains, with the same worker
settings as sagaq (JSON, acks_late, prefetch 1) on the same Redis and Postgres.

``celery -A bench.plain worker``: settings come from BENCH_* environment variables.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import psycopg
import redis
from celery import Celery, signals


def make_app(broker: str, prefix: str, queue: str) -> Celery:
    """A Celery app configured like sagaq's (JSON, acks_late, prefetch 1)."""
    app = Celery("bench_plain", set_as_current=False)
    app.conf.update(
        broker_url=broker,
        broker_transport_options={"visibility_timeout": 3600, "global_keyprefix": prefix},
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=queue,
        worker_send_task_events=True,
        task_send_sent_event=False,  # as sagaq: workers report, publishers do not
        broker_connection_retry_on_startup=True,
    )
    return app


app = make_app(
    os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/0"),
    os.environ.get("BENCH_PREFIX", ""),
    os.environ.get("BENCH_QUEUE", "bench"),
)

# One connection per pool thread (the threads pool runs two tasks at once) and per process.
_local = threading.local()
_redis: redis.Redis | None = None


@signals.worker_process_init.connect
def _fresh(**_: Any) -> None:
    global _local, _redis
    _local, _redis = threading.local(), None  # never share the parent's connections


def _db() -> psycopg.Connection[Any]:
    conn: psycopg.Connection[Any] | None = getattr(_local, "conn", None)
    if conn is None or conn.closed:
        conn = _local.conn = psycopg.connect(os.environ["BENCH_DSN"])
    return conn


def _done(chain_id: str) -> None:
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(os.environ.get("BENCH_BROKER_URL", "redis://"))
    _redis.hset(f"{os.environ.get('BENCH_PREFIX', '')}bench:done", chain_id, time.time())


@app.task(name="bench.noop")
def noop(chain_id: str, i: int, last: int) -> None:
    if i == last:
        _done(chain_id)


@app.task(name="bench.durable")
def durable(chain_id: str, i: int, last: int) -> None:
    """One Postgres transaction per step: insert a row, update the parent row, commit."""
    conn = _db()
    with conn.transaction():
        conn.execute("INSERT INTO bench_steps (chain_id, i) VALUES (%s, %s)", (chain_id, i))
        conn.execute(
            "UPDATE bench_chains SET done = done + 1, finished_at = "
            "CASE WHEN %s THEN clock_timestamp() ELSE finished_at END WHERE id = %s",
            (i == last, chain_id),
        )
    if i == last:
        _done(chain_id)
