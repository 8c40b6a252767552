"""5. Reminders: the sweep that finds and sends what is due, among 100,000 threads.

The store gets 100,000 sent requests, their clocks started a day at a time over the past
year, each with the reminders its clock plans (`world.bulk_reminder_site`). The sweep runs at
09:00:30 on a weekday (date-based reminders fall due at 09:00): everything due before the
previous sweep was settled then, so it finds the morning's reminders, as the daemon's first
sweep after nine does. `Reminders.run` is called until it finds nothing more (it takes at most
500 at a time); the first call is what the target is about.

The baseline does a sweep's database work with nothing else, on a copy of the same database,
with the standard library's sqlite3: select the due reminders by the (state, due_at) index,
join their threads, mark each sent and record a rendered line of text per reminder, in one
transaction.

On PostgreSQL (`database="postgresql"`) the store is a fresh database and the baseline does
the same statements with psycopg, one round trip each as mailflow makes them, on a copy of it
(`CREATE DATABASE … TEMPLATE`). `size` is the number of threads.
"""
from __future__ import annotations

import shutil
import sqlite3
import time
from datetime import datetime, time as dtime, timedelta, timezone
from pathlib import Path
from typing import Any

from bench.common import (Row, Section, Timer, db_name, fmt_s, fresh_pg_database, make_site,
                          open_site)
from bench.world import bulk_reminder_site

NAME = "reminders"


def sweep_time() -> datetime:
    d = datetime.now(timezone.utc).date() - timedelta(days=1)
    while d.weekday() not in (1, 2, 3):   # Tue–Thu: the day before was a working day too
        d -= timedelta(days=1)
    return datetime.combine(d, dtime(9, 0, 30), tzinfo=timezone.utc)


def bare_sweep(db: Path, now: datetime) -> tuple[float, int]:
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    con.execute("CREATE TABLE IF NOT EXISTS bench_sent (reminder_id INTEGER, body TEXT)")
    with Timer() as t:
        con.execute("BEGIN IMMEDIATE")
        rows = con.execute(
            "SELECT r.id, r.kind, r.event, t.id, t.title, t.citizen_name, t.state, t.due_date "
            "FROM reminders r JOIN threads t ON t.id = r.thread_id "
            "WHERE r.state = 'pending' AND r.due_at <= ? ORDER BY r.due_at, r.id",
            (now.strftime("%Y-%m-%d %H:%M:%S.%f"),)).fetchall()
        for rid, kind, event, tid, title, name, state, due in rows:
            con.execute("UPDATE reminders SET state = 'sent', done_at = ? WHERE id = ? "
                        "AND state = 'pending'", (now.isoformat(), rid))
            con.execute("INSERT INTO bench_sent VALUES (?, ?)",
                        (rid, f"Dear {name},\nYour request {title} ({kind}, {event}) was due "
                              f"on {due}; it is {state}.\n"))
        con.execute("COMMIT")
    con.close()
    return t.seconds, len(rows)


def bare_sweep_pg(url: str, now: datetime) -> tuple[float, int]:
    """`bare_sweep` on PostgreSQL, with psycopg: the same statements, one round trip each."""
    import psycopg
    with psycopg.connect(url) as con:
        con.execute("CREATE TABLE IF NOT EXISTS bench_sent (reminder_id INTEGER, body TEXT)")
        con.commit()
        with Timer() as t:
            rows = con.execute(
                "SELECT r.id, r.kind, r.event, t.id, t.title, t.citizen_name, t.state, "
                "t.due_date FROM reminders r JOIN threads t ON t.id = r.thread_id "
                "WHERE r.state = 'pending' AND r.due_at <= %s ORDER BY r.due_at, r.id",
                (now,)).fetchall()
            for rid, kind, event, tid, title, name, state, due in rows:
                con.execute("UPDATE reminders SET state = 'sent', done_at = %s WHERE id = %s "
                            "AND state = 'pending'", (now, rid))
                con.execute("INSERT INTO bench_sent VALUES (%s, %s)",
                            (rid, f"Dear {name},\nYour request {title} ({kind}, {event}) was "
                                  f"due on {due}; it is {state}.\n"))
            con.commit()
    return t.seconds, len(rows)


def psycopg_connect(url: str):  # type: ignore[no-untyped-def]
    import psycopg
    return psycopg.connect(url, autocommit=True)


def run(tmp: Path, quick: bool, profile: Any = None, *, database: str = "sqlite",
        size: int | None = None) -> Section:
    from mailflow.reminders import Reminders
    sec = Section(NAME)
    n = size or (2_000 if quick else 100_000)
    config = make_site(tmp / "reminders-site", database=database)
    site = open_site(config)
    now = sweep_time()
    with Timer() as gen:
        counts = bulk_reminder_site(site, n, now)
    site.store.engine.dispose()
    url = site.settings.database.url
    if database == "postgresql":
        # A copy for the baseline: nobody is connected to the original now (disposed above).
        with psycopg_connect(url) as c:
            c.execute("VACUUM ANALYZE")   # as autovacuum would have, long before the sweep
        bare_s, bare_n = bare_sweep_pg(fresh_pg_database(template=db_name(url)), now)
        bare_label = "psycopg"
    else:
        db = Path(url.split("///", 1)[1])
        con = sqlite3.connect(db)
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.close()
        copy = tmp / "reminders-bare.db"
        shutil.copy(db, copy)
        bare_s, bare_n = bare_sweep(copy, now)
        bare_label = "sqlite3"

    r = Reminders(site)
    site.signer, site.templates  # loaded once by a running daemon  # noqa: B018
    with Timer() as find:
        due = r.due(now)
    if profile is not None:
        profile.enable()
    cpu0 = time.process_time()
    with Timer() as first:
        res = r.run(now)
    first_cpu = time.process_time() - cpu0
    if profile is not None:
        profile.disable()
    sent, skipped, sweeps = len(res.sent), len(res.skipped), 1
    with Timer() as rest:
        while True:
            more = r.run(now)
            if not more.sent and not more.skipped:
                break
            sent, skipped, sweeps = sent + len(more.sent), skipped + len(more.skipped), sweeps + 1
    total = first.seconds + rest.seconds
    label = f"{counts['threads']:,} threads, {counts['reminders']:,} reminders"
    sec.rows.append(Row("reminders", f"first sweep, {label}", fmt_s(first.seconds),
                        f"{fmt_s(bare_s)} ({bare_label}, {bare_n:,} due)",
                        f"{first.seconds / bare_s:,.0f}×", "< 2 s", first.seconds < 2,
                        f"{len(res.sent)} sent, {len(res.skipped)} skipped, "
                        f"{len(res.recomputed)} due dates moved; {first_cpu:.2f} s of CPU",
                        value=first.seconds, higher_is_better=False))
    sec.rows.append(Row("reminders", f"every sweep until nothing is due ({sweeps} sweeps)",
                        fmt_s(total), fmt_s(bare_s), f"{total / bare_s:,.0f}×", "", None,
                        f"{sent} sent, {skipped} skipped of {counts['due']} due",
                        value=total, higher_is_better=False))
    sec.rows.append(Row("reminders", "finding what is due (`Reminders.due`, read-only)",
                        fmt_s(find.seconds), "", "", "", None,
                        f"{len(due)} listed (at most 500 per sweep)",
                        value=find.seconds, higher_is_better=False))
    sec.notes.append(
        f"{counts['running']:,} of the {counts['threads']:,} threads have a running clock; "
        f"the store was generated in {gen.seconds:.0f} s. Sweep at {now:%a %d %b %Y %H:%M:%S} UTC.")
    site.close()
    return sec
