"""SMTP and LMTP ingress: decide recipients, spool the message, say 250 only when it is safe.

The handler does as little as possible while a client waits: it asks the daemon whether a
recipient is ours and writes the raw bytes to the spool. Everything else (parsing, matching)
happens after the 250, from the spool, where a crash costs nothing.

Two rules shape it. A reply the authority's server sees as permanent (5xx) bounces their answer
to a citizen's request, so an internal failure must never produce one: every exception becomes
``451 4.3.0`` (aiosmtpd itself would answer ``500`` with the exception text, leaking
internals). And 250 is a promise: it is sent only after the spool has fsynced the message.

The server faces the open internet, so the protocol class hardens aiosmtpd (see
docs/guarantees.md, "SMTP ingress", for what is promised and which test proves it):

* framing: the message ends only at ``<CRLF>.<CRLF>`` (as in aiosmtpd >= 1.4.5, whose DATA
  handling mailflow's block reader reproduces byte for byte), so a bare ``<LF>.<LF>`` or
  ``<CR>.<CR>`` inside a message is message text and can never start a second, smuggled
  transaction. Such bytes are stored unchanged (the raw message is the record) and never
  leave again as they came: outgoing mail is composed anew.
* STARTTLS: anything pipelined behind STARTTLS in the clear is thrown away once TLS is up.
* lines: body lines up to 64 KiB are taken and stored unchanged (RFC 5321 asks for 1,000,
  but a badly formatted authority reply must not bounce); command lines stay at 512 bytes.
* envelope addresses with control characters, Unicode line separators or invalid UTF-8
  are refused with 501 before anything else sees them.
* an idle client is told ``421`` and disconnected; the number of connections, in all and per
  client address, is capped, and a client over the cap is told ``421`` at once.
"""
from __future__ import annotations

import asyncio
import collections
import enum
import inspect
import logging
import os
import re
import ssl
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import MISSING, SMTP
from aiosmtpd.smtp import Envelope as SmtpEnvelope
from aiosmtpd.smtp import Session as SmtpSession

from mailflow.errors import ConfigError
from mailflow.spool import Envelope, Spool

log = logging.getLogger(__name__)

LOCAL_ERROR = "451 4.3.0 Requested action aborted: local error, try again later"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
RCPT_OK = "250 2.1.5 Ok"
BAD_SENDER = "501 5.1.7 Bad sender address syntax"
BAD_RECIPIENT = "501 5.1.3 Bad recipient address syntax"
IDLE_TIMEOUT = 300.0
"""RFC 5321 4.5.3.2.7 asks servers to wait 5 minutes for a command before giving up."""
MAX_CONNECTIONS = 1000
MAX_CONNECTIONS_PER_IP = 50
"""Postfix's smtpd_client_connection_count_limit default; an MTA in front of mailflow (all
its connections come from one address) stays well under it with its default concurrency."""
BODY_LINE_LIMIT = 64 * 1024
"""The longest line taken in DATA, in bytes without the CRLF. RFC 5321 4.5.3.1.6 allows
servers to refuse lines over 1,000 bytes; Postfix takes them, and so does mailflow."""

_REFUSAL = re.compile(r"^[45][0-9][0-9] [^\r\n]*$")
# Nothing in an envelope address may break a line or hide one: C0 and C1 controls, DEL, the
# Unicode line and paragraph separators (str.splitlines() breaks on all of them), and lone
# surrogates, which are how aiosmtpd hands over bytes that are not UTF-8.
_UNSAFE_IN_ADDRESS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


# The envelope address almost every client sends: <local@domain>, both plain ASCII dot-atoms.
# For it, the email package's parser that aiosmtpd uses (hundreds of objects per address, and
# a typing.Protocol class defined on every call) returns the address as written; see
# `_simple_getaddr`.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_ADDRESS = re.compile(rf"<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>")


