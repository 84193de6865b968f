"""``python -m bench enqueue``: how fast app code can start sagas.

Enqueue throughput and latency (p50, p99) from one thread and from 8, on its own and
joining a caller's SQLAlchemy transaction (``enqueue(..., session=s)``; one transaction per
saga, committed by the caller). Each enqueue writes the saga, its first step run, its events
and its outbox row in one transaction and publishes after the commit. No worker runs: the
messages wait in this run's own Redis key space, which is removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

from sqlalchemy.orm import Session

from bench.common import REDIS_URL, machine, scratch, summary, table


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench enqueue", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--sagas", type=int, default=2000, help="enqueues per variant")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--seed", type=int, default=1, help="recorded; nothing random today")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    from sagaq import Runtime, Settings
    from sagaq.notify import LogNotifier
    from sagaq.store.database import upgrade

    args = parse(argv)
    n = 100 if args.quick else args.sagas
    variants: dict[str, dict[str, Any]] = {}
    with scratch("enqueue") as s:
        upgrade(s.url)
        settings = Settings(database_url=s.url, broker_url=REDIS_URL, redis_prefix=s.prefix,
                            queue=s.queue, imports=("bench.sagas",),
                            pool_size=args.threads, max_overflow=2)
        rt = Runtime(settings, notifiers=[LogNotifier()])
        try:
            for joined in (False, True):
                for threads in (1, args.threads):
                    name = f"{threads} thread{'s' if threads > 1 else ''}" + (
                        ", in a caller transaction" if joined else "")
                    variants[name] = _variant(rt, n, threads, joined)
        finally:
            rt.close()
    return {"sagas": n, "machine": machine(), "variants": variants, "seed": args.seed}


def _variant(rt: Any, n: int, threads: int, joined: bool) -> dict[str, Any]:
    for _ in range(20):  # warm: connections open, statements prepared
        rt.engine.enqueue("bench_five", {})
    latencies: list[float] = []
    lock = threading.Lock()
    share = [n // threads + (1 if i < n % threads else 0) for i in range(threads)]

    def work(count: int) -> None:
        mine = []
        for _ in range(count):
            start = time.perf_counter()
            if joined:
                with Session(rt.store.engine) as session, session.begin():
                    rt.engine.enqueue("bench_five", {"joined": True}, session=session)
            else:
                rt.engine.enqueue("bench_five", {})
            mine.append(time.perf_counter() - start)
        with lock:
            latencies.extend(mine)

    pool = [threading.Thread(target=work, args=(c,)) for c in share]
    t0 = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - t0
    return {"per_s": round(n / elapsed, 1), "threads": threads, "joined": joined,
            **summary(latencies)}


def render(out: dict[str, Any]) -> str:
    rows = [{"variant": k, "enqueues/s": v["per_s"], "p50 ms": v["p50_ms"],
             "p99 ms": v["p99_ms"]} for k, v in out["variants"].items()]
    return (f"{out['sagas']} enqueues per variant, {out['machine']['cpus']} CPUs\n\n"
            + table(rows, ["variant", "enqueues/s", "p50 ms", "p99 ms"]))


def main(argv: list[str] | None = None) -> int:
    out = run(argv)
    print(json.dumps(out, indent=2) if parse(argv).json else render(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
