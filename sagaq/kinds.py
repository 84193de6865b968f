"""What a notification is (a page or a notice) and what it does (trigger or resolve).

Plain data below the store: the store writes notifications by kind and action, the notifiers
read them; neither imports the other for it. Re-exported from :mod:`sagaq.notify.base`.
"""

from __future__ import annotations

from enum import Enum


class Kind(str, Enum):
    PAGE = "page"  # level 4: wake a human
    NOTIFY = "notify"  # level 3 and the like: tell, do not page


class Action(str, Enum):
    TRIGGER = "trigger"
    RESOLVE = "resolve"
