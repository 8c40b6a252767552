"""Matching and classification end to end, through `mailflow ingest` and SMTP, with Alaveteli's
own fixtures (tests/corpus/alaveteli, placeholders EMAIL_FROM/EMAIL_TO/EMAIL_BCC filled in as
Alaveteli's tests do)."""
from __future__ import annotations

import json
import smtplib
from pathlib import Path

from conftest import DOMAIN, JANE, Daemon, Site, addresses, compose, wait_for
from test_roundtrip import AUTHORITY, ask

CORPUS = Path(__file__).parent / "corpus" / "alaveteli"


def fixture(name: str, **placeholders: str) -> bytes:
    raw = (CORPUS / name).read_bytes()
    for key, value in placeholders.items():
        raw = raw.replace(key.encode(), value.encode())
    return raw


def responses(site: Site, tid: int, kind: str = "response") -> list[dict]:
    return [m for m in site.json("thread", "show", str(tid))["messages"]
            if m["direction"] == "in" and m["kind"] == kind]


def queue_reasons(site: Site) -> list[str]:
    return [i["reason"] for i in site.json("queue", "list")]


def test_bcc_reply_found_by_its_bcc_header(site: Site) -> None:
    t = ask(site)
    raw = fixture("bcc-contact-reply.eml", EMAIL_FROM=AUTHORITY, EMAIL_TO="someone@gov.example",
                  EMAIL_BCC=t["address"])
    assert site.ingest(raw) == 0            # no envelope: a catch-all mailbox
    (r,) = responses(site, t["id"])
    assert r["match"]["method"] == "reply_address"
    assert "Bcc" in json.dumps(r["match"]["detail"])
    assert len(site.mail_to(JANE)) == 1


def test_bcc_reply_found_by_received_for(site: Site) -> None:
    t = ask(site)
    raw = fixture("bcc-contact-reply.eml", EMAIL_FROM=AUTHORITY, EMAIL_TO="someone@gov.example",
                  EMAIL_BCC="")
    raw = raw.replace(b"Bcc: \n", b"")
    received = (f"Received: from mx.gov.example (mx.gov.example [192.0.2.1])\n"
                f"\tby mail.ask.example with ESMTPS id 4Xyz\n"
                f"\tfor <{t['address']}>; Wed, 24 Oct 2007 11:40:00 +0100\n").encode()
    assert site.ingest(received + raw) == 0
    (r,) = responses(site, t["id"])
    assert "Received" in json.dumps(r["match"]["detail"])


def test_malformed_to_and_cc_still_found(site: Site) -> None:
    t = ask(site)
    raw = fixture("malformed-to-and-cc.eml").replace(b"bar@example.org", t["address"].encode())
    raw = raw.replace(b"quux@example.org", AUTHORITY.encode())
    assert site.ingest(raw) == 0
    assert len(responses(site, t["id"])) == 1


def test_one_message_to_several_requests_lands_on_each_once(site: Site) -> None:
    t1 = ask(site, "First request")
    t2 = ask(site, "Second request", citizen="bob@citizen.example", name="Bob")
    raw = compose(f"FOI <{AUTHORITY}>", f"{t1['address']}, {t2['address']}", "RE: both",
                  "One answer for both of you.")
    assert site.ingest(raw, [t1["address"], t2["address"]]) == 0
    assert len(responses(site, t1["id"])) == 1 and len(responses(site, t2["id"])) == 1
    got = sorted(rcpt for rcpt, _, _ in site.new_mail())
    assert got == ["bob@citizen.example", JANE]
    assert site.ingest(raw, [t1["address"], t2["address"]]) == 0   # again: nothing new
    assert len(responses(site, t1["id"])) == 1 and site.new_mail() == []


def test_mangled_address_in_headers_matches_the_same_thread(site: Site) -> None:
    t = ask(site)
    tid, token = t["id"], t["address"].split("-")[2].split("@")[0]
    mangled = f"Request{tid}-{token.upper()}@ask.example"      # missing hyphen, wrong case
    raw = compose(f"FOI <{AUTHORITY}>", f'"{mangled}" <{mangled}>', "RE: x", "Retyped.")
    assert site.ingest(raw) == 0
    (r,) = responses(site, tid)
    assert r["match"]["method"] == "reply_address"


def test_wrong_token_in_headers_goes_to_the_queue(site: Site) -> None:
    t = ask(site)
    raw = compose(f"FOI <{AUTHORITY}>", f"request-{t['id']}-zzzzzzzzzzzz@{DOMAIN}", "RE", "Guess")
    assert site.ingest(raw) == 0
    assert responses(site, t["id"]) == [] and queue_reasons(site) == ["bad_token"]


