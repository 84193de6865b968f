"""The ``sagaq`` command line: the group, its global options, the commands that run and
repair sagas; the others are registered from ``cli_local`` (demo, db, embedded) and
``cli_policy`` (approvals, evidence, policy)."""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import asdict
from typing import Any

import click

from sagaq import cli_local, cli_policy, commands, render
from sagaq.cli_env import Env, console, friendly, operator, pass_env
from sagaq.errors import ConfigurationError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--database-url", metavar="URL",
              help="Overrides SAGAQ_DATABASE_URL. Neither set: the embedded PostgreSQL.")
@click.option("--broker-url", metavar="URL", help="Overrides SAGAQ_BROKER_URL.")
@click.option(
    "-I", "--import", "imports", multiple=True, metavar="MODULE",
    help="A module that defines sagas (repeatable). Overrides SAGAQ_IMPORTS.",
)
@click.version_option(package_name="sagaq")
@click.pass_context
def main(ctx: click.Context, database_url: str | None, broker_url: str | None,
         imports: tuple[str, ...]) -> None:
    """Durable sagas on Celery and PostgreSQL.

    Settings come from SAGAQ_* environment variables (SAGAQ_DATABASE_URL,
    SAGAQ_BROKER_URL, SAGAQ_IMPORTS, ...); the options below override them.
    Start with `sagaq demo`, which needs no server to install.

    With no SAGAQ_DATABASE_URL (or --database-url) the commands use an embedded
    PostgreSQL in $SAGAQ_HOME/pg (default ~/.local/share/sagaq/pg), started on first use
    and left running (`sagaq embedded stop`); it needs pip install 'sagaq[embedded]'. It is
    for trying sagaq and local development, not for production.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # As `celery` and `python -m` do: the user's own modules (SAGAQ_IMPORTS=myapp.sagas) are
    # importable from the directory the command runs in.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    ctx.obj = Env({"database_url": database_url, "broker_url": broker_url, "imports": imports})


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("-c", "--concurrency", type=int, help="Worker processes or threads.")
@click.option("-P", "--pool", default="prefork", show_default=True,
              type=click.Choice(["prefork", "threads", "solo"]))
@click.option("-l", "--loglevel", default="INFO", show_default=True)
@click.option("-Q", "--queues", metavar="QUEUE[,QUEUE...]",
              help="Queues to consume (default: SAGAQ_QUEUE). Steps declared with "
                   "queue='heavy' run only on workers started with -Q heavy.")
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
@pass_env
@friendly
def worker(env: Env, concurrency: int | None, pool: str, loglevel: str, queues: str | None,
           celery_args: tuple[str, ...]) -> None:
    """Run a Celery worker for every saga in SAGAQ_IMPORTS / -I modules.

    Refuses to start without SAGAQ_SECRET_KEY or on a database whose schema is missing or
    old. Extra arguments go to `celery worker` unchanged. `celery -A sagaq worker` is the
    same.
    """
    settings = env.settings()
    if settings.broker_url.startswith("memory://"):
        raise ConfigurationError(
            "SAGAQ_BROKER_URL is memory://, which only works inside one process "
            "(`sagaq demo`); point it at Redis, e.g. redis://127.0.0.1:6379/0"
        )
    runtime = env.runtime()
    if not len(runtime.registry):
        raise ConfigurationError(
            "no sagas are defined: set SAGAQ_IMPORTS or pass -I MODULE for the modules "
            "that define them"
        )
    from sagaq.preflight import check_start

    check_start(runtime, "worker")
    env.say_where("worker")
    argv = ["worker", "--loglevel", loglevel, "--pool", pool, "-Q", queues or settings.queue]
    if concurrency:
        argv += ["--concurrency", str(concurrency)]
    runtime.app.worker_main([*argv, *celery_args])


@main.command("ls")
@click.option("--state", help="Only sagas in this state (e.g. needs_human).")
@click.option("--name", help="Only sagas of this definition.")
@click.option("--limit", default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@pass_env
@friendly
def ls(env: Env, state: str | None, name: str | None, limit: int, as_json: bool) -> None:
    """List sagas, newest first."""
    found = commands.list_sagas(env.store(), state=state, name=name, limit=limit)
    if as_json:
        rows = [{"id": s.id, "name": s.name, "state": s.state.value,
                 "created_at": s.created_at.isoformat(), "error": s.error} for s in found]
        click.echo(json.dumps(rows, indent=2))
    else:
        console.print(render.saga_table(found))


@main.command()
@click.argument("saga_id")
@click.option("--json", "as_json", is_flag=True, help="Saga, step runs and events as JSON.")
@pass_env
@friendly
def show(env: Env, saga_id: str, as_json: bool) -> None:
    """Show one saga's whole story: its state, step runs and timeline."""
    st = commands.story(env.store(), saga_id)
    if as_json:
        click.echo(json.dumps(st.to_json(), indent=2))
    else:
        console.print(render.story(st, console.width))


@main.command()
@click.argument("name")
@click.argument("input_json", required=False, metavar="[INPUT]")
@click.option("--key", help="Enqueue at most once per key (returns the first saga's id).")
@click.option("--json", "as_json", is_flag=True, help='Print {"id": ..., "name": ...}.')
@pass_env
@friendly
def enqueue(env: Env, name: str, input_json: str | None, key: str | None,
            as_json: bool) -> None:
    """Start saga NAME with INPUT (a JSON object; default {}). Prints the saga id.

    INPUT is the JSON text itself, `-` to read it from stdin, or @FILE to read it from a
    file (no size limit but the database's).
    """
    raw = read_input(input_json)
    saga_id = commands.enqueue(env.runtime(), name, raw, key=key)
    click.echo(json.dumps({"id": saga_id, "name": name, "key": key}) if as_json else saga_id)


