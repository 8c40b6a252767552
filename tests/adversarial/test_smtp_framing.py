"""SMTP framing: where a message ends, what STARTTLS throws away, and that pipelined
transactions never bleed into each other.

SMTP smuggling (SEC Consult, December 2023; CVE-2023-51764/51765/51766) hides a second
transaction behind an end-of-data sequence that one server honours and another does not.
mailflow ends a message only at <CRLF>.<CRLF>; every other variant stays message text.
"""
from __future__ import annotations

import re
import socket
import ssl

import pytest

from conftest import DOMAIN, JANE, Daemon, Site, compose, wait_for
from mailflow.spool import Spool

from .conftest import FOI, RawSMTP, TlsFiles, ingress, queued_id

FIRST = f"request-1-abc@{FOI}"
SECOND = f"request-2-def@{FOI}"

# The end-of-data look-alikes of the SMTP smuggling research (and smtpsmug), each followed by
# a complete second transaction. Only <CRLF>.<CRLF> may end a message.
VARIANTS = {
    "LF.LF": b"\n.\n",
    "LF.CRLF": b"\n.\r\n",
    "CR.CR": b"\r.\r",
    "CR.LF": b"\r.\n",
    "CRLF.LF": b"\r\n.\n",
    "CRLF.CR": b"\r\n.\r",
    "LF.CR": b"\n.\r",
    "CR.CRLF": b"\r.\r\n",
    "CRLF-NUL.CRLF": b"\r\n\x00.\r\n",
    "CRLF.NUL-CRLF": b"\r\n.\x00\r\n",
    "CRLF.SP-CRLF": b"\r\n. \r\n",
    "CRCRLF.CRCRLF": b"\r\r\n.\r\r\n",
    "LFLF.LFLF": b"\n\n.\n\n",
}


def smuggling_payload(eod: bytes, smuggled_rcpt: str, marker: bytes) -> bytes:
    """A message whose body hides `eod` and, behind it, a whole second transaction."""
    return (b"From: Citizen <c@example.org>\r\nTo: " + FIRST.encode() + b"\r\n"
            b"Subject: an ordinary message\r\n\r\nfirst body" + eod
            + b"MAIL FROM:<evil@attacker.example>\r\n"
            + b"RCPT TO:<" + smuggled_rcpt.encode() + b">\r\n"
            + b"DATA\r\n"
            + b"From: Boss <boss@" + FOI.encode() + b">\r\nSubject: " + marker + b"\r\n\r\n"
            + marker + b" body\r\n")


@pytest.mark.parametrize("eod", list(VARIANTS.values()), ids=list(VARIANTS))
def test_smuggled_end_of_data_never_splits_one_message_into_two(spool: Spool, eod: bytes) -> None:
    payload = smuggling_payload(eod, SECOND, b"SMUGGLED")
    with ingress(spool) as srv, RawSMTP(srv.port) as c:
        assert c.banner[0] == 220
        assert c.cmd("EHLO attacker.example")[0] == 250
        # Everything in one go, as an attacker's relay would pass it on, then the one true end.
        c.send(b"MAIL FROM:<c@example.org>\r\nRCPT TO:<" + FIRST.encode() + b">\r\nDATA\r\n")
        assert [c.reply()[0] for _ in range(3)] == [250, 250, 354]
        c.send(payload + b".\r\nQUIT\r\n")
        replies = c.rest()
    # Exactly one message accepted, then goodbye: no 250/354 for a smuggled MAIL/RCPT/DATA.
    assert [r[:3] for r in replies] == [b"250", b"221"], replies
    (id,) = spool.pending()
    assert queued_id(replies[0]) == id
    item = spool.claim(id)
    assert item is not None
    assert item.envelope.rcpt_tos == [FIRST]
    assert item.envelope.mail_from == "c@example.org"
    raw = item.read()
    # The smuggled transaction is inside the one stored message, as text.
    assert b"MAIL FROM:<evil@attacker.example>" in raw and b"SMUGGLED body" in raw
    assert raw.startswith(b"From: Citizen <c@example.org>\r\n")


def test_bare_newlines_are_stored_unchanged_inside_the_message(spool: Spool) -> None:
    """Bare LF and CR are not line ends and not refused: the raw message is the record."""
    body = b"Subject: x\r\n\r\na\nb\rc\r\n\n.\n\r\nd\x00e\r\n"
    with ingress(spool) as srv, RawSMTP(srv.port) as c:
        c.cmd("EHLO x")
        c.cmd("MAIL FROM:<c@example.org>")
        c.cmd(f"RCPT TO:<{FIRST}>")
        assert c.cmd("DATA")[0] == 354
        c.send(body + b".\r\n")
        assert c.reply()[0] == 250
    item = spool.claim()
    assert item is not None and item.read() == body


