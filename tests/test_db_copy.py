"""`mailflow db copy`: a site moves from SQLite to PostgreSQL and carries on where it was."""
from __future__ import annotations

from collections.abc import Iterator
from email.utils import parseaddr

import pytest

from conftest import DOMAIN, JANE, Site, compose
from test_store_backends import _pg_database


@pytest.fixture()
def pg_url() -> Iterator[str]:
    gen = _pg_database()
    yield next(gen)
    next(gen, None)


def _request(site: Site, title: str) -> None:
    assert site.ingest(compose(f"Jane <{JANE}>", f"camden@{DOMAIN}", title, "Which roads?"),
                       [f"camden@{DOMAIN}"], JANE) == 0
    asks = [parseaddr(str(m["Reply-To"]))[1] for _, m, _ in site.mail_to(JANE)]
    asks = [a for a in asks if a.startswith("confirm-")]
    assert len(asks) == 1, "one confirmation request"
    confirm = asks[0]
    assert site.ingest(compose(f"Jane <{JANE}>", confirm, "Re", "Yes"), [confirm], JANE) == 0


def test_a_site_moves_to_postgresql_and_carries_on(site: Site, pg_url: str) -> None:
    for title in ("Gritting routes", "Pothole budget", "Library hours"):
        _request(site, title)
    before = site.json("thread", "list")
    counts = site.json("status")
    r = site.run("db", "copy", "--to", pg_url)
    assert r.returncode == 0, r.stderr.decode()
    assert b"copied" in r.stdout and b"threads" in r.stdout

    site.set("database", "url", f'"{pg_url}"')
    assert site.json("thread", "list") == before
    moved = site.json("status")
    assert {k: moved[k] for k in ("threads", "messages", "outbox_queued")} == \
        {k: counts[k] for k in ("threads", "messages", "outbox_queued")}
    # New rows get new ids after the copied ones: the sequences were moved on.
    _request(site, "Street lights")
    after = site.json("thread", "list")
    new = [t for t in after if t["title"] == "Street lights"][0]
    assert new["id"] > max(t["id"] for t in before)
    # The audit of what came before is there too.
    assert site.json("thread", "show", str(before[0]["id"]))["messages"]


def test_copy_refuses_a_target_that_already_has_mail(site: Site, pg_url: str) -> None:
    _request(site, "Gritting routes")
    assert site.run("db", "copy", "--to", pg_url).returncode == 0
    again = site.run("db", "copy", "--to", pg_url)
    assert again.returncode != 0
    assert b"already has rows" in again.stderr + again.stdout


def test_copy_to_itself_is_refused(site: Site) -> None:
    url = "sqlite:///" + str(site.dir / "var" / "mailflow.db")
    r = site.run("db", "copy", "--to", url, "--from", url)
    assert r.returncode != 0 and b"same database" in r.stderr + r.stdout
