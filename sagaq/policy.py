"""The policy gate: which dispatches are allowed, denied, or need a human. Pure evaluation.

A policy file (YAML) lists rules; a rule matches when every fact it names matches::

    version: v1
    rules:
      - id: deny-irreversible-delete-without-approval
        when: {topic: "infra.*", rollback_supported: false, approval_present: false}
        decision: deny
      - id: prod-payments-need-a-human
        when: {env: [production, staging], tags: payments}
        decision: require_human
        deadline: 72h

**Matching.** A boolean fact matches ``true``/``false``. A text fact matches a pattern
(``*`` and ``?`` wildcards) or any of a list of them. ``tags`` matches when any of the step's
tags matches. A rule with an empty ``when`` matches every dispatch.

**Precedence.** The most restrictive matching rule decides: ``deny`` over ``require_human``
over ``allow``; among equals, the first in the file. No matching rule means ``allow``.
Every matching rule id is reported, not only the deciding one.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from sagaq.errors import ConfigurationError

BOOL_FACTS = frozenset(
    {"side_effect", "compensation_declared", "rollback_supported", "at_most_once",
     "approval_present"}
)
TEXT_FACTS = frozenset({"env", "saga", "step", "kind", "topic", "direction"})
LIST_FACTS = frozenset({"tags"})
FACTS = BOOL_FACTS | TEXT_FACTS | LIST_FACTS
RULE_KEYS = frozenset({"id", "when", "decision", "deadline", "description"})
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class PolicyError(ConfigurationError):
    """A policy file that cannot be used; the message names the file, the rule, the field."""


class Decision(str, Enum):
    ALLOW = "allow"
    REQUIRE_HUMAN = "require_human"
    DENY = "deny"

    @property
    def severity(self) -> int:
        return {"allow": 0, "require_human": 1, "deny": 2}[self.value]


@dataclass(frozen=True)
class Facts:
    """What the gate knows about one dispatch."""

    env: str
    saga: str
    step: str
    kind: str
    direction: str
    side_effect: bool
    compensation_declared: bool
    rollback_supported: bool
    at_most_once: bool
    approval_present: bool = False
    topic: str | None = None
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rule:
    id: str
    when: Mapping[str, Any]  # fact → bool, or a tuple of patterns
    decision: Decision
    deadline: float | None = None  # seconds an approval request may wait
    description: str = ""

    @property
    def fingerprint(self) -> str:
        """Changes when what the rule says changes: approvals are tied to it."""
        body = json.dumps({"when": dict(self.when), "decision": self.decision.value},
                          sort_keys=True, default=list)
        return hashlib.sha256(body.encode()).hexdigest()[:16]

    def check(self, facts: Facts) -> tuple[bool, list[str]]:
        """Whether the rule matches, and why (one line per condition)."""
        reasons = []
        ok = True
        for name, expected in self.when.items():
            actual = getattr(facts, name)
            if name in BOOL_FACTS:
                hit = actual is expected
            elif name in LIST_FACTS:
                hit = any(fnmatch.fnmatchcase(tag, p) for tag in actual for p in expected)
            else:
                hit = actual is not None and any(
                    fnmatch.fnmatchcase(str(actual), p) for p in expected
                )
            want = expected if name in BOOL_FACTS else " | ".join(expected)
            reasons.append(f"{name}: {actual!r} {'matches' if hit else 'does not match'} {want}")
            ok = ok and hit
        return ok, reasons


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    matched: tuple[str, ...] = ()  # every matching rule id, in file order
    rule: Rule | None = None  # the deciding rule

    @property
    def rule_id(self) -> str | None:
        return self.rule.id if self.rule else None


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...] = ()
    version: str = "v1"
    source: str = "<none>"
    digest: str = "none"  # of the file's content: what "the policy version" means in events

    @property
    def label(self) -> str:
        return f"{self.version}@{self.digest}"

    def evaluate(self, facts: Facts) -> Verdict:
        matched = [r for r in self.rules if r.check(facts)[0]]
        if not matched:
            return Verdict(Decision.ALLOW)
        deciding = max(matched, key=lambda r: (r.decision.severity, -self.rules.index(r)))
        return Verdict(deciding.decision, tuple(r.id for r in matched), deciding)

    def explain(self, facts: Facts) -> list[dict[str, Any]]:
        """Each rule, whether it matches and why: ``sagaq policy explain``."""
        out = []
        for rule in self.rules:
            ok, reasons = rule.check(facts)
            out.append({"id": rule.id, "decision": rule.decision.value, "matches": ok,
                        "reasons": reasons or ["no conditions: matches every dispatch"]})
        return out

    def rule(self, rule_id: str) -> Rule | None:
        return next((r for r in self.rules if r.id == rule_id), None)


ALLOW_ALL = Policy()


def load(path: str | Path) -> Policy:
    """Read and validate a policy file; every error names the file, the rule and the field."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the policy file ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise PolicyError(f"{path}:{where}: {problem}") from None
    return parse(data, source=str(path), digest=hashlib.sha256(text.encode()).hexdigest()[:12])


