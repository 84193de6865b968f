"""The Celery app built from ``SAGAQ_*`` variables: ``celery -A sagaq worker|beat|flower``.

Set ``SAGAQ_IMPORTS`` to the modules that define your sagas, so the worker registers a
task for each of their steps.
"""

from sagaq.runtime import default_runtime

app = default_runtime().app
