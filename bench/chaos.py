"""The chaos run: real workers, real Postgres and Redis, and a hostile environment.

``python -m bench chaos --sagas 500 --workers 3 --kills 12 --seed 7``

It starts subprocess workers and a beat, enqueues a mix of sagas (complete; fail →
compensate; compensation fails → page; after-pivot retries) whose steps write to a stand-in
service that records every effect by idempotency key, and meanwhile SIGKILLs a random worker
every few seconds (and restarts it), flushes Redis once, restarts PostgreSQL once, and
publishes duplicates of a share of the messages. ``--sigstop N`` stops a worker in the
middle of a step N times, past its lease and past the visibility timeout, then resumes it.
A late write whose run was taken over meanwhile must lose (``late_writes_lost``); one whose
run nobody took over during the stop is still the live attempt's, and the delivery fence
lets it through (``late_writes_won``: not a fault; where nobody takes over depends on what
the other workers are doing). ``late_writes_raised`` (a late write that got past the fence
and broke on a later constraint) must be 0.
``--db-errors RATE`` makes a share RATE of the workers' commits fail with a database error,
before or after the commit (it needs the store's fault hook, ``sagaq.store.faults``). When
every saga has settled (or the time is up) it prints what it counted, as JSON, with
``liveness_violations``: sagas left with no way forward (``Store.stranded()``). Every count
but the first four must be zero.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis
from sqlalchemy.engine import make_url

from bench.chaos_stops import Stopper, liveness, read_tally
from bench.standin import StandIn
from sagaq import Runtime, SagaState, Settings
from sagaq.machine import StepStatus
from sagaq.notify import LogNotifier
from sagaq.secrets import new_key
from sagaq.store.database import upgrade

ROOT = Path(__file__).resolve().parents[1]
SETTLED = {SagaState.COMPLETED, SagaState.COMPENSATED, SagaState.NEEDS_HUMAN}


@dataclass
class Chaos:
    kills: int = 0
    flushes: int = 0
    pg_restarts: int = 0
    duplicates: int = 0
    log: list[str] = field(default_factory=list)

    def note(self, started: float, what: str) -> None:
        self.log.append(f"{time.monotonic() - started:7.2f}s {what}")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench chaos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sagas", type=int, default=500)
    p.add_argument("--workers", type=int, default=3, help="subprocess workers")
    p.add_argument("--concurrency", type=int, default=2, help="prefork processes per worker")
    p.add_argument("--kills", type=int, default=12, help="SIGKILLs, one every --kill-every s")
    p.add_argument("--kill-every", type=float, default=3.0)
    p.add_argument("--flush", choices=["all", "prefix", "none"], default="all",
                   help="FLUSHALL once (all), or only this run's Redis keys (prefix)")
    p.add_argument("--pg-restart", action=argparse.BooleanOptionalAction, default=True,
                   help="restart PostgreSQL once (pg_ctlcluster ... restart)")
    p.add_argument("--duplicates", type=float, default=0.1,
                   help="share of step runs whose message is published twice")
    p.add_argument("--sigstop", type=int, default=0, metavar="N",
                   help="SIGSTOP a worker mid-step N times, then SIGCONT it")
    p.add_argument("--sigstop-for", type=float, default=None, metavar="S",
                   help="seconds of each stop (default: the visibility timeout + 4)")
    p.add_argument("--visibility-timeout", type=float, default=None, metavar="S",
                   help="Redis's visibility timeout (default 60, or 8 with --sigstop)")
    p.add_argument("--db-errors", type=float, default=0.0, metavar="RATE",
                   help="share of the workers' commits failed with a database error")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--admin-url", default=os.environ.get(
        "SAGAQ_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    p.add_argument("--redis-url", default=os.environ.get(
        "SAGAQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
    p.add_argument("--broker-url", default=None,
                   help="the Celery broker (default: --redis-url); with amqp://..., the "
                        "flush purges this run's queue")
    p.add_argument("--verbose", action="store_true", help="print the chaos log to stderr")
    args = p.parse_args(argv)
    if not 0.0 <= args.db_errors < 1.0:
        p.error("--db-errors is a share of commits: at least 0 and below 1")
    if args.sigstop < 0:
        p.error("--sigstop counts stops: 0 or more")
    if args.visibility_timeout is None:
        args.visibility_timeout = 8.0 if args.sigstop else 60.0
    if args.visibility_timeout <= 6.0:  # step_timeout + lease_margin below
        p.error("--visibility-timeout must exceed the step lease of 6 s")
    if args.sigstop_for is None:
        args.sigstop_for = args.visibility_timeout + 4.0  # kombu sweeps unacked every 1 s
    if args.db_errors > 0:
        try:
            import sagaq.store.faults  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
        except ImportError:
            p.error("--db-errors needs the store's fault hook (sagaq.store.faults), "
                    "which this checkout does not have")
    return args


def run(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    rng = random.Random(args.seed)
    tag = f"{os.getpid()}_{secrets.token_hex(3)}"
    dbname = f"sagaq_chaos_{tag}"
    with psycopg.connect(args.admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{dbname}"')
    url = make_url(args.admin_url).set(drivername="postgresql+psycopg", database=dbname)
    settings = Settings(
        database_url=url.render_as_string(hide_password=False),
        broker_url=args.broker_url or args.redis_url,
        redis_prefix=f"sagaq-chaos-{tag}:",
        secret_key=new_key(),
        queue=f"chaos-{tag}",
        imports=("bench.chaos_sagas",),
        step_timeout=5.0,
        lease_margin=1.0,
        visibility_timeout=args.visibility_timeout,
        retries=3,
        retryable_retries=5,
        compensation_retries=2,
        retry_base=0.05,
        retry_cap=0.5,
        countdown_max=1.0,
        reconcile_interval=0.5,
        republish_after=3.0,
        rollback_deadline=300.0,
        max_deliveries=12,  # random kills may hit one step a few times: that is not poison
    )
    try:
        upgrade(settings.database_url)
        with StandIn() as standin, tempfile.TemporaryDirectory() as tmp:
            return _run(args, rng, settings, standin, Path(tmp))
    finally:
        with psycopg.connect(args.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        _clean_broker(args, settings)


def _amqp(settings: Settings) -> bool:
    return settings.broker_url.split("://", 1)[0] in ("amqp", "amqps", "pyamqp")


def _clean_broker(args: argparse.Namespace, settings: Settings) -> None:
    """Leave nothing behind: the run's Redis keys (its queue, the unacked hash and index,
    bindings), or its RabbitMQ queue and exchange. Workers are dead by now."""
    if _amqp(settings):
        import kombu

        with kombu.Connection(settings.broker_url) as conn:
            for drop in ("queue_delete", "exchange_delete"):
                with contextlib.suppress(Exception):
                    getattr(conn.channel(), drop)(settings.queue)
        return
    client = redis.Redis.from_url(args.redis_url)
    for key in client.scan_iter(match=f"{settings.redis_prefix}*"):
        client.delete(key)
    client.close()


def _flush(args: argparse.Namespace, settings: Settings, client: redis.Redis) -> None:
    """Lose every message in flight: FLUSHALL, this run's Redis keys, or its AMQP queue."""
    if _amqp(settings):
        import kombu

        with kombu.Connection(settings.broker_url) as conn:
            conn.default_channel.queue_purge(settings.queue)
    elif args.flush == "all":
        client.flushall()
    else:
        for key in client.scan_iter(match=f"{settings.redis_prefix}*"):
            client.delete(key)


