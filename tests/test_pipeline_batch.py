"""`Pipeline.process_items`: a batch of spooled messages in one transaction; without
savepoints first, and when a message raises, again with a savepoint each.

What it must keep from one-message-one-transaction: the same outcomes in the same order, a
failing message held back alone, nothing marked done before the commit, and a redo of the
whole batch (a crash before the spool was settled) changing nothing. On SQLite and on
PostgreSQL (the `site` fixture runs both).
"""
from __future__ import annotations


import pytest

from conftest import DOMAIN, JANE, Site, compose
from mailflow.errors import StoreError
from mailflow.pipeline import Pipeline, Result
from mailflow.site import Site as MfSite
from mailflow.spool import Envelope, SpoolItem

AUTHORITY = "foi@camden.gov.example"


def _sent_request(site: Site, mf: MfSite, title: str) -> tuple[int, str]:
    """A request made, confirmed and sent through the pipeline: (thread id, its address)."""
    from mailflow.core.addresses import confirm_address
    p = Pipeline(mf)
    r = p.process(compose(f"Jane <{JANE}>", f"camden@{DOMAIN}", title, "Which roads?"),
                  Envelope(mail_from=JANE, rcpt_tos=[f"camden@{DOMAIN}"], via="test"))
    tid = r.outcomes[0].thread_id
    assert tid is not None, r
    with mf.store.read() as tx:
        token = tx.thread(tid).confirm_token  # type: ignore[union-attr]
    confirm = confirm_address(token, DOMAIN)
    r = p.process(compose(f"Jane <{JANE}>", confirm, "Re: confirm", "Yes"),
                  Envelope(mail_from=JANE, rcpt_tos=[confirm], via="test"))
    assert r.outcomes[0].outcome == "request_sent", r
    with mf.store.read() as tx:
        thread = tx.thread(tid)
    assert thread is not None
    return tid, mf.request_address(thread)


def _spool(mf: MfSite, raws: list[tuple[bytes, str]]) -> list[SpoolItem]:
    ids = [mf.spool.put(raw, Envelope(mail_from=AUTHORITY, rcpt_tos=[rcpt], via="smtp",
                                      peer="127.0.0.1:1")) for raw, rcpt in raws]
    items = [mf.spool.claim(i) for i in ids]
    assert all(items)
    return items  # type: ignore[return-value]


def _replies(address: str, n: int, tag: str) -> list[tuple[bytes, str]]:
    return [(compose(f"Camden FOI <{AUTHORITY}>", address, f"Re: {tag} {i}",
                     f"Answer number {i} of {tag}."), address) for i in range(n)]


def _outcomes(results: list[Result | Exception]) -> list[str]:
    return [r.outcomes[0].outcome if isinstance(r, Result) else type(r).__name__
            for r in results]


def _fail_on(monkeypatch: pytest.MonkeyPatch, p: Pipeline, subject: str | None,
             error: Exception) -> list[str]:
    """Make `p` raise `error` while accepting the reply with this subject (None: every reply);
    the subjects it was asked to accept, in order, are returned (filled as it runs)."""
    real = p.accept_response
    calls: list[str] = []

    def accept(c, thread, pk):  # type: ignore[no-untyped-def]
        calls.append(c.pm.subject)
        if subject is None or c.pm.subject == subject:
            raise error
        return real(c, thread, pk)

    monkeypatch.setattr(p, "accept_response", accept)
    return calls


def test_a_batch_stores_each_message_once_and_a_redo_changes_nothing(site: Site,
                                                                    mf: MfSite) -> None:
    tid, address = _sent_request(site, mf, "Batch budget")
    raws = _replies(address, 5, "batch")
    raws.append(raws[0])   # the same message twice in one batch: a duplicate the second time
    p = Pipeline(mf)
    items = _spool(mf, raws)
    results = p.process_items(mf.spool, items)
    assert _outcomes(results) == ["response"] * 5 + ["duplicate"]
    assert mf.spool.pending() == []
    with mf.store.read() as tx:
        stored = [m for m in tx.messages(tid) if m.kind == "response"]
        outbox = tx.outbox_rows()
    assert len(stored) == 5
    forwards = len(outbox)

    # A crash after the commit, before the spool was settled: the same batch again.
    again = p.process_items(mf.spool, _spool(mf, raws))
    assert _outcomes(again) == ["duplicate"] * 6
    with mf.store.read() as tx:
        assert len([m for m in tx.messages(tid) if m.kind == "response"]) == 5
        assert len(tx.outbox_rows()) == forwards


