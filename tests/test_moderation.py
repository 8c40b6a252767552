"""The admin's desk through the real CLI: queue decisions, thread and message actions, audit."""
from __future__ import annotations

from conftest import DOMAIN, JANE, Site, compose
from test_roundtrip import AUTHORITY, ask


def test_assign_a_queued_reply_forwards_it_and_is_audited(site: Site) -> None:
    t = ask(site)
    raw = compose(f"FOI <{AUTHORITY}>", f"request-{t['id']}-zzzzzzzzzzzz@{DOMAIN}", "RE", "Ours?")
    assert site.ingest(raw, [f"request-{t['id']}-zzzzzzzzzzzz@{DOMAIN}"]) == 0
    (item,) = site.json("queue", "list")
    r = site.run("--as", "alice", "queue", "assign", str(item["id"]), str(t["id"]),
                 "--reason", "typo in the token")
    assert r.returncode == 0, r.stderr.decode()
    assert len(site.mail_to(JANE)) == 1
    msgs = site.json("thread", "show", str(t["id"]))["messages"]
    (resp,) = [m for m in msgs if m["kind"] == "response"]
    assert resp["match"]["method"] == "admin" and resp["match"]["detail"]["by"] == "alice"
    assert site.json("queue", "list") == []
    (decided,) = site.json("queue", "list", "--all")
    assert decided["decided_by"] == "alice" and decided["decision"].startswith("assigned")
    again = site.run("--as", "bob", "queue", "reject", str(item["id"]), "--reason", "no")
    assert again.returncode == 1 and b"already decided by alice" in again.stderr
    log = site.json("audit", "--thread", str(t["id"]))
    assert [(e["actor"], e["action"], e["reason"]) for e in log] == [
        ("alice", "queue_assign", "typo in the token")]


def test_reject_spam_approve_and_unknown_items(site: Site) -> None:
    for n in range(3):
        assert site.ingest(compose("X <x@spam.example>", f"postmaster@{DOMAIN}", f"Hi {n}", "Hi"),
                           [f"postmaster@{DOMAIN}"]) == 0
    ids = [i["id"] for i in site.json("queue", "list")]
    assert site.run("queue", "reject", str(ids[0]), "--reason", "noise").returncode == 0
    assert site.run("queue", "spam", str(ids[1])).returncode == 0
    assert site.run("queue", "approve", str(ids[2])).returncode == 0
    assert site.json("queue", "list") == []
    missing = site.run("queue", "reject", "999", "--reason", "x")
    assert missing.returncode == 1 and b"no queue item 999" in missing.stderr
    assert [e["action"] for e in site.json("audit")] == ["queue_reject", "queue_spam",
                                                         "queue_approve"]


def test_thread_state_hide_and_message_hide(site: Site) -> None:
    t = ask(site)
    assert site.run("thread", "state", str(t["id"]), "successful").returncode == 0
    assert site.json("thread", "show", str(t["id"]))["state"] == "successful"
    bad = site.run("thread", "state", str(t["id"]), "happy")
    assert bad.returncode == 1 and b"allowed: waiting_response" in bad.stderr
    assert site.run("thread", "hide", str(t["id"]), "--reason", "legal").returncode == 0
    mid = site.json("thread", "show", str(t["id"]))["messages"][0]["id"]
    assert site.run("message", "hide", str(mid), "--reason", "personal data").returncode == 0
    assert site.run("message", "unhide", str(mid)).returncode == 0
    actions = [e["action"] for e in site.json("audit")]
    assert actions == ["thread_state", "thread_hide", "message_hide", "message_unhide"]


def confirm_request(site: Site, title: str, citizen: str = JANE) -> None:
    from conftest import addresses
    assert site.ingest(compose(f"Jane <{citizen}>", f"camden@{DOMAIN}", title, "Please."),
                       [f"camden@{DOMAIN}"]) == 0
    conf = site.mail_to(citizen)[0][1]
    c = addresses(conf, "Reply-To")[0]
    assert site.ingest(compose(f"Jane <{citizen}>", c, "Re", "Yes"), [c]) == 0


def test_premoderated_request_waits_for_approval(site: Site) -> None:
    site.set("moderation", "new_requests", '"premoderate"')
    confirm_request(site, "Held request")
    assert site.mail_to(AUTHORITY) == []
    (item,) = site.json("queue", "list")
    assert item["reason"] == "approval"
    assert site.json("thread", "list")[0]["state"] == "awaiting_approval"
    assert site.run("queue", "approve", str(item["id"])).returncode == 0
    assert len(site.mail_to(AUTHORITY)) == 1
    t = site.json("thread", "list")[0]
    assert t["state"] == "waiting_response" and t["due_date"]


def test_rejected_request_is_not_sent_and_the_citizen_is_told(site: Site) -> None:
    site.set("moderation", "first_time_citizens", '"hold"')
    confirm_request(site, "Rude request")
    (item,) = site.json("queue", "list")
    r = site.run("queue", "reject", str(item["id"]), "--reason", "abusive", "--notify")
    assert r.returncode == 0, r.stderr.decode()
    mails = site.new_mail()
    assert [m[0] for m in mails] == [JANE]
    assert "abusive" in mails[0][1].get_body(("plain",)).get_content()
    assert site.json("thread", "list")[0]["state"] == "not_approved"


