"""Relay and backscatter: mailflow relays for nobody, refuses unknown and closed addresses
while the sender is still connected, and never sends mail in answer to a null, automatic or
forged sender (a bounce or an autoreply to a forged address is spam sent by us)."""
from __future__ import annotations

import pytest

from conftest import DOMAIN, JANE, Daemon, Site, addresses, compose, wait_for
from test_roundtrip import AUTHORITY, ask

from .conftest import RawSMTP

RELAY_ATTEMPTS = {
    "other-domain": "victim@gmail.example",
    "percent-hack": f"victim%gmail.example@{DOMAIN}",
    "percent-hack-on-a-slug": f"camden%gmail.example@{DOMAIN}",
    "source-route": f"@{DOMAIN}:victim@gmail.example",
    "source-route-two-hops": f"@{DOMAIN},@mx.gmail.example:victim@gmail.example",
    "quoted-local-part-with-at": f'"victim@gmail.example"@{DOMAIN}',
    "quoted-slug-with-at": f'"camden@gmail.example"@{DOMAIN}',
    "bang-path": f"gmail.example!victim@{DOMAIN}",
    "two-at-signs": f"victim@gmail.example@{DOMAIN}",
    "our-domain-as-prefix": f"camden@{DOMAIN}.gmail.example",
    "subdomain": f"camden@mail.{DOMAIN}",
    "ip-literal": "victim@[127.0.0.1]",
    "ip-literal-ours": "camden@[127.0.0.1]",
    "no-domain": "victim",
    "percent-only": f"victim%gmail.example",
}


@pytest.mark.parametrize("mail_from", [JANE, "", f"camden@{DOMAIN}", f"postmaster@{DOMAIN}"],
                         ids=["stranger", "null-sender", "forged-ours", "forged-postmaster"])
def test_no_relaying_for_anyone(site: Site, daemon: Daemon, mail_from: str) -> None:
    with RawSMTP(daemon.port) as c:
        code, text = c.cmd(f"EHLO [{'127.0.0.1'}]")
        assert code == 250 and b"AUTH" not in text  # no login that could make a relay client
        assert c.cmd("AUTH PLAIN AGphbmUAcGFzcw==")[0] >= 500
        assert c.cmd(f"MAIL FROM:<{mail_from}>")[0] == 250
        refused = {name: c.cmd(f"RCPT TO:<{rcpt}>") for name, rcpt in RELAY_ATTEMPTS.items()}
        assert {n: r[0] for n, r in refused.items() if not 500 <= r[0] < 600} == {}, refused
        assert c.cmd("DATA")[0] == 503  # not one recipient was taken
    assert site.json("status")["spool_pending"] == 0
    assert site.json("outbox", "list") == []


def test_unknown_addresses_are_refused_at_rcpt(site: Site, daemon: Daemon) -> None:
    with RawSMTP(daemon.port) as c:
        c.cmd("EHLO x")
        c.cmd(f"MAIL FROM:<{JANE}>")
        for rcpt in (f"nobody@{DOMAIN}", f"camdenn@{DOMAIN}", f"root@{DOMAIN}",
                     f"camden-foi@{DOMAIN}"):
            code, text = c.cmd(f"RCPT TO:<{rcpt}>")
            assert (code, text[:5]) == (550, b"5.1.1"), (rcpt, text)


def test_closed_threads_are_refused_at_rcpt_on_both_sides(site: Site) -> None:
    req = ask(site)
    tid = req["id"]
    # The forward to the citizen carries the citizen-side (reply-) address.
    answer = compose(f"FOI <{AUTHORITY}>", req["address"], "RE: request", "Here you are.",
                     in_reply_to=str(req["msg"]["Message-ID"]))
    assert site.ingest(answer, [req["address"]], sender=AUTHORITY) == 0
    (_, fwd, _), = site.mail_to(JANE)
    reply_addr = addresses(fwd, "Reply-To")[0]
    assert site.run("thread", "close", str(tid)).returncode == 0
    d = Daemon(site)
    try:
        with RawSMTP(d.port) as c:
            c.cmd("EHLO x")
            for sender, rcpt in ((AUTHORITY, req["address"]), (JANE, reply_addr)):
                assert c.cmd(f"MAIL FROM:<{sender}>")[0] == 250
                code, text = c.cmd(f"RCPT TO:<{rcpt}>")
                assert code == 550 and b"closed" in text, text
                assert c.cmd("RSET")[0] == 250
    finally:
        d.stop()
    assert site.mail_to(AUTHORITY) == [] and site.mail_to(JANE) == []


def _msg(frm: str, subject: str = "Budget for road repairs", body: str = "How much?",
         extra: dict[str, str] | None = None) -> bytes:
    return compose(frm, f"camden@{DOMAIN}", subject, body, extra=extra)


DSN = (b"From: Mail Delivery System <MAILER-DAEMON@mx.citizen.example>\r\n"
       b"To: camden@" + DOMAIN.encode() + b"\r\nSubject: Undelivered Mail Returned to Sender\r\n"
       b"Auto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
       b"Content-Type: multipart/report; report-type=delivery-status; boundary=r\r\n\r\n"
       b"--r\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
       b"--r\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.citizen.example\r\n"
       b"\r\nFinal-Recipient: rfc822; someone@citizen.example\r\nAction: failed\r\n"
       b"Status: 5.1.1\r\n\r\n--r--\r\n")

