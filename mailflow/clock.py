"""A thread's statutory clock: start it, stop it, move it, and plan the reminders it implies.

Everything here runs inside the caller's transaction, so a state change, its due date, the
reminders it plans and the event that records it are committed together. The calendar
arithmetic itself is pure (core.deadlines); this module applies it to threads.

A fault report (thread kind "report") has no law and so no clock: starting, planning or
recomputing one does nothing, and a response to it plans no "how did it end?" reminder (its
questionnaire is planned when it is sent; see mailflow.reports).
"""
from __future__ import annotations

from datetime import date
from typing import Any

from mailflow.config import Settings
from mailflow.core import reminders as R
from mailflow.core.deadlines import add_days, deadline
from mailflow.core.rules import Law, Rules
from mailflow.store.repository import Thread, Tx


class Clock:
    def __init__(self, settings: Settings, rules: Rules):
        self.settings, self.rules = settings, rules

    def law(self, thread: Thread) -> Law:
        return self.rules.laws[thread.law]

    @staticmethod
    def runs(thread: Thread) -> bool:
        """Whether the thread has a statutory clock at all (a fault report has none)."""
        return thread.kind != "report" and bool(thread.law)

    def policy(self, thread: Thread) -> R.ReminderPolicy:
        return self.settings.reminders.policy(thread.law)

    def _extra_days(self, law: Law, extension: str | None) -> int:
        if not extension:
            return 0
        for ext in law.extensions:
            if ext.id == extension:
                return ext.days
        return 0

    def compute(self, thread: Thread, start: date, extension: str | None) -> tuple[date, date]:
        """(due, very late) for a clock started on `start`, with a claimed extension."""
        law = self.law(thread)
        if thread.state == "internal_review" and law.internal_review_days:
            due, _ = add_days(law, start, law.internal_review_days + self._extra_days(law, extension))
            very_late, _ = add_days(law, due, law.very_late_days)
            return due, very_late
        d = deadline(law, start, extra_days=self._extra_days(law, extension))
        return d.due, d.very_late

    def start(self, tx: Tx, thread_id: int, start: date, *, actor: str, why: str,
              extension: str | None = None) -> Thread:
        """(Re)start the clock from `start` and plan the reminders for the new due date."""
        thread = tx.thread(thread_id)
        assert thread is not None
        if not self.runs(thread):
            return thread
        due, very_late = self.compute(thread, start, extension)
        tx.update_thread(thread_id, clock_start=start, due_date=due, very_late_date=very_late,
                         extension=extension)
        tx.add_event(thread_id, actor, "clock", {"why": why, "start": start.isoformat(),
                                                 "due": due.isoformat(),
                                                 "very_late": very_late.isoformat(),
                                                 "extension": extension})
        thread = tx.thread(thread_id)
        assert thread is not None
        self.plan(tx, thread)
        return thread

    def plan(self, tx: Tx, thread: Thread) -> int:
        """Plan the reminders for the thread's current due date (idempotent)."""
        if thread.due_date is None or thread.very_late_date is None or not self.runs(thread):
            return 0
        law, policy = self.law(thread), self.policy(thread)
        specs = R.for_deadline(thread.due_date, thread.very_late_date, policy,
                               lambda d, n: add_days(law, d, n)[0])
        return sum(tx.add_reminder(thread.id, s.kind, s.event, R.due_at(s.on, policy))
                   for s in specs)

    def recompute(self, tx: Tx, thread: Thread) -> dict[str, Any] | None:
        """Apply a changed holiday calendar or law to a running clock, and record the change."""
        if thread.clock_start is None or thread.due_date is None or not self.runs(thread):
            return None
        due, very_late = self.compute(thread, thread.clock_start, thread.extension)
        if due == thread.due_date and very_late == thread.very_late_date:
            return None
        change = {"old_due": thread.due_date.isoformat(), "due": due.isoformat(),
                  "old_very_late": thread.very_late_date.isoformat()
                  if thread.very_late_date else None, "very_late": very_late.isoformat(),
                  "why": "the law's calendar (holidays or rules) changed since the due date "
                         "was computed"}
        tx.update_thread(thread.id, due_date=due, very_late_date=very_late)
        tx.add_event(thread.id, "mailflow", "due_changed", change)
        updated = tx.thread(thread.id)
        assert updated is not None
        self.plan(tx, updated)
        return change

    def response_arrived(self, tx: Tx, thread: Thread, message_pk: int, received: date) -> None:
        if not self.runs(thread):
            return
        tx.update_thread(thread.id, awaiting_description=True)
        policy = self.policy(thread)
        if policy.describe_after_days:
            spec = R.after_response(message_pk, received, policy)
            tx.add_reminder(thread.id, spec.kind, spec.event, R.due_at(spec.on, policy))
