"""The whole round trip through the real CLI, as an MTA's pipe transport would drive it."""
from __future__ import annotations

import re

import dkim
import pytest

from conftest import DOMAIN, JANE, Site, addresses, compose

AUTHORITY = "foi@camden.gov.example"


def dns_from_record(site: Site):  # type: ignore[no-untyped-def]
    r = site.run("dkim", "record")
    assert r.returncode == 0, r.stderr
    txt = "".join(re.findall(r'"([^"]*)"', r.stdout.decode())).encode()
    assert txt.startswith(b"v=DKIM1;") and b"p=" in txt

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return txt if name.rstrip(b".") == f"mailflow._domainkey.{DOMAIN}".encode() else None
    return dnsfunc


def strip_local_delivery(raw: bytes) -> bytes:
    lines = raw.split(b"\r\n")
    while lines and lines[0].lower().startswith((b"return-path:", b"delivered-to:")):
        lines.pop(0)
    return b"\r\n".join(lines)


def ask(site: Site, title: str = "Road maintenance budget 2025", citizen: str = JANE,
        name: str = "Jane Citizen") -> dict:
    """A citizen asks and confirms; returns what reached the authority."""
    assert site.ingest(compose(f"{name} <{citizen}>", f"camden@{DOMAIN}", title,
                               "How much was spent on pothole repairs in 2025?"),
                       [f"camden@{DOMAIN}"]) == 0
    conf = site.mail_to(citizen)
    assert len(conf) == 1
    msg = conf[0][1]
    confirm = addresses(msg, "Reply-To")[0]
    assert re.fullmatch(rf"confirm-[0-9a-z]+@{DOMAIN}", confirm)
    assert site.ingest(compose(f"{name} <{citizen}>", confirm, "Re: " + str(msg["Subject"]), "Yes",
                               in_reply_to=str(msg["Message-ID"])), [confirm]) == 0
    sent = site.mail_to(AUTHORITY)
    assert len(sent) == 1
    req = sent[0][1]
    frm = addresses(req, "From")[0]
    m = re.fullmatch(rf"request-(\d+)-([0-9a-z]+)@{DOMAIN}", frm)
    assert m, frm
    return {"id": int(m.group(1)), "address": frm, "msg": req, "raw": sent[0][2],
            "confirm": confirm, "confirmation": msg}


