"""HTML mail made safe to show in the public archive: an explicit allow-list, nothing that loads.

HTML mail is written by anyone, so it is treated as hostile. nh3 (ammonia) parses it the way a
browser does and keeps only the tags and attributes listed here. Nothing kept can run script or
load a resource: no <img> (a remote image is a tracking pixel that tells the sender who reads
the archive; inline cid: images are listed as attachments instead), no style attributes or
<style> (CSS can load URLs), no forms, no SVG or MathML (their own script and parsing rules).
The only URL left is a link's href, and only with an http, https or mailto scheme.

`redact_html` is the one way to put redacted HTML on a page: sanitise, redact, sanitise again
(a rule's replacement is then escaped like any text), and check the text a reader would see,
where a secret split across tags (`jane<b></b>@example.org`) would slip past redaction.
"""
from __future__ import annotations

import html as htmllib
import re
from html.parser import HTMLParser
from urllib.parse import unquote

import nh3

from mailflow.core.redaction import Redactor

INLINE_TAGS = frozenset({"span", "b", "i", "u", "strong", "em", "code", "a", "sub", "sup"})
ALLOWED_TAGS = INLINE_TAGS | frozenset({
    "p", "br", "div", "blockquote", "pre", "ul", "ol", "li", "hr",
    "table", "thead", "tbody", "tr", "td", "th", "h1", "h2", "h3", "h4", "h5", "h6"})
ALLOWED_ATTRIBUTES = {"a": {"href", "title"}, "td": {"colspan", "rowspan"},
                      "th": {"colspan", "rowspan"}}
URL_SCHEMES = frozenset({"http", "https", "mailto"})
LINK_REL = "nofollow noopener noreferrer"
# Removed with everything inside them: their content is code, styling or hidden, not text.
REMOVED_WITH_CONTENT = frozenset({
    "script", "style", "template", "noscript", "title", "head", "textarea", "select",
    "iframe", "frame", "frameset", "noframes", "object", "embed", "applet", "svg", "math",
    "xmp", "noembed", "plaintext", "canvas", "audio", "video"})

_SCHEME_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")
_CONTROL_RE = re.compile(r"[\x00-\x20\x7f-\x9f]")
_SPAN_RE = re.compile(r"^[1-9][0-9]{0,2}$")
# Text that would be code if it ever reached a URL or CSS context: written as character
# references, which read the same in the page but are inert if mis-used downstream.
_SCRIPT_SCHEME_RE = re.compile(r"(?i)\b((?:java|vb|live)script\s*):")
_CSS_CALL_RE = re.compile(r"(?i)\b((?:url|expression|image-set)\s*)\(")


def _attribute_filter(tag: str, attr: str, value: str) -> str | None:
    """A second check on the attributes nh3 kept. Must never raise (nh3 would report it)."""
    if attr == "rel" and tag == "a":
        return LINK_REL
    if attr not in ALLOWED_ATTRIBUTES.get(tag, ()):
        return None
    if attr == "href":
        m = _SCHEME_RE.match(value.strip())
        # Relative links point into our own archive; a control character in a URL is a trick.
        if m is None or m.group(1).lower() not in URL_SCHEMES or _CONTROL_RE.search(value.strip()):
            return None
        return value.strip()
    if attr in ("colspan", "rowspan"):
        return value if _SPAN_RE.match(value.strip()) else None
    if attr == "title":
        return value
    return None


def _clean(html: str, tags: frozenset[str]) -> str:
    out = nh3.clean(html, tags=set(tags), clean_content_tags=set(REMOVED_WITH_CONTENT),
                    # "*": nothing on every tag (nh3 would otherwise keep `lang` and `title`)
                    attributes={"*": set()} | {t: set(a) for t, a in ALLOWED_ATTRIBUTES.items()
                                               if t in tags},
                    attribute_filter=_attribute_filter, strip_comments=True, link_rel=LINK_REL,
                    url_schemes=set(URL_SCHEMES))
    out = _SCRIPT_SCHEME_RE.sub(r"\1&#58;", out)
    return _CSS_CALL_RE.sub(r"\1&#40;", out)


def sanitise_html(html: str) -> str:
    """An HTML fragment keeping only the allow-listed tags and attributes (see module doc)."""
    return _clean(html, ALLOWED_TAGS)


# ------------------------------------------------------------------------------------ redacting

_BLOCK_TAGS = ALLOWED_TAGS - INLINE_TAGS


class _Visible(HTMLParser):
    """The text a reader sees (block tags break it) and the link targets and titles."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.attrs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")
        for name, value in attrs:
            if value and name in ("href", "title"):
                self.attrs += [value, unquote(value)]

    def handle_endtag(self, tag: str) -> None:
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def _visible(html: str) -> _Visible:
    v = _Visible()
    v.feed(html)
    v.close()
    return v


def _leaks(html: str, redactor: Redactor) -> bool:
    v = _visible(html)
    return any(redactor.changes(t) for t in ["".join(v.parts), *v.attrs])


def redact_html(html: str, redactor: Redactor) -> str:
    """Sanitised HTML with everything private replaced by its label.

    When a secret is still visible (split by inline tags), the inline formatting is dropped and
    the text redacted again; failing that, the message is shown as escaped plain text.
    """
    out = sanitise_html(redactor.html(sanitise_html(html)))
    if not _leaks(out, redactor):
        return out
    out = _clean(redactor.html(_clean(out, _BLOCK_TAGS)), _BLOCK_TAGS)
    if not _leaks(out, redactor):
        return out
    text = redactor.text(re.sub(r"\n{3,}", "\n\n", "".join(_visible(out).parts)).strip())
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    return "".join("<p>" + htmllib.escape(p.strip()).replace("\n", "<br>") + "</p>"
                   for p in paragraphs)
