"""The one place that knows the order of the steps: parse → classify → match → store → queue mail.

Each spooled message is processed in one database transaction per message: the thread's
change, the stored message and the mail it causes are committed together or not at all.
Processing is idempotent: every (raw bytes, recipient) pair is recorded in `deliveries`, so
the same message processed again (a crash after commit, an MTA retry, a second ingest)
changes nothing. What cannot be decided safely goes to the admin queue with its raw bytes.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from collections.abc import Sequence
from typing import Any

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from mailflow import logs
from mailflow.clock import Clock
from mailflow.core import addresses as A
from mailflow.core import authentication as AU
from mailflow.core.authentication import Authentication
from mailflow.core.commands import STATE_WORDS, parse_command
from mailflow.core.addresses import AddressKind, OurAddress
from mailflow.core.classify import classify
from mailflow.core.matching import Decision, match
from mailflow.core.door import gate
from mailflow.core.message import Classification, Kind, ParsedMessage
from mailflow.core.rules import Authority
from mailflow.errors import MailflowError, StoreError
from mailflow.mail.authenticate import (Resolver, authenticate, client_address,
                                        trusted_networks)
from mailflow.mail.parse import ParseError, caps_hit, parse
from mailflow.outbound.compose import Outgoing, new_message_id
from mailflow.outbound.outbox import queue_forward, queue_message, store_message
from mailflow.reports import NOT_SENT as REPORT_NOT_SENT, ReportFlow
from mailflow.site import Site
from mailflow.spool import Envelope, Spool, SpoolItem
from mailflow.store.lookup import StoreLookup
from mailflow.store.repository import OutboxRow, Thread, Tx, utcnow
from mailflow.templating import render

log = logging.getLogger("mailflow.pipeline")

NO_REPLY = re.compile(r"^(no[-_.]?reply|do[-_.]?not[-_.]?reply|noreply|mailer-daemon|postmaster)"
                      r"([-+.@]|$)", re.I)

# RFC 3834: at most one automatic answer per address in this many days to mail we did not ask
# for (a new request or report from an address that has never confirmed one).
AUTOMATIC_ANSWER_DAYS = 7


@dataclass
class Outcome:
    rcpt: str
    outcome: str
    thread_id: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Result:
    outcomes: list[Outcome] = field(default_factory=list)
    outbox_ids: list[int] = field(default_factory=list)


# At most this much of spool files (about the raw messages) per transaction of
# `Pipeline.process_items`: what it holds in memory at once, parsed, until the commit.
BATCH_BYTES = 16 * 2**20


def _chunks(items: Sequence[SpoolItem]) -> list[list[SpoolItem]]:
    """Items in order, cut into runs of at most BATCH_BYTES of spool files each."""
    out: list[list[SpoolItem]] = []
    size = 0
    for item in items:
        try:
            n = item.eml.stat().st_size
        except OSError:
            n = 0   # reading it will fail, and say why
        if not out or (size + n > BATCH_BYTES and out[-1]):
            out.append([])
            size = 0
        out[-1].append(item)
        size += n
    return out


# A log line of `_apply`, kept until its transaction commits: (thread id, format, args).
_Said = tuple[int | None, str, tuple[Any, ...]]


def _say(lines: Sequence[_Said]) -> None:
    for thread_id, fmt, args in lines:
        with logs.thread_context(thread_id):
            log.info(fmt, *args)


class _Redo(Exception):
    """An item of an optimistic batch raised: roll its transaction back, apply the batch
    again with a savepoint per item."""

    def __init__(self, index: int, error: Exception):
        super().__init__(index, error)
        self.index, self.error = index, error


def _database_gone(e: BaseException) -> bool:
    """Whether an error is the database's (locked, unreachable, connection lost) rather than
    one message's: a batch then stops and gives every item back, instead of blaming one."""
    if isinstance(e, (StoreError, OperationalError, InterfaceError)):
        return True
    return isinstance(e, DBAPIError) and bool(e.connection_invalidated)


def recipients_from_headers(pm: ParsedMessage) -> list[str]:
    """Where a catch-all mailbox lost the envelope: Delivered-To, X-Original-To, To, Cc."""
    seen: list[str] = []
    for a in (*pm.delivered_to, *pm.to, *pm.cc):
        if a and a not in seen:
            seen.append(a)
    return seen


