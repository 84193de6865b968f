"""`sagaq ls` and `sagaq show` of a saga whose key and error are hostile (issue 13, item 1):
markup is shown as it is, escape sequences are written out, and nothing crashes."""

from __future__ import annotations

import unicodedata

from sagaq import SagaState
from tests.acceptance.test_cli import cli, env_for

MESSAGE = ("cannot open [/var/lib/data]\x1b[2K [link=https://evil.example]here[/link] [conceal]x"
           "\x1b[1A\x1b]8;;https://evil.example\x1b\\click\x1b]8;;\x1b\\")


def test_ls_and_show_print_hostile_text_literally(runtime, worker, settings, wait_settled):
    saga_id = runtime.engine.enqueue("hostile_error", {"message": MESSAGE}, key="order-[/42]")
    assert wait_settled(saga_id) == [SagaState.COMPENSATED]
    env = {**env_for(settings), "COLUMNS": "200"}
    for args in (("show", saga_id), ("ls", "--name", "hostile_error"),
                 ("ls", "--name", "hostile_error", "--limit", "1")):
        done = cli(*args, env=env)
        assert done.returncode == 0, (args, done.stderr)
        assert "MarkupError" not in done.stderr
        out = done.stdout
        assert not [c for c in out if unicodedata.category(c) == "Cc" and c != "\n"], args
        assert "\\x1b[2K" in out and "[/var/lib/data]" in out, out
    shown = cli("show", saga_id, env=env).stdout
    assert "order-[/42]" in shown and "[link=https://evil.example]" in shown