def _env(settings: Settings, standin: StandIn) -> dict[str, str]:
    env = {**os.environ, "SAGAQ_CHAOS_URL": standin.url, "PYTHONPATH": str(ROOT)}
    env.pop("SAGAQ_CHAOS_DB_ERRORS", None)
    for name in ("database_url", "broker_url", "redis_prefix", "queue", "step_timeout",
                 "lease_margin", "visibility_timeout", "retries", "retryable_retries",
                 "compensation_retries", "retry_base", "retry_cap", "countdown_max",
                 "reconcile_interval", "republish_after", "rollback_deadline", "max_deliveries",
                 "secret_key"):
        env[f"SAGAQ_{name.upper()}"] = str(getattr(settings, name))
    env["SAGAQ_IMPORTS"] = ",".join(settings.imports)
    return env


def _start_worker(i: int, args: argparse.Namespace, env: dict[str, str], tmp: Path,
                  settings: Settings, names: list[str]) -> subprocess.Popen[bytes]:
    log = open(tmp / f"worker-{i}.log", "ab")  # noqa: SIM115 - lives as long as the worker
    name = f"chaos{i}-{secrets.token_hex(2)}"
    if i < len(names):
        names[i] = name
    else:
        names.append(name)
    # bench.chaos_worker is the sagaq app plus the fault hook and the late-write tally.
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "bench.chaos_worker", "worker", "--pool",
         "prefork", "--concurrency", str(args.concurrency), "-Q", settings.queue,
         "--loglevel", "WARNING", "--hostname", f"{name}@%h", "--without-mingle",
         "--without-gossip"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the worker and its pool children, no warning
    proc.wait(10)


def _restart_postgres() -> None:
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
                   check=True, capture_output=True, timeout=60)


