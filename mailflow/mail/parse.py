"""Raw bytes → ParsedMessage, without ever letting hostile mail crash or stall the pipeline.

The standard `email` package (`policy.default`) is the parser of record. It has three failure
modes that matter to a daemon reading mail from strangers: deep MIME nesting makes it recurse
until `RecursionError` (and same-boundary nesting makes `get_content()` raise `KeyError`), its
structured header parser is super-linear (40,000 addresses in one To: take ~25 s), and its
feedparser keeps a Python string per line, so a message costs it 8-19 times its size in memory
(10 MB of short lines: ~150 MB). So before the stdlib sees a message:

- the top-level header block is bounded (1,000 fields, 1 MB, 256 KB a field) with regular
  expressions, never a Python loop per line;
- a line scanner with an explicit stack measures part count, nesting depth and part headers
  the way the feedparser reads them; where a cap is hit the message is cut at that point, and
- every leaf body is replaced by a one-line token, so the stdlib parses headers and structure
  only; bodies are decoded from the raw bytes as `get_payload(decode=True)` would. The
  stdlib's reading is then checked against the scanner's (every token must be a whole part
  payload, every multipart boundary one the scanner knew); when they differ, the message is
  read again the stdlib's way alone (its first 8 MB).

Text and HTML bodies are read up to 1 MB in all. Every cap hit is a "cap: ..." defect
(`caps_hit`), so whatever came before (headers, first text) is still used and the raw message,
stored whole, has the rest: a capped message is for a person to look at.

Addresses: a From (or Reply-To) that two parsers read differently, or that is not one plain
address, is rejected (CVE-2023-27043: `alice@good.example <bob@evil.example>`,
`"a@good.example"@evil.example`, `a@good.example@evil.example`); a display name showing
another address is dropped.

mail-parser is deliberately not used here: what it adds for us (the `for <addr>` clauses of
Received headers) is one regex, while it re-parses with compat32, recurses on deep nesting and
returns attachments as base64 strings.
"""
from __future__ import annotations

import base64
import binascii
import codecs
import functools
import html as html_lib
import inspect
import mimetypes
import quopri
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email import policy as email_policy
from email import utils as email_utils
from email._encoded_words import decode_b
from email._header_value_parser import get_unstructured
from email.headerregistry import DateHeader
from email.message import Message
from email.parser import BytesParser
from html.parser import HTMLParser
from typing import Any

from mailflow.core.message import Attachment, ParsedMessage

__all__ = ["Limits", "ParseError", "caps_hit", "parse", "parse_content"]


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 50 * 1024 * 1024
    max_parts: int = 500
    max_depth: int = 20
    max_header_bytes: int = 1024 * 1024
    # Text and HTML bodies together: what is read as text (the raw message keeps the rest).
    # The longest in tests/corpus is 175 KB; every later step (DKIM-signing a forward,
    # redaction, the page) costs a multiple of it.
    max_text_bytes: int = 1024 * 1024
    # Leaf bodies at least this long are decoded from the raw bytes instead of by the
    # stdlib (see _Scan); 0: all of them. Tests set it huge to compare both readings.
    inline_body_max: int = 0


class ParseError(Exception):
    """Nothing usable could be extracted: the caller should queue the raw bytes for a human."""


# The stdlib's structured header parser is super-linear; above these sizes we decode by hand.
_STRUCTURED_MAX = 16 * 1024          # a header value parsed with policy.default's registry
_FIELD_MAX = 256 * 1024              # any single header field is truncated to this
_PART_HEADER_MAX = 64 * 1024         # a MIME part's header block
_MAX_HEADER_FIELDS = 1000            # top-level fields decoded (real mail has < 200)
# When the stdlib reads the MIME structure differently from our scanner, the message is read
# again the stdlib's way alone, which costs up to ~20x its size in memory: only this much.
_FALLBACK_MAX = 8 * 1024 * 1024
_POLICY = email_policy.default
# The structure is read with compat32: the same feedparser, but header values stay strings
# (policy.default runs its registry parser on every header it is asked for, the feedparser's
# own Content-Type lookups included: most of parse()'s time). Only the headers that are used
# go through the registry, once each (see _decode_header).
_PARSE_POLICY = email_policy.compat32
# Header names the registry parses with a structured parser; every other header is
# unstructured, which get_unstructured reads with no defects and, without "=?", unchanged.
_STRUCTURED_NAMES = frozenset(email_policy.default.header_factory.registry) - {"subject"}

_LINE = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")
# The stdlib feedparser's notion of a header line (email.feedparser.headerRE).
_HEADER_LINE = re.compile(rb"From |[\041-\071\073-\176]*:|[\t ]")
_CT_FIELD = re.compile(rb"content-type[ \t]*:", re.I)
_CT_VALUE = re.compile(rb"content-type[ \t]*:\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)\s*/\s*"
                       rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+)", re.I)
# An unquoted value runs to the next ";" or space, as compat32's get_param reads it (which
# the structure is parsed with): "----=_Next" is all of it, where policy.default stops at "=".
_BOUNDARY = re.compile(rb"""boundary\s*(?:\*\s*)?(?:0\s*\*?\s*)?=\s*"""
                       rb"""(?:"([^"\r\n]*)"|([^\s;"]+))""", re.I)

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
# Control characters and the Unicode direction controls (LRM, RLM, ALM, embeddings,
# overrides, isolates), removed from attachment names.
_NAME_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")

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
    if value.isascii() or not _SURROGATES.search(value):
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
    # Most values have nothing to unfold; the test is a fifth of the substitution's cost.
    if "\n" in value or "\r" in value or "\t" in value:
        value = _FOLD.sub(" ", value)
    return value.strip()


