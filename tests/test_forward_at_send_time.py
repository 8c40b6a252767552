"""The forward to the citizen is queued with the reply and composed by the outbox sender.

The pipeline stores an authority's reply and, in the same transaction, an outbox row that says
"forward message N" (`queue_forward`); the sender composes, signs and stores the forward in the
transaction that claims the row, then sends it. What must hold: the citizen gets every forward,
once, across a crash at any point (between store and compose, during compose, between compose
and send), with two senders racing, and whatever happened to the thread in between. On SQLite
and PostgreSQL (the `site` fixture runs both).
"""
from __future__ import annotations

import asyncio
import json
import threading
from datetime import timedelta

import pytest

from conftest import JANE, Site, compose
from mailflow.outbound import outbox as O
from mailflow.pipeline import Pipeline
from mailflow.site import Site as MfSite
from mailflow.spool import Envelope
from mailflow.store.repository import utcnow
from test_pipeline_batch import AUTHORITY, _sent_request


def _ready(site: Site, mf: MfSite, title: str) -> tuple[int, str]:
    """A request sent (its confirmation and letter delivered): (thread id, its address)."""
    tid, address = _sent_request(site, mf, title)
    _deliver(mf)
    site.new_mail()
    return tid, address


def _reply(mf: MfSite, address: str, tag: str, body: str = "Here is the answer.") -> int:
    """An authority's reply through the pipeline; returns the forward's outbox id."""
    r = Pipeline(mf).process(compose(f"Camden FOI <{AUTHORITY}>", address, f"Re: {tag}", body),
                             Envelope(mail_from=AUTHORITY, rcpt_tos=[address], via="test"))
    assert r.outcomes[0].outcome == "response", r
    assert len(r.outbox_ids) == 1
    return r.outbox_ids[0]


def _deliver(mf: MfSite, ids: list[int] | None = None) -> dict[str, int]:
    from mailflow.delivery import deliver
    return asyncio.run(deliver(mf, ids))


def _short_lock_timeout(mf: MfSite) -> None:
    """Every new connection to the site's PostgreSQL database gives up a lock wait after
    300 ms (the pool is emptied, so the next connections take the setting)."""
    from sqlalchemy import text
    db = mf.store.engine.url.database
    with mf.store.engine.begin() as c:
        c.execute(text(f'ALTER DATABASE "{db}" SET lock_timeout = \'300ms\''))
    mf.store.engine.dispose()


def _forwards(mf: MfSite, tid: int) -> list:  # type: ignore[type-arg]
    with mf.store.read() as tx:
        return [m for m in tx.messages(tid) if m.kind == "forward"]


def _jane(site: Site) -> list:  # type: ignore[type-arg]
    return [m for _, m, _ in site.mail_to(JANE) if m["Subject"].startswith("Re: ")]


def test_the_reply_is_stored_with_a_pending_forward_then_sent_once(site: Site,
                                                                    mf: MfSite) -> None:
    tid, address = _ready(site, mf, "Pothole budget")
    row_id = _reply(mf, address, "Pothole budget", "We spent 12,000 pounds.")
    with mf.store.read() as tx:
        row = next(r for r in tx.outbox_rows() if r.id == row_id)
        src = tx.message(row.message_pk)
    assert row.compose == "forward" and row.state == "queued"
    assert src is not None and src.kind == "response"   # names what it forwards
    assert _forwards(mf, tid) == []                     # nothing composed yet

    assert _deliver(mf, [row_id]) == {"sent": 1, "retry": 0, "failed": 0}
    fwd, = _forwards(mf, tid)
    with mf.store.read() as tx:
        row = next(r for r in tx.outbox_rows() if r.id == row_id)
    assert row.compose is None and row.message_pk == fwd.id and row.state == "sent"
    got, = _jane(site)
    assert got["Message-ID"] == fwd.message_id
    assert "DKIM-Signature" in got
    assert "12,000 pounds" in got.get_content()
    assert address.split("@")[0] not in str(got["From"])   # from the citizen-side address
    # `mailflow thread show` lists it.
    kinds = [m["kind"] for m in site.json("thread", "show", str(tid))["messages"]]
    assert kinds.count("forward") == 1

    assert _deliver(mf) == {"sent": 0, "retry": 0, "failed": 0}
    assert len(_forwards(mf, tid)) == 1 and _jane(site) == []


