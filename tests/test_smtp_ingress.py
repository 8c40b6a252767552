"""SMTP/LMTP ingress over a real socket: what a sending server sees, and what lands in the spool."""
from __future__ import annotations

import asyncio
import logging
import os
import re
import smtplib
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from mailflow.errors import SpoolError
from mailflow.ingress.smtp import IngressHandler, RcptDecision, start_server
from mailflow.spool import Envelope, Spool

KNOWN = {"request-1-abc@foi.example", "request-2-def@foi.example", "reply-1-xyz@foi.example"}


def check_rcpt(mail_from: str, rcpt: str) -> RcptDecision:
    if rcpt.lower() in KNOWN:
        return RcptDecision(True, "")
    return RcptDecision(False, f"550 5.1.1 <{rcpt}>: no such authority; see https://foi.example/body/")


class Server:
    """An ingress server on its own event loop in a thread, as the daemon would run it."""

    def __init__(self, handler: IngressHandler, **kw: Any) -> None:
        self.handler = handler
        self.kw = kw
        self.port = 0
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # reported to the test thread
            self._error = e
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        kw = {"hostname": "mx.foi.example", "max_message_size": 10_000, **self.kw}
        server = await start_server(self.handler, "127.0.0.1", 0, **kw)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stop.wait()
        server.close()
        await server.wait_closed()
        await self.handler.drain()
        # Connections still open: end their sessions so nothing is left pending.
        me = asyncio.current_task()
        rest = [t for t in asyncio.all_tasks() if t is not me]
        for t in rest:
            t.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    def __enter__(self) -> Server:
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        assert not self._thread.is_alive()
        if self._error is not None:
            raise self._error


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


@contextmanager
def serve(spool: Spool, *, rcpt: Callable[[str, str], RcptDecision] = check_rcpt,
          on_spooled: Callable[[str], None] | None = None, max_recipients: int = 100,
          **kw: Any) -> Iterator[tuple[Server, list[str]]]:
    seen: list[str] = []
    handler = IngressHandler(spool, rcpt, on_spooled or seen.append,
                             max_recipients=max_recipients)
    with Server(handler, **kw) as srv:
        yield srv, seen


@contextmanager
def client(srv: Server, cls: type[smtplib.SMTP] = smtplib.SMTP) -> Iterator[smtplib.SMTP]:
    c = cls("127.0.0.1", srv.port, timeout=10)
    try:
        yield c
    finally:
        try:
            c.quit()
        except smtplib.SMTPServerDisconnected:
            c.close()


MSG = (b"From: Citizen <c@example.org>\r\n"
       b"To: request-1-abc@foi.example\r\n"
       b"Subject: =?utf-8?q?Anfrage?=\r\n"
       b"\r\n"
       b"Gr\xc3\xbc\xc3\x9fe, latin-1 \xe9\xe8, invalid utf-8 \xff\xfe\r\n"
       b".leading dot is unstuffed back\r\n"
       b"..two dots\r\n"
       b"bare\nLF and bare\rCR inside a line\r\n"
       b"trailing spaces   \r\n"
       b"\r\n")


def queued_id(resp: bytes) -> str:
    m = re.search(rb"queued as (\S+)", resp)
    assert m, resp
    return m.group(1).decode()


def send(c: smtplib.SMTP, rcpts: list[str], msg: bytes = MSG, mail_from: str = "c@example.org",
         mail_options: tuple[str, ...] = ()) -> tuple[int, bytes]:
    code, resp = c.mail(mail_from, list(mail_options))
    assert code == 250, resp
    for r in rcpts:
        code, resp = c.rcpt(r)
        assert code == 250, resp
    return c.data(msg)