def test_smuggling_variants_through_the_daemon_start_one_request_each(site: Site,
                                                                       daemon: Daemon) -> None:
    """End to end: every variant, one connection, the real daemon and store. Each message
    starts one request for camden; the smuggled transactions (to edinburgh, from an attacker)
    never happen."""
    with RawSMTP(daemon.port) as c:
        c.cmd("EHLO attacker.example")
        for name, eod in VARIANTS.items():
            c.send(f"MAIL FROM:<{JANE}>\r\nRCPT TO:<camden@{DOMAIN}>\r\nDATA\r\n".encode())
            assert [c.reply()[0] for _ in range(3)] == [250, 250, 354], name
            body = (f"From: Jane <{JANE}>\r\nTo: camden@{DOMAIN}\r\nSubject: Variant {name}\r\n"
                    f"\r\nPlease send the budget").encode() + eod
            body += (f"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<edinburgh@{DOMAIN}>\r\n"
                     f"DATA\r\nFrom: evil@attacker.example\r\nSubject: smuggled {name}\r\n\r\n"
                     f"smuggled\r\n").encode()
            c.send(body + b".\r\n")
            code, text = c.reply()
            assert code == 250 and b"queued as" in text, (name, text)
        assert c.cmd("QUIT")[0] == 221
    threads = wait_for(lambda: (t := site.json("thread", "list")) and len(t) >= len(VARIANTS)
                       and t, what="every request stored")
    assert len(threads) == len(VARIANTS)
    assert {t["authority"] for t in threads} == {"camden"}
    titles = sorted(t["title"] for t in threads)
    assert titles == sorted(f"Variant {n}" for n in VARIANTS)
    assert not any("smuggled" in t["title"] for t in threads)
    assert "evil@attacker.example" not in str(site.json("queue", "list", "--all"))
    # One confirmation per message, all to Jane; nothing to the smuggled sender.
    mail: list = []
    wait_for(lambda: mail.extend(site.new_mail()) or len(mail) >= len(VARIANTS),
             what="confirmations")
    assert sorted(to for to, _, _ in mail + site.new_mail()) == [JANE] * len(VARIANTS)


# -- STARTTLS ----------------------------------------------------------------------------------
def _client_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # a throw-away self-signed certificate
    return ctx


