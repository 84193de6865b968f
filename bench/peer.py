"""Case E of the throughput benchmark: DBOS, the best-known Python durable-execution peer.

A DBOS workflow of 5 no-op steps on the same Postgres. Two worker processes (the same
parallelism as prefork concurrency 2) dequeue from a DBOS queue polled every 20 ms (its
default is a second); the controller enqueues with ``DBOSClient``, as app code would.

``python -m bench.peer URL EXECUTOR`` runs one worker process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from typing import Any

import psycopg

from bench.common import ROOT, Scratch, commits, wait_until

QUEUE = "bench"


def worker(url: str, executor: str) -> None:
    from dbos import DBOS

    @DBOS.step()
    def noop(i: int) -> int:
        return i

    @DBOS.workflow(name="five")
    def five() -> None:
        for i in range(5):
            noop(i)

    DBOS(config={"name": "bench", "system_database_url": url, "executor_id": executor})
    DBOS.launch()
    DBOS.register_queue(QUEUE, worker_concurrency=1, polling_interval_sec=0.02)
    while True:
        time.sleep(3600)


def dbos_run(s: Scratch, n: int, concurrency: int, warmup: int, singles: int) -> dict[str, Any]:
    from dbos import DBOSClient

    from bench.common import summary

    url = s.dsn
    procs = [
        subprocess.Popen([sys.executable, "-m", "bench.peer", url, f"w{i}"], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)},
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for i in range(concurrency)
    ]
    try:
        db = psycopg.connect(url, autocommit=True)
        if not wait_until(lambda: _table_exists(db), 60):
            raise RuntimeError("DBOS workers did not create their tables in 60 s")
        client = DBOSClient(system_database_url=url)

        def send() -> str:
            wid = str(uuid.uuid4())
            client.enqueue({"workflow_name": "five", "queue_name": QUEUE, "workflow_id": wid})
            return wid

        def finished(wid: str) -> float | None:
            row = db.execute("SELECT completed_at FROM dbos.workflow_status WHERE "
                             "workflow_uuid = %s AND status = 'SUCCESS'", (wid,)).fetchone()
            return row[0] / 1000 if row and row[0] else None

        def all_done(count: int) -> bool:
            row = db.execute("SELECT count(*) FROM dbos.workflow_status WHERE "
                             "status = 'SUCCESS'").fetchone()
            return bool(row and row[0] >= count)

        for _ in range(warmup):
            send()
        wait_until(lambda: all_done(warmup), 120)
        before = commits(s.dbname)
        sent = {}
        t0 = time.time()
        for _ in range(n):
            wid = send()
            sent[wid] = time.time()
        if not wait_until(lambda: all_done(warmup + n), 600, interval=0.1):
            raise RuntimeError("DBOS did not finish the burst in 600 s")
        ends = {w: finished(w) for w in sent}
        elapsed = max(e for e in ends.values() if e) - t0
        latencies = [ends[w] - sent[w] for w in sent if ends[w]]
        alone = []
        for _ in range(singles):
            wid = send()
            start = time.time()
            wait_until(lambda w=wid: finished(w) is not None, 60, interval=0.005)
            end = finished(wid)
            if end:
                alone.append(end - start)
        client.destroy()
        db.close()
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
    total = commits(s.dbname) - before  # queue polling commits too: it is how DBOS works
    import statistics

    return {
        "units": n,
        "units_per_s": round(n / elapsed, 1),
        "steps_per_s": round(n * 5 / elapsed, 1),
        "latency": summary(latencies),
        "unloaded_ms": round(statistics.median(alone) * 1000, 1) if alone else None,
        "commits_per_unit": round(total / (n + singles), 2),
        "note": "2 DBOS processes, worker_concurrency 1 each, queue polled every 20 ms",
    }


def _table_exists(db: psycopg.Connection[Any]) -> bool:
    """The workers have migrated DBOS's tables (the newest column we write exists)."""
    row = db.execute(
        "SELECT 1 FROM information_schema.columns WHERE table_schema = 'dbos' AND "
        "table_name = 'workflow_status' AND column_name = 'creator_xid'"
    ).fetchone()
    if row:
        time.sleep(2.0)  # both workers have launched, not only the first
    return bool(row)


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
