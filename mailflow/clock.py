"""A thread's statutory clock: start it, stop it, move it, and plan the reminders it implies.

Everything here runs inside the caller's transaction, so a state change, its due date, the
reminders it plans and the event that records it are committed together. The calendar
arithmetic itself is pure (core.deadlines); this module applies it to threads.

A fault report (thread kind "report") has no law and so no clock: starting, planning or
recomputing one does nothing, and a response to it plans no "how did it end?" reminder (its
questionnaire is planned when it is sent; see mailflow.reports).

Due dates are a function of the law, the holiday calendar and the thread's clock inputs (its
start, its extension, whether it is an internal review), so a `Clock` remembers the dates it
worked out for each combination: a site's thousands of running clocks share a few hundred
start days. The calendar cannot change while a process runs (the rules are read once and the
`holidays` package is imported once); `fingerprint` says which calendar a process applies, and
`stale` finds the running clocks whose stored dates differ from it, reading the clocks grouped
by their inputs rather than thread by thread. The reminder sweep decides when to look (see mailflow.reminders).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import date
from typing import Any

from mailflow.config import Settings
from mailflow.core import reminders as R
from mailflow.core.deadlines import add_days, calendar_fingerprint, deadline
from mailflow.core.rules import Law, Rules
from mailflow.store.repository import Thread, Tx

# How many (law, start, extension) results a Clock keeps: years of daily starts for a dozen
# laws. Past it the memo starts again (the dates are cheap to work out once).
_MEMO_SIZE = 50_000


class Clock:
    def __init__(self, settings: Settings, rules: Rules):
        self.settings, self.rules = settings, rules
        self._dates: dict[tuple[str, bool, date, str | None], tuple[date, date]] = {}
        self._memo_rules = rules

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
        return self._compute(self.law(thread), thread.state, start, extension)

    def _compute(self, law: Law, state: str, start: date,
                 extension: str | None) -> tuple[date, date]:
        review = state == "internal_review" and bool(law.internal_review_days)
        key = (law.id, review, start, extension)
        hit = self._dates.get(key)
        if hit is not None and self._memo_rules is self.rules:
            return hit
        if self._memo_rules is not self.rules:   # other rules (a test may swap them)
            self._dates.clear()
            self._memo_rules = self.rules
        extra = self._extra_days(law, extension)
        if review:
            assert law.internal_review_days
            due, _ = add_days(law, start, law.internal_review_days + extra)
            very_late, _ = add_days(law, due, law.very_late_days)
            hit = due, very_late
        else:
            d = deadline(law, start, extra_days=extra)
            hit = d.due, d.very_late
        if len(self._dates) >= _MEMO_SIZE:
            self._dates.clear()
        self._dates[key] = hit
        return hit

    # -- which calendar, and which clocks it would move ------------------------------------------
    def fingerprint(self, years: Iterable[int]) -> str:
        """Which calendar this clock applies: the laws, the holiday calendars of `years` (and
        the `holidays` package's version) and the reminder settings, which plan the reminders.
        Equal fingerprints give equal due dates for the same clock inputs. (Half a
        millisecond: worked out afresh at every sweep.)"""
        h = hashlib.sha256(calendar_fingerprint(self.rules.laws.values(), years).encode())
        h.update(repr(self.settings.reminders).encode())
        return h.hexdigest()[:32]

    def stale(self, tx: Tx) -> tuple[list[int], set[int]]:
        """The running clocks whose stored due or very-late date is not what the calendar
        gives for their inputs (thread ids), and the years the running clocks span (for
        `fingerprint`).

        The database groups the running clocks by their inputs and stored dates (a few
        hundred groups for tens of thousands of threads, since clocks started on the same day
        share them); the dates are worked out once a group, and the threads of a group that
        is wrong are looked up by the group. A candidate for `Tx`, here because repository.py
        is not this change's to edit (as `pipeline._last_sent_to`)."""
        from sqlalchemy import and_, select

        from mailflow.store.tables import threads
        inputs, running, groups = self.clock_groups()
        laws, wrong, years = self.rules.laws, [], set()
        for group in tx.c.execute(groups).all():
            state, law_id, start, extension, due, very_late = group
            law = laws.get(law_id)
            if law is None:   # a law since removed from the rules: nothing to apply
                continue
            new_due, new_late = self._compute(law, state, start, extension)
            years.update(range(start.year, new_late.year + 1))
            if (new_due, new_late) != (due, very_late):
                wrong.append(and_(*(c == v for c, v in zip(inputs, group))))
        ids: list[int] = []
        for where in wrong:
            ids.extend(tx.c.execute(select(threads.c.id).where(running, where)).scalars())
        return sorted(ids), years

    @staticmethod
    def clock_groups() -> tuple[tuple[Any, ...], Any, Any]:
        """The running clocks' inputs, the condition that a clock runs, and the query that
        groups them: its columns in the order of the covering index ix_threads_clock
        (migration 0012), so the database reads the index alone, its groups in order."""
        from sqlalchemy import and_, select

        from mailflow.store.tables import threads as t
        inputs = (t.c.state, t.c.law, t.c.clock_start, t.c.extension, t.c.due_date,
                  t.c.very_late_date)
        running = and_(t.c.clock_start.is_not(None), t.c.due_date.is_not(None),
                       t.c.state.in_(sorted(R.CLOCK_RUNNING)), t.c.kind != "report")
        return inputs, running, select(*inputs).where(running).group_by(*inputs)

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
        if (thread.clock_start is None or thread.due_date is None or not self.runs(thread)
                or thread.law not in self.rules.laws):   # a law since removed: nothing to apply
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
