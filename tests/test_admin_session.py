"""A scripted admin session: ten kinds of queue items made by real mail through `ingest`, each
decided through the CLI, leaving the store, the outbox and the archive as expected."""
from __future__ import annotations

from email.message import EmailMessage
from pathlib import Path

from conftest import DOMAIN, JANE, Site, addresses, compose
from test_matching_e2e import fixture
from test_roundtrip import AUTHORITY, ask

BOB = "bob@citizen.example"


def test_ten_kinds_of_queue_item_each_decided(site: Site) -> None:
    site.set("classify", "spam_header", '"X-Spam-Score"')
    t = ask(site, "Gritting routes")
    t2 = ask(site, "Salt budget", citizen=BOB, name="Bob")
    req, tid = t["address"], t["id"]
    fwd_from = None

    # 1 bad_token: a retyped token
    wrong = f"request-{tid}-zzzzzzzzzzzz@{DOMAIN}"
    assert site.ingest(compose(f"FOI <{AUTHORITY}>", wrong, "RE: gritting", "Routes A-C."), [wrong]) == 0
    # 2 conflict: the address of one thread, the In-Reply-To of another
    assert site.ingest(compose(f"FOI <{AUTHORITY}>", req, "RE", "Mixed up.",
                               in_reply_to=str(t2["msg"]["Message-ID"])), [req]) == 0
    # 3 weak_evidence: a tag from an unknown sender
    assert site.ingest(compose("Temp <temp@agency.example>", f"lost@{DOMAIN}",
                               f"Re: [FOI #{tid}]", "From our contractor.")) == 0
    # 4 spam over the threshold
    assert site.ingest(compose(f"FOI <{AUTHORITY}>", req, "RE", "Pills",
                               extra={"X-Spam-Score": "15"}), [req]) == 0
    # 5 loop: our own request coming back
    assert site.ingest(t["raw"].split(b"\r\n", 2)[2], [req]) == 0
    # 6 bounce: a permanent delivery failure of the request
    assert site.ingest(fixture("utf-7-conversion.eml"), [req], sender="") == 0
    # 7 unparseable
    assert site.ingest(b"\x00\x01 nothing here", [req]) == 0
    # 8 postmaster
    assert site.ingest(compose("Ops <ops@isp.example>", f"postmaster@{DOMAIN}", "Abuse report",
                               "FYI"), [f"postmaster@{DOMAIN}"]) == 0
    # 9 citizen_mismatch: someone else writes to Jane's reply address
    assert site.ingest(compose(f"FOI <{AUTHORITY}>", req, "RE", "A real answer."), [req]) == 0
    (fwd,) = site.mail_to(JANE)
    reply = addresses(fwd[1], "Reply-To")[0]
    assert site.ingest(compose("Mallory <m@evil.example>", reply, "Re", "As Jane."), [reply]) == 0
    # 10 withheld_attachment, found by an archive build
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = f"FOI <{AUTHORITY}>", req, "RE: files"
    m.set_content("Files.")
    m.add_attachment(b"PK\x03\x04 zip", maintype="application", subtype="zip", filename="all.zip")
    assert site.ingest(m.as_bytes(), [req]) == 0
    assert site.run("archive", "build", "--no-search").returncode == 0
    site.new_mail()

    listed = site.json("queue", "list")
    items = {i["reason"]: i["id"] for i in listed}
    zip_item = next(i["id"] for i in listed
                    if i["reason"] == "withheld_attachment" and "all.zip" in i["summary"])
    others = [i["id"] for i in listed
              if i["reason"] == "withheld_attachment" and i["id"] != zip_item]
    assert set(items) >= {"bad_token", "conflict", "weak_evidence", "spam", "loop", "bounce",
                          "unparseable", "role", "citizen_mismatch", "withheld_attachment"}

    def run(*args: str) -> None:
        r = site.run("--as", "alice", *args)
        assert r.returncode == 0, (args, r.stderr.decode())

    run("queue", "assign", str(items["bad_token"]), str(tid), "--reason", "typo")
    run("queue", "assign", str(items["conflict"]), str(tid), "--reason", "it is about gritting")
    run("queue", "reject", str(items["weak_evidence"]), "--reason", "contractor, not the authority")
    run("queue", "spam", str(items["spam"]))
    run("queue", "reject", str(items["loop"]), "--reason", "our own mail")
    run("queue", "approve", str(items["bounce"]), "--reason", "address checked, still valid")
    run("queue", "reject", str(items["unparseable"]), "--reason", "garbage")
    run("queue", "approve", str(items["role"]))
    run("queue", "reject", str(items["citizen_mismatch"]), "--reason", "not the citizen")
    run("queue", "release", str(zip_item), "--reason", "checked")
    for other in others:   # e.g. the delivery report inside the bounce: keep it private
        run("queue", "reject", str(other), "--reason", "not for publication")

    # The store: nothing open, every decision by alice; the assigned replies are on the thread.
    assert site.json("queue", "list") == []
    decided = site.json("queue", "list", "--all")
    assert {d["decided_by"] for d in decided} == {"alice"}
    responses = [x for x in site.json("thread", "show", str(tid))["messages"]
                 if x["kind"] == "response"]
    assert [r["match"]["method"] for r in responses].count("admin") == 2
    # The outbox: the two assigned replies were forwarded to Jane, nothing went to Mallory.
    sent = [rcpt for rcpt, _, _ in site.new_mail()]
    assert sent == [JANE, JANE]
    # The archive: the assigned replies and the released attachment are public.
    assert site.run("archive", "build", "--no-search").returncode == 0
    html = "\n".join(p.read_text() for p in (site.dir / "var/archive").rglob("*.html"))
    assert "Routes A-C." in html and "Mixed up." in html and "Pills" not in html
    # released: published under its content hash, offered under its own name
    assert [p for p in Path(site.dir / "var/archive").rglob("*") if p.parent.name == "attachments"]
    assert any('download="all.zip"' in p.read_text()
               for p in Path(site.dir / "var/archive").rglob("index.html"))
    assert len(site.json("audit")) == 10 + len(others)
