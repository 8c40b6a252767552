"""The `mailflow` command: a thin layer over the modules, for admins and for MTAs.

Every command takes `--config PATH` before its name (or MAILFLOW_CONFIG; default
./config.toml). Errors meant for people (`MailflowError`) are printed as one line and exit 1;
`ingest` follows sysexits, as MTAs expect: 0 done, 67 not ours, 75 try again later.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import shutil
import sys
from datetime import date, datetime
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mailflow.config import config_path
from mailflow.errors import MailflowError, NotFound, SpoolError, StoreError

EX_OK, EX_NOUSER, EX_TEMPFAIL = 0, 67, 75
console = Console()
err_console = Console(stderr=True)


def _json_default(o: Any) -> Any:
    if isinstance(o, (datetime, date)):
        return o.isoformat()
    raise TypeError(type(o).__name__)


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=_json_default, ensure_ascii=False))


class Ctx:
    def __init__(self, config: str | None, verbose: int):
        self.config = config_path(config)
        self.verbose = verbose
        self.actor: str | None = None
        self._site = None

    def moderation(self):  # type: ignore[no-untyped-def]
        from mailflow.moderation import Moderation
        return Moderation(self.site, self.actor)

    def done(self, outcome) -> None:  # type: ignore[no-untyped-def]
        """Print what an action did and make the one delivery attempt its mail is owed."""
        if outcome.outbox_ids:
            from mailflow.delivery import deliver
            asyncio.run(deliver(self.site, outcome.outbox_ids))
        console.print(outcome.message, highlight=False)

    @property
    def site(self):  # type: ignore[no-untyped-def]
        return self.open_site()

    def open_site(self, *, lazy_reports: bool = False):  # type: ignore[no-untyped-def]
        if self._site is None:
            from mailflow.site import Site
            self._site = Site.open(self.config, lazy_reports=lazy_reports)
        return self._site


class MailflowGroup(click.Group):
    """Turns mailflow's own errors into one clear line instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MailflowError as e:
            err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
            sys.exit(1)


pass_ctx = click.make_pass_decorator(Ctx)


@click.group(cls=MailflowGroup)
@click.option("--config", "config", metavar="PATH", default=None,
              help="The site's config file (default: $MAILFLOW_CONFIG or ./config.toml).")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default=None,
              help="Log lines as text or one JSON object each (default: $MAILFLOW_LOG_FORMAT "
                   "or text).")
@click.option("--as", "actor", default=None, metavar="NAME",
              help="Who is acting, for the audit log (default: the OS user).")
@click.version_option(package_name="mailflow")
@click.pass_context
def cli(ctx: click.Context, config: str | None, verbose: int, log_format: str | None,
        actor: str | None) -> None:
    """mailflow: Freedom of Information requests by email, for any town or country."""
    from mailflow import logs
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    try:
        logs.configure(level, log_format)
    except ValueError as e:
        raise click.UsageError(f"MAILFLOW_LOG_FORMAT: {e}") from None
    ctx.obj = Ctx(config, verbose)
    ctx.obj.actor = actor


