"""What an admin can do, as application functions: the CLI calls these, and so could a web page
or an email interface later. Each action checks the state it needs, does its work in one
transaction, and writes who did what and why to the audit log.

Deciding a queue item is a conditional update (open → decided), so two admins deciding the same
item at once cannot both succeed: the second gets a clear error naming the first decision.
"""
from __future__ import annotations

import getpass
import os
from dataclasses import dataclass
from typing import Any

from mailflow.core import addresses as A
from mailflow.core.addresses import AddressKind
from mailflow.core.commands import STATE_WORDS
from mailflow.core.geo import Point
from mailflow.core.reminders import FINAL
from mailflow.errors import MailflowError, NotFound
from mailflow.mail.parse import ParseError, parse
from mailflow.outbound.compose import Outgoing
from mailflow.pipeline import NO_REPLY, Pipeline, Result, Step, StepContext
from mailflow.site import Site
from mailflow.spool import Envelope
from mailflow.store.repository import QueueItem, Tx
from mailflow.templating import render

STATES = ("waiting_response", "waiting_clarification", "internal_review", "successful",
          "partially_successful", "rejected", "not_held", "user_withdrawn")
# A fault report, once sent: what the reporter's one-line replies can set (mailflow/reports.py).
REPORT_STATES = ("open", "fixed", "user_withdrawn")


def default_actor() -> str:
    """Who is acting: --as NAME, else the operating-system user (over SSH, a real person)."""
    try:
        return os.environ.get("MAILFLOW_ADMIN") or getpass.getuser()
    except (KeyError, OSError):
        return "admin"


@dataclass
class Outcome:
    message: str
    outbox_ids: list[int]