def test_commands_pipelined_behind_starttls_are_discarded(site: Site,
                                                          tls_files: TlsFiles) -> None:
    """CVE-2011-0411 class: plaintext injected after STARTTLS, in the same packet, must not be
    executed inside the TLS session (a man in the middle could otherwise add commands)."""
    site.set("smtp", "tls_cert", f'"{tls_files.cert}"')
    site.set("smtp", "tls_key", f'"{tls_files.key}"')
    d = Daemon(site)
    try:
        c = RawSMTP(d.port)
        code, text = c.cmd("EHLO client.example")
        assert code == 250 and b"STARTTLS" in text and b"AUTH" not in text
        c.send(b"STARTTLS\r\n"
               + f"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<camden@{DOMAIN}>\r\n".encode()
               + b"DATA\r\nSubject: injected\r\n\r\ninjected\r\n.\r\n")
        code, _ = c.reply()
        assert code == 220
        assert c.buf == b""  # nothing else came before the handshake
        tls = _client_tls().wrap_socket(c.sock, server_hostname=f"mx.{DOMAIN}")
        c.sock = tls
        # Inside TLS the session starts afresh: no sender, no recipient, no message.
        code, text = c.cmd("EHLO client.example")
        assert code == 250 and b"STARTTLS" not in text and b"AUTH" not in text
        assert c.cmd(f"RCPT TO:<camden@{DOMAIN}>")[0] == 503  # "need MAIL": it was discarded
        assert c.cmd("DATA")[0] == 503
        assert c.cmd("NOOP") == (250, b"OK")  # no stray replies queued behind
        # And the encrypted session works.
        assert c.cmd(f"MAIL FROM:<{JANE}>")[0] == 250
        assert c.cmd(f"RCPT TO:<camden@{DOMAIN}>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(compose(f"Jane <{JANE}>", f"camden@{DOMAIN}", "Over TLS", "Hello") + b".\r\n")
        assert c.reply()[0] == 250
        assert c.cmd("QUIT")[0] == 221
        c.close()
        threads = wait_for(lambda: site.json("thread", "list"), what="the TLS message")
    finally:
        d.stop()
    assert [t["title"] for t in threads] == ["Over TLS"]
    assert "injected" not in str(site.json("queue", "list", "--all"))


def test_starttls_without_a_certificate_is_not_offered_and_answers_454(spool: Spool) -> None:
    with ingress(spool) as srv, RawSMTP(srv.port) as c:
        code, text = c.cmd("EHLO client.example")
        assert code == 250 and b"STARTTLS" not in text
        # Commands behind a refused STARTTLS are the client's own plaintext session.
        c.send(f"STARTTLS\r\nMAIL FROM:<c@example.org>\r\nRCPT TO:<{FIRST}>\r\n".encode())
        assert [c.reply()[0] for _ in range(3)] == [454, 250, 250]


def test_a_broken_tls_handshake_ends_the_connection_and_the_server_goes_on(
        spool: Spool, tls_files: TlsFiles) -> None:
    with ingress(spool, tls_cert=tls_files.cert, tls_key=tls_files.key) as srv:
        with RawSMTP(srv.port) as c:
            c.cmd("EHLO x")
            assert c.cmd("STARTTLS")[0] == 220
            c.send(b"this is not a TLS ClientHello\r\n" * 10)
            assert c.closed_by_server()
        with RawSMTP(srv.port) as c:
            assert c.cmd("EHLO x")[0] == 250


# -- pipelining --------------------------------------------------------------------------------
def test_pipelined_transactions_stay_isolated(spool: Spool) -> None:
    """Several transactions in one packet: each message gets its own sender and recipients;
    a transaction reset with RSET leaves nothing behind."""
    one = b"Subject: one\r\n\r\nfirst message\r\n"
    two = b"Subject: two\r\n\r\nsecond message\r\n"
    three = b"Subject: three\r\n\r\nthird message\r\n"
    packet = (b"EHLO pipeliner.example\r\n"
              b"MAIL FROM:<a@example.org>\r\nRCPT TO:<" + FIRST.encode() + b">\r\nDATA\r\n"
              + one + b".\r\n"
              b"RSET\r\n"
              b"MAIL FROM:<b@example.org>\r\nRCPT TO:<" + SECOND.encode() + b">\r\nDATA\r\n"
              + two + b".\r\n"
              # begun and abandoned: FIRST must not leak into the next message
              b"MAIL FROM:<c@example.org>\r\nRCPT TO:<" + FIRST.encode() + b">\r\nRSET\r\n"
              b"MAIL FROM:<d@example.org>\r\nRCPT TO:<nobody@" + FOI.encode() + b">\r\n"
              b"RCPT TO:<" + SECOND.encode() + b">\r\nDATA\r\n"
              + three + b".\r\nQUIT\r\n")
    with ingress(spool) as srv, RawSMTP(srv.port) as c:
        c.send(packet)
        replies = [r[:3] for r in c.rest() if not r.startswith(b"250-")]
    assert replies == [b"250",                                  # EHLO
                       b"250", b"250", b"354", b"250",           # one
                       b"250",                                  # RSET
                       b"250", b"250", b"354", b"250",           # two
                       b"250", b"250", b"250",                  # MAIL, RCPT, RSET
                       b"250", b"550", b"250", b"354", b"250",   # three
                       b"221"]
    items = {}
    while (item := spool.claim()) is not None:
        items[item.read()] = item.envelope
    assert set(items) == {one, two, three}
    assert (items[one].mail_from, items[one].rcpt_tos) == ("a@example.org", [FIRST])
    assert (items[two].mail_from, items[two].rcpt_tos) == ("b@example.org", [SECOND])
    assert (items[three].mail_from, items[three].rcpt_tos) == ("d@example.org", [SECOND])


def test_bare_newlines_received_never_leave_in_outgoing_mail(site: Site, daemon: Daemon) -> None:
    """mailflow is never the second server of a smuggling chain: what it sends is composed
    anew, so a bare LF or CR received (and stored) never goes out as one."""
    raw = (f"From: Jane <{JANE}>\r\nTo: camden@{DOMAIN}\r\nSubject: Bare\nnewlines\r\n"
           f"\r\nline one\n.\nMAIL FROM:<evil@attacker.example>\r\nline\rtwo\r\n").encode()
    with RawSMTP(daemon.port) as c:
        c.cmd("EHLO x")
        c.cmd(f"MAIL FROM:<{JANE}>")
        assert c.cmd(f"RCPT TO:<camden@{DOMAIN}>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(raw + b".\r\n")
        assert c.reply()[0] == 250
    (_, msg, out), = wait_for(lambda: site.mail_to(JANE), what="the confirmation")
    bare = re.compile(rb"\r(?!\n)|(?<!\r)\n")
    assert not bare.search(out), out
    # (A line of a single dot may remain: the SMTP transport dot-stuffs it on the wire.)
    assert b"MAIL FROM:<evil@attacker.example>" in msg.get_body(("plain",)).get_content().encode()


def test_server_survives_a_client_that_vanishes_mid_data(spool: Spool) -> None:
    with ingress(spool) as srv:
        with RawSMTP(srv.port) as c:
            c.cmd("EHLO x")
            c.cmd("MAIL FROM:<c@example.org>")
            c.cmd(f"RCPT TO:<{FIRST}>")
            assert c.cmd("DATA")[0] == 354
            c.send(b"Subject: cut\r\n\r\nhalf a mess")
            c.sock.shutdown(socket.SHUT_RDWR)
        with RawSMTP(srv.port) as c:
            assert c.cmd("NOOP")[0] == 250
    assert spool.pending() == []