# -- init ------------------------------------------------------------------------------------
@cli.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--domain", default="ask.example", show_default=True, help="The site's mail domain.")
@click.option("--name", default=None, help="The site's name (default: the domain).")
def init(directory: Path, domain: str, name: str | None) -> None:
    """Make a new site in DIRECTORY: config.toml, rules/, var/ and a DKIM key."""
    from mailflow import config as config_mod
    from mailflow.outbound.signing import generate_key
    from mailflow.rulesdir import packaged_dir

    domain = domain.strip().lower()
    cfg = directory / "config.toml"
    if cfg.exists():
        raise MailflowError(f"{cfg} already exists; not overwriting it")
    directory.mkdir(parents=True, exist_ok=True)
    example = (packaged_dir("rules").parent / "config.example.toml")
    if not example.exists():
        example = Path(__file__).resolve().parent / "_data" / "config.example.toml"
    text = example.read_text(encoding="utf-8")
    values = {"domain": domain, "name": name or domain, "url": f"https://{domain}/",
              "secret": secrets.token_urlsafe(32)}
    for key, value in values.items():
        text = re.sub(rf'(?m)^{key} = ".*"$', f'{key} = {json.dumps(value)}', text, count=1)
    rules = directory / "rules"
    if not rules.exists():
        shutil.copytree(packaged_dir("rules"), rules)
    # The database and spool hold citizens' private mail: only the site's user may read them.
    (directory / "var").mkdir(mode=0o700, exist_ok=True)
    tmp = cfg.with_suffix(".toml.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.chmod(tmp, 0o600)
    settings = config_mod.load(tmp)  # validate what we wrote before it becomes the config
    if not settings.dkim.key_file.exists():
        generate_key(settings.dkim.key_file)
    tmp.replace(cfg)
    from mailflow.site import Site
    Site.open(cfg).store  # creates the database
    console.print(f"Made a site for [bold]{domain}[/] in {directory}")
    console.print(f"  config   {cfg}\n  rules    {rules}\n  data     {directory / 'var'}")
    console.print(f"Publish the DKIM record: mailflow --config {cfg} dkim record")


# -- serve and ingest ------------------------------------------------------------------------
@cli.command()
@pass_ctx
def serve(ctx: Ctx) -> None:
    """Run the daemon (SMTP, processing, outbox) until SIGTERM or SIGINT."""
    from mailflow.daemon import run
    if ctx.verbose == 0:
        logging.getLogger().setLevel(logging.INFO)
    asyncio.run(run(ctx.site))


@cli.command()
@click.option("--rcpt", "rcpts", multiple=True, metavar="ADDR",
              help="Envelope recipient (repeatable). Without it: from the message's headers.")
@click.option("--sender", default=None, metavar="ADDR", help="Envelope sender ('' for <>).")
@pass_ctx
def ingest(ctx: Ctx, rcpts: tuple[str, ...], sender: str | None) -> None:
    """Take one message on standard input, as an MTA's pipe transport hands it over.

    Exits 0 once it is accepted and processed, 67 when no recipient is ours, 75 when it
    could not be taken now (the MTA will retry).
    """
    from mailflow.ingest import ingest_bytes
    raw = sys.stdin.buffer.read()
    # One message in a process of its own: the fault-report areas (shapely) only if it is one.
    site = ctx.open_site(lazy_reports=True)
    try:
        code, message = ingest_bytes(site, raw, list(rcpts), sender)
    except (SpoolError, StoreError) as e:
        err_console.print(f"temporary failure: {e}", highlight=False)
        sys.exit(EX_TEMPFAIL)
    except MailflowError:
        raise
    except Exception as e:  # noqa: BLE001 - an MTA must get 75, never a traceback and 1
        logging.getLogger("mailflow.ingest").exception("ingest failed")
        err_console.print(f"temporary failure: {type(e).__name__}: {e}", highlight=False)
        sys.exit(EX_TEMPFAIL)
    if message:
        err_console.print(message, highlight=False)
    sys.exit(code)


@cli.command()
@click.argument("file", type=click.File("rb"))
@click.option("--rcpt", "rcpts", multiple=True, metavar="ADDR",
              help="Envelope recipient (repeatable). Without it: from the message's headers.")
@click.option("--sender", default=None, metavar="ADDR", help="Envelope sender ('' for <>).")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def explain(ctx: Ctx, file: Any, rcpts: tuple[str, ...], sender: str | None, as_json: bool) -> None:
    """Say what would happen to a message, and why, without storing or sending anything."""
    from mailflow.explain import explain_bytes
    from mailflow.spool import split_envelope_line
    meta, raw = split_envelope_line(file.read())  # a spool .mail: its envelope line aside
    env = (meta or {}).get("envelope") or {}
    if not rcpts and isinstance(env.get("rcpt_tos"), list) and not env.get("rcpt_from_headers"):
        rcpts = tuple(str(r) for r in env["rcpt_tos"])
    if sender is None and meta is not None:
        sender = str(env.get("mail_from") or "")
    data = explain_bytes(ctx.site, raw, list(rcpts), sender)
    if as_json:
        print_json(data)
        return
    console.print(f"[bold]{data['decision']}[/]"
                  + (f" → thread {', '.join(map(str, data['threads']))}" if data["threads"] else "")
                  + (f" (queue: {data['queue_reason']})" if data.get("queue_reason") else ""))
    console.print(f"classification: {data['classification']} ({data['classification_reason']})",
                  highlight=False)
    for r in data["reasons"]:
        console.print(f"  - {r}", highlight=False)
    for e in data["evidence"]:
        mark = "✓" if e["verified"] else "✗"
        console.print(f"  {mark} {e['method']} in {e['source']}: {e['detail']}", highlight=False)
    for sug in data["suggestions"]:
        console.print(f"  ? thread {sug['thread_id']} ({sug['score']:.2f}): {sug['reason']}",
                      highlight=False)


# -- reminders ----------------------------------------------------------------------------
def _now(value: str | None) -> datetime:
    from datetime import timezone
    if value is None:
        return datetime.now(timezone.utc)
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"expected an ISO date or time such as 2026-12-01T09:30, "
                                 f"got {value!r}", param_hint="--now") from None
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


@cli.group()
def reminders() -> None:
    """Reminders and automatic follow-ups: what is due, and sending it."""


@reminders.command("due")
@click.option("--now", "now_s", default=None, metavar="ISO", help="As of this time (default: now).")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def reminders_due(ctx: Ctx, now_s: str | None, as_json: bool) -> None:
    """List the reminders a sweep would send (or skip, and why) as of --now."""
    from mailflow.reminders import Reminders
    rows = Reminders(ctx.site).due(_now(now_s))
    if as_json:
        print_json(rows)
        return
    t = Table("id", "thread", "kind", "due at", "action", "why")
    for r in rows:
        t.add_row(str(r["id"]), str(r["thread_id"]), r["kind"], f"{r['due_at']:%Y-%m-%d %H:%M}",
                  r["action"], r["why"])
    console.print(t)


