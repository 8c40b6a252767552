"""Admin tools given a spool file: `mailflow explain` reads a .mail as the message it holds,
with the envelope it arrived with, exactly as it reads the raw message."""
from __future__ import annotations

import json

from conftest import DOMAIN, JANE, Site, compose

from mailflow.spool import Envelope, Spool


def test_explain_a_spool_file_as_its_message(site: Site) -> None:
    raw = compose(f"Jane <{JANE}>", f"camden@{DOMAIN}", "Gritting", "Which roads?")
    spool = Spool(site.dir / "var" / "spool-explain")
    id = spool.put(raw, Envelope(mail_from=JANE, rcpt_tos=[f"camden@{DOMAIN}"]))
    plain = site.dir / "plain.eml"
    plain.write_bytes(raw)
    r1 = site.run("explain", str(spool.root / "new" / f"{id}.mail"), "--json")
    r2 = site.run("explain", str(plain), "--rcpt", f"camden@{DOMAIN}", "--sender", JANE, "--json")
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr.decode() + r2.stderr.decode()
    assert json.loads(r1.stdout) == json.loads(r2.stdout)


# -- failed messages: seen, and put back once their cause is fixed ------------------------------
import pytest  # noqa: E402

from mailflow.pipeline import Pipeline  # noqa: E402
from test_pipeline_batch import _replies, _sent_request, _spool  # noqa: E402


def _fail_one(site: Site, mf, monkeypatch: pytest.MonkeyPatch, title: str):  # type: ignore[no-untyped-def]
    """A reply on a sent request that a bug fails on its last attempt: (thread id, raw, spool
    id, recipient). The store records it in the admin queue as processing_failed."""
    from dataclasses import replace
    tid, address = _sent_request(site, mf, title)
    ((raw, rcpt),) = _replies(address, 1, "failing")
    mf.settings = replace(mf.settings, spool=replace(mf.settings.spool, max_attempts=1))
    p = Pipeline(mf)

    def broken(c, thread, pk):  # type: ignore[no-untyped-def]
        raise RuntimeError("a bug in this version")

    monkeypatch.setattr(p, "accept_response", broken)
    (item,) = _spool(mf, [(raw, rcpt)])
    with pytest.raises(RuntimeError):
        p.process_item(mf.spool, item)
    assert mf.spool.failed() == [item.id]
    return tid, raw, item.id, rcpt


def _process_all(mf) -> list[str]:  # type: ignore[no-untyped-def]
    """What the daemon's processor would do with what is waiting: the fixed version."""
    outcomes = []
    while (item := mf.spool.claim()) is not None:
        outcomes.append(Pipeline(mf).process_item(mf.spool, item).outcomes[0].outcome)
    return outcomes


def _responses(mf, tid: int) -> list[str]:  # type: ignore[no-untyped-def]
    with mf.store.read() as tx:
        return [m.subject for m in tx.messages(tid) if m.kind == "response"]


