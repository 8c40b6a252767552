"""SMTP limits: long lines, many recipients, poisoned envelope addresses, idle and slow
clients, and the connection caps, each checked over a real socket."""
from __future__ import annotations

import base64
import os
import smtplib
import time

import pytest

from conftest import DOMAIN, JANE, Daemon, Site, compose, wait_for
from mailflow.ingress.smtp import RcptDecision
from mailflow.spool import Spool
from test_roundtrip import AUTHORITY, ask

from .conftest import FOI, RawSMTP, ingress, queued_id, raise_fd_limit

FIRST = f"request-1-abc@{FOI}"


def _send_raw(c: RawSMTP, body: bytes, rcpt: str = FIRST) -> tuple[int, bytes]:
    """One transaction with the body sent exactly as given (already dot-stuffed)."""
    assert c.cmd("MAIL FROM:<c@example.org>")[0] == 250
    assert c.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(body + b".\r\n")
    return c.reply()


# -- long lines --------------------------------------------------------------------------------
def test_lines_longer_than_1000_bytes_are_accepted_and_stored_byte_for_byte(spool: Spool) -> None:
    """RFC 5321 lets a server refuse lines over 1,000 bytes; a badly formatted authority reply
    must not bounce for it, so lines up to 64 KiB are kept exactly as sent."""
    header = b"References: " + b" ".join(b"<%d@mail.example>" % i for i in range(1500)) + b"\r\n"
    assert len(header) > 20_000
    body_line = b"w" * 5_000 + b"\r\n"
    widest = b"x" * (64 * 1024) + b"\r\n"
    dotted = b"." + b"y" * (64 * 1024 - 1) + b"\r\n"  # sent stuffed as ".." + ..., 64 KiB + 1
    unwrapped_base64 = base64.b64encode(os.urandom(30_000)) + b"\r\n"
    message = (b"Subject: long lines\r\n" + header + b"\r\n" + body_line + widest + dotted
               + unwrapped_base64)
    wire = message.replace(b"\r\n.", b"\r\n..")
    with ingress(spool) as srv, RawSMTP(srv.port) as c:
        c.cmd("EHLO x")
        code, text = _send_raw(c, wire)
        assert code == 250, text
    item = spool.claim(queued_id(text))
    assert item is not None and item.read() == message


def test_a_line_over_64k_gets_500_and_the_session_stays_in_step(spool: Spool) -> None:
    with ingress(spool) as srv, RawSMTP(srv.port) as c:
        c.cmd("EHLO x")
        code, text = _send_raw(c, b"Subject: x\r\n\r\n" + b"z" * (64 * 1024 + 10) + b"\r\nend\r\n")
        assert code == 500 and b"too long" in text.lower()
        # A line without any CRLF for 1 MB is drained, not buffered, and answered the same way.
        code, _ = _send_raw(c, b"Subject: x\r\n\r\n" + b"z" * 1_000_000 + b"\r\n")
        assert code == 500
        assert c.cmd("NOOP")[0] == 250
        assert _send_raw(c, b"Subject: fine\r\n\r\nfine\r\n")[0] == 250
    assert len(spool.pending()) == 1


@pytest.mark.parametrize("line", [
    b"NOOP " + b"n" * 600,
    b"RCPT TO:<" + b"r" * 600 + b"@" + FOI.encode() + b">",
    b"MAIL FROM:<" + b"m" * 3000 + b"@example.org>",
    b"EHLO " + b"h" * 200_000,  # longer than any buffer: drained and refused
], ids=["noop-600", "rcpt-600", "mail-3000", "ehlo-200k"])
def test_command_lines_over_512_bytes_get_500(spool: Spool, line: bytes) -> None:
    with ingress(spool) as srv, RawSMTP(srv.port) as c:
        c.cmd("EHLO x")
        c.cmd("MAIL FROM:<c@example.org>")
        code, text = c.cmd(line)
        assert code == 500 and b"too long" in text.lower()
        assert c.cmd("NOOP")[0] == 250  # still in step
        assert c.cmd(f"RCPT TO:<{FIRST}>")[0] == 250


