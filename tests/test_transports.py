"""Transports against real things: a Maildir on disk and aiosmtpd servers on 127.0.0.1."""
from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import socket
import ssl
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session, SMTP
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mailflow.config import OutboundSettings, SmarthostSettings
from mailflow.errors import (DeliveryError, PermanentDeliveryError, TemporaryDeliveryError)
from mailflow.outbound.transports import (MaildirTransport, SmtpTransport, Transport,
                                          make_transport)

RAW = (
    b"DKIM-Signature: v=1; a=rsa-sha256; d=ask.example; s=mailflow;\r\n"
    b" b=AAAA\r\n"
    b"From: FOI <request-7-k3y@ask.example>\r\n"
    b"To: foi@council.example\r\n"
    b"Subject: =?utf-8?q?Stra=C3=9Fen?=\r\n"
    b"Message-ID: <req-7.1@ask.example>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Gr\xc3\xbc\xc3\x9fe,  trailing spaces stay  \r\n"
    b".a line starting with a dot\r\n"
    b"\r\n"
)
SENDER = "bounces@ask.example"
RCPT = "foi@council.example"


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# --- Maildir --------------------------------------------------------------------------------

def test_maildir_layout_and_content(tmp_path: Path) -> None:
    t = MaildirTransport(tmp_path / "out")
    for sub in ("tmp", "new", "cur"):
        assert (tmp_path / "out" / sub).is_dir()
    name = run(t.deliver(SENDER, RCPT, RAW, delivery_id="42-1"))
    assert name == "42-1.mailflow"
    data = (tmp_path / "out" / "new" / name).read_bytes()
    assert data == (b"Return-Path: <bounces@ask.example>\r\nDelivered-To: foi@council.example\r\n"
                    + RAW)
    assert os.listdir(tmp_path / "out" / "tmp") == []


def test_maildir_null_sender(tmp_path: Path) -> None:
    t = MaildirTransport(tmp_path)
    name = run(t.deliver("", RCPT, RAW, delivery_id="bounce-1"))
    assert (tmp_path / "new" / name).read_bytes().startswith(b"Return-Path: <>\r\n")


def test_maildir_redelivery_is_idempotent(tmp_path: Path) -> None:
    t = MaildirTransport(tmp_path)
    first = run(t.deliver(SENDER, RCPT, RAW, delivery_id="42-1"))
    again = run(t.deliver(SENDER, RCPT, RAW, delivery_id="42-1"))
    assert first == again
    assert os.listdir(tmp_path / "new") == [first]
    # a different delivery of the same message is a different file
    other = run(t.deliver(SENDER, "other@council.example", RAW, delivery_id="42-2"))
    assert sorted(os.listdir(tmp_path / "new")) == sorted([first, other])


def test_maildir_redelivery_after_a_reader_moved_it_to_cur(tmp_path: Path) -> None:
    t = MaildirTransport(tmp_path)
    name = run(t.deliver(SENDER, RCPT, RAW, delivery_id="9"))
    os.rename(tmp_path / "new" / name, tmp_path / "cur" / f"{name}:2,S")
    assert run(t.deliver(SENDER, RCPT, RAW, delivery_id="9")) == f"{name}:2,S"
    assert os.listdir(tmp_path / "new") == []
    # and one a reader moved without flags
    name2 = run(t.deliver(SENDER, RCPT, RAW, delivery_id="10"))
    os.rename(tmp_path / "new" / name2, tmp_path / "cur" / name2)
    assert run(t.deliver(SENDER, RCPT, RAW, delivery_id="10")) == name2
    assert os.listdir(tmp_path / "new") == []


def test_maildir_unsafe_ids_get_a_stable_safe_name(tmp_path: Path) -> None:
    t = MaildirTransport(tmp_path)
    a = run(t.deliver(SENDER, RCPT, RAW, delivery_id="../../etc/passwd:2,S"))
    b = run(t.deliver(SENDER, RCPT, RAW, delivery_id="../../etc/passwd:2,S"))
    assert a == b and "/" not in a and ":" not in a
    assert os.listdir(tmp_path / "new") == [a]
    assert MaildirTransport.file_name("x/y") != MaildirTransport.file_name("x:y")


def test_maildir_refuses_header_injection_in_envelope(tmp_path: Path) -> None:
    t = MaildirTransport(tmp_path)
    with pytest.raises(PermanentDeliveryError):
        run(t.deliver(SENDER, "a@b.example\r\nBcc: c@d.example", RAW, delivery_id="1"))
    with pytest.raises(PermanentDeliveryError):
        run(t.deliver("x>\r\nX: y", RCPT, RAW, delivery_id="1"))
    assert os.listdir(tmp_path / "new") == []


def test_maildir_write_failure_is_temporary(tmp_path: Path) -> None:
    t = MaildirTransport(tmp_path)
    (tmp_path / "new").rmdir()
    (tmp_path / "new").write_bytes(b"")  # a file where the folder should be: fails even as root
    with pytest.raises(TemporaryDeliveryError):
        run(t.deliver(SENDER, RCPT, RAW, delivery_id="1"))
    assert os.listdir(tmp_path / "tmp") == []  # no half-written leftovers


