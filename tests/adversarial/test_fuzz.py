"""Fuzzing (Hypothesis) over parsing, classification, redaction and page rendering.

CI runs the "ci" profile (a few hundred examples per property, a bounded time); a person runs
the same properties for longer with `HYPOTHESIS_PROFILE=long pytest tests/adversarial/test_fuzz.py`
(or "nightly" for longer still). Hypothesis keeps what it finds in `.hypothesis/`, and every
finding becomes a named regression test at the bottom of this file.

Properties:
- parse() raises nothing but ParseError, on arbitrary bytes and on MIME-shaped messages, and
  reads every message exactly as the stdlib alone would (the body scanner that keeps large
  bodies away from the stdlib never changes what is read);
- classify() never raises on anything parse() returns;
- redaction: no text, HTML or page shows a private value, however it is written around;
- the sanitiser and the page: no script, no event handler, no javascript: (or other) URL.
"""
from __future__ import annotations

import html as htmllib
import os
import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timezone
from html.parser import HTMLParser

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mailflow.archive.context import AttachmentView, MessageView, fold
from mailflow.archive.render import make_env, text_html
from mailflow.core.classify import classify
from mailflow.core.redaction import Redactor, private_values
from mailflow.mail.parse import Limits, ParseError, parse
from mailflow.mail.sanitise import redact_html, sanitise_html

_COMMON = dict(deadline=None, derandomize=False, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])
settings.register_profile("ci", max_examples=150, **_COMMON)
settings.register_profile("long", max_examples=20_000, **_COMMON)
settings.register_profile("nightly", max_examples=200_000, **_COMMON)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
fuzz = settings(PROFILE)

DOMAIN = "ask.example"
NO_SUBSTITUTION = Limits(inline_body_max=10**12)


def parse_or_none(raw: bytes, limits: Limits = Limits()):  # type: ignore[no-untyped-def]
    try:
        return parse(raw, limits)
    except ParseError:
        return None


def assert_same_reading(raw: bytes) -> None:
    """parse() with large bodies kept from the stdlib reads exactly what the stdlib reads."""
    a, b = parse_or_none(raw), parse_or_none(raw, NO_SUBSTITUTION)
    assert a == b


# -- MIME-shaped messages -----------------------------------------------------------------------
EOLS = st.sampled_from(["\r\n", "\n", "\r"])
BOUNDARIES = st.one_of(
    st.sampled_from(["X", "b1", "=_Part_1", "----=_NextPart_000", "a=b", "X X", "--", "Y", "XX",
                     "boundary", "B'(+_,-./:=?)"]),
    st.text(alphabet="abcXYZ019'()+_,-./:=? ", min_size=1, max_size=12))
CTES = st.sampled_from([None, "7bit", "8bit", "binary", "base64", "quoted-printable", "Base64",
                        "x-uuencode", "bogus"])
TYPES = st.sampled_from(["text/plain", "text/html", "application/octet-stream", "image/png",
                         "message/rfc822", "message/delivery-status", "text/rfc822-headers",
                         "multipart/mixed", "application/pdf"])
BODY_TOKENS = st.sampled_from(["hello", "--X", "--X--", "--b1", "=\r\n", "=E9", "QUJD", "QQ==",
                               "begin 644 f", ".", "..", "\r\n.\r\n", "Content-Type: text/html",
                               "From: x@y", "<p>hi</p>", "<script>alert(1)</script>", "\x00",
                               "mailflow-body-", " ", "\t", "\ud7ff", "é", "\u202e"])


@st.composite
def leaf(draw) -> tuple[list[str], str]:  # type: ignore[no-untyped-def]
    headers = [f"Content-Type: {draw(TYPES)}; charset={draw(st.sampled_from(['utf-8', 'latin-1', 'bogus', 'iso-2022-jp']))}"]
    cte = draw(CTES)
    if cte:
        headers.append(f"Content-Transfer-Encoding: {cte}")
    if draw(st.booleans()):
        headers.append('Content-Disposition: attachment; filename="' +
                       draw(st.sampled_from(["a.txt", "../x", "b.pdf", "=?utf-8?q?x?="])) + '"')
    body = "".join(draw(st.lists(st.one_of(BODY_TOKENS, st.text(max_size=30)), max_size=20)))
    return headers, body