def test_repeating_ehlo_does_not_stretch_the_command_limit(spool: Spool) -> None:
    """aiosmtpd adds room to MAIL's limit at every EHLO (for SIZE= and SMTPUTF8); it must not
    add up across hundreds of EHLOs."""
    with ingress(spool) as srv, RawSMTP(srv.port) as c:
        for _ in range(300):
            c.cmd("EHLO x")
        assert c.cmd("MAIL FROM:<" + "m" * 700 + "@example.org>")[0] == 500
        # What the extensions need still fits.
        assert c.cmd("MAIL FROM:<" + "m" * 450 + "@example.org> SIZE=1000 SMTPUTF8")[0] == 250


def test_an_authority_reply_with_an_unwrapped_base64_line_reaches_the_citizen(
        site: Site, daemon: Daemon) -> None:
    """The case that made long lines matter: a reply whose attachment is one 40 KB line."""
    req = ask(site)
    pdf = b"%PDF-1.4\n" + os.urandom(30_000)
    answer = (f"From: FOI Team <{AUTHORITY}>\r\nTo: {req['address']}\r\n"
              f"Subject: RE: {req['msg']['Subject']}\r\nMIME-Version: 1.0\r\n"
              f"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
              f"Content-Type: text/plain\r\n\r\nThe figures are attached.\r\n--b\r\n"
              f"Content-Type: application/pdf; name=figures.pdf\r\n"
              f"Content-Disposition: attachment; filename=figures.pdf\r\n"
              f"Content-Transfer-Encoding: base64\r\n\r\n").encode()
    answer += base64.b64encode(pdf) + b"\r\n--b--\r\n"
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as s:
        s.sendmail(AUTHORITY, [req["address"]], answer)
    (_, fwd, _), = wait_for(lambda: site.mail_to(JANE), what="the forward")
    (att,) = list(fwd.iter_attachments())
    assert att.get_content() == pdf


# -- recipients ----------------------------------------------------------------------------------
def test_too_many_recipients_get_452_and_the_first_ones_are_delivered(site: Site) -> None:
    site.set("smtp", "max_recipients", "3")
    d = Daemon(site)
    try:
        slugs = ["camden", "home-office", "edinburgh"]
        rcpts = [f"{s}@{DOMAIN}" for s in slugs] + [f"postmaster@{DOMAIN}", f"abuse@{DOMAIN}"]
        with RawSMTP(d.port) as c:
            c.cmd("EHLO citizen.example")
            assert c.cmd(f"MAIL FROM:<{JANE}>")[0] == 250
            replies = [c.cmd(f"RCPT TO:<{r}>") for r in rcpts]
            assert [r[0] for r in replies] == [250, 250, 250, 452, 452]
            assert replies[3][1].startswith(b"4.5.3")
            assert c.cmd("DATA")[0] == 354
            c.send(compose(f"Jane <{JANE}>", ", ".join(rcpts[:3]), "Salt stocks", "How much?")
                   + b".\r\n")
            assert c.reply()[0] == 250
            # The client sends the rest in a new transaction, as RFC 5321 4.5.3.1.10 expects.
            assert c.cmd(f"MAIL FROM:<{JANE}>")[0] == 250
            assert [c.cmd(f"RCPT TO:<{r}>")[0] for r in rcpts[3:]] == [250, 250]
            assert c.cmd("RSET")[0] == 250
        threads = wait_for(lambda: (t := site.json("thread", "list")) and len(t) == 3 and t,
                           what="three requests")
    finally:
        d.stop()
    assert sorted(t["authority"] for t in threads) == sorted(slugs)


# -- poisoned envelope addresses -----------------------------------------------------------------
POISON = {
    "CR": "a\rb@example.org",
    "NUL": "a\x00b@example.org",
    "TAB": "a\tb@example.org",
    "ESC": "a\x1bb@example.org",
    "DEL": "a\x7fb@example.org",
    "NEL": "a\x85b@example.org",
    "U+2028": "a\u2028b@example.org",
    "U+2029": "a\u2029b@example.org",
    "not-utf8": "a\udcffb@example.org",  # the raw byte 0xFF
    "CR-in-domain": "a@exam\rple.org",
}


