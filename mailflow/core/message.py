"""The values that flow through the pipeline: a parsed message and what was decided about it.

Plain frozen dataclasses so the core can reason about mail without touching a parser, a
socket or a database; `mailflow.mail.parse` is the one place that makes a ParsedMessage.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from datetime import datetime
from enum import Enum


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str
    data: bytes = field(repr=False)

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class ParsedMessage:
    """What mailflow needs from one message. Addresses are lower-cased; names are decoded."""
    message_id: str | None                 # "<id@host>" with angle brackets, or None
    in_reply_to: tuple[str, ...]           # Message-IDs, "<...>" each
    references: tuple[str, ...]
    subject: str
    from_name: str
    from_addr: str                         # "" when there is no usable From
    reply_to: tuple[str, ...]
    to: tuple[str, ...]
    cc: tuple[str, ...]
    date: datetime | None                  # aware, or None when missing/unparseable
    headers: tuple[tuple[str, str], ...]   # every header, in order, value decoded to str
    text: str                              # the readable body: text/plain, else text from HTML
    html: str | None                       # the HTML body as sent (unsanitised), if any
    attachments: tuple[Attachment, ...]
    defects: tuple[str, ...]               # parser defects and caps hit, for the record
    delivered_to: tuple[str, ...] = ()     # Delivered-To, X-Original-To, Envelope-To, in order
    received_for: tuple[str, ...] = ()     # the `for <addr>` clauses of Received headers
    raw_address_text: str = ""             # raw To/Cc/Bcc text, for addresses a parser missed

    def header(self, name: str) -> str | None:
        """First value of a header, case-insensitively."""
        found = self._by_name.get(name.lower())
        return found[0] if found else None

    def header_all(self, name: str) -> list[str]:
        return list(self._by_name.get(name.lower(), ()))

    @cached_property
    def _by_name(self) -> dict[str, tuple[str, ...]]:
        """Every header's values in order, by lower-cased name: classifying and matching ask
        for twenty-odd headers of each message, and a scan of all of them for each was
        ~0.1 ms a message (issue #10)."""
        index: dict[str, list[str]] = {}
        for k, v in self.headers:
            index.setdefault(k.lower(), []).append(v)
        return {k: tuple(v) for k, v in index.items()}


class Kind(str, Enum):
    """What a message is, decided before it is threaded."""
    REPLY = "reply"            # written by a person: forward it, answer it
    AUTO_REPLY = "auto_reply"  # out-of-office and other automatic answers: keep, never answer
    BOUNCE = "bounce"          # a delivery report
    LOOP = "loop"              # mailflow's own mail coming back
    SPAM = "spam"


@dataclass(frozen=True)
class Classification:
    kind: Kind
    reason: str                # human-readable: which header or pattern decided it
    permanent: bool | None = None          # bounces: permanent (5.x.x) or temporary
    failed_recipients: tuple[str, ...] = ()  # bounces: who could not be reached

    @property
    def automatic(self) -> bool:
        return self.kind is not Kind.REPLY