def test_message_is_spooled_byte_identical_before_250(spool: Spool) -> None:
    with serve(spool) as (srv, seen), client(srv) as c:
        c.ehlo("mta.authority.example")
        assert c.has_extn("smtputf8") and c.has_extn("8bitmime")
        assert c.esmtp_features["size"] == "10000"
        code, resp = send(c, ["request-1-abc@foi.example", "Reply-1-XYZ@foi.example"],
                          mail_options=("BODY=8BITMIME",))
        assert code == 250 and resp.startswith(b"2.0.0 Ok: queued as ")
        id = queued_id(resp)
        # Checked right after the 250, while the session is still open.
        assert spool.pending() == [id]
        item = spool.claim(id)
        assert item is not None
        assert item.read() == MSG
        e = item.envelope
        assert e.mail_from == "c@example.org" and e.via == "smtp"
        assert e.rcpt_tos == ["request-1-abc@foi.example", "Reply-1-XYZ@foi.example"]
        assert e.helo == "mta.authority.example"
        assert e.peer is not None and e.peer.startswith("127.0.0.1:")
        assert e.received_at
    assert seen == [id]


def test_null_sender_and_several_messages_per_connection(spool: Spool) -> None:
    with serve(spool) as (srv, seen), client(srv) as c:
        c.ehlo("bounce.example")
        ids = [queued_id(send(c, ["request-2-def@foi.example"], mail_from="")[1])
               for _ in range(3)]
    assert sorted(ids) == spool.pending() == sorted(seen)
    item = spool.claim()
    assert item is not None and item.envelope.mail_from == ""


def test_unknown_recipient_gets_the_reply_from_check_rcpt(spool: Spool) -> None:
    with serve(spool) as (srv, _), client(srv) as c:
        c.ehlo("x")
        c.mail("c@example.org")
        code, resp = c.rcpt("nobody@foi.example")
        assert code == 550
        assert resp == (b"5.1.1 <nobody@foi.example>: no such authority; "
                        b"see https://foi.example/body/")
        # The session goes on: a known recipient is still accepted and delivered.
        assert c.rcpt("request-1-abc@foi.example")[0] == 250
        assert c.data(MSG)[0] == 250
    item = spool.claim()
    assert item is not None and item.envelope.rcpt_tos == ["request-1-abc@foi.example"]


def test_data_without_accepted_recipient_is_refused(spool: Spool) -> None:
    with serve(spool) as (srv, _), client(srv) as c:
        c.ehlo("x")
        c.mail("c@example.org")
        assert c.rcpt("nobody@foi.example")[0] == 550
        assert c.docmd("DATA")[0] == 503
    assert spool.pending() == []


def test_too_many_recipients_gets_452(spool: Spool) -> None:
    def accept_all(mail_from: str, rcpt: str) -> RcptDecision:
        return RcptDecision(True, "")

    with serve(spool, rcpt=accept_all, max_recipients=3) as (srv, _), client(srv) as c:
        c.ehlo("x")
        c.mail("c@example.org")
        codes = [c.rcpt(f"r{i}@foi.example")[0] for i in range(5)]
        assert codes == [250, 250, 250, 452, 452]
        assert c.data(MSG)[0] == 250
        # The limit is per transaction, not per connection.
        assert send(c, ["a@foi.example", "b@foi.example"])[0] == 250
    item = spool.claim()
    assert item is not None and item.envelope.rcpt_tos == [f"r{i}@foi.example" for i in range(3)]


def test_size_parameter_over_limit_gets_552(spool: Spool) -> None:
    with serve(spool, max_message_size=1000) as (srv, _), client(srv) as c:
        c.ehlo("x")
        code, _ = c.mail("c@example.org", ["SIZE=5000"])
        assert code == 552
        assert c.mail("c@example.org", ["SIZE=500"])[0] == 250  # under the limit is fine
    assert spool.pending() == []


def test_oversized_data_without_size_gets_552(spool: Spool) -> None:
    big = MSG + (b"x" * 70 + b"\r\n") * 100  # > 1000 bytes, every line short
    with serve(spool, max_message_size=1000) as (srv, _), client(srv) as c:
        c.ehlo("x")
        c.mail("c@example.org")
        assert c.rcpt("request-1-abc@foi.example")[0] == 250
        code, _ = c.data(big)
        assert code == 552
        # The connection is still in step: the next message goes through.
        assert send(c, ["request-1-abc@foi.example"])[0] == 250
    assert len(spool.pending()) == 1