def _clean(value: str) -> str:
    """No lone surrogates may leave this module: they break every encoder downstream."""
    return value if value.isascii() else _SURROGATES.sub("\ufffd", value)


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
    """Plain text a person would read in the rendered HTML; tolerant of any markup.

    The last few results are kept: the archive asks again for the text of the HTML that
    parse() has just converted (archive.context._has_text_part)."""
    return _html_to_text(markup)


@functools.lru_cache(maxsize=4)
def _html_to_text(markup: str) -> str:
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


# Where a header block ends: a line break followed by a line that is not part of a header
# field (a blank line, or a line the stdlib would take as the first line of the body).
_HEADER_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?![\t ]|From |[\041-\071\073-\176]*:)")
# Where a header field ends: a line break not followed by a continuation line.
_FIELD_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?![\t ])")
_EOL = re.compile(rb"\r\n|\r|\n")


def _header_end(raw: bytes) -> int:
    """The offset just after the last line of the top-level header block (regular
    expressions only: a block of millions of short lines costs no Python loop)."""
    if not _HEADER_LINE.match(raw) or raw[:1] in (b"\r", b"\n"):
        return 0
    m = _HEADER_END.search(raw)
    return m.end() if m is not None else len(raw)


def _cap_top_headers(raw: bytes, limits: Limits, defects: list[str]) -> bytes:
    """Bound the top-level header block: huge fields are what make the stdlib slow.

    Fields are kept in order until a cap is reached (1000 fields, `max_header_bytes` in
    all); a field over _FIELD_MAX is truncated and a Content-* field over _STRUCTURED_MAX
    dropped. The work is bounded by what is kept, not by the size of the block."""
    end = _header_end(raw)
    if end <= min(_STRUCTURED_MAX, limits.max_header_bytes):
        return raw  # fast path: no field can be over any cap
    kept: list[bytes] = []
    total = 0
    fields = 0
    changed = False
    pos = 0
    while pos < end:
        found = _FIELD_END.search(raw, pos, end)
        field_end = found.end() if found is not None else end
        fields += 1
        if fields > _MAX_HEADER_FIELDS:
            defects.append(f"cap: more than {_MAX_HEADER_FIELDS} header fields, the rest dropped")
            changed = True
            break
        size = field_end - pos
        first = _EOL.search(raw, pos, field_end)
        first_line = (first.end() if first is not None else field_end) - pos
        name = _field_name([raw[pos:pos + min(first_line, 200)]])
        if name.lower().startswith("content-") and size > _STRUCTURED_MAX:
            defects.append(f"cap: {name} header over {_STRUCTURED_MAX} bytes, dropped")
            changed = True
            pos = field_end
            continue
        if size > _FIELD_MAX:
            cut = raw[pos:pos + _FIELD_MAX]
            at = max(cut.rfind(b","), cut.rfind(b"\n"))
            cut = cut[:at] if at > first_line // 2 else cut
            data = cut.rstrip(b"\r\n") + b"\r\n"
            defects.append(f"cap: {name} header over {_FIELD_MAX} bytes, truncated")
            changed = True
        else:
            data = raw[pos:field_end]
        if total + len(data) > limits.max_header_bytes:
            defects.append(f"cap: header block over {limits.max_header_bytes} bytes, "
                           "the rest dropped")
            changed = True
            break
        total += len(data)
        kept.append(data)
        pos = field_end
    if not changed:
        return raw
    rest = raw[end:]
    if _EOL.match(rest) is None:   # the body started without a blank line: keep it so
        rest = b"\r\n" + rest
    return b"".join(kept) + rest


_TOTAL_PART_HEADERS = 2 * 1024 * 1024   # all MIME part headers of one message together


@functools.lru_cache(maxsize=64)
def _boundary_lines(boundaries: tuple[bytes, ...]) -> re.Pattern[bytes]:
    """A boundary line of any of `boundaries`, found with the line break before it (in a
    body, the scan position is always just after a line break)."""
    alternatives = b"|".join(re.escape(b) for b in sorted(set(boundaries), key=len, reverse=True))
    return re.compile(rb"[\r\n]--(?:" + alternatives + rb")(?:--)?[ \t]*(?=\r\n|\r|\n|\Z)")


# What may follow "--boundary" on a boundary line (see _boundary_lines).
_BOUNDARY_TAIL = re.compile(rb"(?:--)?[ \t]*(?=[\r\n]|\Z)")
_FALSE_CANDIDATES = 64


def _next_boundary_line(raw: bytes, pos: int, boundaries: tuple[bytes, ...]) -> int | None:
    """Where `_boundary_lines(boundaries).search(raw, pos)` would match (the offset of the
    line break before the boundary line), or None; found with bytes.find, because compiling
    a pattern for each message's boundaries cost more than the rest of the scan (and pushed
    the module's other patterns out of re's cache). A body full of near-boundaries (the text
    "--boundary" not alone on its line) falls back to the compiled pattern after a few."""
    best: int | None = None
    false = 0
    for b in set(boundaries):
        needle = b"--" + b
        at = pos + 1
        while True:
            i = raw.find(needle, at)
            if i < 0 or (best is not None and i - 1 >= best):
                break
            if raw[i - 1:i] in (b"\r", b"\n") and _BOUNDARY_TAIL.match(raw, i + len(needle)):
                best = i - 1
                break
            false += 1
            if false > _FALSE_CANDIDATES:
                d = _boundary_lines(boundaries).search(raw, pos)
                return None if d is None else d.start()
            at = i + 1
    return best