class Pipeline:
    def __init__(self, site: Site, resolver: Resolver | None = None):
        self.site = site
        self.domain = site.domain
        self.clock = Clock(site.settings, site.rules)
        self.reports = ReportFlow(self)   # fault reports' own steps (mailflow/reports.py)
        # DNS for DKIM, SPF and DMARC: given here, or set on the site (`site.dns_resolver`,
        # what tests do so that admin actions see the same stub), else dnspython.
        self._resolver = resolver
        self._trusted: tuple[tuple[str, ...], list[Any]] | None = None   # the relays, parsed

    @property
    def resolver(self) -> Resolver:
        if self._resolver is None:
            self._resolver = getattr(self.site, "dns_resolver", None)
        if self._resolver is None:
            from mailflow.mail.authenticate import DnsResolver
            c = self.site.settings.classify
            self._resolver = DnsResolver(c.dns_timeout, c.nameservers)
        return self._resolver

    # -- the spool side ------------------------------------------------------------------
    def process_item(self, spool: Spool, item: SpoolItem) -> Result:
        """Process one claimed spool item and settle it: done, retried, or failed for an admin.

        The raw bytes are let go as soon as they are stored (the spool file still has them
        until the item is settled: a failure reads them again for the admin queue)."""
        raw = item.read()
        try:
            pre = self._prepare(raw, item.envelope)
            del raw
            with self.site.store.tx() as tx:
                tx.lock_threads(pre.threads)
                result = self._apply(tx, pre)
        except StoreError as e:
            # The database is unavailable: nothing was written, try again later (not the
            # message's fault: not counted against spool.max_attempts).
            spool.retry(item, f"store: {e}", counted=False)
            raise
        except Exception as e:  # noqa: BLE001 - any bug must leave the message safe
            log.exception("processing spool item %s failed", item.id)
            if item.attempts + 1 >= self.site.settings.spool.max_attempts:
                self._quarantine(item, e)
                spool.fail(item, f"{type(e).__name__}: {e}")
            else:
                spool.retry(item, f"{type(e).__name__}: {e}")
            raise
        spool.done(item)
        return result

    def process_items(self, spool: Spool, items: Sequence[SpoolItem]) -> list[Result | Exception]:
        """Process several claimed spool items with one commit for them all, and settle each.

        The same as `process_item` for each item, in order, but with one commit for them all
        (each commit is an fsync on PostgreSQL, and on SQLite the write lock and the WAL
        work). The batch is first applied as it usually goes, with no savepoints (a
        SAVEPOINT and its RELEASE cost more CPU than most of a message's statements); if an
        item raises, that transaction is rolled back whole and the batch applied again with
        a SAVEPOINT for every item, so that a bug in one rolls back that one only and leaves
        the others to commit. No item is marked done before the commit;
        a crash, or a commit that fails, leaves all of them to be processed again, and
        the deliveries recorded with each message make that redo change nothing. A message
        that arrives twice in one batch is a duplicate the second time, as it would be in
        two transactions.

        Returns, for each item in order, its Result or the exception it raised (already
        logged, and the item retried or failed, as `process_item` does). A database that
        cannot be used gives every item not yet committed back for a retry and raises the
        StoreError.

        The parsed messages of a transaction are all held in memory until it commits, so
        items are taken in transactions of at most BATCH_BYTES of spool files (a message
        bigger than that has one to itself).
        """
        results: list[Result | Exception] = []
        chunks = _chunks(items)
        for n, chunk in enumerate(chunks):
            try:
                results += self._process_batch(spool, chunk)
            except StoreError:
                for item in [i for later in chunks[n + 1:] for i in later]:
                    try:
                        spool.retry(item, "store: an earlier batch could not be written",
                                    counted=False)
                    except Exception:  # noqa: BLE001 - left claimed: recover() finds it
                        log.exception("could not give spool item %s back", item.id)
                raise
        return results

    def _process_batch(self, spool: Spool,
                       items: Sequence[SpoolItem]) -> list[Result | Exception]:
        """`process_items` for one transaction's worth of items."""
        outcome: list[Result | Exception | None] = [None] * len(items)
        prepared: list[tuple[int, _Prepared]] = []
        for i, item in enumerate(items):
            read = False
            try:
                raw = item.read()
                read = True
                prepared.append((i, self._prepare(raw, item.envelope)))
                del raw
            except Exception as e:  # noqa: BLE001 - as in process_item
                outcome[i] = e
                try:
                    self._settle_failure(spool, item, e, readable=read)
                except Exception:  # noqa: BLE001 - left claimed: recover() finds it
                    log.exception("could not settle spool item %s", item.id)
        failed: dict[int, Exception] = {}
        said: dict[int, list[_Said]] = {}
        try:
            try:
                self._apply_batch(prepared, outcome, said)
            except _Redo as redo:
                # A bug in one message (never the database's error: those came straight
                # through): nothing of the batch was written. Once more, a savepoint each.
                if len(prepared) == 1:
                    failed[redo.index] = redo.error   # alone in its transaction already
                else:
                    log.info("spool item %s raised %s: its batch of %d is applied again, "
                             "each message in a savepoint", items[redo.index].id,
                             type(redo.error).__name__, len(prepared))
                    prepared = self._reread(spool, items, prepared, outcome)
                    said.clear()
                    self._apply_batch_careful(prepared, outcome, failed, said)
        except Exception as e:
            # Nothing of the batch was committed: every item goes back for another attempt.
            error = e if isinstance(e, StoreError) else StoreError(f"database error: {e}")
            for i, _ in prepared:
                outcome[i] = error
                try:
                    spool.retry(items[i], f"store: {error}", counted=False)
                except Exception:  # noqa: BLE001 - left claimed: recover() finds it
                    log.exception("could not give spool item %s back", items[i].id)
            if error is e:
                raise
            raise error from e
        for i, _ in prepared:
            try:
                if i in failed:
                    outcome[i] = failed[i]
                    self._settle_failure(spool, items[i], failed[i])
                else:
                    _say(said.get(i, ()))
                    spool.done(items[i])
            except Exception as e:  # noqa: BLE001 - committed; a redo would be a duplicate
                log.exception("could not settle spool item %s", items[i].id)
                outcome[i] = e
        return [o if o is not None else RuntimeError("not processed") for o in outcome]

    def _apply_batch(self, prepared: list[tuple[int, "_Prepared"]],
                     outcome: list[Result | Exception | None],
                     said: dict[int, list["_Said"]]) -> None:
        """Every prepared item in one transaction, no savepoints: commits all of them, or
        raises `_Redo` (an item raised; the transaction is rolled back, nothing written),
        or the database's error (the same, and the batch must wait)."""
        with self.site.store.tx() as tx:
            tx.lock_threads(t for _, pre in prepared for t in pre.threads)
            for i, pre in prepared:
                said[i] = []
                try:
                    outcome[i] = self._apply(tx, pre, said[i])
                except Exception as e:  # noqa: BLE001 - decided by the caller
                    if _database_gone(e):
                        raise   # not this message's fault: the whole batch waits
                    raise _Redo(i, e) from e

    def _apply_batch_careful(self, prepared: list[tuple[int, "_Prepared"]],
                             outcome: list[Result | Exception | None],
                             failed: dict[int, Exception],
                             said: dict[int, list["_Said"]]) -> None:
        """Every prepared item in one transaction, each in a SAVEPOINT: an item that raises
        is rolled back alone (and put in `failed`), the others commit together."""
        with self.site.store.tx() as tx:
            tx.lock_threads(t for _, pre in prepared for t in pre.threads)
            for i, pre in prepared:
                said[i] = []
                try:
                    with tx.c.begin_nested():
                        outcome[i] = self._apply(tx, pre, said[i])
                except Exception as e:  # noqa: BLE001 - only this item is rolled back
                    if _database_gone(e):
                        raise   # not this message's fault: the whole batch waits
                    tx.forget()   # rows it read may hold its rolled-back writes
                    failed[i] = e
                    outcome[i] = None

    def _reread(self, spool: Spool, items: Sequence[SpoolItem],
                prepared: list[tuple[int, "_Prepared"]],
                outcome: list[Result | Exception | None]) -> list[tuple[int, "_Prepared"]]:
        """The raw bytes of prepared items applied once already (`_apply` lets go of them
        once stored), read again from their spool files, which hold them until settled.
        The parse and the authentication are kept: they did not depend on the store."""
        again: list[tuple[int, _Prepared]] = []
        for i, pre in prepared:
            outcome[i] = None
            try:
                pre.raw = items[i].read()
            except Exception as e:  # noqa: BLE001 - as in _process_batch
                outcome[i] = e
                try:
                    self._settle_failure(spool, items[i], e, readable=False)
                except Exception:  # noqa: BLE001 - left claimed: recover() finds it
                    log.exception("could not settle spool item %s", items[i].id)
                continue
            again.append((i, pre))
        return again

    def _settle_failure(self, spool: Spool, item: SpoolItem, error: Exception, *,
                        readable: bool = True) -> None:
        """An item whose processing raised (a bug, never the database): another attempt,
        or, after the last, the failed folder and the admin queue (with its raw bytes, read
        again from the spool, when the item could be read at all)."""
        log.error("processing spool item %s failed", item.id, exc_info=error)
        if item.attempts + 1 >= self.site.settings.spool.max_attempts:
            if readable:
                self._quarantine(item, error)
            spool.fail(item, f"{type(error).__name__}: {error}")
        else:
            spool.retry(item, f"{type(error).__name__}: {error}")

    def _quarantine(self, item: SpoolItem, error: Exception) -> None:
        try:
            raw = item.read()
            with self.site.store.tx() as tx:
                sha = tx.put_raw(raw)
                tx.add_queue_item("processing_failed",
                                  f"could not be processed: {type(error).__name__}: {error}"[:500],
                                  raw_sha256=sha,
                                  detail={"spool_id": item.id, "envelope": item.envelope.to_json(),
                                          "errors": [*item.errors, str(error)]})
        except Exception:  # noqa: BLE001 - the spool's failed/ folder still has it
            log.exception("could not record failed spool item %s in the queue", item.id)

    # -- the message side ----------------------------------------------------------------
    def process(self, raw: bytes, envelope: Envelope) -> Result:
        pre = self._prepare(raw, envelope)
        with self.site.store.tx() as tx:
            return self._apply(tx, pre)

    def _prepare(self, raw: bytes, envelope: Envelope) -> "_Prepared":
        """What needs no transaction: parsing, and who sent it (DNS can take seconds, the
        write lock must not wait for it)."""
        try:
            pm: ParsedMessage | None = parse(raw)
            parse_error = ""
        except ParseError as e:
            pm, parse_error = None, str(e)
        auth = self.authenticate(raw, pm, envelope) if pm is not None else None
        threads = tuple(a.thread_id for a in self.our_recipients(envelope.rcpt_tos)
                        if a.thread_id is not None)
        return _Prepared(raw, envelope, pm, parse_error, auth, threads)

    def _apply(self, tx: Tx, pre: "_Prepared", said: list["_Said"] | None = None) -> Result:
        """Everything one message changes in the store, in the caller's transaction.

        `said`: where to put the log line of each outcome instead of logging it, for a
        caller that logs them only once the transaction has committed (a batch may be
        rolled back and applied again)."""
        result = Result()
        envelope, pm, auth = pre.envelope, pre.pm, pre.auth
        authentication = auth.header_value(self.domain) if auth is not None else None
        assert pre.raw is not None, "a prepared message is applied once"
        sha = tx.put_raw(pre.raw)
        pre.raw = None   # stored: the rest needs only the parsed message (and memory)
        if pm is None:
            if not tx.delivery_seen(sha, "unparseable"):
                tx.add_queue_item("unparseable", f"unparseable message: {pre.parse_error}"[:500],
                                  raw_sha256=sha,
                                  detail={"envelope": envelope.to_json(),
                                          "error": pre.parse_error})
                tx.record_delivery(sha, "unparseable", envelope.to_json(), "queued:unparseable")
            result.outcomes.append(Outcome("(unparseable)", "queued:unparseable"))
            return result
        plan = self.plan(tx, pm, envelope, auth=auth)
        for step in plan.steps:
            logs.set_thread(step.thread_id)   # every log line of this step names it
            if tx.delivery_seen(sha, step.key):
                result.outcomes.append(Outcome(step.key, "duplicate", step.thread_id))
                continue
            c = StepContext(tx=tx, pm=pm, cls=plan.classification, addr=step.addr, sha=sha,
                            envelope=envelope, result=result, step=step, auth=auth,
                            authentication=authentication)
            outcome = self.execute(c)
            logs.set_thread(outcome.thread_id)   # a new request has one only now
            tx.record_delivery(sha, step.key, envelope.to_json(), outcome.outcome,
                               {"thread_id": outcome.thread_id, **outcome.detail,
                                "classification": plan.classification.kind.value,
                                "reason": plan.classification.reason})
            result.outcomes.append(outcome)
            line: _Said = (outcome.thread_id, "%s -> %s: %s (thread %s; %s)",
                           (pm.from_addr or envelope.mail_from, step.key, outcome.outcome,
                            outcome.thread_id, plan.classification.reason))
            if said is None:
                _say((line,))
            else:
                said.append(line)
        return result

    # -- who sent it -------------------------------------------------------------------------
    def authenticate(self, raw: bytes, pm: ParsedMessage,
                     envelope: Envelope) -> Authentication | None:
        """DKIM, SPF and DMARC for one message (None when `[classify] authenticate` is off).

        SPF is checked for the SMTP client (or, behind the site's own relays, the client their
        Received headers name) and the envelope MAIL FROM; for ingest and IMAP only when the
        site says the topmost Received header is its own. Never raises: a failure of the
        checking itself is a temperror, which is never a pass.
        """
        c = self.site.settings.classify
        if not c.authenticate:
            return None
        try:
            relays = tuple(c.trusted_relays)
            if self._trusted is None or self._trusted[0] != relays:
                self._trusted = (relays, trusted_networks(relays))   # not parsed per message
            ip, helo, why = client_address(envelope.via, envelope.peer, envelope.helo,
                                           pm.header_all("Received"), self._trusted[1],
                                           c.spf_from_received)
            return authenticate(raw, from_addr=pm.from_addr, mail_from=envelope.mail_from,
                                client_ip=ip, helo=helo, resolver=self.resolver,
                                why_no_ip=why, budget=4 * c.dns_timeout)
        except Exception as e:  # noqa: BLE001 - a bug here must not lose the message
            log.exception("authenticating a message from %s failed", pm.from_addr)
            why = f"the checks themselves failed: {type(e).__name__}"
            return Authentication(
                from_domain=AU.domain_of(pm.from_addr),
                spf=AU.SpfResult(AU.TEMPERROR, reason=why), dkim=(),
                dmarc=AU.DmarcResult(AU.TEMPERROR, from_domain=AU.domain_of(pm.from_addr),
                                     reason=why),
                verdict=AU.TEMPERROR, reason=why)

    def claims_authority(self, lookup: StoreLookup, authority: str, from_addr: str) -> bool:
        """Whether a From address claims to be the authority: one of its known senders, or an
        address at (or under) a domain one of them writes from."""
        if not from_addr or "@" not in from_addr:
            return False
        known = lookup.known_senders(authority)
        if from_addr in known:
            return True
        domain = from_addr.rpartition("@")[2]
        return any(domain == d or domain.endswith("." + d)
                   for d in {a.rpartition("@")[2] for a in known if "@" in a})

    # -- deciding, without writing anything (also what `mailflow explain` shows) ------------
    def classify(self, pm: ParsedMessage, envelope: Envelope) -> Classification:
        c = self.site.settings.classify
        sender = None if envelope.via in ("imap", "unknown", "explain") else envelope.mail_from
        return classify(pm, sender, our_domain=self.domain, spam_header=c.spam_header,
                        spam_threshold=c.spam_threshold)

    def plan(self, tx: Tx, pm: ParsedMessage, envelope: Envelope,
             auth: Authentication | None = None) -> "Plan":
        """What should happen to this message, step by step, with the reasons. Reads only.

        `auth` (from `authenticate`) decides whether a reply claiming to be the authority is
        held for an admin; without it nothing is held for that reason."""
        cls = self.classify(pm, envelope)
        if tx.is_blocked(envelope.mail_from or "", pm.from_addr):
            plan = Plan(classification=cls)
            plan.reasons.append("the sender was blocked by an admin")
            plan.add(Step("blocked", "drop", why="blocked sender"))
            return plan
        capped = caps_hit(pm)
        if capped:   # part of it was not read: a person decides, from the raw message
            plan = Plan(classification=cls)
            why = "the message was not read in full: " + "; ".join(capped)
            plan.reasons.append(why)
            plan.add(Step("limits", "queue", queue_reason="over_limits", why=why[:300]))
            return plan
        rcpts = envelope.rcpt_tos if not envelope.rcpt_from_headers else recipients_from_headers(pm)
        ours = self.our_recipients(rcpts)
        plan = Plan(classification=cls, recipients=[a.address for a in ours])
        if cls.kind is Kind.LOOP:
            plan.add(Step("loop", "queue", queue_reason="loop",
                          why=f"our own mail came back: {cls.reason}"))
            return plan
        threadish = [a for a in ours if a.kind in (AddressKind.REQUEST, AddressKind.REPLY)]
        for a in ours:
            if a not in threadish:
                plan.add(Step(a.address, a.kind.value, addr=a))
        if threadish or (envelope.rcpt_from_headers and not plan.steps):
            envelope_rcpts = () if envelope.rcpt_from_headers else tuple(envelope.rcpt_tos)
            decision = match(pm, StoreLookup(tx, self.site.rules), domain=self.domain,
                             envelope_rcpts=envelope_rcpts)
            plan.decision = decision
            plan.reasons.extend(decision.reasons)
            if decision.action == "thread":
                for tid, kind in decision.threads:
                    self._thread_step(tx, plan, pm, envelope, tid, kind, decision, auth)
            elif decision.action == "queue":
                plan.add(Step("matcher", "queue", queue_reason=decision.queue_reason or "unmatched",
                              why="; ".join(decision.reasons[-2:]) or "no thread could be decided",
                              thread_id=None, decision=decision))
            elif threadish:
                plan.add(Step("matcher", "queue", queue_reason="no_evidence",
                              why="addressed to a thread address that names no thread",
                              decision=decision))
        if not plan.steps and not envelope.rcpt_from_headers:
            plan.add(Step("(none)", "queue", queue_reason="no_recipient",
                          why=f"no address of ours among {envelope.rcpt_tos}"))
        return plan

    def names_us(self, pm: ParsedMessage) -> bool:
        """Without an envelope: does any of our addresses, Message-IDs or tags name this?"""
        with self.site.store.read() as tx:
            return match(pm, StoreLookup(tx, self.site.rules), domain=self.domain).names_us

    def _thread_step(self, tx: Tx, plan: "Plan", pm: ParsedMessage, envelope: Envelope,
                     tid: int, kind: AddressKind, decision: Decision,
                     auth: Authentication | None = None) -> None:
        thread = tx.thread(tid)
        assert thread is not None  # the matcher only names threads that exist
        strongest = next((e for e in decision.evidence if e.thread_id == tid and e.strong), None)
        method = strongest.method if strongest else "reply_address"
        detail = {
            "source": strongest.source if strongest else "",
            "detail": strongest.detail if strongest else "",
            "evidence": [{"method": e.method, "source": e.source, "thread_id": e.thread_id,
                          "verified": e.verified, "strong": e.strong, "detail": e.detail}
                         for e in decision.evidence][:20],
        }
        side = "authority_mail" if kind is AddressKind.REQUEST else "citizen_mail"
        key = f"{kind.value}-{tid}"
        sender = envelope.mail_from if envelope.via not in ("imap", "unknown") else pm.from_addr
        refusal = gate(thread.allow, authority_side=kind is AddressKind.REQUEST,
                       sender=sender if sender is not None else pm.from_addr,
                       known_senders=StoreLookup(tx, self.site.rules).known_senders(thread.authority))
        if refusal is not None:
            plan.reasons.append(f"thread {tid} refuses this sender: {refusal[10:]}")
            plan.add(Step(key, "queue", queue_reason="gatekeeper", why=refusal[10:],
                          thread_id=tid))
            return
        hold = None
        if kind is AddressKind.REQUEST and auth is not None and self.claims_authority(
                StoreLookup(tx, self.site.rules), thread.authority, pm.from_addr):
            hold = AU.hold_reason(auth, self.site.settings.classify.hold_unverified)
            if hold:
                plan.reasons.append(f"thread {tid}: {pm.from_addr} claims to be "
                                    f"{thread.authority}, but {hold}; a person's reply is "
                                    "held for an admin")
        plan.add(Step(key, side, thread_id=tid, match_method=method, match_detail=detail,
                      hold=hold))

    def execute(self, c: "StepContext") -> Outcome:
        step = c.step
        if step.action == "drop":   # the raw bytes are kept; nothing else happens
            return Outcome(step.key, "dropped:blocked")
        if step.action == "queue":
            suggestions = ([{"thread_id": s.thread_id, "score": round(s.score, 2),
                             "reason": s.reason} for s in step.decision.suggestions]
                           if step.decision else [])
            return self._queue(c, step.queue_reason or "unmatched", step.why,
                               thread_id=step.thread_id, suggestions=suggestions,
                               reasons=list(step.decision.reasons) if step.decision else [])
        handler = {
            "authority": self._new_request,       # <slug>@: a citizen starts a request
            "report": self.reports.new_report,    # report@, report+<category>@: a fault report
            "confirm": self._confirmation,
            "authority_mail": self._authority_mail,
            "citizen_mail": self._citizen_mail,
        }.get(step.action)
        if handler is None:  # postmaster@, abuse@, bounces@: a person reads them
            return self._queue(c, step.action, f"mail to {step.key}")
        return handler(c)

    def our_recipients(self, rcpts: list[str]) -> list[OurAddress]:
        found: dict[str, OurAddress] = {}
        for r in rcpts:
            a = self.site.check_recipient(r).address
            if a is not None and a.address not in found:
                found[a.address] = a
        return list(found.values())

    # -- helpers ---------------------------------------------------------------------------
    def _queue(self, c: "StepContext", reason: str, why: str, thread_id: int | None = None,
               **detail: Any) -> Outcome:
        summary = f"{why} — from {c.pm.from_addr or c.envelope.mail_from or '<>'}: {c.pm.subject}"
        c.tx.add_queue_item(reason, summary[:500], raw_sha256=c.sha, thread_id=thread_id,
                            detail={"why": why, "rcpt": c.step.key,
                                    "envelope": c.envelope.to_json(),
                                    "classification": c.cls.kind.value,
                                    "classification_reason": c.cls.reason,
                                    "authentication": c.authentication, **detail})
        return Outcome(c.step.key, f"queued:{reason}", thread_id, {"why": why})

    def _store_in(self, c: "StepContext", thread_id: int | None, kind: str, method: str | None,
                  detail: dict[str, Any] | None, flags: list[str] | None = None) -> int:
        pm = c.pm
        return c.tx.add_message(
            thread_id=thread_id, direction="in", kind=kind, message_id=pm.message_id,
            from_addr=pm.from_addr, from_name=pm.from_name, to_addrs=list(pm.to + pm.cc),
            subject=pm.subject, date=pm.date.astimezone(timezone.utc) if pm.date else None,
            text=pm.text, raw_sha256=c.sha, classification=c.cls.kind.value,
            classification_reason=c.cls.reason, match_method=method, match_detail=detail,
            flags=flags or [], authentication=c.authentication)

    def _send(self, c: "StepContext", out: Outgoing, *, thread_id: int | None, kind: str,
              mail_from: str) -> None:
        self._send_with(c.tx, c.result, out, thread_id=thread_id, kind=kind, mail_from=mail_from)

    def _send_with(self, tx: Tx, result: Result, out: Outgoing, *, thread_id: int | None,
                   kind: str, mail_from: str) -> None:
        _, row = queue_message(tx, self.site.signer, out, thread_id=thread_id, kind=kind,
                               mail_from=mail_from)
        result.outbox_ids.append(row)

    def _may_answer(self, c: "StepContext") -> bool:
        """Never answer automatic mail, null senders or no-reply addresses (no backscatter)."""
        return self._no_answer(c) is None

    def _no_answer(self, c: "StepContext") -> tuple[str, str] | None:
        """(queue reason, why) when mail to a public address must not be answered at all:
        automatic mail, the null sender, no usable From, a no-reply address."""
        key = c.step.key
        if c.cls.automatic:
            return "automatic", f"automatic mail to {key} ({c.cls.reason})"
        if c.envelope.mail_from == "":
            return "automatic", (f"mail to {key} from the null sender <> (what delivery "
                                 "reports use): never answered")
        if not c.pm.from_addr:
            ambiguous = any("ambiguous" in d.lower() for d in c.pm.defects)
            return "no_sender", (f"mail to {key} without a usable From address ("
                                 + ("ambiguous: it could be read as more than one address"
                                    if ambiguous else "missing or unreadable")
                                 + "): nobody to answer")
        if NO_REPLY.match(c.pm.from_addr):
            return "automatic", f"mail to {key} from the no-reply address {c.pm.from_addr}"
        return None

    def _refuse_to_answer(self, c: "StepContext", answer_to: str) -> "Outcome | None":
        """Queue (and do not answer) unsolicited mail whose automatic answer would be
        backscatter: the answer would go somewhere other than the envelope sender (a forged
        or someone else's Reply-To), or the address had mail from us in the last
        AUTOMATIC_ANSWER_DAYS days and has never confirmed a request (RFC 3834). An admin's
        `queue approve` answers it anyway."""
        if c.approved:
            return None
        if not AU.envelope_matches(answer_to, c.envelope.mail_from):
            return self._queue(c, "sender_mismatch",
                               f"an answer would go to {answer_to}, but the envelope sender is "
                               f"{c.envelope.mail_from or '<>'}: not answered, so mailflow "
                               "cannot be made to write to someone else", answer_to=answer_to)
        if any(t.confirmed_at is not None for t in c.tx.threads_of_citizen(answer_to.lower())):
            return None   # she has confirmed a request: her mail is not unsolicited any more
        days = self.site.settings.classify.automatic_answer_days
        last = (recent_mail_to(c.tx, answer_to, utcnow() - timedelta(days=days))
                if days > 0 else None)
        if last is not None:
            return self._queue(c, "rate_limited",
                               f"{answer_to} was sent mail at {last:%Y-%m-%d %H:%M} UTC and has "
                               f"not confirmed a request: at most one automatic answer per "
                               f"{days} days to mail we did not ask for "
                               "(RFC 3834); not answered", answer_to=answer_to)
        return None

    def _context(self, thread: Thread) -> dict[str, Any]:
        s = self.site.settings.site
        authority = self.site.rules.authorities.get(thread.authority)
        law = self.site.rules.laws.get(thread.law)
        return {"site_name": s.name, "site_url": s.url, "authority": authority, "law": law,
                "title": thread.title, "body": thread.body, "citizen_name": thread.citizen_name,
                "thread_id": thread.id, "due_date": thread.due_date,
                "request_address": self.request_address(thread)}

    def foi_subject(self, thread: Thread) -> str:
        """The subject of mail to the authority: the FOI one, or a fault report's."""
        return self.site.thread_subject(thread)

    def request_address(self, thread: Thread) -> str:
        return self.site.request_address(thread)

    def reply_address(self, thread: Thread) -> str:
        return self.site.reply_address(thread)

    # -- a citizen starts a request ----------------------------------------------------------
    def _new_request(self, c: "StepContext") -> Outcome:
        pm = c.pm
        assert c.addr is not None
        authority = self.site.rules.authorities[c.addr.slug or ""]
        no = self._no_answer(c)
        if no is not None:
            return self._queue(c, *no)
        citizen = pm.reply_to[0] if pm.reply_to else pm.from_addr
        if not citizen or A.is_our_domain(citizen, self.domain):
            return self._queue(c, "no_sender", "new request without a usable sender address")
        refused = self._refuse_to_answer(c, citizen)
        if refused is not None:
            return refused
        body = pm.text.strip()
        title = " ".join(pm.subject.split())[:200]
        if not body or not title:
            return self._refuse_request(c, authority, citizen, (
                self.site._("the email had no subject (the title of the request)") if not title
                else self.site._("the email had no text")))
        law = self.site.rules.law_for(authority)
        thread_id = c.tx.create_thread(
            kind="foi", state="awaiting_confirmation", authority=authority.slug, law=law.id,
            title=title, body=body, citizen_email=citizen.lower(),
            citizen_name=pm.from_name or citizen.split("@")[0],
            request_token=A.new_token(), reply_token=A.new_token(), confirm_token=A.new_token())
        thread = c.tx.thread(thread_id)
        assert thread is not None and thread.confirm_token
        self._store_in(c, thread_id, "draft", "authority_address",
                       {"address": c.step.key, "authority": authority.slug})
        confirm = A.confirm_address(thread.confirm_token, self.domain)
        out = Outgoing(
            from_addr=confirm, from_name=self.site.settings.site.name, reply_to=confirm,
            to_addr=citizen, to_name=thread.citizen_name, domain=self.domain,
            subject=self.site._("Please confirm your request: {title}", title=title),
            text=render(self.site.templates, "mail/confirm.txt", **self._context(thread)),
            in_reply_to=pm.message_id, references=[pm.message_id or ""], automatic=True,
            message_id=new_message_id(self.domain, f"confirm{thread_id}"))
        self._send(c, out, thread_id=thread_id, kind="confirmation",
                   mail_from=self.site.settings.outbound.bounce_address)
        return Outcome(c.step.key, "new_request", thread_id)

    def _refuse_request(self, c: "StepContext", authority: Authority, citizen: str,
                        problem: str) -> Outcome:
        """Tell the citizen why nothing was started, as Alaveteli's form would."""
        s = self.site.settings.site
        text = render(self.site.templates, "mail/request_problem.txt", site_name=s.name,
                      site_url=s.url, authority=authority, problem=problem,
                      citizen_name=c.pm.from_name,
                      authority_address=f"{authority.slug}@{self.domain}")
        out = Outgoing(from_addr=f"{authority.slug}@{self.domain}", from_name=s.name,
                       to_addr=citizen, to_name=c.pm.from_name, domain=self.domain,
                       subject=self.site._("Your request could not be started: {problem}",
                                           problem=problem),
                       text=text, automatic=True, in_reply_to=c.pm.message_id,
                       references=[c.pm.message_id or ""])
        self._send(c, out, thread_id=None, kind="request_problem",
                   mail_from=self.site.settings.outbound.bounce_address)
        return Outcome(c.step.key, "refused:empty_request", None, {"problem": problem})

    # -- she confirms: the request goes out --------------------------------------------------
    def _confirmation(self, c: "StepContext") -> Outcome:
        assert c.addr is not None
        thread = c.tx.thread_by_confirm_token(c.addr.token or "")
        if thread is None or not A.token_matches(c.addr.token, thread.confirm_token or ""):
            return self._queue(c, "unknown_confirmation",
                               "reply to a confirmation address that is unknown or already used")
        if c.cls.automatic:
            # An out-of-office must never confirm a request on the citizen's behalf.
            self._store_in(c, thread.id, c.cls.kind.value, "confirm_address",
                           {"address": c.step.key})
            return Outcome(c.step.key, f"ignored:{c.cls.kind.value}", thread.id)
        self._store_in(c, thread.id, "confirmation", "confirm_address", {"address": c.step.key})
        return self._send_request(c, thread)

    def _send_request(self, c: "StepContext", thread: Thread) -> Outcome:
        authority = self.site.rules.authorities.get(thread.authority)
        now = utcnow()
        contact = (self.reports.contact(thread, c.tx.report(thread.id))
                   if thread.kind == "report" else authority.contact if authority else None)
        if authority is None or contact is None:
            c.tx.update_thread(thread.id, state="awaiting_address", confirm_token=None,
                               confirmed_at=now)
            return self._queue(c, "authority_without_address",
                               f"confirmed request to {thread.authority}, which has no address",
                               thread_id=thread.id)
        why = self._premoderate(c.tx, thread)
        if why:
            c.tx.update_thread(thread.id, state="awaiting_approval", confirm_token=None,
                               confirmed_at=now)
            return self._queue(c, "approval", f"new request awaiting approval ({why})",
                               thread_id=thread.id)
        c.tx.update_thread(thread.id, confirm_token=None, confirmed_at=now)
        self.dispatch_request(c.tx, c.result, thread.id, actor="citizen")
        return Outcome(c.step.key, "report_sent" if thread.kind == "report" else "request_sent",
                       thread.id)

    def _premoderate(self, tx: Tx, thread: Thread) -> str | None:
        """Why this request must wait for an admin before it goes out, if it must."""
        m = self.site.settings.moderation
        if m.new_requests == "premoderate":
            return "the site pre-moderates new requests"
        if m.first_time_citizens == "hold" and not any(
                t.sent_at is not None for t in tx.threads_of_citizen(thread.citizen_email)
                if t.id != thread.id):
            return "the citizen's first request"
        return None

    def dispatch_request(self, tx: Tx, result: Result, thread_id: int, *, actor: str) -> None:
        """Send a confirmed (and, where the site pre-moderates, approved) request and start
        its statutory clock. A fault report goes its own way (no law, no clock)."""
        thread = tx.thread(thread_id)
        assert thread is not None
        if thread.kind == "report":
            self.reports.dispatch(tx, result, thread_id, actor=actor)
            return
        authority = self.site.rules.authorities[thread.authority]
        assert authority.contact is not None
        now = utcnow()
        tx.update_thread(thread.id, state="waiting_response", sent_at=now,
                         delivery_status="queued")
        thread = self.clock.start(tx, thread.id, now.date(), actor=actor,
                                  why="the request was sent")
        req_addr = self.request_address(thread)
        out = Outgoing(
            from_addr=req_addr, from_name=thread.citizen_name, to_addr=authority.contact,
            to_name=authority.name, domain=self.domain,
            subject=self.foi_subject(thread),
            text=render(self.site.templates, "mail/request.txt", **self._context(thread)),
            message_id=new_message_id(self.domain, f"foi{thread.id}"))
        self._send_with(tx, result, out, thread_id=thread.id, kind="request", mail_from=req_addr)

    # -- the authority writes --------------------------------------------------------------
    def _duplicate_flags(self, c: "StepContext", thread_id: int) -> list[str] | None:
        """None: this very message is already on the thread; else flags to store it with."""
        if not c.pm.message_id:
            return []
        same = c.tx.thread_messages_with_id(thread_id, c.pm.message_id)
        if any(m.raw_sha256 == c.sha for m in same):
            return None
        return ["same_message_id_different_body"] if same else []

    def _authority_mail(self, c: "StepContext") -> Outcome:
        thread = c.tx.thread(c.step.thread_id or 0)
        assert thread is not None
        key = c.step.key
        if thread.state in ("awaiting_confirmation", "awaiting_approval", "not_approved") or (
                thread.kind == "report" and thread.state in REPORT_NOT_SENT):
            return self._queue(c, "not_sent", "mail to a request that has not been sent yet",
                               thread_id=thread.id)
        flags = self._duplicate_flags(c, thread.id)
        if flags is None:
            return Outcome(key, "duplicate", thread.id)
        method, detail = c.step.match_method, c.step.match_detail
        kind = c.cls.kind
        if kind is Kind.BOUNCE:
            self._store_in(c, thread.id, "bounce", method, detail, flags)
            if c.cls.permanent:
                c.tx.update_thread(thread.id, delivery_status="failed",
                                   delivery_detail=c.cls.reason)
                return self._queue(c, "bounce", f"permanent bounce of a request: {c.cls.reason}",
                                   thread_id=thread.id)
            return Outcome(key, "bounce", thread.id)
        if kind is Kind.AUTO_REPLY:
            self._store_in(c, thread.id, "auto_reply", method, detail, flags)
            return Outcome(key, "auto_reply", thread.id)
        if kind is Kind.SPAM:
            return self._queue(c, "spam", c.cls.reason, thread_id=thread.id)
        if c.step.hold:
            # Claims to be the authority and fails authentication: kept on the thread, hidden,
            # and nothing else happens (no forward, no clock, no learned sender) until an
            # admin approves it (moderation.approve, which then does all of that once).
            pk = self._store_in(c, thread.id, "response", method, detail,
                                [*flags, "held", "unauthenticated"])
            c.tx.set_message_hidden(pk, True)
            return self._queue(c, "unauthenticated",
                               f"a reply claiming to be {thread.authority} is held: "
                               f"{c.step.hold}"[:400], thread_id=thread.id, message_pk=pk)
        if self.site.settings.moderation.authority_replies == "hold":
            pk = self._store_in(c, thread.id, "response", method, detail, [*flags, "held"])
            c.tx.set_message_hidden(pk, True)
            return self._queue(c, "held_reply", "the site holds authority replies for review",
                               thread_id=thread.id, message_pk=pk)
        pk = self._store_in(c, thread.id, "response", method, detail, flags)
        learned = self.accept_response(c, thread, pk)
        return Outcome(key, "response", thread.id, {"learned": learned} if learned else {})

    def accept_response(self, c: "StepContext", thread: Thread, pk: int) -> list[str]:
        """A response goes on the record: the clock notes it, senders are learned, and the
        citizen gets it (also when an admin releases a held reply)."""
        self.clock.response_arrived(c.tx, thread, pk, utcnow().date())
        learned = self._learn_senders(c, thread)
        self._forward(c, thread, pk)
        return learned

    def _learn_senders(self, c: "StepContext", thread: Thread) -> list[str]:
        """Remember who answers for the authority, so later mail from them is recognised.

        Only addresses at a domain the authority already writes from are learned (an
        officer's new address, a case-work Reply-To), never a no-reply address, and only
        from a person's reply matched by strong evidence.
        """
        if self.site.rules.authorities.get(thread.authority) is None:
            return []
        known = StoreLookup(c.tx, self.site.rules).known_senders(thread.authority)
        domains = {a.rpartition("@")[2] for a in known}
        learned = []
        for addr, is_reply_to in [(c.pm.from_addr, False), *[(r, True) for r in c.pm.reply_to]]:
            if (not addr or NO_REPLY.match(addr) or A.is_our_domain(addr, self.domain)
                    or (domains and addr.rpartition("@")[2] not in domains)):
                continue
            if c.tx.learn_sender(thread.authority, addr, reply_to=is_reply_to, thread_id=thread.id):
                learned.append(addr)
        return learned

    def _forward(self, c: "StepContext", thread: Thread, pk: int) -> None:
        """The citizen gets the reply: queued here, in the transaction that stores it (never
        lost nor doubled), and composed, signed and sent by the outbox sender
        (`compose_forward`), which the processor runs right after this message's batch.
        Signing is about a third of a message's CPU: it is the notify stage's, not the
        store's."""
        c.result.outbox_ids.append(queue_forward(
            c.tx, pk, thread_id=thread.id, rcpt=thread.citizen_email,
            mail_from=self.site.settings.outbound.bounce_address))

    def compose_forward(self, tx: Tx, row: OutboxRow) -> int:
        """Compose, sign and store the forward an outbox row queued with `queue_forward`;
        returns the forward's message pk (`deliver_due` calls this in its claim).

        The forwarded message is parsed again from its stored bytes (its attachments go with
        it); the letter is made from the thread as it is now. It is sent whatever happened to
        the thread in between (hidden from the archive, withdrawn, closed, the message hidden
        by a moderator): the reply reached the citizen's request before that, and hiding is
        about publication, not about the requester's own mail."""
        src = tx.message(row.message_pk)
        thread = tx.thread(row.thread_id or 0)
        if src is None or thread is None:
            raise MailflowError(f"outbox {row.id}: no message {row.message_pk} on thread "
                                f"{row.thread_id} to forward")
        pm = parse(tx.get_raw(src.raw_sha256))
        authority = self.site.rules.authorities.get(thread.authority)
        name = authority.name if authority else thread.authority
        reply = self.reply_address(thread)
        from_line = f"{pm.from_name} <{pm.from_addr}>" if pm.from_name else pm.from_addr
        template = "mail/report_forward.txt" if thread.kind == "report" else "mail/forward.txt"
        text = render(self.site.templates, template, **self._context(thread),
                      from_line=from_line, subject=pm.subject,
                      date=(pm.date or src.created_at).strftime("%-d %B %Y %H:%M %Z"),
                      text=pm.text.strip(), attachment_count=len(pm.attachments))
        subject = pm.subject if pm.subject else self.foi_subject(thread)
        out = Outgoing(
            from_addr=reply, from_name=f"{name} via {self.site.settings.site.name}",
            reply_to=reply, to_addr=row.rcpt, to_name=thread.citizen_name,
            domain=self.domain, subject=subject, text=text, automatic=True,
            attachments=list(pm.attachments),
            message_id=new_message_id(self.domain, f"fwd{thread.id}"))
        del pm
        return store_message(tx, self.site.signer, out, thread_id=thread.id, kind="forward")

    # -- the citizen writes back ---------------------------------------------------------------
    def _citizen_mail(self, c: "StepContext") -> Outcome:
        thread = c.tx.thread(c.step.thread_id or 0)
        assert thread is not None
        key = c.step.key
        flags = self._duplicate_flags(c, thread.id)
        if flags is None:
            return Outcome(key, "duplicate", thread.id)
        method, detail = c.step.match_method, c.step.match_detail
        if c.cls.automatic:
            # The citizen's own out-of-office must never reach the authority.
            self._store_in(c, thread.id, f"citizen_{c.cls.kind.value}", method, detail, flags)
            return Outcome(key, f"ignored:{c.cls.kind.value}", thread.id)
        senders = {c.pm.from_addr, *c.pm.reply_to}
        if thread.citizen_email not in senders:
            return self._queue(c, "citizen_mismatch",
                               "mail to a citizen reply address from someone else",
                               thread_id=thread.id)
        if thread.kind == "report":
            return self.reports.citizen_mail(c, thread, flags)
        if thread.state in ("awaiting_confirmation", "awaiting_address", "awaiting_approval",
                            "not_approved"):
            return self._queue(c, "not_sent", "follow-up to a request that has not been sent",
                               thread_id=thread.id)
        command = parse_command(c.pm.text)
        if command is not None:
            self._store_in(c, thread.id, "citizen_command", method, detail, flags)
            return self._command(c, thread, command)
        self._store_in(c, thread.id, "followup_in", method, detail, flags)
        self._followup(c, thread)
        if thread.state == "waiting_clarification":
            # The clarification the authority asked for: the clock starts again from today.
            c.tx.update_thread(thread.id, state="waiting_response")
            self.clock.start(c.tx, thread.id, utcnow().date(), actor="citizen",
                             why="the citizen gave the clarification asked for")
        return Outcome(key, "followup", thread.id)

    def _command(self, c: "StepContext", thread: Thread, command: str) -> Outcome:
        """A citizen's one-line command: say how it ended, pause or move the clock, review."""
        tx, today = c.tx, utcnow().date()
        law = self.site.rules.laws[thread.law]
        note = ""
        if command == "withdraw":
            tx.update_thread(thread.id, state="user_withdrawn", awaiting_description=False)
            self._letter(c, thread, "mail/withdrawal.txt", "Withdrawn: ")
        elif command == "clarification":
            tx.update_thread(thread.id, state="waiting_clarification")
            note = "The clock stops until you send your clarification by replying."
        elif command == "extension":
            ext = law.extensions[0] if law.extensions else None
            if ext is None or thread.state not in ("waiting_response", "internal_review"):
                note = f"{law.name} allows no extension here, so the due date stays."
            else:
                self.clock.start(tx, thread.id, thread.clock_start or today, actor="citizen",
                                 why=f"the authority claimed an extension: {ext.description}",
                                 extension=ext.id)
        elif command == "internal_review":
            tx.update_thread(thread.id, state="internal_review", awaiting_description=False)
            self.clock.start(tx, thread.id, today, actor="citizen",
                             why="the citizen asked for an internal review")
            self._letter(c, thread, "mail/internal_review.txt", "Internal review of ",
                         text="\n".join(_after_first_line(c.pm.text)))
        elif command == "waiting_response" and thread.state == "internal_review":
            tx.update_thread(thread.id, awaiting_description=False)   # the review clock runs on
        else:
            tx.update_thread(thread.id, state=command, awaiting_description=False)
        tx.add_event(thread.id, "citizen", "state", {"command": command})
        thread = tx.thread(thread.id)
        assert thread is not None
        self._ack(c, thread, note)
        return Outcome(c.step.key, f"command:{command}", thread.id)

    def _letter(self, c: "StepContext", thread: Thread, template: str, prefix: str,
                text: str = "") -> None:
        """A templated letter from the citizen to the authority, from the request address."""
        authority = self.site.rules.authorities.get(thread.authority)
        if authority is None or authority.contact is None:
            return
        thread = c.tx.thread(thread.id) or thread
        req = self.request_address(thread)
        out = Outgoing(from_addr=req, from_name=thread.citizen_name, to_addr=authority.contact,
                       to_name=authority.name, domain=self.domain,
                       subject=self.site._(prefix) + self.foi_subject(thread),
                       text=render(self.site.templates, template, **self._context(thread),
                                   text=text),
                       message_id=new_message_id(self.domain, f"foi{thread.id}"))
        self._send(c, out, thread_id=thread.id, kind="followup", mail_from=req)

    def notify_citizen(self, tx: Tx, result: Result, thread: Thread, template: str,
                       subject: str, **context: Any) -> None:
        """A notice from the site to the citizen, from her thread's reply address."""
        reply = self.reply_address(thread)
        out = Outgoing(from_addr=reply, from_name=self.site.settings.site.name, reply_to=reply,
                       to_addr=thread.citizen_email, to_name=thread.citizen_name,
                       domain=self.domain, automatic=True, subject=subject,
                       text=render(self.site.templates, template, **self._context(thread),
                                   **context),
                       message_id=new_message_id(self.domain, f"note{thread.id}"))
        self._send_with(tx, result, out, thread_id=thread.id, kind="notice",
                        mail_from=self.site.settings.outbound.bounce_address)

    def _ack(self, c: "StepContext", thread: Thread, note: str) -> None:
        words = self.site._(STATE_WORDS.get(thread.state, thread.state))
        text = render(self.site.templates, "mail/state_changed.txt", **self._context(thread),
                      state=thread.state, state_words=words)
        if note:
            text = text.replace("\n-- \n", f"\n{note}\n\n-- \n", 1)
        reply = self.reply_address(thread)
        out = Outgoing(from_addr=reply, from_name=self.site.settings.site.name, reply_to=reply,
                       to_addr=thread.citizen_email, to_name=thread.citizen_name,
                       domain=self.domain, automatic=True, in_reply_to=c.pm.message_id,
                       subject=self.site._("Your request is now {state}: {title}", state=words,
                                           title=thread.title), text=text,
                       message_id=new_message_id(self.domain, f"ack{thread.id}"))
        self._send(c, out, thread_id=thread.id, kind="state_changed",
                   mail_from=self.site.settings.outbound.bounce_address)

    def _followup(self, c: "StepContext", thread: Thread) -> None:
        authority = self.site.rules.authorities.get(thread.authority)
        last = c.tx.last_incoming(thread.id, "response")
        to = authority.contact if authority else None
        if last is not None:
            pm_last_reply_to = None
            raw_last = c.tx.get_raw(last.raw_sha256)
            try:   # only its Reply-To is wanted: its header section is enough to parse
                pm_last_reply_to = parse(_header_section(raw_last)).reply_to
            except ParseError:
                pass
            to = (pm_last_reply_to[0] if pm_last_reply_to else None) or last.from_addr or to
        if to is None:
            c.tx.add_queue_item("authority_without_address", "follow-up with nowhere to go",
                                thread_id=thread.id, raw_sha256=c.sha)
            return
        text = self._private(thread, c.pm.text.strip())
        req_addr = self.request_address(thread)
        refs = [m.message_id for m in c.tx.messages(thread.id)
                if m.message_id and m.kind in ("request", "response", "followup")]
        out = Outgoing(
            from_addr=req_addr, from_name=thread.citizen_name, to_addr=to,
            to_name=authority.name if authority else "", domain=self.domain,
            subject="Re: " + self.foi_subject(thread),
            text=render(self.site.templates,
                        "mail/report_followup.txt" if thread.kind == "report"
                        else "mail/followup.txt", **self._context(thread), text=text),
            in_reply_to=refs[-1] if refs else None, references=refs,
            attachments=list(c.pm.attachments),
            message_id=new_message_id(self.domain, f"foi{thread.id}"))
        self._send(c, out, thread_id=thread.id, kind="followup", mail_from=req_addr)

    def _private(self, thread: Thread, text: str) -> str:
        """Take the citizen's address and the citizen-side secret out of what goes to the authority.

        Mail clients quote the message being answered ("On ..., X <reply-1-abc@...> wrote:"):
        passed on as is, that would hand the authority the address that lets it write as the
        citizen, and the citizen's own address with it.
        """
        for secret, instead in ((self.reply_address(thread), self.request_address(thread)),
                                (thread.citizen_email, "[requester's email address]")):
            text = re.sub(re.escape(secret), instead, text, flags=re.I)
        return text