# (envelope sender, message): none of these may make mailflow write to anyone.
NO_ANSWER = {
    "null-sender": ("", _msg(f"Jane <{JANE}>")),
    "auto-submitted": (JANE, _msg(f"Jane <{JANE}>", extra={"Auto-Submitted": "auto-replied"})),
    "auto-generated": (JANE, _msg(f"Jane <{JANE}>", extra={"Auto-Submitted": "auto-generated"})),
    "precedence-bulk": (JANE, _msg(f"Jane <{JANE}>", extra={"Precedence": "bulk"})),
    "precedence-list": (JANE, _msg(f"Jane <{JANE}>", extra={"Precedence": "list"})),
    "x-autoreply": (JANE, _msg(f"Jane <{JANE}>", "Out of office", "I am away.",
                               extra={"X-Autoreply": "yes"})),
    "mailer-daemon": (JANE, _msg("MAILER-DAEMON@citizen.example")),
    "noreply": (JANE, _msg("No Reply <noreply@citizen.example>")),
    "dsn": ("", DSN),
    "forged-as-us": (JANE, _msg(f"Camden <camden@{DOMAIN}>")),
    "forged-reply-to-us": (JANE, _msg(f"Jane <{JANE}>", extra={"Reply-To": f"camden@{DOMAIN}"})),
    "our-own-mail-back": (JANE, _msg(f"Jane <{JANE}>", extra={"X-Mailflow-Loop": DOMAIN})),
    "no-from-at-all": (JANE, b"To: camden@" + DOMAIN.encode() + b"\r\nSubject: x\r\n\r\nhi\r\n"),
}


def test_no_mail_is_sent_in_answer_to_null_automatic_or_forged_senders(
        site: Site, daemon: Daemon) -> None:
    with RawSMTP(daemon.port) as c:
        c.cmd("EHLO x")
        for name, (sender, raw) in NO_ANSWER.items():
            assert c.cmd(f"MAIL FROM:<{sender}>")[0] == 250, name
            assert c.cmd(f"RCPT TO:<camden@{DOMAIN}>")[0] == 250, name
            assert c.cmd("DATA")[0] == 354
            c.send(raw.replace(b"\r\n.", b"\r\n..") + b".\r\n")
            assert c.reply()[0] == 250, name
    # Every message was kept for a person to look at ...
    queue = wait_for(lambda: (q := site.json("queue", "list", "--all"))
                     and len(q) >= len(NO_ANSWER) and q, what="every message queued")
    assert len(queue) == len(NO_ANSWER)
    assert site.json("status")["spool_pending"] == 0
    # ... and nothing was written to anyone: no confirmation, no bounce, no autoreply.
    assert site.json("thread", "list") == []
    assert site.json("outbox", "list") == []
    assert site.new_mail() == []


def test_no_mail_is_sent_in_answer_to_automatic_mail_on_a_thread(site: Site) -> None:
    """An out-of-office or a bounce to a thread address, on either side, is recorded and
    answered by nothing (no forward of an auto-reply to the citizen's own autoresponder)."""
    req = ask(site)
    answer = compose(f"FOI <{AUTHORITY}>", req["address"], "RE: request", "Here you are.")
    assert site.ingest(answer, [req["address"]], sender=AUTHORITY) == 0
    (_, fwd, _), = site.mail_to(JANE)
    reply_addr = addresses(fwd, "Reply-To")[0]
    ooo = {"Auto-Submitted": "auto-replied", "X-Autoreply": "yes"}
    cases = [
        (AUTHORITY, req["address"], compose(f"FOI <{AUTHORITY}>", req["address"],
                                            "Automatic reply: away", "Back Monday", extra=ooo)),
        ("", req["address"], compose("MAILER-DAEMON@camden.gov.example", req["address"],
                                     "Delivery delayed", "Still trying")),
        (JANE, reply_addr, compose(f"Jane <{JANE}>", reply_addr, "Out of office", "Away",
                                   extra=ooo)),
        ("", reply_addr, compose(f"MAILER-DAEMON@citizen.example", reply_addr, "Undeliverable",
                                 "Mailbox full")),
        # Someone else writing on Jane's side of the thread is held, never acknowledged.
        ("mallory@evil.example", reply_addr, compose("Mallory <mallory@evil.example>",
                                                     reply_addr, "withdraw", "withdraw")),
    ]
    for sender, rcpt, raw in cases:
        assert site.ingest(raw, [rcpt], sender=sender) == 0
    assert site.new_mail() == []
    assert site.json("thread", "show", str(req["id"]))["state"] != "user_withdrawn"


def test_a_reply_to_naming_someone_else_gets_no_confirmation(site: Site) -> None:
    raw = _msg(f"Jane <{JANE}>", extra={"Reply-To": "victim@elsewhere.example"})
    assert site.ingest(raw, [f"camden@{DOMAIN}"], sender=JANE) == 0
    assert site.mail_to("victim@elsewhere.example") == []