def _simple_getaddr(arg: str, local_part_limit: int = 0) -> tuple[str | None, str | None] | None:
    """What aiosmtpd's ``SMTP._getaddr(arg)`` returns, for the common shape of ``arg`` only:
    ``<local@domain>`` then nothing, or whitespace and parameters. None for anything else
    (quoted or non-ASCII local parts, comments, source routes, ``<>``...), which the full
    parser then takes. tests/test_smtp_getaddr.py checks the two agree."""
    m = _SIMPLE_ADDRESS.match(arg)
    if m is None:
        return None
    rest = arg[m.end():]
    if rest[:1] in (" ", "\t"):
        rest = rest.lstrip()  # the parser's folding white space: str.lstrip(), all of it
    if rest[:1] == "(":
        return None  # a comment: the parser's business
    addr = m.group(1)
    if local_part_limit and len(addr.rpartition("@")[0]) > local_part_limit:
        return None, None
    return addr, rest


def unsafe_address(value: str | None) -> bool:
    """True when an envelope address (or the argument of MAIL/RCPT) holds a character that
    no address may hold: see _UNSAFE_IN_ADDRESS."""
    return bool(value) and _UNSAFE_IN_ADDRESS.search(value) is not None  # type: ignore[arg-type]


@dataclass(frozen=True)
class RcptDecision:
    """The daemon's verdict on one envelope recipient.

    ``reply`` is sent as is when refusing, so the daemon controls the wording that tells an
    authority's postmaster what went wrong (e.g. a link to the authority's archive page).
    """

    accept: bool
    reply: str = ""


RcptCheck = Callable[[str, str], "RcptDecision | Awaitable[RcptDecision]"]
SpooledCallback = Callable[[str], "None | Awaitable[None]"]


def _null_sender(mail_from: str | None) -> str:
    """aiosmtpd reports the null sender as the literal ``<>``; the spool stores ""."""
    if not mail_from or mail_from == "<>":
        return ""
    return mail_from


def _format_peer(peer: Any) -> str | None:
    if isinstance(peer, (tuple, list)) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return None if peer is None else str(peer)


