"""Raw bytes → ParsedMessage, without ever letting hostile mail crash or stall the pipeline.

The standard `email` package (`policy.default`) is the parser of record. It has two failure
modes that matter to a daemon reading mail from strangers: deep MIME nesting makes it recurse
until `RecursionError` (and same-boundary nesting makes `get_content()` raise `KeyError`), and
its structured header parser is super-linear (40,000 addresses in one To: take ~25 s). So
before the stdlib sees a message, a cheap line scanner with an explicit stack measures part
count, nesting depth and header sizes; where a cap is hit, the message is cut at that point and
a "cap: ..." defect is recorded, so whatever came before (headers, first text) is still used.

mail-parser is deliberately not used here: what it adds for us (the `for <addr>` clauses of
Received headers) is one regex, while it re-parses with compat32, recurses on deep nesting and
returns attachments as base64 strings.
"""
from __future__ import annotations

import base64
import binascii
import codecs
import html as html_lib
import inspect
import mimetypes
import quopri
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from email import policy as email_policy
from email import utils as email_utils
from email.message import Message
from email.parser import BytesParser
from html.parser import HTMLParser
from collections.abc import Iterator
from typing import Any

from mailflow.core.message import Attachment, ParsedMessage

__all__ = ["Limits", "ParseError", "parse"]


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 50 * 1024 * 1024
    max_parts: int = 500
    max_depth: int = 20
    max_header_bytes: int = 1024 * 1024


class ParseError(Exception):
    """Nothing usable could be extracted: the caller should queue the raw bytes for a human."""


# The stdlib's structured header parser is super-linear; above these sizes we decode by hand.
_STRUCTURED_MAX = 16 * 1024          # a header value parsed with policy.default's registry
_FIELD_MAX = 256 * 1024              # any single header field is truncated to this
_PART_HEADER_MAX = 64 * 1024         # a MIME part's header block
_MAX_HEADER_FIELDS = 1000            # top-level fields decoded (real mail has < 200)
_POLICY = email_policy.default

_LINE = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")
# The stdlib feedparser's notion of a header line (email.feedparser.headerRE).
_HEADER_LINE = re.compile(rb"From |[\041-\071\073-\176]*:|[\t ]")
_CT_FIELD = re.compile(rb"content-type[ \t]*:", re.I)
_CT_VALUE = re.compile(rb"content-type[ \t]*:\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)\s*/\s*"
                       rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+)", re.I)
_BOUNDARY = re.compile(rb"""boundary\s*(?:\*\s*)?(?:0\s*\*?\s*)?=\s*(?:"([^"\r\n]*)"|([^\s;"]+))""",
                       re.I)

_LEADING_BLANK = re.compile(rb"(?:[ \t]*(?:\r\n|\r|\n))+")
_ANGLE_ID = re.compile(r"<([^<>]*)>")
_ADDRISH = re.compile(r"[^\s<>,;:\"'()\[\]]+@[^\s<>,;:\"'()\[\]]+")
_RECEIVED_FOR = re.compile(r"\bfor\s+<?\s*([^\s<>;,\"]+@[^\s<>;,\"]+?)\s*>?(?=[\s;,]|$)", re.I)
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")
_EW_CHARSET = re.compile(r"=\?([^?\s*]+)((?:\*[^?\s]*)?\?[bBqQ]\?)")
_EW_GAP = re.compile(r"(\?=)\s+(=\?)")
_SURROGATES = re.compile("[\ud800-\udfff]")
_FOLD = re.compile(r"[ \t]*(?:\r\n|\r|\n)[ \t]*|\t")

_ADDRESS_HEADERS = ("to", "cc", "bcc")