@reminders.command("run")
@click.option("--now", "now_s", default=None, metavar="ISO", help="As of this time (default: now).")
@click.option("--dry-run", is_flag=True, help="Say what would be sent; send nothing.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def reminders_run(ctx: Ctx, now_s: str | None, dry_run: bool, as_json: bool) -> None:
    """Send every reminder due as of --now, each once; then one delivery attempt."""
    from mailflow.delivery import deliver
    from mailflow.reminders import Reminders
    site = ctx.site
    result = Reminders(site).run(_now(now_s), dry_run=dry_run)
    if result.outbox_ids:
        asyncio.run(deliver(site, result.outbox_ids))
    if as_json:
        print_json({"sent": result.sent, "skipped": result.skipped,
                    "recomputed": result.recomputed, "dry_run": dry_run})
        return
    verb = "would send" if dry_run else "sent"
    for r in result.sent:
        console.print(f"{verb} {r['kind']} for thread {r['thread_id']} ({r['why']})", highlight=False)
    for r in result.skipped:
        console.print(f"[dim]skipped {r['kind']} for thread {r['thread_id']}: {r['why']}[/]",
                      highlight=False)
    for r in result.recomputed:
        console.print(f"thread {r['thread_id']}: due date moved {r['old_due']} → {r['due']}",
                      highlight=False)
    if not (result.sent or result.skipped or result.recomputed):
        console.print("nothing due")


# -- deadline ----------------------------------------------------------------------------------
@cli.command("deadline")
@click.option("--law", "law_id", required=True, metavar="ID",
              help="The law's id in rules/laws.toml.")
@click.option("--sent", required=True, metavar="DATE",
              help="When the request went out (was received), as YYYY-MM-DD.")
@click.option("--extension", "extension_id", default=None, metavar="EXT_ID",
              help="An extension the authority claimed, by its id in the law.")
@click.option("--extra-days", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
              help="Further days claimed, counted the law's way (an extension of no fixed length).")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def deadline_cmd(ctx: Ctx, law_id: str, sent: str, extension_id: str | None, extra_days: int,
                 as_json: bool) -> None:
    """When an answer is due under a law, and the working: every day skipped, and why."""
    from rich.markup import escape

    from mailflow.core.deadlines import deadline, long_date
    bad_date = MailflowError(f"--sent {sent!r} is not a date as YYYY-MM-DD (e.g. 2026-12-17)")
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", sent.strip()):
        raise bad_date
    try:
        sent_on = date.fromisoformat(sent.strip())
    except ValueError:
        raise bad_date from None
    laws = ctx.site.rules.laws
    law = laws.get(law_id)
    if law is None:
        raise MailflowError(f"unknown law {law_id!r}; known: {', '.join(sorted(laws))}")
    extension = law.extension(extension_id) if extension_id is not None else None
    if extension_id is not None and extension is None:
        known = ", ".join(e.id for e in law.extensions) or "none (use --extra-days)"
        raise MailflowError(f"{law.id} has no extension {extension_id!r}; known: {known}")
    d = deadline(law, sent_on, extra_days=(extension.days if extension else 0) + extra_days)
    if as_json:
        print_json({
            "law": law.id, "law_name": law.name, "days": d.days, "working_days": d.working_days,
            "extension": extension.id if extension else None, "extra_days": d.extra_days,
            "sent": d.sent, "day_one": d.day_one, "due": d.due, "very_late": d.very_late,
            "skipped": [{"date": s.date, "reason": s.reason} for s in d.skipped],
            "moved": [{"date": m.date, "reason": m.reason} for m in d.moved],
            "working": d.working()})
        return
    unit = "working days" if law.working_days else "days"
    claimed = f" + {d.extra_days} claimed" if d.extra_days else ""
    console.print(f"[bold]{escape(law.name)}[/] ({law.id}): {law.days} {unit}{claimed}",
                  highlight=False)
    summary = Table.grid(padding=(0, 2))
    for label, day in (("sent", d.sent), ("day one", d.day_one), ("due", d.due),
                       ("very late after", d.very_late)):
        summary.add_row(label, f"[bold]{long_date(day)}[/]" if label == "due" else long_date(day))
    console.print(summary)
    n = len(d.skipped)
    t = Table("not counted", "why", title=f"{n} day{'s' if n != 1 else ''} not counted",
              title_justify="left")
    for s in d.skipped:
        t.add_row(long_date(s.date), escape(s.reason))
    console.print(t)
    for m in d.moved:
        console.print(f"moved off {long_date(m.date)}: {escape(m.reason)}", highlight=False)


# -- dkim --------------------------------------------------------------------------------------
@cli.group()
def dkim() -> None:
    """The DKIM key that signs outgoing mail."""


@dkim.command("record")
@pass_ctx
def dkim_record(ctx: Ctx) -> None:
    """Print the DNS TXT record to publish for the signing key."""
    from mailflow.outbound.signing import dns_record, load_key
    d = ctx.site.settings.dkim
    click.echo(dns_record(load_key(d.key_file), d.selector, d.domain))


# -- authorities ---------------------------------------------------------------------------------
@cli.group()
def authority() -> None:
    """The authorities in rules/authorities.toml."""


@authority.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def authority_list(ctx: Ctx, as_json: bool) -> None:
    """List authorities: slug, name, email addresses and law."""
    site = ctx.site
    rows = [{"slug": a.slug, "name": a.name, "emails": list(a.emails), "law": a.law,
             "address": f"{a.slug}@{site.domain}"} for a in site.rules.authorities.values()]
    if as_json:
        print_json(rows)
        return
    t = Table("slug", "name", "emails", "law", "citizens write to")
    for r in rows:
        t.add_row(r["slug"], r["name"], ", ".join(r["emails"]) or "[red]none[/]", r["law"], r["address"])
    console.print(t)


# -- threads ---------------------------------------------------------------------------------------
def thread_json(site: Any, tx: Any, thread: Any, with_messages: bool = True) -> dict[str, Any]:
    d: dict[str, Any] = {
        "id": thread.id, "kind": thread.kind, "state": thread.state,
        "authority": thread.authority, "law": thread.law, "title": thread.title,
        "created_at": thread.created_at, "sent_at": thread.sent_at,
        "due_date": thread.due_date, "delivery_status": thread.delivery_status,
        "allow": thread.allow, "clock_start": thread.clock_start,
        "very_late_date": thread.very_late_date, "extension": thread.extension,
        "awaiting_description": thread.awaiting_description,
        "citizen": {"name": thread.citizen_name, "email": thread.citizen_email},
    }
    if with_messages:
        d["messages"] = [{
            "id": m.id, "direction": m.direction, "kind": m.kind,
            "from": m.from_addr, "to": m.to_addrs, "subject": m.subject,
            "date": m.date or m.created_at, "message_id": m.message_id,
            "classification": m.classification,
            "classification_reason": m.classification_reason,
            "match": ({"method": m.match_method, "detail": m.match_detail}
                      if m.direction == "in" and m.match_method else None),
            "flags": m.flags,
            # What DKIM/SPF/DMARC said of mail received (RFC 8601), e.g. why a reply that
            # claimed to be the authority's was held.
            "authentication": m.authentication if m.direction == "in" else None,
        } for m in tx.messages(thread.id)]
        d["events"] = tx.events(thread.id)
        d["reminders"] = [{"kind": r.kind, "event": r.event, "due_at": r.due_at,
                           "state": r.state, "note": r.note} for r in tx.reminders(thread.id)]
    return d


@cli.group()
def thread() -> None:
    """Requests and their correspondence."""


@thread.command("list")
@click.option("--state", default=None)
@click.option("--authority", "authority_slug", default=None)
@click.option("--overdue", is_flag=True, help="Only requests past their due date, unanswered.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def thread_list(ctx: Ctx, state: str | None, authority_slug: str | None, overdue: bool,
                as_json: bool) -> None:
    """List threads, newest last.

    Example: mailflow thread list --overdue --authority camden
    """
    from datetime import timezone
    site = ctx.site
    today = datetime.now(timezone.utc).date()
    with site.store.read() as tx:
        rows = [thread_json(site, tx, t, with_messages=False)
                for t in tx.threads(state=state, authority=authority_slug)
                if not overdue or (t.state in ("waiting_response", "internal_review")
                                   and t.due_date is not None and t.due_date < today
                                   and not t.awaiting_description)]
    if as_json:
        print_json(rows)
        return
    t = Table("id", "state", "authority", "title", "due")
    for r in rows:
        t.add_row(str(r["id"]), r["state"], r["authority"], r["title"], str(r["due_date"] or ""))
    console.print(t)


@thread.command("show")
@click.argument("thread_id", type=int)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def thread_show(ctx: Ctx, thread_id: int, as_json: bool) -> None:
    """Show one thread and every message on it, with how each was matched."""
    site = ctx.site
    with site.store.read() as tx:
        t = tx.thread(thread_id)
        if t is None:
            raise tx.no_thread(thread_id)
        data = thread_json(site, tx, t)
    if as_json:
        print_json(data)
        return
    console.print(f"[bold]#{data['id']} {data['title']}[/]  ({data['state']}, "
                  f"{data['authority']}, due {data['due_date'] or '-'})")
    for m in data["messages"]:
        how = ""
        if m["match"]:
            how = f"  [dim]matched by {m['match']['method']}: {m['match']['detail']}[/]"
        arrow = "→" if m["direction"] == "out" else "←"
        console.print(f" {arrow} {m['date']:%Y-%m-%d %H:%M} {m['kind']:<13} {m['from']}: "
                      f"{m['subject']}{how}", highlight=False)
        if m["authentication"]:
            console.print(f"   [dim]{_auth_summary(m['authentication'])}[/]", highlight=False)


def _auth_summary(value: str) -> str:
    """"dkim=pass spf=fail dmarc=none" out of our Authentication-Results value (the host name
    first, then `method=result (comment) prop=value` clauses separated by semicolons)."""
    results = []
    for clause in value.split(";")[1:]:
        words = clause.split()
        if words and "=" in words[0]:
            results.append(words[0])
    return " ".join(results) or value


def _set_allow(ctx: Ctx, thread_id: int, policy: str) -> None:
    with ctx.site.store.tx() as tx:
        if tx.thread(thread_id) is None:
            raise tx.no_thread(thread_id)
        tx.update_thread(thread_id, allow=policy)
    console.print(f"thread {thread_id}: {_ALLOW_WORDS[policy]}")


_ALLOW_WORDS = {"anybody": "anybody may write to it",
                "authority": "only the authority's known addresses may write to it",
                "nobody": "closed: nobody may write to it"}


@thread.command("allow")
@click.argument("thread_id", type=int)
@click.argument("policy", type=click.Choice(list(_ALLOW_WORDS)))
@pass_ctx
def thread_allow(ctx: Ctx, thread_id: int, policy: str) -> None:
    """Who may still write to a thread: anybody, the authority only, or nobody."""
    _set_allow(ctx, thread_id, policy)


@thread.command("close")
@click.argument("thread_id", type=int)
@pass_ctx
def thread_close(ctx: Ctx, thread_id: int) -> None:
    """Refuse all further mail to the thread (at RCPT over SMTP; queued from ingest)."""
    _set_allow(ctx, thread_id, "nobody")


@thread.command("reopen")
@click.argument("thread_id", type=int)
@pass_ctx
def thread_reopen(ctx: Ctx, thread_id: int) -> None:
    """Let anybody write to the thread again."""
    _set_allow(ctx, thread_id, "anybody")


@thread.command("extend")
@click.argument("thread_id", type=int)
@click.option("--extension", "ext_id", default=None,
              help="Which of the law's extensions (default: its first).")
@pass_ctx
def thread_extend(ctx: Ctx, thread_id: int, ext_id: str | None) -> None:
    """Record that the authority claimed an extension the law allows; moves the due date."""
    from mailflow.clock import Clock
    site = ctx.site
    with site.store.tx() as tx:
        t = tx.thread(thread_id)
        if t is None:
            raise tx.no_thread(thread_id)
        law = site.rules.laws.get(t.law)
        if law is None:
            raise MailflowError(f"thread {thread_id} is a {t.kind} with no statutory clock "
                                f"(no law applies to it), so it cannot be extended")
        exts = {e.id: e for e in law.extensions}
        if not exts:
            raise MailflowError(f"{law.name} ({law.id}) allows no extension")
        ext = exts.get(ext_id) if ext_id else next(iter(exts.values()))
        if ext is None:
            raise MailflowError(f"{law.id} has no extension {ext_id!r}; it has: {', '.join(exts)}")
        if t.clock_start is None or t.state not in ("waiting_response", "internal_review"):
            raise MailflowError(f"thread {thread_id} is {t.state}: its clock is not running")
        t = Clock(site.settings, site.rules).start(
            tx, thread_id, t.clock_start, actor="admin", extension=ext.id,
            why=f"the authority claimed an extension: {ext.description}")
    console.print(f"thread {thread_id}: extended ({ext.id}); now due {t.due_date}, "
                  f"very late from {t.very_late_date}")


# -- queue ------------------------------------------------------------------------------------------
@cli.group()
def queue() -> None:
    """Mail and requests that need a human."""


def _queue_json(q: Any) -> dict[str, Any]:
    return {"id": q.id, "reason": q.reason, "state": q.state, "thread_id": q.thread_id,
            "summary": q.summary, "detail": q.detail, "created_at": q.created_at,
            "decided_at": q.decided_at, "decision": q.decision, "decided_by": q.decided_by}


@queue.command("list")
@click.option("--reason", default=None)
@click.option("--all", "include_all", is_flag=True, help="Include decided items.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def queue_list(ctx: Ctx, reason: str | None, include_all: bool, as_json: bool) -> None:
    """List open items (with --all, decided ones too)."""
    with ctx.site.store.read() as tx:
        rows = [_queue_json(q) for q in tx.queue(include_decided=include_all, reason=reason)]
    if as_json:
        print_json(rows)
        return
    t = Table("id", "reason", "thread", "summary", "since")
    for r in rows:
        t.add_row(str(r["id"]), r["reason"], str(r["thread_id"] or ""), r["summary"],
                  f"{r['created_at']:%Y-%m-%d %H:%M}")
    console.print(t)


@queue.command("show")
@click.argument("item", type=int)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def queue_show(ctx: Ctx, item: int, as_json: bool) -> None:
    """Show one item: why it is here, and the message's headers and text."""
    from mailflow.mail.parse import ParseError, parse
    with ctx.site.store.read() as tx:
        q = tx.queue_item(item)
        if q is None:
            raise NotFound(f"no queue item {item}")
        raw = tx.get_raw(q.raw_sha256) if q.raw_sha256 else None
    data = _queue_json(q)
    if raw is not None:
        try:
            pm = parse(raw)
            data["message"] = {"from": pm.from_addr, "to": list(pm.to), "subject": pm.subject,
                               "date": pm.date, "text": pm.text[:20000],
                               "attachments": [{"filename": a.filename, "type": a.content_type,
                                                "size": a.size} for a in pm.attachments]}
        except ParseError as e:
            data["message"] = {"error": str(e), "raw_start": raw[:2000].decode("utf-8", "replace")}
    if as_json:
        print_json(data)
        return
    console.print(f"[bold]Item {q.id}[/]: {q.reason} ({q.state})\n{q.summary}", highlight=False)
    detail = q.detail or {}
    for r in detail.get("reasons") or []:
        console.print(f"  - {r}", highlight=False)
    for sug in detail.get("suggestions") or []:
        console.print(f"  [cyan]suggests thread {sug['thread_id']}[/] ({sug['score']:.2f}): "
                      f"{sug['reason']}", highlight=False)
    if "message" in data:
        m = data["message"]
        for k in ("from", "to", "subject", "date"):
            if k in m:
                console.print(f"[dim]{k}:[/] {m[k]}", highlight=False)
        console.print(m.get("text") or m.get("raw_start", ""), highlight=False, markup=False)


@queue.command("assign")
@click.argument("item", type=int)
@click.argument("thread_id", type=int)
@click.option("--citizen", is_flag=True, help="The citizen wrote it (default: the authority).")
@click.option("--reason", default=None)
@pass_ctx
def queue_assign(ctx: Ctx, item: int, thread_id: int, citizen: bool, reason: str | None) -> None:
    """Put a queued message on a thread; it is forwarded like any reply.

    Example: mailflow queue assign 12 4 --reason "retyped address"
    """
    ctx.done(ctx.moderation().assign(item, thread_id, reason=reason,
                                     side="citizen" if citizen else "authority"))


@queue.command("reject")
@click.argument("item", type=int)
@click.option("--reason", required=True)
@click.option("--notify", is_flag=True,
              help="Tell the sender why (a pre-moderated request: its citizen); never sent "
                   "to automatic mail.")
@pass_ctx
def queue_reject(ctx: Ctx, item: int, reason: str, notify: bool) -> None:
    """Decide an item by not acting on it; the reason is kept.

    Example: mailflow queue reject 7 --reason "not an FOI request" --notify
    """
    ctx.done(ctx.moderation().reject(item, reason=reason, notify=notify))


@queue.command("release")
@click.argument("item", type=int)
@click.option("--reason", default=None)
@pass_ctx
def queue_release(ctx: Ctx, item: int, reason: str | None) -> None:
    """Publish an attachment the archive withheld, once you have checked it.

    Example: mailflow queue release 9 --reason "checked: no personal data"
    """
    ctx.done(ctx.moderation().release(item, reason=reason))


@queue.command("spam")
@click.argument("item", type=int)
@click.option("--reason", default=None)
@click.option("--block", type=click.Choice(["sender", "domain"]), default=None,
              help="Also refuse all further mail from its sender (or its whole domain).")
@pass_ctx
def queue_spam(ctx: Ctx, item: int, reason: str | None, block: str | None) -> None:
    """Decide an item as spam, and optionally block its sender or domain.

    Example: mailflow queue spam 14 --block domain
    """
    ctx.done(ctx.moderation().spam(item, reason=reason, block=block))


@queue.command("approve")
@click.argument("item", type=int)
@click.option("--reason", default=None)
@click.option("--authority", default=None, metavar="SLUG",
              help="For a report no single authority handles (report_routing): send it to "
                   "this one. Without it, the report is routed again by the current rules.")
@pass_ctx
def queue_approve(ctx: Ctx, item: int, reason: str | None, authority: str | None) -> None:
    """Let an item through: a pre-moderated request is sent, a held reply published, an
    unrouted report sent to the authority you name.

    Example: mailflow queue approve 7; mailflow queue approve 9 --authority wessex
    """
    ctx.done(ctx.moderation().approve(item, reason=reason, authority=authority))


@thread.command("state")
@click.argument("thread_id", type=int)
@click.argument("state")
@click.option("--reason", default=None)
@pass_ctx
def thread_state(ctx: Ctx, thread_id: int, state: str, reason: str | None) -> None:
    """Set how a request or report stands (as the citizen would by a one-line reply).

    Requests: waiting_response, waiting_clarification, internal_review, successful,
    partially_successful, rejected, not_held, user_withdrawn. Reports: open, fixed,
    user_withdrawn.

    Example: mailflow thread state 12 fixed --reason "the council's photo of the repair"
    """
    ctx.done(ctx.moderation().set_state(thread_id, state, reason=reason))


@thread.command("hide")
@click.argument("thread_id", type=int)
@click.option("--reason", required=True)
@pass_ctx
def thread_hide(ctx: Ctx, thread_id: int, reason: str) -> None:
    """Keep a whole thread out of the public archive."""
    ctx.done(ctx.moderation().hide_thread(thread_id, True, reason=reason))


@thread.command("unhide")
@click.argument("thread_id", type=int)
@click.option("--reason", default=None)
@pass_ctx
def thread_unhide(ctx: Ctx, thread_id: int, reason: str | None) -> None:
    """Publish a hidden thread again."""
    ctx.done(ctx.moderation().hide_thread(thread_id, False, reason=reason))


@cli.group()
def message() -> None:
    """Single messages on a thread."""


@message.command("hide")
@click.argument("message_id", type=int)
@click.option("--reason", required=True)
@pass_ctx
def message_hide(ctx: Ctx, message_id: int, reason: str) -> None:
    """Replace a message in the archive by a placeholder."""
    ctx.done(ctx.moderation().hide_message(message_id, True, reason=reason))


@message.command("unhide")
@click.argument("message_id", type=int)
@click.option("--reason", default=None)
@pass_ctx
def message_unhide(ctx: Ctx, message_id: int, reason: str | None) -> None:
    """Publish a hidden message again."""
    ctx.done(ctx.moderation().hide_message(message_id, False, reason=reason))


@cli.group()
def redact() -> None:
    """Redaction rules: what the public archive must never show."""


@redact.command("add")
@click.option("--scope", default="site", show_default=True,
              help='"site", "authority:<slug>" or "thread:<id>".')
@click.option("--text", "text", default=None, help="Literal text (any case).")
@click.option("--regex", "regex", default=None, help="A regular expression.")
@click.option("--replacement", required=True, help='What readers see, e.g. "[name removed]".')
@click.option("--note", default="", help="Why (kept in the file and the audit log).")
@click.option("--yes", is_flag=True, help="Save without asking after the preview.")
@click.option("--dry-run", is_flag=True, help="Only show the preview.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def redact_add(ctx: Ctx, scope: str, text: str | None, regex: str | None, replacement: str,
               note: str, yes: bool, dry_run: bool, as_json: bool) -> None:
    """Preview a redaction rule over the archive's text, then save it to rules/.

    Example: mailflow redact add --scope thread:12 --text "Jane Q. Public" --replacement "[name]"
    """
    from mailflow import redactions
    from mailflow.moderation import default_actor
    if (text is None) == (regex is None):
        raise MailflowError("give exactly one of --text or --regex")
    pattern, is_regex = (regex, True) if regex is not None else (text, False)
    assert pattern is not None
    rule = redactions.make_rule(scope, pattern, is_regex, replacement, note)
    p = redactions.preview(ctx.site, rule)
    if as_json:
        print_json({"scope": rule.scope, "threads": p.threads, "changes": p.changes,
                    "examples": p.examples, "saved": False if dry_run or not yes else True})
    else:
        console.print(f"This rule changes {p.changes} place(s) in {p.threads} thread(s):",
                      highlight=False)
        for e in p.examples:
            console.print(f"  thread {e['thread_id']} message {e['message_id']}: "
                          f"{e['found']!r} → {e['replacement']!r}", highlight=False)
    if dry_run:
        return
    if not yes and not click.confirm("Save this rule?", default=False):
        console.print("not saved")
        sys.exit(1)
    path = redactions.save(ctx.site, rule.scope, pattern, is_regex, replacement, note,
                           ctx.actor or default_actor())
    if not as_json:
        console.print(f"saved to {path}; the archive applies it at its next build", highlight=False)


@cli.command()
@click.option("--thread", "thread_id", type=int, default=None)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def audit(ctx: Ctx, thread_id: int | None, as_json: bool) -> None:
    """Every admin action: who, when, what and why."""
    rows = ctx.moderation().audit(thread_id)
    if as_json:
        print_json(rows)
        return
    t = Table("when", "who", "action", "target", "why")
    for r in rows:
        t.add_row(f"{r['at']:%Y-%m-%d %H:%M}", r["actor"], r["action"], r["target"] or "",
                  r["reason"] or "")
    console.print(t)


# -- outbox -----------------------------------------------------------------------------------------
@cli.group()
def outbox() -> None:
    """Outgoing mail waiting to be delivered."""


@outbox.command("list")
@click.option("--state", default=None, type=click.Choice(["queued", "sending", "sent", "failed"]))
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def outbox_list(ctx: Ctx, state: str | None, as_json: bool) -> None:
    """List outgoing deliveries."""
    with ctx.site.store.read() as tx:
        rows = [{"id": r.id, "thread_id": r.thread_id, "rcpt": r.rcpt, "state": r.state,
                 "attempts": r.attempts, "next_attempt_at": r.next_attempt_at,
                 "last_error": r.last_error} for r in tx.outbox_rows(state)]
    if as_json:
        print_json(rows)
        return
    t = Table("id", "thread", "to", "state", "attempts", "next try", "last error")
    for r in rows:
        t.add_row(str(r["id"]), str(r["thread_id"] or ""), r["rcpt"], r["state"],
                  str(r["attempts"]), f"{r['next_attempt_at']:%Y-%m-%d %H:%M}",
                  (r["last_error"] or "")[:60])
    console.print(t)


@outbox.command("flush")
@pass_ctx
def outbox_flush(ctx: Ctx) -> None:
    """Make one delivery attempt for everything that is due now."""
    from mailflow.delivery import deliver
    site = ctx.site
    counts = asyncio.run(deliver(site))
    console.print(f"sent {counts['sent']}, to retry {counts['retry']}, failed {counts['failed']}")


# -- status -----------------------------------------------------------------------------------------
@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--check", is_flag=True,
              help="Exit 1 unless this host's daemon beat recently and the database answers "
                   "(for a supervisor or a monitoring check).")
@pass_ctx
def status(ctx: Ctx, as_json: bool, check: bool) -> None:
    """Whether the site is healthy: each daemon's heartbeat, the spool, outbox and queue."""
    from mailflow.instances import (STALE_AFTER, Registry, _aware, health_path, read_health,
                                    spool_depth)
    from mailflow.store.repository import utcnow
    site = ctx.site
    problems: list[str] = []
    data: dict[str, Any] = {}
    try:
        with site.store.read() as tx:
            data.update(tx.counts())
        instances = Registry(site.store).all()
    except MailflowError as e:
        problems.append(f"database: {e}")
        instances = []
    depth = spool_depth(site.spool)
    data.update({"spool_pending": depth["pending"], "spool_in_work": depth["in_work"],
                 "spool_failed": depth["failed"],
                 "oldest_unprocessed_seconds": depth["oldest"]})
    now = utcnow()
    data["instances"] = [{
        "id": i.id, "hostname": i.hostname, "pid": i.pid, "state": i.state,
        "alive": i.alive(now), "started_at": i.started_at,
        "heartbeat_age_seconds": round((now - _aware(i.heartbeat_at)).total_seconds(), 1),
        **{k: v for k, v in i.detail.items() if k in ("spool_pending", "outbox_backlog",
                                                     "oldest_unprocessed_seconds")}}
        for i in instances]
    health = read_health(health_path(site))
    if check:
        if health is None:
            problems.append("no health file: the daemon has not run here")
        elif not health.get("ok"):
            problems.append(f"the daemon says: {health.get('problem', 'not ok')}")
        else:
            age = (now - _aware(datetime.fromisoformat(health["at"]))).total_seconds()
            if age > STALE_AFTER.total_seconds():
                problems.append(f"the daemon's last heartbeat was {age:.0f} s ago")
    data["problems"] = problems
    if as_json:
        print_json(data)
    else:
        if instances:
            table = Table("instance", "state", "heartbeat", "spool", "oldest", box=None)
            for i in data["instances"]:
                table.add_row(i["id"], i["state"] if i["alive"] or i["state"] != "running"
                              else "silent", f"{i['heartbeat_age_seconds']:.0f} s ago",
                              str(i.get("spool_pending", "-")),
                              "-" if i.get("oldest_unprocessed_seconds") is None
                              else f"{i['oldest_unprocessed_seconds']:.0f} s")
            console.print(table)
        for k, v in data.items():
            if k not in ("instances", "problems"):
                console.print(f"{k:<27} {'-' if v is None else v}", highlight=False)
        for p in problems:
            err_console.print(f"[bold red]problem:[/] {escape(p)}", highlight=False)
    if check and problems:
        sys.exit(1)


# -- demo -------------------------------------------------------------------------------------------
@cli.command()
@click.option("--citizen", default="jane.citizen@citizen.example", show_default=True)
@click.option("--authority", "slug", default=None, help="Authority slug (default: the first).")
@click.option("--timeout", default=20.0, show_default=True, help="Seconds to wait at each step.")
@pass_ctx
def demo(ctx: Ctx, citizen: str, slug: str | None, timeout: float) -> None:
    """Play a citizen and an authority against the running daemon, over SMTP, step by step."""
    from mailflow.demo import run_demo
    sys.exit(run_demo(ctx.site, citizen=citizen, slug=slug, timeout=timeout, console=console))


def main() -> None:
    cli(prog_name="mailflow")


from mailflow.cli_archive import archive  # noqa: E402  (it imports Ctx and friends from here)

cli.add_command(archive)

from mailflow.cli_authority import register as register_authority_commands  # noqa: E402

register_authority_commands(authority)

from mailflow.cli_imap import imap  # noqa: E402

cli.add_command(imap)

from mailflow.cli_reports import register as register_report_commands  # noqa: E402

register_report_commands(cli)

from mailflow.cli_db import db  # noqa: E402

cli.add_command(db)

from mailflow.cli_spool import spool  # noqa: E402

cli.add_command(spool)