@dataclass
class _Scan:
    """What the stdlib is given, and what was taken out of it.

    `raw` is the message cut where a cap was hit, with every leaf body of at least
    `Limits.inline_body_max` bytes replaced by a one-line token; `bodies` maps each token to
    (start, end) of the body it stands for in `source`. The stdlib then only ever holds
    headers and small bodies, and large bodies are decoded from `source` directly (its
    feedparser keeps a Python string per line: 10 MB of short lines cost it ~150 MB).
    """
    raw: bytes
    source: bytes
    bodies: dict[str, tuple[int, int]]
    boundaries: frozenset[str]


def _scan_structure(raw: bytes, limits: Limits, defects: list[str]) -> _Scan:
    """Walk the MIME structure with an explicit stack, the way the stdlib's feedparser
    would, and cut the message where it first exceeds a cap so the stdlib never recurses
    past it. Over-counting (a "boundary=" the stdlib would ignore) only makes us stricter;
    where the two could read the structure differently, `_parse` checks and falls back."""
    stack: list[bytes | None] = []   # boundaries of open multiparts; None = a nested message
    boundaries: set[bytes] = set()
    parts = 1
    in_header = True
    header: list[bytes] = []
    header_size = 0
    part_headers = 0
    entity_start = 0                 # where the entity whose header we are reading begins
    top = True
    leaf: int | None = None          # where the body of the leaf we are in began
    leaf_strips_eol = True           # not for a multipart without boundary (stdlib's quirk)
    spans: list[tuple[int, int, int]] = []
    size = len(raw)
    nonce = secrets.token_hex(8)

    def done(cut_at: int | None = None, why: str | None = None) -> _Scan:
        if why is not None:
            defects.append(why)
        end = size if cut_at is None else cut_at
        source = raw if cut_at is None else raw[:cut_at]
        if not spans:
            return _Scan(source, source, {}, _decoded(boundaries))
        out: list[bytes] = []
        bodies: dict[str, tuple[int, int]] = {}
        at = 0
        for n, (s, e, data_end) in enumerate(spans):
            token = f"mailflow-body-{nonce}-{n:09d}"
            out += [raw[at:s], token.encode("ascii")]
            bodies[token] = (s, data_end)
            at = e
        out.append(raw[at:end])
        return _Scan(b"".join(out), source, bodies, _decoded(boundaries))

    def close_leaf(line_start: int, inside: bool) -> None:
        """The leaf body that began at `leaf` ends before the boundary line at `line_start`;
        inside a multipart the line break before the boundary belongs to the boundary."""
        nonlocal leaf
        if leaf is None:
            return
        end = line_start
        if inside and end > leaf:
            if raw[end - 1:end] == b"\n" and end - 1 > leaf and raw[end - 2:end - 1] == b"\r":
                end -= 2
            elif raw[end - 1:end] in (b"\r", b"\n"):
                end -= 1
        # The token replaces the body up to its last line break, which the boundary line
        # needs; the body itself keeps that line break where the stdlib would keep it.
        if end - leaf >= max(limits.inline_body_max, 1):
            spans.append((leaf, end, end if leaf_strips_eol else line_start))
        leaf = None

    def boundary_of(line: bytes) -> tuple[int, bool] | None:
        """(stack index, closing?) when the line is a boundary of an open multipart."""
        if not line.startswith(b"--"):
            return None
        stripped = line.rstrip(b" \t\r\n")
        for idx in range(len(stack) - 1, -1, -1):
            b = stack[idx]
            if b is None:
                continue
            if stripped == b"--" + b + b"--":
                return idx, True
            if stripped == b"--" + b:
                return idx, False
        return None

    pos = 0
    while True:
        if in_header:
            m = _LINE.match(raw, pos)
            if m is None:
                return done()
            line = m.group()
            hit = boundary_of(line) if stack else None
            if hit is None and line not in (b"\r\n", b"\n", b"\r") and _HEADER_LINE.match(line):
                pos = m.end()
                header.append(line)
                header_size += len(line)
                if not top:
                    part_headers += len(line)
                    if header_size > _PART_HEADER_MAX:
                        return done(entity_start, f"cap: part header over {_PART_HEADER_MAX} bytes")
                    if part_headers > _TOTAL_PART_HEADERS:
                        return done(entity_start, f"cap: part headers over "
                                                  f"{_TOTAL_PART_HEADERS} bytes in total")
                continue
            # End of this entity's header block: decide what its body is.
            ctype = b""
            boundary: bytes | None = None
            for field in _split_fields(header):
                if _CT_FIELD.match(field[0]):
                    data = b"".join(field)
                    if not top and len(data) > _STRUCTURED_MAX:
                        return done(entity_start, f"cap: part Content-Type over {_STRUCTURED_MAX} bytes")
                    ct = _CT_VALUE.match(data)
                    if ct:
                        ctype = (ct.group(1) + b"/" + ct.group(2)).lower()
                    b = _BOUNDARY.search(data)
                    if b:
                        boundary = (b.group(1) if b.group(1) is not None else b.group(2)).rstrip()
                    break
            if not top and any(len(b"".join(f)) > _STRUCTURED_MAX for f in _split_fields(header)
                               if f[0][:8].lower() == b"content-"):
                return done(entity_start, f"cap: part header field over {_STRUCTURED_MAX} bytes")
            was_top = top
            top = False
            header = []
            header_size = 0
            if hit is not None:
                # A boundary where a header or body should start: an empty part (the stdlib
                # sees the end of this part here, whatever its header announced).
                in_header = False
                continue     # handled below as a boundary line, with pos still at it
            in_header = False
            is_blank = line in (b"\r\n", b"\n", b"\r")
            body_start = m.end() if is_blank else m.start()
            pos = body_start  # a non-header line is the body's first line (and may be a
                              # multipart's first boundary)
            if ctype.startswith(b"multipart/") and boundary:
                stack.append(boundary)
                boundaries.add(boundary)
            elif ctype.startswith(b"message/") and ctype != b"message/delivery-status":
                stack.append(None)
                parts += 1
                if parts > limits.max_parts:
                    return done(entity_start, f"cap: more than {limits.max_parts} parts")
                in_header = True
                entity_start = body_start
            elif None not in stack and not ctype.startswith(b"message/"):
                leaf = body_start
                leaf_strips_eol = not ctype.startswith(b"multipart/")
                if was_top:  # a single-part message: the body runs to the end
                    close_leaf(size, inside=False)
                    return done()
            if len(stack) + 1 > limits.max_depth:
                return done(entity_start, f"cap: nesting deeper than {limits.max_depth}")
            if not in_header and not any(b is not None for b in stack):
                return done()   # a single-part body: nothing further can nest
            continue
        # In a body: only a line starting with "--" can change anything.
        if not any(b is not None for b in stack):
            close_leaf(size, inside=bool(stack))
            return done()    # epilogue after the outermost closing boundary
        d = _next_boundary_line(raw, max(pos - 1, 0), tuple(b for b in stack if b is not None))
        if d is None:
            close_leaf(size, inside=True)
            return done()
        m = _LINE.match(raw, d + 1)
        assert m is not None
        pos = m.end()
        hit = boundary_of(m.group())
        if hit is None:
            continue
        idx, closing = hit
        close_leaf(m.start(), inside=True)
        if closing:
            del stack[idx:]
            continue
        del stack[idx + 1:]
        # The stdlib takes several separator lines in a row as one (unless an enclosing
        # multipart has the same boundary: then the next one ends this one).
        b = stack[idx]
        while b not in stack[:idx]:
            nxt = _LINE.match(raw, pos)
            if nxt is None or nxt.group().rstrip(b" \t\r\n") not in (b"--" + b, b"--" + b + b"--"):  # type: ignore[operator]
                break
            pos = nxt.end()
        parts += 1
        if parts > limits.max_parts:
            return done(m.start(), f"cap: more than {limits.max_parts} parts")
        in_header = True
        entity_start = m.start()


