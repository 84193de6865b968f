"""Cases C and D of the throughput benchmark: 5 no-op steps, and the same failing at step
5 after four steps that then compensate."""

from __future__ import annotations

from typing import Any

from sagaq import Saga, StepContext, TerminalError

five = Saga("bench_five")
rollback = Saga("bench_rollback")


def _noop(ctx: StepContext, inp: Any) -> None:
    return None


def _fail(ctx: StepContext, inp: Any) -> None:
    raise TerminalError("step 5 fails on purpose")


for _i in range(1, 6):
    five.step(name=f"s{_i}", compensate=_noop)(_noop)
    rollback.step(name=f"s{_i}", compensate=_noop)(_fail if _i == 5 else _noop)
