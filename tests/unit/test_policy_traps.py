"""The policy language's traps (issue 13, items 5-7): a file means what it reads as.

Duplicate keys, a ``when`` that is falsy, direction/kind values that can never match, a
deny that waits for an approval nothing can grant, a glob that crosses segments, an env
written in another case, and deadlines too large for a datetime.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from sagaq.definition import StepKind
from sagaq.machine import Direction
from sagaq.policy import (
    DIRECTIONS,
    KINDS,
    MAX_DEADLINE,
    Decision,
    Facts,
    PolicyError,
    load,
    parse,
)

BASE = Facts(env="production", saga="s", step="t", kind="compensable", direction="forward",
             side_effect=True, compensation_declared=True, rollback_supported=True,
             at_most_once=False, topic="infra.db", tags=())


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


def refused(tmp_path: Path, text: str, *fragments: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as caught:
        load(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:") and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def rules(*raw: dict[str, Any]) -> Any:
    return parse({"version": "v1", "rules": list(raw)})


# -- duplicate keys ----------------------------------------------------------------------------

DENY = "  - {id: a, when: {env: production}, decision: deny}\n"


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        (f"version: v1\nrules:\n{DENY}rules:\n  - {{id: b, decision: allow}}\n",
         ["line 4", "duplicate key 'rules'"]),
        ("version: v1\nrules:\n  - id: a\n    decision: deny\n    decision: allow\n",
         ["line 5", "duplicate key 'decision'"]),
        ("version: v1\nrules:\n  - {id: a, decision: deny, when: {env: prod, env: dev}}\n",
         ["line 3", "duplicate key 'env'"]),
        ("version: v1\nversion: v1\nrules: []\n", ["line 2", "duplicate key 'version'"]),
    ],
)
def test_duplicate_keys_are_refused_with_their_line(tmp_path, text, fragments) -> None:
    refused(tmp_path, text, *fragments)


def test_yaml_without_duplicates_still_loads_with_anchors(tmp_path) -> None:
    text = ("version: v1\nrules:\n  - id: a\n    when: &prod {env: production}\n"
            "    decision: deny\n  - id: b\n    when: *prod\n    decision: require_human\n")
    assert [r.id for r in load(write(tmp_path, text)).rules] == ["a", "b"]


# -- a when that means nothing ---------------------------------------------------------------


@pytest.mark.parametrize("when", ["[]", "false", "0", "''", "no", "0.0"])
def test_a_falsy_when_is_refused_not_read_as_match_all(tmp_path, when) -> None:
    text = f"version: v1\nrules:\n  - id: a\n    decision: deny\n    when: {when}\n"
    refused(tmp_path, text, "rule 1 (a)", "field 'when'", "omit it")


def test_an_omitted_or_empty_when_still_matches_every_dispatch() -> None:
    p = rules({"id": "a", "decision": "deny"}, {"id": "b", "decision": "deny", "when": {}},
              {"id": "c", "decision": "deny", "when": None})  # `when:` with nothing: omitted
    assert p.evaluate(BASE).matched == ("a", "b", "c")


# -- values of direction and kind --------------------------------------------------------------


def test_the_known_values_are_the_engines() -> None:
    assert set(DIRECTIONS) == {d.value for d in Direction}
    assert set(KINDS) == {k.value for k in StepKind}


@pytest.mark.parametrize(
    ("fact", "value", "fragments"),
    [
        ("direction", "compensation", ["'compensation'", "forward, compensate"]),
        ("direction", "backward", ["'backward'"]),
        ("direction", ["forward", "rollback"], ["'rollback'"]),
        ("kind", "compensatable", ["'compensatable'", "compensable", "noncompensable"]),
        ("kind", "pivotal", ["'pivotal'"]),
    ],
)
def test_a_direction_or_kind_that_can_never_match_is_refused(tmp_path, fact, value,
                                                             fragments) -> None:
    shown = value if isinstance(value, str) else "[" + ", ".join(value) + "]"
    text = f"version: v1\nrules:\n  - id: a\n    decision: deny\n    when: {{{fact}: {shown}}}\n"
    refused(tmp_path, text, "rule 1 (a)", f"field 'when.{fact}'", *fragments)


@pytest.mark.parametrize(("fact", "value"), [("direction", "comp*"), ("kind", "*compensable"),
                                             ("direction", "FORWARD"), ("kind", "pivot")])
def test_patterns_that_can_match_a_known_value_are_accepted(fact, value) -> None:
    assert rules({"id": "a", "decision": "deny", "when": {fact: value}}).rules


# -- policy check's warnings -------------------------------------------------------------------


def test_a_deny_that_waits_for_an_approval_is_warned_about() -> None:
    p = rules({"id": "deny-unless-approved", "decision": "deny",
               "when": {"topic": "infra.*", "approval_present": False}})
    (warning,) = p.warnings()
    assert "deny-unless-approved" in warning and "never" in warning
    assert "require_human" in warning
    # and a require_human it overlaps never asks: the deny matches first, every time
    p = rules(p.rules[0].__dict__ | {"decision": "deny", "when": {"topic": "infra.*",
                                                                  "approval_present": False}},
              {"id": "ask", "decision": "require_human", "when": {"topic": "infra.*"}})
    assert "rule ask never decides" in p.warnings()[1]


def test_a_rule_another_always_outranks_is_warned_about() -> None:
    p = rules(
        {"id": "deny-infra", "decision": "deny", "when": {"topic": "infra.*"}},
        {"id": "ask-infra-db", "decision": "require_human",
         "when": {"topic": "infra.*", "env": "production"}},
        {"id": "deny-infra-again", "decision": "deny", "when": {"topic": "infra.*",
                                                               "side_effect": True}},
        {"id": "ask-payments", "decision": "require_human", "when": {"tags": "payments"}},
    )
    warnings = p.warnings()
    assert len(warnings) == 2, warnings
    assert "ask-infra-db" in warnings[0] and "deny-infra" in warnings[0]
    assert "deny-infra-again" in warnings[1]
    assert not [w for w in warnings if "ask-payments" in w]


def test_a_rule_that_needs_an_approval_to_ask_for_one_is_warned_about() -> None:
    p = rules({"id": "odd", "decision": "require_human", "when": {"approval_present": True}})
    (warning,) = p.warnings()
    assert "odd" in warning and "never" in warning


def test_a_glob_that_crosses_segments_is_warned_about() -> None:
    assert rules({"id": "ok", "decision": "deny",
                  "when": {"topic": ["infra.db", "infra.db.*"], "env": "prod*"}}).warnings() == []
    p = rules({"id": "db", "decision": "deny", "when": {"topic": "infra.db*"}})
    (warning,) = p.warnings()
    assert "'infra.db*'" in warning and "infra.db.*" in warning
    # the documented semantics: * crosses dots
    assert p.evaluate(Facts(**{**BASE.__dict__, "topic": "infra.dbadmin-sandbox"})).matched == (
        "db",
    )


def test_a_clean_policy_has_no_warnings_and_an_allow_rule_is_fine() -> None:
    p = rules({"id": "a", "decision": "require_human", "when": {"topic": "infra.*"}},
              {"id": "b", "decision": "allow"})
    assert p.warnings() == []


def test_the_default_direction_semantics_are_stated() -> None:
    from sagaq.policy import DIRECTION_NOTE

    assert "compensation" in DIRECTION_NOTE and "direction: forward" in DIRECTION_NOTE


# -- env: case and whitespace -----------------------------------------------------------------


@pytest.mark.parametrize("env", ["production", "Production", "PRODUCTION", "production ",
                                 " production\t"])
def test_an_env_in_another_case_or_with_spaces_is_still_denied(env) -> None:
    p = rules({"id": "no-prod", "decision": "deny", "when": {"env": "production"}})
    assert p.evaluate(Facts(**{**BASE.__dict__, "env": env})).decision is Decision.DENY
    p = rules({"id": "no-prod", "decision": "deny", "when": {"env": " Prod* "}})
    assert p.evaluate(Facts(**{**BASE.__dict__, "env": env})).decision is Decision.DENY


# -- deadlines bounded at load time -------------------------------------------------------------

ASK = "version: v1\nrules:\n  - {id: a, decision: require_human, deadline: %s}\n"


@pytest.mark.parametrize("deadline", [".inf", "10000000d", "1e12", "'367d'", "31622401",
                                      ".nan", "'1e400'"])
def test_a_deadline_beyond_a_year_or_not_finite_is_refused(tmp_path, deadline) -> None:
    refused(tmp_path, ASK % deadline, "rule 1 (a)", "field 'deadline'")


def test_a_deadline_of_a_year_is_fine(tmp_path) -> None:
    assert MAX_DEADLINE == 366 * 86400
    assert load(write(tmp_path, ASK % "'366d'")).rules[0].deadline == MAX_DEADLINE
    assert math.isfinite(load(write(tmp_path, ASK % "31622400")).rules[0].deadline or 0)


# -- exact texts and edges (the mutation score of sagaq/policy.py) -----------------------------


def test_the_warnings_word_for_word() -> None:
    p = rules(
        {"id": "d", "decision": "deny", "when": {"topic": "infra.*", "approval_present": False}},
        {"id": "h", "decision": "require_human", "when": {"approval_present": True,
                                                          "tags": "a.b*"}},
    )
    assert p.warnings() == [
        "rule d: a deny with approval_present: false can never be lifted by an approval (deny "
        "outranks require_human, so none is ever asked for): it is a plain deny",
        "rule h: it asks for an approval only once one is present, so it never asks",
        "rule h: tags pattern 'a.b*' also matches longer names (* crosses dots and dashes); "
        "for one segment write 'a.b' and 'a.b.*'",
    ]


def test_an_outranking_rule_later_in_the_file_is_found_wherever_it_is() -> None:
    p = rules(
        {"id": "ask", "decision": "require_human", "when": {"topic": "infra.db"}},
        {"id": "other", "decision": "deny", "when": {"tags": "x"}},
        {"id": "deny", "decision": "deny", "when": {"topic": "infra.*"}},
        {"id": "ask-too", "decision": "require_human", "when": {"topic": "infra.db",
                                                               "env": "prod"}},
        {"id": "ask-again", "decision": "require_human", "when": {"topic": "infra.*"}},
    )
    assert p.warnings() == [
        "rule ask never decides: rule deny matches whenever it does and outranks it (deny)",
        "rule ask-too never decides: rule ask matches whenever it does and outranks it "
        "(require_human)",
        "rule ask-again never decides: rule deny matches whenever it does and outranks it "
        "(deny)",
    ]
    # an equal rule later in the file does not outrank an earlier one
    assert rules({"id": "a", "decision": "deny", "when": {"topic": "infra.db"}},
                 {"id": "b", "decision": "deny", "when": {"topic": "infra.*"}}).warnings() == []


@pytest.mark.parametrize(
    ("wide", "narrow"),
    [
        ({"approval_present": True, "topic": "x"}, {"topic": "x"}),  # not narrow's condition
        ({"approval_present": False, "topic": "infra.*"}, {"topic": "billing"}),
        ({"side_effect": True}, {"side_effect": False}),
        ({"topic": "infra.*"}, {"topic": "billing.*"}),
        ({"topic": "infra.*"}, {"tags": "infra.x"}),
    ],
)
def test_a_rule_that_does_not_cover_another_is_no_warning(wide, narrow) -> None:
    p = rules({"id": "wide", "decision": "deny", "when": wide},
              {"id": "narrow", "decision": "require_human", "when": narrow})
    assert not [w for w in p.warnings() if "narrow never decides" in w], p.warnings()


@pytest.mark.parametrize(
    ("narrow", "wide", "within"),
    [
        ("x", "*", True),
        ("a?", "a?", True),
        ("infra.db", "infra.*", True),
        ("infra.db*", "infra.*", True),
        ("infra.", "infra.*", True),
        ("infra", "infra.*", False),
        ("infrb.x", "infra.*", False),
        ("ab", "a?", False),
        ("infra.db", "inf?a.*", False),
        ("infra.db", "in*a.*", False),
        ("infra.db", "infra.[d]*", False),
        ("infra.db", "infra.d", False),
        ("i", "*i", False),
        ("*", "X*", False),
        ("XX*XX", "XX*XX", True),
    ],
)
def test_one_pattern_within_another(narrow, wide, within) -> None:
    from sagaq.policy import _within

    assert _within(narrow, wide) is within


def test_a_file_that_is_not_yaml_text_says_so(tmp_path) -> None:
    message = refused(tmp_path, "version: v1\nrules: []\n\x07\n")
    assert message.endswith(" invalid YAML") or "special characters" in message
    path = write(tmp_path, "version: v1\nrules: []\n\x07\n")
    with pytest.raises(PolicyError) as caught:
        load(path)
    assert str(caught.value) == f"{path}: invalid YAML"


def test_parse_defaults_and_lists_in_messages() -> None:
    p = parse({"version": "v1", "rules": [{"id": "a", "decision": "deny"}]})
    assert (p.source, p.digest, p.rules[0].description) == ("<policy>", "inline", "")
    assert p.rule("nope") is None and p.rule("a") is p.rules[0]
    with pytest.raises(PolicyError) as caught:
        parse({"version": "v1", "rules": [], "b": 1, "a": 2})
    assert str(caught.value) == "<policy>: unknown top-level field(s) a, b"
    with pytest.raises(PolicyError) as caught:
        parse({"version": "v1", "rules": [{"id": "r", "decision": "deny", "y": 1, "x": 2}]})
    assert str(caught.value) == "<policy>: rule 1 (r): unknown field(s) x, y"
    with pytest.raises(PolicyError) as caught:
        parse({"version": "v1", "rules": [{"id": "r", "decision": "deny", "when": {"c": 1}}]})
    assert str(caught.value).endswith(
        "unknown fact; known: approval_present, at_most_once, compensation_declared, direction, "
        "env, kind, rollback_supported, saga, side_effect, step, tags, topic"
    )


@pytest.mark.parametrize(("when", "falsy"), [(True, False), (1, False), ("x", False),
                                             (0, True), (False, True), ("", True)])
def test_which_whens_are_read_as_everything(when, falsy) -> None:
    with pytest.raises(PolicyError) as caught:
        parse({"version": "v1", "rules": [{"id": "r", "decision": "deny", "when": when}]})
    if falsy:
        assert str(caught.value) == (
            f"<policy>: rule 1 (r): field 'when' is {when!r}, which would match every "
            "dispatch; omit it (or write {}) to mean that, or name the facts to match"
        )
    else:
        assert str(caught.value).endswith("field 'when': a mapping of facts is required")


def test_direction_and_kind_values_are_matched_in_lower_case() -> None:
    p = rules({"id": "fwd", "decision": "deny", "when": {"direction": "FORWARD",
                                                        "kind": "Compensable"}})
    assert p.rules[0].when == {"direction": ("forward",), "kind": ("compensable",)}
    assert p.evaluate(BASE).decision is Decision.DENY


@pytest.mark.parametrize(("deadline", "seconds"), [(1, 1.0), ("1s", 1.0), (0.5, 0.5),
                                                   ("366d", MAX_DEADLINE),
                                                   (MAX_DEADLINE, MAX_DEADLINE)])
def test_deadlines_at_the_edges(deadline, seconds) -> None:
    raw = {"id": "a", "decision": "require_human", "deadline": deadline}
    assert rules(raw).rules[0].deadline == seconds


@pytest.mark.parametrize(("deadline", "message"), [
    ("367d", "'367d' is more than 366 days"),
    (MAX_DEADLINE + 1, "31622401.0 is more than 366 days"),
    (math.inf, "inf is not a duration such as 90s, 30m, 72h or 2d"),
    (0, "0 is not a duration such as 90s, 30m, 72h or 2d"),
])
def test_deadlines_beyond_the_edges_say_why(deadline, message) -> None:
    with pytest.raises(PolicyError) as caught:
        rules({"id": "a", "decision": "require_human", "deadline": deadline})
    assert str(caught.value) == f"<policy>: rule 1 (a): field 'deadline': {message}"
