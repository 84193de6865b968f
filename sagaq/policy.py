"""The policy gate: which dispatches are allowed, denied, or need a human. Pure evaluation.

A policy file (YAML) lists rules; a rule matches when every fact it names matches::

    version: v1
    rules:
      - id: irreversible-deletes-need-a-human
        when: {topic: "infra.*", rollback_supported: false, direction: forward}
        decision: require_human
      - id: prod-payments-need-a-human
        when: {env: [production, staging], tags: payments, direction: forward}
        decision: require_human
        deadline: 72h

**Matching.** A boolean fact matches ``true``/``false``. A text fact matches a pattern
(``*`` and ``?`` wildcards, shell-style over the whole value) or any of a list of them.
``*`` crosses every character, dots and dashes included: ``infra.db*`` also matches
``infra.dbadmin-sandbox``; write ``[infra.db, "infra.db.*"]`` for the segment and what is
under it (``policy check`` warns about such a glob). ``env`` is compared without regard to
case or surrounding spaces (``Production `` is ``production``); every other fact is exact.
``direction`` is ``forward`` or ``compensate`` and ``kind`` one of the step kinds: a pattern
no value can match is refused. ``tags`` matches when any of the step's tags matches. A rule
without ``when`` (or with ``when: {}``) matches every dispatch; a ``when`` of ``[]``,
``false``, ``0`` or ``""`` is refused rather than read as "everything".

**Direction.** A rule that names no ``direction`` gates compensations too: a
``require_human`` then makes a rollback wait for a person. Write ``direction: forward`` to
gate forward steps only.

**Precedence.** The most restrictive matching rule decides: ``deny`` over ``require_human``
over ``allow``; among equals, the first in the file. No matching rule means ``allow``.
Every matching rule id is reported, not only the deciding one. So a ``deny`` with
``approval_present: false`` is a plain deny: no approval can be asked for that dispatch
(the deny outranks any ``require_human``); ``policy check`` warns about it, and about any
rule another one always outranks.

**The file.** YAML with no duplicate keys (a second ``rules:`` would silently replace the
first); deadlines are finite and at most 366 days.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
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
DIRECTIONS = ("forward", "compensate")
KINDS = ("compensable", "pivot", "retryable", "noncompensable")
CHOICES = {"direction": DIRECTIONS, "kind": KINDS}
MAX_DEADLINE = 366 * 86400.0  # beyond a year it is a typo; near 10^11 s a datetime overflows
DIRECTION_NOTE = (
    "a rule without `direction` gates forward steps and compensations alike (a "
    "require_human then makes a rollback wait for a person); write `direction: forward` "
    "to gate forward steps only"
)
_CROSSING = re.compile(r"[^.*?\-_/:]\*")  # a * glued to a word: it runs past the segment
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
            if name == "env":  # an env is a name: "Production " is production
                actual = str(actual).strip().lower()
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

    def warnings(self) -> list[str]:
        """Rules that read one way and act another: ``sagaq policy check`` prints these."""
        out = []
        for index, rule in enumerate(self.rules):
            present = rule.when.get("approval_present")
            if rule.decision is Decision.DENY and present is False:
                out.append(f"rule {rule.id}: a deny with approval_present: false can never be "
                           "lifted by an approval (deny outranks require_human, so none is "
                           "ever asked for): it is a plain deny")
            elif rule.decision is Decision.REQUIRE_HUMAN and present is True:
                out.append(f"rule {rule.id}: it asks for an approval only once one is present, "
                           "so it never asks")
            for other in self.rules[:index]:
                if other.decision.severity >= rule.decision.severity and _covers(other, rule):
                    out.append(f"rule {rule.id} never decides: rule {other.id} matches whenever "
                               f"it does and outranks it ({other.decision.value})")
                    break
            for other in self.rules[index + 1 :]:
                if other.decision.severity > rule.decision.severity and _covers(other, rule):
                    out.append(f"rule {rule.id} never decides: rule {other.id} matches whenever "
                               f"it does and outranks it ({other.decision.value})")
                    break
            for name, patterns in rule.when.items():
                for p in patterns if name in TEXT_FACTS | LIST_FACTS else ():
                    if "." in p and _CROSSING.search(p):  # segmented names: topics, tags
                        out.append(f"rule {rule.id}: {name} pattern {p!r} also matches longer "
                                   f"names (* crosses dots and dashes); for one segment write "
                                   f"{p.rstrip('*')!r} and {p.rstrip('*') + '.*'!r}")
        return out


def _covers(wide: Rule, narrow: Rule) -> bool:
    """Whether ``wide`` matches every dispatch ``narrow`` matches (judged by their text)."""
    for name, expected in wide.when.items():
        if name == "approval_present" and expected is False and wide.decision is Decision.DENY:
            continue  # no approval is ever asked for while this deny matches: always true
        if name not in narrow.when:
            return False
        if name in BOOL_FACTS:
            if narrow.when[name] is not expected:
                return False
        elif not all(any(_within(p, q) for q in expected) for p in narrow.when[name]):
            return False
    return True


def _within(narrow: str, wide: str) -> bool:
    """Whether every value pattern ``narrow`` matches, ``wide`` matches too (sound, not
    complete: only equal patterns, ``*``, and a literal prefix followed by ``*``)."""
    if wide in ("*", narrow):
        return True
    prefix = wide[:-1]
    return wide.endswith("*") and not any(c in prefix for c in "*?[") and narrow.startswith(
        prefix
    )


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
        data = yaml.load(text, Loader=_unique_keys_loader())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise PolicyError(f"{path}:{where} {problem}") from None
    return parse(data, source=str(path), digest=hashlib.sha256(text.encode()).hexdigest()[:12])


def _unique_keys_loader() -> Any:
    """A SafeLoader that refuses a key given twice in one mapping (YAML keeps the last)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, *args: Any, **kwargs: Any) -> Any:
            seen: set[str] = set()
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    if key_node.value in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                        )
                    seen.add(key_node.value)
            return super().construct_mapping(node, *args, **kwargs)

    return Loader


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
    when = {} if raw.get("when") is None else raw["when"]  # `when:` alone: as if omitted
    if not isinstance(when, dict):
        if when in ([], "", False, 0):
            raise PolicyError(
                f"{where}: field 'when' is {when!r}, which would match every dispatch; omit it "
                "(or write {}) to mean that, or name the facts to match"
            )
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
    if name == "env":  # compared without case or surrounding spaces, as the fact is
        values = [v.strip().lower() for v in values]
    if name in CHOICES:  # a closed set of values: a pattern must be able to match one
        for v in values:
            if not any(fnmatch.fnmatchcase(c, v.lower()) for c in CHOICES[name]):
                known = ", ".join(CHOICES[name])
                raise PolicyError(f"{where}: {v!r} never matches; one of {known}")
        return tuple(v.lower() for v in values)
    return tuple(values)


def _duration(where: str, value: Any) -> float:
    seconds = math.nan
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (found := _DURATION.match(value)):
        seconds = float(found.group(1)) * _UNIT[found.group(2)]
    if seconds > MAX_DEADLINE and math.isfinite(seconds):
        raise PolicyError(f"{where}: {value!r} is more than 366 days")
    if not 0 < seconds <= MAX_DEADLINE:  # also NaN and infinity
        raise PolicyError(f"{where}: {value!r} is not a duration such as 90s, 30m, 72h or 2d")
    return seconds


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
