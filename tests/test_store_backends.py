"""The pipeline and the outbox over both stores: SQLite and a real PostgreSQL on 127.0.0.1:5432.

Also the outbox's retry and failure paths against a real SMTP smarthost (aiosmtpd) that
answers 4xx, then 250, or 5xx.
"""
from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta

import pytest
from sqlalchemy import select

from mailflow.store.tables import messages as messages_t
from aiosmtpd.controller import Controller

from conftest import DOMAIN, JANE, Site, compose, free_port
from mailflow.config import OutboundSettings, SmarthostSettings
from mailflow.outbound.outbox import deliver_due
from mailflow.outbound.transports import SmtpTransport
from mailflow.pipeline import Pipeline
from mailflow.site import Site as MfSite
from mailflow.spool import Envelope
from mailflow.store.repository import utcnow

PG_ADMIN = os.environ.get("MAILFLOW_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
AUTHORITY = "foi@camden.gov.example"


def _pg_database(template: str | None = None) -> Iterator[str]:
    """A fresh database, dropped afterwards (a copy of `template` when one is named)."""
    import psycopg
    name = f"mailflow_test_{secrets.token_hex(4)}"
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL not reachable: {e}")
    admin.execute(f'CREATE DATABASE "{name}"'
                  + (f' TEMPLATE "{template}"' if template else ""))
    try:
        yield PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def mf(request: pytest.FixtureRequest, site: Site) -> Iterator[MfSite]:
    s = MfSite.open(site.config)
    if request.param == "postgresql":
        gen = _pg_database()
        url = next(gen)
        s = MfSite(settings=replace(s.settings, database=replace(s.settings.database, url=url)),
                   rules=s.rules)
        try:
            yield s
        finally:
            s.close()
            next(gen, None)
    else:
        yield s
        s.close()


def ingest(mf: MfSite, raw: bytes, rcpt: str, sender: str = "someone@example.org") -> list[int]:
    result = Pipeline(mf).process(raw, Envelope(mail_from=sender, rcpt_tos=[rcpt], via="test"))
    return result.outbox_ids


def start_request(mf: MfSite) -> tuple[int, str]:
    ids = ingest(mf, compose(f"Jane <{JANE}>", f"camden@{DOMAIN}", "Budget", "Send it."),
                 f"camden@{DOMAIN}", JANE)
    assert len(ids) == 1
    with mf.store.tx() as tx:
        t = tx.threads()[0]
    confirm = f"confirm-{t.confirm_token}@{DOMAIN}"
    ids = ingest(mf, compose(f"Jane <{JANE}>", confirm, "Re", "Yes"), confirm, JANE)
    assert len(ids) == 1
    return t.id, f"request-{t.id}-{t.request_token}@{DOMAIN}"


def test_pipeline_is_idempotent_on_both_stores(mf: MfSite) -> None:
    tid, req = start_request(mf)
    answer = compose(f"FOI <{AUTHORITY}>", req, "RE", "The answer.")
    assert len(ingest(mf, answer, req)) == 1
    assert ingest(mf, answer, req) == []            # same bytes again: nothing new
    with mf.store.tx() as tx:
        kinds = [m.kind for m in tx.messages(tid)]
        assert kinds.count("response") == 1
        assert tx.thread(tid).state == "waiting_response"  # type: ignore[union-attr]
        assert len(tx.outbox_rows()) == 3               # confirmation, request, forward


def test_same_message_id_different_body_is_kept_and_flagged(mf: MfSite) -> None:
    tid, req = start_request(mf)
    ingest(mf, compose(f"FOI <{AUTHORITY}>", req, "RE", "First.", msgid="<same@gov.example>"), req)
    ingest(mf, compose(f"FOI <{AUTHORITY}>", req, "RE", "Second.", msgid="<same@gov.example>"), req)
    with mf.store.tx() as tx:
        responses = [m for m in tx.messages(tid) if m.kind == "response"]
    assert len(responses) == 2
    assert responses[1].flags == ["same_message_id_different_body"]


def test_the_same_message_id_on_another_thread_is_no_duplicate(mf: MfSite) -> None:
    """A Message-ID is looked up by its own index and the thread checked after: the same
    id on another thread neither hides this message nor flags it."""
    first, req1 = start_request(mf)
    ids = ingest(mf, compose(f"Jane <{JANE}>", f"camden@{DOMAIN}", "Parks", "And parks?"),
                 f"camden@{DOMAIN}", JANE)
    assert len(ids) == 1
    with mf.store.tx() as tx:
        (t,) = [t for t in tx.threads() if t.id != first]
    confirm = f"confirm-{t.confirm_token}@{DOMAIN}"
    ingest(mf, compose(f"Jane <{JANE}>", confirm, "Re", "Yes"), confirm, JANE)
    req2 = f"request-{t.id}-{t.request_token}@{DOMAIN}"
    ingest(mf, compose(f"FOI <{AUTHORITY}>", req1, "RE", "One.", msgid="<both@gov.example>"), req1)
    ingest(mf, compose(f"FOI <{AUTHORITY}>", req2, "RE", "Two.", msgid="<both@gov.example>"), req2)
    ingest(mf, compose(f"FOI <{AUTHORITY}>", req2, "RE", "Two.", msgid="<both@gov.example>"), req2)
    with mf.store.tx() as tx:
        for tid in (first, t.id):
            (response,) = [m for m in tx.messages(tid) if m.kind == "response"]
            assert response.flags == [] and response.message_id == "<both@gov.example>"
        assert [m.thread_id for m in tx.thread_messages_with_id(t.id, "<both@gov.example>")] \
            == [t.id]


def test_outbox_claim_is_exclusive_and_leases_expire(mf: MfSite) -> None:
    start_request(mf)
    now = utcnow()
    with mf.store.tx() as tx:
        first = tx.claim_outbox(now, timedelta(minutes=10))
    with mf.store.tx() as tx:
        assert tx.claim_outbox(now, timedelta(minutes=10)) == []   # leased
    with mf.store.tx() as tx:
        again = tx.claim_outbox(now + timedelta(minutes=11), timedelta(minutes=10))
    assert {r.id for r in again} == {r.id for r in first}       # a crashed sender's rows return


class _Smarthost:
    """A real SMTP server that answers RCPT with the codes it is given, in turn."""

    def __init__(self, codes: list[str]):
        self.codes, self.received = codes, []

    async def handle_RCPT(self, server, session, envelope, address, options):  # type: ignore[no-untyped-def]
        code = self.codes.pop(0) if self.codes else "250 OK"
        if code.startswith("250"):
            envelope.rcpt_tos.append(address)
        return code

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        self.received.append(envelope.content)
        return "250 2.0.0 queued"


def smarthost(codes: list[str]) -> tuple[Controller, _Smarthost, SmarthostSettings]:
    handler = _Smarthost(codes)
    port = free_port()
    c = Controller(handler, hostname="127.0.0.1", port=port, server_hostname="smarthost.test")
    c.start()
    return c, handler, SmarthostSettings(host="127.0.0.1", port=port, tls="none", user=None,
                                         password=None, timeout=10)


def test_temporary_failure_is_retried_with_backoff(mf: MfSite) -> None:
    tid, _ = start_request(mf)
    ctl, host, hs = smarthost(["451 4.3.0 try later", "451 4.3.0 try later"])
    try:
        transport = SmtpTransport(hs, local_hostname="ask.example")
        counts = asyncio.run(deliver_due(mf.store, transport, [60, 300]))
        assert counts == {"sent": 0, "retry": 2, "failed": 0}
        with mf.store.tx() as tx:
            rows = tx.outbox_rows()
            assert all(r.state == "queued" and r.attempts == 1 for r in rows)
            assert all(r.next_attempt_at > utcnow() + timedelta(seconds=50) for r in rows)
            # bring them due again and deliver
            for r in rows:
                tx.outbox_retry(r.id, "test", utcnow() - timedelta(seconds=1))
        counts = asyncio.run(deliver_due(mf.store, transport, [60, 300]))
        assert counts["sent"] == 2 and len(host.received) == 2
        with mf.store.tx() as tx:
            assert tx.thread(tid).delivery_status != "failed"  # type: ignore[union-attr]
    finally:
        ctl.stop()


def test_permanent_failure_is_recorded_on_the_thread(mf: MfSite) -> None:
    tid, _ = start_request(mf)
    with mf.store.tx() as tx:  # the confirmation was delivered already
        conf = next(r for r in tx.outbox_rows() if r.rcpt == JANE)
        tx.outbox_sent(conf.id, "test")
    ctl, host, hs = smarthost(["550 5.1.1 no such user"])
    try:
        counts = asyncio.run(deliver_due(mf.store, SmtpTransport(hs, local_hostname="a.example"),
                                         [60]))
    finally:
        ctl.stop()
    assert counts == {"sent": 0, "retry": 0, "failed": 1}
    with mf.store.tx() as tx:
        t = tx.thread(tid)
        assert t is not None and t.delivery_status == "failed" and "550" in (t.delivery_detail or "")
        assert [q.reason for q in tx.queue()] == ["delivery_failed"]


def test_a_large_outbox_is_delivered_in_one_call(mf: MfSite) -> None:
    """Regression: rows were claimed 50 at a time and the rest waited for the next sweep."""
    from mailflow.delivery import deliver
    ids = []
    for n in range(60):
        ids += ingest(mf, compose(f"Jane <{JANE}>", f"camden@{DOMAIN}", f"Request {n}", "Send."),
                      f"camden@{DOMAIN}", JANE)
    counts = asyncio.run(deliver(mf, ids))
    assert counts["sent"] == 60
    with mf.store.read() as tx:
        assert {r.state for r in tx.outbox_rows()} == {"sent"}


def test_a_nul_in_decoded_text_is_stored_on_every_backend(mf: MfSite) -> None:
    """PostgreSQL refuses NUL in text; real mail (an Office 365 bounce in the corpus) has it."""
    with mf.store.tx() as tx:
        sha = tx.put_raw(b"Subject: x\r\n\r\nbad \x00 byte\r\n")
        pk = tx.add_message(thread_id=None, direction="in", kind="response", message_id="<n@x>",
                            from_addr="a@x.example", from_name="A\x00", to_addrs=[],
                            subject="x\x00y", date=None, text="bad \x00 byte", raw_sha256=sha)
    with mf.store.read() as tx:
        m = [m for m in tx.c.execute(select(messages_t)).all() if m.id == pk][0]
    assert m.text == "bad \ufffd byte" and m.subject == "x\ufffdy"


def test_nul_in_mail_text_is_stored_on_both_stores(mf: MfSite) -> None:
    """PostgreSQL's text and jsonb refuse NUL, which hostile or broken mail carries in its
    subject and body (this failed only on PostgreSQL until site tests ran on both): every
    stored string has U+FFFD where a NUL was, on both stores alike."""
    ids = ingest(mf, compose(f"Jane <{JANE}>", f"camden@{DOMAIN}", "Bud\x00get",
                             "Send\x00 it."), f"camden@{DOMAIN}", JANE)
    assert len(ids) == 1
    with mf.store.tx() as tx:
        t = tx.threads()[0]
        assert "\x00" not in (t.title or "") and "Bud\ufffdget" in (t.title or "")
        tx.add_event(t.id, "test", "note", {"why": "a\x00b", "list": ["c\x00"]})
        tx.update_thread(t.id, title="New\x00title")
        qid = tx.add_queue_item("test", "sum\x00mary", detail={"k": "v\x00"})
    with mf.store.tx() as tx:
        assert tx.events(t.id)[-1]["detail"] == {"why": "a\ufffdb", "list": ["c\ufffd"]}
        assert tx.thread(t.id).title == "New\ufffdtitle"  # type: ignore[union-attr]
        item = tx.queue_item(qid)
        assert item is not None and item.summary == "sum\ufffdmary"


def test_a_busy_sqlite_database_is_a_conflict_and_a_missing_table_is_not(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`is_conflict` tells a clash between transactions (try again shortly) from an error in
    the work itself, on the real errors."""
    import sqlite3 as sq
    from mailflow.errors import StoreError
    from mailflow.store.repository import is_conflict
    path = str(tmp_path / "busy.db")
    a = sq.connect(path, timeout=0, isolation_level=None)
    b = sq.connect(path, timeout=0, isolation_level=None)
    try:
        a.execute("CREATE TABLE t (x)")
        a.execute("BEGIN IMMEDIATE")
        with pytest.raises(sq.OperationalError) as busy:
            b.execute("BEGIN IMMEDIATE")
        assert is_conflict(busy.value)
        try:
            raise StoreError("database error") from busy.value
        except StoreError as wrapped:
            assert is_conflict(wrapped)
        with pytest.raises(sq.OperationalError) as missing:
            b.execute("SELECT * FROM nowhere")
        assert not is_conflict(missing.value)
        assert not is_conflict(ValueError("database is locked"))
    finally:
        a.close()
        b.close()
