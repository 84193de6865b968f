"""``python -m bench throughput``: sagaq against bare Celery and the durable floor, one run.

Cases, each N units, the same Redis, Postgres and worker settings (prefork, concurrency 2;
``--pool threads`` for the threads variant):

  A  bare Celery      a chain of 5 no-op tasks
  B  durable floor    a chain of 5 tasks, each one Postgres transaction
  C  sagaq            a 5-step saga of no-op steps, enqueued from app code
  D  sagaq rollback   a 5-step saga failing at step 5: 4 compensations
  E  DBOS             a 5-step DBOS workflow (only if ``dbos`` is installed)

For each: units/s, steps/s, latency from enqueue to the end (p50, p99) in the burst, the
latency of one unit enqueued alone (median of a few, nothing else running), and Postgres
commits per unit (``pg_stat_database.xact_commit`` of the case's own database, counted
after its workers have exited). Ratios against A and B are what to read; absolute numbers
move with the machine.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import uuid
from typing import Any

import psycopg
import redis
from celery import chain

from bench.common import REDIS_URL, Workers, commits, machine, scratch, summary, table
from bench.common import wait_until as until

STEPS = 5
WARMUP = 5
SINGLES = 11


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--units", type=int, default=500, help="chains or sagas per case")
    p.add_argument("--pool", choices=["prefork", "threads"], default="prefork")
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--cases", default="ABCDE", help="which cases to run, e.g. AC")
    p.add_argument("--rounds", type=int, default=3,
                   help="run the cases this many times, interleaved; report medians")
    p.add_argument("--seed", type=int, default=1, help="shuffles nothing today; recorded")
    p.add_argument("--quick", action="store_true", help="tiny N: checks it runs (CI smoke)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


# -- A and B: plain Celery ---------------------------------------------------------------


def plain_case(case: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    from bench import plain

    with scratch(f"plain{case.lower()}") as s:
        with psycopg.connect(s.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE bench_chains (id text PRIMARY KEY, done int NOT NULL "
                         "DEFAULT 0, finished_at timestamptz)")
            conn.execute("CREATE TABLE bench_steps (id bigserial PRIMARY KEY, chain_id text, "
                         "i int)")
        env = {"BENCH_DSN": s.dsn, "BENCH_BROKER_URL": REDIS_URL, "BENCH_PREFIX": s.prefix,
               "BENCH_QUEUE": s.queue}
        app = plain.make_app(REDIS_URL, s.prefix, s.queue)
        task = "bench.noop" if case == "A" else "bench.durable"
        done_key = f"{s.prefix}bench:done"
        client = redis.Redis.from_url(REDIS_URL)
        producer = psycopg.connect(s.dsn, autocommit=True)

        def send() -> str:
            cid = uuid.uuid4().hex
            if case == "B":  # the durable floor writes its parent row first, like enqueue
                producer.execute("INSERT INTO bench_chains (id) VALUES (%s)", (cid,))
            chain(*(app.signature(task, args=(cid, i, STEPS), immutable=True)
                    for i in range(1, STEPS + 1))).apply_async(queue=s.queue)
            return cid

        def finished(cid: str) -> float | None:
            raw = client.hget(done_key, cid)
            return float(raw) if raw is not None else None

        before = commits(s.dbname)
        workers = Workers("bench.plain", env, queue=s.queue, pool=args.pool,
                          concurrency=args.concurrency)
        try:
            workers.ready(s.prefix, s.queue)
            result = _measure(n, send, finished, lambda ids: client.hlen(done_key) >= ids)
        finally:
            workers.stop()
            producer.close()
            app.close()
        total = commits(s.dbname) - before
        result["commits_per_unit"] = round(total / result["units_counted"], 2)
        return result


# -- C and D: sagaq -------------------------------------------------------------------------


def saga_case(case: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    import sqlalchemy as sa

    from sagaq import Runtime, Settings
    from sagaq.notify import LogNotifier
    from sagaq.secrets import new_key
    from sagaq.store.database import upgrade
    from sagaq.store.models import SAGAS

    with scratch(f"sagaq{case.lower()}") as s:
        upgrade(s.url)
        settings = Settings(database_url=s.url, broker_url=REDIS_URL, redis_prefix=s.prefix,
                            queue=s.queue, imports=("bench.sagas",), secret_key=new_key())
        rt = Runtime(settings, notifiers=[LogNotifier()])
        saga = "bench_five" if case == "C" else "bench_rollback"
        env = {"SAGAQ_DATABASE_URL": s.url, "SAGAQ_BROKER_URL": REDIS_URL,
               "SAGAQ_REDIS_PREFIX": s.prefix, "SAGAQ_QUEUE": s.queue,
               "SAGAQ_IMPORTS": "bench.sagas",
               "SAGAQ_SECRET_KEY": settings.secret_key}  # workers refuse to start without

        def send() -> str:
            return rt.engine.enqueue(saga, {})

        def finished(saga_id: str) -> float | None:
            with rt.store.engine.connect() as conn:
                row = conn.execute(sa.select(SAGAS.c.finished_at).where(SAGAS.c.id == saga_id))
                at = row.scalar()
            return at.timestamp() if at is not None else None

        def all_done(count: int) -> bool:
            with rt.store.engine.connect() as conn:
                done = conn.execute(sa.select(sa.func.count()).select_from(SAGAS)
                                    .where(SAGAS.c.finished_at.is_not(None))).scalar_one()
            return bool(done >= count)

        before = commits(s.dbname)
        workers = Workers("sagaq", env, queue=s.queue, pool=args.pool,
                          concurrency=args.concurrency)
        try:
            workers.ready(s.prefix, s.queue)
            result = _measure(n, send, finished, all_done, reads_db=True)
        finally:
            workers.stop()
            rt.close()
        total = commits(s.dbname) - before - result.pop("read_commits", 0)
        result["commits_per_unit"] = round(total / result["units_counted"], 2)
        if case == "C":
            enqueue_commits = 1
            result["commits_per_step"] = round(
                (total / result["units_counted"] - enqueue_commits) / STEPS, 3
            )
        return result


# -- the measurement shared by every case -------------------------------------------------------


def _measure(n: int, send: Any, finished: Any, all_done: Any, *, reads_db: bool = False
             ) -> dict[str, Any]:
    # warm up: the workers are started and connected before anything is timed
    for _ in range(WARMUP):
        send()
    if not until(lambda: all_done(WARMUP), 120):
        raise RuntimeError("the warm-up did not finish in 120 s: are the workers running?")
    sent: dict[str, float] = {}
    t0 = time.time()
    for _ in range(n):
        unit = send()
        sent[unit] = time.time()
    if not until(lambda: all_done(WARMUP + n), 600, interval=0.1):
        raise RuntimeError("the burst did not finish in 600 s")
    ends = {u: finished(u) for u in sent}
    latencies = [ends[u] - sent[u] for u in sent if ends[u] is not None]
    elapsed = max(e for e in ends.values() if e is not None) - t0
    singles = []
    for k in range(SINGLES):
        unit = send()
        start = time.time()
        until(lambda u=unit: finished(u) is not None, 60, interval=0.005)
        end = finished(unit)
        if end is not None:
            singles.append(end - start)
        del k
    return {
        "units": n,
        "units_per_s": round(n / elapsed, 1),
        "steps_per_s": round(n * STEPS / elapsed, 1),
        "latency": summary(latencies),
        "unloaded_ms": round(statistics.median(singles) * 1000, 1) if singles else None,
        "units_counted": WARMUP + n + SINGLES,
    }


# -- E: DBOS, if it is installed ------------------------------------------------------------


def dbos_case(n: int, args: argparse.Namespace) -> dict[str, Any]:
    try:
        import dbos  # noqa: F401
    except ImportError:
        return {"skipped": "dbos is not installed (pip install dbos)"}
    from bench.peer import dbos_run

    with scratch("dbos") as s:
        return dbos_run(s, n, args.concurrency, WARMUP, SINGLES)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    random.seed(args.seed)
    n = 20 if args.quick else args.units
    rounds = 1 if args.quick else args.rounds
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in args.cases.upper()}
    for _ in range(rounds):  # interleaved, so that a slow minute hurts every case alike
        for case in runs:
            if case in "AB":
                runs[case].append(plain_case(case, n, args))
            elif case in "CD":
                runs[case].append(saga_case(case, n, args))
            elif case == "E":
                runs[case].append(dbos_case(n, args))
    cases = {case: _median(results) for case, results in runs.items()}
    out: dict[str, Any] = {"pool": args.pool, "concurrency": args.concurrency, "units": n,
                           "rounds": rounds, "seed": args.seed, "machine": machine(),
                           "cases": cases}
    a, b, c = cases.get("A", {}), cases.get("B", {}), cases.get("C", {})
    if c and "units_per_s" in c:
        if "units_per_s" in a:
            out["ratio_c_a"] = round(c["units_per_s"] / a["units_per_s"], 3)
        if "units_per_s" in b:
            out["ratio_c_b"] = round(c["units_per_s"] / b["units_per_s"], 3)
            out["ratio_c_b_p50"] = round(c["latency"]["p50_ms"] / b["latency"]["p50_ms"], 3)
            out["ratio_c_b_unloaded"] = round(c["unloaded_ms"] / b["unloaded_ms"], 3)
        out["commits_per_step"] = c.get("commits_per_step")
        e = cases.get("E", {})
        if "units_per_s" in e:
            out["ratio_c_e"] = round(c["units_per_s"] / e["units_per_s"], 3)
    return out


def _median(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure over the rounds; the per-round throughputs kept beside."""
    if any("skipped" in r for r in results):
        return results[0]
    med = dict(results[len(results) // 2])
    for key in ("units_per_s", "steps_per_s", "unloaded_ms", "commits_per_unit",
                "commits_per_step"):
        values = [r[key] for r in results if r.get(key) is not None]
        if values:
            med[key] = statistics.median(values)
    med["latency"] = {k: statistics.median(r["latency"][k] for r in results)
                      for k in results[0]["latency"]}
    med["rounds_units_per_s"] = [r["units_per_s"] for r in results]
    return med


def render(out: dict[str, Any]) -> str:
    names = {"A": "bare Celery", "B": "durable floor", "C": "sagaq", "D": "sagaq rollback",
             "E": "DBOS"}
    rows = []
    for case, r in out["cases"].items():
        if "skipped" in r:
            rows.append({"case": f"{case} {names[case]}", "units/s": r["skipped"]})
            continue
        rows.append({
            "case": f"{case} {names[case]}",
            "units/s": r["units_per_s"],
            "steps/s": r["steps_per_s"],
            "p50 ms": r["latency"]["p50_ms"],
            "p99 ms": r["latency"]["p99_ms"],
            "alone ms": r["unloaded_ms"],
            "commits/unit": r["commits_per_unit"],
        })
    head = (f"{out['units']} units per case, median of {out['rounds']} interleaved rounds, pool "
            f"{out['pool']}, concurrency {out['concurrency']}, {out['machine']['cpus']} CPUs")
    ratios = {k: v for k, v in out.items() if k.startswith(("ratio", "commits_per_step"))}
    return "\n".join([head, "", table(rows, ["case", "units/s", "steps/s", "p50 ms", "p99 ms",
                                              "alone ms", "commits/unit"]), "",
                      json.dumps(ratios)])


def main(argv: list[str] | None = None) -> int:
    out = run(argv)
    print(json.dumps(out, indent=2) if parse(argv).json else render(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())