class BrokenSpool(Spool):
    def put(self, raw: bytes, envelope: Envelope) -> str:
        raise SpoolError("disk on fire: /var/spool/secret/path")


def test_spool_error_gives_451_without_details(tmp_path: Path) -> None:
    with serve(BrokenSpool(tmp_path / "s")) as (srv, seen), client(srv) as c:
        c.ehlo("x")
        code, resp = send(c, ["request-1-abc@foi.example"])
        assert code == 451
        assert resp == b"4.3.0 Requested action aborted: local error, try again later"
        assert b"disk" not in resp and b"Traceback" not in resp
        assert c.noop()[0] == 250
    assert seen == []


def test_real_os_error_in_spool_gives_451(spool: Spool) -> None:
    # Root ignores read-only modes, so break the spool by putting a file where tmp/ was.
    os.rmdir(spool.root / "tmp")
    (spool.root / "tmp").write_bytes(b"")
    with serve(spool) as (srv, seen), client(srv) as c:
        c.ehlo("x")
        code, _ = send(c, ["request-1-abc@foi.example"])
        assert code == 451
    assert seen == [] and spool.pending() == []


def test_check_rcpt_raising_gives_451(spool: Spool) -> None:
    def broken(mail_from: str, rcpt: str) -> RcptDecision:
        raise RuntimeError("database is locked")

    with serve(spool, rcpt=broken) as (srv, _), client(srv) as c:
        c.ehlo("x")
        c.mail("c@example.org")
        code, resp = c.rcpt("request-1-abc@foi.example")
        assert code == 451 and b"locked" not in resp


def test_malformed_refusal_is_temporary(spool: Spool) -> None:
    def sloppy(mail_from: str, rcpt: str) -> RcptDecision:
        return RcptDecision(False, "no such user\r\n250 injected")

    with serve(spool, rcpt=sloppy) as (srv, _), client(srv) as c:
        c.ehlo("x")
        c.mail("c@example.org")
        assert c.rcpt("request-1-abc@foi.example")[0] == 451
        assert c.noop()[0] == 250


def test_async_check_rcpt_and_on_spooled_are_awaited(spool: Spool) -> None:
    nudged: list[str] = []

    async def rcpt(mail_from: str, rcpt: str) -> RcptDecision:
        await asyncio.sleep(0)
        return check_rcpt(mail_from, rcpt)

    async def nudge(id: str) -> None:
        await asyncio.sleep(0)
        nudged.append(id)

    with serve(spool, rcpt=rcpt, on_spooled=nudge) as (srv, _), client(srv) as c:  # type: ignore[arg-type]
        c.ehlo("x")
        c.mail("c@example.org")
        assert c.rcpt("nobody@foi.example")[0] == 550
        assert c.rcpt("request-1-abc@foi.example")[0] == 250
        id = queued_id(c.data(MSG)[1])
    assert nudged == [id]


def test_on_spooled_raising_still_gives_250(spool: Spool) -> None:
    def boom(id: str) -> None:
        raise RuntimeError("queue full")

    with serve(spool, on_spooled=boom) as (srv, _), client(srv) as c:
        c.ehlo("x")
        code, resp = send(c, ["request-1-abc@foi.example"])
        assert code == 250
    assert spool.pending() == [queued_id(resp)]


