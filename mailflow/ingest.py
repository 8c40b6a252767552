"""`mailflow ingest`: one message from an MTA's pipe, through the same spool and pipeline.

The message is spooled (durable) before anything else, then processed at once and its mail
given one delivery attempt, so that when the command exits 0 the work is done. What fails
after the spool stays there for the daemon, and the MTA is told to retry (75): processing is
idempotent, so the retry cannot duplicate anything.
"""
from __future__ import annotations

import asyncio
import logging

from mailflow.core.message import ParsedMessage
from mailflow.errors import SpoolError
from mailflow.mail.parse import ParseError, parse
from mailflow.delivery import deliver
from mailflow.pipeline import Pipeline, recipients_from_headers
from mailflow.site import Site
from mailflow.spool import Envelope

log = logging.getLogger("mailflow.ingest")
EX_OK, EX_NOUSER, EX_TEMPFAIL = 0, 67, 75


def _sender_from_headers(pm: ParsedMessage | None) -> str:
    """No --sender given: the Return-Path an MTA left, else the From address (not the null
    sender, which would wrongly mark a person's mail as automatic)."""
    if pm is None:
        return ""
    rp = pm.header("Return-Path")
    if rp is not None:
        return rp.strip().strip("<>").strip().lower()
    return pm.from_addr


def ingest_bytes(site: Site, raw: bytes, rcpts: list[str], sender: str | None) -> tuple[int, str]:
    from_headers = not rcpts
    pm: ParsedMessage | None = None
    if from_headers or sender is None:
        try:
            pm = parse(raw)
        except ParseError:
            pm = None
    if from_headers:
        rcpts = recipients_from_headers(pm) if pm is not None else []
    if sender is None:
        sender = _sender_from_headers(pm)
    if sender == "<>":
        sender = ""
    s = site.settings
    accepted = [r for r in rcpts
                if site.check_recipient(r).accept]
    if not accepted and from_headers and pm is not None and Pipeline(site).names_us(pm):
        accepted = rcpts  # a catch-all mailbox: our Message-ID or a retyped address names us
    if not accepted:
        return EX_NOUSER, "no recipient is one of ours: " + (", ".join(rcpts) or "(none found)")
    if len(raw) > s.smtp.max_message_size:
        return EX_NOUSER, f"message too large ({len(raw)} bytes, limit {s.smtp.max_message_size})"
    env = Envelope(mail_from=sender, rcpt_tos=accepted, via="ingest",
                   rcpt_from_headers=from_headers)
    spool_id = site.spool.put(raw, env)
    item = site.spool.claim(spool_id)
    if item is None:  # a running daemon took it first: it is safe and will be processed
        return EX_OK, ""
    pipeline = Pipeline(site)
    try:
        result = pipeline.process_item(site.spool, item)
    except Exception as e:  # noqa: BLE001
        if item.attempts + 1 >= s.spool.max_attempts:
            return EX_OK, f"kept for an admin: {e}"
        raise SpoolError(f"processing failed, will retry: {e}") from e
    if result.outbox_ids:
        counts = asyncio.run(deliver(site, result.outbox_ids))
        log.info("delivery: %s", counts)
    return EX_OK, ""
