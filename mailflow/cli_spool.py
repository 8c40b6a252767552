"""`mailflow spool list|show|requeue`: the messages this host has taken in and not yet stored.

A message the pipeline gives up on (a bug: it failed `spool.max_attempts` times) waits in the
spool's failed/ folder, with an admin-queue item when the store could record one. `status`
counts them; these commands are how an admin sees them and, once the cause is fixed (an
upgrade, a mended rules file), puts them back, as `postsuper -r` does for Postfix. Nothing
here claims or changes an item except `requeue`, which only ever moves failed/ to new/.

cli.py registers the group at its end (`cli.add_command(spool)`). Nothing from `mailflow.cli`
is imported at the top here, so either module may be imported first.
"""
from __future__ import annotations

import sys
from email.parser import BytesHeaderParser
from email.policy import default as default_policy
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mailflow.errors import MailflowError

if TYPE_CHECKING:
    from mailflow.cli import Ctx
    from mailflow.spool import SpoolItem

console = Console()
err_console = Console(stderr=True)
pass_ctx = click.pass_obj   # the `Ctx` that the `mailflow` group puts on the context
SHOWN_STATES = ("new", "work", "failed", "done")
HEADERS = ("From", "To", "Subject", "Date", "Message-ID")
HEADER_BYTES = 64 << 10
"""Enough of a message to read its header section for `show` (never the whole of a 25 MB one)."""


def _say(text: str, style: str = "") -> None:
    console.print(escape(text), style=style, highlight=False, soft_wrap=True)


def _item_json(state: str, item: SpoolItem) -> dict[str, Any]:
    try:
        size = item.eml.stat().st_size - item.offset
    except OSError:
        size = None
    return {"id": item.id, "state": state, "received_at": item.envelope.received_at or None,
            "via": item.envelope.via, "mail_from": item.envelope.mail_from,
            "rcpt_tos": item.envelope.rcpt_tos, "attempts": item.attempts,
            "errors": item.errors, "failed_at": item.extra.get("failed_at"), "size": size}


def _headers(item: SpoolItem) -> dict[str, str]:
    """The message's main headers, from its first bytes only; a damaged header shows as it is."""
    try:
        with open(item.eml, "rb") as f:
            f.seek(item.offset)
            head = f.read(HEADER_BYTES)
    except OSError:
        return {}
    end = head.find(b"\r\n\r\n")
    end = head.find(b"\n\n") if end < 0 else end
    msg = BytesHeaderParser(policy=default_policy).parsebytes(head[: end if end >= 0 else None])
    out: dict[str, str] = {}
    for name in HEADERS:
        try:
            value = msg.get(name)
        except Exception:  # noqa: BLE001 - hostile headers: show the raw text instead
            value = msg.get_all(name, [""])[0] if msg.keys() else None
        if value is not None:
            out[name] = str(value)
    return out


@click.group()
def spool() -> None:
    """Messages taken in but not yet stored: list them, and put failed ones back."""


@spool.command("list")
@click.option("--state", "states", multiple=True, type=click.Choice(SHOWN_STATES),
              help="Only items in this state (repeat for more; default: new, work and failed).")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def spool_list(ctx: Ctx, states: tuple[str, ...], as_json: bool) -> None:
    """List the spool's items, oldest first: waiting (new), being processed (work), given up
    (failed: each needs `mailflow spool requeue ID` once its cause is fixed)."""
    sp = ctx.site.spool
    rows: list[dict[str, Any]] = []
    for state in states or ("new", "work", "failed"):
        for id in sp.ids(state):
            found = sp.peek(id)
            if found is not None and found[0] == state:
                rows.append(_item_json(state, found[1]))
    rows.sort(key=lambda r: r["id"])
    if as_json:
        from mailflow.cli import print_json
        print_json(rows)
        return
    if not rows:
        _say("the spool holds nothing" + (f" in {', '.join(states)}" if states else
                                         " waiting or failed"))
        return
    table = Table("id", "state", "received", "from", "to", "tries", "last error", box=None)
    for r in rows:
        table.add_row(r["id"], r["state"], (r["received_at"] or "-")[:19],
                      escape(r["mail_from"] or "<>"), escape(", ".join(r["rcpt_tos"]) or "-"),
                      str(r["attempts"]),
                      escape((r["errors"][-1] if r["errors"] else "")[:80]))
    console.print(table)


@spool.command("show")
@click.argument("spool_id")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def spool_show(ctx: Ctx, spool_id: str, as_json: bool) -> None:
    """Show one item: where it is, its envelope, every error it met, and its main headers
    (`mailflow explain` on the file says what processing would do with it)."""
    from mailflow.errors import NotFound
    found = ctx.site.spool.peek(spool_id)
    if found is None:
        raise NotFound(f"no spool item {spool_id} on this host")
    state, item = found
    data = {**_item_json(state, item), "file": str(item.eml), "headers": _headers(item)}
    if as_json:
        from mailflow.cli import print_json
        print_json(data)
        return
    for k in ("id", "state", "received_at", "via", "mail_from", "rcpt_tos", "attempts",
              "failed_at", "size", "file"):
        v = data[k]
        _say(f"{k:<12} {', '.join(v) if isinstance(v, list) else ('-' if v is None else v)}")
    for name, value in data["headers"].items():
        _say(f"{name + ':':<12} {value}")
    if item.errors:
        _say("errors:")
        for e in item.errors:
            _say(f"  {e}")
    if state == "failed":
        _say(f"to process it again once the cause is fixed: mailflow spool requeue {item.id}",
             style="dim")


@spool.command("requeue")
@click.argument("spool_ids", nargs=-1)
@click.option("--all", "every", is_flag=True, help="Every item in failed/.")
@click.option("--reason", default=None, help="Why it can go round again (for the audit log).")
@pass_ctx
def spool_requeue(ctx: Ctx, spool_ids: tuple[str, ...], every: bool, reason: str | None) -> None:
    """Put failed items back for processing (after the bug that failed them is fixed); the
    daemon takes them within seconds. Their admin-queue items are decided with them.

    Example: mailflow spool requeue 01732621234567890123-a1b2c3d4e5f6 --reason "fixed in 1.4"
    """
    ids = list(spool_ids)
    if every:
        ids += [i for i in ctx.site.spool.failed() if i not in ids]
    elif not ids:
        raise click.UsageError("name the spool items to put back, or --all")
    if not ids:
        _say("nothing has failed: nothing to put back")
        return
    problems = 0
    moderation = ctx.moderation()
    for id in ids:
        try:
            _say(moderation.requeue(id, reason=reason).message)
        except MailflowError as e:
            problems += 1
            err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False,
                              soft_wrap=True)
    if problems:
        sys.exit(1)