@pytest.mark.parametrize("bad", list(POISON.values()), ids=list(POISON))
def test_envelope_addresses_with_control_characters_get_501(spool: Spool, bad: str) -> None:
    accepted: list[str] = []

    def accept_all(mail_from: str, rcpt: str) -> RcptDecision:
        accepted.append(rcpt)
        return RcptDecision(True, "")

    with ingress(spool, rcpt=accept_all) as srv, RawSMTP(srv.port) as c:
        c.cmd("EHLO x")
        code, text = c.cmd(f"MAIL FROM:<{bad}>")
        assert (code, text[:5]) == (501, b"5.1.7")
        assert c.cmd("MAIL FROM:<c@example.org>")[0] == 250
        code, text = c.cmd(f"RCPT TO:<{bad}>")
        assert (code, text[:5]) == (501, b"5.1.3")
        # Not even passed to the recipient check.
        assert accepted == []
        assert c.cmd("DATA")[0] == 503
    assert spool.pending() == []


def test_a_line_feed_ends_the_command_so_it_cannot_sit_inside_an_address(spool: Spool) -> None:
    with ingress(spool) as srv, RawSMTP(srv.port) as c:
        c.cmd("EHLO x")
        c.cmd("MAIL FROM:<c@example.org>")
        c.send(f"RCPT TO:<{FIRST}\nBcc: x@evil.example>\r\n".encode())
        first, second = c.reply(), c.reply()
        assert second[0] == 500  # "Bcc:" is no command
        if first[0] == 250:  # the part before the LF was a whole, valid command
            assert c.cmd("DATA")[0] == 354
            c.send(b"Subject: x\r\n\r\nx\r\n.\r\n")
            assert c.reply()[0] == 250
    for id in spool.pending():
        item = spool.claim(id)
        assert item is not None and item.envelope.rcpt_tos == [FIRST]


