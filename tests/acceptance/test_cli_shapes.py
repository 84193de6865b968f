"""What scripts depend on (issue 12.7, 12.8): the JSON shapes of `show`, `ls`, `evidence`,
`approvals`, `enqueue`, `retry`, `approve`; the readable forms; tables whose ids can be
copied; and the timeline explaining a re-publication.

The shapes are pinned here key by key, as the README documents them: adding a key is
fine, renaming or dropping one breaks scripts, and this test.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest

from sagaq import Runtime, SagaState
from sagaq.notify import LogNotifier
from sagaq.worker import embedded_worker
from tests.acceptance.test_cli import cli, env_for
from tests.acceptance.test_policy_cli import EXAMPLE
from tests.acceptance.test_policy_cli import env as policy_env

SAGA_KEYS = {"id", "name", "version", "state", "key", "input", "checkpoint", "error",
             "created_at", "updated_at", "finished_at"}
RUN_KEYS = {"id", "saga_id", "step", "step_index", "direction", "attempt", "status",
            "idempotency_key", "message_id", "task_name", "compensate_task", "worker",
            "task_id", "deliveries", "scheduled_at", "started_at", "finished_at",
            "lease_expires_at", "not_before", "result", "error", "error_type", "level", "tier",
            "failure"}
EVENT_KEYS = {"id", "saga_id", "at", "kind", "step", "step_run_id", "worker", "task_id",
              "message", "data"}
LS_KEYS = {"id", "name", "state", "created_at", "error"}
EVIDENCE_KEYS = {"run_id", "saga", "definition_version", "status", "matched_policy_ids",
                 "policy_versions", "verdicts", "approvals", "rollback_triggered",
                 "rollback_mode", "compensations", "uncompensated", "error", "started_at",
                 "finished_at"}
APPROVAL_KEYS = {"id", "saga_id", "step", "direction", "rule_id", "status", "deadline",
                 "requested_at", "decided_by", "decided_at", "note", "policy_version",
                 "decided_under", "step_run_id", "rule_fingerprint"}


def has(keys: set[str], obj: dict[str, Any], what: str) -> None:
    assert keys <= set(obj), f"{what} lost {sorted(keys - set(obj))}"


def wait_state(rt: Runtime, saga_id: str, *states: SagaState, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while rt.store.get_saga_or_raise(saga_id).state not in states:
        assert time.monotonic() < deadline, rt.store.get_saga_or_raise(saga_id)
        time.sleep(0.05)


@pytest.fixture(scope="module")
def gated(settings, make_database, redis_prefix):
    """A runtime under the example policy (deleting a workspace asks a human)."""
    mine = settings.with_(
        database_url=make_database("shapes"),
        imports=(*settings.imports, "tasks.offboarding"),
        env="production",
        policy_file=str(EXAMPLE),
        queue=f"{settings.queue}-shapes",
        redis_prefix=f"{redis_prefix}shapes:",
    )
    rt = Runtime(mine, notifiers=[LogNotifier()])
    with embedded_worker(rt.app, concurrency=2, hostname="shapes@test"):
        yield mine, rt
    rt.close()


@pytest.fixture(scope="module")
def undo_fails(runtime, worker, settings) -> str:
    """A provisioning whose undo of assign_roles fails every time: needs_human."""
    saga_id = runtime.engine.enqueue("provision_agent", {
        "agent": "shape-1",
        "simulate": {"fail": "inject_credentials", "fail_compensation": "assign_roles"},
    })
    wait_state(runtime, saga_id, SagaState.NEEDS_HUMAN)
    return saga_id


def test_show_and_ls_json_shapes(settings, undo_fails) -> None:
    env = env_for(settings)
    story = json.loads(cli("show", undo_fails, "--json", env=env).stdout)
    assert {"saga", "step_runs", "events", "notifications", "succeeded", "compensated",
            "rungs", "pages"} <= set(story)
    has(SAGA_KEYS, story["saga"], "show --json .saga")
    for run in story["step_runs"]:
        has(RUN_KEYS, run, "show --json .step_runs[]")
    for event in story["events"]:
        has(EVENT_KEYS, event, "show --json .events[]")
    assert story["saga"]["state"] == "needs_human" and story["pages"] == 1

    listed = json.loads(cli("ls", "--json", "--state", "needs_human", env=env).stdout)
    (row,) = [r for r in listed if r["id"] == undo_fails]
    has(LS_KEYS, row, "ls --json[]")


def test_evidence_lists_a_failed_undo_once_and_reads_as_text(settings, undo_fails) -> None:
    env = env_for(settings)
    record = json.loads(cli("evidence", undo_fails, "--json", env=env).stdout)
    has(EVIDENCE_KEYS, record, "evidence --json")
    assert set(record["compensations"]) == {"dispatched", "succeeded", "skipped", "failed"}
    # assign_roles' undo failed on each of its attempts: one failed step, listed once
    assert record["compensations"]["failed"] == ["assign_roles"]
    text = cli("evidence", undo_fails[:8], env=env)
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith(f"saga       provision_agent {undo_fails}")
    assert "  failed         assign_roles\n" in text.stdout
    assert "rollback   triggered (lifo_stack)" in text.stdout
    assert not text.stdout.lstrip().startswith("{")


def test_approve_json_and_approvals_json_shapes(gated) -> None:
    mine, rt = gated
    e = policy_env(mine)
    saga_id = cli("enqueue", "offboard_agent", '{"agent": "shape-2"}', env=e).stdout.strip()
    wait_state(rt, saga_id, SagaState.AWAITING_APPROVAL)
    (pending,) = [a for a in json.loads(cli("approvals", "--json", env=e).stdout)
                  if a["saga_id"] == saga_id]
    has(APPROVAL_KEYS, pending, "approvals --json[]")

    table = cli("approvals", env={**e, "COLUMNS": "80"})
    assert any(pending["id"] in line for line in table.stdout.splitlines()), table.stdout

    done = cli("approve", pending["id"], "--json", env={**e, "SAGAQ_OPERATOR": "dana"})
    assert done.returncode == 0, done.stderr
    decided = json.loads(done.stdout)
    has(APPROVAL_KEYS, decided, "approve --json")
    assert (decided["id"], decided["status"], decided["decided_by"]) == (
        pending["id"], "approved", "dana")
    wait_state(rt, saga_id, SagaState.COMPLETED)

    explained = cli("policy", "explain", "offboard_agent", "delete_workspace", env=e)
    assert explained.returncode == 0, explained.stderr
    assert "decision   require_human (rule irreversible-deletes-need-a-human)" in explained.stdout
    assert "  rule irreversible-deletes-need-a-human (require_human): matches" in explained.stdout


def test_ls_keeps_ids_whole_and_cuts_errors_at_a_word(settings, undo_fails) -> None:
    listed = cli("ls", "--state", "needs_human", env={**env_for(settings), "COLUMNS": "80"})
    assert listed.returncode == 0, listed.stderr
    assert any(undo_fails in line for line in listed.stdout.splitlines()), listed.stdout
    wide = cli("ls", "--state", "needs_human", env={**env_for(settings), "COLUMNS": "250"})
    error = json.loads(cli("show", undo_fails, "--json", env=env_for(settings)).stdout)[
        "saga"]["error"]
    assert len(error) > 80
    (line,) = [ln for ln in wide.stdout.splitlines() if undo_fails in ln]
    shown = re.search(r"│ ([^│]*…) *│\s*$", line)
    assert shown, line
    cut = shown.group(1).removesuffix("…")
    assert error.startswith(cut) and len(cut) < 80
    assert error[len(cut)] in " ,;:", (cut, error)  # the cut falls between words


def test_a_republished_message_is_on_the_timeline(settings) -> None:
    rt = Runtime(settings.with_(queue=f"{settings.queue}-nobody", republish_after=0.2),
                 notifiers=[LogNotifier()])
    try:
        saga_id = rt.engine.enqueue("order_flow", {"customer": "r@x", "amount": 1})
        time.sleep(0.5)  # nobody consumes this queue: the message counts as lost
        assert rt.reconcile().summary()["republished"] >= 1
        (event,) = [e for e in rt.store.events(saga_id) if e.kind == "message.republished"]
        assert event.worker == "reconciler"
        assert "sagaq.order_flow.create_crm_record not taken after" in event.message
        assert "published again, copy 1" in event.message
        assert event.step_run_id == rt.store.step_runs(saga_id)[0].id
    finally:
        rt.close()


def test_retry_and_enqueue_answer_json(settings, undo_fails) -> None:
    """Last in this module: the retry moves the shared saga out of needs_human."""
    env = env_for(settings)
    retried = cli("retry", undo_fails[:8], "--json", env=env)
    assert retried.returncode == 0, retried.stderr
    assert json.loads(retried.stdout) == {"id": undo_fails, "state": "compensating"}
    made = cli("enqueue", "order_flow", '{"customer": "j@x", "amount": 1}', "--key", "shape-k",
               "--json", env=env)
    assert json.loads(made.stdout)["key"] == "shape-k"