def _run(args: argparse.Namespace, rng: random.Random, settings: Settings, standin: StandIn,
         tmp: Path) -> dict[str, Any]:
    from bench.chaos_sagas import SCENARIOS, scenario_input

    env = _env(settings, standin)
    env["SAGAQ_CHAOS_TALLY"] = str(tmp / "tally.jsonl")
    env["SAGAQ_CHAOS_SEED"] = str(args.seed)
    if args.db_errors > 0:
        env["SAGAQ_CHAOS_DB_ERRORS"] = str(args.db_errors)
    chaos = Chaos()
    started = time.monotonic()
    names: list[str] = []
    workers = [_start_worker(i, args, env, tmp, settings, names) for i in range(args.workers)]
    stopper = Stopper(args.sigstop, args.sigstop_for, next_at=started + 1.0,
                      every=args.kill_every)
    beat = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "sagaq", "beat", "--loglevel", "WARNING",
         "-s", str(tmp / "beat-schedule")],
        cwd=ROOT, env=env, stdout=open(tmp / "beat.log", "ab"),  # noqa: SIM115
        stderr=subprocess.STDOUT, start_new_session=True,
    )
    rt = Runtime(settings, notifiers=[LogNotifier()])
    plan: dict[str, str] = {}
    try:
        names = list(SCENARIOS)
        for i in range(args.sagas):
            scenario = names[i % len(names)]
            saga = SCENARIOS[scenario][0]
            plan[rt.engine.enqueue(saga, scenario_input(scenario, i))] = scenario
        chaos.note(started, f"enqueued {len(plan)}")
        _storm(args, rng, settings, rt, workers, names, stopper, env, tmp, chaos, started,
               plan)
    finally:
        stopper.release()
        for proc in [*workers, beat]:
            _kill(proc)
    figures = _count(rt, standin, plan)
    figures["liveness_violations"], stranded = liveness(rt)
    if stranded:
        figures["stranded"] = stranded
    rt.close()
    tally = read_tally(tmp / "tally.jsonl")
    if not tally["late_writes_won"]:
        del tally["late_writes_won_detail"]
    figures.update(tally)
    figures.update(kills=chaos.kills, flushes=chaos.flushes, pg_restarts=chaos.pg_restarts,
                   sigstops=stopper.done, db_error_rate=args.db_errors,
                   duplicates_published=chaos.duplicates,
                   wall_s=round(time.monotonic() - started, 1), seed=args.seed,
                   workers=args.workers, concurrency=args.concurrency)
    if args.verbose:
        print("\n".join(chaos.log), file=sys.stderr)
    return figures


def _storm(args: argparse.Namespace, rng: random.Random, settings: Settings, rt: Runtime,
           workers: list[subprocess.Popen[bytes]], names: list[str], stopper: Stopper,
           env: dict[str, str], tmp: Path, chaos: Chaos, started: float,
           plan: dict[str, str]) -> None:
    deadline = started + args.timeout
    next_kill = time.monotonic() + args.kill_every
    flush_at = started + args.kill_every * 1.5
    pg_at = started + args.kill_every * 2.5
    client = redis.Redis.from_url(args.redis_url)
    seen: set[int] = set()
    while time.monotonic() < deadline:
        now = time.monotonic()
        running = [i for i in range(len(workers)) if i != stopper.stopped_worker()]
        if chaos.kills < args.kills and now >= next_kill and running:
            i = rng.choice(running)  # not the stopped one: its resumed writes are the point
            _kill(workers[i])
            workers[i] = _start_worker(i, args, env, tmp, settings, names)
            chaos.kills += 1
            next_kill = now + args.kill_every
            chaos.note(started, f"SIGKILL worker {i}, restarted")
        if args.flush != "none" and not chaos.flushes and now >= flush_at:
            _flush(args, settings, client)
            chaos.flushes += 1
            chaos.note(started, f"Redis flushed ({args.flush})")
        if args.pg_restart and not chaos.pg_restarts and now >= pg_at:
            _restart_postgres()
            chaos.pg_restarts += 1
            chaos.note(started, "PostgreSQL restarted")
        try:
            what = stopper.tick(rt, workers, names, time.monotonic())
            if what:
                chaos.note(started, what)
            chaos.duplicates += _duplicate(rt, rng, args.duplicates, seen)
            if not stopper.busy(time.monotonic()) and _settled(rt, plan):
                chaos.note(started, "every saga settled")
                return
        except Exception as exc:  # the database is restarting: look again in a moment
            chaos.note(started, f"controller: {type(exc).__name__}")
        time.sleep(0.25)
    chaos.note(started, "time is up")


