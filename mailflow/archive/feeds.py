"""Atom feeds (site, authority, thread, fault reports), the sitemap and robots.txt, from the
public view.

XML is built with ElementTree, which escapes every text and attribute, so a subject such as
`</title><script>` stays text in a feed reader. Characters XML 1.0 cannot carry at all
(control characters that hostile mail can put in a subject) are dropped first, or the feed
would be unreadable. Output is deterministic (no build time anywhere) so an unchanged feed is
byte-for-byte unchanged and the writer leaves it alone.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Any

from mailflow.archive.context import MessageView, SiteView, ThreadView

ATOM = "http://www.w3.org/2005/Atom"
SITEMAP = "http://www.sitemaps.org/schemas/sitemap/0.9"
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
FEED_SIZE = 50


def xml_text(s: str) -> str:
    return _NOT_XML.sub("", s)


def _iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, f"{{{ATOM}}}{tag}", {k: xml_text(v) for k, v in attrs.items()})
    if text is not None:
        el.text = xml_text(text)
    return el


def summary(m: MessageView, limit: int = 600) -> str:
    if m.placeholder:
        return m.placeholder
    if m.text:
        body = m.text
    elif m.html:
        from mailflow.mail.parse import html_to_text
        body = html_to_text(m.html)
    else:
        body = ""
    body = " ".join(body.split())
    return body if len(body) <= limit else body[:limit].rsplit(" ", 1)[0] + " …"


@dataclass(frozen=True)
class Entry:
    """One Atom entry: `id` and `link` are full URLs."""
    id: str
    title: str
    updated: datetime
    link: str
    author: str
    summary: str


def atom_feed(*, title: str, base_url: str, page: str, feed: str, entries: Iterable[Entry],
              author: str) -> bytes:
    """One Atom feed of the newest FEED_SIZE `entries`: `page` and `feed` are paths under
    the site (e.g. "area/north/"). Entries updated at the same moment keep their order."""
    items = sorted(entries, key=lambda e: e.updated, reverse=True)[:FEED_SIZE]
    ET.register_namespace("", ATOM)
    root = ET.Element(f"{{{ATOM}}}feed")
    _sub(root, "id", base_url + page)
    _sub(root, "title", title)
    _sub(root, "updated", _iso(items[0].updated if items else EPOCH))
    _sub(root, "link", rel="self", type="application/atom+xml", href=base_url + feed)
    _sub(root, "link", rel="alternate", type="text/html", href=base_url + page)
    _sub(_sub(root, "author"), "name", author)
    for item in items:
        e = _sub(root, "entry")
        _sub(e, "id", item.id)
        _sub(e, "title", item.title)
        _sub(e, "updated", _iso(item.updated))
        _sub(e, "link", rel="alternate", type="text/html", href=item.link)
        _sub(_sub(e, "author"), "name", item.author)
        _sub(e, "summary", item.summary, type="text")
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def message_entries(pairs: Iterable[tuple[Any, MessageView]], base_url: str,
                    limit: int | None = None) -> list[Entry]:
    """An entry per (thread, message), newest first (by time, then message number); with
    `limit`, only the newest so many (a feed shows FEED_SIZE: the site's feed need not
    summarise all 50,000 messages of a big site to show 50)."""
    items = sorted(pairs, key=lambda e: (e[1].at, e[1].pk), reverse=True)
    if limit is not None:
        items = items[:limit]
    return [Entry(f"{base_url}{t.id_path}#m{m.pk}", f"{m.kind_words}: {t.title}", m.at,
                  f"{base_url}{t.path}#m{m.pk}", m.sender, summary(m)) for t, m in items]


def atom(*, title: str, base_url: str, page: str, feed: str,
         entries: Iterable[tuple[ThreadView, MessageView]], author: str) -> bytes:
    """One Atom feed of messages: `page` and `feed` are paths under the site (e.g.
    "request/1-x/")."""
    return atom_feed(title=title, base_url=base_url, page=page, feed=feed, author=author,
                     entries=message_entries(entries, base_url, FEED_SIZE))


def report_entries(reports: Iterable[Any], base_url: str) -> list[Entry]:
    """A fault report's feed entries: the report as sent, each public message after it, and
    its fix (the fix has no message of its own: the citizen said so in a reply to us)."""
    out = message_entries([(r, m) for r in reports for m in r.messages
                           if m.placeholder is None], base_url)
    for r in reports:
        if r.is_fixed and r.fixed_at is not None:
            out.append(Entry(f"{base_url}{r.id_path}#fixed", f"Fixed: {r.title}", r.fixed_at,
                             f"{base_url}{r.path}#fixed", r.reporter,
                             f"Marked as fixed on {r.fixed_at.date().isoformat()}."))
    return out


def thread_entries(threads: Iterable[ThreadView]) -> list[tuple[ThreadView, MessageView]]:
    return [(t, m) for t in threads for m in t.messages if m.placeholder is None]


def _xml_escape(s: str) -> str:
    """Text as ElementTree escapes it in an element (&, < and >)."""
    return xml_text(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def sitemap(site: SiteView, pages: Iterable[tuple[str, date | None]]) -> bytes:
    """The sitemap, byte for byte what ElementTree writes, built as a string (it lists every
    page of the site, and is written every build)."""
    base = _xml_escape(site.base_url)
    out = [f"<?xml version='1.0' encoding='utf-8'?>\n<urlset xmlns=\"{SITEMAP}\">"]
    for path, lastmod in pages:
        out.append(f"<url><loc>{base}{_xml_escape(path)}</loc>"
                   + (f"<lastmod>{lastmod.isoformat()}</lastmod></url>" if lastmod is not None
                      else "</url>"))
    out.append("</urlset>\n")
    return "".join(out).encode("utf-8")


def sitemap_index(site: SiteView, parts: Iterable[str]) -> bytes:
    """The sitemap index (`sitemap.xml`): the site's sitemap is in parts (`sitemap/`), so
    that a new message rewrites one part of it, not a list of every page."""
    base = _xml_escape(site.base_url)
    out = [f"<?xml version='1.0' encoding='utf-8'?>\n<sitemapindex xmlns=\"{SITEMAP}\">"]
    out.extend(f"<sitemap><loc>{base}{_xml_escape(rel)}</loc></sitemap>" for rel in parts)
    out.append("</sitemapindex>\n")
    return "".join(out).encode("utf-8")


def _sitemap_et(site: SiteView, pages: Iterable[tuple[str, date | None]]) -> bytes:
    """The same with ElementTree (the tests compare the two)."""
    ET.register_namespace("", SITEMAP)
    root = ET.Element(f"{{{SITEMAP}}}urlset")
    for path, lastmod in pages:
        url = ET.SubElement(root, f"{{{SITEMAP}}}url")
        ET.SubElement(url, f"{{{SITEMAP}}}loc").text = xml_text(site.base_url + path)
        if lastmod is not None:
            ET.SubElement(url, f"{{{SITEMAP}}}lastmod").text = lastmod.isoformat()
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def robots(base_url: str) -> str:
    return ("User-agent: *\n"
            "Allow: /\n"
            "Disallow: /.mailflow-cache/\n"
            f"Sitemap: {base_url}sitemap.xml\n")
