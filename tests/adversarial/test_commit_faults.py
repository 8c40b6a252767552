"""Faults on the commit path: what mailflow answers when the disk is full, fsync fails, or the
database is locked or gone.

The rule (RFC 5321 §4.2.5, §6.1): a 250 is a promise that the message survives; a 5xx tells
the sender's MTA to give up and bounce. So a fault that may pass must answer 4xx (the MTA
keeps the message and tries again), never 250 and never 5xx, and must leave nothing
half-written that could later appear as a second, partial copy. The database is not on the
commit path at all: the spool is, so a locked or missing database delays processing, never
acceptance.
"""
from __future__ import annotations

import errno
import os
import smtplib
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import DOMAIN, JANE, Daemon, Site, compose, wait_for
from mailflow.spool import Spool

BIG = 300_000   # bytes: more than the tiny file system below can take


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


@pytest.fixture()
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB tmpfs: writes on it really fail with ENOSPC."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_answers_451_and_leaves_no_partial_file(site: Site, tiny_fs: Path) -> None:
    site.set("spool", "dir", f'"{tiny_fs / "spool"}"')
    d = Daemon(site)
    try:
        big = compose(f"Jane <{JANE}>", f"camden@{DOMAIN}", "Big",
                      "x" * 76 + "\n" * 0 + ("y" * 76 + "\n") * (BIG // 77))
        with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as c:
            with pytest.raises(smtplib.SMTPDataError) as e:
                c.sendmail(JANE, [f"camden@{DOMAIN}"], big)
            assert 400 <= e.value.smtp_code < 500, e.value
            # Nothing of it is left where a claimer could see it, nor as debris in tmp/.
            for sub in ("new", "tmp", "work"):
                assert _files(tiny_fs / "spool" / sub) == [], sub
            # The same connection still works, and a message that fits is taken.
            small = compose(f"Jane <{JANE}>", f"camden@{DOMAIN}", "Small", "Which roads?")
            assert c.sendmail(JANE, [f"camden@{DOMAIN}"], small) == {}
        wait_for(lambda: any(t["title"] == "Small" for t in site.json("thread", "list")),
                 what="the small message processed")
        assert not any(t["title"] == "Big" for t in site.json("thread", "list"))
    finally:
        d.stop()


@pytest.mark.parametrize("failing", ["file", "directory"])
def test_fsync_error_answers_451_never_250(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           failing: str) -> None:
    """An fsync that fails (EIO: the disk lost the write) must not become a promise."""
    from adversarial.conftest import RawSMTP, ingress

    spool = Spool(tmp_path / "spool")
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        is_dir = os.path.isdir(os.readlink(f"/proc/self/fd/{fd}"))
        if is_dir == (failing == "directory") and "spool" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with ingress(spool) as srv:
        with RawSMTP(srv.port) as c:
            c.cmd("EHLO client.example")
            assert c.cmd("MAIL FROM:<a@sender.example>")[0] == 250
            assert c.cmd("RCPT TO:<request-1-abc@foi.example>")[0] == 250
            assert c.cmd("DATA")[0] == 354
            code, _ = c.cmd(b"Subject: x\r\n\r\nbody\r\n.")
            assert 400 <= code < 500
    assert spool.pending() == []
    assert _files(spool.root / "tmp") == []


def test_locked_database_still_answers_250_and_processes_later(site: Site) -> None:
    d = Daemon(site)
    db = sqlite3.connect(site.dir / "var" / "mailflow.db", timeout=1, isolation_level=None)
    try:
        db.execute("BEGIN EXCLUSIVE")   # another process holds the database
        raw = compose(f"Jane <{JANE}>", f"camden@{DOMAIN}", "While locked", "Which roads?")
        with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as c:
            assert c.sendmail(JANE, [f"camden@{DOMAIN}"], raw) == {}
        time.sleep(2)   # the daemon tries, finds the database locked, and keeps the message
        db.execute("ROLLBACK")
        db.close()
        db = None
        wait_for(lambda: any(t["title"] == "While locked" for t in site.json("thread", "list")),
                 timeout=90, what="the message processed once the lock was gone")
        assert sum(t["title"] == "While locked" for t in site.json("thread", "list")) == 1
    finally:
        if db is not None:
            db.close()
        d.stop()


def test_ingest_with_the_database_gone_exits_75_and_keeps_the_message(site: Site) -> None:
    """`mailflow ingest` from an MTA pipe: 75 (EX_TEMPFAIL) makes Postfix or Exim retry."""
    site.set("database", "url", '"postgresql://postgres@127.0.0.1:1/gone"')
    raw = compose(f"Jane <{JANE}>", f"camden@{DOMAIN}", "No database", "Which roads?")
    r = site.run("ingest", "--rcpt", f"camden@{DOMAIN}", "--sender", JANE, input=raw)
    assert r.returncode == 75, r.stderr.decode()
    assert b"Traceback" not in r.stderr