def test_poisoned_addresses_never_reach_the_store(site: Site, daemon: Daemon) -> None:
    with RawSMTP(daemon.port) as c:
        c.cmd("EHLO x")
        for bad in POISON.values():
            assert c.cmd(f"MAIL FROM:<{bad.replace('@', 'POISON@')}>")[0] == 501
        assert c.cmd(f"MAIL FROM:<{JANE}>")[0] == 250
        for bad in POISON.values():
            assert c.cmd(f"RCPT TO:<{bad.replace('@example.org', 'POISON@' + DOMAIN)}>")[0] == 501
        assert c.cmd(f"RCPT TO:<camden@{DOMAIN}>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(compose(f"Jane <{JANE}>", f"camden@{DOMAIN}", "Clean", "Hello") + b".\r\n")
        assert c.reply()[0] == 250
    wait_for(lambda: site.mail_to(JANE), what="the confirmation")
    for f in (site.dir / "var").rglob("*"):
        if f.is_file():
            assert b"POISON" not in f.read_bytes(), f


# -- idle and slow clients ---------------------------------------------------------------------
def _assert_421_then_closed(c: RawSMTP) -> None:
    code, text = c.reply()
    assert code == 421 and text.startswith(b"4.4.2"), text
    assert c.closed_by_server()


def test_an_idle_client_is_told_421_and_disconnected(spool: Spool) -> None:
    with ingress(spool, timeout=1) as srv:
        with RawSMTP(srv.port) as c:  # silent after the greeting
            _assert_421_then_closed(c)
        with RawSMTP(srv.port) as c:  # half a command, then nothing (slowloris)
            c.cmd("EHLO x")
            c.send(b"MAIL FROM:<c@exa")
            _assert_421_then_closed(c)
        with RawSMTP(srv.port) as c:  # stalls in the middle of DATA
            c.cmd("EHLO x")
            c.cmd("MAIL FROM:<c@example.org>")
            c.cmd(f"RCPT TO:<{FIRST}>")
            assert c.cmd("DATA")[0] == 354
            c.send(b"Subject: stalled\r\n\r\nhalf")
            _assert_421_then_closed(c)
    assert spool.pending() == []


def test_a_slow_but_steady_upload_is_not_cut_off(spool: Spool) -> None:
    """In DATA the timeout counts silence, not the whole transfer: a big message on a slow line
    keeps going as long as bytes keep coming (here for longer than the timeout in all)."""
    timeout = 3
    with ingress(spool, timeout=timeout) as srv, RawSMTP(srv.port) as c:
        c.cmd("EHLO x")
        c.cmd("MAIL FROM:<c@example.org>")
        c.cmd(f"RCPT TO:<{FIRST}>")
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: slow\r\n\r\n")
        end = time.monotonic() + 2 * timeout
        n = 0
        while time.monotonic() < end:
            c.send(b"line %d\r\n" % n)
            n += 1
            time.sleep(0.25)
        c.send(b".\r\n")
        assert c.reply()[0] == 250
    assert len(spool.pending()) == 1


def test_the_daemon_applies_the_configured_idle_timeout(site: Site) -> None:
    site.set("smtp", "idle_timeout", "1")
    d = Daemon(site)
    try:
        with RawSMTP(d.port) as c:
            c.cmd("EHLO x")
            _assert_421_then_closed(c)
    finally:
        d.stop()


# -- connection caps ---------------------------------------------------------------------------
def _refused(c: RawSMTP) -> bool:
    assert c.banner is not None
    return c.banner[0] == 421 and c.banner[1].startswith(b"4.7.0") and c.closed_by_server()


def _admitted(port: int, source: str) -> RawSMTP:
    """A connection that got in, retried while the server is still counting one that has
    just been closed (its close is seen a moment later)."""
    def attempt() -> RawSMTP | None:
        c = RawSMTP(port, source=source)
        if c.banner is not None and c.banner[0] == 220:
            return c
        c.close()
        return None
    return wait_for(attempt, what=f"a connection from {source}")


def test_connections_over_the_cap_are_told_421(site: Site) -> None:
    site.set("smtp", "max_connections", "5")
    site.set("smtp", "max_connections_per_ip", "0")
    d = Daemon(site)
    try:
        # (The start-up probe of the Daemon fixture may still be counted for a moment.)
        held = [_admitted(d.port, f"127.0.0.{i + 2}") for i in range(5)]
        sixth = RawSMTP(d.port, source="127.0.0.9")
        assert _refused(sixth)
        sixth.close()
        assert held[0].cmd("NOOP")[0] == 250  # those inside are unaffected
        held.pop(0).close()
        again = _admitted(d.port, "127.0.0.9")  # a place is free again
        assert again.cmd("EHLO x")[0] == 250
        for c in [*held, again]:
            c.close()
    finally:
        d.stop()


def test_connections_over_the_per_address_cap_are_told_421(site: Site) -> None:
    site.set("smtp", "max_connections_per_ip", "3")
    d = Daemon(site)
    try:
        held = [RawSMTP(d.port, source="127.0.0.3") for _ in range(3)]
        assert all(c.banner is not None and c.banner[0] == 220 for c in held)
        fourth = RawSMTP(d.port, source="127.0.0.3")
        assert _refused(fourth)
        fourth.close()
        other = RawSMTP(d.port, source="127.0.0.4")  # another address is still served
        assert other.banner[0] == 220 and other.cmd("EHLO x")[0] == 250
        for c in [*held, other]:
            c.close()
    finally:
        d.stop()


def test_a_real_client_is_served_while_500_idle_connections_are_open(site: Site) -> None:
    """500 silent connections (from 10 addresses, under the per-address cap) do not stop a
    legitimate sender. No timing is asserted: the message must simply go through."""
    raise_fd_limit(4096)
    d = Daemon(site)
    idle: list[RawSMTP] = []
    try:
        for i in range(500):
            idle.append(RawSMTP(d.port, source=f"127.0.0.{2 + i // 50}", timeout=60))
        assert all(c.banner[0] == 220 for c in idle)  # each one a session, none refused
        with smtplib.SMTP("127.0.0.1", d.port, timeout=60) as s:
            s.sendmail(JANE, [f"camden@{DOMAIN}"],
                       compose(f"Jane <{JANE}>", f"camden@{DOMAIN}", "Winter gritting", "Which?"))
        wait_for(lambda: site.mail_to(JANE), timeout=60, what="the confirmation")
        assert idle[0].cmd("NOOP")[0] == 250 and idle[-1].cmd("NOOP")[0] == 250
    finally:
        for c in idle:
            c.close()
        d.stop()