def test_conflicting_evidence_goes_to_the_queue(site: Site) -> None:
    t1 = ask(site, "First request")
    t2 = ask(site, "Second request", citizen="bob@citizen.example", name="Bob")
    raw = compose(f"FOI <{AUTHORITY}>", t1["address"], "RE: mixed up", "Which one?",
                  in_reply_to=str(t2["msg"]["Message-ID"]))
    assert site.ingest(raw, [t1["address"]]) == 0
    assert responses(site, t1["id"]) == [] and responses(site, t2["id"]) == []
    assert queue_reasons(site) == ["conflict"]
    assert site.new_mail() == []


def test_in_reply_to_alone_finds_the_thread(site: Site) -> None:
    t = ask(site)
    raw = compose(f"FOI <{AUTHORITY}>", f"old-address@{DOMAIN}", "RE: your request", "Answer.",
                  in_reply_to=str(t["msg"]["Message-ID"]))
    assert site.ingest(raw) == 0            # nothing but the Message-ID names us
    (r,) = responses(site, t["id"])
    assert r["match"]["method"] in ("in_reply_to", "references")


def test_subject_tag_needs_a_known_sender(site: Site) -> None:
    t = ask(site)
    subject = f"Your request [FOI #{t['id']}]"
    known = compose(f"FOI <{AUTHORITY}>", f"lost@{DOMAIN}", subject, "Tagged answer.")
    assert site.ingest(known) == 0
    (r,) = responses(site, t["id"])
    assert r["match"]["method"] == "subject_tag"
    unknown = compose("Someone <someone@elsewhere.example>", f"lost@{DOMAIN}", subject, "Hm.")
    assert site.ingest(unknown) == 0
    assert len(responses(site, t["id"])) == 1
    assert "weak_evidence" in queue_reasons(site)


def test_nothing_naming_us_exits_67(site: Site) -> None:
    ask(site)
    raw = compose(f"FOI <{AUTHORITY}>", f"lost@{DOMAIN}", "Hello", "Unrelated.")
    assert site.ingest(raw) == 67


def test_out_of_office_notices_are_kept_but_not_forwarded(site: Site) -> None:
    t = ask(site)
    for name in ("track-response-exchange-oof-1.eml", "track-response-lotus-oof-1.eml",
                 "track-response-messagelabs-oof-1.eml", "track-response-abcmail-oof.eml"):
        assert site.ingest(fixture(name), [t["address"]]) == 0, name
    assert len(responses(site, t["id"], "auto_reply")) == 4
    assert responses(site, t["id"]) == []
    assert site.mail_to(JANE) == []


def test_permanent_bounce_marks_delivery_failed(site: Site) -> None:
    t = ask(site)
    assert site.ingest(fixture("utf-7-conversion.eml"), [t["address"]], sender="") == 0
    assert len(responses(site, t["id"], "bounce")) == 1
    th = site.json("thread", "show", str(t["id"]))
    assert th["delivery_status"] == "failed"
    assert "bounce" in queue_reasons(site)
    assert site.mail_to(JANE) == []


def test_mailbox_full_is_a_temporary_bounce(site: Site) -> None:
    t = ask(site)
    assert site.ingest(fixture("track-response-multipart-report.eml"), [t["address"]],
                       sender="") == 0             # Status: 5.2.2, mailbox full
    assert len(responses(site, t["id"], "bounce")) == 1
    assert site.json("thread", "show", str(t["id"]))["delivery_status"] != "failed"
    assert "bounce" not in queue_reasons(site)


def test_exim_bounce_with_auto_submitted_is_a_bounce(site: Site) -> None:
    t = ask(site)
    assert site.ingest(fixture("track-response-exim-bounce.eml"), [t["address"]]) == 0
    assert len(responses(site, t["id"], "bounce")) == 1


def test_our_own_mail_coming_back_is_not_a_reply(site: Site) -> None:
    t = ask(site)
    # The request itself, looped back to its own address (a misconfigured forward).
    looped = t["raw"].split(b"\r\n", 2)[2]       # without Return-Path/Delivered-To
    assert site.ingest(looped, [t["address"]]) == 0
    assert responses(site, t["id"]) == [] and site.new_mail() == []
    assert queue_reasons(site) == ["loop"]


def test_spam_over_the_configured_threshold_is_queued(site: Site) -> None:
    site.set("classify", "spam_header", '"X-Spam-Score"')
    t = ask(site)
    raw = compose(f"FOI <{AUTHORITY}>", t["address"], "RE", "Cheap pills",
                  extra={"X-Spam-Score": "12.3"})
    assert site.ingest(raw, [t["address"]]) == 0
    assert responses(site, t["id"]) == [] and queue_reasons(site) == ["spam"]


