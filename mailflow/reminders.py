"""The reminder sweep: send what is due, each exactly once, late rather than never.

Each due reminder is settled in its own transaction together with the mail it causes: the
conditional UPDATE (pending → sent) succeeds for exactly one sweeper, however many daemons or
`reminders run` commands race, and the outbox row is committed with it. A reminder whose
window was missed (the daemon was down) is still due, so it goes out at the next sweep; one
that no longer applies (the answer came, the due date moved) is skipped with the reason.

A fault report's questionnaire ("has it been fixed?") is a reminder like the others: one row
per question, settled by the same conditional UPDATE, skipped once the report is not open.

Due dates follow the calendar in use (the laws, the `holidays` package, the reminder settings)
without every sweep recomputing every running clock (issue #10: that was three quarters of a
sweep over 100,000 threads). A `Reminders` object (the daemon keeps one) checks every running
clock against the calendar at its first sweep, at the first sweep of each day (by the sweep's
`now`) and whenever the calendar's fingerprint (`Clock.fingerprint`) differs from the one it
last applied, and records each due date that moved. In between, a reminder that falls due has
its thread's dates checked first, in the transaction that settles it, so no reminder goes out
about dates another process (or an older calendar) stored. The fingerprint is kept in memory,
not in the database: a new process checks every clock once (a few tenths of a second at
100,000 threads, since clocks that started on the same day share their dates).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from mailflow import logs
from mailflow.clock import Clock
from mailflow.core import reminders as R
from mailflow.core.deadlines import add_days
from mailflow.outbound.compose import Outgoing, new_message_id
from mailflow.outbound.outbox import queue_message
from mailflow.site import Site
from mailflow.store.repository import Reminder, Thread, Tx
from mailflow.templating import render

log = logging.getLogger("mailflow.reminders")

# Due dates moved per transaction when the calendar changed (many, after a `holidays` upgrade).
_RECOMPUTE_BATCH = 200


@dataclass
class SweepResult:
    sent: list[dict[str, Any]]
    skipped: list[dict[str, Any]]
    recomputed: list[dict[str, Any]]
    outbox_ids: list[int]


def _row(r: Reminder, why: str) -> dict[str, Any]:
    return {"id": r.id, "thread_id": r.thread_id, "kind": r.kind, "event": r.event,
            "due_at": r.due_at, "why": why}


class Reminders:
    def __init__(self, site: Site):
        self.site = site
        self.clock = Clock(site.settings, site.rules)
        # (calendar fingerprint, day) of the last check of every running clock, and the
        # years those clocks span: see `recompute`.
        self._checked: tuple[str, date] | None = None
        self._years: set[int] = set()

    # -- what is due ------------------------------------------------------------------------
    def due(self, now: datetime) -> list[dict[str, Any]]:
        """What a sweep at `now` would do, without doing it."""
        out = []
        with self.site.store.read() as tx:
            for r in tx.due_reminders(now):
                thread = tx.thread(r.thread_id)
                ok, why = self._applies(r, thread, now)
                out.append({**_row(r, why), "action": "send" if ok else "skip"})
        return out

    def _applies(self, r: Reminder, thread: Thread | None, now: datetime) -> tuple[bool, str]:
        if thread is None:
            return False, "no such thread"
        return R.applies(r.kind, r.event, state=thread.state, due=thread.due_date,
                         very_late=thread.very_late_date,
                         awaiting_description=thread.awaiting_description, today=now.date())

    # -- the sweep ---------------------------------------------------------------------------
    def run(self, now: datetime, *, dry_run: bool = False) -> SweepResult:
        result = SweepResult([], [], [], [])
        if dry_run:
            for row in self.due(now):
                (result.sent if row["action"] == "send" else result.skipped).append(row)
            return result
        result.recomputed.extend(self.recompute(now))
        with self.site.store.read() as tx:
            due = tx.due_reminders(now)
        for r in self._skip(due, now, result):
            logs.set_thread(r.thread_id)
            with self.site.store.tx() as tx:
                thread, ok, why = self._check(tx, r, now, result)
                if not tx.settle_reminder(r.id, "sent" if ok else "skipped", why):
                    continue  # another sweeper took it
                if not ok or thread is None:
                    result.skipped.append(_row(r, why))
                    continue
                result.outbox_ids.extend(self._send(tx, r, thread, now))
                tx.add_event(thread.id, "mailflow", f"reminder:{r.kind}", {"event": r.event})
                result.sent.append(_row(r, why))
                log.info("reminder %s for thread %s sent (%s)", r.kind, thread.id, why)
        return result

    def _check(self, tx: Tx, r: Reminder, now: datetime,
               result: SweepResult) -> tuple[Thread | None, bool, str]:
        """Whether `r` is to be sent now, and why, on its thread as `tx` sees it."""
        thread = tx.thread(r.thread_id)
        if thread is not None and thread.state in R.CLOCK_RUNNING:
            # The dates this reminder is about, with this process's calendar (another
            # process, or an older one, may have stored them).
            change = self.clock.recompute(tx, thread)
            if change:
                result.recomputed.append({"thread_id": thread.id, **change})
                thread = tx.thread(thread.id)
        ok, why = self._applies(r, thread, now)
        return thread, ok, why

    def _skip(self, due: list[Reminder], now: datetime, result: SweepResult) -> list[Reminder]:
        """Settle every due reminder that no longer applies, all in one transaction, and
        return the others (to be checked again and sent, one transaction each).

        A skip sends nothing, so it needs no transaction of its own: the conditional UPDATE
        alone makes it happen once, and a failure leaves every skip of the batch for the next
        sweep. Most of a sweep's reminders are skipped (their due date moved, or an answer
        came), and a transaction each cost more than deciding. Sending changes nothing that
        decides another reminder (a thread's state and dates), so deciding the skips first
        skips exactly what deciding them in turn between the sends did."""
        if not due:
            return []
        keep = []
        with self.site.store.tx() as tx:
            for r in due:
                logs.set_thread(r.thread_id)
                _, ok, why = self._check(tx, r, now, result)
                if ok:
                    keep.append(r)
                elif tx.settle_reminder(r.id, "skipped", why):
                    result.skipped.append(_row(r, why))
        return keep

    def recompute(self, now: datetime) -> list[dict[str, Any]]:
        """Apply the calendar to every running clock, if it is not known to be applied: at
        this object's first sweep, when the calendar's fingerprint changes, and once a day
        (by `now`'s date). Returns the due dates that moved, each also recorded as an event."""
        fingerprint = self.clock.fingerprint(self._years | {now.year})
        if self._checked == (fingerprint, now.date()):
            return []
        with self.site.store.read() as tx:
            stale, years = self.clock.stale(tx)
        changes = []
        for i in range(0, len(stale), _RECOMPUTE_BATCH):
            with self.site.store.tx() as tx:
                for thread_id in stale[i:i + _RECOMPUTE_BATCH]:
                    thread = tx.thread(thread_id)
                    change = self.clock.recompute(tx, thread) if thread is not None else None
                    if change:
                        changes.append({"thread_id": thread_id, **change})
        self._years = years
        self._checked = (self.clock.fingerprint(years | {now.year}), now.date())
        return changes

    # -- the mail ----------------------------------------------------------------------------
    def _context(self, thread: Thread) -> dict[str, Any]:
        s = self.site.settings.site
        return {"site_name": s.name, "site_url": s.url, "title": thread.title,
                "authority": self.site.rules.authorities.get(thread.authority),
                "law": self.site.rules.laws.get(thread.law), "thread_id": thread.id,
                "citizen_name": thread.citizen_name, "due_date": thread.due_date,
                "very_late_date": thread.very_late_date, "state": thread.state,
                "request_address": self.site.request_address(thread)}

    def _send(self, tx: Tx, r: Reminder, thread: Thread, now: datetime) -> list[int]:
        if r.kind == "questionnaire":
            return self._questionnaire(tx, r, thread, now)
        ctx = self._context(thread)
        domain, s = self.site.domain, self.site.settings
        authority = ctx["authority"]
        if r.kind == "authority_followup":
            if authority is None or authority.contact is None:
                return []
            n = int(r.event.rpartition(":")[2])
            req = self.site.request_address(thread)
            sent = [m for m in tx.messages(thread.id) if m.direction == "out"
                    and m.kind in ("request", "followup") and m.message_id]
            out = Outgoing(
                from_addr=req, from_name=thread.citizen_name, to_addr=authority.contact,
                to_name=authority.name, domain=domain, automatic=True,
                subject="Re: " + self.site.foi_subject(thread),
                text=render(self.site.templates, "mail/reminder_authority_followup.txt",
                            **ctx, number=n),
                in_reply_to=sent[-1].message_id if sent else None,
                references=[m.message_id for m in sent if m.message_id],
                message_id=new_message_id(domain, f"foi{thread.id}"))
            _, row = queue_message(tx, self.site.signer, out, thread_id=thread.id,
                                   kind="followup", mail_from=req)
            law = self.site.rules.laws[thread.law]
            nxt = R.next_followup(r.event, now.date(), self.clock.policy(thread),
                                  lambda d, k: add_days(law, d, k)[0])
            if nxt is not None:
                tx.add_reminder(thread.id, nxt.kind, nxt.event,
                                R.due_at(nxt.on, self.clock.policy(thread)))
            return [row]
        _ = self.site._
        subjects = {
            "citizen_due": _("Your request is due an answer today: {title}", title=thread.title),
            "citizen_late": _("Your request is late: {title}", title=thread.title),
            "very_late": _("Your request is very late: {title}", title=thread.title),
            "describe": _("How did your request end? {title}", title=thread.title),
        }
        reply = self.site.reply_address(thread)
        out = Outgoing(
            from_addr=reply, from_name=s.site.name, reply_to=reply, to_addr=thread.citizen_email,
            to_name=thread.citizen_name, domain=domain, automatic=True,
            subject=subjects[r.kind],
            text=render(self.site.templates, f"mail/reminder_{r.kind}.txt", **ctx),
            message_id=new_message_id(domain, f"rem{thread.id}"))
        _, row = queue_message(tx, self.site.signer, out, thread_id=thread.id,
                               kind=f"reminder_{r.kind}", mail_from=s.outbound.bounce_address)
        return [row]

    def _questionnaire(self, tx: Tx, r: Reminder, thread: Thread, now: datetime) -> list[int]:
        """Ask the citizen whether her fault report was fixed, and plan the next time to ask
        (it is skipped, not sent, once she says it was fixed or withdraws it)."""
        from mailflow.pipeline import Pipeline
        from mailflow.reports import next_questionnaire_due
        flow = Pipeline(self.site).reports
        n = R.questionnaire_number(r.event) or 1
        out = flow.questionnaire_mail(thread, tx.report(thread.id), n)
        _, row = queue_message(tx, self.site.signer, out, thread_id=thread.id,
                               kind="reminder_questionnaire",
                               mail_from=self.site.settings.outbound.bounce_address)
        days = self.site.settings.reports.questionnaire_repeat_days
        tx.add_reminder(thread.id, "questionnaire", R.questionnaire_event(n + 1),
                        next_questionnaire_due(r.due_at, now, days))
        return [row]
