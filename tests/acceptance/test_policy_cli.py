"""The policy gate from the command line: `sagaq policy check / explain`, `sagaq approvals`,
`sagaq approve / deny`, `sagaq evidence`, and workers refusing a malformed policy file.

Every command runs as a subprocess, as an operator types it. The steps run on an embedded
worker of this module's own runtime (its own database, queue and key prefix), configured like
`sagaq demo`: the example policy ``tasks/policy.yaml`` in production.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from sagaq import Runtime, SagaState, Settings
from sagaq import policy as policy_module
from sagaq.notify import LogNotifier
from sagaq.worker import embedded_worker
from tests.acceptance.test_cli import ROOT, cli, env_for

POLICIES = ROOT / "tests" / "policies"
EXAMPLE = ROOT / "tasks" / "policy.yaml"
ASK_DELETES = "irreversible-deletes-need-a-human"


@pytest.fixture(scope="module")
def offboarding(settings: Settings, make_database, redis_prefix: str) -> Iterator[Settings]:
    tag = uuid.uuid4().hex[:8]
    yield settings.with_(
        database_url=make_database("policy_cli"),
        imports=(*settings.imports, "tasks.offboarding"),
        env="production",
        policy_file=str(EXAMPLE),
        queue=f"{settings.queue}-policy-cli-{tag}",
        redis_prefix=f"{redis_prefix}policy-cli-{tag}:",
    )


@pytest.fixture(scope="module")
def runtime_and_worker(offboarding: Settings) -> Iterator[Runtime]:
    rt = Runtime(offboarding, notifiers=[LogNotifier()])
    with embedded_worker(rt.app, concurrency=2, hostname="policy-cli@test"):
        yield rt
    rt.close()


def env(settings: Settings) -> dict[str, str]:
    return {**env_for(settings), "SAGAQ_POLICY_FILE": settings.policy_file,
            "SAGAQ_ENV": settings.env}


def one_line_error(done: Any) -> str:
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def wait_state(rt: Runtime, saga_id: str, expected: SagaState, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while (now := rt.store.get_saga_or_raise(saga_id).state) is not expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"saga {saga_id} is {now.value}, not {expected.value}")
        time.sleep(0.05)


# -- sagaq policy check ----------------------------------------------------------------------


@pytest.mark.parametrize("path", [POLICIES / "ok.yaml", EXAMPLE], ids=["ok", "example"])
def test_policy_check_accepts_a_valid_file(path: Path) -> None:
    done = cli("policy", "check", str(path))
    assert done.returncode == 0, done.stderr
    loaded = policy_module.load(path)
    rules = ", ".join(f"{r.id}: {r.decision.value}" for r in loaded.rules)
    first, note = done.stdout.strip().splitlines()
    assert first == f"{path}: ok, policy {loaded.label}, {len(loaded.rules)} rule(s) ({rules})"
    assert note.startswith("note: a rule without `direction` gates forward steps and "
                           "compensations alike")
    assert done.stderr == ""  # no warnings for these


def test_policy_check_warns_about_rules_that_can_never_fire(tmp_path: Path) -> None:
    path = tmp_path / "traps.yaml"
    path.write_text(
        "version: v1\nrules:\n"
        "  - id: deny-unless-approved\n"
        "    when: {topic: 'infra.*', approval_present: false}\n    decision: deny\n"
        "  - id: ask-infra\n    when: {topic: 'infra.*', env: production}\n"
        "    decision: require_human\n"
        "  - id: db\n    when: {tags: 'team.db*', direction: forward}\n    decision: deny\n"
    )
    done = cli("policy", "check", str(path))
    assert done.returncode == 0, done.stderr
    warnings = done.stderr.strip().splitlines()
    assert [w.split(":")[1].split()[1] for w in warnings] == [
        "deny-unless-approved", "ask-infra", "db"
    ], warnings
    assert all(w.startswith("warning: rule ") for w in warnings)
    assert "never" in warnings[0] and "never decides" in warnings[1] and "team.db.*" in warnings[2]


@pytest.mark.parametrize(
    ("name", "fragments"),
    [
        ("bad_decision.yaml", ["rule 2 (wipe-freely)", "field 'decision'", "'yolo'"]),
        ("bad_fact.yaml", ["rule 1 (by-colour)", "field 'when.colour'", "unknown fact"]),
        ("bad_bool.yaml", ["rule 1 (side-effects)", "field 'when.side_effect'", "true or false"]),
        ("bad_deadline.yaml", ["rule 1 (ask-soon)", "field 'deadline'", "'soon'"]),
        ("bad_yaml.yaml", ["line 5, column 13"]),
    ],
)
def test_policy_check_names_the_file_the_rule_and_the_field(
    name: str, fragments: list[str]
) -> None:
    path = POLICIES / name
    line = one_line_error(cli("policy", "check", str(path)))
    assert line.startswith(f"Error: {path}:"), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)


def test_policy_check_of_a_missing_file(tmp_path) -> None:
    missing = tmp_path / "gone.yaml"
    line = one_line_error(cli("policy", "check", str(missing)))
    assert line.startswith(f"Error: {missing}: cannot read the policy file")


# -- sagaq policy explain --------------------------------------------------------------------


def test_policy_explain_says_which_rule_decides_and_why(offboarding) -> None:
    done = cli("policy", "explain", "offboard_agent", "delete_workspace", "--env", "production",
               "--json", env={**env(offboarding), "SAGAQ_ENV": "development"})
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["decision"] == "require_human"
    assert out["deciding_rule"] == ASK_DELETES
    assert out["matched"] == [ASK_DELETES]
    assert out["policy"] == str(EXAMPLE)
    assert out["policy_version"] == policy_module.load(EXAMPLE).label
    facts = out["facts"]
    assert (facts["env"], facts["saga"], facts["step"], facts["kind"]) == (
        "production", "offboard_agent", "delete_workspace", "noncompensable")  # --env wins
    assert (facts["topic"], facts["tags"], facts["rollback_supported"]) == (
        "infra.delete", ["prod-write"], False)
    rules = {r["id"]: r for r in out["rules"]}
    assert list(rules) == [ASK_DELETES, "no-blind-prod-writes"]
    assert rules[ASK_DELETES]["matches"] is True
    assert rules[ASK_DELETES]["reasons"] == [
        "topic: 'infra.delete' matches infra.delete",
        "rollback_supported: False matches False",
    ]
    blind = rules["no-blind-prod-writes"]
    assert (blind["decision"], blind["matches"]) == ("deny", False)
    assert "env: 'production' matches production" in blind["reasons"]
    assert "kind: 'noncompensable' does not match compensable" in blind["reasons"]
    assert "deny > require_human > allow" in out["precedence"]


def test_policy_explain_of_an_undoable_step_and_of_a_compensation(offboarding) -> None:
    done = cli("policy", "explain", "offboard_agent", "revoke_keys", "--direction", "compensate",
               "--json", env=env(offboarding))
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert (out["decision"], out["deciding_rule"], out["matched"]) == ("allow", None, [])
    assert out["facts"]["direction"] == "compensate" and out["facts"]["env"] == "production"
    assert out["facts"]["rollback_supported"] is True

    approved = cli("policy", "explain", "offboard_agent", "delete_workspace", "--approved",
                   "--json", env=env(offboarding))
    assert json.loads(approved.stdout)["facts"]["approval_present"] is True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("offboard_agent", "no_such_step"), "has no step 'no_such_step'"),
        (("no_such_saga", "x"), "no saga named 'no_such_saga'"),
    ],
)
def test_policy_explain_of_an_unknown_saga_or_step(offboarding, args, message) -> None:
    line = one_line_error(cli("policy", "explain", *args, env=env(offboarding)))
    assert message in line


# -- approvals, approve, deny, evidence ------------------------------------------------------


def test_approve_and_deny_from_the_command_line(offboarding, runtime_and_worker) -> None:
    from tasks.services import services

    rt, e = runtime_and_worker, env(offboarding)
    made = [cli("enqueue", "offboard_agent", json.dumps({"agent": f"cli-{n}"}), env=e)
            for n in (1, 2)]
    assert all(m.returncode == 0 for m in made), [m.stderr for m in made]
    yes, no = (m.stdout.strip() for m in made)
    wait_state(rt, yes, SagaState.AWAITING_APPROVAL)
    wait_state(rt, no, SagaState.AWAITING_APPROVAL)

    listed = cli("approvals", "--json", env=e)
    assert listed.returncode == 0, listed.stderr
    requests = {r["saga_id"]: r for r in json.loads(listed.stdout)}
    assert set(requests) == {yes, no}
    for r in requests.values():
        assert (r["step"], r["direction"], r["rule_id"], r["status"]) == (
            "delete_workspace", "forward", ASK_DELETES, "pending")
        deadline = datetime.fromisoformat(r["deadline"])
        assert (deadline - datetime.fromisoformat(r["requested_at"])).total_seconds() == 86400
    table = cli("approvals", env={**e, "COLUMNS": "250"})
    assert table.returncode == 0 and "2 approval request(s)" in table.stdout
    assert requests[yes]["id"] in table.stdout and ASK_DELETES in table.stdout

    approved = cli("approve", requests[yes]["id"][:12], "--by", "alice", "--note", "checked",
                   env=e)
    assert approved.returncode == 0, approved.stderr
    assert approved.stdout.strip() == f"{requests[yes]['id']}: approved by alice"
    # --by defaults to $SAGAQ_OPERATOR (or the login), as for retry and resolve
    denied = cli("deny", requests[no]["id"], env={**e, "SAGAQ_OPERATOR": "bob"})
    assert denied.returncode == 0, denied.stderr
    assert denied.stdout.strip() == f"{requests[no]['id']}: denied by bob"
    wait_state(rt, yes, SagaState.COMPLETED)
    wait_state(rt, no, SagaState.COMPENSATED)

    runtime_calls = services["runtime"].effects(op="delete_workspace")
    assert [c.saga_id for c in runtime_calls] == [yes]  # once, and only where approved
    assert [(c.op, c.step) for c in services["vault"].effects(saga_id=no)] == [
        ("revoke_all", "revoke_keys"), ("reissue", "revoke_keys"),
    ]

    again = cli("approve", requests[no]["id"], "--by", "carol", env=e)
    assert "no longer pending" in one_line_error(again)
    unknown = cli("approve", "ffffffffffff", "--by", "carol", env=e)
    assert "no approval request 'ffffffffffff'" in one_line_error(unknown)

    assert json.loads(cli("approvals", "--json", env=e).stdout) == []
    decided = {r["saga_id"]: r for r in json.loads(cli("approvals", "--all", "--json",
                                                         env=e).stdout)}
    assert (decided[yes]["status"], decided[yes]["decided_by"], decided[yes]["note"]) == (
        "approved", "alice", "checked")
    assert (decided[no]["status"], decided[no]["decided_by"]) == ("denied", "bob")
    assert decided[no]["decided_under"] == policy_module.load(EXAMPLE).label

    shown = cli("evidence", no[:8], "--json", env=e)
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert record["run_id"] == no and record["status"] == "compensated"
    assert record["rollback_triggered"] is True and record["rollback_mode"] == "lifo_stack"
    assert record["matched_policy_ids"] == [ASK_DELETES]
    assert record["compensations"] == {
        "dispatched": ["snapshot_data", "revoke_keys"],
        "succeeded": ["snapshot_data", "revoke_keys"],
        "skipped": [],
        "failed": [],
    }
    (approval,) = record["approvals"]
    assert (approval["decision"], approval["by"], approval["step"]) == (
        "denied", "bob", "delete_workspace")
    assert approval["at"] and record["finished_at"]

    kept = json.loads(cli("evidence", yes, "--json", env=e).stdout)
    assert kept["status"] == "completed" and kept["rollback_triggered"] is False
    assert kept["compensations"]["dispatched"] == []
    assert [(a["decision"], a["by"], a["note"]) for a in kept["approvals"]] == [
        ("approved", "alice", "checked")]

    missing = cli("evidence", "ffffffff-0000", env=e)
    assert "no saga with id" in one_line_error(missing)


# -- workers refuse a malformed policy -------------------------------------------------------


@pytest.mark.parametrize("name", ["bad_decision.yaml", "bad_yaml.yaml", "missing.yaml"])
def test_a_worker_refuses_to_start_with_a_malformed_policy(offboarding, name) -> None:
    path = POLICIES / name
    done = cli("worker", "--pool", "solo", env={**env(offboarding), "SAGAQ_POLICY_FILE": str(path)},
               timeout=60)
    line = one_line_error(done)
    assert line.startswith(f"Error: {path}:"), line
    assert "celery@" not in done.stdout  # it never started


def test_celery_a_sagaq_refuses_a_malformed_policy_too(offboarding) -> None:
    """`celery -A sagaq worker` loads the same runtime: it does not start either (Celery
    prints its own usage error and the traceback; the last line names the file)."""
    path = POLICIES / "bad_decision.yaml"
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "sagaq", "worker", "--pool", "solo"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={**os.environ, **env(offboarding), "SAGAQ_POLICY_FILE": str(path)},
    )
    assert done.returncode != 0
    assert "celery@" not in done.stdout
    assert f"{path}: rule 2 (wipe-freely): field 'decision'" in done.stderr