_EOL = rb"(?:\r\n|\n|\r(?!\n))"
_EMPTY_LINE = re.compile(_EOL + _EOL)


def _header_section(raw: bytes) -> bytes:
    """A message up to and including its first empty line (any of CRLF, LF or CR, as the
    parser reads line ends), or the whole message when there is none: a prefix that holds
    every header the parser would read from the whole message."""
    m = _EMPTY_LINE.search(raw)
    return raw[:m.end()] if m else raw


def _after_first_line(text: str) -> list[str]:
    from mailflow.core.commands import own_text
    return own_text(text)[1:]


class Gatekeeper:
    """Applies each thread's "who may still write" policy at the door (SMTP RCPT)."""

    def __init__(self, site: Site):
        self.site = site

    def refusal(self, addr: OurAddress, sender: str) -> str | None:
        """A refusal, or None to accept. Fails open: when the store cannot answer, the mail
        is accepted into the spool, and the pipeline applies the same policy (by queueing)
        once the store is back. Losing mail would be worse than queueing it."""
        try:
            return self._refusal(addr, sender)
        except Exception:  # noqa: BLE001
            log.warning("gatekeeper could not read the store; accepting %s", addr.address,
                        exc_info=True)
            return None

    def blocked(self, sender: str) -> bool:
        try:
            with self.site.store.read() as tx:
                return tx.is_blocked(sender)
        except Exception:  # noqa: BLE001 - fail open, as for the thread policy
            return False

    def _refusal(self, addr: OurAddress, sender: str) -> str | None:
        with self.site.store.read() as tx:
            thread = tx.thread(addr.thread_id or 0)
            if thread is None:
                return None  # accepted, and the queue will say why it matched nothing
            token = thread.request_token if addr.kind is AddressKind.REQUEST else thread.reply_token
            if not A.token_matches(addr.token, token):
                return None
            known = StoreLookup(tx, self.site.rules).known_senders(thread.authority)
        return gate(thread.allow, authority_side=addr.kind is AddressKind.REQUEST,
                    sender=sender, known_senders=known)