def parse(data: Any, *, source: str = "<policy>", digest: str = "inline") -> Policy:
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: the policy must be a mapping with 'version' and 'rules'")
    unknown = set(data) - {"version", "rules"}
    if unknown:
        raise PolicyError(f"{source}: unknown top-level field(s) {', '.join(sorted(unknown))}")
    if data.get("version") != "v1":
        raise PolicyError(f"{source}: field 'version' must be v1, not {data.get('version')!r}")
    rules = data.get("rules")
    if not isinstance(rules, list):
        raise PolicyError(f"{source}: field 'rules' must be a list of rules")
    parsed: list[Rule] = []
    for index, raw in enumerate(rules, start=1):
        rule = _rule(source, index, raw)
        if any(r.id == rule.id for r in parsed):
            raise PolicyError(f"{source}: rule {index} ({rule.id}): field 'id': duplicate id")
        parsed.append(rule)
    return Policy(tuple(parsed), "v1", source, digest)


def _rule(source: str, index: int, raw: Any) -> Rule:
    where = f"{source}: rule {index}"
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: a rule must be a mapping with id, when and decision")
    rule_id = raw.get("id")
    if not isinstance(rule_id, str) or not rule_id.strip():
        raise PolicyError(f"{where}: field 'id': a non-empty text is required")
    where = f"{where} ({rule_id})"
    unknown = set(raw) - RULE_KEYS
    if unknown:
        raise PolicyError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    try:
        decision = Decision(raw.get("decision"))
    except ValueError:
        choices = ", ".join(d.value for d in Decision)
        raise PolicyError(
            f"{where}: field 'decision': {raw.get('decision')!r} is not one of {choices}"
        ) from None
    when = raw.get("when", {}) or {}
    if not isinstance(when, dict):
        raise PolicyError(f"{where}: field 'when': a mapping of facts is required")
    conditions: dict[str, Any] = {}
    for name, value in when.items():
        conditions[name] = _condition(f"{where}: field 'when.{name}'", name, value)
    deadline = raw.get("deadline")
    seconds = None if deadline is None else _duration(f"{where}: field 'deadline'", deadline)
    description = raw.get("description", "")
    return Rule(rule_id.strip(), conditions, decision, seconds, str(description))


def _condition(where: str, name: str, value: Any) -> Any:
    if name not in FACTS:
        raise PolicyError(f"{where}: unknown fact; known: {', '.join(sorted(FACTS))}")
    if name in BOOL_FACTS:
        if not isinstance(value, bool):
            raise PolicyError(f"{where}: must be true or false, not {value!r}")
        return value
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) and v for v in values):
        raise PolicyError(f"{where}: must be a text pattern or a list of them, not {value!r}")
    return tuple(values)


def _duration(where: str, value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    found = _DURATION.match(str(value)) if isinstance(value, str) else None
    if not found or float(found.group(1)) <= 0:
        raise PolicyError(f"{where}: {value!r} is not a duration such as 90s, 30m, 72h or 2d")
    return float(found.group(1)) * _UNIT[found.group(2)]


def facts_dict(facts: Facts) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(facts).items()}


__all__ = [
    "ALLOW_ALL",
    "Decision",
    "Facts",
    "Policy",
    "PolicyError",
    "Rule",
    "Verdict",
    "facts_dict",
    "load",
    "parse",
]