def _decoded(boundaries: set[bytes]) -> frozenset[str]:
    return frozenset(b.decode("ascii", "surrogateescape") for b in boundaries)


# ---------------------------------------------------------------------------- header fields

@dataclass
class _Header:
    name: str
    raw: str        # as received, unfolded is not applied; 8-bit already decoded
    value: str      # decoded for people
    obj: Any        # the policy.default header object, or None when we decoded by hand


@functools.lru_cache(maxsize=64)
def _header_class(name: str) -> type:
    """The class header_factory would make for `name`: it makes a new one on every call."""
    return _POLICY.header_factory[name]


def _header_object(name: str, value: str) -> Any:
    """`policy.default.header_factory(name, value)`, the same object without a new class
    per call; the few values every message repeats (MIME-Version, a part's Content-Type)
    are parsed once (header objects are immutable strings)."""
    if len(value) <= 120:
        return _cached_header_object(name.lower(), name, value)
    return _header_class(name.lower())(name, value)


@functools.lru_cache(maxsize=512)
def _cached_header_object(low: str, name: str, value: str) -> Any:
    return _header_class(low)(name, value)


# The plainest forms of the structured headers every message has, which the registry reads
# without a defect into a value fixed by their parts (checked against the registry in
# tests/test_parse_speed.py); anything else, even slightly odd, goes to the registry.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = rf"{_ATEXT}(?:\.{_ATEXT})*"
_ADDR_SPEC = rf"{_DOT_ATOM}@{_DOT_ATOM}"
_PLAIN_ADDRESS = re.compile(
    rf"""[ ]*(?:(?P<words>{_ATEXT}(?:[ ]+{_ATEXT})*)[ ]*<(?P<a1>{_ADDR_SPEC})>"""
    rf"""|"(?P<quoted>[ !#-\[\]-~]*)"[ ]*<(?P<a2>{_ADDR_SPEC})>|(?P<a3>{_ADDR_SPEC}))[ ]*""")
_SPACES = re.compile(r" +")
_PLAIN_MESSAGE_ID = re.compile(rf"<{_ADDR_SPEC}>")
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PARAM_TOKEN = r"[!#$&+.^_`|~0-9A-Za-z-]+"     # no "*", "'" or "%": RFC 2231 is not plain
_PLAIN_CONTENT_TYPE = re.compile(
    rf"""({_TOKEN}/{_TOKEN})((?:;[ ]*{_PARAM_TOKEN}=(?:{_PARAM_TOKEN}|"[ !#-\[\]-~]*"))*)""")
