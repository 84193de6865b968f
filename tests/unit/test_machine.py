"""The lifecycle table: every move it has, none it doesn't, and the diagram drawn from it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sagaq import machine
from sagaq.errors import IllegalTransition
from sagaq.machine import FINISHED, TABLE, SagaState, can, machine_for, mermaid, next_state

S = SagaState
TRIGGERS = sorted({trigger for trigger, _, _ in TABLE})
LEGAL = {(trigger, src): dest for trigger, sources, dest in TABLE for src in sources}
ILLEGAL = sorted(
    (trigger, state) for trigger in TRIGGERS for state in SagaState if (trigger, state) not in LEGAL
)
README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(autouse=True)
def _fresh_machines() -> None:
    # machine_for is cached per process: without this, a machine built by an earlier test
    # (or, under mutmut, by the process each mutant is forked from) answers for _build.
    machine_for.cache_clear()


def test_table_is_the_documented_lifecycle() -> None:
    # DESIGN §5, written out independently of machine.TABLE.
    assert LEGAL == {
        ("start", S.PENDING): S.RUNNING,
        ("finish", S.RUNNING): S.COMPLETED,
        ("wait", S.RUNNING): S.WAITING,
        ("wake", S.WAITING): S.RUNNING,
        ("request_approval", S.PENDING): S.AWAITING_APPROVAL,  # the first step needs a human
        ("request_approval", S.RUNNING): S.AWAITING_APPROVAL,
        ("request_approval", S.COMPENSATING): S.AWAITING_APPROVAL,  # a gated compensation
        ("approve", S.AWAITING_APPROVAL): S.RUNNING,
        ("approve_rollback", S.AWAITING_APPROVAL): S.COMPENSATING,
        ("deny", S.AWAITING_APPROVAL): S.COMPENSATING,
        ("rollback", S.PENDING): S.COMPENSATING,
        ("rollback", S.RUNNING): S.COMPENSATING,
        ("rollback", S.WAITING): S.COMPENSATING,
        ("rollback", S.AWAITING_APPROVAL): S.COMPENSATING,
        ("finish_rollback", S.COMPENSATING): S.COMPENSATED,
        ("escalate", S.PENDING): S.NEEDS_HUMAN,  # lost its first run: the repair pages
        ("escalate", S.RUNNING): S.NEEDS_HUMAN,
        ("escalate", S.WAITING): S.NEEDS_HUMAN,
        ("escalate", S.AWAITING_APPROVAL): S.NEEDS_HUMAN,  # a denied compensation
        ("escalate", S.COMPENSATING): S.NEEDS_HUMAN,
        ("retry_rollback", S.NEEDS_HUMAN): S.COMPENSATING,
        ("retry_forward", S.NEEDS_HUMAN): S.RUNNING,
        ("resolve", S.NEEDS_HUMAN): S.RESOLVED,
    }


@pytest.mark.parametrize(("trigger", "source"), sorted(LEGAL))
def test_every_table_move_gives_its_dest(trigger: str, source: SagaState) -> None:
    dest = LEGAL[(trigger, source)]
    assert next_state("orders", source, trigger) is dest
    assert next_state("orders", source.value, trigger) is dest  # plain strings from the store
    assert can("orders", source, trigger) is True


@pytest.mark.parametrize(("trigger", "state"), ILLEGAL)
def test_every_other_move_is_illegal(trigger: str, state: SagaState) -> None:
    with pytest.raises(IllegalTransition) as info:
        next_state("orders", state, trigger, saga_id="s-1")
    err = info.value
    assert (err.trigger, err.state, err.saga_id) == (trigger, state.value, "s-1")
    assert str(err) == f"cannot {trigger!r} a saga in state {state.value!r}"
    assert can("orders", state, trigger) is False


def test_complement_is_exhaustive() -> None:
    assert len(LEGAL) + len(ILLEGAL) == len(TRIGGERS) * len(SagaState)
    assert len(LEGAL) == 23


@pytest.mark.parametrize("trigger", ["bogus", "to_running", "to_completed", "START"])
def test_unknown_triggers_are_illegal_everywhere(trigger: str) -> None:
    for state in SagaState:
        with pytest.raises(IllegalTransition):
            next_state("orders", state, trigger)
        assert can("orders", state, trigger) is False


@pytest.mark.parametrize("state", [S.PENDING, S.RUNNING, S.NEEDS_HUMAN])
def test_empty_trigger_is_not_a_wildcard(state: SagaState) -> None:
    # transitions' get_transitions(trigger="") means "any trigger"; the table must not let
    # an empty trigger through as if it were a move (pending --""--> running).
    assert can("orders", state, "") is False
    with pytest.raises(IllegalTransition) as info:
        next_state("orders", state, "")
    assert str(info.value) == f"cannot '' a saga in state {state.value!r}"


def test_unknown_state_is_rejected() -> None:
    with pytest.raises(ValueError, match="'exploded' is not a valid SagaState"):
        next_state("orders", "exploded", "start")


def test_finished_states() -> None:
    assert frozenset({S.COMPLETED, S.COMPENSATED, S.RESOLVED}) == FINISHED


@pytest.mark.parametrize("state", sorted(FINISHED))
def test_finished_states_have_no_way_out(state: SagaState) -> None:
    assert machine_for("orders").get_triggers(state.value) == []
    assert not any(src == state for _, src in LEGAL)
    for trigger in TRIGGERS:
        assert can("orders", state, trigger) is False


def test_every_unfinished_state_has_a_way_out_and_every_state_is_reachable() -> None:
    sources = {src for _, src in LEGAL}
    dests = set(LEGAL.values())
    assert sources == set(SagaState) - FINISHED
    assert dests | {S.PENDING} == set(SagaState)


def test_one_machine_per_saga_type() -> None:
    a = machine_for("orders")
    assert machine_for("orders") is a
    b = machine_for("provision_agent")
    assert b is not a
    assert machine_for("provision_agent") is b
    assert "orders" in a.name and "provision_agent" in b.name


@pytest.mark.parametrize("state", list(SagaState))
def test_no_auto_transitions(state: SagaState) -> None:
    triggers = machine_for("x").get_triggers(state.value)
    expected = {trigger for trigger, src in LEGAL if src == state}
    assert set(triggers) == expected
    assert len(triggers) == len(expected)
    assert not any(t.startswith("to_") for t in triggers)


def test_pending_triggers_exactly() -> None:
    assert sorted(machine_for("x").get_triggers("pending")) == ["escalate", "request_approval",
                                                                "rollback", "start"]


# -- the diagram -------------------------------------------------------------------------

_ARROW = re.compile(r"^\s*(\w+) --> (\w+): (.+?)\s*$")


def _expected_arrows() -> dict[tuple[str, str], str]:
    """One arrow per (src, dst); triggers sharing it are merged with " | " in table order."""
    merged: dict[tuple[str, str], list[str]] = {}
    for trigger, sources, dest in TABLE:
        for src in sources:
            merged.setdefault((src.value, dest.value), []).append(trigger)
    return {pair: " | ".join(triggers) for pair, triggers in merged.items()}


def test_mermaid_has_one_line_per_transition_and_no_others() -> None:
    text = mermaid()
    drawn = {}
    for line in text.splitlines():
        m = _ARROW.match(line)
        if m:
            assert (m[1], m[2]) not in drawn, f"arrow drawn twice: {line!r}"
            drawn[(m[1], m[2])] = m[3]
    assert drawn == _expected_arrows()
    assert drawn[("awaiting_approval", "compensating")] == "approve_rollback | deny | rollback"
    for src, dst in drawn:
        assert f"  {src} --> {dst}: {drawn[(src, dst)]}" in text.splitlines()


def test_mermaid_declares_every_state_and_the_start() -> None:
    lines = mermaid().splitlines()
    for state in SagaState:
        assert f'  state "{state.value}" as {state.value}' in lines
    assert "  [*] --> pending" in lines
    assert "stateDiagram-v2" in lines
    # no "current state" styling: a diagram of a type has no current state
    assert not any(line.strip().startswith(("classDef", "class ")) for line in lines)


def test_mermaid_is_deterministic_and_clean() -> None:
    assert mermaid() == mermaid()
    assert mermaid().endswith("\n") and not mermaid().endswith("\n\n")
    # no trailing blanks: editors strip them, and the README copy would drift
    assert all(line == line.rstrip() for line in mermaid().splitlines())


def test_mermaid_begins_with_the_yaml_title_block() -> None:
    # Mermaid reads the front matter as YAML and takes the title from a `title:` key; a bare
    # scalar between the `---` lines is silently ignored, so the title never renders.
    assert mermaid().startswith("---\ntitle: sagaq saga lifecycle\n---\nstateDiagram-v2\n")


def _readme_mermaid_blocks(text: str) -> list[str]:
    return re.findall(r"^```mermaid[ \t]*\n(.*?)^```[ \t]*$", text, flags=re.M | re.S)


def test_readme_diagram_matches_the_table() -> None:
    if not README.exists():
        pytest.skip("README.md does not exist yet")
    blocks = _readme_mermaid_blocks(README.read_text(encoding="utf-8"))
    lifecycle = [b for b in blocks if "stateDiagram" in b]
    assert lifecycle, "README.md has no ```mermaid stateDiagram block; paste machine.mermaid()"
    assert len(lifecycle) == 1, "README.md has more than one lifecycle diagram"

    assert lifecycle[0] == mermaid(), (
        "the README lifecycle diagram drifted from sagaq.machine.TABLE: "
        "replace it with the output of `python -c 'from sagaq.machine import mermaid; "
        'print(mermaid(), end="")\'`'
    )


def test_readme_block_parser() -> None:
    doc = "intro\n```mermaid\n---\ntitle: t\n---\nstateDiagram-v2\n  a --> b: go\n```\nend\n"
    assert _readme_mermaid_blocks(doc) == ["---\ntitle: t\n---\nstateDiagram-v2\n  a --> b: go\n"]


def test_module_exports() -> None:
    active = machine.ACTIVE_STEP
    assert active == {machine.StepStatus.SCHEDULED, machine.StepStatus.RUNNING}


def test_the_machine_has_exactly_the_saga_states_and_no_initial_one() -> None:
    m = machine_for("orders")
    assert set(m.states) == {s.value for s in SagaState}
    assert m.name.startswith("orders")


# -- tidying what transitions draws ------------------------------------------------------


def test_tidy_keys_a_bare_title_and_drops_current_state_styling() -> None:
    drawn = ("---\nmy title\n---\nstateDiagram-v2  \n  classDef s_default fill:white\n"
             "  Class pending s_active\n  a --> b: go\n\n")
    assert machine._tidy(drawn) == "---\ntitle: my title\n---\nstateDiagram-v2\n  a --> b: go\n"


@pytest.mark.parametrize("drawn", [
    "---\ntitle: t\n---\nstateDiagram-v2\n",  # already keyed: not keyed twice
    "---\nt\n--\nstateDiagram-v2\n",  # not front matter: the second fence is not "---"
    "stateDiagram-v2\nt\n---\n",  # not front matter: no opening fence
    "---\nt\n",  # too short to hold front matter
    "---\n",
])
def test_tidy_leaves_what_is_not_a_bare_title_alone(drawn: str) -> None:
    assert machine._tidy(drawn) == drawn.strip() + "\n"


def test_tidy_keys_the_shortest_front_matter() -> None:
    assert machine._tidy("---\nt\n---") == "---\ntitle: t\n---\n"


def test_next_state_and_can_ask_the_machine_of_their_own_saga_type() -> None:
    # One machine per saga type (DESIGN §9), built once and then reused by every question.
    next_state("billing", S.PENDING, "start")
    can("billing", S.PENDING, "start")
    info = machine_for.cache_info()
    assert (info.misses, info.hits, info.currsize) == (1, 1, 1)
    machine_for("billing")
    assert machine_for.cache_info().hits == 2
