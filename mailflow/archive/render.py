"""Pages and JSON twins from the public view: Jinja2 templates in `templates/archive/`.

Templates are looked up in the site's own templates folder first, so a deployment restyles or
translates any page by overriding one file. Autoescaping is on for every .html template; the
only markup that reaches a page unescaped is what this module builds itself (text with line
breaks and links, the chart) and mail HTML that has been through the sanitiser. Links are
relative (`root` is "../" per level), so the archive works from any sub-path, from a bucket
or from a folder on disk. Visible text goes through gettext (Jinja2's i18n extension): with no
catalogue installed it is English as written.
"""
from __future__ import annotations

import functools
import re
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

from babel.dates import format_date
from jinja2 import Environment
from markupsafe import Markup, escape

from mailflow.archive.charts import record_chart
from mailflow.archive.context import (LIST_STATES, AuthorityView, MessageView, SiteView,
                                      ThreadView)
from mailflow import templating
from mailflow.templating import make_environment

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "object-src 'none'; base-uri 'none'; form-action 'self'")
# Pagefind's search runs WebAssembly, which a CSP must allow by name; only the search page
# gets this, and it still allows no inline script and nothing from another host.
SEARCH_CSP = CSP.replace("script-src 'self'", "script-src 'self' 'wasm-unsafe-eval'")

_URL = re.compile(r"\bhttps?://[^\s<>\"'\]\[()]+[^\s<>\"'\]\[().,;:!?]", re.I)


def _locale(language: str) -> str:
    return {"en": "en_GB"}.get(language, language)


@functools.lru_cache(maxsize=8192)
def _day(d: date, form: str, locale: str) -> str:
    """Babel's format_date, once per day, form and locale (a build formats a date for every
    message; a site's messages fall on a few hundred days)."""
    return format_date(d, format=form, locale=locale)


def short_date(d: date | datetime | None, language: str = "en") -> str:
    if d is None:
        return ""
    if isinstance(d, datetime):
        d = d.astimezone(timezone.utc).date()
    return _day(d, "medium", _locale(language))


def long_datetime(dt: datetime, language: str = "en") -> str:
    """Absolute, in UTC, with the weekday: "Monday 1 March 2027, 10:00 UTC"."""
    dt = dt.astimezone(timezone.utc)
    return f"{_day(dt.date(), 'full', _locale(language))}, {dt:%H:%M} UTC"


def iso(d: date | datetime) -> str:
    if isinstance(d, datetime):
        return d.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    return d.isoformat()


def text_html(text: str) -> Markup:
    """Plain text as HTML: escaped, web addresses made links (rel=nofollow: an archive of
    strangers' mail must not lend its reputation to their links)."""
    out, last = [], 0
    for m in _URL.finditer(text):
        out.append(escape(text[last:m.start()]))
        url = m.group(0)
        out.append(Markup('<a href="{0}" rel="nofollow noopener noreferrer">{0}</a>').format(url))
        last = m.end()
    out.append(escape(text[last:]))
    return Markup("").join(out)


def filesize(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    size = float(n)
    for unit in ("KB", "MB", "GB"):
        size /= 1024
        if size < 1024 or unit == "GB":
            break
    return f"{size:.1f} {unit}" if size < 10 else f"{size:.0f} {unit}"


def make_env(override: Path | None, language: str = "en") -> Environment:
    """The site's template environment (i18n in the site's language) plus the archive's
    filters. `mail_html` marks HTML as safe: only `redact_html` output reaches it."""
    env = make_environment(override, language)
    env.filters.update(short_date=lambda d: short_date(d, language),
                       long_date=lambda d: d and templating.long_date(d, language) or "",
                       long_datetime=lambda d: long_datetime(d, language),
                       iso=iso, text_html=text_html, filesize=filesize, mail_html=Markup)
    env.globals.update(LIST_STATES=LIST_STATES, record_chart=record_chart)
    return env


@functools.lru_cache(maxsize=8)
def _shared_env(override: Path | None, language: str) -> Environment:
    """One environment per templates folder and language for the life of the process, so
    the daemon's builds do not compile every template again (Jinja2 still reloads a template
    whose file changed: `auto_reload`)."""
    return make_env(override, language)


class Renderer:
    def __init__(self, site: SiteView, override: Path | None = None, lang: str = "en"):
        self.site = site
        self.env = _shared_env(override, lang)
        self.lang = lang

    def page(self, template: str, path: str, *, csp: str = CSP, **context: Any) -> str:
        """Render `template` for the file at `path` (e.g. "request/1-x/index.html")."""
        root = "../" * path.count("/") or "./"
        return self.env.get_template(f"archive/{template}").render(
            site=self.site, root=root, path=path, csp=csp, lang=self.lang,
            canonical=self.site.base_url + (path[:-len("index.html")]
                                            if path.endswith("index.html") else path),
            **context)

    def static(self, name: str) -> str:
        """A static file (style.css, search.js), overridable like any template."""
        assert self.env.loader is not None
        source, _, _ = self.env.loader.get_source(self.env, f"archive/static/{name}")
        return source


# -- JSON twins --------------------------------------------------------------------------------
def message_json(m: MessageView, base_url: str) -> dict[str, Any]:
    d: dict[str, Any] = {"id": m.pk, "kind": m.kind, "direction": m.direction,
                         "from": m.sender, "date": iso(m.at)}
    if m.placeholder:
        d.update(hidden=True, note=m.placeholder)
        return d
    d.update(subject=m.subject, text=m.text, quoted=m.folded, html=m.html)
    d["attachments"] = [
        {"filename": a.filename, "content_type": a.content_type, "size": a.size,
         **({"withheld": a.withheld} if a.withheld else {"url": base_url + (a.path or "")})}
        for a in m.attachments]
    if m.dkim is not None:
        d["dkim"] = {"verified": m.dkim.verified, "domain": m.dkim.domain}
    return d


def thread_json(t: ThreadView, base_url: str) -> dict[str, Any]:
    return {
        "id": t.id, "url": base_url + t.path, "title": t.title,
        "authority": {"slug": t.authority, "name": t.authority_name,
                      "url": f"{base_url}body/{t.authority}/"},
        "law": {"id": t.law_id, "name": t.law_name},
        "state": t.state, "status": t.list_state, "status_words": t.state_words,
        "requester": t.requester, "sent": iso(t.sent),
        "due": iso(t.due) if t.due else None,
        "very_late": iso(t.very_late) if t.very_late else None,
        "due_working": list(t.working),
        "first_response": iso(t.first_response) if t.first_response else None,
        "answered": t.answered_in_time,
        "messages": [message_json(m, base_url) for m in t.messages],
    }


def authority_json(a: AuthorityView, base_url: str) -> dict[str, Any]:
    r = a.record
    return {
        "slug": a.slug, "name": a.name, "url": base_url + a.path, "website": a.url or None,
        "emails": list(a.emails), "law": a.law_name, "tags": list(a.tags),
        "record": {"requests": r.total, "on_time": r.on_time, "late": r.late,
                   "very_late": r.very_late, "no_answer": r.no_answer,
                   "median_days_to_answer": r.median_days, "words": r.words()},
        "requests": [{"id": t.id, "title": t.title, "url": base_url + t.path,
                      "status": t.list_state, "sent": iso(t.sent),
                      "first_response": iso(t.first_response) if t.first_response else None}
                     for t in a.threads],
    }
