"""Handing one signed message to one envelope recipient: a Maildir or an SMTP smarthost.

The outbox decides *what* to send and *when* to retry; a transport only tries once and says
how it went, in the two words the outbox understands: TemporaryDeliveryError (try again
later) and PermanentDeliveryError (give up, tell the thread). Getting that split right is
the whole job: calling a temporary problem permanent loses a letter to an authority, calling
a permanent one temporary retries it for days.

Transports never change the message bytes: they were DKIM-signed already, and one rewritten
byte in a signed header or the body breaks the signature.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import re
import secrets
from pathlib import Path
from typing import Protocol

import aiosmtplib

from mailflow.config import OutboundSettings, SmarthostSettings
from mailflow.errors import ConfigError, PermanentDeliveryError, TemporaryDeliveryError

__all__ = ["MaildirTransport", "MaybeDeliveredError", "SmtpTransport", "Transport",
           "make_transport"]


class MaybeDeliveredError(TemporaryDeliveryError):
    """The whole message was sent and the server never answered the final dot (the
    connection closed or timed out): it may have been delivered. Still temporary: the
    outbox retries (RFC 5321 §6.1 prefers a duplicate to a loss) and records the doubt."""


class Transport(Protocol):
    async def deliver(self, mail_from: str, rcpt: str, raw: bytes, *, delivery_id: str) -> str:
        """Hand `raw` over for `rcpt` once; return a short note for the log and the thread.

        `mail_from` "" is the null sender (bounces, auto-replies must not be answered).
        Raises TemporaryDeliveryError or PermanentDeliveryError; nothing else on purpose.
        """
        ...


def _check_envelope(mail_from: str, rcpt: str) -> None:
    """An envelope address with a line break would inject a header or an SMTP command.

    The composer should never produce one; if it does, no retry can help, so it is a
    permanent failure of this delivery rather than a crash of the outbox loop.
    """
    for what, addr in (("sender", mail_from), ("recipient", rcpt)):
        if any(c in addr for c in "\r\n\0<>") or (what == "recipient" and not addr.strip()):
            raise PermanentDeliveryError(f"unusable envelope {what} {addr!r}")


# Maildir file names must not contain "/" (a path) or ":" (starts the flags in cur/).
_SAFE_NAME = re.compile(r"[A-Za-z0-9_=+-][A-Za-z0-9._=+-]{0,150}")


class MaildirTransport:
    """Delivers into a local Maildir: the embedded default, and what tests and dry runs read.

    A file's name comes from the delivery id alone, so a delivery that is retried after a
    crash (the file was written but the outbox never recorded it) finds its earlier copy and
    does not make a second one.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        try:
            for sub in ("tmp", "new", "cur"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as e:  # at start-up: the configured folder is wrong, not a delivery
            raise ConfigError(f"{self.root}: cannot create the outbound Maildir: "
                              f"{e.strerror}") from e

    @staticmethod
    def file_name(delivery_id: str) -> str:
        """The deterministic file name for a delivery (ids unsafe in a file name are hashed)."""
        if not _SAFE_NAME.fullmatch(delivery_id):
            delivery_id = "h" + hashlib.sha256(delivery_id.encode("utf-8", "surrogatepass")
                                               ).hexdigest()[:32]
        return f"{delivery_id}.mailflow"

    def _existing(self, name: str) -> str | None:
        if (self.root / "new" / name).exists():
            return name
        # A mail reader that has seen the message moved it to cur/ as "<name>:2,<flags>".
        cur = self.root / "cur"
        if (cur / name).exists():
            return name
        prefix = name + ":"
        with os.scandir(cur) as entries:
            for entry in entries:
                if entry.name.startswith(prefix):
                    return entry.name
        return None

    def _write(self, mail_from: str, rcpt: str, raw: bytes, name: str) -> str:
        found = self._existing(name)
        if found is not None:
            return found
        head = f"Return-Path: <{mail_from}>\r\nDelivered-To: {rcpt}\r\n".encode("utf-8")
        # Unique in tmp/ so two workers delivering the same id never write into one file;
        # the rename into new/ is atomic, and the later one merely replaces identical bytes.
        tmp = self.root / "tmp" / f"{name}.{os.getpid()}.{secrets.token_hex(6)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(head)
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, self.root / "new" / name)
        except BaseException:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            raise
        dir_fd = os.open(self.root / "new", os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename is durable only once the directory is on disk
        finally:
            os.close(dir_fd)
        return name

    async def deliver(self, mail_from: str, rcpt: str, raw: bytes, *, delivery_id: str) -> str:
        _check_envelope(mail_from, rcpt)
        name = self.file_name(delivery_id)
        try:
            # fsync can take long on a busy disk; keep it off the event loop.
            return await asyncio.to_thread(self._write, mail_from, rcpt, raw, name)
        except OSError as e:
            raise TemporaryDeliveryError(f"cannot write to Maildir {self.root}: {e}") from e


def _header_is_8bit(raw: bytes) -> bool:
    end = raw.find(b"\r\n\r\n")
    return not (raw if end < 0 else raw[:end]).isascii()


class SmtpTransport:
    """Delivers through the site's smarthost with aiosmtplib, one connection per message.

    Only an answer to *this message's* transaction (MAIL, RCPT, DATA) can be permanent. A
    5xx to the greeting, EHLO, STARTTLS or AUTH says the smarthost or our configuration is
    wrong, which an admin can fix; calling it permanent would fail every queued letter at
    once, so it is temporary and the outbox keeps retrying.
    """

    def __init__(self, settings: SmarthostSettings, *, validate_certs: bool = True,
                 local_hostname: str | None = None) -> None:
        self.settings = settings
        self.validate_certs = validate_certs
        # Without it aiosmtplib calls socket.getfqdn() per connection, a reverse DNS lookup
        # that stalls where DNS is broken.
        self.local_hostname = local_hostname

    def _client(self) -> aiosmtplib.SMTP:
        s = self.settings
        return aiosmtplib.SMTP(
            hostname=s.host, port=s.port,
            use_tls=s.tls == "implicit",
            # False rather than None for "none": None means "upgrade if offered", which
            # fails on a local relay with a self-signed certificate the admin chose to skip.
            start_tls=s.tls == "starttls",
            validate_certs=self.validate_certs,
            timeout=s.timeout,
            local_hostname=self.local_hostname,
            username=s.user or None,
            password=(s.password or "") if s.user else None,
        )

    async def deliver(self, mail_from: str, rcpt: str, raw: bytes, *, delivery_id: str) -> str:
        _check_envelope(mail_from, rcpt)
        where = f"{self.settings.host}:{self.settings.port}"
        smtp = self._client()
        try:
            try:
                await smtp.connect()  # also STARTTLS and AUTH, as configured
                if smtp.is_ehlo_or_helo_needed:
                    await smtp.ehlo()
            except aiosmtplib.SMTPAuthenticationError as e:
                raise TemporaryDeliveryError(
                    f"smarthost {where} refused our login ({e.code} {e.message}); "
                    "check [outbound.smtp] user and password") from e
            except aiosmtplib.SMTPResponseException as e:
                raise TemporaryDeliveryError(
                    f"smarthost {where} refused the session: {e.code} {e.message}") from e
            except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as e:
                raise TemporaryDeliveryError(f"cannot reach smarthost {where}: {e}") from e

            options: list[str] = []
            if not raw.isascii() and smtp.supports_extension("8bitmime"):
                options.append("BODY=8BITMIME")
            # Non-ASCII addresses cannot travel without SMTPUTF8 (aiosmtplib raises
            # SMTPNotSupported, below). Raw UTF-8 in headers is declared when the smarthost
            # understands it and otherwise sent as it is, as MTAs commonly accept it.
            if not (mail_from + rcpt).isascii() or (
                    _header_is_8bit(raw) and smtp.supports_extension("smtputf8")):
                options.append("SMTPUTF8")
            progress = _watch(smtp)
            try:
                errors, message = await smtp.sendmail(mail_from, [rcpt], raw,
                                                      mail_options=options)
            except aiosmtplib.SMTPRecipientsRefused as e:
                refused = e.recipients[0] if e.recipients else None
                code = refused.code if refused else 0
                text = refused.message if refused else str(e)
                raise _by_code(code, f"{where} refused recipient {rcpt}: {code} {text}") from e
            except aiosmtplib.SMTPSenderRefused as e:
                raise _by_code(e.code, f"{where} refused sender <{mail_from}>: "
                                       f"{e.code} {e.message}") from e
            except aiosmtplib.SMTPResponseException as e:
                raise _by_code(e.code, f"{where} rejected the message: {e.code} {e.message}"
                               ) from e
            except aiosmtplib.SMTPNotSupported as e:
                # The message needs SMTPUTF8 and the smarthost cannot carry it: no retry helps.
                raise PermanentDeliveryError(f"{where} cannot take this message: {e}") from e
            except ValueError as e:  # aiosmtplib's own check of the envelope addresses
                raise PermanentDeliveryError(f"unusable envelope address: {e}") from e
            except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as e:
                # The connection was lost or timed out. If that happened after the whole
                # message and its final dot had gone out, the smarthost may have taken it
                # (RFC 5321 §4.1.1.4): a retry can duplicate it, and SMTP offers no way out.
                # A reset connection means the server closed with our bytes unread, so it
                # never saw the final dot.
                what = str(e) or type(e).__name__
                if progress.content_sent and not _was_reset(e):
                    raise MaybeDeliveredError(
                        f"the whole message went to {where} and the connection was lost or "
                        f"timed out before it answered ({what}): it may have been "
                        "delivered") from e
                raise TemporaryDeliveryError(f"delivery to {where} interrupted: {what}") from e
            if rcpt in errors:  # cannot happen with one recipient, but never claim success
                code, text = errors[rcpt].code, errors[rcpt].message
                raise _by_code(code, f"{where} refused recipient {rcpt}: {code} {text}")
            return f"250 {message}".strip()
        finally:
            await _close(smtp)


class _Progress:
    """How far a transaction got: whether the message and its final dot were handed over."""
    content_sent = False


def _watch(smtp: aiosmtplib.SMTP) -> _Progress:
    """Note when the message content (which ends with CRLF "." CRLF, unlike any command) is
    written to the connection, to tell "never sent" from "sent, no answer"."""
    progress = _Progress()
    protocol = getattr(smtp, "protocol", None)
    write = getattr(protocol, "write", None)
    if write is None:
        return progress

    def watched(data: bytes) -> None:
        write(data)
        if data.endswith(b"\r\n.\r\n"):
            progress.content_sent = True

    protocol.write = watched  # type: ignore[union-attr]
    return progress


def _was_reset(exc: BaseException) -> bool:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, (ConnectionResetError, BrokenPipeError)):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


