"""``python -m bench mutation [MODULE ...]``: mutation testing of the pure modules.

mutmut changes one thing at a time in a module (a ``<`` into ``<=``, a string into another,
a ``return`` dropped) and runs the unit tests that reach it. A mutant the tests do not notice
"survived": a behaviour nothing pins. The run works in a scratch copy of the project (mutmut
writes a ``mutants/`` tree beside the sources), with ``tests/unit`` only, and prints per
module: mutants, killed (a test failed, or timed out), survived (no test failed, or no test
reached it) and the score killed / (killed + survived).

It is slow (a few minutes per module on two cores) and does not run in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import table

ROOT = Path(__file__).resolve().parents[1]
PURE = ("ladder", "definition", "machine", "secrets", "policy", "keys", "failures")
# Files the unit tests read besides the package (the example policy, the README's diagram).
COPIED = ("sagaq", "tests", "tasks", "README.md", "pyproject.toml")
KILLED = {"killed", "timeout", "segfault", "caught by type check"}
SURVIVED = {"survived", "no tests"}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench mutation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("modules", nargs="*", metavar="MODULE",
                   help=f"modules of sagaq to mutate (default: all of {', '.join(PURE)})")
    p.add_argument("--jobs", type=int, default=2, help="mutants tested at once")
    p.add_argument("--survivors", action="store_true",
                   help="print the diff of every surviving mutant")
    p.add_argument("--keep", type=Path, metavar="DIR",
                   help="work in DIR and keep it (mutmut browse/show work there later)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    return p.parse_args(argv)


def mutmut_config(modules: list[str]) -> str:
    """The ``[tool.mutmut]`` table of the scratch copy: these modules, unit tests only."""
    only = ", ".join(f'"sagaq/{m}.py"' for m in modules)
    return (
        "\n[tool.mutmut]\n"
        'source_paths = ["sagaq"]\n'
        f"only_mutate = [{only}]\n"
        'pytest_add_cli_args_test_selection = ["tests/unit"]\n'
        'pytest_add_cli_args = ["-p", "no:randomly", "-q"]\n'
        'also_copy = ["tasks", "README.md"]\n'
    )


def prepare(work: Path, modules: list[str]) -> None:
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, work / name, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
                "__pycache__", "*.pyc", "mutants"))
        elif src.exists():
            shutil.copy2(src, work / name)
    project = (work / "pyproject.toml").read_text()
    # A [tool.mutmut] table of the project (if any) is replaced, never merged.
    project = re.sub(r"\n\[tool\.mutmut\]\n(?:(?!\n\[).)*", "", project, flags=re.S)
    (work / "pyproject.toml").write_text(project + mutmut_config(modules))


def count(work: Path, module: str) -> dict[str, Any]:
    from mutmut.stats import status_by_exit_code

    meta = work / "mutants" / "sagaq" / f"{module}.py.meta"
    codes: dict[str, int | None] = json.loads(meta.read_text())["exit_code_by_key"]
    statuses = {name: status_by_exit_code[code] for name, code in codes.items()}
    killed = sum(1 for s in statuses.values() if s in KILLED)
    survived = sorted(n for n, s in statuses.items() if s in SURVIVED)
    judged = killed + len(survived)
    return {
        "module": module,
        "mutants": len(codes),
        "killed": killed,
        "survived": len(survived),
        "score": round(100.0 * killed / judged, 1) if judged else float("nan"),
        "survivors": survived,
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    modules = args.modules or list(PURE)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        work = args.keep
        if (work / "mutants").exists():  # a fresh run, not mutmut's cache of older tests
            shutil.rmtree(work / "mutants")
    else:
        work = Path(tempfile.mkdtemp(prefix="sagaq-mutation-"))
    try:
        prepare(work, modules)
        log = work / "mutmut.log"
        env = {**os.environ, "PYTHONPATH": ""}  # import the mutated copy, not this checkout
        with open(log, "wb") as out:
            done = subprocess.run(
                [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.jobs)],
                cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, check=False,
            )
        rows = []
        for module in modules:
            try:
                rows.append(count(work, module))
            except (OSError, ValueError, KeyError):
                tail = log.read_text(errors="replace")[-3000:]
                raise SystemExit(f"mutmut produced no results for {module} "
                                 f"(exit {done.returncode}); its log ends:\n{tail}") from None
        if args.survivors:
            for row in rows:
                for name in row["survivors"]:
                    shown = subprocess.run([sys.executable, "-m", "mutmut", "show", name],
                                           cwd=work, env=env, capture_output=True, text=True)
                    print(shown.stdout, file=sys.stderr)
        return rows
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    unknown = [m for m in args.modules if m not in PURE]
    if args.keep and args.keep.resolve() == ROOT:
        print("--keep DIR must not be the project itself: mutmut rewrites the copy",
              file=sys.stderr)
        return 2
    if unknown:
        print(f"unknown module {', '.join(unknown)}: choose among {', '.join(PURE)}",
              file=sys.stderr)
        return 2
    try:
        import mutmut  # noqa: F401
    except ImportError:
        print("mutmut is not installed: pip install -e '.[dev]'", file=sys.stderr)
        return 2
    started = time.monotonic()
    rows = run(args)
    killed = sum(r["killed"] for r in rows)
    survived = sum(r["survived"] for r in rows)
    total = {"module": "total", "mutants": sum(r["mutants"] for r in rows), "killed": killed,
             "survived": survived,
             "score": round(100.0 * killed / (killed + survived), 1) if rows else float("nan")}
    if args.json:
        print(json.dumps({"modules": rows, "total": total,
                          "wall_s": round(time.monotonic() - started, 1)}, indent=2))
    else:
        print(table([*rows, total], ["module", "mutants", "killed", "survived", "score"]))
    return 0
