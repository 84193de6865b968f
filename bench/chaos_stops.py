"""The chaos run's stopped processes, and what the workers tallied.

A SIGSTOPped process keeps its database connections, its Redis connection and its
unacknowledged messages, and does nothing: no heartbeat, no time limit (in prefork the parent
enforces it, and the parent is stopped too). Stopped past its step's lease, the reconciler
takes the step over; past the visibility timeout, Redis hands its messages to another worker.
Resumed, the process finishes the step it was in and tries to record it: that late write
must lose. The stop targets a worker in the middle of a step: the whole worker (its process
group, so no parent kills the child; the child is resumed a second before its parent) or,
every other time, only the pool child running it (its parent then kills it at the step's
hard time limit, a kill in slow motion).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import OperationalError

from sagaq import Runtime
from sagaq.machine import StepStatus
from sagaq.store.models import RUNS

Hook = Callable[[Any, Any], None]
SETTLE_AFTER_CONT = 3.0  # seconds the run goes on after a SIGCONT: the zombie's writes land
CHILD_HEAD_START = 1.0  # seconds the stopped step's process runs before its parent resumes
STOP_CHECK = 0.3  # after a SIGSTOP, the step must still be running this long after: mid-step


@dataclass
class Stop:
    worker: int
    pid: int
    child: int  # the pool process running the step
    whole: bool  # the process group of the worker, or only one pool child
    until: float
    step: str
    run_id: int


@dataclass
class Stopper:
    count: int
    duration: float
    next_at: float
    every: float
    done: int = 0
    current: Stop | None = None
    resumed_at: float = -1e9
    history: list[Stop] = field(default_factory=list)

    def stopped_worker(self) -> int | None:
        return self.current.worker if self.current else None

    def busy(self, now: float) -> bool:
        """A worker is stopped, or was resumed so recently that its late writes may be due."""
        return self.current is not None or now < self.resumed_at + SETTLE_AFTER_CONT

    def tick(self, rt: Runtime, workers: list[subprocess.Popen[bytes]], names: list[str],
             now: float) -> str | None:
        """Resume a stop that lasted long enough, or start the next one; says what it did."""
        if self.current is not None:
            if now < self.current.until:
                return None
            stop, self.current = self.current, None
            self.resumed_at, self.next_at = now, now + self.every
            with contextlib.suppress(ProcessLookupError):  # a stopped child may be killed
                # The child first: resumed together, its parent would kill it at once (its
                # time limit is long past) and the late write would rarely be tried.
                os.kill(stop.child, signal.SIGCONT)
                if stop.whole:
                    time.sleep(CHILD_HEAD_START)
                    os.killpg(stop.pid, signal.SIGCONT)
            return f"SIGCONT {'worker' if stop.whole else 'child'} {stop.worker} ({stop.pid})"
        if self.done >= self.count or now < self.next_at:
            return None
        target = _running_step(rt, names)
        if target is None:
            return None  # nothing in flight right now: look again at the next tick
        worker, child, step, run_id = target
        whole = self.done % 2 == 0
        pid = workers[worker].pid if whole else child
        try:
            if whole:
                os.killpg(pid, signal.SIGSTOP)
            else:
                os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            return None
        time.sleep(STOP_CHECK)
        try:
            caught = _still_running(rt, run_id)
        except Exception:  # the database is restarting: never leave a process stopped
            _resume(pid, whole)
            raise
        if not caught:  # it finished (or its commit was in flight): the stop caught nothing
            _resume(pid, whole)  # mid-step; try again at the next tick
            return None
        self.current = Stop(worker, pid, child, whole, now + self.duration, step, run_id)
        self.history.append(self.current)
        self.done += 1
        return (f"SIGSTOP {'worker' if whole else 'child'} {worker} ({pid}) in step {step} "
                f"(run {run_id}) for {self.duration:g}s")

    def release(self) -> None:
        """Resume whatever is still stopped (the run is ending: processes get killed next)."""
        if self.current is not None:
            _resume(self.current.pid, self.current.whole)
            self.current = None


def _resume(pid: int, whole: bool) -> None:
    with contextlib.suppress(ProcessLookupError):
        if whole:
            os.killpg(pid, signal.SIGCONT)
        else:
            os.kill(pid, signal.SIGCONT)


def _still_running(rt: Runtime, run_id: int) -> bool:
    with rt.store.engine.connect() as conn:
        status = conn.execute(sa.select(RUNS.c.status).where(RUNS.c.id == run_id)).scalar()
    return bool(status == StepStatus.RUNNING.value)


def _running_step(rt: Runtime, names: list[str]) -> tuple[int, int, str, int] | None:
    """A step run in flight on one of the current workers: (worker, child pid, step, run)."""
    with rt.store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(RUNS.c.id, RUNS.c.step, RUNS.c.worker)
            .where(RUNS.c.status == StepStatus.RUNNING.value)
            .order_by(RUNS.c.id)
        ).all()
    for run_id, step, worker in rows:
        host, _, pid = (worker or "").rpartition("/")
        for i, name in enumerate(names):
            if host.startswith(f"{name}@") and pid.isdigit():
                return i, int(pid), step, int(run_id)
    return None


def label(value: Any) -> str:
    """A stable name for a write or a phase, whatever shape the store gives it."""
    if isinstance(value, Enum):
        return str(value.value) if isinstance(value.value, str) else value.name
    return str(value)


def tally(path: str, kind: str, **fields: Any) -> None:
    """Append one line; O_APPEND keeps lines from several processes whole."""
    if not path:
        return
    line = json.dumps({"kind": kind, "pid": os.getpid(), **fields}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def fault_hook(rate: float, phases: tuple[Any, ...], path: str, seed: int = 0) -> Hook:
    """``hook(write, phase)``: at one of ``phases``, raise a database error with probability
    ``rate``, and tally it first. Each process draws from its own generator (forked children
    would otherwise all draw the same sequence)."""
    rngs: dict[int, random.Random] = {}

    def hook(write: Any, phase: Any) -> None:
        if phase not in phases:
            return
        rng = rngs.setdefault(os.getpid(), random.Random(seed * 100_003 + os.getpid()))
        if rng.random() >= rate:
            return
        tally(path, "db_error", write=label(write), phase=label(phase))
        raise OperationalError("injected", {}, Exception("injected by chaos"))

    return hook


def read_tally(path: Path) -> dict[str, Any]:
    """Totals of the lines the workers appended (see bench.chaos_worker)."""
    kinds: Counter[str] = Counter()
    points: set[tuple[str, str]] = set()
    won: list[dict[str, Any]] = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:  # a process killed mid-write: a torn last line
                continue
            kinds[entry["kind"]] += 1
            if entry["kind"] == "db_error":
                points.add((entry["write"], entry["phase"]))
            if entry["kind"] == "late_write_won":
                won.append(entry)
    return {
        "db_errors_injected": kinds["db_error"],
        "crash_points_swept": len(points),
        "late_writes_lost": kinds["late_write_lost"],
        "late_writes_won": kinds["late_write_won"],
        "late_writes_raised": kinds["late_write_raised"],
        "late_writes_won_detail": won[:10],
        "redeliveries": kinds["redelivered"],
    }


def liveness(rt: Runtime) -> tuple[int | None, list[dict[str, str]]]:
    """``len(store.stranded())``: non-terminal sagas with no way forward (DESIGN §4.13);
    None where the store cannot tell yet (no ``stranded``)."""
    stranded = getattr(rt.store, "stranded", None)
    if stranded is None:
        return None, []
    found = list(stranded())
    return len(found), [{"saga_id": str(s.saga_id), "reason": str(s.reason)} for s in found[:10]]