# --- SMTP servers ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Recorder:
    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.envelopes.append(envelope)
        return "250 2.0.0 Ok: queued as ABC123"


class RefuseRcpt(Recorder):
    def __init__(self, reply: str) -> None:
        super().__init__()
        self.reply = reply

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        return self.reply


class RefuseData(RefuseRcpt):
    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return self.reply


class Server:
    def __init__(self, handler: Any, **kwargs: Any) -> None:
        self.handler = handler
        self.port = free_port()
        self.controller = Controller(handler, hostname="127.0.0.1", port=self.port,
                                     server_hostname="smarthost.test", enable_SMTPUTF8=True,
                                     **kwargs)

    def __enter__(self) -> Server:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()

    def settings(self, **kw: Any) -> SmarthostSettings:
        base = SmarthostSettings(host="127.0.0.1", port=self.port, tls="none", user=None,
                                 password=None, timeout=5.0)
        return replace(base, **kw)


def transport(settings: SmarthostSettings, **kw: Any) -> SmtpTransport:
    return SmtpTransport(settings, local_hostname="mailflow.test", **kw)


@pytest.fixture(scope="module")
def recorder() -> Iterator[Server]:
    with Server(Recorder()) as server:
        yield server


def test_smtp_delivers_bytes_unchanged(recorder: Server) -> None:
    before = len(recorder.handler.envelopes)
    note = run(transport(recorder.settings()).deliver(SENDER, RCPT, RAW, delivery_id="1"))
    assert note.startswith("250") and "ABC123" in note
    env = recorder.handler.envelopes[before]
    assert env.mail_from == SENDER
    assert env.rcpt_tos == [RCPT]
    assert env.original_content == RAW
    assert "BODY=8BITMIME" in env.mail_options  # the body has 8-bit bytes


def test_smtp_null_sender(recorder: Server) -> None:
    before = len(recorder.handler.envelopes)
    run(transport(recorder.settings()).deliver("", RCPT, RAW, delivery_id="2"))
    assert recorder.handler.envelopes[before].mail_from == "<>"


def test_smtp_ascii_message_has_no_8bitmime(recorder: Server) -> None:
    before = len(recorder.handler.envelopes)
    ascii_raw = RAW.replace(b"Gr\xc3\xbc\xc3\x9fe", b"Regards")
    run(transport(recorder.settings()).deliver(SENDER, RCPT, ascii_raw, delivery_id="3"))
    env = recorder.handler.envelopes[before]
    assert env.original_content == ascii_raw
    assert "BODY=8BITMIME" not in env.mail_options and "SMTPUTF8" not in env.mail_options


def test_smtp_utf8_addresses_use_smtputf8(recorder: Server) -> None:
    before = len(recorder.handler.envelopes)
    run(transport(recorder.settings()).deliver(SENDER, "bürgermeister@council.example", RAW,
                                               delivery_id="4"))
    env = recorder.handler.envelopes[before]
    assert env.rcpt_tos == ["bürgermeister@council.example"]
    assert "SMTPUTF8" in env.mail_options


@pytest.mark.parametrize("reply, error", [
    ("451 4.3.0 Try again later", TemporaryDeliveryError),
    ("550 5.1.1 No such user here", PermanentDeliveryError),
])
def test_smtp_recipient_refused(reply: str, error: type[DeliveryError]) -> None:
    with Server(RefuseRcpt(reply)) as server:
        with pytest.raises(error) as info:
            run(transport(server.settings()).deliver(SENDER, RCPT, RAW, delivery_id="5"))
    assert reply.split()[0] in str(info.value)
    assert reply.split(maxsplit=2)[2] in str(info.value)
    assert RCPT in str(info.value)
    assert server.handler.envelopes == []


@pytest.mark.parametrize("reply, error", [
    ("452 4.3.1 Insufficient system storage", TemporaryDeliveryError),
    ("554 5.7.1 Message rejected as spam", PermanentDeliveryError),
])
def test_smtp_data_refused(reply: str, error: type[DeliveryError]) -> None:
    with Server(RefuseData(reply)) as server:
        with pytest.raises(error, match=reply.split()[0]):
            run(transport(server.settings()).deliver(SENDER, RCPT, RAW, delivery_id="6"))


def test_smtp_message_too_big_is_permanent() -> None:
    with Server(Recorder(), data_size_limit=100) as server:
        with pytest.raises(PermanentDeliveryError, match="552"):
            run(transport(server.settings()).deliver(SENDER, RCPT, RAW, delivery_id="7"))


def test_smtp_connection_refused_is_temporary() -> None:
    settings = SmarthostSettings(host="127.0.0.1", port=free_port(), tls="none", user=None,
                                 password=None, timeout=5.0)
    with pytest.raises(TemporaryDeliveryError, match="cannot reach"):
        run(transport(settings).deliver(SENDER, RCPT, RAW, delivery_id="8"))