def test_one_failing_message_is_held_back_alone(site: Site, mf: MfSite,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    tid, address = _sent_request(site, mf, "Batch with a bad apple")
    raws = _replies(address, 4, "apple")
    p = Pipeline(mf)
    real = p.accept_response

    def flaky(c, thread, pk):  # type: ignore[no-untyped-def]
        if c.pm.subject == "Re: apple 1":   # after its message row was written
            raise RuntimeError("a bug in one message")
        return real(c, thread, pk)

    monkeypatch.setattr(p, "accept_response", flaky)
    items = _spool(mf, raws)
    results = p.process_items(mf.spool, items)
    assert _outcomes(results) == ["response", "RuntimeError", "response", "response"]
    with mf.store.read() as tx:
        subjects = sorted(m.subject for m in tx.messages(tid) if m.kind == "response")
    assert subjects == ["Re: apple 0", "Re: apple 2", "Re: apple 3"]   # its row rolled back
    assert mf.spool.pending() == [items[1].id]    # given back for another attempt

    monkeypatch.undo()
    retry = mf.spool.claim(items[1].id)
    assert retry is not None and retry.attempts == 1
    assert _outcomes(Pipeline(mf).process_items(mf.spool, [retry])) == ["response"]
    with mf.store.read() as tx:
        assert len([m for m in tx.messages(tid) if m.kind == "response"]) == 4


def test_a_failed_commit_gives_every_item_back(site: Site, mf: MfSite,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    tid, address = _sent_request(site, mf, "Batch that cannot commit")
    raws = _replies(address, 3, "commit")
    p = Pipeline(mf)
    real_tx = mf.store.tx

    from contextlib import contextmanager

    @contextmanager
    def failing_tx():  # type: ignore[no-untyped-def]
        with real_tx() as tx:
            yield tx
            raise StoreError("database error: disk I/O error")   # rolls the batch back

    monkeypatch.setattr(mf.store, "tx", failing_tx)
    items = _spool(mf, raws)
    with pytest.raises(StoreError):
        p.process_items(mf.spool, items)
    assert sorted(mf.spool.pending()) == sorted(i.id for i in items)
    with mf.store.read() as tx:
        assert [m for m in tx.messages(tid) if m.kind == "response"] == []

    monkeypatch.undo()
    items = [mf.spool.claim(i.id) for i in items]
    # not the messages' fault: no attempt counted against spool.max_attempts
    assert [i.attempts for i in items] == [0, 0, 0]  # type: ignore[union-attr]
    assert all("store: database error" in i.errors[-1] for i in items)  # type: ignore[union-attr]
    assert _outcomes(p.process_items(mf.spool, items)) == ["response"] * 3  # type: ignore[arg-type]


def test_thread_rows_are_remembered_until_changed_or_rolled_back(mf: MfSite) -> None:
    with mf.store.tx() as tx:
        tid = tx.create_thread(state="waiting_response", authority="camden", law="foia",
                               title="t", body="b", citizen_email=JANE, citizen_name="J",
                               request_token="r", reply_token="s")
        assert tx.thread(tid).state == "waiting_response"  # type: ignore[union-attr]
        tx.update_thread(tid, state="successful")
        assert tx.thread(tid).state == "successful"  # type: ignore[union-attr]
        try:
            with tx.c.begin_nested():
                tx.update_thread(tid, state="rejected")
                assert tx.thread(tid).state == "rejected"  # type: ignore[union-attr]
                raise RuntimeError("roll back")
        except RuntimeError:
            tx.forget()
        assert tx.thread(tid).state == "successful"  # type: ignore[union-attr]


def test_a_big_batch_is_cut_into_transactions_by_size(site: Site, mf: MfSite,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import mailflow.pipeline as pipeline
    tid, address = _sent_request(site, mf, "Batch by size")
    raws = _replies(address, 5, "size")
    items = _spool(mf, raws)
    sizes = [i.eml.stat().st_size for i in items]
    monkeypatch.setattr(pipeline, "BATCH_BYTES", 2 * max(sizes))   # two per transaction
    assert [len(c) for c in pipeline._chunks(items)] == [2, 2, 1]
    commits = []
    real_tx = mf.store.tx

    from contextlib import contextmanager

    @contextmanager
    def counting_tx():  # type: ignore[no-untyped-def]
        with real_tx() as tx:
            yield tx
        commits.append(1)

    monkeypatch.setattr(mf.store, "tx", counting_tx)
    assert _outcomes(Pipeline(mf).process_items(mf.spool, items)) == ["response"] * 5
    assert len(commits) == 3
    assert mf.spool.pending() == []


@pytest.mark.parametrize("batched", [True, False], ids=["process_items", "process_item"])
def test_a_message_failing_its_last_attempt_goes_to_the_queue_with_its_raw_bytes(
        site: Site, mf: MfSite, monkeypatch: pytest.MonkeyPatch, batched: bool) -> None:
    """The pipeline lets go of the raw bytes once they are stored; when the message then
    fails for the last time, the admin queue still gets them, read again from the spool."""
    from dataclasses import replace
    tid, address = _sent_request(site, mf, "Batch with a bug to the end")
    raws = _replies(address, 2, "last")
    mf.settings = replace(mf.settings, spool=replace(mf.settings.spool, max_attempts=1))
    p = Pipeline(mf)

    def broken(c, thread, pk):  # type: ignore[no-untyped-def]
        if "last 1" in c.pm.subject:
            raise RuntimeError("a bug in this message")
        return Pipeline.accept_response(p, c, thread, pk)

    monkeypatch.setattr(p, "accept_response", broken)
    items = _spool(mf, raws)
    if batched:
        assert _outcomes(p.process_items(mf.spool, items)) == ["response", "RuntimeError"]
    else:
        assert p.process_item(mf.spool, items[0]).outcomes[0].outcome == "response"
        with pytest.raises(RuntimeError):
            p.process_item(mf.spool, items[1])
    assert mf.spool.pending() == []
    with mf.store.read() as tx:
        (item,) = tx.queue(reason="processing_failed")
        assert item.raw_sha256 is not None and tx.get_raw(item.raw_sha256) == raws[1][0]
        assert sorted(m.subject for m in tx.messages(tid) if m.kind == "response") == [
            "Re: last 0"]


def _savepoints(mf: MfSite) -> list[str]:
    """Every SAVEPOINT statement sent from now on."""
    from sqlalchemy import event
    seen: list[str] = []

    def spy(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith("SAVEPOINT"):
            seen.append(statement)
    event.listen(mf.store.engine, "before_cursor_execute", spy)
    return seen


def _counts(mf: MfSite, tid: int) -> tuple[int, int, int]:
    """(responses on the thread, outbox rows, deliveries): what a message done twice doubles."""
    from sqlalchemy import func, select

    from mailflow.store.tables import deliveries
    with mf.store.read() as tx:
        return (len([m for m in tx.messages(tid) if m.kind == "response"]),
                len(tx.outbox_rows()),
                int(tx.c.execute(select(func.count()).select_from(deliveries)).scalar() or 0))


def test_a_batch_without_failures_uses_no_savepoint(site: Site, mf: MfSite) -> None:
    tid, address = _sent_request(site, mf, "Batch with no savepoint")
    before = _counts(mf, tid)
    savepoints = _savepoints(mf)
    results = Pipeline(mf).process_items(mf.spool, _spool(mf, _replies(address, 4, "plain")))
    assert _outcomes(results) == ["response"] * 4
    assert savepoints == []
    responses, outbox, deliveries = _counts(mf, tid)
    assert (responses, outbox - before[1], deliveries - before[2]) == (4, 4, 4)


def test_a_failing_message_in_the_optimistic_batch_stores_the_others_exactly_once(
        site: Site, mf: MfSite, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The first pass (no savepoints) has written the messages before the failing one when
    it raises: all of that is rolled back, and the second pass (a savepoint each) writes
    each of the others once; the failing one's rows are nowhere; its outcome line is not
    logged, and each of the others' once."""
    import logging
    tid, address = _sent_request(site, mf, "Batch redone")
    before = _counts(mf, tid)
    raws = _replies(address, 5, "redo")
    p = Pipeline(mf)
    calls = _fail_on(monkeypatch, p, "Re: redo 3", RuntimeError("a bug in this message"))
    savepoints = _savepoints(mf)
    items = _spool(mf, raws)
    with caplog.at_level(logging.INFO, logger="mailflow.pipeline"):
        results = p.process_items(mf.spool, items)
    assert _outcomes(results) == ["response", "response", "response", "RuntimeError",
                                  "response"]
    # The first pass got as far as the failing message, the second did them all.
    assert calls == [f"Re: redo {i}" for i in (0, 1, 2, 3)] + [f"Re: redo {i}"
                                                                for i in range(5)]
    assert len(savepoints) == 5
    responses, outbox, deliveries = _counts(mf, tid)
    assert (responses, outbox - before[1], deliveries - before[2]) == (4, 4, 4)
    with mf.store.read() as tx:
        subjects = sorted(m.subject for m in tx.messages(tid) if m.kind == "response")
    assert subjects == ["Re: redo 0", "Re: redo 1", "Re: redo 2", "Re: redo 4"]
    assert mf.spool.pending() == [items[3].id]
    said = [r.getMessage() for r in caplog.records if ": response (thread" in r.getMessage()]
    assert len(said) == 4, said

    # A redo of the batch (a crash before the spool was settled) changes nothing.
    monkeypatch.undo()
    done = [mf.spool.claim(i.id) for i in items[3:4]]
    assert _outcomes(Pipeline(mf).process_items(mf.spool, done)) == ["response"]  # type: ignore[arg-type]
    again = Pipeline(mf).process_items(mf.spool, _spool(mf, raws))
    assert _outcomes(again) == ["duplicate"] * 5
    responses, outbox, deliveries = _counts(mf, tid)
    assert (responses, outbox - before[1], deliveries - before[2]) == (5, 5, 5)


def test_a_bug_that_does_not_happen_again_leaves_every_message_stored_once(
        site: Site, mf: MfSite, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure of the first pass that the second pass does not meet: every message is
    stored, once."""
    tid, address = _sent_request(site, mf, "Batch with a passing fault")
    before = _counts(mf, tid)
    p = Pipeline(mf)
    real = p.accept_response
    calls = {"n": 0}

    def once(c, thread, pk):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("only the first time")
        return real(c, thread, pk)

    monkeypatch.setattr(p, "accept_response", once)
    results = p.process_items(mf.spool, _spool(mf, _replies(address, 3, "once")))
    assert _outcomes(results) == ["response"] * 3
    responses, outbox, deliveries = _counts(mf, tid)
    assert (responses, outbox - before[1], deliveries - before[2]) == (3, 3, 3)
    assert mf.spool.pending() == []


def test_a_lone_failing_message_is_not_applied_twice(site: Site, mf: MfSite,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Alone in its transaction, a failing message's rollback is its own: no second pass."""
    tid, address = _sent_request(site, mf, "Batch of one")
    p = Pipeline(mf)
    calls = _fail_on(monkeypatch, p, None, RuntimeError("a bug"))
    items = _spool(mf, _replies(address, 1, "alone"))
    assert _outcomes(p.process_items(mf.spool, items)) == ["RuntimeError"]
    assert calls == ["Re: alone 0"]
    assert mf.spool.pending() == [items[0].id]
    with mf.store.read() as tx:
        assert [m for m in tx.messages(tid) if m.kind == "response"] == []


def test_a_database_error_in_the_optimistic_batch_gives_every_item_back(
        site: Site, mf: MfSite, monkeypatch: pytest.MonkeyPatch) -> None:
    """The database's error (here: locked) is nobody's message's fault: no second pass, every
    item goes back, nothing is written."""
    from sqlalchemy.exc import OperationalError
    tid, address = _sent_request(site, mf, "Batch with a locked database")
    before = _counts(mf, tid)
    p = Pipeline(mf)
    calls = _fail_on(monkeypatch, p, "Re: locked 1",
                     OperationalError("INSERT …", {}, Exception("database is locked")))
    items = _spool(mf, _replies(address, 3, "locked"))
    with pytest.raises(StoreError):
        p.process_items(mf.spool, items)
    assert calls == ["Re: locked 0", "Re: locked 1"]
    assert sorted(mf.spool.pending()) == sorted(i.id for i in items)
    assert _counts(mf, tid) == before
