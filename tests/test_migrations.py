"""An existing site's database upgrades in place, with its data, on SQLite and PostgreSQL."""
from __future__ import annotations

from collections.abc import Iterator
from datetime import date, datetime, timezone
from dataclasses import replace

import pytest
from alembic import command
from sqlalchemy import text

from conftest import Site
from mailflow.site import Site as MfSite
from mailflow.store import db
from mailflow.store.repository import Store
from test_reminders import request_sent_on, START
from test_store_backends import _pg_database


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, site: Site) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{site.dir}/var/old.db"
    else:
        gen = _pg_database()
        yield next(gen)
        next(gen, None)


def test_upgrade_from_the_first_schema_keeps_the_data(site: Site, url: str) -> None:
    engine = db.make_engine(url)
    with engine.connect() as conn:
        with conn.begin():
            command.upgrade(db._alembic_config(conn), "0001")
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO threads (kind, state, authority, law, title, body, citizen_email, "
            "citizen_name, request_token, reply_token, created_at, sent_at, delivery_status) VALUES "
            "('foi', 'waiting_response', 'camden', 'uk-foia', 'Old one', 'b', 'a@b.example', "
            "'A', 'tok1tok1tok1', 'tok2tok2tok2', CURRENT_TIMESTAMP, :sent, 'ok')"),
            {"sent": datetime(2026, 3, 2, 10, 30, tzinfo=timezone.utc)})
    engine.dispose()
    store = Store(url).migrate()
    with store.read() as tx:
        (t,) = tx.threads()
        assert t.title == "Old one" and t.allow == "anybody" and t.hidden is False
        assert t.clock_start == date(2026, 3, 2)
    store.close()
    # and the site works on it
    mf = MfSite.open(site.config)
    mf = MfSite(settings=replace(mf.settings, database=replace(mf.settings.database, url=url)),
                rules=mf.rules)
    tid = request_sent_on(mf, START)
    assert tid == t.id + 1
    mf.close()


def test_upgrade_to_fault_reports_keeps_the_threads_and_adds_reports(site: Site, url: str) -> None:
    """0005 → 0006 on an existing site: its FOI threads stay, and reports can be stored."""
    from mailflow.core.geo import Point
    engine = db.make_engine(url)
    with engine.connect() as conn:
        with conn.begin():
            command.upgrade(db._alembic_config(conn), "0005")
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO threads (kind, state, authority, law, title, body, citizen_email, "
            "citizen_name, request_token, reply_token, created_at, delivery_status) VALUES "
            "('foi', 'waiting_response', 'camden', 'uk-foia', 'Old one', 'b', 'a@b.example', "
            "'A', 'tok1tok1tok1', 'tok2tok2tok2', CURRENT_TIMESTAMP, 'ok')"))
    engine.dispose()
    store = Store(url).migrate()
    with store.tx() as tx:
        (old,) = tx.threads()
        assert old.title == "Old one" and tx.report(old.id) is None and tx.reports() == []
        tid = tx.create_thread(kind="report", state="open", authority="wessex", law="",
                               title="Pothole", body="Deep.", citizen_email="c@d.example",
                               citizen_name="C", request_token="tok3tok3tok3",
                               reply_token="tok4tok4tok4")
        tx.create_report(tid, category="pothole", lat=51.1652, lon=-1.4497,
                         location_source="text", location_text="51.1652, -1.4497",
                         area="wessex")
    with store.read() as tx:
        (r,) = tx.reports(states=["open"], category="pothole", area="wessex")
        assert (r.thread_id, r.lat, r.lon, r.fixed_at) == (tid, 51.1652, -1.4497, None)
        ((near, metres),) = tx.open_reports_near("pothole", Point(51.1653, -1.4497), 100)
        assert near.thread_id == tid and 10 < metres < 12
        assert tx.open_reports_near("bins", Point(51.1653, -1.4497), 100) == []
        assert tx.open_reports_near("pothole", Point(51.1752, -1.4497), 100) == []
    store.close()


def test_the_fast_head_is_alembics_head() -> None:
    """`known_head` reads the revision files without Alembic; it must agree with Alembic."""
    assert db.known_head() is not None
    assert db.known_head() == db.head_revision()


def test_a_command_on_a_current_database_does_not_import_alembic(site: Site) -> None:
    """Alembic (with Mako) is only loaded when there is a migration to run: every admin
    command and every `mailflow ingest` from an MTA's pipe would pay for it otherwise."""
    import subprocess
    import sys
    code = ("import sys; from mailflow.site import Site; s = Site.open(sys.argv[1]); "
            "s.store; print('alembic' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, str(site.config)], capture_output=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode().strip() == "False"


def test_the_clock_check_reads_only_its_covering_index(store) -> None:  # type: ignore[no-untyped-def]
    """The reminder sweep's check of every running clock (`Clock.stale`) is answered from
    ix_threads_clock alone, its groups in index order (migration 0012): no read of the thread
    rows and no sort, at 100,000 threads 0.018 s of CPU where it took 0.12 (bench/README.md)."""
    from mailflow.clock import Clock
    _, _, groups = Clock.clock_groups()
    with store.read() as tx:
        sql = groups.compile(dialect=tx.c.dialect, compile_kwargs={"literal_binds": True})
        plan = " ".join(str(r) for r in tx.c.exec_driver_sql(
            ("EXPLAIN QUERY PLAN " if tx.c.dialect.name == "sqlite" else "EXPLAIN ") + str(sql)))
    if tx.c.dialect.name == "sqlite":
        assert "COVERING INDEX ix_threads_clock" in plan, plan
        assert "TEMP B-TREE" not in plan, plan
    else:   # an empty table: the planner may scan it; the index must at least exist
        with store.read() as tx:
            names = {r[0] for r in tx.c.exec_driver_sql(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'threads'")}
        assert "ix_threads_clock" in names and "ix_threads_state" not in names, names
