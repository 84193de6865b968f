"""The crash-point sweep (DESIGN §4.13): every commit, interrupted, and nothing stranded.

Every commit of the store goes through one place that calls a fault hook before the commit,
after it, and after the publish (``sagaq.store.faults``). For each saga shape of
:mod:`tests.sweep` (happy, rollback, failure after the pivot with an operator's retry, an
approval of the first step, unknown outcomes with and without ``verify``, a compensation that
fails, an ``at_most_once`` step, a durable wait, an orphaned resource, a lost message, a saga
stranded by hand, a stalled rollback), a clean run records every crash point it passes; then
the shape runs again once per point, with a crash (a ``BaseException``, the SIGKILL stand-in)
or a database error there. Recovery is the redelivered message and reconciler passes with the
clock moved past every lease. After each run: the saga ended as its shape allows, had a way
forward at every quiet moment, left nothing in flight, its effects landed once, and a
rollback undid them in reverse order.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from sagaq.store.faults import Phase, Write
from tests import sweep
from tests.sweep import SHAPES, Faults, Point, Shape, check, make_driver, run_shape

SAGAQ = Path(__file__).resolve().parents[2] / "sagaq"
swept: dict[str, set[tuple[Write, Phase]]] = {}
counts: dict[str, int] = {}


@pytest.fixture(scope="module")
def url(make_database: Callable[[str], str]) -> str:
    made = make_database("sweep")
    # The sweep simulates its crashes; it needs no fsync per commit, only speed.
    with sa.create_engine(made, isolation_level="AUTOCOMMIT").connect() as conn:
        name = conn.execute(sa.text("SELECT current_database()")).scalar()
        conn.execute(sa.text(f'ALTER DATABASE "{name}" SET synchronous_commit TO off'))
    return made


def _baseline(url: str, shape: Shape) -> list[Point]:
    faults = Faults()
    driver = make_driver(url, faults)
    saga_id = run_shape(driver, shape)
    wrong = check(driver, shape, saga_id)
    assert not wrong, f"{shape.name} without any fault: {wrong}"
    points: list[Point] = []
    seen: dict[tuple[Write, Phase], int] = {}
    for wp in faults.seen:
        seen[wp] = seen.get(wp, 0) + 1
        # every point once, and each point's last time too (a later step's claim, say)
    for (write, phase), n in seen.items():
        points.append(Point(write, phase, 1))
        if n > 1:
            points.append(Point(write, phase, n))
    swept[shape.name] = set(seen)
    return points


@pytest.mark.parametrize("shape", SHAPES, ids=[s.name for s in SHAPES])
def test_every_crash_point_of_the_shape_recovers_with_nothing_stranded(
    url: str, shape: Shape
) -> None:
    started = time.monotonic()
    points = _baseline(url, shape)
    failures: list[str] = []
    runs = 0
    for point in points:
        # A database error cannot strike after the publish; at a later occurrence of a
        # point (a later step's claim, say) one kind of fault is enough.
        kinds = ["crash"] if point.phase is Phase.PUBLISHED or point.nth > 1 else [
            "crash", "db_error"]
        for kind in kinds:
            faults = Faults()
            faults.target, faults.kind = point, kind
            driver = make_driver(url, faults)
            saga_id = run_shape(driver, shape)
            runs += 1
            wrong = check(driver, shape, saga_id)
            if not faults.fired:
                wrong.append("the fault never fired (the run took another path)")
            if wrong:
                failures.append(f"{shape.name} {kind} at {point}: {'; '.join(wrong)}")
    counts[shape.name] = runs
    assert not failures, "\n".join(failures)
    assert runs >= len(points), "every point was swept"
    print(f"{shape.name}: {len(points)} points, {runs} faulty runs, "
          f"{time.monotonic() - started:.1f}s")


def test_the_sweep_reaches_every_commit_the_store_makes(url: str) -> None:
    """A commit added without passing through the crash points (or that no shape reaches)
    fails here: the sweep stays complete."""
    reached: set[tuple[Write, Phase]] = set()
    for shape in SHAPES:
        if shape.name not in swept:
            _baseline(url, shape)
        reached |= swept[shape.name]
    missing = [f"{w.value}/{p.value}" for w in Write for p in (Phase.BEFORE, Phase.AFTER)
               if (w, p) not in reached]
    assert not missing, f"crash points no shape reaches: {missing}"


def test_no_commit_bypasses_the_one_place_where_the_store_commits() -> None:
    """Transactions begin, and autocommit connections open, only in ``Database.write``."""
    offenders = []
    for path in SAGAQ.rglob("*.py"):
        if "migrations" in path.parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if re.search(r"\.begin\(\)|\.commit\(\)|autocommit\.connect\(\)", line):
                offenders.append(f"{path.relative_to(SAGAQ.parent)}:{number}: {line.strip()}")
    assert offenders == [
        "sagaq/store/db.py:" + offenders[0].split(":")[1] + ": "
        "with self.autocommit.connect() as conn:",
        "sagaq/store/db.py:" + offenders[1].split(":")[1] + ": "
        "with self.engine.begin() as conn:",
    ], "\n".join(offenders)


def test_shapes_cover_what_the_issue_names() -> None:
    names = {s.name for s in SHAPES}
    assert {"happy", "rollback", "after_pivot", "approval", "unknown_verify", "unknown_blind",
            "compensation_fails", "at_most_once"} <= names
    assert names >= sweep.ALLOWED_PAGE
