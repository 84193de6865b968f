"""The policy: pure rule matching, precedence, explanations, and malformed files.

Matching and precedence are table-driven over :class:`~sagaq.policy.Facts` built here; the
malformed files are written to ``tmp_path`` and loaded, so that every error is checked for
the place it names: the file, the rule (its position and id) and the field.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from sagaq.errors import ConfigurationError
from sagaq.policy import (
    BOOL_FACTS,
    TEXT_FACTS,
    Decision,
    Facts,
    Policy,
    PolicyError,
    facts_dict,
    load,
    parse,
)

BASE = Facts(
    env="production",
    saga="offboard_agent",
    step="delete_workspace",
    kind="noncompensable",
    direction="forward",
    side_effect=True,
    compensation_declared=False,
    rollback_supported=False,
    at_most_once=False,
    approval_present=False,
    topic="infra.delete",
    tags=("prod-write", "security"),
)


def facts(**changes: Any) -> Facts:
    return replace(BASE, **changes)


def policy(*rules: dict[str, Any]) -> Policy:
    return parse({"version": "v1", "rules": list(rules)})


def rule(rule_id: str, decision: str = "deny", **when: Any) -> dict[str, Any]:
    return {"id": rule_id, "when": when, "decision": decision}


def matches(when: dict[str, Any], f: Facts) -> bool:
    p = policy(rule("r", **when))
    return p.evaluate(f).matched == ("r",)


# -- matching: one row per (condition, facts, expected) -------------------------------------

BOOL_ROWS = [
    (name, expected, actual, expected == actual)
    for name in sorted(BOOL_FACTS)
    for expected in (True, False)
    for actual in (True, False)
]


@pytest.mark.parametrize(("name", "expected", "actual", "hit"), BOOL_ROWS)
def test_a_bool_fact_matches_only_its_value(name, expected, actual, hit) -> None:
    assert matches({name: expected}, facts(**{name: actual})) is hit


TEXT_ROWS = [
    # fact, pattern(s), actual value, matches?
    ("env", "production", "production", True),
    ("env", "production", "staging", False),
    ("env", "Production", "production", True),  # env: case and spaces do not matter
    ("env", "production", " PRODUCTION ", True),
    ("saga", "Offboard_agent", "offboard_agent", False),  # other facts: case matters
    ("env", "prod*", "production", True),
    ("env", "prod*", "preprod", False),  # a pattern matches the whole value
    ("env", "*prod*", "preprod", True),
    ("env", "stag?", "stage", True),
    ("env", "stag?", "staging", False),
    ("env", "?", "", False),
    ("env", ["staging", "production"], "production", True),
    ("env", ["staging", "dev*"], "production", False),
    ("env", ["staging", "prod*"], "production", True),
    ("saga", "offboard_*", "offboard_agent", True),
    ("saga", "provision_agent", "offboard_agent", False),
    ("step", "delete_*", "delete_workspace", True),
    ("step", ["revoke_keys", "snapshot_data"], "delete_workspace", False),
    ("kind", "noncompensable", "noncompensable", True),
    ("kind", "compensable", "noncompensable", False),  # not a substring match
    ("kind", ["pivot", "retryable"], "retryable", True),
    ("direction", "compensate", "compensate", True),
    ("direction", "compensate", "forward", False),
    ("topic", "infra.delete", "infra.delete", True),
    ("topic", "infra.*", "infra.delete", True),
    ("topic", "infra.*", "infra", False),
    ("topic", "infra.???ete", "infra.delete", True),
    ("topic", ["billing.*", "infra.*"], "infra.create", True),
    ("topic", "*", None, False),  # a step without a topic never matches a pattern
    ("topic", ["*", "?*"], None, False),
    ("topic", "*", "anything", True),
]


@pytest.mark.parametrize(("name", "pattern", "actual", "hit"), TEXT_ROWS)
def test_a_text_fact_matches_a_pattern_or_any_of_a_list(name, pattern, actual, hit) -> None:
    assert name in TEXT_FACTS
    assert matches({name: pattern}, facts(**{name: actual})) is hit


TAG_ROWS = [
    ("payments", ("payments",), True),
    ("payments", ("prod-write", "payments"), True),  # any of the step's tags
    ("payments", ("prod-write", "security"), False),
    ("pay*", ("crm", "payments-eu"), True),
    (["crm", "secur?ty"], ("security",), True),
    (["crm", "billing"], ("security", "prod-write"), False),
    ("*", (), False),  # no tags: nothing to match
    ("*", ("x",), True),
]


@pytest.mark.parametrize(("pattern", "tags", "hit"), TAG_ROWS)
def test_tags_match_when_any_tag_matches(pattern, tags, hit) -> None:
    assert matches({"tags": pattern}, facts(tags=tags)) is hit


@pytest.mark.parametrize(
    "f",
    [
        BASE,
        facts(env="development", topic=None, tags=()),
        facts(direction="compensate", side_effect=False, kind="compensable"),
    ],
)
def test_an_empty_when_matches_every_dispatch(f) -> None:
    assert matches({}, f)
    p = parse({"version": "v1", "rules": [{"id": "all", "decision": "deny"}]})  # no when
    assert p.evaluate(f).matched == ("all",)
    p = parse({"version": "v1", "rules": [{"id": "all", "when": None, "decision": "deny"}]})
    assert p.evaluate(f).matched == ("all",)


@pytest.mark.parametrize(
    ("when", "hit"),
    [
        ({"env": "production", "topic": "infra.*", "rollback_supported": False}, True),
        ({"env": "production", "topic": "infra.*", "rollback_supported": True}, False),
        ({"env": "staging", "topic": "infra.*", "rollback_supported": False}, False),
        ({"env": "production", "tags": "payments"}, False),
        ({"env": "production", "tags": "security", "approval_present": False}, True),
    ],
)
def test_every_condition_of_a_rule_must_hold(when, hit) -> None:
    assert matches(when, BASE) is hit


# -- precedence -----------------------------------------------------------------------------

DECISIONS = ("allow", "require_human", "deny")


@pytest.mark.parametrize("order", list(itertools.permutations(DECISIONS)))
def test_deny_beats_require_human_beats_allow_in_any_order(order) -> None:
    rules = [rule(f"r-{d}", d, env="production") for d in order]
    verdict = policy(*rules).evaluate(BASE)
    assert verdict.decision is Decision.DENY
    assert verdict.rule_id == "r-deny"
    assert verdict.matched == tuple(f"r-{d}" for d in order)  # every match, in file order

    without_deny = [r for r in rules if r["decision"] != "deny"]
    verdict = policy(*without_deny).evaluate(BASE)
    assert verdict.decision is Decision.REQUIRE_HUMAN
    assert verdict.rule_id == "r-require_human"


@pytest.mark.parametrize("decision", DECISIONS)
def test_among_equals_the_first_in_the_file_decides(decision) -> None:
    p = policy(
        rule("miss", "deny", env="staging"),
        rule("first", decision, topic="infra.*"),
        rule("second", decision, env="prod*"),
        rule("third", decision),
    )
    verdict = p.evaluate(BASE)
    assert verdict.decision is Decision(decision)
    assert verdict.rule_id == "first"
    assert verdict.rule is p.rules[1]
    assert verdict.matched == ("first", "second", "third")


def test_no_matching_rule_means_allow() -> None:
    p = policy(rule("a", "deny", env="staging"), rule("b", "require_human", tags="payments"))
    verdict = p.evaluate(BASE)
    assert verdict.decision is Decision.ALLOW
    assert (verdict.matched, verdict.rule, verdict.rule_id) == ((), None, None)
    assert Policy().evaluate(BASE).decision is Decision.ALLOW  # no policy at all


def test_matched_lists_every_matching_rule_in_file_order_not_only_the_deciding_one() -> None:
    p = policy(
        rule("allow-prod", "allow", env="production"),
        rule("ask-infra", "require_human", topic="infra.*"),
        rule("deny-staging", "deny", env="staging"),
        rule("ask-security", "require_human", tags="security"),
        rule("deny-unapproved-delete", "deny", topic="infra.delete", approval_present=False),
    )
    verdict = p.evaluate(BASE)
    assert verdict.decision is Decision.DENY
    assert verdict.rule_id == "deny-unapproved-delete"
    assert verdict.matched == (
        "allow-prod", "ask-infra", "ask-security", "deny-unapproved-delete",
    )
    approved = p.evaluate(facts(approval_present=True))
    assert approved.decision is Decision.REQUIRE_HUMAN
    assert approved.rule_id == "ask-infra"
    assert approved.matched == ("allow-prod", "ask-infra", "ask-security")


def test_an_allow_rule_first_does_not_override_a_later_deny() -> None:
    p = policy(rule("allow-all", "allow"), rule("deny-prod", "deny", env="production"))
    assert p.evaluate(BASE).decision is Decision.DENY
    assert p.evaluate(facts(env="dev")).decision is Decision.ALLOW
    assert p.evaluate(facts(env="dev")).rule_id == "allow-all"


# -- explain --------------------------------------------------------------------------------


def test_explain_gives_each_rule_whether_it_matches_and_why() -> None:
    p = policy(
        rule("ask-delete", "require_human", topic="infra.*", rollback_supported=False),
        rule("deny-staging", "deny", env=["staging", "qa"], side_effect=True),
        {"id": "allow-rest", "decision": "allow"},
    )
    out = p.explain(facts(topic=None))
    assert [(r["id"], r["decision"], r["matches"]) for r in out] == [
        ("ask-delete", "require_human", False),
        ("deny-staging", "deny", False),
        ("allow-rest", "allow", True),
    ]
    assert out[0]["reasons"] == [
        "topic: None does not match infra.*",
        "rollback_supported: False matches False",
    ]
    assert out[1]["reasons"] == [
        "env: 'production' does not match staging | qa",
        "side_effect: True matches True",
    ]
    assert out[2]["reasons"] == ["no conditions: matches every dispatch"]

    hit = p.explain(BASE)[0]
    assert hit["matches"] is True
    assert hit["reasons"] == [
        "topic: 'infra.delete' matches infra.*",
        "rollback_supported: False matches False",
    ]


def test_explain_agrees_with_evaluate() -> None:
    p = policy(
        rule("a", "allow", env="prod*"),
        rule("b", "deny", tags=["x", "sec*"], at_most_once=True),
        rule("c", "require_human", kind="noncompensable"),
    )
    for f in (BASE, facts(at_most_once=True), facts(kind="pivot", env="dev")):
        assert tuple(r["id"] for r in p.explain(f) if r["matches"]) == p.evaluate(f).matched


def test_facts_dict_is_plain_json() -> None:
    out = facts_dict(BASE)
    assert out["tags"] == ["prod-write", "security"]
    assert out["topic"] == "infra.delete" and out["approval_present"] is False
    assert set(out) == BOOL_FACTS | TEXT_FACTS | {"tags"}


# -- the rule fingerprint and the policy version --------------------------------------------


def test_the_fingerprint_follows_what_the_rule_says_not_how_it_is_written() -> None:
    base = policy(rule("r", "require_human", env="production", topic="infra.*")).rules[0]
    same = policy(
        {"id": "r", "decision": "require_human",
         "when": {"topic": ["infra.*"], "env": "production"},
         "description": "reworded", "deadline": "2d"}
    ).rules[0]
    assert base.fingerprint == same.fingerprint
    edited = [
        rule("r", "require_human", env="production", topic="infra.d*"),
        rule("r", "deny", env="production", topic="infra.*"),
        rule("r", "require_human", env="production", topic="infra.*", side_effect=True),
    ]
    for raw in edited:
        assert policy(raw).rules[0].fingerprint != base.fingerprint, raw


def test_the_policy_label_is_the_version_and_the_files_digest(tmp_path) -> None:
    text = "version: v1\nrules:\n  - {id: a, decision: deny, when: {env: prod}}\n"
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    one.write_text(text)
    two.write_text(text)
    a, b = load(one), load(two)
    assert a.label == b.label and a.label.startswith("v1@") and len(a.digest) == 12
    assert a.source == str(one)
    two.write_text(text + "  - {id: b, decision: allow}\n")
    assert load(two).label != a.label


# -- valid files ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("deadline", "seconds"),
    [
        ("90s", 90.0),
        ("30m", 1800.0),
        ("72h", 259200.0),
        ("2d", 172800.0),
        (3600, 3600.0),
        (2.5, 2.5),
        ("1.5h", 5400.0),
        ("45", 45.0),
        (" 10 m ", 600.0),
    ],
)
def test_valid_deadlines(tmp_path, deadline, seconds) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "version: v1\nrules:\n"
        f"  - id: ask\n    decision: require_human\n    deadline: {deadline!r}\n"
        if isinstance(deadline, str)
        else f"version: v1\nrules:\n  - id: ask\n    decision: require_human\n"
        f"    deadline: {deadline}\n"
    )
    assert load(path).rules[0].deadline == seconds


def test_a_rule_without_deadline_has_none() -> None:
    assert policy(rule("r", "require_human")).rules[0].deadline is None


def test_the_example_policy_loads() -> None:
    example = Path(__file__).resolve().parents[2] / "tasks" / "policy.yaml"
    p = load(example)
    assert [(r.id, r.decision) for r in p.rules] == [
        ("irreversible-deletes-need-a-human", Decision.REQUIRE_HUMAN),
        ("no-blind-prod-writes", Decision.DENY),
    ]
    assert p.rules[0].deadline == 86400.0
    assert p.rules[0].description.startswith("Nothing that cannot be undone")


def test_an_empty_rule_list_is_a_valid_policy() -> None:
    p = parse({"version": "v1", "rules": []})
    assert p.rules == () and p.evaluate(BASE).decision is Decision.ALLOW


# -- malformed files: each error names its place --------------------------------------------

RULE_OK = "    when: {env: production}\n    decision: deny\n"
ASK = "version: v1\nrules:\n  - {id: a, decision: require_human, deadline: %s}\n"

MALFORMED = [
    # id, file text, fragments the one-line error must contain (besides the file's path)
    ("invalid-yaml-flow", "version: v1\nrules:\n  - id: a\n    when: {env: [prod\n",
     ["line 5, column 1", "expected ',' or ']'"]),
    ("invalid-yaml-indent", "version: v1\nrules:\n  - id: a\n   decision: deny\n",
     ["line 4, column 4"]),
    ("invalid-yaml-colon", "version: v1\nrules: a: b\n", ["line 2, column 9"]),
    ("empty-file", "", ["must be a mapping"]),
    ("a-list", "- id: a\n  decision: deny\n", ["must be a mapping"]),
    ("a-string", "just words\n", ["must be a mapping"]),
    ("missing-version", "rules: []\n", ["field 'version'", "must be v1", "None"]),
    ("wrong-version", "version: v2\nrules: []\n", ["field 'version'", "'v2'"]),
    ("numeric-version", "version: 1\nrules: []\n", ["field 'version'", "not 1"]),
    ("unknown-top-level", "version: v1\nrules: []\nrulez: []\n", ["unknown top-level", "rulez"]),
    ("missing-rules", "version: v1\n", ["field 'rules'", "must be a list"]),
    ("rules-a-mapping", "version: v1\nrules: {id: a}\n", ["field 'rules'", "must be a list"]),
    ("rules-a-string", "version: v1\nrules: deny everything\n", ["field 'rules'"]),
    ("rule-a-string", "version: v1\nrules:\n  - deny-all\n", ["rule 1:", "must be a mapping"]),
    ("second-rule-a-list", f"version: v1\nrules:\n  - id: a\n{RULE_OK}  - [x]\n",
     ["rule 2:", "must be a mapping"]),
    ("missing-id", "version: v1\nrules:\n  - decision: deny\n", ["rule 1:", "field 'id'"]),
    ("empty-id", "version: v1\nrules:\n  - {id: '  ', decision: deny}\n",
     ["rule 1:", "field 'id'", "non-empty"]),
    ("numeric-id", "version: v1\nrules:\n  - {id: 7, decision: deny}\n", ["rule 1:", "field 'id'"]),
    ("duplicate-id", f"version: v1\nrules:\n  - id: a\n{RULE_OK}  - id: b\n{RULE_OK}"
                     f"  - id: a\n{RULE_OK}",
     ["rule 3 (a)", "field 'id'", "duplicate"]),
    ("unknown-rule-field", f"version: v1\nrules:\n  - id: a\n{RULE_OK}    whenever: always\n",
     ["rule 1 (a)", "unknown field", "whenever"]),
    ("unknown-decision", "version: v1\nrules:\n  - {id: a, decision: maybe}\n",
     ["rule 1 (a)", "field 'decision'", "'maybe'", "allow, require_human, deny"]),
    ("missing-decision", "version: v1\nrules:\n  - {id: a, when: {env: prod}}\n",
     ["rule 1 (a)", "field 'decision'", "None"]),
    ("when-a-list", "version: v1\nrules:\n  - {id: a, decision: deny, when: [env]}\n",
     ["rule 1 (a)", "field 'when'", "mapping"]),
    ("unknown-fact", f"version: v1\nrules:\n  - id: a\n{RULE_OK}  - id: b\n    decision: deny\n"
                     "    when: {colour: red}\n",
     ["rule 2 (b)", "field 'when.colour'", "unknown fact", "side_effect"]),
    ("bool-fact-a-string", "version: v1\nrules:\n  - id: a\n    decision: deny\n"
                           "    when: {side_effect: 'true'}\n",
     ["rule 1 (a)", "field 'when.side_effect'", "true or false", "'true'"]),
    ("bool-fact-a-word", "version: v1\nrules:\n  - id: a\n    decision: deny\n"
                         "    when: {approval_present: absent}\n",
     ["rule 1 (a)", "field 'when.approval_present'", "'absent'"]),
    ("bool-fact-a-number", "version: v1\nrules:\n  - id: a\n    decision: deny\n"
                           "    when: {rollback_supported: 0}\n",
     ["rule 1 (a)", "field 'when.rollback_supported'", "true or false"]),
    ("text-fact-a-number", "version: v1\nrules:\n  - id: a\n    decision: deny\n"
                           "    when: {env: 5}\n",
     ["rule 1 (a)", "field 'when.env'", "text pattern", "5"]),
    ("text-fact-list-with-a-number", "version: v1\nrules:\n  - id: a\n    decision: deny\n"
                                     "    when: {step: [a, 3]}\n",
     ["rule 1 (a)", "field 'when.step'", "text pattern"]),
    ("text-fact-a-bool", "version: v1\nrules:\n  - id: a\n    decision: deny\n"
                         "    when: {topic: true}\n",
     ["rule 1 (a)", "field 'when.topic'", "text pattern"]),
    ("text-fact-empty-list", "version: v1\nrules:\n  - id: a\n    decision: deny\n"
                             "    when: {direction: []}\n",
     ["rule 1 (a)", "field 'when.direction'"]),
    ("text-fact-empty-text", "version: v1\nrules:\n  - id: a\n    decision: deny\n"
                             "    when: {saga: ''}\n",
     ["rule 1 (a)", "field 'when.saga'"]),
    ("tags-a-mapping", "version: v1\nrules:\n  - id: a\n    decision: deny\n"
                       "    when: {tags: {a: b}}\n",
     ["rule 1 (a)", "field 'when.tags'"]),
    ("deadline-soon", ASK % "soon",
     ["rule 1 (a)", "field 'deadline'", "'soon'", "90s"]),
    ("deadline-negative", ASK % "-5",
     ["rule 1 (a)", "field 'deadline'", "-5"]),
    ("deadline-zero-hours",
     ASK % "0h",
     ["rule 1 (a)", "field 'deadline'", "'0h'"]),
    ("deadline-zero", ASK % "0",
     ["rule 1 (a)", "field 'deadline'"]),
    ("deadline-unit", ASK % "3w",
     ["rule 1 (a)", "field 'deadline'", "'3w'"]),
    ("deadline-bool", ASK % "true",
     ["rule 1 (a)", "field 'deadline'"]),
    ("deadline-negative-text",
     ASK % "'-5m'",
     ["rule 1 (a)", "field 'deadline'"]),
]


@pytest.mark.parametrize(("text", "fragments"), [(t, f) for _, t, f in MALFORMED],
                         ids=[i for i, _, _ in MALFORMED])
def test_a_malformed_policy_file_names_its_place(tmp_path, text, fragments) -> None:
    path = tmp_path / "ops-policy.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as caught:
        load(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:"), message  # the file first
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert "\n" not in message  # one line
    assert isinstance(caught.value, ConfigurationError)  # the CLI's one-line error


def test_an_unreadable_policy_file_is_named(tmp_path) -> None:
    missing = tmp_path / "nowhere.yaml"
    with pytest.raises(PolicyError, match="cannot read the policy file") as caught:
        load(missing)
    assert str(caught.value).startswith(f"{missing}:")
    assert "No such file" in str(caught.value)

    with pytest.raises(PolicyError, match="cannot read the policy file") as caught:
        load(tmp_path)  # a directory
    assert str(caught.value).startswith(f"{tmp_path}:")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_a_policy_file_without_read_permission_is_named(tmp_path) -> None:
    path = tmp_path / "secret.yaml"
    path.write_text("version: v1\nrules: []\n")
    path.chmod(0)
    try:
        with pytest.raises(PolicyError, match="Permission denied") as caught:
            load(path)
        assert str(caught.value).startswith(f"{path}:")
    finally:
        path.chmod(0o600)


def test_parse_names_its_source() -> None:
    with pytest.raises(PolicyError) as caught:
        parse({"version": "v1", "rules": [{"id": "x", "decision": "nope"}]}, source="inline.yaml")
    assert str(caught.value).startswith("inline.yaml: rule 1 (x): field 'decision'")