def test_a_failed_message_is_listed_shown_and_put_back_once(
        site: Site, mf, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    tid, raw, sid, _ = _fail_one(site, mf, monkeypatch, "Spool list and requeue")
    (row,) = site.json("spool", "list")
    assert row["id"] == sid and row["state"] == "failed" and row["attempts"] == 1
    assert "a bug in this version" in row["errors"][-1]
    assert row["size"] == len(raw) and row["mail_from"] == "foi@camden.gov.example"
    shown = site.json("spool", "show", sid)
    assert shown["headers"]["Subject"] == "Re: failing 0" and shown["state"] == "failed"
    text = site.run("spool", "show", sid)
    assert f"mailflow spool requeue {sid}" in text.stdout.decode()
    with mf.store.read() as tx:
        (q,) = tx.queue(reason="processing_failed")

    r = site.run("--as", "ops", "spool", "requeue", sid, "--reason", "fixed in the next version")
    assert r.returncode == 0, r.stderr.decode()
    assert f"queue item {q.id} decided" in r.stdout.decode()
    assert mf.spool.failed() == [] and mf.spool.pending() == [sid]
    assert site.json("spool", "list", "--state", "new")[0]["attempts"] == 0
    with mf.store.read() as tx:
        assert tx.queue(reason="processing_failed") == []
        decided = tx.queue_item(q.id)
        assert decided is not None and decided.decided_by == "ops"
        (entry,) = [e for e in tx.audit_entries() if e["action"] == "spool_requeue"]
        assert entry["target"] == f"spool:{sid}" and entry["actor"] == "ops"
        assert entry["reason"] == "fixed in the next version"
    assert _process_all(mf) == ["response"]
    assert _responses(mf, tid) == ["Re: failing 0"]
    # Only a failed item is put back; a second requeue names where it is.
    r = site.run("spool", "requeue", sid)
    assert r.returncode == 1 and "not failed/" in r.stderr.decode()


def test_queue_approve_processes_a_failed_message_again(
        site: Site, mf, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    tid, raw, sid, _ = _fail_one(site, mf, monkeypatch, "Approve a failed message")
    with mf.store.read() as tx:
        (q,) = tx.queue(reason="processing_failed")
    r = site.run("queue", "approve", str(q.id))
    assert r.returncode == 0, r.stderr.decode()
    assert f"spool item {sid} put back" in r.stdout.decode()
    assert mf.spool.pending() == [sid]
    assert _process_all(mf) == ["response"]
    assert _responses(mf, tid) == ["Re: failing 0"]


def test_queue_approve_without_the_spool_copy_spools_the_kept_one_and_never_doubles(
        site: Site, mf, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """The failed item lives in another host's spool (or was cleaned away): the queue's copy
    goes round, under its envelope; the original coming back later is not a second reply."""
    tid, raw, sid, rcpt = _fail_one(site, mf, monkeypatch, "Approve from the kept copy")
    failed = mf.spool.dirs["failed"]
    aside = site.dir / "elsewhere"
    aside.mkdir()
    for f in failed.iterdir():
        f.rename(aside / f.name)
    with mf.store.read() as tx:
        (q,) = tx.queue(reason="processing_failed")
    r = site.run("queue", "approve", str(q.id))
    assert r.returncode == 0, r.stderr.decode()
    assert "kept copy spooled again" in r.stdout.decode()
    (new_id,) = mf.spool.pending()
    found = mf.spool.peek(new_id)
    assert found is not None and found[1].read() == raw
    assert found[1].envelope.rcpt_tos == [rcpt]
    assert _process_all(mf) == ["response"]
    for f in aside.iterdir():          # the other host requeues its own copy later
        f.rename(failed / f.name)
    assert site.run("spool", "requeue", "--all").returncode == 0
    _process_all(mf)
    assert _responses(mf, tid) == ["Re: failing 0"]


def test_a_failed_item_without_a_queue_item_can_still_be_put_back(
        site: Site, mf) -> None:  # type: ignore[no-untyped-def]
    """When the store was down as the item failed, the queue has no item for it: `status`
    counts it and `spool requeue` still puts it back."""
    tid, address = _sent_request(site, mf, "Failed while the store was down")
    ((raw, rcpt),) = _replies(address, 1, "orphan")
    (item,) = _spool(mf, [(raw, rcpt)])
    mf.spool.fail(item, "StoreError: the database went away")
    assert site.json("status")["spool_failed"] == 1
    r = site.run("spool", "requeue", "--all")
    assert r.returncode == 0 and "put back" in r.stdout.decode()
    assert "decided" not in r.stdout.decode()
    assert _process_all(mf) == ["response"]
    assert _responses(mf, tid) == ["Re: orphan 0"]
    assert site.json("status")["spool_failed"] == 0


def test_spool_commands_name_what_is_wrong(site: Site) -> None:
    r = site.run("spool", "requeue", "00000000000000000001-000000000000")
    assert r.returncode == 1 and "no spool item" in r.stderr.decode()
    r = site.run("spool", "requeue")
    assert r.returncode == 2 and "--all" in r.stderr.decode()
    r = site.run("spool", "show", "../etc")
    assert r.returncode != 0 and "Traceback" not in r.stderr.decode()
    assert site.json("spool", "list") == []
    assert "nothing" in site.run("spool", "list").stdout.decode()