# Labels seen in real mail that Python does not know, or knows under a narrower codec.
_CHARSET_ALIASES = {
    "ks_c_5601-1987": "cp949", "ks_c_5601": "cp949", "ks_c_5601-1989": "cp949",
    "iso-8859-8-i": "iso-8859-8", "iso-8859-8-e": "iso-8859-8", "iso-8859-6-i": "iso-8859-6",
    "x-mac-cyrillic": "mac_cyrillic", "x-mac-roman": "mac_roman", "macintosh": "mac_roman",
    "unicode-1-1-utf-7": "utf-7", "x-unicode-2-0-utf-7": "utf-7",
    "gb2312": "gb18030", "gbk": "gb18030", "x-gbk": "gb18030", "cp936": "gb18030",
    "hz-gb-2312": "hz", "x-sjis": "shift_jis", "shift-jis": "shift_jis", "windows-31j": "cp932",
    "windows-874": "cp874", "x-user-defined": "cp1252", "iso-8859-1": "cp1252",
    "latin1": "cp1252", "latin-1": "cp1252", "us-ascii": "ascii", "ansi_x3.4-1968": "ascii",
    "utf8": "utf-8", "x-euc-jp": "euc_jp", "x-euc-kr": "euc_kr",
}
# Codecs that are "text encodings" to Python but are not mail charsets (and some are slow).
_REFUSED_CODECS = frozenset({"punycode", "idna", "unicode-escape", "raw-unicode-escape",
                             "undefined", "unicode-internal", "palmos"})

_HAS_STRICT_GETADDRESSES = "strict" in inspect.signature(email_utils.getaddresses).parameters


# ---------------------------------------------------------------------------- decoding helpers

def _codec(charset: str | None) -> str | None:
    """A Python codec for a declared charset, or None when unknown or unsuitable."""
    if not charset:
        return None
    label = charset.strip().strip("\"'").lower()
    if not label or len(label) > 64:
        return None
    label = _CHARSET_ALIASES.get(label, label)
    try:
        name = codecs.lookup(label).name
    except (LookupError, ValueError, TypeError):
        return None
    if name in _REFUSED_CODECS or not getattr(codecs.lookup(name), "_is_text_encoding", True):
        return None
    return name


def decode_bytes(data: bytes, charset: str | None) -> str:
    """Declared charset if it fits, else UTF-8, else cp1252 with replacement: never raises."""
    codec = _codec(charset)
    if codec is not None:
        try:
            return data.decode(codec)
        except Exception:
            pass
        if data.isascii() and codec not in ("ascii", "utf-8"):
            # 7-bit charsets (ISO-2022-*, UTF-7) with one bad sequence: UTF-8 would "succeed"
            # and show the escape codes, so keep the declared charset and lose one character.
            try:
                return data.decode(codec, errors="replace")
            except Exception:
                pass
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    if codec is not None and codec not in ("ascii", "utf-8"):
        try:
            return data.decode(codec, errors="replace")
        except Exception:
            pass
    return data.decode("cp1252", errors="replace")


def _unsurrogate(value: str, hint: str | None = None) -> tuple[str, bool]:
    """Raw 8-bit header bytes arrive as surrogate escapes: decode them as UTF-8 (RFC 6532) or
    the body's charset, rather than letting the stdlib turn each byte into U+FFFD."""
    if not _SURROGATES.search(value):
        return value, False
    raw = value.encode("utf-8", "surrogateescape")
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return decode_bytes(raw, hint), True


def _decode_encoded_word(charset: str, enc: str, text: str) -> str:
    try:
        if enc in "bB":
            raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=False)
        else:
            raw = quopri.decodestring(text.replace("_", " ").encode("ascii", "replace"),
                                      header=True)
    except (binascii.Error, ValueError):
        return text
    return decode_bytes(raw, charset.split("*", 1)[0])


def light_decode(value: str) -> str:
    """Linear-time header decoding for values too big (or too broken) for the registry."""
    value = _EW_GAP.sub(r"\1\2", value)
    return _ENCODED_WORD.sub(lambda m: _decode_encoded_word(m.group(1), m.group(2), m.group(3)),
                             value)


def _normalise_ew_charsets(value: str) -> str:
    """Rename charsets in encoded-words to codecs Python has ("iso-8859-8-i", "ks_c_5601-1987"),
    so the stdlib decodes them instead of leaving U+FFFD."""
    def fix(m: re.Match[str]) -> str:
        codec = _codec(m.group(1))
        return f"=?{codec}{m.group(2)}" if codec else m.group(0)
    return _EW_CHARSET.sub(fix, value)