# 5xx answers inside the transaction that still mean "our session is wrong", not "this
# message is wrong": 530 STARTTLS / authentication required (RFC 3207, RFC 4954), 534 and
# 538 mechanism too weak / encryption required, 535 credentials invalid.
_SESSION_CODES = frozenset({530, 534, 535, 538})


def _by_code(code: int, text: str) -> TemporaryDeliveryError | PermanentDeliveryError:
    if code in _SESSION_CODES:
        return TemporaryDeliveryError(text + " (a smarthost configuration problem: check "
                                             "[outbound.smtp] tls, user and password)")
    if 500 <= code < 600:
        return PermanentDeliveryError(text)
    return TemporaryDeliveryError(text)


async def _close(smtp: aiosmtplib.SMTP) -> None:
    """Say QUIT politely, but never let a failing QUIT undo an accepted message."""
    if not smtp.is_connected:
        return
    try:
        await smtp.quit()
    except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
        smtp.close()


def make_transport(settings: OutboundSettings, local_hostname: str | None = None) -> Transport:
    """`local_hostname` is the name given in EHLO; without it aiosmtplib asks DNS every time."""
    if settings.transport == "smtp":
        return SmtpTransport(settings.smtp, local_hostname=local_hostname)
    if settings.transport == "maildir":
        return MaildirTransport(settings.maildir)
    raise ValueError(f"unknown outbound transport {settings.transport!r}")
