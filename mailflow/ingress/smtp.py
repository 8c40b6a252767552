"""SMTP and LMTP ingress: decide recipients, spool the message, say 250 only when it is safe.

The handler does as little as possible while a client waits: it asks the daemon whether a
recipient is ours and writes the raw bytes to the spool. Everything else (parsing, matching)
happens after the 250, from the spool, where a crash costs nothing.

Two rules shape it. A reply the authority's server sees as permanent (5xx) bounces their answer
to a citizen's request, so an internal failure must never produce one: every exception becomes
``451 4.3.0`` (aiosmtpd itself would answer ``500`` with the exception text, leaking
internals). And 250 is a promise: it is sent only after the spool has fsynced the message.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP
from aiosmtpd.smtp import Envelope as SmtpEnvelope
from aiosmtpd.smtp import Session as SmtpSession

from mailflow.spool import Envelope, Spool

log = logging.getLogger(__name__)

LOCAL_ERROR = "451 4.3.0 Requested action aborted: local error, try again later"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
RCPT_OK = "250 2.1.5 Ok"
IDLE_TIMEOUT = 300.0
"""RFC 5321 4.5.3.2.7 asks servers to wait 5 minutes for a command before giving up."""

_REFUSAL = re.compile(r"^[45][0-9][0-9] [^\r\n]*$")


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
) -> asyncio.AbstractServer:
    """Listen for SMTP (or LMTP) on the running loop; close the returned server to stop.

    aiosmtpd builds one protocol object per connection, and without ``hostname`` each one
    calls ``socket.getfqdn()`` (a blocking DNS lookup that hangs where DNS is broken), so the
    hostname is required. ``max_message_size`` becomes aiosmtpd's ``data_size_limit``: 552
    for ``MAIL FROM ... SIZE=`` over it and for DATA over it (counted in bytes on the wire,
    dot-stuffing and CRLFs included); 0 or less means no limit. ``ident`` replaces the
    default banner, which would announce the aiosmtpd version.
    """
    if not hostname:
        raise ValueError("start_server needs the hostname to announce (no DNS lookups)")
    loop = asyncio.get_running_loop()
    cls = LMTP if lmtp else SMTP
    limit = max_message_size if max_message_size > 0 else None

    def factory() -> SMTP:
        return cls(
            handler,
            hostname=hostname,
            ident=ident,
            data_size_limit=limit,
            enable_SMTPUTF8=True,  # SMTP's default is False (Controller's is True)
            decode_data=False,  # keep the raw bytes; decoding would drop 8BITMIME
            timeout=timeout,
            loop=loop,
        )

    return await loop.create_server(factory, host, port)