@st.composite
def entity(draw, depth: int = 0) -> tuple[list[str], str | list, str | None, dict]:  # type: ignore[no-untyped-def,type-arg]
    if depth >= 4 or draw(st.integers(0, 3)) == 0:
        headers, body = draw(leaf())
        return headers, body, None, {}
    boundary = draw(BOUNDARIES)
    quoted = draw(st.booleans())
    b = f'"{boundary}"' if quoted else boundary
    headers = [f"Content-Type: multipart/{draw(st.sampled_from(['mixed', 'alternative', 'related', 'report']))}; boundary={b}"]
    children = draw(st.lists(entity(depth=depth + 1), max_size=4))
    style = {"preamble": draw(st.sampled_from(["", "preamble text", "--" + boundary + "x"])),
             "close": draw(st.booleans()), "epilogue": draw(st.sampled_from(["", "epilogue", "--Z"])),
             "double": draw(st.booleans())}
    return headers, children, boundary, style


def render(e, eol: str) -> str:  # type: ignore[no-untyped-def]
    headers, body, boundary, style = e
    out = eol.join(headers) + eol + eol
    if boundary is None:
        return out + body  # type: ignore[operator]
    if style["preamble"]:
        out += style["preamble"] + eol
    for child in body:
        out += "--" + boundary + eol
        if style["double"]:
            out += "--" + boundary + eol
        out += render(child, eol) + eol
    if style["close"]:
        out += "--" + boundary + "--" + eol + style["epilogue"]
    return out


@st.composite
def mime_message(draw) -> bytes:  # type: ignore[no-untyped-def]
    eol = draw(EOLS)
    sender = draw(st.sampled_from(["Jane <jane@citizen.example>", "a@b", '"x@y" <z@w>', "bad"]))
    top = [f"From: {sender}",
           f"To: request-1-abc@{DOMAIN}", "Subject: " + draw(st.text(max_size=20)).replace("\n", " ").replace("\r", " "),
           "MIME-Version: 1.0"]
    headers, body, boundary, style = draw(entity())
    text = eol.join(top) + eol + render((headers, body, boundary, style), eol)
    return text.encode("utf-8", "surrogatepass")


SENDERS = st.sampled_from([None, "", "jane@citizen.example", "MAILER-DAEMON@mx.example"])


@fuzz
@given(st.binary(max_size=4096), SENDERS)
def test_fuzz_arbitrary_bytes(raw: bytes, sender: str | None) -> None:
    m = parse_or_none(raw)
    if m is not None:
        classify(m, sender, our_domain=DOMAIN)
    assert_same_reading(raw)


@fuzz
@given(mime_message(), SENDERS)
def test_fuzz_structured_mime(raw: bytes, sender: str | None) -> None:
    m = parse_or_none(raw)
    if m is not None:
        for a in m.attachments:
            assert "/" not in a.filename and "\\" not in a.filename and "\x00" not in a.filename
        assert "mailflow-body-" not in m.text or "mailflow-body-" in raw.decode("utf-8", "replace")
        classify(m, sender, our_domain=DOMAIN)
    assert_same_reading(raw)


@fuzz
@given(st.lists(st.one_of(st.sampled_from([
    b"From: a@b.example\r\n", b"Content-Type: multipart/mixed; boundary=B\r\n",
    b"Content-Type: multipart/mixed; boundary=\"B\"\r\n", b"Content-Type: message/rfc822\r\n",
    b"Content-Transfer-Encoding: base64\r\n", b"Content-Transfer-Encoding: quoted-printable\r\n",
    b"\r\n", b"\n", b"\r", b"--B\r\n", b"--B--\r\n", b"--B", b"--B \t\r\n", b"QUJD\r\n",
    b"=E9=\r\n", b" folded\r\n", b"Content-Type: multipart/alternative;\r\n", b"boundary=C\r\n",
    b"--C\r\n", b"--C--\r\n", b"Content-Type: text/plain\r\n"]), st.binary(max_size=20)),
    max_size=80))
