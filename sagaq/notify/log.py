"""The notifier that is always there: one log line per notice, so no page is ever silent."""

from __future__ import annotations

import logging

from sagaq.notify.base import Action, Kind, Notice
from sagaq.text import one_line as _one_line

LOGGER_NAME = "sagaq.notify"


class LogNotifier:
    """Logs to ``sagaq.notify``: ERROR for a page, WARNING for a notify, INFO for a resolve.

    A resolve is logged at INFO because it reports that the alarm is over; logging it at ERROR
    would make log-based alerting fire again when the incident closes. ``send`` never raises: it
    is the fallback channel, and a logging failure must not turn into a failed delivery.
    """

    name: str = "log"
    kinds: frozenset[Kind] = frozenset({Kind.PAGE, Kind.NOTIFY})

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger(LOGGER_NAME)

    def __repr__(self) -> str:
        return f"LogNotifier(logger={self.logger.name!r})"

    def send(self, notice: Notice) -> None:
        try:
            if notice.action is Action.RESOLVE:
                level = logging.INFO
            elif notice.kind is Kind.PAGE:
                level = logging.ERROR
            else:
                level = logging.WARNING
            # Step text is written out (escapes, bidi), so a log viewer shows it, never runs it.
            note = f" note='{_one_line(notice.note)}'" if notice.note else ""
            commands = " | ".join(_one_line(c) for c in notice.commands) or "-"
            self.logger.log(
                level,
                "%s %s: %s [saga %s %s, state %s, dedup_key %s]%s; commands: %s",
                notice.kind.value.upper(),
                notice.action.value,
                _one_line(notice.summary),
                _one_line(notice.saga_name),
                _one_line(notice.saga_id),
                notice.state,
                _one_line(notice.dedup_key),
                note,
                commands,
            )
        except Exception:  # never let the last-resort channel fail a delivery
            return