_CT_PARAM = re.compile(r"""([^=; ]+)=(?:"([^"]*)"|([^;]*))""")
_HEADER_SPECIALS = frozenset('()<>@,:;.\\"[]')


@dataclass(frozen=True)
class _PlainAddress:
    display_name: str
    addr_spec: str


class _PlainHeader(str):
    """A registry header object as this module reads it (str, `defects`, `addresses`,
    `datetime`), for the plain forms of _plain_structured."""
    addresses: tuple[_PlainAddress, ...] = ()
    defects: tuple[Any, ...] = ()
    datetime: datetime | None = None


_DATE_NAMES = frozenset(name for name, cls in email_policy.default.header_factory.registry.items()
                        if issubclass(cls, DateHeader))   # date, resent-date, orig-date


def _plain_date_header(value: str) -> _PlainHeader | None:
    """A date header as the registry's DateHeader reads one it can parse: the value
    `parsedate_to_datetime` gives, shown as `format_datetime` writes it, no defect (without
    the registry's header class, token list and parse tree: ~80 µs a message). None for
    anything it cannot parse, which the registry then reads (with its defect)."""
    if not value:
        return None
    try:
        when = email_utils.parsedate_to_datetime(value)
        shown = email_utils.format_datetime(when)
    except Exception:  # noqa: BLE001 - the registry says what is wrong with it
        return None
    header = _PlainHeader(shown)
    header.datetime = when
    return header


def _plain_address_header(value: str) -> _PlainHeader | None:
    """An address list of plain forms (`a@b`, `Name Words <a@b>`, `"Name" <a@b>`), read as
    the registry reads it; None for anything else (comments, groups, encoded-words ...)."""
    found: list[_PlainAddress] = []
    shown: list[str] = []
    for item in value.split(","):
        m = _PLAIN_ADDRESS.fullmatch(item)
        if m is None:
            return None
        if m.group("a3") is not None:
            found.append(_PlainAddress("", m.group("a3")))
            shown.append(m.group("a3"))
            continue
        if m.group("words") is not None:
            name, addr = _SPACES.sub(" ", m.group("words")), m.group("a1")
        else:
            name, addr = m.group("quoted"), m.group("a2")
            if not name or name != name.strip(" ") or "  " in name:
                return None
        found.append(_PlainAddress(name, addr))
        if not _HEADER_SPECIALS.isdisjoint(name):
            name = '"' + name + '"'
        shown.append(f"{name} <{addr}>")
    header = _PlainHeader(", ".join(shown))
    header.addresses = tuple(found)
    return header


_ADDRESS_NAMES = frozenset({"from", "to", "cc", "bcc", "reply-to", "sender", "resent-from",
                            "resent-to", "resent-cc", "resent-bcc", "resent-sender"})


def _plain_structured(low: str, value: str) -> Any:
    """A stand-in for `header_factory(low, value)` (its str, `defects` and, for addresses,
    `addresses`) when the value has one of the plainest forms; otherwise None."""
    if len(value) > 2000 or not value.isascii():
        return None
    if low in _ADDRESS_NAMES:
        if "=?" in value or not value.strip(" "):
            return None
        return _plain_address_header(value)
    if low in _DATE_NAMES:
        return _plain_date_header(value)
    if low == "message-id":
        if _PLAIN_MESSAGE_ID.fullmatch(value):
            return _PlainHeader(value)
        return None
    if low == "content-type":
        m = _PLAIN_CONTENT_TYPE.fullmatch(value)
        if m is None:
            return None
        params = _CT_PARAM.findall(m.group(2))
        names = [k.lower() for k, _, _ in params]
        if len(set(names)) != len(names):
            return None
        shown = "; ".join(f'{k}="{q or t}"' if q or t else k for k, q, t in params)
        return _PlainHeader(m.group(1) + (f"; {shown}" if shown else ""))
    return None


def _decode_header(name: str, raw_value: str, hint: str | None, defects: list[str]) -> _Header:
    value, guessed = _unsurrogate(raw_value, hint)
    if guessed:
        defects.append(f"8bit-header: {name[:60]} was not UTF-8")
    obj = None
    decoded = None
    if len(value) <= _STRUCTURED_MAX:
        try:
            low = name.lower()
            if low in _STRUCTURED_NAMES:
                text = _unfold(_normalise_ew_charsets(value))
                obj = _plain_structured(low, text)
                if obj is None:
                    obj = _header_object(name, text)
                decoded = str(obj)
                defects.extend(type(d).__name__ for d in obj.defects)
            else:
                # What str(header_factory(name, v)) is for an unstructured header, without
                # making the header object (a new class per call) and the token list.
                decoded = _unfold(value)
                if "=?" in decoded:
                    decoded = str(get_unstructured(_unfold(_normalise_ew_charsets(value))))
                    if _SURROGATES.search(decoded):
                        decoded = email_utils._sanitize(decoded)
            if "=?" in decoded and _ENCODED_WORD.search(decoded):
                decoded = light_decode(decoded)  # an encoded-word the stdlib gave up on
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


# What one plain address may contain: one "@", nothing quoted, no route, list or comment.
_NOT_PLAIN = re.compile(r"[\"\\\s\x00-\x1f\x7f<>()\[\],;:]")