def test_fuzz_mime_shaped_noise_reads_as_the_stdlib_reads(chunks: list[bytes]) -> None:
    assert_same_reading(b"".join(chunks))


# -- redaction ---------------------------------------------------------------------------------
@dataclass
class _Thread:
    id: int = 7
    citizen_email: str = "jane.citizen@citizen.example"
    request_token: str = "k3y9x2m7q1w4"
    reply_token: str = "r8p5t6y2u3i9"
    confirm_token: str | None = None


THREAD = _Thread()
REDACTOR = Redactor([], thread_id=THREAD.id, authority="camden",
                    private=private_values(THREAD, DOMAIN))
SECRETS = [THREAD.citizen_email, THREAD.request_token, THREAD.reply_token,
           f"request-7-{THREAD.request_token}@{DOMAIN}", f"reply-7-{THREAD.reply_token}@{DOMAIN}"]
# The ways mail and HTML write an "@" that the redactor promises to see through.
AT_FORMS = ["@", "%40", "=40", "&#64;", "&#x40;", "&commat;", " at ", " [at] ", " (at) "]
INVISIBLE = "\u00ad\u200b\u2060\ufeff"     # what the redactor removes before matching


@st.composite
def secret_written(draw) -> str:  # type: ignore[no-untyped-def]
    value = draw(st.sampled_from(SECRETS))
    case = draw(st.sampled_from([str.lower, str.upper, str.title, lambda s: s]))
    value = case(value)
    if "@" in value:
        value = value.replace("@", draw(st.sampled_from(AT_FORMS)), 1)
    if draw(st.booleans()):   # zero-width characters people use to break auto-linking
        chars = list(value)
        for _ in range(draw(st.integers(1, 3))):
            chars.insert(draw(st.integers(0, len(chars))), draw(st.sampled_from(INVISIBLE)))
        value = "".join(chars)
    return value


AROUND = st.one_of(st.text(max_size=12), st.sampled_from(
    ["mailto:", "<", ">", "\"", "'", "(", ")", " ", "\n", "\r\n", ".", ",", ";", "&nbsp;",
     "<b>", "</b>", "<a href=\"mailto:", "\">", "<p>", "</p>", "x", "_", "-", "%", "&amp;"]))


def shown(text: str) -> str:
    """What a reader sees: entities decoded, invisible characters gone, case folded."""
    text = htmllib.unescape(text)
    text = "".join(c for c in text if unicodedata.category(c) != "Cf" and c != "\u00ad")
    return text.lower()


def leaked(text: str) -> list[str]:
    seen = shown(text)
    return [s for s in SECRETS if s.lower() in seen]


@fuzz
@given(st.lists(st.one_of(AROUND, secret_written()), max_size=12))
def test_fuzz_redacted_text_never_shows_a_private_value(chunks: list[str]) -> None:
    out = REDACTOR.text("".join(chunks))
    assert leaked(out) == [], out


class _Visible(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.attrs: list[str] = []
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag, attrs):  # type: ignore[no-untyped-def]
        self.tags.append((tag, attrs))
        self.attrs += [v or "" for _, v in attrs]

    handle_startendtag = handle_starttag

    def handle_data(self, data):  # type: ignore[no-untyped-def]
        self.text.append(data)


def visible(fragment: str) -> _Visible:
    v = _Visible()
    v.feed(fragment)
    v.close()
    return v


@fuzz
@given(st.lists(st.one_of(AROUND, secret_written()), max_size=12))
def test_fuzz_redacted_html_never_shows_a_private_value(chunks: list[str]) -> None:
    out = redact_html("".join(chunks), REDACTOR)
    v = visible(out)
    assert leaked("".join(v.text)) == [], out
    assert leaked(" ".join(v.attrs)) == [], out


