"""The escalation ladder on a real worker: the exact rungs each scripted failure climbs.

Every rung the engine passes is a ``ladder.rung`` event on the timeline (level, whether it
applied, what it did, and in which direction). These tests read the climb back from Postgres
and check it against the sequence the ladder table promises, one row of the table at a time,
together with what the step saw (errors, tier, checkpoint) and what landed at the stand-ins.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sagaq import Direction, SagaState, StepStatus
from sagaq.commands import story
from sagaq.store import NotificationRecord, StepRunRecord
from tasks.services import model, services
from tests.sagas import ledger

FWD, COMP = "forward", "compensate"
OK, FAILED = StepStatus.SUCCEEDED, StepStatus.FAILED
Rung = tuple[int, bool, str, str]  # level, applicable, action, direction

SUBSCRIPTION = {"plan": "pro", "amount": 30, "email": "ada@example.com"}


def rungs(runtime: Any, saga_id: str) -> list[Rung]:
    return [
        (e.data["level"], e.data["applicable"], e.data["action"], e.data["direction"])
        for e in runtime.store.events(saga_id)
        if e.kind == "ladder.rung"
    ]


def runs_of(
    runtime: Any, saga_id: str, step: str, direction: Direction = Direction.FORWARD
) -> list[StepRunRecord]:
    return [
        r for r in runtime.store.step_runs(saga_id) if r.step == step and r.direction is direction
    ]


def compensations(runtime: Any, saga_id: str) -> list[StepRunRecord]:
    return [r for r in runtime.store.step_runs(saga_id) if r.direction is Direction.COMPENSATE]


def wait_for(what: str, check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def delivered(runtime: Any, saga_id: str) -> list[NotificationRecord]:
    """The saga's notifications, once none of them is still waiting to be delivered."""

    def done() -> bool:
        found = runtime.store.notifications(saga_id)
        return bool(found) and all(n.status in ("sent", "failed") for n in found)

    wait_for("every notification to be delivered", done)
    return runtime.store.notifications(saga_id)


def page_channels(runtime: Any) -> list[str]:
    return sorted(
        name for name, n in runtime.notifiers.items() if "page" in {k.value for k in n.kinds}
    )


# -- rung 0: transient ----------------------------------------------------------------------


def test_transient_twice_then_success_climbs_rung_zero_twice(runtime, worker, wait_settled):
    saga_id = runtime.engine.enqueue("quad", {"simulate": {"flaky": {"s2": 2}}})
    assert wait_settled(saga_id) == [SagaState.COMPLETED]

    assert rungs(runtime, saga_id) == [(0, True, "retry", FWD), (0, True, "retry", FWD)]
    s2 = runs_of(runtime, saga_id, "s2")
    assert [(r.attempt, r.status, r.level) for r in s2] == [
        (1, FAILED, 0),
        (2, FAILED, 0),
        (3, OK, 0),
    ]
    assert [r.failure for r in s2[:2]] == ["transient", "transient"]
    assert [c.step for c in ledger.effects(saga_id=saga_id, op="do")] == ["s1", "s2", "s3", "s4"]
    assert len([c for c in ledger.calls if c.saga_id == saga_id and c.step == "s2"]) == 1
    assert story(runtime.store, saga_id).rungs() == [0, 0]


# -- rungs 1 and 2: a model step ------------------------------------------------------------


