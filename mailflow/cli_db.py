"""`mailflow db upgrade/copy`: the database's schema, and moving a site to another database.

cli.py adds the `db` group at its end. The work is in `mailflow.store.copy`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from mailflow.errors import StoreError

if TYPE_CHECKING:
    from mailflow.cli import Ctx

console = Console()
pass_ctx = click.pass_obj


@click.group()
def db() -> None:
    """The database: its schema, and moving a site to another database."""


@db.command("upgrade")
@pass_ctx
def db_upgrade(ctx: Ctx) -> None:
    """Bring the configured database to the newest schema (every command does this too)."""
    from mailflow.store import db as store_db
    ctx.site.store  # noqa: B018 - opening the store migrates it
    console.print(f"schema at {store_db.head_revision()}", highlight=False)


@db.command("copy")
@click.option("--to", "target", required=True, metavar="URL",
              help="The empty database to fill, e.g. postgresql://mailflow@db.internal/mailflow.")
@click.option("--from", "source", default=None, metavar="URL",
              help="The database to copy (default: [database] url of this site).")
@pass_ctx
def db_copy(ctx: Ctx, target: str, source: str | None) -> None:
    """Copy every row of this site's database into another, empty one.

    Stop the daemon first (`systemctl stop mailflow`), copy, set [database] url to the new
    database, start it again. The spool and the Maildir outbox are files: they stay where
    they are. Nothing is changed in the source.
    """
    from mailflow.store.copy import copy_database
    from mailflow.store.db import redact_url
    src = source or ctx.site.settings.database.url
    with Progress(TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(),
                  console=console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(table: str, done: int, total: int) -> None:
            if table not in tasks:
                tasks[table] = bar.add_task(table, total=max(total, 1))
            bar.update(tasks[table], completed=done if total else 1)

        try:
            report = copy_database(src, target, progress=progress)
        except StoreError as e:
            raise click.ClickException(str(e)) from None
    for table, n in report.tables.items():
        console.print(f"{table:<18} {n:>8}", highlight=False)
    console.print(f"copied {report.rows} rows from {redact_url(src)} to {redact_url(target)}; "
                  f"now set [database] url to the new database and start the daemon",
                  highlight=False)
