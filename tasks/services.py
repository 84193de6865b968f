"""Stand-ins for the external systems a saga writes to (an identity provider, a CRM, ...).

Each records every call with its idempotency key and honours the key: a second call with
the same key returns the first call's record and lands nothing new. So "the effect landed
exactly once" is counted (``effects``), and "the engine called twice" is visible too
(``calls``).
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Any

from sagaq import StepContext, TerminalError, TransientError


@dataclass(frozen=True)
class Call:
    system: str
    op: str
    key: str
    saga_id: str
    step: str
    replay: bool  # True when the key had been seen: nothing new landed


@dataclass
class StandIn:
    """One external system, in process."""

    system: str
    calls: list[Call] = field(default_factory=list)
    _records: dict[str, dict[str, Any]] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def call(
        self, ctx: StepContext, op: str, payload: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Apply ``op`` once per idempotency key; replays return the first record."""
        with self._lock:
            replay = ctx.key in self._records
            self.calls.append(Call(self.system, op, ctx.key, ctx.saga_id, ctx.step, replay))
            if not replay:
                self._records[ctx.key] = {
                    "id": f"{self.system}-{next(self._ids)}",
                    "op": op,
                    **(payload or {}),
                }
            return dict(self._records[ctx.key])

    def landed(self, key: str) -> bool:
        with self._lock:
            return key in self._records

    def effects(self, *, saga_id: str | None = None, op: str | None = None) -> list[Call]:
        """Calls that landed something new, in order."""
        with self._lock:
            return [
                c
                for c in self.calls
                if not c.replay
                and (saga_id is None or c.saga_id == saga_id)
                and (op is None or c.op == op)
            ]

    def reset(self) -> None:
        with self._lock:
            self.calls.clear()
            self._records.clear()


SYSTEMS = (
    "identity", "iam", "runtime", "vault", "crm", "billing", "email",
    "seats", "payments", "licenses", "tickets", "chat",
)
services: dict[str, StandIn] = {name: StandIn(name) for name in SYSTEMS}


def all_calls(saga_id: str | None = None) -> list[Call]:
    calls = [c for s in services.values() for c in s.calls]
    return [c for c in calls if saga_id is None or c.saga_id == saga_id]


def reset() -> None:
    for s in services.values():
        s.reset()
    model.reset()


class Model:
    """A stand-in for an LLM: answers JSON, except on the tiers the input calls weak.

    A weak tier answers prose instead of the JSON asked for, the classic invalid output; a
    re-prompt that carries the earlier errors does not help it, a stronger tier does.
    """

    def __init__(self) -> None:
        self.prompts: list[tuple[str, str, str]] = []  # (saga_id, tier, prompt)
        self._lock = threading.Lock()

    def complete(self, ctx: StepContext, prompt: str, weak: tuple[str, ...]) -> str:
        with self._lock:
            self.prompts.append((ctx.saga_id, ctx.tier or "", prompt))
        if ctx.tier in weak:
            return "Sure! This ticket looks like a billing question, probably."
        return '{"queue": "billing", "priority": "high"}'

    def reset(self) -> None:
        with self._lock:
            self.prompts.clear()


model = Model()


def simulate(ctx: StepContext, inp: dict[str, Any]) -> None:
    """Faults the demo and the tests ask for in the saga input, under ``"simulate"``.

    ``{"fail": "step"}`` fails that step terminally; ``{"flaky": {"step": n}}`` fails it
    transiently on its first ``n`` attempts; ``{"always_flaky": "step"}`` on every attempt;
    ``{"fail_compensation": "step"}`` makes that step's compensation fail every time.
    """
    sim = inp.get("simulate", {}) if isinstance(inp, dict) else {}
    if ctx.compensating:
        if sim.get("fail_compensation") == ctx.step:
            raise TransientError(f"{ctx.step}: the undo endpoint answers 503")
        return
    if sim.get("fail") == ctx.step:
        raise TerminalError(f"{ctx.step}: rejected by the remote system (422)")
    if sim.get("always_flaky") == ctx.step:
        raise TransientError(f"{ctx.step}: upstream answers 503 (attempt {ctx.attempt})")
    if ctx.attempt <= int(sim.get("flaky", {}).get(ctx.step, 0)):
        raise TransientError(f"{ctx.step}: upstream timed out (attempt {ctx.attempt})")
