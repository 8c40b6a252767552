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
