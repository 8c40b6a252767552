"""Reminders: the right ones on the right days, each exactly once, across restarts and races.

Time travels by passing `now`: the sweep (`mailflow reminders run --now`) is the same code the
daemon's scheduler calls.
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections import defaultdict
from dataclasses import replace
from datetime import date, datetime, timedelta, timezone

import pytest

from conftest import DOMAIN, JANE, MAILFLOW, Site, compose
from mailflow.clock import Clock
from mailflow.delivery import deliver
from mailflow.pipeline import Pipeline
from mailflow.reminders import Reminders
from mailflow.site import Site as MfSite
from mailflow.spool import Envelope
from test_store_backends import _pg_database

AUTHORITY = "foi@camden.gov.example"
START = date(2027, 3, 1)   # a Monday


def ingest(mf: MfSite, raw: bytes, rcpt: str, sender: str) -> None:
    result = Pipeline(mf).process(raw, Envelope(mail_from=sender, rcpt_tos=[rcpt], via="test"))
    if result.outbox_ids:
        asyncio.run(deliver(mf, result.outbox_ids))


def request_sent_on(mf: MfSite, start: date) -> int:
    ingest(mf, compose(f"Jane <{JANE}>", f"camden@{DOMAIN}", "Gritting", "Which roads?"),
           f"camden@{DOMAIN}", JANE)
    with mf.store.tx() as tx:
        t = tx.threads()[-1]
    confirm = f"confirm-{t.confirm_token}@{DOMAIN}"
    ingest(mf, compose(f"Jane <{JANE}>", confirm, "Re", "Yes"), confirm, JANE)
    with mf.store.tx() as tx:   # as if it had gone out on `start`
        Clock(mf.settings, mf.rules).start(tx, t.id, start, actor="test", why="time travel")
    return t.id


def sweep_days(mf: MfSite, first: date, days: int) -> dict[date, list[str]]:
    sent: dict[date, list[str]] = defaultdict(list)
    for i in range(days):
        day = first + timedelta(days=i)
        result = Reminders(mf).run(datetime(day.year, day.month, day.day, 12, tzinfo=timezone.utc))
        if result.outbox_ids:
            asyncio.run(deliver(mf, result.outbox_ids))
        sent[day].extend(sorted(r["kind"] for r in result.sent))
    return {d: k for d, k in sent.items() if k}


def test_three_months_of_reminders_for_an_unanswered_uk_request(mf: MfSite) -> None:
    tid = request_sent_on(mf, START)
    with mf.store.read() as tx:
        t = tx.thread(tid)
    # Day one Tue 2 March; skipped: weekends, St Patrick's Day (Wed 17 March, Northern
    # Ireland: the Act counts a bank holiday in any part of the UK), Good Friday 26 March and
    # Easter Monday 29 March 2027 -> the 20th working day is Thursday 1 April.
    assert t is not None and t.due_date == date(2027, 4, 1)
    # 20 more working days (WhatDoTheyKnow's "very late"): late until Thursday 29 April,
    # very late from Friday 30 April.
    assert t.very_late_date == date(2027, 4, 29)
    sent = sweep_days(mf, START, 92)
    assert sent == {
        date(2027, 4, 1): ["citizen_due"],
        date(2027, 4, 2): ["authority_followup", "citizen_late"],
        # the second follow-up 10 working days after the first (Fri 2 April + 10)
        date(2027, 4, 16): ["authority_followup"],
        date(2027, 4, 30): ["very_late"],
    }
    # Running the whole period again sends nothing more.
    assert sweep_days(mf, START, 92) == {}


def test_an_answer_stops_the_reminders_and_asks_how_it_ended(mf: MfSite) -> None:
    tid = request_sent_on(mf, START)
    with mf.store.read() as tx:
        t = tx.thread(tid)
    assert t is not None
    req = f"request-{tid}-{t.request_token}@{DOMAIN}"
    assert sweep_days(mf, START, 32) == {date(2027, 4, 1): ["citizen_due"]}
    ingest(mf, compose(f"FOI <{AUTHORITY}>", req, "RE", "Here it is."), req, AUTHORITY)
    with mf.store.read() as tx:
        describe = [r for r in tx.reminders(tid) if r.kind == "describe"]
    assert len(describe) == 1
    # The answer came (today, in real time): the late reminders no longer apply ...
    later = sweep_days(mf, date(2027, 4, 2), 60)
    assert "citizen_late" not in str(later) and "authority_followup" not in str(later)
    # ... and the describe reminder was due long ago, so it went out at the first sweep.
    assert later == {date(2027, 4, 2): ["describe"]}


def test_citizen_commands_end_the_clock_and_review_restarts_it(mf: MfSite) -> None:
    tid = request_sent_on(mf, START)
    with mf.store.read() as tx:
        t = tx.thread(tid)
    assert t is not None
    reply = f"reply-{tid}-{t.reply_token}@{DOMAIN}"
    ingest(mf, compose(f"Jane <{JANE}>", reply, "Re", "refused\n\nOn x, y wrote:\n> no"), reply, JANE)
    with mf.store.read() as tx:
        assert tx.thread(tid).state == "rejected"  # type: ignore[union-attr]
    assert sweep_days(mf, START, 92) == {}
    ingest(mf, compose(f"Jane <{JANE}>", reply, "Re", "internal review\nThey ignored s.16."),
           reply, JANE)
    with mf.store.read() as tx:
        t = tx.thread(tid)
        sent = [m for m in tx.messages(tid) if m.direction == "out"]
    assert t is not None and t.state == "internal_review"
    assert t.due_date is not None and t.clock_start == datetime.now(timezone.utc).date()
    review = [m for m in sent if m.subject.startswith("Internal review of")]
    assert len(review) == 1 and "They ignored s.16." in review[0].text


def test_clarification_stops_the_clock_until_given(mf: MfSite) -> None:
    tid = request_sent_on(mf, START)
    with mf.store.read() as tx:
        t = tx.thread(tid)
    assert t is not None
    reply = f"reply-{tid}-{t.reply_token}@{DOMAIN}"
    ingest(mf, compose(f"Jane <{JANE}>", reply, "Re", "clarification"), reply, JANE)
    assert sweep_days(mf, START, 60) == {}        # no reminders while they wait for her
    ingest(mf, compose(f"Jane <{JANE}>", reply, "Re", "I meant roads in the north ward."),
           reply, JANE)
    with mf.store.read() as tx:
        t = tx.thread(tid)
        events = [e["kind"] for e in tx.events(tid)]
    assert t is not None and t.state == "waiting_response"
    assert t.clock_start == datetime.now(timezone.utc).date()
    assert events.count("clock") == 3   # sent, time travel, clarification


def test_a_changed_holiday_calendar_moves_the_due_date_and_is_recorded(mf: MfSite) -> None:
    tid = request_sent_on(mf, START)
    with mf.store.tx() as tx:   # as if computed with an older calendar
        tx.update_thread(tid, due_date=date(2027, 3, 29))
    result = Reminders(mf).run(datetime(2027, 3, 2, 12, tzinfo=timezone.utc))
    assert [r["due"] for r in result.recomputed] == ["2027-04-01"]
    with mf.store.read() as tx:
        assert tx.thread(tid).due_date == date(2027, 4, 1)  # type: ignore[union-attr]
        assert "due_changed" in [e["kind"] for e in tx.events(tid)]


def _race(site: Site, now: str) -> None:
    procs = [subprocess.Popen([*MAILFLOW, "--config", str(site.config), "reminders", "run",
                               "--now", now], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_sweepers_at_once_send_each_reminder_once(site: Site, backend: str) -> None:
    gen = None
    if backend == "postgresql":
        gen = _pg_database()
        url = next(gen)
        site.set("database", "url", f'"{url}"')
    try:
        mf = MfSite.open(site.config)
        tid = request_sent_on(mf, START)
        mf.close()
        site.new_mail()
        for day in ("2027-04-01T12:00", "2027-04-02T12:00", "2027-04-02T13:00", "2027-04-16T12:00"):
            _race(site, day)
        got = sorted((rcpt, str(msg["Subject"]).split(":")[0]) for rcpt, msg, _ in site.new_mail())
        assert got == [
            (AUTHORITY, f"Re"),
            (AUTHORITY, f"Re"),
            (JANE, "Your request is due an answer today"),
            (JANE, "Your request is late"),
        ]
        mf = MfSite.open(site.config)
        with mf.store.read() as tx:
            sent = [r.kind for r in tx.reminders(tid, state="sent")]
        mf.close()
        assert sorted(sent) == ["authority_followup", "authority_followup", "citizen_due",
                                "citizen_late"]
    finally:
        if gen is not None:
            next(gen, None)


def test_reminders_due_and_run_from_the_cli(site: Site) -> None:
    mf = MfSite.open(site.config)
    tid = request_sent_on(mf, START)
    mf.close()
    due = site.json("reminders", "due", "--now", "2027-04-02T12:00")
    kinds = {(r["kind"], r["action"]) for r in due if r["thread_id"] == tid}
    assert ("citizen_due", "send") in kinds and ("citizen_late", "send") in kinds
    r = site.run("reminders", "run", "--now", "2027-04-02T12:00", "--dry-run")
    assert r.returncode == 0 and b"would send" in r.stdout
    assert site.json("reminders", "due", "--now", "2027-04-02T12:00") == due
    run = site.json("reminders", "run", "--now", "2027-04-02T12:00")
    assert sorted(x["kind"] for x in run["sent"]) == ["authority_followup", "citizen_due",
                                                       "citizen_late"]
    assert site.json("reminders", "run", "--now", "2027-04-02T12:00")["sent"] == []


def test_still_waiting_after_an_acknowledgement_resumes_the_reminders(mf: MfSite) -> None:
    tid = request_sent_on(mf, START)
    with mf.store.read() as tx:
        t = tx.thread(tid)
    assert t is not None
    req = f"request-{tid}-{t.request_token}@{DOMAIN}"
    reply = f"reply-{tid}-{t.reply_token}@{DOMAIN}"
    ingest(mf, compose(f"FOI <{AUTHORITY}>", req, "RE", "We are working on it."), req, AUTHORITY)
    ingest(mf, compose(f"Jane <{JANE}>", reply, "Re", "still waiting"), reply, JANE)
    assert sweep_days(mf, START, 33) == {date(2027, 4, 1): ["citizen_due"],
                                         date(2027, 4, 2): ["authority_followup", "citizen_late"]}


def test_admin_records_an_extension_and_the_due_date_moves(site: Site) -> None:
    mf = MfSite.open(site.config)
    tid = request_sent_on(mf, START)
    mf.close()
    r = site.run("thread", "extend", str(tid))
    assert r.returncode == 0, r.stderr.decode()
    t = site.json("thread", "show", str(tid))
    assert t["extension"] and t["due_date"] > "2027-04-01"
    assert [e["kind"] for e in t["events"]].count("clock") == 3
    bad = site.run("thread", "extend", str(tid), "--extension", "nonsense")
    assert bad.returncode == 1 and b"has no extension" in bad.stderr


# -- when the calendar is applied (issue #10: not every clock on every sweep) -------------------
def _count_checks(monkeypatch: pytest.MonkeyPatch, rem: Reminders) -> list[int]:
    """How many times `rem` checked every running clock against the calendar."""
    calls: list[int] = []
    stale = rem.clock.stale

    def counting(tx):  # type: ignore[no-untyped-def]
        calls.append(1)
        return stale(tx)
    monkeypatch.setattr(rem.clock, "stale", counting)
    return calls


def test_every_clock_is_checked_once_a_day_and_when_the_calendar_changes(
        mf: MfSite, monkeypatch: pytest.MonkeyPatch) -> None:
    tid = request_sent_on(mf, START)
    rem = Reminders(mf)   # as the daemon keeps one for all its sweeps
    checks = _count_checks(monkeypatch, rem)
    morning = datetime(2027, 3, 2, 8, tzinfo=timezone.utc)
    assert rem.run(morning).recomputed == [] and len(checks) == 1
    with mf.store.tx() as tx:   # as if another process had stored an older calendar's date
        tx.update_thread(tid, due_date=date(2027, 3, 29))
    # The same day, the same calendar: later sweeps do not look at every clock again ...
    for minutes in (5, 10, 300):
        assert rem.run(morning + timedelta(minutes=minutes)).recomputed == []
    assert len(checks) == 1
    # ... the first sweep of the next day does, and records the move.
    moved = rem.run(morning + timedelta(days=1)).recomputed
    assert [(c["thread_id"], c["old_due"], c["due"]) for c in moved] == [
        (tid, "2027-03-29", "2027-04-01")]
    assert len(checks) == 2
    assert rem.run(morning + timedelta(days=1, minutes=5)).recomputed == []
    assert len(checks) == 2
    # A new `holidays` package is a new calendar: every clock is checked at the next sweep.
    import holidays
    monkeypatch.setattr(holidays, "__version__", holidays.__version__ + ".post1")
    assert rem.run(morning + timedelta(days=1, minutes=10)).recomputed == []
    assert len(checks) == 3
    # So is an edited law: here the UK's 20 working days become 21 (the 21st: Friday 2 April).
    uk = mf.rules.laws["uk-foia"]
    rem.clock.rules = replace(mf.rules, laws={**mf.rules.laws, "uk-foia": replace(uk, days=21)})
    moved = rem.run(morning + timedelta(days=1, minutes=15)).recomputed
    assert [(c["old_due"], c["due"]) for c in moved] == [("2027-04-01", "2027-04-02")]
    assert len(checks) == 4
    with mf.store.read() as tx:
        t = tx.thread(tid)
        events = [e for e in tx.events(tid) if e["kind"] == "due_changed"]
    assert t is not None and t.due_date == date(2027, 4, 2) and len(events) == 2


def test_a_due_reminder_is_checked_against_the_calendar_before_it_goes_out(
        mf: MfSite, monkeypatch: pytest.MonkeyPatch) -> None:
    tid = request_sent_on(mf, START)
    rem = Reminders(mf)
    checks = _count_checks(monkeypatch, rem)
    early = datetime(2027, 4, 1, 7, tzinfo=timezone.utc)   # before the 09:00 reminders
    assert rem.run(early).sent == [] and len(checks) == 1
    with mf.store.tx() as tx:   # a wrong due date, written after this morning's check
        tx.update_thread(tid, due_date=date(2027, 3, 29))
    result = rem.run(early + timedelta(hours=5))
    assert len(checks) == 1     # not a check of every clock: only the thread whose reminder fell due
    assert [(c["old_due"], c["due"]) for c in result.recomputed] == [("2027-03-29", "2027-04-01")]
    assert [r["kind"] for r in result.sent] == ["citizen_due"]
    assert result.skipped == []


def test_the_sweep_does_not_write_the_working(mf: MfSite, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only `mailflow deadline` and the archive show how a due date was worked out."""
    from mailflow.core import deadlines
    tid = request_sent_on(mf, START)
    with mf.store.tx() as tx:
        tx.update_thread(tid, due_date=date(2027, 3, 29))

    def no(d: date) -> str:
        raise AssertionError("the sweep wrote a working line")
    monkeypatch.setattr(deadlines, "long_date", no)
    sent = sweep_days(mf, START, 35)
    assert sent == {date(2027, 4, 1): ["citizen_due"],
                    date(2027, 4, 2): ["authority_followup", "citizen_late"]}


