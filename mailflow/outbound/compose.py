"""Building outgoing messages: headers that cannot be injected into, marks that stop loops.

Text from citizens and authorities (titles, names, file names) ends up in headers; a CR or LF
there would let anyone add a header (Bcc:, say) to mail the site sends, so every header value
is flattened before it is set: not only CR and LF but every character Python's email package
treats as a line break (str.splitlines(): VT, FF, FS, GS, RS, NEL, U+2028, U+2029), which it
would otherwise refuse with a ValueError (an authority's subject with a U+2028 in it must not
stop its reply being forwarded). Addresses are never rewritten: one holding such a character
is refused outright. Automatic mail (confirmations, forwards) says so with
`Auto-Submitted`, so well-behaved responders stay quiet, and every message carries
`X-Auto-Response-Suppress` and our loop header so our own mail is recognised if it comes back.
"""
from __future__ import annotations

import binascii
import io
import re
import secrets
from dataclasses import dataclass, field
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime

from mailflow.core.message import Attachment
from mailflow.store.repository import utcnow

LOOP_HEADER = "X-Mailflow-Loop"
# The stdlib folds a header that does not fit 78 columns by moving its whole value to the next
# line ("Subject:\r\n Freedom of ..."), which readers then show with a leading space. Headers
# are kept to one line instead (flatten() caps them well under RFC 5322's 998).
WIRE = policy.SMTP.clone(max_line_length=998)
# C0 controls and DEL, C1 controls (NEL is U+0085), the Unicode line and paragraph
# separators, and lone surrogates (undecodable bytes that came through surrogateescape).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]+")
_HINT = re.compile(r"[^A-Za-z0-9_-]+")


def flatten(value: str, limit: int = 900) -> str:
    """One safe header line: control characters and line separators become spaces."""
    return _UNSAFE.sub(" ", value).strip()[:limit]


def new_message_id(domain: str, hint: str = "") -> str:
    tag = _HINT.sub("", hint)[:20]
    return f"<mailflow.{tag + '.' if tag else ''}{secrets.token_hex(10)}@{domain}>"


@dataclass
class Outgoing:
    from_addr: str
    to_addr: str
    subject: str
    text: str
    domain: str
    from_name: str = ""
    to_name: str = ""
    reply_to: str | None = None
    in_reply_to: str | None = None
    references: list[str] = field(default_factory=list)
    automatic: bool = False
    attachments: list[Attachment] = field(default_factory=list)
    message_id: str = ""

    def __post_init__(self) -> None:
        if not self.message_id:
            self.message_id = new_message_id(self.domain)


def _address(name: str, addr: str) -> Address:
    if _UNSAFE.search(addr) or "<" in addr or ">" in addr:
        raise ValueError(f"refusing to write mail to or from an unsafe address: {addr!r}")
    local, _, domain = addr.rpartition("@")
    return Address(display_name=flatten(name, 200), username=local, domain=domain)


def build(out: Outgoing) -> bytes:
    """The message as it goes on the wire (CRLF line endings), not yet DKIM-signed."""
    m = EmailMessage(policy=WIRE)
    m["From"] = _address(out.from_name, out.from_addr)
    m["To"] = _address(out.to_name, out.to_addr)
    if out.reply_to:
        m["Reply-To"] = _address(out.from_name, out.reply_to)
    m["Subject"] = flatten(out.subject)
    m["Date"] = format_datetime(utcnow())
    m["Message-ID"] = out.message_id
    if out.in_reply_to:
        m["In-Reply-To"] = flatten(out.in_reply_to)
    refs = [flatten(r) for r in out.references if r]
    if refs:
        m["References"] = " ".join(refs[-20:])
    if out.automatic:
        m["Auto-Submitted"] = "auto-generated"
    m["X-Auto-Response-Suppress"] = "OOF, AutoReply"
    m[LOOP_HEADER] = out.domain
    m.set_content(out.text, charset="utf-8", cte="quoted-printable")
    spliced: list[tuple[bytes, bytes]] = []
    for att in out.attachments:
        maintype, _, subtype = att.content_type.partition("/")
        if not subtype or "/" in subtype or maintype in ("message", "multipart"):
            # A forwarded message or a broken type travels as opaque bytes: safe to re-encode.
            maintype, subtype = "application", "octet-stream"
        name = flatten(att.filename, 200) or "attachment"
        if len(att.data) < _SPLICE_MIN:
            m.add_attachment(att.data, maintype=maintype, subtype=subtype, filename=name)
            continue
        # A big attachment: the stdlib would hold its base64 as a list of lines, a string
        # and the generator's copies (~4x its size); the part is made with a placeholder
        # body and the base64 written straight into the finished message (_splice).
        token = f"mailflow-splice-{secrets.token_hex(16)}"
        m.add_attachment(b"", maintype=maintype, subtype=subtype, filename=name)
        m.get_payload()[-1].set_payload(token + "\n")
        spliced.append((token.encode("ascii") + b"\r\n", att.data))
    wire = m.as_bytes(policy=WIRE)
    return _splice(wire, spliced) if spliced else wire


# Attachments at least this big are base64-encoded by _splice rather than by the stdlib.
_SPLICE_MIN = 256 * 1024
# Bytes per base64 line, as the stdlib's raw_data_manager cuts them for WIRE's line length.
_B64_CHUNK = WIRE.max_line_length // 4 * 3


def _splice(wire: bytes, spliced: list[tuple[bytes, bytes]]) -> bytes:
    """`wire` with each placeholder line replaced by its data in base64, byte for byte what
    `add_attachment(data)` makes (lines of _B64_CHUNK bytes encoded, CRLF after each), built
    in one buffer of the final size: the message is the only full-size copy made."""
    places = []
    at = 0
    for token, data in spliced:
        i = wire.index(token, at)
        places.append((i, token, data))
        at = i + len(token)
    size = len(wire) + sum((len(d) + _B64_CHUNK - 1) // _B64_CHUNK * 2 + (len(d) + 2) // 3 * 4
                           - len(t) for _, t, d in places)
    out = io.BytesIO()
    out.seek(size - 1)
    out.write(b"\0")   # sized once: every write below lands in place
    out.seek(0)
    view = memoryview(wire)
    at = 0
    for i, token, data in places:
        out.write(view[at:i])
        data_view = memoryview(data)
        for j in range(0, len(data), _B64_CHUNK):
            out.write(binascii.b2a_base64(data_view[j:j + _B64_CHUNK], newline=False))
            out.write(b"\r\n")
        at = i + len(token)
    out.write(view[at:])
    assert out.tell() == size
    return out.getvalue()   # the buffer itself, not a copy