# -- the sanitiser and the page -----------------------------------------------------------------
HOSTILE_HTML = st.sampled_from([
    "<script>alert(1)</script>", "<scr<script>ipt>alert(1)</script>", "<SCRIPT SRC=//x.js>",
    "<img src=x onerror=alert(1)>", "<a href='javascript:alert(1)'>x</a>",
    "<a href='jav&#x09;ascript:alert(1)'>x</a>", "<a href=' javascript:alert(1)'>x</a>",
    "<a href=\"&#106;avascript:alert(1)\">x</a>", "<a href='JaVaScRiPt:alert(1)'>x</a>",
    "<a href='vbscript:msgbox(1)'>x</a>", "<a href='data:text/html,<script>alert(1)</script>'>x</a>",
    "<a href='java\nscript:alert(1)'>x</a>", "<a href=//evil.example>x</a>",
    "<svg onload=alert(1)>", "<svg><script>alert(1)</script></svg>", "<math><mi xlink:href=javascript:alert(1)>",
    "<iframe srcdoc='<script>alert(1)</script>'>", "<object data=javascript:alert(1)>",
    "<embed src=javascript:alert(1)>", "<base href=javascript:alert(1)//>",
    "<meta http-equiv=refresh content='0;url=javascript:alert(1)'>", "<form action=javascript:alert(1)><button>",
    "<div style=\"background:url(javascript:alert(1))\">", "<style>@import 'javascript:alert(1)'</style>",
    "<!--<script>alert(1)</script>-->", "<![CDATA[<script>alert(1)</script>]]>", "<p title=\"\" onmouseover=alert(1)>",
    "<a href=\"https://ok.example/\" onclick=alert(1)>ok</a>", "<table background=javascript:alert(1)>",
    "<input onfocus=alert(1) autofocus>", "<details open ontoggle=alert(1)>", "<video><source onerror=alert(1)>",
    "<body onload=alert(1)>", "<p>text</p>", "<a href='mailto:jane.citizen@citizen.example'>me</a>",
    "<td colspan=\"2 onmouseover=alert(1)\">", "<noscript><p title=\"</noscript><img src=x onerror=alert(1)>\">",
    "<a href=\"http://x.example/?q=\" onmouseover=\"alert(1)\">", "\"><script>alert(1)</script>", "'", "<", ">",
    "<template><script>alert(1)</script></template>", "<xmp><script>alert(1)</script></xmp>",
    "<a href='javascript&colon;alert(1)'>x</a>", "<a href='&#x6A;avascript:alert(1)'>x</a>"])
SAFE_SCHEMES = ("http:", "https:", "mailto:")
URL_ATTRS = {"href", "src", "action", "formaction", "data", "background", "poster", "xlink:href",
             "srcdoc", "content", "style", "codebase", "dynsrc", "lowsrc"}
BAD_TAGS = {"script", "style", "iframe", "object", "embed", "svg", "math", "base", "meta", "form",
            "link", "template", "frame", "frameset", "applet", "input", "button", "body", "video",
            "source", "img", "xmp", "noscript", "textarea", "select"}


def assert_inert(fragment: str) -> None:
    """No tag that runs or loads anything, no event handler, no URL but http(s) and mailto."""
    v = visible(fragment)
    for tag, attrs in v.tags:
        assert tag not in BAD_TAGS, (tag, fragment)
        for name, value in attrs:
            assert not name.startswith("on"), (name, fragment)
            assert name != "style", fragment
            if name in URL_ATTRS:
                url = re.sub(r"[\x00-\x20]", "", htmllib.unescape(value or "")).lower()
                assert url.startswith(SAFE_SCHEMES) or name not in ("href", "src"), (url, fragment)
                assert name in ("href",), (name, fragment)
    assert "<script" not in fragment.lower()
    assert not re.search(r"(?i)\bjavascript\s*:", htmllib.unescape(" ".join(v.attrs)))


@fuzz
@given(st.lists(st.one_of(HOSTILE_HTML, st.text(max_size=10)), max_size=10))
def test_fuzz_sanitised_html_is_inert(chunks: list[str]) -> None:
    assert_inert(sanitise_html("".join(chunks)))
    assert_inert(redact_html("".join(chunks), REDACTOR))


ENV = make_env(None)
MACRO = ENV.from_string('{% import "archive/_macros.html" as mac %}{{ mac.message(m, "../") }}')