def test_round_trip(site: Site) -> None:
    dns = dns_from_record(site)
    # 1. Jane asks: a confirmation that shows her text and says it will be published.
    assert site.ingest(compose(f"Jane Citizen <{JANE}>", f"camden@{DOMAIN}",
                               "Road maintenance budget 2025",
                               "How much was spent on pothole repairs in 2025?"),
                       [f"camden@{DOMAIN}"]) == 0
    (rcpt, conf, conf_raw), = site.new_mail()
    assert rcpt == JANE
    body = conf.get_body(("plain",)).get_content()
    assert "pothole repairs" in body and "published" in body
    assert conf["Auto-Submitted"] == "auto-generated"
    assert dkim.verify(strip_local_delivery(conf_raw), dnsfunc=dns)
    threads = site.json("thread", "list")
    assert [t["state"] for t in threads] == ["awaiting_confirmation"]
    assert threads[0]["due_date"] is None

    # 2. She confirms: the request goes out, signed, from the thread's address.
    confirm = addresses(conf, "Reply-To")[0]
    assert site.ingest(compose(f"Jane Citizen <{JANE}>", confirm, "Re: confirm", "Yes",
                               in_reply_to=str(conf["Message-ID"])), [confirm]) == 0
    (rcpt, req, req_raw), = site.new_mail()
    assert rcpt == AUTHORITY
    tid = threads[0]["id"]
    assert str(req["From"]) == f"Jane Citizen <{addresses(req, 'From')[0]}>"
    req_addr = addresses(req, "From")[0]
    assert re.fullmatch(rf"request-{tid}-[0-9a-z]{{12}}@{DOMAIN}", req_addr)
    assert str(req["Subject"]) == f"Freedom of Information request - Road maintenance budget 2025 [FOI #{tid}]"
    assert "Freedom of Information Act 2000" in " ".join(req.get_body(("plain",)).get_content().split())
    assert JANE.encode() not in req_raw.lower()
    assert req_raw.startswith(f"Return-Path: <{req_addr}>\r\nDelivered-To: {AUTHORITY}\r\n".encode())
    assert dkim.verify(strip_local_delivery(req_raw), dnsfunc=dns)
    t = site.json("thread", "show", str(tid))
    assert t["state"] == "waiting_response" and t["due_date"]
    sent = [m for m in t["messages"] if m["kind"] == "request"]
    assert sent and sent[0]["message_id"] == str(req["Message-ID"])

    # The confirmation address is single-use.
    assert site.ingest(compose(f"Jane Citizen <{JANE}>", confirm, "Re: confirm", "Yes again"),
                       [confirm]) == 0
    assert site.new_mail() == []

    # 3. The authority answers: matched by address, forwarded from a different secret.
    answer = compose(f"FOI Team <{AUTHORITY}>", req_addr, "RE: " + str(req["Subject"]),
                     "We spent 1,234,567 pounds.", in_reply_to=str(req["Message-ID"]))
    assert site.ingest(answer, [req_addr]) == 0
    (rcpt, fwd, fwd_raw), = site.new_mail()
    assert rcpt == JANE
    assert "1,234,567" in fwd.get_body(("plain",)).get_content()
    reply_addr = addresses(fwd, "Reply-To")[0]
    assert re.fullmatch(rf"reply-{tid}-[0-9a-z]{{12}}@{DOMAIN}", reply_addr)
    assert reply_addr.split("-")[2] != req_addr.split("-")[2]
    assert dkim.verify(strip_local_delivery(fwd_raw), dnsfunc=dns)
    t = site.json("thread", "show", str(tid))
    response = [m for m in t["messages"] if m["kind"] == "response"]
    assert len(response) == 1
    assert response[0]["match"]["method"] == "reply_address"
    assert response[0]["match"]["detail"]["source"] == "envelope recipient"

    # 4. Jane follows up, quoting the forward; the authority sees neither of her addresses.
    quoted = (f"Could you break that down by ward?\n\nOn Monday, Camden via mailflow <{reply_addr}> "
              f"wrote:\n> We spent 1,234,567 pounds.\n-- \nJane, {JANE}\n")
    assert site.ingest(compose(f"Jane Citizen <{JANE}>", reply_addr, "Re: thanks", quoted,
                               in_reply_to=str(fwd["Message-ID"])), [reply_addr]) == 0
    (rcpt, fu, fu_raw), = site.new_mail()
    assert rcpt == AUTHORITY
    assert addresses(fu, "From") == [req_addr]
    assert "by ward" in fu.get_body(("plain",)).get_content()
    assert JANE.encode() not in fu_raw.lower()
    assert reply_addr.split("@")[0].encode() not in fu_raw.lower()
    assert str(fu["In-Reply-To"]) == "".join(answer.split(b"Message-ID: ")[1].split(b"\r\n")[0].decode())
    assert dkim.verify(strip_local_delivery(fu_raw), dnsfunc=dns)


def test_same_message_twice_changes_nothing(site: Site) -> None:
    t = ask(site)
    answer = compose(f"FOI <{AUTHORITY}>", t["address"], "RE: x", "The answer.")
    assert site.ingest(answer, [t["address"]]) == 0
    assert len(site.mail_to(JANE)) == 1
    n = len(site.json("thread", "show", str(t["id"]))["messages"])
    assert site.ingest(answer, [t["address"]]) == 0
    assert len(site.json("thread", "show", str(t["id"]))["messages"]) == n
    assert site.new_mail() == []


def test_new_request_twice_makes_one_thread(site: Site) -> None:
    raw = compose(f"Jane <{JANE}>", f"camden@{DOMAIN}", "Budget", "Please send it.")
    assert site.ingest(raw, [f"camden@{DOMAIN}"]) == 0
    assert site.ingest(raw, [f"camden@{DOMAIN}"]) == 0
    assert len(site.json("thread", "list")) == 1
    assert len(site.mail_to(JANE)) == 1


def test_unknown_and_foreign_recipients_exit_67(site: Site) -> None:
    stray = compose(f"FOI <{AUTHORITY}>", f"nobody@{DOMAIN}", "Hello", "Anyone?")
    assert site.ingest(stray, [f"nobody@{DOMAIN}"]) == 67
    relay = compose(f"X <x@spam.example>", "victim@gmail.example", "Hi", "Relay me")
    assert site.ingest(relay, ["victim@gmail.example"]) == 67
    # without --rcpt, recipients come from the headers: still nothing of ours
    assert site.ingest(relay) == 67
    assert site.new_mail() == []
    assert site.json("thread", "list") == []