def _plain(addr: str) -> bool:
    return addr.count("@") == 1 and not addr.startswith("@") and not addr.endswith("@") \
        and not _NOT_PLAIN.search(addr)


def _agreed(h: _Header) -> list[tuple[str, str]] | None:
    """(name, address) pairs of an address header when two parsers agree on them and each
    is a plain address; None when they disagree, the CVE-2023-27043 pattern where a filter
    and the archive would not agree about who wrote (`"a@x"@y`, `a@x <b@y>`, `a@x@y` ...)."""
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
    if [a for _, a in pairs] != other_addrs and not (len(pairs) == 1 and not other_addrs):
        return None
    if not all(_plain(a) for _, a in pairs):
        return None
    return pairs


def _one_from(h: _Header) -> tuple[str, str] | None:
    """(name, address) from one From header; ("", "") when it names nobody; None when it
    is ambiguous (see _agreed) or names more than one address."""
    pairs = _agreed(h)
    if pairs is None or len(pairs) > 1:
        return None
    if not pairs:
        return "", ""
    return _unfold(pairs[0][0]), pairs[0][1]


def _misleading_name(name: str, addr: str) -> bool:
    """A display name that shows another address (`"alice@good.example" <bob@evil.example>`,
    an encoded-word hiding one): a reader would take it for the sender."""
    return any(a.lower().strip(".") != addr for a in _ADDRISH.findall(name))


def _from_address(from_headers: list[_Header], defects: list[str]) -> tuple[str, str]:
    """One unambiguous sender or nothing, from the message's From headers."""
    found = [_one_from(h) for h in from_headers]
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
    if _misleading_name(name, addr):
        defects.append("misleading From: the display name shows another address; name dropped")
        name = ""
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
                return _header_object(name, _unfold(value))
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
    # A name is a label, never a path: "../../etc/passwd" must not reach a file system, and
    # direction controls must not turn "invoice\u202etxt.exe" into "invoiceexe.txt".
    name = re.split(r"[/\\]", _clean(name))[-1]
    name = _NAME_CONTROLS.sub("", name).strip().lstrip(".").strip()
    return name[:255] or None


_UU = ("x-uuencode", "uuencode", "uue", "x-uue")
_TOKEN_LEN = len("mailflow-body-") + 16 + 1 + 9


def _token_of(payload: object) -> str | None:
    """The token a payload consists of (the stdlib leaves a line break after some), or None."""
    if not isinstance(payload, str) or not _TOKEN_LEN <= len(payload) <= _TOKEN_LEN + 2:
        return None
    token = payload[:_TOKEN_LEN]
    return token if payload[_TOKEN_LEN:] in ("", "\r\n", "\n", "\r") else None


@dataclass
class _Bodies:
    """The leaf bodies the scanner took out of what the stdlib saw (see _Scan)."""
    source: bytes
    spans: dict[str, tuple[int, int]]

    def take(self, part: Message, limit: int | None = None) -> bytes | None:
        """The body a token stands for, decoded as get_payload(decode=True) would; with
        `limit`, an undecoded body is only read that far (text beyond the text cap)."""
        if not self.spans:
            return None
        span = self.spans.get(_token_of(part.get_payload()))
        if span is None:
            return None
        start, end = span
        view = memoryview(self.source)[start:end]   # no copy of a large body until decoded
        cte = str(part.get("content-transfer-encoding", "")).lower()
        if cte == "quoted-printable":
            return quopri.decodestring(bytes(view))
        if cte == "base64":
            try:
                # Line breaks are skipped, as the stdlib's join of bytes.splitlines() does.
                # Whenever this lenient decoder succeeds, decode_b below (the stdlib's)
                # returns the same bytes; it only differs on what it repairs or refuses.
                return binascii.a2b_base64(view)
            except (binascii.Error, ValueError):
                value, _ = decode_b(bytes(view).translate(None, b"\r\n"))
                return value
        if cte in _UU:
            helper = Message()
            helper["Content-Transfer-Encoding"] = cte
            helper.set_payload(bytes(view).decode("ascii", "surrogateescape"))
            value = helper.get_payload(decode=True)
            return value if isinstance(value, bytes) else bytes(view)
        return bytes(view if limit is None else view[:limit])


def _payload_bytes(part: Message, bodies: _Bodies | None = None,
                   limit: int | None = None) -> bytes:
    if bodies is not None:
        data = bodies.take(part, limit)
        if data is not None:
            return data
    data = part.get_payload(decode=True)
    if isinstance(data, bytes):
        return data
    payload = part.get_payload()
    if isinstance(payload, str):
        return payload.encode("utf-8", "surrogateescape")
    return b""


# What makes compat32's folding (Header.encode) change a one-line ASCII value that fits in
# 78 columns: a character str.splitlines() breaks at, trailing blanks (a last single space
# is dropped).
_FOLD_SLOW = re.compile(r"[\n\r\v\f\x1c\x1d\x1e]|[ \t]\Z")
# The same for each line of a value that arrived folded (CRLF or LF line breaks): a bare CR,
# the other line breaks, or a line ending in a blank (or blank throughout).
_FOLDED_SLOW = re.compile(r"\r(?!\n)|[\v\f\x1c\x1d\x1e]|[ \t](?=\r?\n|\Z)")
_LINE_BREAK = re.compile(r"\r?\n")