def page_of(raw: bytes) -> str | None:
    """A message as the archive shows it (the steps of context.message_view, then the
    template's `message` macro)."""
    m = parse_or_none(raw)
    if m is None:
        return None
    red = REDACTOR
    html = redact_html(m.html, red) if m.html and not m.text.strip() else None
    main, folded = fold(red.text(m.text if html is None else ""))
    atts = tuple(AttachmentView(n, red.filename(a.filename), a.content_type, a.size, None,
                                "withheld for the test") for n, a in enumerate(m.attachments, 1))
    view = MessageView(1, "response", "in", red.text(m.from_name or "FOI officer"),
                       datetime(2030, 1, 1, tzinfo=timezone.utc), subject=red.text(m.subject),
                       text=main, folded=folded, html=html, attachments=atts)
    return MACRO.render(m=view)


def hostile_page_message(chunks: list[str], html: bool) -> bytes:
    body = "".join(chunks)
    ctype = "text/html" if html else "text/plain"
    return (f"From: =?utf-8?q?=3Cscript=3Ealert(1)=3C/script=3E?= <foi@camden.example>\r\n"
            f"To: request-7-{THREAD.request_token}@{DOMAIN}\r\n"
            f"Subject: <img src=x onerror=alert(1)> {THREAD.citizen_email}\r\n"
            f"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
            f"Content-Type: {ctype}; charset=utf-8\r\n\r\n{body}\r\n--B\r\n"
            f"Content-Type: text/plain\r\nContent-Disposition: attachment; "
            f"filename=\"<script>alert(1)</script>{THREAD.citizen_email}.txt\"\r\n\r\nx\r\n--B--\r\n"
            ).encode("utf-8", "surrogatepass")


@fuzz
@given(st.lists(st.one_of(HOSTILE_HTML, secret_written(), AROUND), max_size=10), st.booleans())
def test_fuzz_a_rendered_message_is_inert_and_redacted(chunks: list[str], html: bool) -> None:
    page = page_of(hostile_page_message(chunks, html))
    assert page is not None
    assert_inert(page)
    v = visible(page)
    assert leaked("".join(v.text)) == [], page
    assert leaked(" ".join(v.attrs)) == [], page


@fuzz
@given(st.text(max_size=200))
@example("see http://x.example/\"onmouseover=alert(1)// and https://y.example/<script>")
def test_fuzz_text_with_links_is_inert(text: str) -> None:
    assert_inert(str(text_html(text)))


# -- findings, as named regression tests --------------------------------------------------------
# (Each was found by one of the properties above, or while writing them.)

def test_regression_token_in_a_base64_part_is_not_read_as_its_body() -> None:
    """While writing the scanner: a body token the stdlib did not see as a whole payload (it
    decoded it as base64 instead) went unnoticed; _same_structure now checks every part."""
    raw = (b"From: a@b.example\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
           + b"".join(b"--B\r\nContent-Transfer-Encoding: base64\r\n\r\nThis is text\r\n"
                      for _ in range(12)) + b"--B--\r\n")
    assert_same_reading(raw)


def test_regression_multipart_without_boundary_keeps_its_last_line_break() -> None:
    """Found on the corpus (sisimai lhost-apachejames-01): the stdlib keeps the final line
    break of a multipart part that has no boundary parameter."""
    raw = (b"From: a@b.example\r\nContent-Type: multipart/mixed; boundary=\"A\"\r\n\r\n--A\r\n"
           b"Content-Type: multipart/alternative;\r\nboundary=\"C\"\r\n\r\n--C\r\n"
           b"Content-Type: text/plain\r\n\r\nbody\r\n--C--\r\n\r\n--A--\r\n")
    assert_same_reading(raw)


def test_regression_unquoted_boundary_ends_at_an_equals_sign() -> None:
    """Found on the corpus (mikel-mail raw_email_with_illegal_boundary): `boundary=----=_x`
    is "----" to the stdlib, so it is to the scanner."""
    raw = (b"From: a@b.example\r\nContent-Type: multipart/mixed; boundary=----=_NextPart_1\r\n"
           b"\r\n------=_NextPart_1\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
           b"------=_NextPart_1--\r\n")
    assert_same_reading(raw)