def test_recipients_from_headers_without_rcpt(site: Site) -> None:
    raw = compose(f"Jane <{JANE}>", f"camden@{DOMAIN}", "Budget", "Please send it.")
    assert site.ingest(raw) == 0
    assert len(site.mail_to(JANE)) == 1


def test_wrong_token_goes_to_the_queue_not_the_thread(site: Site) -> None:
    t = ask(site)
    forged = f"request-{t['id']}-aaaaaaaaaaaa@{DOMAIN}"
    assert site.ingest(compose(f"FOI <{AUTHORITY}>", forged, "RE: x", "Guess."), [forged]) == 0
    assert site.new_mail() == []
    assert [m["kind"] for m in site.json("thread", "show", str(t["id"]))["messages"]
            if m["direction"] == "in" and m["kind"] == "response"] == []
    q = site.json("queue", "list")
    assert [i["reason"] for i in q] == ["bad_token"]


def test_malformed_message_is_kept_for_an_admin(site: Site) -> None:
    t = ask(site)
    junk = b"\x00\x01 no headers at all \xff\xfe\r\n\r\nbody"
    assert site.ingest(junk, [t["address"]]) == 0
    q = site.json("queue", "list")
    assert [i["reason"] for i in q] == ["unparseable"]
    shown = site.json("queue", "show", str(q[0]["id"]))
    assert "no headers at all" in shown["message"]["raw_start"]
    assert site.new_mail() == []


def test_broken_mime_still_reaches_the_thread(site: Site) -> None:
    t = ask(site)
    broken = (b"From: FOI <" + AUTHORITY.encode() + b">\r\nTo: " + t["address"].encode() +
              b"\r\nSubject: =?utf-8?B?broken\r\nContent-Type: multipart/mixed; boundary=\"x\"\r\n"
              b"\r\n--x\r\nContent-Type: text/plain; charset=bogus-charset\r\n\r\n"
              b"Caf\xe9 figures attached\r\n--x\r\nContent-Type: multipart/alternative\r\n\r\n"
              b"no boundary and no end\r\n")
    assert site.ingest(broken, [t["address"]]) == 0
    (rcpt, fwd, _), = site.new_mail()
    assert rcpt == JANE and "figures attached" in fwd.get_body(("plain",)).get_content()


def test_empty_request_is_answered_not_started(site: Site) -> None:
    raw = compose(f"Jane <{JANE}>", f"camden@{DOMAIN}", "", "Please send it.")
    assert site.ingest(raw, [f"camden@{DOMAIN}"]) == 0
    (rcpt, msg, _), = site.new_mail()
    assert rcpt == JANE and "no subject" in str(msg["Subject"])
    assert site.json("thread", "list") == []


def test_auto_reply_to_confirmation_does_not_send_the_request(site: Site) -> None:
    raw = compose(f"Jane <{JANE}>", f"camden@{DOMAIN}", "Budget", "Please send it.")
    assert site.ingest(raw, [f"camden@{DOMAIN}"]) == 0
    conf = site.mail_to(JANE)[0][1]
    confirm = addresses(conf, "Reply-To")[0]
    ooo = compose(f"Jane <{JANE}>", confirm, "Out of Office: Re: confirm", "I am away.",
                  extra={"Auto-Submitted": "auto-replied"})
    assert site.ingest(ooo, [confirm]) == 0
    assert site.new_mail() == []
    assert site.json("thread", "list")[0]["state"] == "awaiting_confirmation"


def test_auto_reply_from_authority_is_kept_not_forwarded(site: Site) -> None:
    t = ask(site)
    ooo = compose(f"FOI <{AUTHORITY}>", t["address"], "Automatic reply: your request",
                  "We have received your request.", extra={"Auto-Submitted": "auto-replied"})
    assert site.ingest(ooo, [t["address"]], sender="") == 0
    assert site.new_mail() == []
    kinds = [m["kind"] for m in site.json("thread", "show", str(t["id"]))["messages"]]
    assert "auto_reply" in kinds