class _Compat32Fast(email_policy.Compat32):
    """compat32 for re-generating an attached message, with the common cases of its header
    folding done directly: ASCII lines that fit in 78 columns come out of `Header.encode`
    unchanged (a folded value keeps its line breaks and the blanks that begin its
    continuation lines), and making the Header object cost most of the generator's time.
    Anything else goes through compat32's own `_fold` (tests/test_parse_speed.py)."""

    def _fold(self, name: str, value: Any, sanitize: bool) -> str:
        if isinstance(value, str) and not sanitize and value.isascii():
            if len(name) + 2 + len(value) <= 78 and not _FOLD_SLOW.search(value):
                return f"{name}: {value}{self.linesep}"
            if "\n" in value and not value.endswith("\n") and not _FOLDED_SLOW.search(value):
                lines = _LINE_BREAK.split(value)
                if (len(name) + 2 + len(lines[0]) <= 78
                        and all(len(x) <= 78 and x[:1] in (" ", "\t") and x.strip()
                                for x in lines[1:])):
                    return f"{name}: {self.linesep.join(lines)}{self.linesep}"
        return super()._fold(name, value, sanitize)  # type: ignore[misc]


_GENERATE_POLICY = _Compat32Fast()


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
            chunks.append(inner.as_bytes(policy=_GENERATE_POLICY))
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


def _text_within(data: bytes, budget: int) -> bytes:
    """At most `budget` bytes of a text body, cut at a line break when there is one."""
    cut = data[:budget]
    at = max(cut.rfind(b"\n"), cut.rfind(b"\r"))
    return cut[:at + 1] if at > budget // 2 else cut


def _walk(root: Message, limits: Limits, hint: str | None, defects: list[str],
          bodies: _Bodies | None = None) -> _Body:
    body = _Body([], [], [])
    stack: list[tuple[Message, int]] = [(root, 1)]
    seen = 0
    text_budget = limits.max_text_bytes

    def as_text(data: bytes, charset: str | None) -> str:
        nonlocal text_budget
        if len(data) > text_budget:
            defects.append(f"cap: text over {limits.max_text_bytes} bytes, truncated")
            data = _text_within(data, text_budget)
        text_budget -= len(data)
        text = decode_bytes(data, charset)
        return _clean(text.replace("\r\n", "\n").replace("\r", "\n"))

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
                body.plain.append(as_text(_payload_bytes(part, bodies, text_budget + 1), None))
                continue
            if part.is_multipart() and ctype.startswith("multipart/"):
                if depth >= limits.max_depth:
                    defects.append(f"cap: nesting deeper than {limits.max_depth}")
                    continue
                children = [c for c in part.get_payload() if isinstance(c, Message)]
                stack.extend((c, depth + 1) for c in reversed(children))
                continue
            filename = _filename(part, hint)
            disposition = part.get_content_disposition()
            is_text = (ctype in ("text/plain", "text/html") and not filename
                       and disposition != "attachment")
            if ctype.startswith("message/"):
                data = _message_bytes(part)
            else:
                data = _payload_bytes(part, bodies, text_budget + 1 if is_text else None)
            if is_text:
                charset = part.get_param("charset")
                text = as_text(data, charset if isinstance(charset, str) else None)
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


def _same_structure(msg: Message, scan: _Scan) -> bool:
    """Whether the stdlib read the structure the way the scanner did: every body token is
    the whole payload of a leaf (never inside a header, another body, a preamble or an
    epilogue, where it would stand for the wrong bytes), and every multipart has a boundary
    the scanner knew."""
    nonce = next(iter(scan.bodies))[:len("mailflow-body-") + 16]
    for part in msg.walk():
        if any(nonce in str(v) for _, v in part.raw_items()):
            return False
        if part.get_content_maintype() == "multipart":
            b = part.get_boundary()
            if b is not None and b not in scan.boundaries:
                return False
        if part.is_multipart():
            if any(nonce in (x or "") for x in (part.preamble, part.epilogue)):
                return False
            continue
        payload = part.get_payload()
        if isinstance(payload, str) and nonce in payload and _token_of(payload) not in scan.bodies:
            return False
    return True


def caps_hit(pm: ParsedMessage) -> tuple[str, ...]:
    """The caps a message hit: when there are any, part of it was not read (the raw bytes
    have it all), so it is for a person to look at, not for automatic processing."""
    return tuple(d for d in pm.defects if d.startswith("cap:"))


def parse(raw: bytes, limits: Limits = Limits()) -> ParsedMessage:
    """Parse a raw message. Never raises anything but ParseError, and only when not even a
    header could be read; every cap hit or broken part is recorded in `defects` instead."""
    return _parse_guarded(raw, limits, None)


def parse_content(raw: bytes, headers: Iterable[str] = ("x-no-archive",),
                  limits: Limits = Limits()) -> ParsedMessage:
    """What `parse` gives for the body (text, HTML, attachments) and for the `headers` named
    (lower case), without reading any other header: the addresses, dates, ids and every other
    field are left empty, and `defects` lists only what the body and those headers had.

    For the archive, which shows a stored message's body and attachments (its sender,
    subject and date come from the store) and needs X-No-Archive: decoding every header
    with the registry was a third of its parse. Same text, HTML and attachments as `parse`
    (tests/test_parse_speed.py compares them)."""
    return _parse_guarded(raw, limits, frozenset(headers))


