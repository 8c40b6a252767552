"""`mailflow serve` over real SMTP: refusals at RCPT, size limits, and surviving a crash."""
from __future__ import annotations

import signal
import smtplib
import sqlite3

import pytest

from conftest import DOMAIN, JANE, Daemon, Site, addresses, compose, wait_for
from test_roundtrip import AUTHORITY, ask


def test_round_trip_over_smtp(site: Site, daemon: Daemon) -> None:
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=20) as s:
        s.sendmail(JANE, [f"camden@{DOMAIN}"],
                   compose(f"Jane <{JANE}>", f"camden@{DOMAIN}", "Gritting routes", "Which roads?"))
    conf = wait_for(lambda: site.mail_to(JANE), what="confirmation")[0][1]
    confirm = addresses(conf, "Reply-To")[0]
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=20) as s:
        s.sendmail(JANE, [confirm], compose(f"Jane <{JANE}>", confirm, "Re: confirm", "Yes"))
    req = wait_for(lambda: site.mail_to(AUTHORITY), what="request")[0][1]
    req_addr = addresses(req, "From")[0]
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=20) as s:
        s.sendmail(AUTHORITY, [req_addr],
                   compose(f"FOI <{AUTHORITY}>", req_addr, "RE: gritting", "These roads."))
    fwd = wait_for(lambda: site.mail_to(JANE), what="forward")[0][1]
    assert "These roads." in fwd.get_body(("plain",)).get_content()


def test_no_open_relay_and_unknown_recipients_refused(site: Site, daemon: Daemon) -> None:
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=20) as s:
        s.ehlo("authority.example")
        s.mail(AUTHORITY)
        code, text = s.rcpt("victim@gmail.example")
        assert code == 550 and b"relay" in text.lower()
        code, text = s.rcpt(f"nobody@{DOMAIN}")
        assert code == 550 and b"https://ask.example/body/" in text
        code, _ = s.rcpt(f"postmaster@{DOMAIN}")
        assert code == 250


def test_over_the_size_limit_is_552(site: Site) -> None:
    site.set("smtp", "max_message_size", "20000")
    d = Daemon(site)
    try:
        big = compose(f"Jane <{JANE}>", f"camden@{DOMAIN}", "Big", "x" * 40000)
        with smtplib.SMTP("127.0.0.1", d.port, timeout=20) as s:
            with pytest.raises(smtplib.SMTPException) as e:
                s.sendmail(JANE, [f"camden@{DOMAIN}"], big)
        code = getattr(e.value, "smtp_code", None) or next(iter(e.value.recipients.values()))[0]  # type: ignore[attr-defined]
        assert code == 552
    finally:
        d.stop()
    assert site.json("thread", "list") == []


def test_crash_between_spool_and_store_then_restart(site: Site) -> None:
    """Killed after its 250 but before the store is written, the daemon finishes the work
    on restart, once."""
    t = ask(site)
    d = Daemon(site)
    # Hold the database so processing cannot get past the spool.
    lock = sqlite3.connect(site.dir / "var" / "mailflow.db", timeout=5, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        answer = compose(f"FOI <{AUTHORITY}>", t["address"], "RE: crash", "Answer before the crash.")
        with smtplib.SMTP("127.0.0.1", d.port, timeout=20) as s:
            s.sendmail(AUTHORITY, [t["address"]], answer)  # 250: it is in the spool
        spool = site.dir / "var" / "spool"
        assert list((spool / "new").glob("*.mail")) or list((spool / "work").glob("*.mail"))
        d.stop(signal.SIGKILL)
    finally:
        lock.rollback()
        lock.close()
    assert site.mail_to(JANE) == []
    d.start()
    try:
        fwd = wait_for(lambda: site.mail_to(JANE), what="forward after restart")
        assert len(fwd) == 1 and "before the crash" in fwd[0][1].get_body(("plain",)).get_content()
        wait_for(lambda: not list((site.dir / "var/spool/work").glob("*")), what="spool settled")
        assert len([m for m in site.json("thread", "show", str(t["id"]))["messages"]
                    if m["kind"] == "response"]) == 1
    finally:
        d.stop()
    # A second restart finds nothing left to do and sends nothing again.
    d.start()
    d.stop()
    assert site.mail_to(JANE) == []


def test_sigterm_shuts_down_cleanly(site: Site) -> None:
    d = Daemon(site)
    assert d.stop(signal.SIGTERM) == 0


def test_demo_plays_the_round_trip(site: Site, daemon: Daemon) -> None:
    r = site.run("demo", timeout=120)
    assert r.returncode == 0, r.stdout.decode()[-2000:] + r.stderr.decode()[-2000:]
    assert b"Round trip complete" in r.stdout
    states = [t["state"] for t in site.json("thread", "list")]
    assert states == ["waiting_response"]


def test_a_port_already_taken_is_one_clear_line_not_a_traceback(site: Site) -> None:
    """Another server on the configured port (seen in CI as a race between test workers): serve
    says which setting to change and stops, with nothing left running."""
    import socket
    import subprocess

    from conftest import MAILFLOW
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        site.set("smtp", "listen", f'"127.0.0.1:{port}"')
        r = subprocess.run([*MAILFLOW, "--config", str(site.config), "serve"], cwd=site.dir,
                           capture_output=True, timeout=300)   # a deadline on a busy machine
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert "Traceback" not in err
    said = " ".join(err.split())  # the console wraps long lines
    assert f"error: cannot listen on 127.0.0.1:{port} ([smtp] listen in" in said, err
    assert said.endswith("address already in use"), err