class SlowSpool(Spool):
    """A put() that waits for the test, to hang up while the fsync is under way."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.entered = threading.Event()
        self.release = threading.Event()

    def put(self, raw: bytes, envelope: Envelope) -> str:
        self.entered.set()
        assert self.release.wait(10)
        return super().put(raw, envelope)


class _Seen(logging.Handler):
    def __init__(self, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text, self.event = text, threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


def test_client_hanging_up_during_spooling_still_announces(tmp_path: Path) -> None:
    spool = SlowSpool(tmp_path / "s")
    nudged = threading.Event()
    aiosmtpd_log = logging.getLogger("mail.log")
    eof = _Seen("EOF received")
    level = aiosmtpd_log.level
    aiosmtpd_log.setLevel(logging.INFO)
    aiosmtpd_log.addHandler(eof)
    try:
        with serve(spool, on_spooled=lambda id: nudged.set()) as (srv, _):
            c = smtplib.SMTP("127.0.0.1", srv.port, timeout=10)
            try:
                c.ehlo("x")
                c.mail("c@example.org")
                c.rcpt("request-1-abc@foi.example")
                assert c.docmd("DATA")[0] == 354
                c.send(MSG + b".\r\n")
                assert spool.entered.wait(10)
            finally:
                c.close()  # no QUIT, no waiting for the reply
            # aiosmtpd cancels the session's coroutine when it sees the EOF (right after
            # logging it); only then let the fsync finish.
            assert eof.event.wait(10)
            spool.release.set()
            assert nudged.wait(10)
    finally:
        aiosmtpd_log.removeHandler(eof)
        aiosmtpd_log.setLevel(level)
    assert len(spool.pending()) == 1


def test_line_over_64k_is_refused_but_1200_bytes_is_kept(spool: Spool) -> None:
    """Lines over RFC 5321's 1,000 bytes are kept (tests/adversarial/test_smtp_limits.py has
    more); only a line over 64 KiB gets 500 Line too long."""
    with serve(spool, max_message_size=200_000) as (srv, _), client(srv) as c:
        c.ehlo("x")
        code, _ = send(c, ["request-1-abc@foi.example"], msg=b"Subject: x\r\n\r\n" + b"y" * 1200 + b"\r\n")
        assert code == 250
        code, _ = send(c, ["request-1-abc@foi.example"],
                       msg=b"Subject: x\r\n\r\n" + b"y" * (65 * 1024) + b"\r\n")
        assert code == 500
    assert len(spool.pending()) == 1


def test_lmtp_answers_per_recipient(spool: Spool) -> None:
    with serve(spool, lmtp=True) as (srv, seen), client(srv, smtplib.LMTP) as c:
        code, _ = c.ehlo("postfix.local")  # smtplib.LMTP sends LHLO
        assert code == 250
        assert c.docmd("HELO", "x")[0] == 500  # HELO is not LMTP
        c.mail("c@example.org")
        assert c.rcpt("request-1-abc@foi.example")[0] == 250
        assert c.rcpt("nobody@foi.example")[0] == 550
        assert c.rcpt("request-2-def@foi.example")[0] == 250
        # One reply per accepted recipient (2), none for the refused one. smtplib reads the
        # first itself; the second must be waiting.
        code1, resp1 = c.data(MSG)
        code2, resp2 = c.getreply()
        assert (code1, code2) == (250, 250)
        assert queued_id(resp1) == queued_id(resp2)
        assert c.noop()[0] == 250  # nothing else was left in the stream
    item = spool.claim()
    assert item is not None and item.read() == MSG
    assert item.envelope.via == "lmtp" and item.envelope.helo == "postfix.local"
    assert item.envelope.rcpt_tos == ["request-1-abc@foi.example", "request-2-def@foi.example"]
    assert seen == [item.id]


def test_lmtp_spool_failure_is_451_for_every_recipient(tmp_path: Path) -> None:
    with serve(BrokenSpool(tmp_path / "s"), lmtp=True) as (srv, _), \
            client(srv, smtplib.LMTP) as c:
        c.ehlo("postfix.local")
        c.mail("c@example.org")
        c.rcpt("request-1-abc@foi.example")
        c.rcpt("request-2-def@foi.example")
        assert c.data(MSG)[0] == 451
        assert c.getreply()[0] == 451
        assert c.noop()[0] == 250


def test_banner_does_not_name_the_library(spool: Spool) -> None:
    with serve(spool) as (srv, _):
        c = smtplib.SMTP(timeout=10)
        try:
            code, banner = c.connect("127.0.0.1", srv.port)
            assert code == 220 and banner.startswith(b"mx.foi.example")
            assert b"Python" not in banner
        finally:
            c.quit()


def test_start_server_requires_hostname(spool: Spool) -> None:
    handler = IngressHandler(spool, check_rcpt, lambda id: None)
    with pytest.raises(ValueError):
        asyncio.run(start_server(handler, "127.0.0.1", 0, hostname="", max_message_size=1))