class IngressHandler:
    """aiosmtpd handler for both SMTP and LMTP (the server object tells which)."""

    def __init__(
        self,
        spool: Spool,
        check_rcpt: RcptCheck,
        on_spooled: SpooledCallback,
        *,
        max_recipients: int = 100,
        via: str = "smtp",
    ) -> None:
        self.spool = spool
        self.check_rcpt = check_rcpt
        self.on_spooled = on_spooled
        self.max_recipients = max_recipients
        self.via = via
        self._tasks: set[asyncio.Task[str]] = set()  # strong refs: the loop keeps only weak ones

    async def handle_EHLO(self, server: SMTP, session: SmtpSession, envelope: SmtpEnvelope,
                          hostname: str, responses: list[str]) -> list[str]:
        """No AUTH: nobody logs in to mailflow (aiosmtpd would offer PLAIN and LOGIN over TLS,
        refusing every attempt)."""
        session.host_name = hostname
        return [r for r in responses if not r[4:].upper().startswith("AUTH")]

    async def handle_RCPT(
        self,
        server: SMTP,
        session: SmtpSession,
        envelope: SmtpEnvelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        """Refuse unknown recipients during the conversation rather than bounce later:
        a later bounce would go to a forged sender (backscatter)."""
        try:
            if unsafe_address(address):
                return BAD_RECIPIENT
            if len(envelope.rcpt_tos) >= self.max_recipients:
                return TOO_MANY_RECIPIENTS
            decision = self.check_rcpt(_null_sender(envelope.mail_from), address)
            if inspect.isawaitable(decision):
                decision = await decision
            if decision.accept:
                envelope.rcpt_tos.append(address)
                envelope.rcpt_options.extend(rcpt_options)
                return RCPT_OK
            reply = decision.reply
            if not isinstance(reply, str) or not _REFUSAL.match(reply):
                # A malformed refusal is a bug on our side; a temporary answer keeps the
                # sender retrying until it is fixed instead of bouncing the mail.
                log.error("check_rcpt refused %r with a malformed reply %r", address, reply)
                return LOCAL_ERROR
            return reply
        except Exception:
            log.exception("RCPT %r from %r failed", address, session.peer)
            return LOCAL_ERROR

    async def handle_DATA(self, server: SMTP, session: SmtpSession,
                          envelope: SmtpEnvelope) -> str:
        """Spool first, then answer: the 250 must never outrun the fsync."""
        lmtp = isinstance(server, LMTP)
        rcpts = list(envelope.rcpt_tos)
        task: asyncio.Task[str] | None = None
        try:
            raw = envelope.original_content
            if raw is None:
                raise ValueError("no message content (decode_data must stay False)")
            via = "lmtp" if lmtp and self.via == "smtp" else self.via
            spooled = Envelope(
                mail_from=_null_sender(envelope.mail_from),
                rcpt_tos=rcpts,
                via=via,
                peer=_format_peer(session.peer),
                helo=session.host_name,
            )
            # If the client hangs up now, aiosmtpd cancels this coroutine; the spooling goes
            # on in its own task, so a message already being written is finished and
            # announced rather than left for the next sweep.
            task = asyncio.create_task(self._spool(raw, spooled, session.peer))
            self._tasks.add(task)
            task.add_done_callback(self._task_done)
            id = await asyncio.shield(task)
        except asyncio.CancelledError:
            raise
        except Exception:
            if task is None:  # _spool logs its own failures
                log.exception("DATA from %r failed before spooling", session.peer)
            return _per_recipient(LOCAL_ERROR, rcpts, lmtp)
        # DEBUG, not INFO: a line per message cost the accept loop 4 % of its CPU, and the
        # spool file records the same (peer, HELO, time); processing logs each message.
        # One line per accepted message, as a mail server's log has ("queued as"): how an
        # operator answers "did you get my mail?" (about 0.09 ms of the accept loop's ~2 ms).
        log.info("queued %s from %r for %d recipient(s)", id, session.peer, len(rcpts))
        return _per_recipient(f"250 2.0.0 Ok: queued as {id}", rcpts, lmtp)

    async def _spool(self, raw: bytes, spooled: Envelope, peer: Any) -> str:
        try:
            # fsync takes milliseconds; in a thread it does not stall other connections.
            id = await asyncio.to_thread(self.spool.put, raw, spooled)
        except Exception:
            log.exception("could not spool message from %r", peer)
            raise
        try:
            result = self.on_spooled(id)
            if inspect.isawaitable(result):
                await result
        except Exception:
            # The message is safe in the spool; processing will find it without the nudge.
            log.exception("on_spooled(%s) failed", id)
        return id

    def _task_done(self, task: asyncio.Task[str]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: _spool logged it already

    async def drain(self) -> None:
        """Wait for messages still being spooled: a daemon shutting down calls this after
        closing the server, so that no message is cut off between fsync and announcement."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def handle_exception(self, error: Exception) -> str:
        """aiosmtpd calls this for anything raised in a session; its own default is a
        ``500`` carrying the exception text, a permanent failure that also leaks internals."""
        log.error("SMTP session error", exc_info=error)
        return LOCAL_ERROR


def _per_recipient(reply: str, rcpts: list[str], lmtp: bool) -> str:
    """LMTP (RFC 2033 4.2) wants one reply after DATA per accepted recipient. aiosmtpd's LMTP
    class does not do this itself: it sends whatever handle_DATA returns, so return the lines
    joined (aiosmtpd adds the final CRLF)."""
    if not lmtp or len(rcpts) <= 1:
        return reply
    return "\r\n".join(reply for _ in rcpts)


class ConnectionLimits:
    """Open connections of one server, in all and per client address (counted in the loop's
    thread, so no lock). A client over either cap is told 421 and disconnected before its
    session starts, so an idle crowd cannot starve the legitimate senders of memory or fds."""

    def __init__(self, total: int = MAX_CONNECTIONS, per_ip: int = MAX_CONNECTIONS_PER_IP):
        if total < 1 or per_ip < 0:
            raise ValueError("max_connections must be at least 1, max_connections_per_ip 0 or more")
        self.total = total
        self.per_ip = per_ip  # 0: no per-address cap
        self.open = 0
        self.by_ip: dict[str, int] = {}

    def admit(self, ip: str) -> str | None:
        """None: counted in; else the refusal to send."""
        if self.open >= self.total:
            return "421 4.7.0 Too many connections, try again later"
        if self.per_ip and self.by_ip.get(ip, 0) >= self.per_ip:
            return "421 4.7.0 Too many connections from your address, try again later"
        self.open += 1
        self.by_ip[ip] = self.by_ip.get(ip, 0) + 1
        return None

    def release(self, ip: str) -> None:
        self.open -= 1
        left = self.by_ip.get(ip, 1) - 1
        if left > 0:
            self.by_ip[ip] = left
        else:
            self.by_ip.pop(ip, None)


class TlsFiles:
    """The certificate and key for STARTTLS, read again when either file changes (a renewed
    certificate is used for the next connection, no restart needed)."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert, self.key = Path(cert), Path(key)
        self._stamp = self._mtimes()
        self._context = self._load()  # a broken pair stops the daemon at start, not later

    def _mtimes(self) -> tuple[int, int]:
        try:
            return self.cert.stat().st_mtime_ns, self.key.stat().st_mtime_ns
        except OSError:
            return (-1, -1)

    def _load(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)  # server side, no client certs
        try:
            context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"[smtp] tls_cert/tls_key: cannot load {self.cert} and "
                              f"{self.key}: {e}") from None
        return context

    def context(self) -> ssl.SSLContext:
        stamp = self._mtimes()
        if stamp != self._stamp:
            try:
                self._context = self._load()
                self._stamp = stamp
                log.info("STARTTLS: reloaded %s", self.cert)
            except ConfigError as e:  # half-written renewal: keep the old pair, retry next time
                log.warning("%s; still using the previous certificate", e)
        return self._context


class _Data(enum.Enum):
    """A message's state while DATA is read (aiosmtpd's private ``_DataState``)."""

    NOMINAL = enum.auto()
    TOO_LONG = enum.auto()
    TOO_MUCH = enum.auto()


_EOD = b"\r\n.\r\n"
"""The end of DATA: the CRLF ending the message's last line, then a line holding one dot.
The DATA command's own CRLF counts as the first two bytes, so ``.<CRLF>`` at once is an empty
message."""
_EOD_SEEK = {0: _EOD, 1: _EOD[1:], 2: _EOD[2:]}
"""What to read up to when the bytes read so far end with the first 0, 1 or 2 bytes of _EOD:
the rest of it (the end of data, if found at the very start of what is read) or, further on,
a whole one (every _EOD ends with this too)."""


def _eod_matched(tail: bytes) -> int:
    """How many of _EOD's first bytes ``tail`` ends with (the longest; 4 at most)."""
    for n in (4, 3, 2, 1):
        if tail.endswith(_EOD[:n]):
            return n
    return 0


class _DataVerdict:
    """Whether aiosmtpd would take a message or refuse it, decided on the message as it
    arrives in blocks, dot-stuffed as received (aiosmtpd checks before unstuffing).

    aiosmtpd reads DATA a line at a time (lines end at CRLF and are counted with it); the
    first line that breaks a limit decides: a line longer than the reader's limit + 2 is
    refused by its reader before it is counted ("500 Line too long"); otherwise the line is
    counted, and the message is "552 Too much mail data" once the count passes
    ``data_size_limit``; then a line longer than ``line_length_limit`` is "500 Line too long"
    (the limit + 1 or + 2: its "defensive" check). Lines are checked in windows of
    ``line_length_limit`` bytes: the last CRLF in each clears every line before it, so a
    block costs a few ``rfind`` calls, not one per line."""

    __slots__ = ("limit", "size", "line")

    def __init__(self, line_length_limit: int, data_size_limit: int | None) -> None:
        self.limit = line_length_limit
        self.size = data_size_limit or 0  # aiosmtpd: None or 0, no limit
        self.line = 0  # where the first line not yet cleared starts

    def check(self, buf: bytearray, end: int) -> _Data:
        """The verdict on the message's first ``end`` bytes, ``buf[:end]`` (more of ``buf``
        may follow that is not yet known to be message). NOMINAL while nothing is refused."""
        limit, size, p = self.limit, self.size, self.line
        while True:
            if size and p > size:
                return _Data.TOO_MUCH  # a line before p took the count over the limit
            stop = p + limit
            if stop > end:
                q = buf.rfind(b"\r\n", p, end)
                if q < 0:
                    break  # the line at p is not over the limit yet
                p = q + 2
                continue
            q = buf.rfind(b"\r\n", p, stop)
            if q >= 0:
                p = q + 2  # every line in [p, q + 2) is short enough
                continue
            # The line at p is longer than the limit: by how much?
            q = buf.find(b"\r\n", stop - 1, min(stop + 2, end))
            if q < 0:
                if end >= stop + 2:
                    return _Data.TOO_LONG  # the reader refuses it before counting it
                break  # not known yet
            return _Data.TOO_MUCH if size and q + 2 > size else _Data.TOO_LONG
        self.line = p
        return _Data.NOMINAL


class _Hardened:
    """What mailflow changes in aiosmtpd's protocol (mixed into its SMTP and LMTP classes)."""

    # aiosmtpd sizes its StreamReader with this: commands over command_size_limit still get
    # "500 Command line too long"; DATA lines up to it are kept, longer ones get aiosmtpd's
    # "500 Line too long" (RFC 5321 4.5.3.1.10). +3: a transparency dot and the CRLF.
    line_length_limit = BODY_LINE_LIMIT + 3

    _limits: ConnectionLimits | None = None
    _admitted: str | None = None
    _refused = False
    _in_data = False

    def __init__(self, *args: Any, limits: ConnectionLimits | None = None, **kw: Any) -> None:
        # aiosmtpd keeps command_size_limits on the class, shared by every connection (each
        # EHLO raises MAIL's limit for all of them); give each connection its own.
        self.command_size_limits = _per_connection_limits()
        self._limits = limits
        super().__init__(*args, **kw)  # type: ignore[call-arg]

    # -- connection caps -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._admitted is None and self._limits is not None:  # not the STARTTLS re-entry
            peer = transport.get_extra_info("peername")
            ip = str(peer[0]) if isinstance(peer, (tuple, list)) and peer else str(peer)
            refusal = self._limits.admit(ip)
            if refusal is not None:
                self._refused = True
                log.warning("%s refused: %s", ip, refusal)
                transport.write(f"{refusal}\r\n".encode("ascii"))  # type: ignore[attr-defined]
                transport.close()
                return
            self._admitted = ip
        super().connection_made(transport)  # type: ignore[misc]

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        if self._admitted is not None and self._limits is not None:
            self._limits.release(self._admitted)
            self._limits = None  # released once, whatever calls this again
        super().connection_lost(error)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_data:
            # In DATA the timeout counts silence, not the whole upload: a large message on a
            # slow line is not cut off as long as bytes keep coming.
            self._reset_timeout()  # type: ignore[attr-defined]
        super().data_received(data)  # type: ignore[misc]

    def eof_received(self) -> bool | None:
        if self._refused:
            return False
        return super().eof_received()  # type: ignore[misc]

    # -- timeouts --------------------------------------------------------------------------
    def _timeout_cb(self) -> None:
        """aiosmtpd just closes an idle connection; RFC 5321 3.8 says to tell the client."""
        transport = getattr(self, "transport", None)
        if transport is not None and not transport.is_closing():
            try:
                transport.write(f"421 4.4.2 {self.hostname} Error: timeout exceeded\r\n"  # type: ignore[attr-defined]
                                .encode("ascii", "replace"))
            except Exception:  # noqa: BLE001 - closing is what matters
                pass
        super()._timeout_cb()  # type: ignore[misc]

    async def smtp_DATA(self, arg: str) -> None:
        self._in_data = True
        try:
            await self._data(arg)
        finally:
            self._in_data = False
            if getattr(self, "transport", None) is not None:
                self._reset_timeout()  # type: ignore[attr-defined]  # spooling was not idling

    async def _data(self, arg: str) -> None:
        """aiosmtpd's ``SMTP.smtp_DATA`` with the message read in blocks instead of a line at a
        time: the same replies, the same ``envelope.content``/``original_content`` for every
        input, however it arrives (tests/adversarial/test_smtp_data_blocks.py drives both
        with the same bytes). aiosmtpd's loop cost about 40 ms of CPU per MB, a line at a
        time, most of it after the client's last byte, so the 250 for a 1 MB message came
        hundreds of milliseconds after the end of DATA."""
        if await self.check_helo_needed():  # type: ignore[attr-defined]
            return
        if await self.check_auth_needed("DATA"):  # type: ignore[attr-defined]
            return
        envelope = self.envelope  # type: ignore[attr-defined]
        assert envelope is not None
        if not envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")  # type: ignore[attr-defined]
            return
        if arg:
            await self.push("501 Syntax: DATA")  # type: ignore[attr-defined]
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")  # type: ignore[attr-defined]
        try:
            state, original_content = await self._read_data()
        except asyncio.CancelledError:
            # The connection got reset during the DATA command.
            log.info("Connection lost during DATA")
            self._writer.close()  # type: ignore[attr-defined]
            raise
        if state is not _Data.NOMINAL:
            if state is _Data.TOO_LONG:
                await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")  # type: ignore[attr-defined]
            else:
                await self.push("552 Error: Too much mail data")  # type: ignore[attr-defined]
            self._set_post_data_state()  # type: ignore[attr-defined]
            return
        content: str | bytes
        if self._decode_data:  # type: ignore[attr-defined]
            if self.enable_SMTPUTF8:  # type: ignore[attr-defined]
                content = original_content.decode("utf-8", errors="surrogateescape")
            else:
                try:
                    content = original_content.decode("ascii", errors="strict")
                except UnicodeDecodeError:
                    await self.push("500 Error: strict ASCII mode")  # type: ignore[attr-defined]
                    return
        else:
            content = original_content
        envelope.content = content
        envelope.original_content = original_content
        if "DATA" in self._handle_hooks:  # type: ignore[attr-defined]
            status = await self._call_handler_hook("DATA")  # type: ignore[attr-defined]
        else:
            # aiosmtpd's deprecated API (mailflow's handler has handle_DATA).
            status = MISSING
            handler = self.event_handler  # type: ignore[attr-defined]
            if hasattr(handler, "process_message"):
                warnings.warn("Use handler.handle_DATA() instead of .process_message()",
                              DeprecationWarning)
                args = (self.session.peer, envelope.mail_from,  # type: ignore[attr-defined]
                        envelope.rcpt_tos, envelope.content)
                status = handler.process_message(*args)
                if inspect.isawaitable(status):
                    status = await status
                if status is None:
                    status = MISSING
        self._set_post_data_state()  # type: ignore[attr-defined]
        await self.push("250 OK" if status is MISSING else status)  # type: ignore[attr-defined]

    async def _read_data(self) -> tuple[_Data, bytes]:
        """Read DATA up to and including the end-of-data line, never a byte further (a
        pipelining client's next command stays in the reader), and return aiosmtpd's verdict
        with the message as aiosmtpd stores it: the lines before the lone dot, each with a
        leading dot removed (RFC 5321 4.5.2). Lines end at CRLF only, as in aiosmtpd: a bare
        LF or CR is message text, and ``<LF>.<LF>`` ends nothing.

        The reader has no way to look ahead without consuming, so the read stops wherever
        the end of data could end: with ``readuntil`` of the end-of-data sequence itself, or
        of the part of it still missing when what was read so far ends with its beginning
        (`_EOD_SEEK`). ``readuntil`` refuses to hold more than the reader's limit (the line
        limit, 64 KiB) without finding it; then the bytes that cannot be part of it are read
        as one block. Once the message is refused (too long a line, too much data) the
        blocks are thrown away as they come, and the rest is read only to find its end."""
        reader: asyncio.StreamReader = self._reader  # type: ignore[attr-defined]
        state = _Data.NOMINAL
        verdict = _DataVerdict(self.line_length_limit, self.data_size_limit)  # type: ignore[attr-defined]
        buf = bytearray()
        tail = _EOD[:2]  # the DATA command's own CRLF: the message may end at once
        matched = 2  # how much of _EOD the bytes read so far end with
        while True:
            if matched > 2:
                # "\r\n." or "\r\n.\r": one or two bytes say whether this is the end.
                chunk = await reader.readexactly(len(_EOD) - matched)
            else:
                try:
                    chunk = await reader.readuntil(_EOD_SEEK[matched])
                except asyncio.LimitOverrunError as e:
                    chunk = await reader.read(e.consumed)
            tail += chunk[-len(_EOD):]
            last = tail.endswith(_EOD)
            tail = tail[-4:]
            matched = 0 if last else _eod_matched(tail)
            if state is _Data.NOMINAL:
                buf += chunk
                known = len(buf) - 3 if last else len(buf) - matched
                state = verdict.check(buf, known)
                if state is not _Data.NOMINAL:
                    buf = bytearray()  # refused: keep nothing more in memory
            if last:
                break
        if state is not _Data.NOMINAL:
            return state, b""
        del buf[len(buf) - 3:]  # the lone dot's line
        data = bytes(buf)
        del buf
        data = data.replace(b"\r\n.", b"\r\n")  # the same object when there is none
        if data[:1] == b".":
            data = data[1:]
        return state, data

    # -- envelope addresses ------------------------------------------------------------------
    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's address parse (MAIL and RCPT), without its cost for a plain address:
        it was a fifth of the accept loop's CPU per message."""
        if arg:
            simple = _simple_getaddr(arg, self.local_part_limit)  # type: ignore[attr-defined]
            if simple is not None:
                return simple
        return super()._getaddr(arg)  # type: ignore[misc, no-any-return]

    async def smtp_MAIL(self, arg: str | None) -> None:
        if unsafe_address(arg):
            await self.push(BAD_SENDER)  # type: ignore[attr-defined]
            return
        await super().smtp_MAIL(arg)  # type: ignore[misc]

    async def smtp_RCPT(self, arg: str | None) -> None:
        if unsafe_address(arg):
            await self.push(BAD_RECIPIENT)  # type: ignore[attr-defined]
            return
        await super().smtp_RCPT(arg)  # type: ignore[misc]


class _CommandLimits(collections.defaultdict):  # type: ignore[type-arg]
    """Command line limits of one connection. aiosmtpd raises MAIL's limit at every EHLO
    (by 26 for SIZE=, 10 for SMTPUTF8); capped, so that repeating EHLO cannot stretch it
    towards the 64 KiB the line reader allows."""

    CAP = 512 + 26 + 10

    def __setitem__(self, key: str, value: int) -> None:
        super().__setitem__(key, min(value, self.CAP))


def _per_connection_limits() -> _CommandLimits:
    return _CommandLimits(lambda: SMTP.command_size_limit)


# HELP lists and explains the commands whose methods carry aiosmtpd's @syntax text; the
# overriding methods keep aiosmtpd's.
for _name in ("smtp_DATA", "smtp_MAIL", "smtp_RCPT"):
    for _attr in ("__smtp_syntax__", "__smtp_syntax_extended__", "__smtp_syntax_when__"):
        setattr(getattr(_Hardened, _name), _attr, getattr(getattr(SMTP, _name), _attr))
del _name, _attr


class MailflowSMTP(_Hardened, SMTP):
    pass


class MailflowLMTP(_Hardened, LMTP):
    pass


def _raise_fd_limit(connections: int) -> None:
    """Each connection is a file descriptor; the common soft limit of 1,024 would make the
    server stop accepting (EMFILE) well before max_connections. Raise it as far as allowed."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Unix
        return
    need = connections + 256  # spool files, the database, logs, outgoing SMTP, IMAP
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    new = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if new > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (ValueError, OSError):
            new = soft
    if new < need:
        log.warning("open file limit %d is below what %d connections need (%d); raise it "
                    "(ulimit -n, LimitNOFILE=) or lower [smtp] max_connections",
                    new, connections, need)


async def start_server(
    handler: IngressHandler,
    host: str,
    port: int,
    *,
    hostname: str,
    max_message_size: int,
    lmtp: bool = False,
    timeout: float = IDLE_TIMEOUT,
    ident: str = "mailflow",
    max_connections: int = MAX_CONNECTIONS,
    max_connections_per_ip: int = MAX_CONNECTIONS_PER_IP,
    tls_cert: str | os.PathLike[str] | None = None,
    tls_key: str | os.PathLike[str] | None = None,
    start_serving: bool = True,
) -> asyncio.AbstractServer:
    """Listen for SMTP (or LMTP) on the running loop; close the returned server to stop.

    aiosmtpd builds one protocol object per connection, and without ``hostname`` each one
    calls ``socket.getfqdn()`` (a blocking DNS lookup that hangs where DNS is broken), so the
    hostname is required. ``max_message_size`` becomes aiosmtpd's ``data_size_limit``: 552
    for ``MAIL FROM ... SIZE=`` over it and for DATA over it (counted in bytes on the wire,
    dot-stuffing and CRLFs included); 0 or less means no limit. ``ident`` replaces the
    default banner, which would announce the aiosmtpd version. ``timeout`` is how long a
    client may stay silent (421 after it); ``max_connections`` and ``max_connections_per_ip``
    (0: none) cap the open connections (421 over them). With ``tls_cert`` and ``tls_key``
    STARTTLS is offered (never required: port 25 must take mail in the clear too).
    With ``start_serving=False`` the port is bound (an address in use fails here) but
    connections wait until ``await server.start_serving()``.
    """
    if not hostname:
        raise ValueError("start_server needs the hostname to announce (no DNS lookups)")
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("STARTTLS needs both tls_cert and tls_key")
    loop = asyncio.get_running_loop()
    cls = MailflowLMTP if lmtp else MailflowSMTP
    limit = max_message_size if max_message_size > 0 else None
    limits = ConnectionLimits(max_connections, max_connections_per_ip)
    tls = TlsFiles(Path(tls_cert), Path(tls_key)) if tls_cert and tls_key else None
    _raise_fd_limit(max_connections)

    def factory() -> SMTP:
        return cls(
            handler,
            limits=limits,
            hostname=hostname,
            ident=ident,
            data_size_limit=limit,
            enable_SMTPUTF8=True,  # SMTP's default is False (Controller's is True)
            decode_data=False,  # keep the raw bytes; decoding would drop 8BITMIME
            timeout=timeout,
            tls_context=tls.context() if tls else None,
            require_starttls=False,
            auth_exclude_mechanism=["LOGIN", "PLAIN"],
            loop=loop,
        )

    return await loop.create_server(factory, host, port, start_serving=start_serving)