def test_follow_up_from_a_stranger_is_queued(site: Site) -> None:
    t = ask(site)
    assert site.ingest(compose(f"FOI <{AUTHORITY}>", t["address"], "RE: x", "Answer."),
                       [t["address"]]) == 0
    fwd = site.mail_to(JANE)[0][1]
    reply_addr = addresses(fwd, "Reply-To")[0]
    assert site.ingest(compose("Mallory <mallory@evil.example>", reply_addr, "Re", "As Jane."),
                       [reply_addr]) == 0
    assert site.new_mail() == []
    assert "citizen_mismatch" in [i["reason"] for i in site.json("queue", "list")]


def test_authority_list_json(site: Site) -> None:
    rows = site.json("authority", "list")
    camden = next(r for r in rows if r["slug"] == "camden")
    assert camden["emails"] == [AUTHORITY] and camden["law"] == "uk-foia"
    assert set(camden) >= {"slug", "name", "emails", "law"}


def test_ingest_as_its_own_process_like_an_mta_pipe(site: Site) -> None:
    """The suite runs CLI commands in-process (conftest: Site.run); this is the real entry
    point an MTA's pipe transport starts, with its exit codes: 0 taken, 67 not ours."""
    import subprocess

    from conftest import MAILFLOW
    raw = compose(f"Jane Citizen <{JANE}>", f"camden@{DOMAIN}", "Budget", "How much?")
    for rcpt, code in ((f"camden@{DOMAIN}", 0), (f"nobody@{DOMAIN}", 67)):
        r = subprocess.run([*MAILFLOW, "--config", str(site.config), "ingest", "--rcpt", rcpt,
                            "--sender", JANE], input=raw, capture_output=True, cwd=site.dir,
                           timeout=120)
        assert r.returncode == code, (rcpt, r.returncode, r.stderr.decode())
    assert [rcpt for rcpt, _, _ in site.new_mail()] == [JANE]   # the confirmation, once


def test_ingest_reads_the_report_areas_only_for_a_report(site: Site) -> None:
    """`ingest` starts a process per message, so it reads rules/areas.geojson (shapely and
    numpy: a quarter of its start-up) only when the message is a fault report. A broken areas
    file then fails that report with 75 — kept in the spool, the MTA retries — while requests
    go on; the daemon, which reads every rules file before it starts, refuses to start."""
    import subprocess

    from conftest import MAILFLOW
    areas = site.dir / "rules" / "areas.geojson"
    areas.write_text('{"type": "FeatureCollection", "features": [{"type": "Feature"}]}')

    def ingest(rcpt: str, subject: str, body: str) -> subprocess.CompletedProcess[bytes]:
        raw = compose(f"Jane Citizen <{JANE}>", rcpt, subject, body)
        return subprocess.run([*MAILFLOW, "--config", str(site.config), "ingest", "--rcpt", rcpt,
                               "--sender", JANE], input=raw, capture_output=True,
                              cwd=site.dir, timeout=120)
    r = ingest(f"camden@{DOMAIN}", "Budget", "How much?")
    assert r.returncode == 0, r.stderr.decode()
    r = ingest(f"report@{DOMAIN}", "Pothole", "A pothole at 51.1652, -1.4497.")
    assert r.returncode == 75, r.stderr.decode()
    assert "areas.geojson" in r.stderr.decode()
    kept = [p for p in (site.dir / "var" / "spool").rglob("*.mail") if p.parent.name != "done"]
    assert len(kept) == 1, kept   # the report, kept for the retry
    from mailflow.errors import RulesError
    from mailflow.site import Site as MfSite
    with pytest.raises(RulesError, match="areas.geojson"):
        MfSite.open(site.config)


def test_an_authority_change_keeps_the_fault_report_rules(site: Site) -> None:
    from mailflow.authorities import Authorities
    from mailflow.site import Site as MfSite
    mf = MfSite.open(site.config)
    try:
        assert mf.rules.reports is not None
        Authorities(mf, actor="alice").add({"slug": "mercia", "name": "Mercia Council",
                                            "emails": ["foi@mercia.gov.example"]})
        assert "mercia" in mf.rules.authorities
        assert mf.takes_reports and mf.rules.reports is not None   # were dropped before
        assert mf.rules.reports.route
    finally:
        mf.close()
