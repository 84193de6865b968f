"""``python -m bench store``: what the store costs per step, without Celery or Redis.

One process drives the store's operations in a loop, as a worker would, on a database of its
own: enqueue, then claim and record each step. Cases, each timed per step execution:

  floor     one plain Postgres transaction per step (insert a row, update the parent, commit):
            the durable floor of the throughput benchmark, without Celery
  forward   a 5-step saga: enqueue, then claim + succeed (with the next dispatch) per step
  rollback  a 5-step saga failing at step 5, then claim + succeed of each of its 4
            compensations: ms per step execution (5 forward attempts + 4 compensations)

Read the ratios against the floor, measured in the same run: absolute numbers move with the
machine. The rounds are interleaved; medians are reported.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time
import uuid
from typing import Any

import psycopg

from bench.common import machine, scratch, table
from sagaq.keys import idempotency_key
from sagaq.ladder import Then
from sagaq.machine import Direction, SagaState
from sagaq.store import NewRun, Store
from sagaq.store.database import create_engine, upgrade

STEPS = 5
# Stores from before the one-statement advance (issue 11) take no saga name: so that this
# benchmark measures an older checkout too (PYTHONPATH=<old checkout>), it is passed only
# where accepted.
NAMED: dict[str, Any] = ({"saga_name": "bench"}
         if "saga_name" in inspect.signature(Store.succeed).parameters else {})


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench store", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--sagas", type=int, default=200, help="sagas per case and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny N: checks it runs (CI smoke)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.quick:
        args.sagas, args.rounds = 4, 1
    return args


def _run(saga_id: str, i: int, direction: Direction = Direction.FORWARD) -> NewRun:
    return NewRun(step=f"s{i}", step_index=i, direction=direction, attempt=1, task_name="t",
                  compensate_task="c", idempotency_key=idempotency_key(saga_id, f"s{i}",
                                                                       direction))


def _start(store: Store) -> tuple[str, int]:
    saga_id = str(uuid.uuid4())
    _, _, out = store.create_saga(saga_id=saga_id, name="bench", version="1", input={},
                                  key=None, first=_run(saga_id, 0))
    return saga_id, out[0].args[1]


def forward(store: Store, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        saga_id, run = _start(store)
        for i in range(STEPS):
            claim = store.claim(saga_id, run, worker="bench", task_id=None, lease=30)
            assert claim.run is not None
            nxt = _run(saga_id, i + 1) if i + 1 < STEPS else None
            out = store.succeed(saga_id, run, token=claim.run.deliveries, result={"i": i},
                                checkpoint={"results": {f"s{i}": i}, "data": {}},
                                next_run=nxt, worker="bench", task_id=None, **NAMED)
            assert out.won, out.note
            if nxt is not None:
                run = out.dispatches[0].args[1]
    return (time.perf_counter() - start) * 1000 / (n * STEPS)


def rollback(store: Store, n: int) -> float:
    start, executions = time.perf_counter(), 0
    for _ in range(n):
        saga_id, run = _start(store)
        for i in range(STEPS):
            claim = store.claim(saga_id, run, worker="bench", task_id=None, lease=30)
            assert claim.run is not None
            executions += 1
            if i + 1 < STEPS:
                out = store.succeed(saga_id, run, token=claim.run.deliveries, result={"i": i},
                                    checkpoint={"results": {}, "data": {}},
                                    next_run=_run(saga_id, i + 1), worker="bench",
                                    task_id=None, **NAMED)
                run = out.dispatches[0].args[1]
            else:
                out = store.fail(saga_id, run, token=claim.run.deliveries, error="no",
                                 error_type="TerminalError", failure="terminal",
                                 then=Then.ROLLBACK, worker="bench", task_id=None)
        while undo := [d for d in out.dispatches if d.task_name == "c"]:
            run = undo[0].args[1]
            claim = store.claim(saga_id, run, worker="bench", task_id=None, lease=30)
            assert claim.run is not None
            executions += 1
            out = store.succeed(saga_id, run, token=claim.run.deliveries, result={},
                                checkpoint=None, next_run=None, worker="bench", task_id=None)
        saga = store.get_saga_or_raise(saga_id)
        assert saga.state is SagaState.COMPENSATED, saga.state
    return (time.perf_counter() - start) * 1000 / executions


def floor(dsn: str, n: int) -> float:
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS floor_parent (id text PRIMARY KEY, n int)")
        conn.execute("CREATE TABLE IF NOT EXISTS floor_step (id bigserial PRIMARY KEY, "
                     "parent text, step int, at timestamptz)")
        conn.commit()
        start = time.perf_counter()
        for _ in range(n):
            parent = str(uuid.uuid4())
            conn.execute("INSERT INTO floor_parent VALUES (%s, 0)", (parent,))
            conn.commit()
            for i in range(STEPS):
                conn.execute("INSERT INTO floor_step (parent, step, at) VALUES (%s, %s, now())",
                             (parent, i))
                conn.execute("UPDATE floor_parent SET n = %s WHERE id = %s", (i, parent))
                conn.commit()
        return (time.perf_counter() - start) * 1000 / (n * STEPS)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    ms: dict[str, list[float]] = {"floor": [], "forward": [], "rollback": []}
    with scratch("store") as s:
        upgrade(s.url)
        store = Store(create_engine(s.url))
        try:
            forward(store, 5), rollback(store, 3), floor(s.dsn, 5)  # warm up
            for _ in range(args.rounds):
                ms["floor"].append(floor(s.dsn, args.sagas))
                ms["forward"].append(forward(store, args.sagas))
                ms["rollback"].append(rollback(store, args.sagas // 2))
        finally:
            store.dispose()
    med = {case: statistics.median(v) for case, v in ms.items()}
    result: dict[str, Any] = {
        "machine": machine(), "sagas": args.sagas, "rounds": args.rounds,
        "ms_per_step": {k: round(v, 3) for k, v in med.items()},
        "rounds_ms": {k: [round(x, 3) for x in v] for k, v in ms.items()},
        "forward_over_floor": round(med["forward"] / med["floor"], 3),
        "rollback_over_forward": round(med["rollback"] / med["forward"], 3),
    }
    if args.json:
        print(json.dumps(result))
        return 0
    rows = [{"case": k, "ms per step": f"{v:.3f}", "vs floor": f"{v / med['floor']:.2f}"}
            for k, v in med.items()]
    print(f"{args.sagas} sagas per case, median of {args.rounds} interleaved rounds\n")
    print(table(rows, ["case", "ms per step", "vs floor"]))
    print(f"\nforward/floor {result['forward_over_floor']}, "
          f"rollback/forward {result['rollback_over_forward']}")
    return 0