def read_input(arg: str | None) -> str | None:
    """INPUT as given, from stdin (`-`) or from a file (`@path`)."""
    from sagaq.errors import InputError

    if arg == "-":
        text: str = sys.stdin.read()
        return text
    if arg is not None and arg.startswith("@"):
        path = arg[1:]
        try:
            with open(path, encoding="utf-8") as fh:
                return fh.read()
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or str(exc)
            raise InputError(f"cannot read the input file {path!r}: {why}") from None
    return arg


@main.command()
@click.argument("saga_id")
@click.option("--by", default=operator, show_default="$SAGAQ_OPERATOR or your login",
              help="Who is acting (recorded on the timeline).")
@click.option("--note", help="Why, for the timeline.")
@click.option("--json", "as_json", is_flag=True, help='Print {"id": ..., "state": ...}.')
@pass_env
@friendly
def retry(env: Env, saga_id: str, by: str, note: str | None, as_json: bool) -> None:
    """Run what is left of a saga in needs_human: its remaining compensations, or the
    step that failed after the pivot. Closes the open page; a new failure pages again."""
    outcome = commands.retry(env.runtime(), saga_id, by=by, note=note)
    _outcome(env, saga_id, outcome, as_json)


def _outcome(env: Env, ref: str, outcome: Any, as_json: bool) -> None:
    state = outcome.state.value if outcome.state else "unchanged"
    if as_json:
        full = commands.resolve_id(env.store(), ref)
        click.echo(json.dumps({"id": full, "state": state}))
    else:
        click.echo(f"{ref}: {state}")


@main.command()
@click.argument("saga_id")
@click.option("--note", required=True, help="What you did to put things right.")
@click.option("--by", default=operator, show_default="$SAGAQ_OPERATOR or your login",
              help="Who is acting (recorded on the timeline).")
@click.option("--json", "as_json", is_flag=True, help='Print {"id": ..., "state": ...}.')
@pass_env
@friendly
def resolve(env: Env, saga_id: str, note: str, by: str, as_json: bool) -> None:
    """Mark a saga in needs_human as resolved by hand, and resolve its page."""
    outcome = commands.resolve(env.runtime(), saga_id, by=by, note=note)
    _outcome(env, saga_id, outcome, as_json)


@main.command()
@click.option("--once", is_flag=True, default=True,
              help="One pass now (the only mode; accepted for scripts that say it).")
@pass_env
@friendly
def reconcile(env: Env, once: bool) -> None:
    """Run one reconciler pass now and print what it did as JSON: republish lost messages,
    expired leases, due waits, approval deadlines, orphans, stalled rollbacks, and repairs of
    sagas without a way forward. `sagaq beat` runs it every SAGAQ_RECONCILE_INTERVAL seconds."""
    runtime = env.runtime()
    runtime.check_policy()  # a sweep dispatches too (rollbacks after a deadline, wake-ups)
    click.echo(json.dumps(runtime.reconcile().summary()))


@main.command()
@click.option("--limit", default=100, show_default=True, help="List at most this many.")
@click.option("--json", "as_json", is_flag=True)
@pass_env
@friendly
def doctor(env: Env, limit: int, as_json: bool) -> None:
    """List the sagas that have no way forward, with the reason; exit 1 if there are any.

    Every saga that is not finished should have one of: a step running, a message about to
    be published, a wake time, an approval request sent, or a page sent. The reconciler
    repairs what it can (`sagaq reconcile`); what stays listed needs a human.
    """
    found = commands.doctor(env.store(), limit=limit)
    if as_json:
        click.echo(json.dumps([commands.plain(asdict(s)) for s in found], indent=2))
    elif found:
        console.print(render.stranded_table(found))
    else:
        click.echo("every saga that is not finished has a way forward")
    if found:
        sys.exit(1)


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("-l", "--loglevel", default="INFO", show_default=True)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
@pass_env
@friendly
def beat(env: Env, loglevel: str, celery_args: tuple[str, ...]) -> None:
    """Run Celery beat, which schedules the reconciler. Safe to run twice (it is
    idempotent and takes rows with SKIP LOCKED), though once is enough. Its schedule is
    kept in memory: it writes no celerybeat-schedule file."""
    from sagaq.preflight import check_start

    runtime = env.runtime()
    check_start(runtime, "beat")
    env.say_where("beat")
    runtime.app.start(["beat", "--loglevel", loglevel, *celery_args])


@main.command()
def keygen() -> None:
    """Print a new key for SAGAQ_SECRET_KEY (seals Secrets in results and checkpoints).

    To rotate, list the new key first and keep the old one until the sagas in flight
    finish: SAGAQ_SECRET_KEY=NEW,OLD (the first seals, every one opens).
    """
    from sagaq.secrets import new_key

    click.echo(new_key())


@main.command()
def diagram() -> None:
    """Print the saga lifecycle as a Mermaid state diagram."""
    from sagaq.machine import mermaid

    click.echo(mermaid(), nl=False)


for _command in (*cli_local.COMMANDS, *cli_policy.COMMANDS):
    main.add_command(_command)
