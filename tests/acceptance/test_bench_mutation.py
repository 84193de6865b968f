"""``python -m bench mutation``: the command exists, refuses what it cannot run, and prepares
its scratch copy. The mutation run itself takes many minutes and is not run here."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

from bench import mutation

ROOT = Path(__file__).resolve().parents[2]


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", "mutation", *args], cwd=ROOT, capture_output=True,
        text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_help_names_the_command_and_its_options() -> None:
    done = _bench("--help")
    assert done.returncode == 0, done.stderr
    assert "python -m bench mutation" in done.stdout
    for option in ("MODULE", "--jobs", "--survivors", "--keep", "--json"):
        assert option in done.stdout


def test_an_unknown_module_is_refused_in_one_line() -> None:
    done = _bench("ladder", "engine")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "unknown module engine: choose among ladder, definition, machine, secrets, policy, "
        "keys, failures"
    )
    assert done.stdout == ""


def test_the_project_itself_is_not_a_scratch_directory() -> None:
    done = _bench("--keep", str(ROOT), "keys")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "--keep DIR must not be the project itself: mutmut rewrites the copy"
    )


def test_the_scratch_copy_mutates_the_named_modules_with_unit_tests_only(tmp_path: Path) -> None:
    mutation.prepare(tmp_path, ["ladder", "keys"])
    config = tomllib.loads((tmp_path / "pyproject.toml").read_text())["tool"]["mutmut"]
    assert config["only_mutate"] == ["sagaq/ladder.py", "sagaq/keys.py"]
    assert config["pytest_add_cli_args_test_selection"] == ["tests/unit"]
    assert config["source_paths"] == ["sagaq"]
    for copied in ("sagaq/ladder.py", "tests/unit/test_ladder.py", "tasks/policy.yaml",
                   "README.md"):
        assert (tmp_path / copied).is_file(), copied
    # prepared twice (--keep on a used directory): still one [tool.mutmut] table
    mutation.prepare(tmp_path, ["machine"])
    text = (tmp_path / "pyproject.toml").read_text()
    assert text.count("[tool.mutmut]") == 1
    assert tomllib.loads(text)["tool"]["mutmut"]["only_mutate"] == ["sagaq/machine.py"]
