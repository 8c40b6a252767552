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
from functools import lru_cache
from email import policy, quoprimime
from email.generator import Generator
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
    """The message as it goes on the wire (CRLF line endings), not yet DKIM-signed.

    Byte for byte what the stdlib makes of it (`_build_stdlib`, kept as the reference and
    compared in the tests), written without building an `EmailMessage`: parsing every header
    value back through `email.headerregistry` and running the generator cost ~2.5 ms a
    forward (issue #10). Each header is the stdlib's own rendering (`_header`), except
    plain one-line ASCII values, which it leaves as they are; the addresses and attachment
    headers, which repeat from message to message, are the stdlib's, remembered.
    """
    head = [_address_header("From", out.from_name, out.from_addr),
            _address_header("To", out.to_name, out.to_addr)]
    if out.reply_to:
        head.append(_address_header("Reply-To", out.from_name, out.reply_to))
    head.append(_header("Subject", flatten(out.subject)))
    head.append(_header("Date", format_datetime(utcnow())))
    head.append(_header("Message-ID", out.message_id))
    if out.in_reply_to:
        head.append(_header("In-Reply-To", flatten(out.in_reply_to)))
    refs = [flatten(r) for r in out.references if r]
    if refs:
        head.append(_header("References", " ".join(refs[-20:])))
    if out.automatic:
        head.append(b"Auto-Submitted: auto-generated\r\n")
    head.append(b"X-Auto-Response-Suppress: OOF, AutoReply\r\n")
    head.append(_header(LOOP_HEADER, out.domain))
    text = _quoted_printable(out.text)
    if not out.attachments:
        return b"".join([*head, _TEXT_HEAD, b"MIME-Version: 1.0\r\n\r\n",
                         text.replace("\n", "\r\n").encode("ascii")])
    parts: list[tuple[bytes, bytes | None]] = [
        (_TEXT_HEAD + b"\r\n" + text.replace("\n", "\r\n").encode("ascii"), None)]
    for att in out.attachments:
        maintype, _, subtype = att.content_type.partition("/")
        if not subtype or "/" in subtype or maintype in ("message", "multipart"):
            # A forwarded message or a broken type travels as opaque bytes: safe to re-encode.
            maintype, subtype = "application", "octet-stream"
        name = flatten(att.filename, 200) or "attachment"
        parts.append((_attachment_head(maintype, subtype, name) + b"\r\n", att.data))
    # The generator's boundary, drawn as it draws it; only the text part can hold a line
    # like it (base64 has no "-", the part headers are ours).
    boundary = Generator._make_boundary(text).encode("ascii")
    head.append(b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\""
                + boundary + b"\"\r\n\r\n")
    return _assemble(b"".join(head), boundary, parts)


def _assemble(head: bytes, boundary: bytes, parts: list[tuple[bytes, bytes | None]]) -> bytes:
    """The multipart message in one buffer of its final size, base64 written in place: the
    message is the only full-size copy made of a big attachment (see _splice)."""
    sep = b"\r\n--" + boundary + b"\r\n"
    size = len(head) + len(boundary) + 4 + len(sep) * (len(parts) - 1) + len(boundary) + 8
    for part_head, data in parts:
        size += len(part_head)
        if data is not None:
            size += _b64_size(len(data))
    buf = io.BytesIO()
    buf.seek(size - 1)
    buf.write(b"\0")   # sized once: every write below lands in place
    buf.seek(0)
    buf.write(head)
    buf.write(b"--" + boundary + b"\r\n")
    for i, (part_head, data) in enumerate(parts):
        if i:
            buf.write(sep)
        buf.write(part_head)
        if data is not None:
            view = memoryview(data)
            for j in range(0, len(data), _B64_CHUNK):
                buf.write(binascii.b2a_base64(view[j:j + _B64_CHUNK], newline=False))
                buf.write(b"\r\n")
    buf.write(b"\r\n--" + boundary + b"--\r\n")
    assert buf.tell() == size
    return buf.getvalue()


def _b64_size(n: int) -> int:
    return (n + _B64_CHUNK - 1) // _B64_CHUNK * 2 + (n + 2) // 3 * 4


_TEXT_HEAD = (b'Content-Type: text/plain; charset="utf-8"\r\n'
              b"Content-Transfer-Encoding: quoted-printable\r\n")
# A header value the stdlib writes unchanged: printable ASCII words separated by single
# spaces, no encoded-word ("=?") for it to decode and encode again, on one line.
_PLAIN = re.compile(r"[!-~]+(?: [!-~]+)*")


def _header(name: str, value: str) -> bytes:
    """The header line as the stdlib writes it with WIRE (folded, encoded, CRLF)."""
    if (len(name) + 2 + len(value) <= WIRE.max_line_length and "=?" not in value
            and _PLAIN.fullmatch(value)):
        return f"{name}: {value}\r\n".encode("ascii")
    return WIRE.fold_binary(*WIRE.header_store_parse(name, value))


@lru_cache(maxsize=4096)
def _address_header(name: str, display_name: str, addr: str) -> bytes:
    """From, To, Reply-To: the same few per thread, so the stdlib's rendering is kept."""
    return WIRE.fold_binary(*WIRE.header_store_parse(name, _address(display_name, addr)))


@lru_cache(maxsize=1024)
def _attachment_head(maintype: str, subtype: str, filename: str) -> bytes:
    """The header block `add_attachment` gives such a part (what it writes does not depend
    on the data: base64 always), taken from the stdlib once."""
    part = EmailMessage(policy=WIRE)
    part.set_content(b"", maintype=maintype, subtype=subtype, filename=filename,
                     disposition="attachment")
    return part.as_bytes(policy=WIRE).partition(b"\r\n\r\n")[0] + b"\r\n"


def _quoted_printable(text: str) -> str:
    """The text part's body as `set_content(text, cte="quoted-printable")` encodes it
    (lines joined with LF; the caller makes them CRLF, as the generator does)."""
    lines = text.encode("utf-8").splitlines()
    return quoprimime.body_encode((b"\n".join(lines) + b"\n").decode("latin-1"),
                                  WIRE.max_line_length)


def _build_stdlib(out: Outgoing) -> bytes:
    """`build` as the stdlib's EmailMessage makes it: the reference the tests compare with."""
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
