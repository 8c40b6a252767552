"""`mailflow authority show/add/edit/import/problems`: the command-line side of
`mailflow.authorities`, which does the work (and the audit) so other interfaces can reuse it.

cli.py calls `register(authority)` at its end, once the group exists. Nothing from
`mailflow.cli` is imported at the top here, so either module may be imported first.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mailflow.errors import MailflowError

if TYPE_CHECKING:
    from mailflow.authorities import Authorities
    from mailflow.cli import Ctx

console = Console()
pass_ctx = click.pass_obj   # the `Ctx` that the `mailflow` group puts on the context


def _app(ctx: Ctx) -> Authorities:
    """Imported here: every `mailflow` run (an MTA's `ingest` too) loads this module."""
    from mailflow.authorities import Authorities
    return Authorities(ctx.site, ctx.actor)


def _say(text: str, style: str = "") -> None:
    """One line per fact, never cut at 80 columns, so a report can be grepped."""
    console.print(escape(text), style=style, highlight=False, soft_wrap=True)


def print_json(data: Any) -> None:
    from mailflow.cli import print_json
    print_json(data)


@click.command("show")
@click.argument("slug")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def authority_show(ctx: Ctx, slug: str, as_json: bool) -> None:
    """One authority: its details, its threads, and whether its address works.

    \b
    Example: mailflow authority show camden --json
    """
    data = _app(ctx).show(slug)
    if as_json:
        print_json(data)
        return
    grid = Table.grid(padding=(0, 2))
    grid.add_row("name", escape(data["name"]))
    grid.add_row("emails", escape(", ".join(data["emails"])) or "[red]none[/]")
    grid.add_row("law", escape(f"{data['law']} ({data['law_name']})"))
    grid.add_row("citizens write to", data["address"])
    for key in ("url", "tags"):
        if data[key]:
            grid.add_row(key, escape(data[key] if key == "url" else ", ".join(data[key])))
    grid.add_row("address", "[green]no known problem[/]" if data["address_works"]
                 else f"[red]does not work:[/] {escape(data['problem'])}")
    console.print(f"[bold]{escape(data['slug'])}[/]", highlight=False)
    console.print(grid, highlight=False)
    if not data["threads"]:
        console.print("no threads yet")
        return
    t = Table("thread", "state", "delivery", "title", title=f"{len(data['threads'])} threads",
              title_justify="left")
    for r in data["threads"]:
        t.add_row(str(r["id"]), r["state"], r["delivery_status"], escape(r["title"]))
    console.print(t)


_REASON = click.option("--reason", default=None, help="Why, for the audit log.")


@click.command("add")
@click.option("--slug", required=True, help="Citizens write to SLUG@your-domain.")
@click.option("--name", required=True, help="The name citizens and the archive see.")
@click.option("--email", "emails", multiple=True, metavar="ADDR",
              help="Where requests go (repeatable; the first is the contact).")
@click.option("--law", default=None, metavar="ID", help="A law in laws.toml (default: the site's).")
@click.option("--url", default=None, help="The authority's own web site.")
@click.option("--tag", "tags", multiple=True, help="A free label (repeatable).")
@_REASON
@pass_ctx
def authority_add(ctx: Ctx, slug: str, name: str, emails: tuple[str, ...], law: str | None,
                  url: str | None, tags: tuple[str, ...], reason: str | None) -> None:
    """Add an authority to rules/authorities.toml.

    \b
    Example: mailflow authority add --slug islington --name "Islington Council" \\
               --email foi@islington.gov.example --law uk-foia --tag council
    """
    changes: dict[str, Any] = {"slug": slug, "name": name, "emails": list(emails),
                               "tags": [t for t in tags if t]}
    changes.update({k: v for k, v in (("law", law), ("url", url)) if v is not None})
    ctx.done(_app(ctx).add(changes, reason=reason))


@click.command("edit")
@click.argument("slug")
@click.option("--name", default=None)
@click.option("--email", "emails", multiple=True, metavar="ADDR",
              help="Replaces the whole list (repeatable; --email '' for none).")
@click.option("--add-email", "add_emails", multiple=True, metavar="ADDR", help="Add an address.")
@click.option("--remove-email", "remove_emails", multiple=True, metavar="ADDR",
              help="Remove an address.")
@click.option("--law", default=None, metavar="ID", help="A law in laws.toml ('' for the site's).")
@click.option("--url", default=None, help="The authority's web site ('' to remove it).")
@click.option("--tag", "tags", multiple=True, help="Replaces all tags (repeatable; --tag '' for none).")
@_REASON
@pass_ctx
def authority_edit(ctx: Ctx, slug: str, name: str | None, emails: tuple[str, ...],
                   add_emails: tuple[str, ...], remove_emails: tuple[str, ...], law: str | None,
                   url: str | None, tags: tuple[str, ...], reason: str | None) -> None:
    """Change an authority in rules/authorities.toml.

    Its slug stays as it is: threads and addresses already given out use it.

    \b
    Example: mailflow authority edit camden --remove-email foi@camden.gov.example \\
               --add-email information@camden.gov.example --reason "bounced"
    """
    changes: dict[str, Any] = {k: v for k, v in (("name", name), ("law", law), ("url", url))
                               if v is not None}
    if emails:
        changes["emails"] = list(emails)
    if tags:
        changes["tags"] = [t for t in tags if t]
    if not (changes or add_emails or remove_emails):
        raise MailflowError("nothing to change: give --name, --email, --add-email, "
                            "--remove-email, --law, --url or --tag")
    ctx.done(_app(ctx).edit(slug, changes, add_emails=add_emails, remove_emails=remove_emails,
                            reason=reason))


@click.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Report what would change; write nothing.")
@click.option("--update", is_flag=True, help="Change authorities that exist (else skipped).")
@click.option("--partial", is_flag=True,
              help="Write the good rows even if some are refused (still exits 1).")
@click.option("--json", "as_json", is_flag=True)
@_REASON
@pass_ctx
def authority_import(ctx: Ctx, file: Path, dry_run: bool, update: bool, partial: bool,
                     as_json: bool, reason: str | None) -> None:
    """Add (with --update, also change) authorities from a CSV file.

    The first row names the columns: name, slug (both required), emails (separated by ;
    or spaces), law, tags (separated by ;), url. A new authority with no law gets the
    site's default law; in an update a blank cell leaves that value as it is. Rows are
    numbered as a spreadsheet shows them (the header is row 1).

    If any row is refused, the command says which and why, writes nothing (unless
    --partial) and exits 1. Run it with --dry-run first.

    \b
    Example: mailflow authority import councils.csv --dry-run
             mailflow authority import councils.csv --update
    """
    report = _app(ctx).import_csv(file.read_bytes(), str(file), update=update, dry_run=dry_run,
                                  partial=partial, reason=reason)
    if as_json:
        print_json(report.json())
    else:
        would = "would " if dry_run or not report.written else ""
        for r in report.added:
            _say(f"row {r['row']}: {would}add {r['slug']} ({r['name']})")
        for r in report.updated:
            said = "; ".join(f"{k}: {v!r}" for k, v in r["after"].items())
            _say(f"row {r['row']}: {would}update {r['slug']}: {said}")
        for r in report.skipped:
            _say(f"row {r['row']}: skipped {r['slug']}: {r['reason']}")
        for r in report.refused:
            _say(f"row {r['row']}: refused{' ' + r['slug'] if r['slug'] else ''}: "
                 f"{r['reason']}", style="red")
        counts = (f"{len(report.added)} to add, {len(report.updated)} to update, "
                  f"{len(report.unchanged)} unchanged, {len(report.skipped)} skipped, "
                  f"{len(report.refused)} refused")
        if report.written:
            _say(f"{counts}; written to rules/authorities.toml.")
            from mailflow.authorities import RESTART
            _say(RESTART)
        elif dry_run:
            _say(f"{counts}; dry run: nothing written.")
        elif report.refused and (report.added or report.updated):
            _say(f"{counts}; nothing written: fix the refused rows, or use --partial.")
        else:
            _say(f"{counts}; nothing to write.")
    if report.refused:
        sys.exit(1)


@click.command("problems")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def authority_problems(ctx: Ctx, as_json: bool) -> None:
    """Authorities with no working address, and why.

    Either no address is given, or their latest request bounced or was refused; that stops
    counting once the address is changed or a later request gets through.

    \b
    Example: mailflow authority problems --json
    """
    rows = _app(ctx).problems()
    if as_json:
        print_json(rows)
        return
    t = Table("slug", "name", "emails", "problem")
    for r in rows:
        t.add_row(r["slug"], escape(r["name"]), escape(", ".join(r["emails"])) or "[red]none[/]",
                  escape(r["problem"]))
    console.print(t if rows else "every authority has a working address")


def register(group: click.Group) -> None:
    """Put these commands on the `authority` group (next to `list`, which lives in cli.py)."""
    for command in (authority_show, authority_add, authority_edit, authority_import,
                    authority_problems):
        group.add_command(command)
