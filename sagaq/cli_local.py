"""The ``sagaq`` commands about where the sagas live: ``demo``, ``db`` and ``embedded``."""

from __future__ import annotations

import json

import click

from sagaq import render
from sagaq.cli_env import Env, console, friendly, pass_env
from sagaq.errors import ConfigurationError

SHOWN = 3  # the scenario whose `sagaq show` the demo prints: a failure undone, last step first


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per saga.")
@click.option("--reset", is_flag=True,
              help="Start afresh: drop the embedded database (every saga in it) first.")
@pass_env
@friendly
def demo(env: Env, as_json: bool, reset: bool) -> None:
    """Run the eight example sagas on an embedded PostgreSQL, an in-process broker and a
    real Celery worker in a thread: no server to install (pip install 'sagaq[embedded]').

    \b
    provision_agent  completes
    order_flow       a flaky invoice API: retried (rung 0), completes
    ticket_triage    re-prompted (rung 1), then the large model tier (rung 2)
    provision_agent  fails at its last step: the three before it undone, last first
    subscription     after the pivot a step keeps failing: a page, nothing undone
    offboard_agent   the policy asks a human, who approves: completes
    offboard_agent   the human denies: the steps before it are undone
    provision_agent  the undo of one step keeps failing: a page (needs_human)

    The sagas stay in the database afterwards: it prints the `sagaq show ID` that shows
    one again. With SAGAQ_DATABASE_URL (or --database-url) set, the demo runs there instead.

    Exits 1 if any saga ends in a state other than the one expected.
    """
    from rich.markup import escape

    from sagaq import demo as demo_module

    if reset and env.configured_url():
        raise ConfigurationError(
            "--reset drops the embedded database only, and the demo would run on "
            "SAGAQ_DATABASE_URL (or --database-url): unset it to reset the embedded one"
        )
    results = demo_module.run(env.database_url(reset=reset))
    unexpected = [sc for sc, st in results if st.saga.state is not sc.expect]
    if as_json:
        click.echo(json.dumps([st.summary() for _, st in results], indent=2))
    else:
        for scenario, st in results:
            console.rule(f"[bold]{escape(scenario.title)}")
            console.print(render.story(st, console.width))
        console.rule("[bold]summary")
        for scenario, st in results:
            mark = "ok" if st.saga.state is scenario.expect else "UNEXPECTED"
            console.print(escape(f"{st.saga.state.value:<12} {scenario.title}  [{mark}]"),
                          highlight=False)
        _where(env, results[SHOWN][1].saga.id)
    if unexpected:
        raise click.ClickException(
            f"{len(unexpected)} saga(s) did not end as expected: "
            + "; ".join(sc.title for sc in unexpected)
        )


def _where(env: Env, saga_id: str) -> None:
    """Where the sagas stay, and the exact command that shows one of them again (short
    lines: the summary above fits the terminal's width, and so do these)."""
    from sagaq import embedded
    from sagaq.store.database import safe_url

    option = env.overrides.get("database_url")
    if option:  # not in the environment: the next command needs it again
        prefix, where = f"sagaq --database-url '{safe_url(option)}'", "at that database"
    elif env.configured_url():
        prefix, where = "sagaq", "at SAGAQ_DATABASE_URL"
    else:
        prefix, where = "sagaq", "in the embedded PostgreSQL"
    click.echo(f"\nThe sagas stay {where}. Show one again with:")
    click.echo(f"  {prefix} show {saga_id}")
    click.echo(f"(`{prefix} ls` lists them all.)")
    if not env.configured_url():
        click.echo("`sagaq demo --reset` starts afresh, `sagaq embedded stop` stops the server.")
        click.echo(f"Its data: {embedded.data_dir()}")


@click.group()
def db() -> None:
    """The database schema (Alembic migrations shipped with sagaq)."""


@db.command("upgrade")
@click.argument("revision", default="head")
@pass_env
@friendly
def db_upgrade(env: Env, revision: str) -> None:
    """Create or upgrade sagaq's tables to REVISION (default: head)."""
    from sagaq.store.database import safe_url, upgrade

    url = env.settings().database_url
    upgrade(url, revision)
    click.echo(f"{safe_url(url)}: upgraded to {revision}")


@db.command("current")
@pass_env
@friendly
def db_current(env: Env) -> None:
    """Print the schema revision the database is at."""
    from sagaq.store.database import current_revision

    click.echo(current_revision(env.store().engine) or "none (run `sagaq db upgrade`)")


@click.group()
def embedded() -> None:
    """The embedded PostgreSQL: the database when no SAGAQ_DATABASE_URL is set.

    It lives in $SAGAQ_HOME/pg (default: $XDG_DATA_HOME/sagaq/pg, else
    ~/.local/share/sagaq/pg), starts on first use and keeps running after the command that
    started it. For trying sagaq and local development, not for production.
    """


@embedded.command("url")
@friendly
def embedded_url() -> None:
    """Start the embedded PostgreSQL if it is not running; print its database URL."""
    from sagaq import embedded as server

    click.echo(server.database_url())


@embedded.command("stop")
@friendly
def embedded_stop() -> None:
    """Stop the embedded PostgreSQL; its data stays (the next command starts it again)."""
    from sagaq import embedded as server

    where = server.data_dir()
    click.echo(f"stopped the embedded PostgreSQL in {where}" if server.stop()
               else f"no embedded PostgreSQL runs in {where}")


COMMANDS = (demo, db, embedded)
