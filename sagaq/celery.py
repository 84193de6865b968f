"""The Celery app built from ``SAGAQ_*`` variables: ``celery -A sagaq worker|beat|flower``.

Set ``SAGAQ_IMPORTS`` to the modules that define your sagas, so the worker registers a
task for each of their steps. A worker or beat started this way makes the same start-up
checks as ``sagaq worker|beat`` (SAGAQ_SECRET_KEY, the schema revision).
"""

import sys
from collections.abc import Callable
from typing import Any

from celery import signals

from sagaq.errors import SagaqError
from sagaq.preflight import check_start
from sagaq.runtime import default_runtime

try:
    app = default_runtime().app
except SagaqError as exc:  # a bad setting: one line naming it, not a traceback
    print(f"Error: {exc.message}", file=sys.stderr)
    raise SystemExit(1) from None


def _refuse_to_start(role: str) -> Callable[..., None]:
    def check(**_: Any) -> None:
        try:
            check_start(default_runtime(), role)
        except SagaqError as exc:
            print(f"Error: {exc.message}", file=sys.stderr)
            # SystemExit, not an Exception: Celery's signal dispatch logs and swallows those.
            raise SystemExit(1) from None

    return check


signals.worker_init.connect(_refuse_to_start("worker"), weak=False)
signals.beat_init.connect(_refuse_to_start("beat"), weak=False)
