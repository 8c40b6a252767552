"""`mailflow archive ...`: build the public archive from the command line.

Registered in `mailflow.cli` with `cli.add_command(archive)`; uses the same `Ctx` (the
`--config` given before the command name) as every other command.
"""
from __future__ import annotations

from pathlib import Path

import click

from mailflow.cli import Ctx, console, err_console, pass_ctx, print_json


@click.group()
def archive() -> None:
    """The public archive: static HTML, feeds, JSON and search, redacted."""


@archive.command("build")
@click.option("--full", is_flag=True,
              help="Rebuild every file aside and swap the new archive in whole.")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              metavar="DIR", help="Where to write it (default: [archive] dir in the config).")
@click.option("--no-search", is_flag=True, help="Do not run Pagefind afterwards.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def archive_build(ctx: Ctx, full: bool, out: Path | None, no_search: bool, as_json: bool) -> None:
    """Write the archive; only files whose content changed are rewritten."""
    from mailflow.archive.build import build
    from mailflow.archive.queue import queue_withheld
    report = build(ctx.site, out, full, search=not no_search)
    if report.withheld:
        queue_withheld(ctx.site, report.withheld)   # an admin reviews what was not published
    if as_json:
        data = report.as_dict()
        if not ctx.verbose:   # -v: every path written and removed
            data.pop("written_paths")
            data.pop("removed_paths")
        print_json(data)
        return
    console.print(f"archive in {report.out}: {report.threads} requests, "
                  f"{report.authorities} authorities; {report.written} files written, "
                  f"{report.unchanged} unchanged, {report.removed} removed "
                  f"({report.seconds:.1f} s); search: {report.search}", highlight=False)
    if report.withheld:
        console.print(f"{len(report.withheld)} attachment(s) withheld, not published"
                      + (":" if ctx.verbose else " (-v lists them)"), highlight=False)
        for w in report.withheld if ctx.verbose else []:
            console.print(f"  thread {w['thread_id']} message {w['message_id']}: "
                          f"{w['filename']} — {w['reason']}", highlight=False)
    for w in report.warnings:
        err_console.print(f"[yellow]warning:[/] {w}", highlight=False)


@archive.command("search")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              metavar="DIR", help="The archive to index (default: [archive] dir in the config).")
@pass_ctx
def archive_search(ctx: Ctx, out: Path | None) -> None:
    """Index the published archive with Pagefind now, if pages changed since it last ran.

    The daemon runs this itself a few minutes after pages change (Pagefind re-reads every
    page, about a minute at 10,000); `archive build --no-search` followed by this does the
    same by hand."""
    from mailflow.archive.build import archive_settings, refresh_search
    status = refresh_search(out or archive_settings(ctx.site)[0])
    console.print(f"search: {status}", highlight=False)
    if status not in ("indexed", "unchanged"):
        raise SystemExit(1)
