"""The archive as the daemon and the admin keep it: rebuilt after mail, hidden threads gone,
withheld attachments put before an admin."""
from __future__ import annotations

import smtplib
from email.message import EmailMessage
from pathlib import Path

from conftest import DOMAIN, JANE, Daemon, Site, compose, wait_for
from test_roundtrip import AUTHORITY, ask


def archive_text(site: Site) -> str:
    root = site.dir / "var" / "archive"
    return "\n".join(p.read_text(errors="replace") for p in root.rglob("*.html"))


def test_daemon_rebuilds_the_archive_after_a_reply(site: Site) -> None:
    site.set("archive", "debounce_seconds", "1")
    t = ask(site, "Gritting routes this winter")
    d = Daemon(site)
    try:
        with smtplib.SMTP("127.0.0.1", d.port, timeout=20) as s:
            s.sendmail(AUTHORITY, [t["address"]],
                       compose(f"FOI <{AUTHORITY}>", t["address"], "RE", "Routes 1 to 9."))
        wait_for(lambda: "Routes 1 to 9." in archive_text(site), timeout=60,
                 what="the reply in the archive")
        text = archive_text(site)
        assert "Gritting routes this winter" in text
        assert JANE not in text and t["address"].split("@")[0] not in text
    finally:
        d.stop()


def test_hidden_thread_leaves_the_archive(site: Site) -> None:
    t = ask(site, "A request to hide later")
    assert site.run("archive", "build", "--no-search").returncode == 0
    assert "A request to hide later" in archive_text(site)
    assert site.run("thread", "hide", str(t["id"]), "--reason", "legal").returncode == 0
    assert site.run("archive", "build", "--no-search").returncode == 0
    assert "A request to hide later" not in archive_text(site)


def test_withheld_attachment_goes_to_the_queue_once(site: Site) -> None:
    t = ask(site)
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = f"FOI <{AUTHORITY}>", t["address"], "RE: files"
    m.set_content("Files attached.")
    m.add_attachment(b"PK\x03\x04 not really a zip", maintype="application", subtype="zip",
                     filename="everything.zip")
    assert site.ingest(m.as_bytes(), [t["address"]]) == 0
    for _ in range(2):
        assert site.run("archive", "build", "--no-search").returncode == 0
    items = [i for i in site.json("queue", "list") if i["reason"] == "withheld_attachment"]
    assert len(items) == 1 and "everything.zip" in items[0]["summary"]
    assert not list(Path(site.dir / "var/archive").rglob("*everything.zip"))


def test_released_attachment_is_published_at_the_next_build(site: Site) -> None:
    t = ask(site)
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = f"FOI <{AUTHORITY}>", t["address"], "RE: files"
    m.set_content("Files attached.")
    m.add_attachment(b"PK\x03\x04 checked by hand", maintype="application", subtype="zip",
                     filename="budget.zip")
    assert site.ingest(m.as_bytes(), [t["address"]]) == 0
    assert site.run("archive", "build", "--no-search").returncode == 0
    (item,) = [i for i in site.json("queue", "list") if i["reason"] == "withheld_attachment"]
    r = site.run("queue", "release", str(item["id"]), "--reason", "checked")
    assert r.returncode == 0, r.stderr.decode()
    assert site.run("archive", "build", "--no-search").returncode == 0
    # released: published under its content hash, offered under its own name
    assert [p for p in Path(site.dir / "var/archive").rglob("*") if p.parent.name == "attachments"]
    assert any('download="budget.zip"' in p.read_text()
               for p in Path(site.dir / "var/archive").rglob("index.html"))