def test_model_step_is_reprompted_with_its_errors_then_switches_to_the_large_tier(
    runtime, worker, wait_settled
):
    inp = {"ticket": "I was charged twice", "weak_tiers": ["small"]}
    saga_id = runtime.engine.enqueue("ticket_triage", inp)
    assert wait_settled(saga_id) == [SagaState.COMPLETED]

    assert rungs(runtime, saga_id) == [
        (1, True, "re-prompt", FWD),
        (1, True, "re-prompt", FWD),
        (2, True, "switch tier", FWD),
    ]
    assert story(runtime.store, saga_id).rungs() == [1, 1, 2]

    prompts = [(tier, prompt) for sid, tier, prompt in model.prompts if sid == saga_id]
    assert [tier for tier, _ in prompts] == ["small", "small", "small", "large"]
    first_error = "the small model did not answer JSON"
    assert "rejected" not in prompts[0][1]
    for n, (_, prompt) in enumerate(prompts[1:], start=1):
        # each re-prompt carries every earlier error, oldest first
        assert prompt.count(first_error) == n, prompt

    runs = runs_of(runtime, saga_id, "classify_ticket")
    assert [(r.attempt, r.status, r.level) for r in runs] == [
        (1, FAILED, 0), (2, FAILED, 1), (3, FAILED, 1), (4, OK, 2),
    ]  # fmt: skip
    assert [r.failure for r in runs[:3]] == ["logical"] * 3
    assert all(r.tier in (None, "small") for r in runs[:3]), [r.tier for r in runs]
    assert runs[3].tier == "large"
    assert runs[3].result == {"queue": "billing", "priority": "high", "tier": "large"}
    record = runtime.store.get_saga_or_raise(saga_id)
    assert record.checkpoint["results"]["classify_ticket"]["tier"] == "large"
    assert [c.op for c in services["tickets"].effects(saga_id=saga_id)] == ["route"]


def test_model_step_failing_on_every_tier_climbs_to_rung_three_and_rolls_back(
    runtime, worker, wait_settled
):
    inp = {"ticket": "help", "weak_tiers": ["small", "large"]}
    saga_id = runtime.engine.enqueue("ticket_triage", inp)
    assert wait_settled(saga_id) == [SagaState.COMPENSATED]

    assert rungs(runtime, saga_id) == [
        (1, True, "re-prompt", FWD),
        (1, True, "re-prompt", FWD),
        (2, True, "switch tier", FWD),
        (3, True, "compensate", FWD),
    ]
    assert story(runtime.store, saga_id).rungs() == [1, 1, 2, 3]
    runs = runs_of(runtime, saga_id, "classify_ticket")
    assert [(r.status, r.level) for r in runs] == [
        (FAILED, 0),
        (FAILED, 1),
        (FAILED, 1),
        (FAILED, 2),
    ]
    assert runs[-1].tier == "large"
    # classify has no side effect, so there is nothing to undo, and nothing later ran
    (plan,) = [e for e in runtime.store.events(saga_id) if e.kind == "rollback.plan"]
    assert plan.data["compensate"] == []
    assert compensations(runtime, saga_id) == []
    assert services["tickets"].calls == [] and services["chat"].calls == []
    assert [e.kind for e in runtime.store.events(saga_id) if e.kind.startswith("saga.")][-2:] == [
        "saga.compensating",
        "saga.compensated",
    ]


# -- after the pivot: rung 0 for the budget, 1-3 not applicable, 4 -------------------------------


def test_retryable_step_after_the_pivot_spends_its_budget_then_pages_once(
    runtime, worker, settings, wait_settled
):
    inp = {**SUBSCRIPTION, "simulate": {"always_flaky": "provision_license"}}
    saga_id = runtime.engine.enqueue("subscription", inp)
    assert wait_settled(saga_id) == [SagaState.NEEDS_HUMAN]

    budget = settings.retryable_retries
    assert budget != settings.retries  # so that the larger after-pivot budget is what counted
    assert rungs(runtime, saga_id) == [
        *[(0, True, "retry", FWD)] * budget,
        (1, False, "not applicable", FWD),
        (2, False, "not applicable", FWD),
        (3, False, "not applicable", FWD),
        (4, True, "page", FWD),
    ]
    assert story(runtime.store, saga_id).rungs() == [0] * budget + [1, 2, 3, 4]
    licence = runs_of(runtime, saga_id, "provision_license")
    assert [(r.attempt, r.status) for r in licence] == [(n, FAILED) for n in range(1, budget + 2)]

    # nothing is compensated after the pivot, and nothing after the failing step ran
    assert compensations(runtime, saga_id) == []
    assert "saga.compensating" not in [e.kind for e in runtime.store.events(saga_id)]
    assert [c.op for c in services["seats"].effects(saga_id=saga_id)] == ["reserve"]
    assert [c.op for c in services["payments"].effects(saga_id=saga_id)] == ["charge"]
    assert services["email"].calls == []

    record = runtime.store.get_saga_or_raise(saga_id)
    assert record.incident == 1
    notes = delivered(runtime, saga_id)
    pages = [n for n in notes if n.kind == "page"]
    assert sorted(n.channel for n in pages) == page_channels(runtime)
    assert [(n.action, n.status, n.incident) for n in pages] == [("trigger", "sent", 1)] * len(
        page_channels(runtime)
    )
    assert story(runtime.store, saga_id).pages() == 1