@dataclass
class _Prepared:
    """A message read and checked outside the transaction, ready to be applied in one."""
    raw: bytes | None          # None once `_apply` has stored it
    envelope: Envelope
    pm: ParsedMessage | None
    parse_error: str
    auth: Authentication | None
    threads: tuple[int, ...] = ()   # the threads its envelope recipients name (unverified)


@dataclass
class Step:
    """One thing to do with a message: its idempotency key, the action and why."""
    key: str                   # the (raw bytes, key) pair is done at most once
    action: str                # authority | confirm | authority_mail | citizen_mail | queue | role...
    addr: OurAddress | None = None
    thread_id: int | None = None
    match_method: str | None = None
    match_detail: dict[str, Any] | None = None
    queue_reason: str | None = None
    why: str = ""
    decision: Decision | None = None
    hold: str | None = None    # authority mail failing authentication: why it waits for an admin


@dataclass
class Plan:
    classification: Classification
    recipients: list[str] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    decision: Decision | None = None
    reasons: list[str] = field(default_factory=list)

    def add(self, step: Step) -> None:
        self.steps.append(step)


@dataclass
class StepContext:
    tx: Tx
    pm: ParsedMessage
    cls: Classification
    addr: OurAddress | None
    sha: str
    envelope: Envelope
    result: Result
    step: Step
    auth: Authentication | None = None     # what the DKIM/SPF/DMARC checks found
    authentication: str | None = None      # the same, as our Authentication-Results value
    approved: bool = False                 # an admin said to answer it anyway


def recent_mail_to(tx: Tx, address: str, since: datetime) -> datetime | None:
    """When mailflow last queued mail to `address` (any case) after `since`, or None.

    The outbox is the record: every message mailflow writes has a row there, and rows are
    kept. (A candidate for `Tx`; here because repository.py is not this change's to edit.)
    """
    from sqlalchemy import func, select

    from mailflow.store.tables import outbox
    q = select(func.max(outbox.c.created_at)).where(
        func.lower(outbox.c.rcpt) == address.strip().lower(), outbox.c.created_at >= since)
    found = tx.c.execute(q).scalar()
    if isinstance(found, datetime) and found.tzinfo is None:
        found = found.replace(tzinfo=timezone.utc)
    return found