def test_a_crash_between_store_and_forward_loses_nothing(site: Site, mf: MfSite) -> None:
    """The process dies after the pipeline's commit, before any delivery: a new process's
    sweep finds the pending row and forwards it once."""
    tid, address = _ready(site, mf, "Crash before forward")
    _reply(mf, address, "Crash before forward")
    mf.close()
    again = MfSite.open(site.config)
    try:
        assert _deliver(again)["sent"] == 1
        assert len(_forwards(again, tid)) == 1
        assert _deliver(again)["sent"] == 0
    finally:
        again.close()
    assert len(_jane(site)) == 1


def test_a_crash_while_composing_leaves_the_row_to_compose_again(
        site: Site, mf: MfSite, monkeypatch: pytest.MonkeyPatch) -> None:
    """Composing stores the signed bytes and the message, then marks the row; dying in the
    middle rolls all of it back (one transaction with the claim), so no half-made forward
    exists and the next attempt composes it once."""
    tid, address = _ready(site, mf, "Crash while composing")
    row_id = _reply(mf, address, "Crash while composing")
    real = O.store_message

    def dies_after_storing(*a, **k):  # type: ignore[no-untyped-def]
        real(*a, **k)
        raise KeyboardInterrupt   # not an Exception: nothing catches it, as with a kill

    monkeypatch.setattr("mailflow.pipeline.store_message", dies_after_storing)
    with pytest.raises(KeyboardInterrupt):
        _deliver(mf, [row_id])
    monkeypatch.undo()
    assert _forwards(mf, tid) == []
    with mf.store.read() as tx:
        row = next(r for r in tx.outbox_rows() if r.id == row_id)
    assert (row.state, row.compose, row.attempts) == ("queued", "forward", 0)
    assert _deliver(mf, [row_id])["sent"] == 1
    assert len(_forwards(mf, tid)) == 1 and len(_jane(site)) == 1


def test_a_crash_between_compose_and_send_sends_the_same_message_once(
        site: Site, mf: MfSite) -> None:
    """Composed and claimed, then the sender dies before it sends: after the lease the row
    is sent with the message composed the first time (same Message-ID), once."""
    tid, address = _ready(site, mf, "Crash after compose")
    row_id = _reply(mf, address, "Crash after compose")

    class Dies:
        async def deliver(self, *a, **k):  # type: ignore[no-untyped-def]
            raise asyncio.CancelledError   # the task is killed mid-send

    from mailflow.delivery import _composer
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(O.deliver_due(mf.store, Dies(), (60,), ids=[row_id],
                                  compose=_composer(mf)))
    fwd, = _forwards(mf, tid)
    with mf.store.read() as tx:
        row = next(r for r in tx.outbox_rows() if r.id == row_id)
    assert (row.state, row.compose, row.message_pk) == ("sending", None, fwd.id)

    later = utcnow() + O.LEASE + timedelta(seconds=1)
    counts = asyncio.run(O.deliver_due(mf.store, mf.transport, (60,), ids=[row_id],
                                       now=lambda: later, compose=_composer(mf)))
    assert counts["sent"] == 1
    assert [m.id for m in _forwards(mf, tid)] == [fwd.id]
    got, = _jane(site)
    assert got["Message-ID"] == fwd.message_id


