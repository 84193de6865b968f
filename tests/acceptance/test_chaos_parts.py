"""The chaos run's pieces that need no workers: the fault hook the workers install on the
store, the tally they append to, and the options the run refuses (the full run is in
tests/acceptance/test_chaos.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from enum import Enum
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from bench import chaos
from bench.chaos_stops import fault_hook, label, read_tally, tally

ROOT = Path(__file__).resolve().parents[2]


class Phase(Enum):  # the shape of sagaq.store.faults.Phase, as far as the hook cares
    BEFORE = "before"
    AFTER = "after"
    PUBLISHED = "published"


class Write(str, Enum):
    CLAIM = "claim"
    SUCCEED = "succeed"


def test_the_hook_fails_only_the_chosen_phases_and_tallies_each_error(tmp_path: Path) -> None:
    path = str(tmp_path / "tally.jsonl")
    hook = fault_hook(1.0, (Phase.BEFORE, Phase.AFTER), path)
    for write in Write:
        for phase in (Phase.BEFORE, Phase.AFTER):
            with pytest.raises(OperationalError) as info:
                hook(write, phase)
            assert "injected by chaos" in str(info.value.orig)
        hook(write, Phase.PUBLISHED)  # not a commit: never failed
    totals = read_tally(Path(path))
    assert totals["db_errors_injected"] == 4
    assert totals["crash_points_swept"] == 4  # distinct (write, phase) pairs
    lines = [json.loads(line) for line in Path(path).read_text().splitlines()]
    assert {(e["write"], e["phase"]) for e in lines} == {
        ("claim", "before"), ("claim", "after"), ("succeed", "before"), ("succeed", "after")}
    assert all(e["pid"] == os.getpid() and e["kind"] == "db_error" for e in lines)


def test_a_rate_of_0_never_fails_and_a_share_fails_about_that_share(tmp_path: Path) -> None:
    never = fault_hook(0.0, (Phase.BEFORE,), str(tmp_path / "none.jsonl"))
    for _ in range(200):
        never(Write.CLAIM, Phase.BEFORE)
    assert not (tmp_path / "none.jsonl").exists()
    some = fault_hook(0.25, (Phase.BEFORE,), str(tmp_path / "some.jsonl"), seed=7)
    failed = 0
    for _ in range(2000):
        try:
            some(Write.CLAIM, Phase.BEFORE)
        except OperationalError:
            failed += 1
    assert 400 <= failed <= 600
    assert read_tally(tmp_path / "some.jsonl")["db_errors_injected"] == failed


def test_the_tally_totals_late_writes_and_skips_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "tally.jsonl"
    tally(str(path), "late_write_lost", write="succeed", note="run 3 is no longer running")
    tally(str(path), "late_write_lost", write="fail", note="run 4 is no longer running")
    tally(str(path), "late_write_won", write="succeed", note="")
    tally(str(path), "late_write_raised", write="fail", error="IntegrityError")
    tally(str(path), "redelivered", task="t")
    with open(path, "a") as f:
        f.write('{"kind": "db_err')  # a process killed mid-line
    tally("", "late_write_won")  # no file named: nothing written anywhere
    totals = read_tally(path)
    assert (totals["late_writes_lost"], totals["late_writes_won"], totals["late_writes_raised"],
            totals["redeliveries"]) == (2, 1, 1, 1)
    assert totals["late_writes_won_detail"][0]["write"] == "succeed"
    assert read_tally(tmp_path / "absent.jsonl")["db_errors_injected"] == 0


def test_labels_are_the_values_of_text_enums_and_the_names_of_others() -> None:
    assert label(Write.CLAIM) == "claim"
    assert label(Phase.AFTER) == "after"

    class Numbered(Enum):
        FIRST = 1

    assert label(Numbered.FIRST) == "FIRST"
    assert label(("claim", 2)) == "('claim', 2)"


def _refused(*argv: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "chaos", *argv], cwd=ROOT, capture_output=True,
        text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 2 and done.stdout == "", done.stderr
    return done.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(("argv", "message"), [
    (["--db-errors", "1"], "--db-errors is a share of commits: at least 0 and below 1"),
    (["--db-errors", "-0.1"], "--db-errors is a share of commits: at least 0 and below 1"),
    (["--sigstop", "-1"], "--sigstop counts stops: 0 or more"),
    (["--visibility-timeout", "5"], "--visibility-timeout must exceed the step lease of 6 s"),
])
def test_bad_chaos_options_are_refused_before_anything_starts(
    argv: list[str], message: str
) -> None:
    # Refused by the parser: no database is created, no worker started.
    assert _refused(*argv).endswith(f"error: {message}")


def test_db_errors_need_the_store_s_fault_hook() -> None:
    try:
        import sagaq.store.faults  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        assert _refused("--db-errors", "0.05").endswith(
            "error: --db-errors needs the store's fault hook (sagaq.store.faults), which this "
            "checkout does not have")
    else:
        args = chaos.parse(["--db-errors", "0.05"])
        assert args.db_errors == 0.05


def test_a_sigstop_run_shortens_the_visibility_timeout_and_outlasts_it() -> None:
    args = chaos.parse(["--sigstop", "2"])
    assert (args.visibility_timeout, args.sigstop_for) == (8.0, 12.0)
    args = chaos.parse([])
    assert (args.sigstop, args.visibility_timeout, args.db_errors) == (0, 60.0, 0.0)
    args = chaos.parse(["--sigstop", "1", "--visibility-timeout", "10", "--sigstop-for", "15"])
    assert (args.visibility_timeout, args.sigstop_for) == (10.0, 15.0)