def _unfold(value: str) -> str:
    return _FOLD.sub(" ", value).strip()


def _clean(value: str) -> str:
    """No lone surrogates may leave this module: they break every encoder downstream."""
    return _SURROGATES.sub("\ufffd", value)


# ------------------------------------------------------------------------------ HTML → text

class _HTMLText(HTMLParser):
    _SKIP = frozenset({"script", "style", "title", "template"})
    _PARA = frozenset({"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "table",
                       "ul", "ol", "pre", "section", "article", "header", "footer", "address",
                       "form", "fieldset", "dl", "center"})
    _LINE = frozenset({"br", "li", "tr", "hr", "dt", "dd", "caption"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip = 0
        self.pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self.skip += 1
        elif tag in self._PARA:
            self.out.append("\n\n")
            if tag == "pre":
                self.pre += 1
        elif tag in self._LINE:
            self.out.append("\n")
        elif tag in ("td", "th"):
            self.out.append(" ")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._LINE or tag in self._PARA:
            self.out.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in self._PARA:
            self.out.append("\n\n")
            if tag == "pre":
                self.pre = max(0, self.pre - 1)
        elif tag in ("li", "tr"):
            self.out.append("\n")

    def handle_data(self, data: str) -> None:
        if self.skip:
            return
        self.out.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_to_text(markup: str) -> str:
    """Plain text a person would read in the rendered HTML; tolerant of any markup."""
    parser = _HTMLText()
    try:
        parser.feed(markup)
        parser.close()
        text = "".join(parser.out)
    except Exception:  # html.parser raises AssertionError on some marked sections
        text = "".join(parser.out) or html_lib.unescape(re.sub(r"<[^>]*>", " ", markup))
    lines = [line.strip() for line in text.replace("\xa0", " ").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


# ------------------------------------------------------------------------- pre-parse caps

def _lines(raw: bytes, start: int = 0) -> Iterator[re.Match[bytes]]:
    return _LINE.finditer(raw, start)


def _split_fields(lines: list[bytes]) -> list[list[bytes]]:
    fields: list[list[bytes]] = []
    for line in lines:
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1].append(line)
        else:
            fields.append([line])
    return fields


def _field_name(field: list[bytes]) -> str:
    return field[0].split(b":", 1)[0].strip().decode("ascii", "replace")[:60]


def _cap_top_headers(raw: bytes, limits: Limits, defects: list[str]) -> bytes:
    """Bound the top-level header block: huge fields are what make the stdlib slow."""
    header_lines: list[bytes] = []
    end = 0
    separator = b""
    for m in _lines(raw):
        line = m.group()
        if line in (b"\r\n", b"\n", b"\r"):
            separator = line
            end = m.end()
            break
        if not _HEADER_LINE.match(line):
            end = m.start()
            break
        header_lines.append(line)
        end = m.end()
    header_size = sum(map(len, header_lines))
    if header_size <= min(_STRUCTURED_MAX, limits.max_header_bytes):
        return raw  # fast path: no field can be over any cap
    kept: list[bytes] = []
    total = 0
    dropped = 0
    changed = False
    fields = _split_fields(header_lines)
    if len(fields) > _MAX_HEADER_FIELDS:
        defects.append(f"cap: more than {_MAX_HEADER_FIELDS} header fields, "
                       f"{len(fields) - _MAX_HEADER_FIELDS} dropped")
        fields = fields[:_MAX_HEADER_FIELDS]
        changed = True
    for field in fields:
        size = sum(map(len, field))
        name = _field_name(field)
        if name.lower().startswith("content-") and size > _STRUCTURED_MAX:
            defects.append(f"cap: {name} header over {_STRUCTURED_MAX} bytes, dropped")
            changed = True
            continue
        data = b"".join(field)
        if size > _FIELD_MAX:
            cut = data[:_FIELD_MAX]
            at = max(cut.rfind(b","), cut.rfind(b"\n"))
            cut = cut[:at] if at > len(field[0]) // 2 else cut
            data = cut.rstrip(b"\r\n") + b"\r\n"
            defects.append(f"cap: {name} header over {_FIELD_MAX} bytes, truncated")
            changed = True
        if total + len(data) > limits.max_header_bytes:
            dropped += 1
            changed = True
            continue
        total += len(data)
        kept.append(data)
    if dropped:
        defects.append(f"cap: header block over {limits.max_header_bytes} bytes, "
                       f"{dropped} field(s) dropped")
    if not changed:
        return raw
    return b"".join(kept) + (separator or b"\r\n") + raw[end:]


def _scan_structure(raw: bytes, limits: Limits, defects: list[str]) -> bytes:
    """Walk the MIME structure with an explicit stack, the way the stdlib's feedparser
    would, and cut the message where it first exceeds a cap so the stdlib never recurses
    past it. Over-counting (a "boundary=" the stdlib would ignore) only makes us stricter."""
    stack: list[bytes | None] = []   # boundaries of open multiparts; None = a nested message
    parts = 1
    in_header = True
    header: list[bytes] = []
    header_size = 0
    entity_start = 0                 # where the entity whose header we are reading begins
    top = True

    def cut(offset: int, why: str) -> bytes:
        defects.append(why)
        return raw[:offset]

    for m in _lines(raw):
        line = m.group()
        if in_header:
            if line not in (b"\r\n", b"\n", b"\r") and _HEADER_LINE.match(line):
                header.append(line)
                header_size += len(line)
                if not top and header_size > _PART_HEADER_MAX:
                    return cut(entity_start, f"cap: part header over {_PART_HEADER_MAX} bytes")
                continue
            # End of this entity's header block: decide what its body is.
            ctype = b""
            boundary: bytes | None = None
            for field in _split_fields(header):
                if _CT_FIELD.match(field[0]):
                    data = b"".join(field)
                    if not top and len(data) > _STRUCTURED_MAX:
                        return cut(entity_start, f"cap: part Content-Type over {_STRUCTURED_MAX} bytes")
                    ct = _CT_VALUE.match(data)
                    if ct:
                        ctype = (ct.group(1) + b"/" + ct.group(2)).lower()
                    b = _BOUNDARY.search(data)
                    if b:
                        boundary = (b.group(1) if b.group(1) is not None else b.group(2)).rstrip()
                    break
            if not top and any(len(b"".join(f)) > _STRUCTURED_MAX for f in _split_fields(header)
                               if f[0][:8].lower() == b"content-"):
                return cut(entity_start, f"cap: part header field over {_STRUCTURED_MAX} bytes")
            top = False
            header = []
            header_size = 0
            in_header = False
            is_blank = line in (b"\r\n", b"\n", b"\r")
            if ctype.startswith(b"multipart/") and boundary:
                stack.append(boundary)
            elif ctype.startswith(b"message/") and ctype != b"message/delivery-status":
                stack.append(None)
                parts += 1
                if parts > limits.max_parts:
                    return cut(entity_start, f"cap: more than {limits.max_parts} parts")
                in_header = True
                if not is_blank:
                    header.append(line)
                    header_size = len(line)
            if len(stack) + 1 > limits.max_depth:
                return cut(entity_start, f"cap: nesting deeper than {limits.max_depth}")
            if in_header:
                entity_start = m.start() if not is_blank else m.end()
            elif not stack:
                return raw   # a single-part body: nothing further can nest
            continue
        if not stack:
            return raw       # epilogue after the outermost closing boundary
        if not line.startswith(b"--"):
            continue
        stripped = line.rstrip(b" \t\r\n")
        for idx in range(len(stack) - 1, -1, -1):
            b = stack[idx]
            if b is None:
                continue
            if stripped == b"--" + b + b"--":
                del stack[idx:]
                break
            if stripped == b"--" + b:
                del stack[idx + 1:]
                parts += 1
                if parts > limits.max_parts:
                    return cut(m.start(), f"cap: more than {limits.max_parts} parts")
                in_header = True
                entity_start = m.start()
                break
    return raw


# ---------------------------------------------------------------------------- header fields

@dataclass
class _Header:
    name: str
    raw: str        # as received, unfolded is not applied; 8-bit already decoded
    value: str      # decoded for people
    obj: Any        # the policy.default header object, or None when we decoded by hand


def _decode_header(name: str, raw_value: str, hint: str | None, defects: list[str]) -> _Header:
    value, guessed = _unsurrogate(raw_value, hint)
    if guessed:
        defects.append(f"8bit-header: {name[:60]} was not UTF-8")
    obj = None
    decoded = None
    if len(value) <= _STRUCTURED_MAX:
        try:
            obj = _POLICY.header_factory(name, _unfold(_normalise_ew_charsets(value)))
            decoded = str(obj)
            if "=?" in decoded and _ENCODED_WORD.search(decoded):
                decoded = light_decode(decoded)  # an encoded-word the stdlib gave up on
            defects.extend(type(d).__name__ for d in obj.defects)
        except Exception as exc:  # the registry has had IndexError/AttributeError bugs
            defects.append(f"header-parse: {name[:60]}: {type(exc).__name__}")
            obj = None
    if decoded is None:
        try:
            decoded = light_decode(_unfold(value))
        except Exception:
            decoded = _unfold(value)
    return _Header(name, value, _clean(decoded), obj)


def _addresses(h: _Header) -> tuple[list[tuple[str, str]], bool]:
    """(display name, lower-cased address) pairs and whether the parse looks trustworthy."""
    pairs: list[tuple[str, str]] = []
    ok = True
    if h.obj is not None and hasattr(h.obj, "addresses"):
        try:
            for a in h.obj.addresses:
                pairs.append((_clean(a.display_name or ""), _clean(a.addr_spec or "").lower()))
            if any(type(d).__name__ == "InvalidHeaderDefect" for d in h.obj.defects):
                ok = False
        except Exception:
            pairs, ok = [], False
    else:
        ok = False
        try:
            for name, addr in email_utils.getaddresses([light_decode(_unfold(h.raw))]):
                if addr:
                    pairs.append((_clean(name), _clean(addr).lower()))
        except Exception:
            pairs = []
    good = [(n, a) for n, a in pairs if "@" in a and not a.startswith("@") and not a.endswith("@")]
    if len(good) != len(pairs) or h.raw.count("@") > len(good):
        ok = False
    return good, ok


def _one_from(h: _Header) -> tuple[str, str] | None:
    """(name, address) from one From header; ("", "") when it names nobody; None when two
    parsers read it differently, the CVE-2023-27043 pattern where a filter and the archive
    would disagree about who wrote."""
    pairs, _ = _addresses(h)
    unfolded = _unfold(h.raw)
    try:
        if _HAS_STRICT_GETADDRESSES:
            other = email_utils.getaddresses([unfolded], strict=True)  # type: ignore[call-arg]
        else:
            other = email_utils.getaddresses([unfolded])
        other_addrs = [a.lower() for _, a in other if "@" in a]
    except Exception:
        other_addrs = []
    if not pairs and not other_addrs:
        return "", ""
    if len(pairs) != 1 or len(other_addrs) > 1 or (other_addrs and other_addrs[0] != pairs[0][1]):
        return None
    return _unfold(pairs[0][0]), pairs[0][1]


def _from_address(headers: list[_Header], defects: list[str]) -> tuple[str, str]:
    """One unambiguous sender or nothing."""
    found = [_one_from(h) for h in headers if h.name.lower() == "from"]
    if None in found:
        defects.append("ambiguous From: several addresses or parsers disagree")
        return "", ""
    usable = {addr: name for name, addr in found if addr}  # type: ignore[misc]
    if len(found) > 1:
        defects.append(f"duplicate From: {len(found)} From headers")
    if len(usable) > 1:
        defects.append(f"ambiguous From: {len(usable)} different addresses")
        return "", ""
    if not usable:
        return "", ""
    addr, name = next(iter(usable.items()))
    return name, addr


def _ids(value: str) -> tuple[str, ...]:
    found = []
    for m in _ANGLE_ID.finditer(value):
        inner = re.sub(r"\s+", "", m.group(1))
        if inner:
            found.append(f"<{inner}>")
    return tuple(found)


def _message_id(value: str | None) -> str | None:
    if value is None:
        return None
    ids = _ids(value)
    if ids:
        return ids[0]
    inner = re.sub(r"\s+", "", value)
    return f"<{inner}>" if inner else None


def _dedupe(items: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


# ------------------------------------------------------------------------------ body walk

def _part_header(part: Message, name: str, hint: str | None) -> Any:
    """A part's structured header, from its raw text (so 8-bit filenames survive)."""
    low = name.lower()
    for k, v in part.raw_items():
        if k.lower() == low:
            value, _ = _unsurrogate(v, hint)
            if len(value) > _STRUCTURED_MAX:
                return None
            try:
                return _POLICY.header_factory(name, _unfold(value))
            except Exception:
                return None
    return None


def _raw_param(part: Message, header: str, param: str, hint: str | None) -> str | None:
    """A parameter read straight from the header text, for what RFC-strict parsing drops:
    unquoted names with spaces (`name=This is a test.txt`) and bare encoded-words."""
    low = header.lower()
    for k, v in part.raw_items():
        if k.lower() == low:
            value, _ = _unsurrogate(v, hint)
            m = re.search(rf"(?:^|;)\s*{param}\s*=\s*(?:\"([^\"]*)\"|([^;\r\n]+))",
                          _unfold(value[:_STRUCTURED_MAX]), re.I)
            if m:
                return (m.group(1) if m.group(1) is not None else m.group(2)).strip()
    return None


def _filename(part: Message, hint: str | None) -> str | None:
    name = None
    for header, param in (("Content-Disposition", "filename"), ("Content-Type", "name")):
        obj = _part_header(part, header, hint)
        params = getattr(obj, "params", None)
        value = None
        if params:
            try:
                value = params.get(param)
            except Exception:
                value = None
        raw = _raw_param(part, header, param, hint)
        if raw and "''" not in raw and (not value or (raw.startswith(str(value)) and len(raw) > len(str(value)))):
            value = raw
        if value:
            name = str(value)
            break
    if not name:
        return None
    if "=?" in name:
        try:
            name = light_decode(name)
        except Exception:
            pass
    # A name is a label, never a path: "../../etc/passwd" must not reach a file system.
    name = re.split(r"[/\\]", _clean(name))[-1]
    name = re.sub(r"[\x00-\x1f\x7f]", "", name).strip().lstrip(".").strip()
    return name[:255] or None


def _payload_bytes(part: Message) -> bytes:
    data = part.get_payload(decode=True)
    if isinstance(data, bytes):
        return data
    payload = part.get_payload()
    if isinstance(payload, str):
        return payload.encode("utf-8", "surrogateescape")
    return b""


def _message_bytes(part: Message) -> bytes:
    """A message/* part as bytes: the stdlib has already split it into sub-messages."""
    payload = part.get_payload()
    if isinstance(payload, str):
        return payload.encode("utf-8", "surrogateescape")
    if not isinstance(payload, list):
        return b""
    if part.get_content_type() == "message/delivery-status":
        blocks = ["\n".join(f"{k}: {v}" for k, v in block.raw_items()) for block in payload
                  if isinstance(block, Message)]
        return ("\n\n".join(blocks) + "\n").encode("utf-8", "surrogateescape")
    chunks = []
    for inner in payload:
        if not isinstance(inner, Message):
            continue
        try:
            chunks.append(inner.as_bytes(policy=email_policy.compat32))
        except Exception:
            try:
                chunks.append(inner.as_string(policy=email_policy.compat32)
                              .encode("utf-8", "surrogateescape"))
            except Exception:
                pass
    return b"".join(chunks)


def _extension(content_type: str) -> str:
    if content_type == "message/rfc822":
        return "eml"
    ext = mimetypes.guess_extension(content_type, strict=False)
    if ext:
        return ext.lstrip(".")
    return "txt" if content_type.split("/")[0] in ("text", "message") else "bin"


@dataclass
class _Body:
    plain: list[str]
    htmls: list[str]
    attachments: list[Attachment]


def _walk(root: Message, limits: Limits, hint: str | None, defects: list[str]) -> _Body:
    body = _Body([], [], [])
    stack: list[tuple[Message, int]] = [(root, 1)]
    seen = 0
    while stack:
        part, depth = stack.pop()
        seen += 1
        if seen > limits.max_parts:
            defects.append(f"cap: more than {limits.max_parts} parts")
            break
        try:
            defects.extend(type(d).__name__ for d in part.defects)
            ctype = part.get_content_type()
            if ctype.startswith("multipart/") and not part.is_multipart():
                # No usable boundary: the stdlib keeps the body as one string. Read it as text
                # rather than hide it (bounces with broken MIME still say who failed).
                text = decode_bytes(_payload_bytes(part), None)
                body.plain.append(_clean(text.replace("\r\n", "\n").replace("\r", "\n")))
                continue
            if part.is_multipart() and ctype.startswith("multipart/"):
                if depth >= limits.max_depth:
                    defects.append(f"cap: nesting deeper than {limits.max_depth}")
                    continue
                children = [c for c in part.get_payload() if isinstance(c, Message)]
                stack.extend((c, depth + 1) for c in reversed(children))
                continue
            filename = _filename(part, hint)
            if ctype.startswith("message/"):
                data = _message_bytes(part)
            else:
                data = _payload_bytes(part)
            disposition = part.get_content_disposition()
            if ctype in ("text/plain", "text/html") and not filename and disposition != "attachment":
                charset = part.get_param("charset")
                text = decode_bytes(data, charset if isinstance(charset, str) else None)
                text = _clean(text.replace("\r\n", "\n").replace("\r", "\n"))
                (body.plain if ctype == "text/plain" else body.htmls).append(text)
                continue
            n = len(body.attachments) + 1
            body.attachments.append(Attachment(
                filename=filename or f"attachment-{n}.{_extension(ctype)}",
                content_type=ctype, data=data))
        except Exception as exc:  # one bad part must not cost us the rest
            defects.append(f"part-error: {type(exc).__name__}")
    return body


# ---------------------------------------------------------------------------------- parse

def _body_charset_hint(raw_items: list[tuple[str, str]], raw: bytes) -> str | None:
    """The charset to try on raw 8-bit headers: senders that put 8-bit bytes in headers
    write them in the same charset as the body (the top level's, else the first part's)."""
    for k, v in raw_items:
        if k.lower() == "content-type":
            m = re.search(r"charset\s*=\s*\"?([A-Za-z0-9_.:+-]+)", v, re.I)
            if m:
                return m.group(1)
            break
    m = re.search(rb"charset\s*=\s*\"?([A-Za-z0-9_.:+-]+)", raw[:64 * 1024], re.I)
    return m.group(1).decode("ascii") if m else None


def parse(raw: bytes, limits: Limits = Limits()) -> ParsedMessage:
    """Parse a raw message. Never raises anything but ParseError, and only when not even a
    header could be read; every cap hit or broken part is recorded in `defects` instead."""
    try:
        return _parse(raw, limits)
    except ParseError:
        raise
    except (RecursionError, MemoryError) as exc:
        raise ParseError(f"unparseable: {type(exc).__name__}") from None
    except Exception as exc:  # a bug here must reach the queue as ParseError, not kill the daemon
        raise ParseError(f"unparseable: {type(exc).__name__}: {exc}") from None


def _parse(raw: bytes, limits: Limits) -> ParsedMessage:
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise ParseError(f"expected bytes, got {type(raw).__name__}")
    raw = bytes(raw)
    defects: list[str] = []
    if len(raw) > limits.max_bytes:
        defects.append(f"cap: message over {limits.max_bytes} bytes, truncated")
        raw = raw[:limits.max_bytes]
    lead = _LEADING_BLANK.match(raw)
    if lead:  # seen in real bounces; the stdlib would take every header for body text
        defects.append("leading blank lines")
        raw = raw[lead.end():]
    raw = _cap_top_headers(raw, limits, defects)
    raw = _scan_structure(raw, limits, defects)

    msg: Message | None
    try:
        msg = BytesParser(policy=_POLICY).parsebytes(raw)
    except Exception as exc:  # the scan should prevent this; if not, fall back to headers
        defects.append(f"parse-failed: {type(exc).__name__}")
        msg = None
    if msg is None:
        try:
            msg = BytesParser(policy=_POLICY).parsebytes(raw, headersonly=True)
        except Exception as exc:
            raise ParseError(f"headers unreadable: {type(exc).__name__}") from None

    raw_items = list(msg.raw_items())
    if not raw_items:
        raise ParseError("no header fields found")
    hint = _body_charset_hint(raw_items, raw)
    headers = [_decode_header(k, v, hint, defects) for k, v in raw_items]

    def first(name: str) -> _Header | None:
        low = name.lower()
        return next((h for h in headers if h.name.lower() == low), None)

    def all_of(name: str) -> list[_Header]:
        low = name.lower()
        return [h for h in headers if h.name.lower() == low]

    from_name, from_addr = _from_address(headers, defects)

    raw_addr_chunks: list[str] = []
    address_lists: dict[str, list[str]] = {}
    for name in ("to", "cc", "bcc", "reply-to"):
        found: list[str] = []
        for h in all_of(name):
            pairs, ok = _addresses(h)
            found.extend(a for _, a in pairs)
            if not ok and name in _ADDRESS_HEADERS:
                raw_addr_chunks.append(f"{h.name}: {_clean(_unfold(h.raw))}")
        address_lists[name] = found

    date = None
    dh = first("date")
    if dh is not None and dh.obj is not None:
        date = getattr(dh.obj, "datetime", None)
        if isinstance(date, datetime) and date.tzinfo is None:
            date = date.replace(tzinfo=timezone.utc)   # "-0000": UTC with no claim of locality
        if not isinstance(date, datetime):
            date = None

    mid = first("message-id")
    in_reply_to: list[str] = []
    for h in all_of("in-reply-to"):
        in_reply_to.extend(_ids(h.raw))
    references: list[str] = []
    for h in all_of("references"):
        references.extend(_ids(h.raw))

    delivered: list[str] = []
    for name in ("delivered-to", "x-original-to", "envelope-to"):
        for h in all_of(name):
            delivered.extend(a.lower().strip(".") for a in _ADDRISH.findall(h.value))
    received_for: list[str] = []
    for h in all_of("received"):
        received_for.extend(a.lower().strip(".") for a in _RECEIVED_FOR.findall(_unfold(h.raw)))

    subject_h = first("subject")
    subject = _unfold(subject_h.value) if subject_h is not None else ""

    try:
        body = _walk(msg, limits, hint, defects)
    except Exception as exc:
        defects.append(f"body-error: {type(exc).__name__}")
        body = _Body([], [], [])
    text = "\n\n".join(t.strip("\n") for t in body.plain if t.strip())
    if not text and body.htmls:
        text = "\n\n".join(html_to_text(h) for h in body.htmls)

    return ParsedMessage(
        message_id=_message_id(mid.raw) if mid is not None else None,
        in_reply_to=_dedupe(in_reply_to),
        references=_dedupe(references),
        subject=subject,
        from_name=from_name,
        from_addr=from_addr,
        reply_to=_dedupe(address_lists["reply-to"]),
        to=_dedupe(address_lists["to"]),
        cc=_dedupe(address_lists["cc"]),
        date=date,
        headers=tuple((_clean(h.name), h.value) for h in headers),
        text=text,
        html=body.htmls[0] if body.htmls else None,
        attachments=tuple(body.attachments),
        defects=_dedupe(defects),
        delivered_to=_dedupe(delivered),
        received_for=_dedupe(received_for),
        raw_address_text="\n".join(raw_addr_chunks),
    )
