"""``python -m bench reconciler``: one reconciler pass, beside 10k / 100k / 1M finished sagas.

For each size, a database of its own is filled by COPY (finished sagas with two step runs
each: rows bulk-inserted, not run), plus 1,000 active sagas the sweeps must act on (steps
whose lease expired, durable waits that are due, stalled rollbacks, overdue outbox rows).
One pass of every sweep is timed, three times (the active rows are put back each time), and
the median is reported. Flat means: the pass reads active rows only, through partial
indexes, whatever the number of finished sagas.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from bench.common import REDIS_URL, machine, scratch, table

ACTIVE = 1000


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench reconciler", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000,1000000",
                   help="finished sagas per database, comma-separated")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=1, help="recorded; nothing random today")
    p.add_argument("--quick", action="store_true", help="sizes 1000 and 10000")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def _copy(conn: psycopg.Connection[Any], table_name: str, columns: list[str],
          rows: Any) -> None:
    with conn.cursor().copy(f"COPY {table_name} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


def fill_finished(dsn: str, count: int) -> float:
    """COPY ``count`` finished sagas with two finished step runs each; returns seconds."""
    start = time.perf_counter()
    long_ago = datetime(2026, 1, 1, tzinfo=UTC)
    with psycopg.connect(dsn) as conn:
        ids = [str(uuid.uuid4()) for _ in range(count)]
        states = ("completed", "compensated")
        _copy(conn, "sagaq_sagas",
              ["id", "name", "version", "state", "input", "checkpoint", "created_at",
               "updated_at", "finished_at", "incident"],
              ((i, "bench_five", "v", states[k % 2], "{}", "{}", long_ago, long_ago, long_ago, 0)
               for k, i in enumerate(ids)))
        _copy(conn, "sagaq_step_runs",
              ["saga_id", "step", "step_index", "direction", "attempt", "status", "task_name",
               "idempotency_key", "message_id", "deliveries", "scheduled_at", "finished_at",
               "level"],
              ((i, f"s{j}", j, "forward", 1, "succeeded", f"sagaq.bench_five.s{j}", "k" * 64,
                "m", 1, long_ago, long_ago, 0) for i in ids for j in (1, 2)))
        conn.commit()
        conn.execute("ANALYZE")
    return time.perf_counter() - start


def reset_active(dsn: str) -> None:
    """Put back 1,000 sagas every sweep has something to do with."""
    now = datetime.now(UTC)
    old = now - timedelta(hours=3)
    with psycopg.connect(dsn) as conn:
        conn.execute("DELETE FROM sagaq_sagas WHERE finished_at IS NULL")
        kinds = ["lease"] * 400 + ["waiting"] * 200 + ["stalled"] * 200 + ["outbox"] * 200
        for n, kind in enumerate(kinds):
            sid = str(uuid.uuid4())
            state = {"lease": "running", "waiting": "waiting", "stalled": "compensating",
                     "outbox": "running"}[kind]
            conn.execute(
                "INSERT INTO sagaq_sagas (id, name, version, state, input, checkpoint, "
                "created_at, updated_at, wake_at, incident) VALUES "
                "(%s, 'bench_five', 'v', %s, '{}', '{}', %s, %s, %s, 0)",
                (sid, state, old, old, old if kind == "waiting" else None),
            )
            status = "running" if kind == "lease" else "scheduled"
            run_id = conn.execute(
                "INSERT INTO sagaq_step_runs (saga_id, step, step_index, direction, attempt, "
                "status, task_name, idempotency_key, message_id, deliveries, lease_expires_at, "
                "scheduled_at, level) VALUES (%s, 's1', 0, 'forward', 1, %s, "
                "'sagaq.bench_five.s1', %s, %s, 0, %s, %s, 0) RETURNING id",
                (sid, status, "k" * 64, f"m{n}", old if kind == "lease" else None, old),
            ).fetchone()
            if kind in ("outbox", "waiting"):
                assert run_id is not None
                conn.execute(
                    "INSERT INTO sagaq_outbox (saga_id, step_run_id, task_name, args, "
                    "message_id, available_at, created_at, republished) VALUES "
                    "(%s, %s, 'sagaq.bench_five.s1', %s, %s, %s, %s, 0)",
                    (sid, run_id[0], json.dumps([sid, run_id[0]]), f"o{n}", old, old),
                )
        conn.commit()
        conn.execute("ANALYZE")


def run(argv: list[str] | None = None) -> dict[str, Any]:
    from sagaq.reconciler import sweep
    from sagaq.settings import Settings
    from sagaq.store import Store
    from sagaq.store.database import create_engine, upgrade

    args = parse(argv)
    sizes = [1000, 10000] if args.quick else [int(x) for x in args.sizes.split(",")]
    results = []
    for size in sizes:
        with scratch(f"reconciler{size}") as s:
            upgrade(s.url)
            fill_s = fill_finished(s.dsn, size)
            settings = Settings(database_url=s.url, broker_url=REDIS_URL,
                                reconcile_batch=ACTIVE, rollback_deadline=3600.0)
            store = Store(create_engine(s.url))
            times, acted = [], []
            for _ in range(args.repeat):
                reset_active(s.dsn)
                start = time.perf_counter()
                done = sweep(store, settings)  # published by nobody: only the writes count
                times.append(time.perf_counter() - start)
                acted.append(done.summary())
            store.dispose()
            results.append({"finished": size, "active": ACTIVE, "fill_s": round(fill_s, 1),
                            "sweep_ms": round(statistics.median(times) * 1000, 1),
                            "sweeps_ms": [round(t * 1000, 1) for t in times],
                            "acted": acted[0]})
    base = results[0]["sweep_ms"]
    for r in results:
        r["vs_smallest"] = round(r["sweep_ms"] / base, 2)
    return {"machine": machine(), "results": results, "seed": args.seed}


def render(out: dict[str, Any]) -> str:
    rows = [{"finished sagas": f"{r['finished']:,}", "active": r["active"],
             "sweep ms (median)": r["sweep_ms"], "vs smallest": r["vs_smallest"],
             "acted on": ", ".join(f"{k} {v}" for k, v in r["acted"].items() if v)}
            for r in out["results"]]
    return table(rows, ["finished sagas", "active", "sweep ms (median)", "vs smallest",
                        "acted on"])


def main(argv: list[str] | None = None) -> int:
    out = run(argv)
    print(json.dumps(out, indent=2) if parse(argv).json else render(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