def test_smtp_silent_server_times_out_as_temporary() -> None:
    """A server that accepts the connection and never greets."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        settings = SmarthostSettings(host="127.0.0.1", port=listener.getsockname()[1],
                                     tls="none", user=None, password=None, timeout=0.3)
        with pytest.raises(TemporaryDeliveryError):
            run(transport(settings).deliver(SENDER, RCPT, RAW, delivery_id="9"))


def test_smtp_refuses_injection_before_connecting() -> None:
    settings = SmarthostSettings(host="127.0.0.1", port=free_port(), tls="none", user=None,
                                 password=None, timeout=5.0)
    with pytest.raises(PermanentDeliveryError):
        run(transport(settings).deliver(SENDER, "a@b.example\r\nRCPT TO:<c@d.example>", RAW,
                                        delivery_id="10"))


# --- AUTH -----------------------------------------------------------------------------------

def authenticator(server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                  auth_data: Any) -> AuthResult:
    ok = (isinstance(auth_data, LoginPassword)
          and auth_data.login == b"mailflow" and auth_data.password == b"s3cret")
    return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd answers 535


def test_smtp_login() -> None:
    with Server(Recorder(), authenticator=authenticator, auth_require_tls=False,
                auth_required=False) as server:
        good = server.settings(user="mailflow", password="s3cret")
        run(transport(good).deliver(SENDER, RCPT, RAW, delivery_id="11"))
        assert len(server.handler.envelopes) == 1
        # a wrong password is the admin's to fix, not a reason to fail the letter for good
        bad = server.settings(user="mailflow", password="wrong")
        with pytest.raises(TemporaryDeliveryError, match="login"):
            run(transport(bad).deliver(SENDER, RCPT, RAW, delivery_id="12"))
    assert len(server.handler.envelopes) == 1


class AuthRequired(RefuseRcpt):
    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        return self.reply


def test_smtp_authentication_required_is_temporary() -> None:
    """530 at MAIL FROM: we forgot to log in. Every letter would fail alike; retry instead."""
    with Server(AuthRequired("530 5.7.0 Authentication required")) as server:
        with pytest.raises(TemporaryDeliveryError, match="530"):
            run(transport(server.settings()).deliver(SENDER, RCPT, RAW, delivery_id="12b"))


def test_smtp_sender_refused_is_permanent() -> None:
    with Server(AuthRequired("553 5.1.8 Sender address rejected")) as server:
        with pytest.raises(PermanentDeliveryError, match="553"):
            run(transport(server.settings()).deliver(SENDER, RCPT, RAW, delivery_id="12c"))


# --- STARTTLS -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    d = tmp_path_factory.mktemp("tls")
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return d / "cert.pem", d / "key.pem"


def test_smtp_starttls(tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    with Server(Recorder(), tls_context=ctx, require_starttls=True) as server:
        settings = server.settings(tls="starttls")
        run(transport(settings, validate_certs=False).deliver(SENDER, RCPT, RAW,
                                                              delivery_id="13"))
        assert server.handler.envelopes[0].original_content == RAW
        # a self-signed certificate is refused when certificates are validated
        with pytest.raises(TemporaryDeliveryError):
            run(transport(settings).deliver(SENDER, RCPT, RAW, delivery_id="14"))
        # tls = "none" against a server that insists on STARTTLS: its 530 at MAIL FROM is a
        # configuration problem, so temporary: the letter waits until the admin fixes it
        with pytest.raises(TemporaryDeliveryError, match="530"):
            run(transport(server.settings()).deliver(SENDER, RCPT, RAW, delivery_id="15"))
    assert len(server.handler.envelopes) == 1


def test_smtp_starttls_required_but_not_offered(recorder: Server) -> None:
    """Never fall back to plaintext when the admin asked for STARTTLS."""
    before = len(recorder.handler.envelopes)
    with pytest.raises(TemporaryDeliveryError):
        run(transport(recorder.settings(tls="starttls")).deliver(SENDER, RCPT, RAW,
                                                                 delivery_id="16"))
    assert len(recorder.handler.envelopes) == before


# --- factory --------------------------------------------------------------------------------

def test_make_transport(tmp_path: Path) -> None:
    smtp = SmarthostSettings(host="smarthost.example", port=587, tls="starttls",
                             user=None, password=None, timeout=30.0)
    out = OutboundSettings(transport="maildir", maildir=tmp_path / "outbox",
                           bounce_address="bounces@ask.example", retry_schedule=(60,),
                           smtp=smtp)
    t: Transport = make_transport(out)
    assert isinstance(t, MaildirTransport) and (tmp_path / "outbox" / "new").is_dir()
    t = make_transport(replace(out, transport="smtp"))
    assert isinstance(t, SmtpTransport) and t.settings is smtp