# -- environmental failure: refresh --------------------------------------------------------


def test_environmental_failure_refreshes_the_checkpoint_and_restarts_the_step(
    runtime, worker, wait_settled
):
    saga_id = runtime.engine.enqueue("envy", {})
    assert wait_settled(saga_id) == [SagaState.COMPLETED]

    assert rungs(runtime, saga_id) == [(0, True, "refresh", FWD)]
    runs = runs_of(runtime, saga_id, "write_row")
    assert [(r.attempt, r.status, r.error_type) for r in runs] == [
        (1, FAILED, "EnvironmentalError"),
        (2, OK, None),
    ]
    assert runs[0].failure == "environmental"
    record = runtime.store.get_saga_or_raise(saga_id)
    assert record.checkpoint["data"] == {"schema": 2}
    effects = ledger.effects(saga_id=saga_id)
    assert [(c.step, c.op) for c in effects] == [("write_row", "write")]
    assert runs[1].result["schema"] == 2


# -- rung 1 from a validate hook -----------------------------------------------------------


def test_validate_rejecting_a_result_reprompts_with_the_rejection_in_context(
    runtime, worker, wait_settled
):
    saga_id = runtime.engine.enqueue("checked", {})
    assert wait_settled(saga_id) == [SagaState.COMPLETED]

    assert rungs(runtime, saga_id) == [(1, True, "re-prompt", FWD)]
    first, second = runs_of(runtime, saga_id, "answer")
    assert (first.status, first.error_type, first.failure) == (FAILED, "LogicalError", "logical")
    assert "validate rejected" in (first.error or "")
    assert second.status is OK and second.level == 1
    assert second.result["attempt"] == 2 and second.result["level"] == 1
    (error,) = second.result["errors"]
    assert "validate rejected the result of answer" in error


# -- rung 4: a compensation that keeps failing ---------------------------------------------


def test_failing_compensation_climbs_its_own_ladder_then_pages_once(
    runtime, worker, settings, wait_settled
):
    saga_id = runtime.engine.enqueue(
        "quad", {"simulate": {"fail": "s3", "fail_compensation": "s1"}}
    )
    assert wait_settled(saga_id) == [SagaState.NEEDS_HUMAN]

    retries = settings.compensation_retries
    assert rungs(runtime, saga_id) == [
        (1, False, "not applicable", FWD),
        (2, False, "not applicable", FWD),
        (3, True, "compensate", FWD),
        *[(0, True, "retry compensation", COMP)] * retries,
        (4, True, "page", COMP),
    ]
    undo_s1 = runs_of(runtime, saga_id, "s1", Direction.COMPENSATE)
    assert [(r.attempt, r.status) for r in undo_s1] == [(n, FAILED) for n in range(1, retries + 2)]
    assert [c.step for c in ledger.effects(saga_id=saga_id, op="undo")] == ["s2"]

    record = runtime.store.get_saga_or_raise(saga_id)
    assert record.incident == 1
    notes = delivered(runtime, saga_id)
    pages = [n for n in notes if n.kind == "page"]
    assert [(n.channel, n.action, n.status, n.incident) for n in pages] == [
        (c, "trigger", "sent", 1) for c in page_channels(runtime)
    ]
    # the story's climb leaves the compensation's own retries out, but keeps the page
    st = story(runtime.store, saga_id)
    assert st.rungs() == [1, 2, 3, 4]
    assert st.pages() == 1