def _duplicate(rt: Runtime, rng: random.Random, share: float, seen: set[int]) -> int:
    """Publish a second copy of the message of a share of the step runs not seen yet."""
    import sqlalchemy as sa

    from sagaq.store.models import RUNS

    with rt.store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(RUNS.c.id, RUNS.c.saga_id, RUNS.c.task_name).where(
                RUNS.c.status.in_([StepStatus.SCHEDULED.value, StepStatus.RUNNING.value])
            )
        ).all()
    sent = 0
    for run_id, saga_id, task in rows:
        if run_id in seen:
            continue
        seen.add(run_id)
        if rng.random() < share:
            rt.app.send_task(task, args=[saga_id, run_id], queue=rt.settings.queue)
            sent += 1
    return sent


def _settled(rt: Runtime, plan: dict[str, str]) -> bool:
    import sqlalchemy as sa

    from sagaq.store.models import NOTIFICATIONS, SAGAS

    with rt.store.engine.connect() as conn:
        open_sagas = conn.execute(
            sa.select(sa.func.count()).select_from(SAGAS)
            .where(SAGAS.c.state.not_in([s.value for s in SETTLED]))
        ).scalar_one()
        undelivered = conn.execute(
            sa.select(sa.func.count()).select_from(NOTIFICATIONS)
            .where(NOTIFICATIONS.c.status.in_(["pending", "sending"]))
        ).scalar_one()
    return open_sagas == 0 and undelivered == 0


def _count(rt: Runtime, standin: StandIn, plan: dict[str, str]) -> dict[str, Any]:
    from bench.chaos_sagas import SCENARIOS

    ledger = standin.ledger
    per_action = ledger.per_action()
    raw_sends = ledger.raw_calls(op="send")
    figures: Counter[str] = Counter()
    by_scenario: dict[str, Counter[str]] = {s: Counter() for s in SCENARIOS}
    for saga_id, scenario in plan.items():
        _, expected, pages = SCENARIOS[scenario]
        story = by_scenario[scenario]
        story["enqueued"] += 1
        saga = rt.store.get_saga(saga_id)
        if saga is None or saga.state is SagaState.PENDING:
            figures["lost"] += 1
            continue
        if saga.state not in SETTLED:
            figures["stuck"] += 1
        if saga.state.value == expected:
            figures["expected_state"] += 1
            story["expected_state"] += 1
        runs = rt.store.step_runs(saga_id)
        landed_forward = {
            step for (sid, step, direction), n in per_action.items()
            if sid == saga_id and direction == "forward"
        }
        compensated = {
            step for (sid, step, direction), n in per_action.items()
            if sid == saga_id and direction == "compensate"
        }
        figures["duplicate_effects"] += sum(
            n - 1 for (sid, _, _), n in per_action.items() if sid == saga_id and n > 1
        )
        figures["duplicate_effects"] += sum(
            n - 1 for (sid, _), n in raw_sends.items() if sid == saga_id and n > 1
        )
        if expected == "compensated" and saga.state is SagaState.COMPENSATED:
            undoable = {r.step for r in runs if r.compensate_task}
            figures["missed_compensations"] += len((landed_forward & undoable) - compensated)
        figures["doubled_compensations"] += sum(
            n - 1 for (sid, _, d), n in per_action.items()
            if sid == saga_id and d == "compensate" and n > 1
        )
        figures["pages_expected"] += pages
        figures["pages_sent"] += len({
            n.incident for n in rt.store.notifications(saga_id)
            if n.kind == "page" and n.action == "trigger" and n.status == "sent"
        })
    return {
        "enqueued": len(plan),
        "expected_state": figures["expected_state"],
        "lost": figures["lost"],
        "stuck": figures["stuck"],
        "duplicate_effects": figures["duplicate_effects"],
        "missed_compensations": figures["missed_compensations"],
        "doubled_compensations": figures["doubled_compensations"],
        "pages_expected": figures["pages_expected"],
        "pages_sent": figures["pages_sent"],
        "replays": sum(1 for c in ledger.calls if c["replay"]),
        "by_scenario": {s: dict(c) for s, c in by_scenario.items()},
    }


def main(argv: list[str] | None = None) -> int:
    figures = run(argv)
    print(json.dumps(figures, indent=2))
    bad = [k for k in ("lost", "stuck", "duplicate_effects", "missed_compensations",
                       "doubled_compensations", "late_writes_raised", "liveness_violations")
           if figures[k]]  # liveness_violations is None where the store cannot tell
    if figures["expected_state"] != figures["enqueued"]:
        bad.append("expected_state")
    if figures["pages_sent"] != figures["pages_expected"]:
        bad.append("pages_sent")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
