"""`mailflow imap check` and `mailflow imap fetch --once`: the command-line side of
`mailflow.ingress.imap` (which does the work; `mailflow serve` runs its poller).

cli.py registers the group at its end (`cli.add_command(imap)`). Nothing from `mailflow.cli`
is imported at the top here, so either module may be imported first.
"""
from __future__ import annotations

import asyncio
import logging
import sys
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.markup import escape

from mailflow.errors import MailflowError

if TYPE_CHECKING:
    from mailflow.cli import Ctx
    from mailflow.ingress.imap import ImapAccount

console = Console()
err_console = Console(stderr=True)
pass_ctx = click.pass_obj   # the `Ctx` that the `mailflow` group puts on the context
log = logging.getLogger("mailflow.imap")


def _say(text: str, style: str = "", err: bool = False) -> None:
    (err_console if err else console).print(escape(text), style=style, highlight=False,
                                            soft_wrap=True)


def _accounts(ctx: Ctx) -> list[ImapAccount]:
    from mailflow.ingress.imap import parse_accounts
    s = ctx.site.settings
    accounts = parse_accounts(s.raw.get("imap"), s.path)
    if not accounts:
        raise MailflowError(f"{s.path}: no [[imap.accounts]] table: nothing to fetch from")
    return accounts


@click.group()
def imap() -> None:
    """Take mail from an existing mailbox over IMAP (a catch-all at a hosting provider)."""


async def _check(accounts: list[ImapAccount], state_dir: Any) -> list[str]:
    from mailflow.ingress.imap import Connection, ImapState, to_fetch
    problems: list[str] = []
    state = ImapState(state_dir)
    for account in accounts:
        conn = Connection(account)
        try:
            await conn.open()
            names = await conn.folders()
            caps = [c for c in ("IDLE", "MOVE", "UIDPLUS") if conn.has(c)]
            _say(f"{account.name}: logged in; server offers {', '.join(caps) or 'no IDLE/MOVE'}")
            _say(f"  folders on the server: {', '.join(names)}")
            for folder in account.folders:
                if folder not in names:
                    problems.append(f"{account.name}: folder {folder!r} does not exist")
                    continue
                uidvalidity, last, uids, _ = await to_fetch(conn, state, folder)
                _say(f"  {folder}: {len(uids)} message(s) would be fetched "
                     f"(UIDVALIDITY {uidvalidity}, last UID taken {last})")
            if account.processed_folder is None:
                _say("  fetched messages will be flagged \\Seen")
            elif account.processed_folder in names:
                _say(f"  fetched messages will be moved to {account.processed_folder}")
            else:
                problems.append(f"{account.name}: processed_folder "
                                f"{account.processed_folder!r} does not exist")
        finally:
            await conn.close()
    return problems


@imap.command("check")
@pass_ctx
def imap_check(ctx: Ctx) -> None:
    """Log in, list the folders and say what would be fetched; changes nothing.

    \b
    Example: mailflow imap check
    """
    accounts = _accounts(ctx)
    problems = asyncio.run(_check(accounts, ctx.site.settings.var))
    for p in problems:
        _say(f"problem: {p}", style="bold red", err=True)
    if problems:
        sys.exit(1)


@imap.command("fetch")
@click.option("--once", is_flag=True, required=True,
              help="Take what is there now, process it, and exit (for cron).")
@pass_ctx
def imap_fetch(ctx: Ctx, once: bool) -> None:
    """Fetch every new message, spool it, process it and make one delivery attempt.

    A message that cannot be processed now stays safely in the spool (`mailflow serve`, or
    the next run, retries it). Exits 1 only when a mailbox could not be read.

    \b
    Example (cron): */5 * * * * mailflow imap fetch --once
    """
    from mailflow.delivery import deliver
    from mailflow.ingress.imap import fetch_account
    from mailflow.pipeline import Pipeline

    site = ctx.site
    accounts = _accounts(ctx)
    spool = site.spool
    ids: list[str] = []
    errors: list[str] = []

    async def fetch_all() -> None:
        for account in accounts:
            try:
                got = await fetch_account(account, spool, lambda _id: None, site.settings.var)
            except MailflowError as e:
                errors.append(str(e))
                continue
            except (OSError, asyncio.TimeoutError) as e:
                errors.append(f"{account.name}: {type(e).__name__}: {e}")
                continue
            ids.extend(got)
            _say(f"{account.name}: {len(got)} message(s) fetched")

    # Items a killed run left half-done (claimed, never settled) go back to the queue once they
    # are old enough that no running daemon can still be working on them.
    spool.recover(min_age_seconds=300)
    asyncio.run(fetch_all())
    pipeline = Pipeline(site)
    outbox: list[int] = []
    processed = 0
    for spool_id in [*ids, *[i for i in spool.pending() if i not in ids]]:
        item = spool.claim(spool_id)
        if item is None:  # a running daemon took it first, or it is not due yet
            continue
        try:
            result = pipeline.process_item(spool, item)
        except Exception as e:  # noqa: BLE001 - the item stays in the spool (or failed/)
            _say(f"spool item {spool_id} not processed yet: {e}", err=True)
            continue
        processed += 1
        outbox.extend(result.outbox_ids)
    if outbox:
        counts = asyncio.run(deliver(site, outbox))
        log.info("delivery: %s", counts)
    _say(f"{processed} message(s) processed")
    for e in errors:
        _say(f"error: {e}", style="bold red", err=True)
    if errors:
        sys.exit(1)