def test_a_sweep_settles_the_skips_together_and_decides_as_one_at_a_time(
        mf: MfSite, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reminders that no longer apply are settled in one transaction, before the ones that go
    out (one transaction each, with their mail); what is sent and what is skipped, with why,
    is what deciding each in turn gives (`Reminders.due`, read-only, decides the same way)."""
    running, answered, ended, paused = (request_sent_on(mf, START) for _ in range(4))
    with mf.store.tx() as tx:
        tx.update_thread(answered, awaiting_description=True)
        tx.update_thread(ended, state="successful")
        tx.update_thread(paused, state="waiting_clarification")
    now = datetime(2027, 4, 2, 12, tzinfo=timezone.utc)
    rem = Reminders(mf)
    planned = {r["id"]: (r["action"], r["why"]) for r in rem.due(now)}
    transactions = []
    real_tx = mf.store.tx

    def counting_tx():  # type: ignore[no-untyped-def]
        transactions.append(1)
        return real_tx()

    monkeypatch.setattr(mf.store, "tx", counting_tx)
    result = rem.run(now)
    assert {r["id"]: ("send", r["why"]) for r in result.sent} | \
        {r["id"]: ("skip", r["why"]) for r in result.skipped} == planned
    assert {r["thread_id"] for r in result.sent} == {running}
    assert sorted(r["kind"] for r in result.sent) == ["authority_followup", "citizen_due",
                                                      "citizen_late"]
    assert {r["thread_id"] for r in result.skipped} >= {answered, ended, paused}
    assert len(transactions) == 1 + len(result.sent)
    with mf.store.read() as tx:
        states = {r.id: (r.state, r.note) for r in tx.reminders() if r.id in planned}
    assert states == {i: ("sent" if a == "send" else "skipped", why)
                      for i, (a, why) in planned.items()}
    again = rem.run(now)
    assert again.sent == [] and again.skipped == []