def _parse_guarded(raw: bytes, limits: Limits, only: frozenset[str] | None) -> ParsedMessage:
    try:
        return _parse(raw, limits, only)
    except ParseError:
        raise
    except (RecursionError, MemoryError) as exc:
        raise ParseError(f"unparseable: {type(exc).__name__}") from None
    except Exception as exc:  # a bug here must reach the queue as ParseError, not kill the daemon
        raise ParseError(f"unparseable: {type(exc).__name__}: {exc}") from None


def _parse(raw: bytes, limits: Limits, only: frozenset[str] | None = None) -> ParsedMessage:
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
    scan = _scan_structure(raw, limits, defects)
    del raw
    parsed = _read(scan, limits, list(defects), only)
    if parsed is not None:
        return parsed
    # The stdlib read the MIME structure differently from the scanner (a malformed or
    # hostile message): read it the stdlib's way alone, which holds every line in memory.
    source = scan.source
    if len(source) > _FALLBACK_MAX:
        source = source[:_FALLBACK_MAX]
        defects.append(f"cap: ambiguous MIME structure, only the first {_FALLBACK_MAX} bytes read")
    parsed = _read(_Scan(source, source, {}, frozenset()), limits, defects, only)
    assert parsed is not None
    return parsed


def _read(scan: _Scan, limits: Limits, defects: list[str],
          only: frozenset[str] | None = None) -> ParsedMessage | None:
    """The stdlib's reading of `scan.raw`, large bodies decoded from `scan.source`; None
    when a body token turned up anywhere but as a whole part (see _Bodies). `only`: decode
    just these headers and the body (`parse_content`)."""
    msg: Message | None
    try:
        msg = BytesParser(policy=_PARSE_POLICY).parsebytes(scan.raw)
    except Exception as exc:  # the scan should prevent this; if not, fall back to headers
        defects.append(f"parse-failed: {type(exc).__name__}")
        msg = None
    if msg is None:
        try:
            msg = BytesParser(policy=_PARSE_POLICY).parsebytes(scan.raw, headersonly=True)
        except Exception as exc:
            raise ParseError(f"headers unreadable: {type(exc).__name__}") from None
    raw = scan.source
    bodies = _Bodies(scan.source, scan.bodies) if scan.bodies else None
    if bodies is not None:
        try:
            if not _same_structure(msg, scan):
                return None
        except Exception:  # noqa: BLE001 - whatever confused the check confuses the reading
            return None

    raw_items = list(msg.raw_items())
    if not raw_items:
        raise ParseError("no header fields found")
    hint = _body_charset_hint(raw_items, raw)
    if only is not None:
        return _content(msg, raw_items, hint, only, limits, defects, bodies)
    headers = [_decode_header(k, v, hint, defects) for k, v in raw_items]
    by_name: dict[str, list[_Header]] = {}   # lower-cased name -> its headers, in order
    for h in headers:
        by_name.setdefault(h.name.lower(), []).append(h)

    def first(name: str) -> _Header | None:
        found = by_name.get(name)
        return found[0] if found else None

    def all_of(name: str) -> list[_Header]:
        return by_name.get(name, [])

    from_name, from_addr = _from_address(all_of("from"), defects)

    raw_addr_chunks: list[str] = []
    address_lists: dict[str, list[str]] = {}
    for name in ("to", "cc", "bcc"):
        found: list[str] = []
        for h in all_of(name):
            pairs, ok = _addresses(h)
            found.extend(a for _, a in pairs)
            if not ok:
                raw_addr_chunks.append(f"{h.name}: {_clean(_unfold(h.raw))}")
        address_lists[name] = found
    # Reply-To says where answers go (a new request's citizen): all of it or none of it.
    reply_to: list[str] = []
    for h in all_of("reply-to"):
        agreed = _agreed(h)
        if agreed is None:
            defects.append("ambiguous Reply-To: parsers disagree or an address is not plain; "
                           "ignored")
            reply_to = []
            break
        reply_to.extend(a for _, a in agreed)
    address_lists["reply-to"] = reply_to

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

    body, text = _body_and_text(msg, limits, hint, defects, bodies)

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


def _body_and_text(msg: Message, limits: Limits, hint: str | None, defects: list[str],
                   bodies: _Bodies | None) -> tuple[_Body, str]:
    try:
        body = _walk(msg, limits, hint, defects, bodies)
    except Exception as exc:
        defects.append(f"body-error: {type(exc).__name__}")
        body = _Body([], [], [])
    text = "\n\n".join(t.strip("\n") for t in body.plain if t.strip())
    if not text and body.htmls:
        text = "\n\n".join(html_to_text(h) for h in body.htmls)
    return body, text


def _content(msg: Message, raw_items: list[tuple[str, str]], hint: str | None,
             only: frozenset[str], limits: Limits, defects: list[str],
             bodies: _Bodies | None) -> ParsedMessage:
    """`_read`'s result for `parse_content`: the body, and the headers named in `only`
    decoded exactly as `_read` decodes them (the same `_clean` name `header()` looks up)."""
    headers = [_decode_header(k, v, hint, defects) for k, v in raw_items
               if _clean(k).lower() in only]
    body, text = _body_and_text(msg, limits, hint, defects, bodies)
    return ParsedMessage(
        message_id=None, in_reply_to=(), references=(), subject="", from_name="",
        from_addr="", reply_to=(), to=(), cc=(), date=None,
        headers=tuple((_clean(h.name), h.value) for h in headers),
        text=text,
        html=body.htmls[0] if body.htmls else None,
        attachments=tuple(body.attachments),
        defects=_dedupe(defects),
    )
