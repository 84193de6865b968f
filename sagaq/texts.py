"""Plain-text forms of the JSON records (`sagaq evidence`, `sagaq policy explain`).

No markup: text from steps and callers is printed as it is, with control characters made
visible, so it cannot move the cursor or hide itself.
"""

from __future__ import annotations

import re
from typing import Any

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean(value: Any) -> str:
    """``value`` as one printable text: control bytes shown as ``\\xNN``."""
    text = "" if value is None else str(value)
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text).replace("\n", " ")


def _names(items: list[Any]) -> str:
    return ", ".join(clean(i) for i in items) or "-"


def evidence(record: dict[str, Any]) -> str:
    lines = [
        f"saga       {clean(record['saga'])} {record['run_id']} "
        f"(definition {record['definition_version']}): {record['status']}",
        f"started    {record['started_at']}",
        f"finished   {record['finished_at'] or '-'}",
        f"policy     rules matched: {_names(record['matched_policy_ids'])}; "
        f"versions: {_names(record['policy_versions'])}",
    ]
    for v in record["verdicts"]:
        rule = f" (rule {clean(v['rule'])})" if v["rule"] else ""
        lines.append(f"  verdict  {v['at']} {v['direction']} {clean(v['step'])}: "
                     f"{v['decision']}{rule}")
    for a in record["approvals"]:
        by = f" by {clean(a['by'])}" if a["by"] else ""
        note = f": {clean(a['note'])}" if a["note"] else ""
        lines.append(f"  approval {a['id']} {clean(a['step'])} ({a['direction']}, rule "
                     f"{clean(a['rule'])}): {a['decision']}{by}{note}")
    comp = record["compensations"]
    lines += [
        f"rollback   {'triggered' if record['rollback_triggered'] else 'not triggered'} "
        f"({record['rollback_mode']})",
        f"  dispatched     {_names(comp['dispatched'])}",
        f"  succeeded      {_names(comp['succeeded'])}",
        f"  skipped        {_names(comp['skipped'])}",
        f"  failed         {_names(comp['failed'])}",
        f"  uncompensated  {_names(record['uncompensated'])}",
    ]
    if record["error"]:
        lines.append(f"error      {clean(record['error'])}")
    lines.append("(--json for the record as JSON)")
    return "\n".join(lines)


def explanation(out: dict[str, Any]) -> str:
    facts = " ".join(f"{k}={clean(v)}" for k, v in out["facts"].items())
    rule = f" (rule {clean(out['deciding_rule'])})" if out["deciding_rule"] else " (no rule)"
    lines = [
        f"policy     {clean(out['policy']) or '(none: every dispatch is allowed)'} "
        f"version {clean(out['policy_version'])}",
        f"facts      {facts}",
        f"decision   {out['decision']}{rule}",
        f"matched    {_names(out['matched'])}",
    ]
    for r in out["rules"]:
        mark = "matches" if r["matches"] else "does not match"
        lines.append(f"  rule {clean(r['id'])} ({r['decision']}): {mark}")
        lines += [f"    - {clean(reason)}" for reason in r["reasons"]]
    lines.append(f"precedence {out['precedence']}")
    return "\n".join(lines)
