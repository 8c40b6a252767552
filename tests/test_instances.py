"""Several daemons: heartbeats, `mailflow status [--check]`, the health file, and what a
daemon that died was holding."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
from datetime import timedelta

from sqlalchemy import update

from conftest import DOMAIN, JANE, Daemon, Site, compose, wait_for
from mailflow.instances import STALE_AFTER, Registry
from mailflow.site import Site as MfSite
from mailflow.store.repository import utcnow
from mailflow.store.tables import instances, outbox


def _health(site: Site) -> dict | None:  # type: ignore[type-arg]
    try:
        return json.loads((site.dir / "var" / "spool" / "health.json").read_text())
    except (OSError, ValueError):
        return None


def test_status_shows_the_running_daemon_and_check_follows_its_life(site: Site) -> None:
    r = site.run("status", "--check")
    assert r.returncode == 1 and b"has not run here" in r.stderr
    d = Daemon(site)
    try:
        wait_for(lambda: (_health(site) or {}).get("ok"), what="a healthy heartbeat")
        s = site.json("status")
        (me,) = [i for i in s["instances"] if i["pid"] == d.proc.pid]
        assert me["alive"] and me["state"] == "running"
        assert me["id"] == f"{socket.gethostname()}:{d.proc.pid}"
        assert s["problems"] == [] and s["spool_pending"] == 0
        assert site.run("status", "--check").returncode == 0
        text = site.run("status").stdout.decode()
        assert me["id"] in text and "outbox_queued" in text
    finally:
        d.stop()
    r = site.run("status", "--check")
    assert r.returncode == 1 and b"stopped" in r.stderr
    (me,) = [i for i in site.json("status")["instances"] if i["pid"] == d.proc.pid]
    assert me["state"] == "stopped" and not me["alive"]


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_rows_a_dead_instance_was_sending_are_released_at_once(site: Site) -> None:
    mf = MfSite.open(site.config)
    assert site.ingest(compose(f"Jane <{JANE}>", f"camden@{DOMAIN}", "Gritting", "Which?"),
                       [f"camden@{DOMAIN}"], JANE) == 0
    now = utcnow()
    with mf.store.tx() as tx:
        for id, host, pid, beat in (("gone:1", socket.gethostname(), _dead_pid(), now),
                                    ("silent:2", "elsewhere", 2, now - 2 * STALE_AFTER),
                                    ("busy:3", "elsewhere", 3, now)):
            tx.c.execute(instances.insert().values(
                id=id, hostname=host, pid=pid, started_at=now, heartbeat_at=beat,
                state="running", version="x", detail={}))
        ids = [r.id for r in tx.c.execute(outbox.select()).all()]
        assert ids
        tx.c.execute(update(outbox).values(state="sending", claimed_by="busy:3",
                                           claimed_until=now + timedelta(minutes=10)))
    reg = Registry(mf.store, "me:4")
    assert reg.release_claims() == 0          # a live instance keeps what it holds
    for holder in ("gone:1", "silent:2"):
        with mf.store.tx() as tx:
            tx.c.execute(update(outbox).values(state="sending", claimed_by=holder,
                                               claimed_until=now + timedelta(minutes=10)))
        assert reg.release_claims() == len(ids), holder
        with mf.store.read() as tx:
            assert {r.state for r in tx.c.execute(outbox.select()).all()} == {"queued"}
    states = {i.id: i.state for i in reg.all()}
    assert states == {"gone:1": "dead", "silent:2": "dead", "busy:3": "running"}
    mf.close()


def test_a_restarted_daemon_sends_what_its_killed_predecessor_held(site: Site) -> None:
    d = Daemon(site)
    wait_for(lambda: (_health(site) or {}).get("ok"), what="a heartbeat")
    first = f"{socket.gethostname()}:{d.proc.pid}"
    d.stop(signal.SIGKILL)
    # As if it had been killed in the middle of sending: rows leased for ten more minutes.
    assert site.ingest(compose(f"Jane <{JANE}>", f"camden@{DOMAIN}", "Gritting", "Which?"),
                       [f"camden@{DOMAIN}"], JANE) == 0
    mf = MfSite.open(site.config)
    with mf.store.tx() as tx:
        tx.c.execute(update(outbox).values(state="sending", claimed_by=first,
                                           claimed_until=utcnow() + timedelta(minutes=10)))
    mf.close()
    d2 = Daemon(site)
    try:
        wait_for(lambda: site.json("status")["outbox_queued"] == 0, timeout=30,
                 what="the held row released and sent well before its lease ends")
        assert {r["state"] for r in site.json("outbox", "list")} == {"sent"}
        assert len(site.mail_to(JANE)) == 1      # and not twice
    finally:
        d2.stop()


def test_json_log_lines_name_the_instance_and_the_thread(site: Site) -> None:
    raw = compose(f"Jane <{JANE}>", f"camden@{DOMAIN}", "Gritting", "Which roads?")
    r = site.run("-v", "--log-format", "json", "ingest", "--rcpt", f"camden@{DOMAIN}",
                 "--sender", JANE, input=raw)
    assert r.returncode == 0, r.stderr.decode()
    lines = [json.loads(line) for line in r.stderr.decode().splitlines() if line.startswith("{")]
    assert lines and all(set(line) >= {"time", "level", "logger", "instance", "thread_id",
                                       "message"} for line in lines)
    (thread,) = site.json("thread", "list")
    assert any(line["thread_id"] == thread["id"] and "new_request" in line["message"]
               for line in lines), lines
    bad = site.run("--log-format", "xml", "status")
    assert bad.returncode == 2


def test_one_archive_writer_for_the_site_across_instances(site: Site) -> None:
    """On PostgreSQL the writer holds a session advisory lock: another instance that wants to
    build is told the archive is busy (the daemon retries later); an admin's build waits."""
    import threading
    from dataclasses import replace

    import psycopg
    import pytest
    from mailflow.archive.build import ArchiveBusy, _writer_key, build
    from test_store_backends import _pg_database

    gen = _pg_database()
    url = next(gen)
    mf = MfSite.open(site.config)
    mf = MfSite(settings=replace(mf.settings, database=replace(mf.settings.database, url=url)),
                rules=mf.rules)
    try:
        mf.store  # noqa: B018 - migrated
        holder = psycopg.connect(url.replace("postgresql://", "postgresql://", 1),
                                 autocommit=True)
        holder.execute("SELECT pg_advisory_lock(%s)", (_writer_key(mf),))
        with pytest.raises(ArchiveBusy):
            build(mf, search=False, wait=False)
        done = threading.Event()
        t = threading.Thread(target=lambda: (build(mf, search=False), done.set()))
        t.start()
        assert not done.wait(2)            # the admin's build waits for the writer ...
        holder.execute("SELECT pg_advisory_unlock(%s)", (_writer_key(mf),))
        assert done.wait(60)               # ... and goes ahead once it is done
        t.join()
        holder.close()
        assert build(mf, search=False, wait=False) is not None   # free again
    finally:
        mf.close()
        next(gen, None)


def test_on_sqlite_the_archive_folder_lock_is_the_writer_lock(site: Site) -> None:
    import fcntl

    import pytest
    from mailflow.archive.build import ArchiveBusy, build
    mf = MfSite.open(site.config)
    out = site.dir / "var" / "archive"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".archive.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        with pytest.raises(ArchiveBusy):
            build(mf, out, search=False, wait=False)
    assert build(mf, out, search=False, wait=False) is not None
    mf.close()