def test_held_authority_reply_is_released_by_approval(site: Site) -> None:
    site.set("moderation", "authority_replies", '"hold"')
    t = ask(site)
    assert site.ingest(compose(f"FOI <{AUTHORITY}>", t["address"], "RE", "Held answer."),
                       [t["address"]]) == 0
    assert site.mail_to(JANE) == []
    (item,) = site.json("queue", "list")
    assert item["reason"] == "held_reply"
    assert site.run("queue", "approve", str(item["id"])).returncode == 0
    (fwd,) = site.mail_to(JANE)
    assert "Held answer." in fwd[1].get_body(("plain",)).get_content()


def test_redact_add_previews_then_saves_and_the_archive_applies_it(site: Site) -> None:
    t = ask(site, "Salt for Jane Q. Public's street")
    args = ["redact", "add", "--scope", f"thread:{t['id']}", "--text", "Jane Q. Public",
            "--replacement", "[name]"]
    preview = site.json(*args, "--dry-run")
    assert preview["changes"] >= 1 and preview["examples"][0]["found"] == "Jane Q. Public"
    assert "Jane Q. Public" not in (site.dir / "rules/redactions.toml").read_text()
    r = site.run(*args, "--yes", "--note", "asked by the citizen")
    assert r.returncode == 0, r.stderr.decode()
    assert "Jane Q. Public" in (site.dir / "rules/redactions.toml").read_text()
    assert site.run("archive", "build", "--no-search").returncode == 0
    html = "\n".join(p.read_text() for p in (site.dir / "var/archive").rglob("*.html"))
    assert "Jane Q. Public" not in html and "[name]" in html
    bad = site.run("redact", "add", "--regex", "(", "--replacement", "x", "--yes")
    assert bad.returncode == 1 and b"regex" in bad.stderr.lower()
    assert site.json("audit")[-1]["action"] == "redact_add"


def test_unknown_thread_names_the_nearby_ones(site: Site) -> None:
    t = ask(site)
    r = site.run("thread", "show", "99")
    assert r.returncode == 1 and f"nearby threads: {t['id']}".encode() in r.stderr


def test_spam_with_block_refuses_the_sender_from_then_on(site: Site) -> None:
    import smtplib
    from conftest import Daemon
    t = ask(site)
    raw = compose("Spammer <sp@spam.example>", t["address"], "Cheap", "Buy now",
                  extra={"Auto-Submitted": "no"})
    wrong = f"request-{t['id']}-zzzzzzzzzzzz@{DOMAIN}"
    assert site.ingest(raw.replace(t["address"].encode(), wrong.encode()), [wrong]) == 0
    (item,) = site.json("queue", "list")
    assert site.run("queue", "spam", str(item["id"]), "--block", "domain").returncode == 0
    again = compose("Other <x@spam.example>", t["address"], "Again", "Buy")
    assert site.ingest(again, [t["address"]], sender="x@spam.example") == 0
    assert site.json("queue", "list") == [] and site.new_mail() == []
    d = Daemon(site)
    try:
        with smtplib.SMTP("127.0.0.1", d.port, timeout=20) as s:
            s.ehlo("spam.example")
            s.mail("y@spam.example")
            assert s.rcpt(t["address"])[0] == 550
    finally:
        d.stop()


def test_thread_list_overdue(site: Site) -> None:
    t = ask(site)
    assert site.json("thread", "list", "--overdue") == []
    from mailflow.site import Site as MfSite
    from datetime import date
    mf = MfSite.open(site.config)
    with mf.store.tx() as tx:
        tx.update_thread(t["id"], due_date=date(2020, 1, 1))
    mf.close()
    assert [x["id"] for x in site.json("thread", "list", "--overdue")] == [t["id"]]


def test_reject_with_a_note_to_the_sender_but_never_to_automatic_mail(site: Site) -> None:
    assert site.ingest(compose("Person <p@people.example>", f"postmaster@{DOMAIN}", "Hello",
                               "Can you help?"), [f"postmaster@{DOMAIN}"]) == 0
    assert site.ingest(compose("Robot <r@bots.example>", f"postmaster@{DOMAIN}", "Auto",
                               "Beep", extra={"Auto-Submitted": "auto-replied"}),
                       [f"postmaster@{DOMAIN}"]) == 0
    person, robot = [i["id"] for i in site.json("queue", "list")]
    r = site.run("queue", "reject", str(person), "--reason", "we cannot help", "--notify")
    assert r.returncode == 0, r.stderr.decode()
    (note,) = site.new_mail()
    assert note[0] == "p@people.example" and "we cannot help" in note[1].get_body(("plain",)).get_content()
    assert note[1]["Auto-Submitted"] == "auto-generated"
    r = site.run("queue", "reject", str(robot), "--reason", "noise", "--notify")
    assert r.returncode == 1 and b"automatic" in r.stderr
    assert site.new_mail() == []