def test_new_sender_at_the_authority_is_learned_and_reply_to_preferred(site: Site) -> None:
    t = ask(site)
    raw = compose("Officer <officer@camden.gov.example>", t["address"], "RE", "Answer.",
                  extra={"Reply-To": "foi-casework@camden.gov.example"})
    assert site.ingest(raw, [t["address"]]) == 0
    fwd = site.mail_to(JANE)[0][1]
    reply_addr = addresses(fwd, "Reply-To")[0]
    assert site.ingest(compose(f"Jane <{JANE}>", reply_addr, "Re", "Thanks!"), [reply_addr]) == 0
    assert len(site.mail_to("foi-casework@camden.gov.example")) == 1
    # The learned sender now makes a subject tag count.
    tagged = compose("Officer <officer@camden.gov.example>", f"lost@{DOMAIN}",
                     f"More [FOI #{t['id']}]", "More.")
    assert site.ingest(tagged) == 0
    assert len(responses(site, t["id"])) == 2


def test_no_reply_addresses_are_never_learned(site: Site) -> None:
    t = ask(site)
    raw = compose("Portal <no-reply@camden.gov.example>", t["address"], "RE", "Answer.")
    assert site.ingest(raw, [t["address"]]) == 0
    tagged = compose("Portal <no-reply@camden.gov.example>", f"lost@{DOMAIN}",
                     f"More [FOI #{t['id']}]", "More.")
    assert site.ingest(tagged) == 0
    assert len(responses(site, t["id"])) == 1


def test_closed_thread_refused_at_rcpt_and_queued_by_ingest(site: Site, daemon: Daemon) -> None:
    t = ask(site)
    assert site.run("thread", "close", str(t["id"])).returncode == 0
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=20) as s:
        s.ehlo("gov.example")
        s.mail(AUTHORITY)
        code, text = s.rcpt(t["address"])
        assert code == 550 and b"closed" in text
    raw = compose(f"FOI <{AUTHORITY}>", t["address"], "RE", "Late answer.")
    assert site.ingest(raw, [t["address"]]) == 0
    assert responses(site, t["id"]) == [] and queue_reasons(site) == ["gatekeeper"]


def test_authority_only_thread(site: Site, daemon: Daemon) -> None:
    t = ask(site)
    assert site.run("thread", "allow", str(t["id"]), "authority").returncode == 0
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=20) as s:
        s.ehlo("x.example")
        s.mail("spammer@spam.example")
        assert s.rcpt(t["address"])[0] == 550
        s.rset()
        s.mail(AUTHORITY)
        assert s.rcpt(t["address"])[0] == 250
        s.rset()
        s.mail("")
        assert s.rcpt(t["address"])[0] == 250      # bounces of our own mail still come in


def test_explain_says_what_would_happen_without_storing(site: Site, tmp_path: Path) -> None:
    t = ask(site)
    f = tmp_path / "reply.eml"
    f.write_bytes(compose(f"FOI <{AUTHORITY}>", t["address"], "RE", "Answer."))
    out = site.json("explain", str(f), "--rcpt", t["address"])
    assert out["classification"] == "reply" and out["decision"] == "thread"
    assert out["threads"] == [t["id"]] and out["reasons"]
    assert responses(site, t["id"]) == []
    f.write_bytes(fixture("track-response-exchange-oof-1.eml"))
    out = site.json("explain", str(f), "--rcpt", t["address"])
    assert out["classification"] == "auto_reply"
    f.write_bytes(compose("X <x@spam.example>", "victim@gmail.example", "Hi", "Relay"))
    out = site.json("explain", str(f), "--rcpt", "victim@gmail.example")
    assert out["decision"] == "reject"


def test_outgoing_mail_carries_loop_and_auto_markers(site: Site) -> None:
    t = ask(site)
    conf, req = t["confirmation"], t["msg"]
    assert conf["Auto-Submitted"] == "auto-generated"
    assert req["Auto-Submitted"] is None            # a person's request: people may answer it
    for m in (conf, req):
        assert m["X-Auto-Response-Suppress"] == "OOF, AutoReply"
        assert m["X-Mailflow-Loop"] == DOMAIN


def test_smtp_reply_with_mangled_envelope_address(site: Site, daemon: Daemon) -> None:
    t = ask(site)
    tid, token = t["id"], t["address"].split("-")[2].split("@")[0]
    mangled = f"REQUEST-{tid}--{token.upper()}@ask.example"     # doubled hyphen, upper case
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=20) as s:
        s.sendmail(AUTHORITY, [mangled], compose(f"FOI <{AUTHORITY}>", mangled, "RE", "Typed."))
    wait_for(lambda: responses(site, tid), what="mangled reply on its thread")


def test_smtp_reply_to_address_missing_its_hyphens(site: Site, daemon: Daemon) -> None:
    t = ask(site)
    tid, token = t["id"], t["address"].split("-")[2].split("@")[0]
    mangled = f"request{tid}{token}@ask.example"
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=20) as s:
        s.sendmail(AUTHORITY, [mangled], compose(f"FOI <{AUTHORITY}>", mangled, "RE", "Typed."))
    wait_for(lambda: responses(site, tid), what="mangled reply on its thread")