def test_two_senders_racing_compose_and_send_each_forward_once(site: Site,
                                                               mf: MfSite) -> None:
    tid, address = _ready(site, mf, "Racing senders")
    ids = [_reply(mf, address, f"Racing senders {i}", f"Part {i}.") for i in range(6)]
    other = MfSite.open(site.config)
    start = threading.Barrier(2)
    counts: list[dict[str, int]] = []

    def sender(s: MfSite) -> None:
        start.wait()
        counts.append(_deliver(s, ids))

    try:
        threads = [threading.Thread(target=sender, args=(s,)) for s in (mf, other)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        other.close()
    assert sum(c["sent"] for c in counts) == 6, counts
    assert sum(c["retry"] + c["failed"] for c in counts) == 0, counts
    assert len(_forwards(mf, tid)) == 6
    got = _jane(site)
    assert len(got) == 6
    assert len({m["Message-ID"] for m in got}) == 6


def test_a_forward_is_sent_even_if_the_thread_was_hidden_or_withdrawn_meanwhile(
        site: Site, mf: MfSite) -> None:
    """The reply reached the request before a moderator hid the thread (or the message) from
    the archive, or the citizen withdrew it: she still gets what the authority wrote to her.
    Hiding is about publication; withdrawing stops what mailflow sends the authority."""
    tid, address = _ready(site, mf, "Hidden meanwhile")
    row_id = _reply(mf, address, "Hidden meanwhile", "The figures are attached.")
    with mf.store.tx() as tx:
        row = next(r for r in tx.outbox_rows() if r.id == row_id)
        tx.set_message_hidden(row.message_pk, True)
        tx.update_thread(tid, hidden=True, state="user_withdrawn")
    assert _deliver(mf, [row_id])["sent"] == 1
    got, = _jane(site)
    assert "The figures are attached." in got.get_content()


def test_a_forward_that_cannot_be_composed_is_retried_then_put_before_an_admin(
        site: Site, mf: MfSite, monkeypatch: pytest.MonkeyPatch) -> None:
    tid, address = _ready(site, mf, "Cannot compose")
    row_id = _reply(mf, address, "Cannot compose")

    def broken(self, tx, row):  # type: ignore[no-untyped-def]
        raise RuntimeError("a bug in composing")

    monkeypatch.setattr(Pipeline, "compose_forward", broken)
    assert _deliver(mf, [row_id]) == {"sent": 0, "retry": 1, "failed": 0}
    with mf.store.read() as tx:
        row = next(r for r in tx.outbox_rows() if r.id == row_id)
    assert row.state == "queued" and row.compose == "forward"
    assert "a bug in composing" in (row.last_error or "")

    from mailflow.delivery import _composer
    late = utcnow() + O.GIVE_UP_AFTER + timedelta(hours=1)
    counts = asyncio.run(O.deliver_due(mf.store, mf.transport, (60,), ids=[row_id],
                                       now=lambda: late, compose=_composer(mf)))
    assert counts == {"sent": 0, "retry": 0, "failed": 1}
    with mf.store.read() as tx:
        assert next(r for r in tx.outbox_rows() if r.id == row_id).state == "failed"
        assert [q.reason for q in tx.queue() if q.thread_id == tid] == ["delivery_failed"]
    assert _forwards(mf, tid) == [] and _jane(site) == []


def test_the_forward_is_what_the_pipeline_used_to_compose(site: Site, mf: MfSite) -> None:
    """Composed later from the stored bytes, the forward has the reply's text, subject,
    attachments and sender line, as when it was composed inline."""
    tid, address = _ready(site, mf, "Same forward")
    raw = compose(f"Camden FOI <{AUTHORITY}>", address, "Re: Same forward", "See attached.")
    from email import message_from_bytes, policy
    msg = message_from_bytes(raw, policy=policy.default)
    msg.make_mixed()
    msg.add_attachment(b"%PDF-1.4 figures", maintype="application", subtype="pdf",
                       filename="figures.pdf")
    r = Pipeline(mf).process(msg.as_bytes(),
                             Envelope(mail_from=AUTHORITY, rcpt_tos=[address], via="test"))
    assert r.outcomes[0].outcome == "response"
    _deliver(mf, r.outbox_ids)
    got, = _jane(site)
    assert got["Subject"] == "Re: Same forward"
    assert "Camden FOI <foi@camden.gov.example>" in got.get_body(("plain",)).get_content()
    att, = list(got.iter_attachments())
    assert att.get_filename() == "figures.pdf"
    assert att.get_content() == b"%PDF-1.4 figures"


def test_a_clash_with_another_transaction_while_composing_is_tried_again_in_seconds(
        site: Site, mf: MfSite) -> None:
    """PostgreSQL aborts one of two transactions that lock the same rows in opposite orders
    (or, with `lock_timeout`, one that waits too long). Composing a forward stores a message
    on its thread, which locks the thread's change marker; when that clashes, nothing is
    wrong with the row: it is given back for a try in seconds, not counted as an attempt
    (it used to wait the retry schedule's 300 s: the three-daemon crash test found it)."""
    if mf.store.engine.dialect.name != "postgresql":
        pytest.skip("a lock wait with a timeout: PostgreSQL's; SQLite's writers queue whole")
    from sqlalchemy import text
    tid, address = _ready(site, mf, "Clashing senders")
    row_id = _reply(mf, address, "Clashing senders")
    _short_lock_timeout(mf)
    holder = mf.store.engine.connect()
    try:
        holder.begin()
        assert holder.execute(text("SELECT thread_id FROM thread_changes WHERE thread_id = :t "
                                   "FOR UPDATE"), {"t": tid}).all()
        before = utcnow()
        assert _deliver(mf, [row_id]) == {"sent": 0, "retry": 1, "failed": 0}
        with mf.store.read() as tx:
            row = next(r for r in tx.outbox_rows() if r.id == row_id)
        assert row.state == "queued" and row.compose == "forward" and row.attempts == 0
        assert "clashed with another transaction" in (row.last_error or "")
        assert row.next_attempt_at is not None
        assert before < row.next_attempt_at <= utcnow() + O.CONFLICT_RETRY
        assert _forwards(mf, tid) == []
    finally:
        holder.rollback()
        holder.close()
    from mailflow.delivery import _composer
    soon = utcnow() + O.CONFLICT_RETRY
    assert asyncio.run(O.deliver_due(mf.store, mf.transport, (300,), ids=[row_id],
                                     now=lambda: soon, compose=_composer(mf)))["sent"] == 1
    assert len(_forwards(mf, tid)) == 1 and len(_jane(site)) == 1


def test_a_batch_that_clashes_with_another_transaction_is_processed_again_at_once(
        site: Site, mf: MfSite) -> None:
    """Two daemons' batches can lock the same threads in opposite orders; PostgreSQL then
    aborts one (here: a lock wait over `lock_timeout`). Nothing of it was written; its
    messages go back to the spool and are queued again at once, not left for the spool's
    sweep 30 s later (the three-daemon crash test saw three such batches in 1,200 messages)."""
    if mf.store.engine.dialect.name != "postgresql":
        pytest.skip("a lock wait with a timeout: PostgreSQL's")
    from sqlalchemy import text
    from mailflow.processor import Processor
    tid, address = _ready(site, mf, "Clashing batches")
    ids = [mf.spool.put(compose(f"Camden FOI <{AUTHORITY}>", address, f"Re: part {i}",
                                f"Part {i}."),
                        Envelope(mail_from=AUTHORITY, rcpt_tos=[address], via="test"))
           for i in range(3)]
    _short_lock_timeout(mf)
    holder = mf.store.engine.connect()
    p = Processor(mf, recover=False)
    try:
        holder.begin()
        holder.execute(text("SELECT 1 FROM thread_changes WHERE thread_id = :t FOR UPDATE"),
                       {"t": tid})
        asyncio.run(p.process_many(ids))
    finally:
        holder.rollback()
        holder.close()
    queued = []
    while not p.wakeup.empty():
        entry = p.wakeup.get_nowait()
        assert entry is not None
        queued.append(entry[0])
    assert sorted(queued) == sorted(ids)            # again at once, not at the next sweep
    assert sorted(mf.spool.pending()) == sorted(ids)
    for id in ids:   # a clash is not the message's fault: no attempt counted
        meta = json.loads((mf.spool.dirs["new"] / f"{id}.json").read_text())
        assert meta["attempts"] == 0 and "not counted" in meta["errors"][-1]
    with mf.store.read() as tx:
        assert not [m for m in tx.messages(tid) if m.subject.startswith("Re: part")]
    asyncio.run(p.process_many(queued))
    with mf.store.read() as tx:
        assert len([m for m in tx.messages(tid) if m.direction == "in"
                    and (m.subject or "").startswith("Re: part")]) == 3
    assert mf.spool.pending() == []


def test_a_batch_takes_its_threads_in_id_order_before_writing(site: Site, mf: MfSite) -> None:
    """Replies to two threads, the higher id first: the batch takes both threads'
    `thread_changes` rows in id order before it writes anything, so while it waits for the
    lower (held by another transaction) it holds nothing of the higher, which another batch
    may then take: no deadlock. (It used to write the first message, locking its thread,
    and then wait for the second's.)"""
    if mf.store.engine.dialect.name != "postgresql":
        pytest.skip("row locks: PostgreSQL's; SQLite's writers queue whole")
    import time

    from sqlalchemy import text
    low, low_address = _ready(site, mf, "Lower thread")
    high, high_address = _ready(site, mf, "Higher thread")
    assert low < high
    items = [mf.spool.claim(mf.spool.put(
        compose(f"Camden FOI <{AUTHORITY}>", address, f"Re: {tag}", "Answer."),
        Envelope(mail_from=AUTHORITY, rcpt_tos=[address], via="test")))
        for address, tag in ((high_address, "high"), (low_address, "low"))]
    holder = mf.store.engine.connect()
    prober = mf.store.engine.connect()
    outcome: list[object] = []
    try:
        holder.begin()
        holder.execute(text("SELECT 1 FROM thread_changes WHERE thread_id = :t FOR UPDATE"),
                       {"t": low})
        batch = threading.Thread(target=lambda: outcome.append(
            Pipeline(mf).process_items(mf.spool, items)))   # type: ignore[arg-type]
        batch.start()
        deadline = time.monotonic() + 20
        while True:   # until the batch waits for the lower thread's row
            waiting = prober.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'")).scalar()
            prober.rollback()
            if waiting or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert waiting, "the batch never waited for the lower thread"
        with prober.begin():   # the higher thread's row is free: the batch has not written it
            got = prober.execute(text("SELECT thread_id FROM thread_changes WHERE thread_id = :t "
                                      "FOR UPDATE NOWAIT"), {"t": high}).all()
            assert got == [(high,)]
    finally:
        holder.rollback()
        holder.close()
        prober.close()
    batch.join(timeout=30)
    assert [[r.outcomes[0].outcome for r in rs] for rs in outcome] == [["response", "response"]]


def test_the_processor_sends_a_row_given_back_for_seconds_when_it_falls_due(
        site: Site, mf: MfSite) -> None:
    """A forward given back after a clash is due in 2 s; the processor flushes again then,
    not at its next 30 s sweep of the outbox."""
    if mf.store.engine.dialect.name != "postgresql":
        pytest.skip("a lock wait with a timeout: PostgreSQL's")
    from sqlalchemy import text
    from mailflow.processor import Processor
    tid, address = _ready(site, mf, "Due in seconds")
    _reply(mf, address, "Due in seconds")
    _short_lock_timeout(mf)
    holder = mf.store.engine.connect()
    p = Processor(mf, recover=False)

    async def go() -> None:
        holder.begin()
        holder.execute(text("SELECT 1 FROM thread_changes WHERE thread_id = :t FOR UPDATE"),
                       {"t": tid})
        await p.flush_outbox()           # the compose clashes: the row is due again in 2 s
        assert _forwards(mf, tid) == [] and p._tasks   # ... and a flush is planned for then
        holder.rollback()
        await asyncio.wait_for(asyncio.gather(*list(p._tasks)), 20)

    try:
        asyncio.run(go())
    finally:
        holder.close()
    assert len(_forwards(mf, tid)) == 1 and len(_jane(site)) == 1