class Moderation:
    def __init__(self, site: Site, actor: str | None = None):
        self.site = site
        self.actor = actor or default_actor()

    # -- the queue ------------------------------------------------------------------------------
    def _open_item(self, tx: Tx, item_id: int) -> QueueItem:
        item = tx.queue_item(item_id)
        if item is None:
            near = [q.id for q in tx.queue()][-5:]
            raise NotFound(f"no queue item {item_id}" + (
                f"; open items: {', '.join(map(str, near))}" if near else "; the queue is empty"))
        if item.state != "open":
            raise MailflowError(f"queue item {item_id} was already decided by "
                                f"{item.decided_by or 'someone'} at "
                                f"{item.decided_at:%Y-%m-%d %H:%M}: {item.decision}")
        return item

    def _decide(self, tx: Tx, item: QueueItem, decision: str, *, reason: str | None,
                action: str, thread_id: int | None = None, **detail: Any) -> None:
        if not tx.decide(item.id, decision, self.actor):
            raise MailflowError(f"queue item {item.id} was decided by someone else just now")
        tx.audit(self.actor, action, thread_id=thread_id or item.thread_id,
                 target=f"queue:{item.id}", reason=reason,
                 detail={"decision": decision, "queue_reason": item.reason, **detail})

    def assign(self, item_id: int, thread_id: int, *, reason: str | None = None,
               side: str = "authority") -> Outcome:
        """Put a queued message on a thread, as if it had matched; it is then forwarded like
        any reply (or sent on to the authority, for the citizen's side)."""
        pipeline = Pipeline(self.site)
        result = Result()
        with self.site.store.tx() as tx:
            item = self._open_item(tx, item_id)
            thread = tx.thread(thread_id)
            if thread is None:
                raise tx.no_thread(thread_id)
            if item.raw_sha256 is None:
                raise MailflowError(f"queue item {item_id} has no message to assign")
            raw = tx.get_raw(item.raw_sha256)
            try:
                pm = parse(raw)
            except ParseError as e:
                raise MailflowError(f"queue item {item_id} cannot be parsed ({e}); "
                                    "it can only be rejected") from None
            env_json = (item.detail or {}).get("envelope") or {}
            envelope = Envelope.from_json(env_json) if env_json else Envelope(
                mail_from=pm.from_addr, rcpt_tos=[], via="unknown")
            kind = AddressKind.REQUEST if side == "authority" else AddressKind.REPLY
            step = Step(f"{kind.value}-{thread_id}", f"{side}_mail", thread_id=thread_id,
                        match_method="admin",
                        match_detail={"by": self.actor, "queue_item": item_id, "reason": reason})
            c = StepContext(tx=tx, pm=pm, cls=pipeline.classify(pm, envelope), addr=None,
                            sha=item.raw_sha256, envelope=envelope, result=result, step=step,
                            authentication=(item.detail or {}).get("authentication"))
            outcome = pipeline.execute(c)
            self._decide(tx, item, f"assigned to thread {thread_id}: {outcome.outcome}",
                         reason=reason, action="queue_assign", thread_id=thread_id)
        return Outcome(f"item {item_id} put on thread {thread_id} ({outcome.outcome})",
                       result.outbox_ids)

    def reject(self, item_id: int, *, reason: str, notify: bool = False) -> Outcome:
        """Decide an item by not acting on it. A pre-moderated request is not sent; with
        `notify`, its citizen is told why (a person, so never automatic mail)."""
        pipeline, result = Pipeline(self.site), Result()
        with self.site.store.tx() as tx:
            item = self._open_item(tx, item_id)
            if item.reason == "approval" and item.thread_id is not None:
                tx.update_thread(item.thread_id, state="not_approved")
                if notify:
                    thread = tx.thread(item.thread_id)
                    assert thread is not None
                    pipeline.notify_citizen(tx, result, thread, "mail/request_rejected.txt",
                                            self.site._("Your request was not sent: {title}",
                                                        title=thread.title), reason=reason)
            elif notify:
                self._note_to_sender(tx, pipeline, result, item, reason)
            self._decide(tx, item, f"rejected: {reason}", reason=reason, action="queue_reject",
                         notified=notify)
        return Outcome(f"item {item_id} rejected" + (" and the citizen told" if notify else ""),
                       result.outbox_ids)

    def spam(self, item_id: int, *, reason: str | None = None, block: str | None = None) -> Outcome:
        """Decide an item as spam; `block` ("sender" or "domain") refuses its sender from now on
        (at RCPT over SMTP; dropped, bytes kept, from ingest and IMAP)."""
        blocked = None
        with self.site.store.tx() as tx:
            item = self._open_item(tx, item_id)
            if block:
                sender = self._sender_of(tx, item)
                if not sender:
                    raise MailflowError(f"queue item {item_id} has no sender address to block")
                if block == "domain" and A.is_our_domain(sender, self.site.domain):
                    raise MailflowError("refusing to block the site's own domain")
                blocked = sender if block == "sender" else "@" + sender.rpartition("@")[2]
                tx.block(blocked, self.actor, reason)
            self._decide(tx, item, "spam" + (f"; blocked {blocked}" if blocked else ""),
                         reason=reason, action="queue_spam", blocked=blocked)
        return Outcome(f"item {item_id} marked as spam" + (f"; {blocked} blocked" if blocked else ""),
                       [])

    def _note_to_sender(self, tx: Tx, pipeline: Pipeline, result: Result, item: QueueItem,
                        reason: str) -> None:
        """Tell the sender of a rejected message why — never automatic mail (RFC 3834)."""
        if item.raw_sha256 is None:
            raise MailflowError(f"queue item {item.id} has no message, so no sender to tell")
        try:
            pm = parse(tx.get_raw(item.raw_sha256))
        except ParseError:
            raise MailflowError(f"queue item {item.id} cannot be parsed; no sender to tell") from None
        env = Envelope.from_json((item.detail or {}).get("envelope") or {
            "mail_from": pm.from_addr, "rcpt_tos": [], "via": "unknown"})
        cls = pipeline.classify(pm, env)
        to = pm.reply_to[0] if pm.reply_to else pm.from_addr
        if cls.automatic or not to or env.mail_from == "" or NO_REPLY.match(to):
            raise MailflowError(f"queue item {item.id} is automatic mail ({cls.reason}) or has no "
                                "address to answer: no note is sent to automatic mail")
        s = self.site.settings
        out = Outgoing(from_addr=f"postmaster@{self.site.domain}", from_name=s.site.name,
                       to_addr=to, to_name=pm.from_name, domain=self.site.domain, automatic=True,
                       subject=self.site._("Your message was not accepted: {subject}",
                                           subject=pm.subject),
                       in_reply_to=pm.message_id, references=[pm.message_id or ""],
                       text=render(self.site.templates, "mail/message_rejected.txt",
                                   site_name=s.site.name, site_url=s.site.url,
                                   sender_name=pm.from_name, subject=pm.subject, reason=reason))
        pipeline._send_with(tx, result, out, thread_id=item.thread_id, kind="notice",
                            mail_from=s.outbound.bounce_address)

    def _sender_of(self, tx: Tx, item: QueueItem) -> str:
        env = (item.detail or {}).get("envelope") or {}
        if item.raw_sha256 is not None:
            try:
                frm = parse(tx.get_raw(item.raw_sha256)).from_addr
            except ParseError:
                frm = ""
            if frm:
                return frm
        return (env.get("mail_from") or "").lower()

    def approve(self, item_id: int, *, reason: str | None = None,
                authority: str | None = None) -> Outcome:
        """Let an item through: a pre-moderated request is sent; a held reply (held for review,
        or because it claimed to be the authority and failed authentication) is published,
        forwarded and takes effect, once; a new request or report that was not answered (its
        answer would not have gone to the envelope sender, or the address had an automatic
        answer this week) is answered now; a fault report no single authority handles goes to
        `authority` (or, without it, is routed again by the rules as they are now); a message
        whose processing failed is put back into the spool to be processed again; anything
        else is accepted as it is (a postmaster message read)."""
        pipeline, result = Pipeline(self.site), Result()
        with self.site.store.tx() as tx:
            item = self._open_item(tx, item_id)
            what = "approved"
            if authority is not None and item.reason != "report_routing":
                raise MailflowError(f"queue item {item_id} is {item.reason!r}; --authority is "
                                    "for 'report_routing' items only")
            if item.reason == "report_routing" and item.thread_id is not None:
                what = "approved: " + self._route_report(tx, pipeline, result, item, authority)
            elif item.reason == "approval" and item.thread_id is not None:
                pipeline.dispatch_request(tx, result, item.thread_id, actor=f"admin:{self.actor}")
                what = "approved: the request was sent"
            elif item.reason in ("held_reply", "unauthenticated") and item.thread_id is not None:
                pk = (item.detail or {}).get("message_pk")
                msg = tx.message(int(pk)) if pk is not None else None
                thread = tx.thread(item.thread_id)
                if msg is None or thread is None:
                    raise MailflowError(f"queue item {item_id} names no held message")
                tx.set_message_hidden(msg.id, False)
                pm = parse(tx.get_raw(msg.raw_sha256))
                env = Envelope.from_json((item.detail or {}).get("envelope") or {
                    "mail_from": pm.from_addr, "rcpt_tos": [], "via": "unknown"})
                c = StepContext(tx=tx, pm=pm, cls=pipeline.classify(pm, env), addr=None,
                         sha=msg.raw_sha256, envelope=env, result=result,
                         step=Step(f"request-{thread.id}", "authority_mail", thread_id=thread.id))
                pipeline.accept_response(c, thread, msg.id)
                what = "approved: the reply was published and forwarded"
            elif item.reason in ("sender_mismatch", "rate_limited"):
                what = "approved: " + self._answer_anyway(tx, pipeline, result, item)
            elif item.reason == "processing_failed":
                what = "approved: " + self._process_again(tx, item)
            self._decide(tx, item, what, reason=reason, action="queue_approve")
        return Outcome(f"item {item_id} {what}", result.outbox_ids)

    def _process_again(self, tx: Tx, item: QueueItem) -> str:
        """A message the pipeline gave up on (a bug, since fixed or worked around): back into
        the spool for the daemon to process as if it had just arrived. Its own spool item when
        this host's failed/ has it; otherwise (another host's spool, or cleaned away) the copy
        the queue kept, under its original envelope. Either way storing is idempotent by the
        raw bytes and recipient, so a second copy processed elsewhere is not a duplicate."""
        d = item.detail or {}
        spool, spool_id = self.site.spool, d.get("spool_id")
        where = spool.peek(spool_id) if isinstance(spool_id, str) and spool_id else None
        if where is not None and where[0] == "failed":
            spool.requeue(spool_id)  # type: ignore[arg-type]
            return f"spool item {spool_id} put back for processing"
        if where is not None and where[0] in ("new", "work"):
            return f"spool item {spool_id} is already waiting to be processed ({where[0]}/)"
        if item.raw_sha256 is None:
            raise MailflowError(f"queue item {item.id} kept no copy of its message, and this "
                                f"host's spool has no failed item {spool_id}")
        raw = tx.get_raw(item.raw_sha256)
        env = Envelope.from_json(d.get("envelope") or {"rcpt_tos": [], "via": "unknown"})
        new_id = spool.put(raw, env)
        return f"the kept copy spooled again for processing as {new_id}"

    def requeue(self, spool_id: str, *, reason: str | None = None) -> Outcome:
        """Put a message the pipeline gave up on (the spool's failed/) back for processing,
        once its cause is fixed; the admin queue's item for it, if any, is decided with it."""
        spool = self.site.spool
        where = spool.peek(spool_id)
        if where is None:
            raise NotFound(f"no spool item {spool_id} here"
                           + (f"; failed items: {', '.join(spool.failed()[-5:])}"
                              if spool.failed() else "; none has failed"))
        if where[0] != "failed":
            raise MailflowError(f"spool item {spool_id} is in {where[0]}/, not failed/: "
                                "only a failed item is put back")
        with self.site.store.tx() as tx:
            items = [q for q in tx.queue(reason="processing_failed")
                     if (q.detail or {}).get("spool_id") == spool_id]
            for q in items:
                self._decide(tx, q, "approved: spool item put back for processing",
                             reason=reason, action="queue_approve")
            tx.audit(self.actor, "spool_requeue", target=f"spool:{spool_id}", reason=reason,
                     detail={"errors": where[1].errors[-3:],
                             "queue_items": [q.id for q in items]})
            if not spool.requeue(spool_id):
                raise MailflowError(f"spool item {spool_id} left failed/ just now")
        return Outcome(f"spool item {spool_id} put back for processing"
                       + (f" (queue item {', '.join(str(q.id) for q in items)} decided)"
                          if items else ""), [])

    def _route_report(self, tx: Tx, pipeline: Pipeline, result: Result, item: QueueItem,
                      authority: str | None) -> str:
        """Send a report on that the areas could not place with one authority: to the one a
        person names, or to the one the rules now give (after the areas were corrected). The
        report then goes on as a routed one would: duplicates, confirmation, moderation."""
        assert item.thread_id is not None
        thread, report = tx.thread(item.thread_id), tx.report(item.thread_id)
        rules = self.site.rules.reports
        if thread is None or report is None or rules is None:
            raise MailflowError(f"queue item {item.id} names no report this site can route")
        if thread.state != "awaiting_routing":
            raise MailflowError(f"report {thread.id} is {thread.state}, not awaiting routing")
        if report.lat is None or report.lon is None or report.category is None:
            raise MailflowError(f"report {thread.id} has no place or no category")
        route = rules.route(Point(report.lat, report.lon), report.category)
        candidates = sorted({a.authority for a in route.areas})
        if authority is not None:
            known = self.site.rules.authorities.get(authority)
            if known is None:
                raise MailflowError(
                    f"unknown authority {authority!r}; the areas at this point are "
                    f"{', '.join(candidates) or 'of nobody'} (see `mailflow authority list`)")
            if known.report_contact(report.category) is None:
                raise MailflowError(f"{authority} has no address for {report.category} reports "
                                    "(add one in rules/authorities.toml)")
        elif route.authority is None:
            raise MailflowError(
                f"still no single authority for report {thread.id}: {'; '.join(route.reasons)}."
                f" Name one: --authority SLUG (the areas here: {', '.join(candidates) or 'none'})")
        d = item.detail or {}
        c = self._replay(tx, pipeline, result, item,
                         Step(str(d.get("rcpt") or f"report-{thread.id}"), "report",
                              thread_id=thread.id))
        outcome = pipeline.reports.advance(c, thread.id, authority=authority,
                                           actor=f"admin:{self.actor}")
        chosen = (tx.thread(thread.id) or thread).authority
        return f"routed to {chosen} ({outcome.outcome.removeprefix('report:')})"

    def _answer_anyway(self, tx: Tx, pipeline: Pipeline, result: Result,
                       item: QueueItem) -> str:
        """Carry out a new request or report that was queued instead of answered, as if it
        had just arrived, without the backscatter checks (an admin vouched for it)."""
        d = item.detail or {}
        addr = self.site.check_recipient(str(d.get("rcpt") or "")).address
        if addr is None:
            raise MailflowError(f"queue item {item.id} names no message or address of ours")
        c = self._replay(tx, pipeline, result, item,
                         Step(addr.address, addr.kind.value, addr=addr), addr=addr)
        return pipeline.execute(c).outcome

    def _replay(self, tx: Tx, pipeline: Pipeline, result: Result, item: QueueItem, step: Step,
                *, addr: Any = None) -> StepContext:
        """The queued message as the pipeline first saw it (its envelope and authentication
        results), to be carried out now on an admin's word."""
        d = item.detail or {}
        if item.raw_sha256 is None:
            raise MailflowError(f"queue item {item.id} names no message")
        try:
            pm = parse(tx.get_raw(item.raw_sha256))
        except ParseError as e:
            raise MailflowError(f"queue item {item.id} cannot be parsed ({e})") from None
        env = Envelope.from_json(d.get("envelope") or {
            "mail_from": pm.from_addr, "rcpt_tos": [addr.address] if addr else [],
            "via": "unknown"})
        return StepContext(tx=tx, pm=pm, cls=pipeline.classify(pm, env), addr=addr,
                           sha=item.raw_sha256, envelope=env, result=result, step=step,
                           authentication=d.get("authentication"), approved=True)

    def release(self, item_id: int, *, reason: str | None = None) -> Outcome:
        """Publish an attachment the archive withheld, after a person has checked it."""
        with self.site.store.tx() as tx:
            item = self._open_item(tx, item_id)
            if item.reason != "withheld_attachment" or item.thread_id is None:
                raise MailflowError(f"queue item {item_id} is {item.reason!r}; only withheld "
                                    "attachments can be released")
            d = item.detail or {}
            tx.add_event(item.thread_id, f"admin:{self.actor}", "attachment_released",
                         {"message_id": d.get("message_id"), "n": d.get("n")})
            self._decide(tx, item, "released", reason=reason, action="attachment_release")
        return Outcome(f"item {item_id}: {d.get('filename')} will be published at the next "
                       "archive build", [])

    # -- threads and messages -------------------------------------------------------------------
    def set_state(self, thread_id: int, state: str, *, reason: str | None = None) -> Outcome:
        """Say how a thread stands: an FOI request's outcome, or a fault report fixed, open
        again or withdrawn (as the authority says it is, when the reporter never answers the
        questionnaire). Each kind takes only its own states."""
        if state not in STATES and state not in REPORT_STATES:
            raise MailflowError(f"unknown state {state!r}; allowed: {', '.join(STATES)} "
                                f"(requests), {', '.join(REPORT_STATES)} (reports)")
        with self.site.store.tx() as tx:
            thread = tx.thread(thread_id)
            if thread is None:
                raise tx.no_thread(thread_id)
            allowed = REPORT_STATES if thread.kind == "report" else STATES
            if state not in allowed:
                raise MailflowError(f"thread {thread_id} is a {thread.kind or 'request'}; its "
                                    f"states are {', '.join(allowed)}")
            if thread.state in ("awaiting_confirmation", "awaiting_address") or (
                    thread.kind == "report" and thread.sent_at is None):
                raise MailflowError(f"thread {thread_id} has not been sent ({thread.state})")
            if thread.kind == "report":
                self._report_state(tx, thread.id, thread.state, state)
            tx.update_thread(thread_id, state=state,
                             awaiting_description=False if state in FINAL else
                             thread.awaiting_description)
            tx.audit(self.actor, "thread_state", thread_id=thread_id, target=f"thread:{thread_id}",
                     reason=reason, detail={"from": thread.state, "to": state})
            tx.add_event(thread_id, f"admin:{self.actor}", "state", {"to": state})
        return Outcome(f"thread {thread_id}: {STATE_WORDS.get(state, state)}", [])

    def correct_report(self, thread_id: int, *, category: str | None = None,
                       point: Point | None = None, authority: str | None = None,
                       reason: str | None = None) -> Outcome:
        """Put right what a citizen's report got wrong: its category or its place (as a
        FixMyStreet admin edits a report). What happens next depends on how far it went:

        - not sent and stuck (waiting for details, outside the area, no single authority):
          it goes on from there as if the citizen had said it — routed, confirmed, sent;
        - not sent but waiting for the citizen or a moderator: routed again quietly, so the
          confirmation or approval sends it to the right authority;
        - sent and open: routed again; if that names another authority, or another of the
          same authority's addresses (its street-lighting team, not its roads), the report
          goes there now (from the same report address, photos and all), and its `sent_at` (the
          authority's response time) counts from then; the questionnaire keeps its date. A
          fixed or withdrawn report keeps its authority.

        `authority` stands where the areas give no single one (as `queue approve --authority`).
        Everything is one transaction: a correction that cannot be carried out changes nothing.
        """
        from mailflow.reports import ASKING
        rules = self.site.rules.reports
        if rules is None:
            raise MailflowError("this site takes no fault reports (no rules/categories.toml)")
        if category is not None and category not in rules.categories:
            raise MailflowError(f"unknown category {category!r}; known: "
                                f"{', '.join(sorted(rules.categories))}")
        if authority is not None and self.site.rules.authorities.get(authority) is None:
            raise MailflowError(f"unknown authority {authority!r} (see `mailflow authority list`)")
        pipeline, result = Pipeline(self.site), Result()
        actor = f"admin:{self.actor}"
        with self.site.store.tx() as tx:
            thread, report = tx.thread(thread_id), tx.report(thread_id)
            if thread is None:
                raise tx.no_thread(thread_id)
            if thread.kind != "report" or report is None:
                raise MailflowError(f"thread {thread_id} is a request, not a fault report")
            changes: dict[str, Any] = {}
            if category is not None and category != report.category:
                changes["category"] = category
            if point is not None and (point.lat, point.lon) != (report.lat, report.lon):
                changes.update(lat=point.lat, lon=point.lon, location_source="admin",
                               location_text=f"{point.lat}, {point.lon}")
            if not changes and authority is None:
                raise MailflowError(f"report {thread_id} already has that category and place: "
                                    "nothing to change")
            was = {"category": report.category, "lat": report.lat, "lon": report.lon,
                   "authority": thread.authority or None}
            if changes:
                tx.update_report(thread_id, **changes)
            tx.add_event(thread_id, actor, "report_corrected", {
                "from": {k: was[k] for k in changes if k in was},
                "to": {k: changes[k] for k in changes if k in was}, "reason": reason})
            sent = thread.sent_at is not None
            if thread.state in ASKING or thread.state == "awaiting_routing":
                for q in tx.queue(reason="report_routing"):
                    if q.thread_id == thread_id:
                        self._decide(tx, q, "decided by a correction of the report",
                                     reason=reason, action="queue_approve")
                c = self._as_the_report(tx, pipeline, result, thread)
                outcome = pipeline.reports.advance(c, thread_id, authority=authority,
                                                   actor=actor).outcome
                what = outcome.removeprefix("report:")
            else:
                new = self._reroute(tx, thread_id, authority, actor)
                # Where it went, and where it would go now: another council, or the same
                # council's address for the corrected category (street lights, not roads).
                went = pipeline.reports.contact(thread, report) if sent else None
                goes = pipeline.reports.contact(tx.thread(thread_id) or thread,
                                                tx.report(thread_id))
                if not sent or (new == thread.authority and goes == went):
                    what = (f"now for {new}" if new != thread.authority else
                            f"still for {new}")
                elif thread.state != "open":
                    raise MailflowError(
                        f"report {thread_id} is {thread.state}: it stays with "
                        f"{thread.authority} (the correction would send it to {goes}; reopen "
                        "it first with `mailflow thread state ID open`)")
                else:
                    pipeline.reports.dispatch(tx, result, thread_id, actor=actor)
                    what = (f"sent on to {new} (was {thread.authority})"
                            if new != thread.authority else f"sent on to {goes} (was {went})")
            now = tx.thread(thread_id)
            tx.audit(self.actor, "report_correct", thread_id=thread_id,
                     target=f"thread:{thread_id}", reason=reason,
                     detail={"from": was, "changes": changes, "authority": authority,
                             "result": what, "authority_now": now.authority if now else None})
        return Outcome(f"report {thread_id}: {what}", result.outbox_ids)

    def _reroute(self, tx: Tx, thread_id: int, authority: str | None, actor: str) -> str:
        """Route a report that is past asking by its (corrected) category and place; an
        authority the areas cannot settle must be named."""
        rules = self.site.rules.reports
        report = tx.report(thread_id)
        assert rules is not None and report is not None
        if report.lat is None or report.lon is None or report.category is None:
            raise MailflowError(f"report {thread_id} has no place or no category")
        route = rules.route(Point(report.lat, report.lon), report.category)
        if not route.covered:
            raise MailflowError(f"{report.lat}, {report.lon} is outside every area this site "
                                f"covers: {'; '.join(route.reasons)}")
        chosen = authority or route.authority
        if chosen is None:
            raise MailflowError(
                f"no single authority handles {report.category} there: "
                f"{'; '.join(route.reasons)}. Name one: --authority SLUG (the areas here: "
                f"{', '.join(sorted({a.authority for a in route.areas})) or 'none'})")
        known = self.site.rules.authorities.get(chosen)
        if known is None or known.report_contact(report.category) is None:
            raise MailflowError(f"{chosen} has no address for {report.category} reports "
                                "(add one in rules/authorities.toml)")
        area = next((a for a in route.areas if a.authority == chosen), None)
        tx.update_thread(thread_id, authority=chosen)
        tx.update_report(thread_id, area=area.id if area else None)
        tx.add_event(thread_id, actor, "report_routed",
                     {"authority": chosen, "area": area.id if area else None,
                      "reasons": [*route.reasons,
                                  *([f"{chosen} chosen by {actor}"] if authority else [])]})
        return chosen

    def _as_the_report(self, tx: Tx, pipeline: Pipeline, result: Result,
                       thread: Any) -> StepContext:
        """The report's first message, as the pipeline saw it: what moving the report on
        answers (a question, a confirmation) replies to."""
        first = next((m for m in tx.messages(thread.id) if m.direction == "in"), None)
        if first is None or first.raw_sha256 is None:
            raise MailflowError(f"report {thread.id} has no message to move on from")
        pm = parse(tx.get_raw(first.raw_sha256))
        rcpt = f"report-{thread.id}"
        env = Envelope(mail_from=thread.citizen_email, rcpt_tos=[], via="unknown")
        return StepContext(tx=tx, pm=pm, cls=pipeline.classify(pm, env), addr=None,
                           sha=first.raw_sha256, envelope=env, result=result,
                           step=Step(rcpt, "report", thread_id=thread.id), approved=True)

    def _report_state(self, tx: Tx, thread_id: int, was: str, state: str) -> None:
        """What a reporter's own "fixed" / "not fixed" does besides the state: when it was
        fixed, and the questionnaire asked again while it is open."""
        from mailflow.store.repository import utcnow
        now = utcnow()
        if state == "fixed" and was != "fixed":
            tx.update_report(thread_id, fixed_at=now)
        elif state != "fixed" and was == "fixed":
            tx.update_report(thread_id, fixed_at=None)
        if state == "open" and was != "open":
            Pipeline(self.site).reports.plan_questionnaire(tx, thread_id, now)

    def hide_thread(self, thread_id: int, hidden: bool, *, reason: str | None = None) -> Outcome:
        with self.site.store.tx() as tx:
            if tx.thread(thread_id) is None:
                raise tx.no_thread(thread_id)
            tx.update_thread(thread_id, hidden=hidden)
            tx.audit(self.actor, "thread_hide" if hidden else "thread_unhide",
                     thread_id=thread_id, target=f"thread:{thread_id}", reason=reason)
        return Outcome(f"thread {thread_id} {'hidden' if hidden else 'shown again'}", [])

    def hide_message(self, message_id: int, hidden: bool, *, reason: str | None = None) -> Outcome:
        with self.site.store.tx() as tx:
            msg = tx.message(message_id)
            if msg is None:
                raise NotFound(f"no message {message_id}")
            tx.set_message_hidden(message_id, hidden)
            tx.audit(self.actor, "message_hide" if hidden else "message_unhide",
                     thread_id=msg.thread_id, target=f"message:{message_id}", reason=reason)
        return Outcome(f"message {message_id} {'hidden' if hidden else 'shown again'}", [])

    def audit(self, thread_id: int | None = None) -> list[dict[str, Any]]:
        with self.site.store.read() as tx:
            return tx.audit_entries(thread_id)
