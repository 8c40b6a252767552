"""Fault reports in the public archive: each report's view, the lists by area and category,
the maps, and an authority's record of fixing what it was sent.

A report is a thread of kind "report" and is made public the way an FOI request is, by the
same machinery in `context`: only once it went to the authority (never while mailflow is still
asking the citizen for details, nor a report the site does not cover), with the same redaction
of the citizen's address and the thread's secrets, the same choice of messages (the report as
sent to the authority and its replies, never the citizen's own mail to mailflow) and the same
attachment checks, so a photo is published re-encoded without its EXIF or not at all. The
precise location is public, as on FixMyStreet: it is what the authority needs and what a
neighbour reads to see whether their pothole is already reported.
"""
from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import date, datetime, timezone
from typing import Any

import shapely
from markupsafe import Markup

from mailflow.archive import maps
from mailflow.archive import context as C
from mailflow.archive.context import AttachmentView, MessageView, N_, ThreadFiles
from mailflow.core.redaction import Redactor

# Report states that mean it has not gone to an authority (or never will): never public.
NOT_PUBLIC_STATES = frozenset({"awaiting_details", "awaiting_confirmation", "awaiting_approval",
                               "awaiting_routing", "awaiting_address", "not_approved",
                               "not_covered"})
REPORT_STATES: dict[str, str] = {"open": N_("open"), "fixed": N_("fixed"),
                                 "user_withdrawn": N_("withdrawn by the reporter")}
FIXED_NOTE = N_("Marked as fixed")
# How mailflow knows where the problem is (reports.location_source), as the page says it.
LOCATION_SOURCES: dict[str, str] = {
    "text": N_("from coordinates in the report"),
    "exif": N_("from the location recorded in a photo"),
    "gazetteer": N_("from a place name or postcode in the report"),
    "reply": N_("given by the reporter when asked"),
}
# What a report's history says, FixMyStreet's "updates" (templates/archive/report.html).
HISTORY_WORDS: dict[str, str] = {
    "sent": N_("Sent to %(name)s"),
    "sent_on": N_("Sent on to %(name)s"),
    "category": N_("Category changed from %(was)s to %(name)s"),
    "moved": N_("Location corrected"),
    "fixed": N_("Marked as fixed"),
    "reopened": N_("Reopened: not fixed"),
    "withdrawn": N_("Withdrawn"),
}
HISTORY_BY: dict[str, str] = {"reporter": N_("by the reporter"),
                              "site": N_("by the site's moderators")}
NO_AREA = N_("No area")
NO_CATEGORY = N_("Uncategorised")


def is_public(thread: Any) -> bool:
    """A fault report that went to an authority and was not hidden by a moderator."""
    return (getattr(thread, "kind", "") == "report" and thread.sent_at is not None
            and thread.state not in NOT_PUBLIC_STATES and not getattr(thread, "hidden", False))


def _utc(dt: datetime | None) -> datetime | None:
    if dt is not None and dt.tzinfo is None:
        return dt.replace(tzinfo=timezone.utc)
    return dt


@dataclass(frozen=True)
class HistoryEntry:
    """One change in a public report's life: where it was sent, what the site corrected, and
    the reporter's or a moderator's change of its state. No addresses, coordinates or
    reasons: the page shows the report's current place, and an admin's reason is for the
    audit log, not the public."""
    at: datetime
    what: str        # a key of HISTORY_WORDS
    by: str = ""     # reporter | site | "" (mailflow itself)
    name: str = ""   # the authority it was sent to, or the new category
    was: str = ""    # the category before

    @property
    def words(self) -> str:
        """In English, for the JSON twin; the page says it through gettext."""
        text = HISTORY_WORDS[self.what] % {"name": self.name, "was": self.was}
        return text + (" " + HISTORY_BY[self.by] if self.by in HISTORY_BY else "")


def history(events: Iterable[dict[str, Any]], authority_name: Callable[[str], str],
            category_name: Callable[[str], str]) -> tuple[HistoryEntry, ...]:
    """The report's public history from its thread events (`Tx.events`), from when it was
    first sent: what happened before (routing, questions to the reporter) is mailflow's
    business with the reporter. A state change is listed only when it changed the state (a
    second "fixed" from the reporter is not news)."""
    out: list[HistoryEntry] = []
    sent_to: str | None = None
    state = "open"
    for e in events:
        kind, detail, actor = e["kind"], e.get("detail") or {}, e.get("actor") or ""
        by = "reporter" if actor == "citizen" else "site" if actor.startswith("admin:") else ""
        if kind == "report_sent":
            to = str(detail.get("authority") or "")
            if to != sent_to:
                out.append(HistoryEntry(e["at"], "sent" if sent_to is None else "sent_on",
                                        name=authority_name(to)))
            sent_to, state = to, "open"
        elif sent_to is None:
            continue
        elif kind == "report_corrected":
            was, now = detail.get("from") or {}, detail.get("to") or {}
            if now.get("category") and now.get("category") != was.get("category"):
                out.append(HistoryEntry(e["at"], "category", "site",
                                        name=category_name(str(now["category"])),
                                        was=category_name(str(was.get("category") or ""))))
            if "lat" in now or "lon" in now:
                out.append(HistoryEntry(e["at"], "moved", "site"))
        elif kind == "state":
            to = {"fixed": "fixed", "not_fixed": "open", "withdraw": "user_withdrawn"}.get(
                str(detail.get("command") or ""), str(detail.get("to") or ""))
            if to in ("open", "fixed", "user_withdrawn") and to != state:
                what = {"fixed": "fixed", "open": "reopened", "user_withdrawn": "withdrawn"}[to]
                out.append(HistoryEntry(e["at"], what, by))
                state = to
    return tuple(out)


@dataclass(frozen=True)
class ReportView:
    """One public fault report, redacted, as the pages show it."""
    id: int
    title: str
    category: str                      # slug ("" while unknown)
    category_name: str
    state: str                         # as stored: open, fixed, user_withdrawn…
    authority: str
    authority_name: str
    area: str                          # the area it was routed by ("" when unknown)
    area_name: str
    lat: float | None
    lon: float | None
    location_source: str
    location_text: str                 # what the citizen wrote that gave it, redacted
    reporter: str                      # the citizen's name, redacted (public as on FOI pages)
    sent_at: datetime
    fixed_at: datetime | None
    description: str
    description_note: str | None       # why the description is not shown (hidden), or None
    photos: tuple[AttachmentView, ...]
    messages: tuple[MessageView, ...]
    history: tuple[HistoryEntry, ...] = ()

    @property
    def path(self) -> str:
        """`report/<id>/`: no title in it, because the address is mailed to the reporter
        when the report is sent (mailflow/reports.py `report_url`) and must not change."""
        return f"report/{self.id}/"

    @property
    def id_path(self) -> str:
        """The stable part of a feed entry's id (it survives a change of title)."""
        return f"report/{self.id}"

    @property
    def sent(self) -> date:
        return self.sent_at.date()

    @property
    def fixed(self) -> date | None:
        return self.fixed_at.date() if self.fixed_at else None

    @property
    def is_fixed(self) -> bool:
        return self.state == "fixed"

    @property
    def is_open(self) -> bool:
        return self.state == "open"

    @property
    def status(self) -> str:
        """The state as a CSS/URL-friendly word: open, fixed, withdrawn, …"""
        return {"user_withdrawn": "withdrawn"}.get(self.state, self.state.replace("_", "-"))

    @property
    def state_words(self) -> str:
        return REPORT_STATES.get(self.state, self.state.replace("_", " "))

    @property
    def days_to_fix(self) -> int | None:
        """Days from sending to the report of the fix (calendar dates, as FOI answers are
        counted), only for a report that is fixed."""
        if not self.is_fixed or self.fixed_at is None:
            return None
        return max((self.fixed - self.sent).days, 0)

    @property
    def has_location(self) -> bool:
        return self.lat is not None and self.lon is not None

    @property
    def last_activity(self) -> datetime:
        times = [self.sent_at, *(m.at for m in self.messages)]
        if self.fixed_at is not None and self.is_fixed:
            times.append(self.fixed_at)
        return max(times)


@dataclass(frozen=True)
class ReportRecord:
    """An authority's record with reports: what it received, fixed, has open, and how fast."""
    received: int = 0
    fixed: int = 0
    open: int = 0
    median_days: float | None = None

    @property
    def other(self) -> int:
        """Closed without a fix (withdrawn by the reporter)."""
        return self.received - self.fixed - self.open

    def words(self) -> str:
        """In English, for the JSON twin; the page says it through the templates' gettext."""
        parts = [f"Of {C._n(self.received, 'report')}, {self.fixed} fixed and "
                 f"{self.open} still open."]
        if self.median_days is not None:
            parts.append(f"The median time to fix was {C._n(self.median_days, 'day')}.")
        return " ".join(parts)


def report_record(reports: Iterable[ReportView]) -> ReportRecord:
    reports = list(reports)
    days = [r.days_to_fix for r in reports if r.days_to_fix is not None]
    return ReportRecord(received=len(reports), fixed=sum(r.is_fixed for r in reports),
                        open=sum(r.is_open for r in reports),
                        median_days=statistics.median(days) if days else None)


# -- building one report's view -----------------------------------------------------------------
def report_view(inp: C.ThreadInput, report: Any, *, authority_name: str, category_name: str,
                area_name: str, red: Redactor, verify: C.Verifier,
                history: tuple[HistoryEntry, ...] = ()) -> tuple[ReportView, ThreadFiles]:
    """The public view of one report and the files it publishes (its photos and other
    attachments). `report` is the store's Report row (or None for a thread without one)."""
    t = inp.thread
    assert t.sent_at is not None
    title = red.text(t.title)
    base = f"report/{t.id}/"
    files = ThreadFiles()
    shown = [m for m in inp.messages if (m.direction, m.kind) in C.SHOWN]
    released = frozenset((int(e["detail"]["message_id"]), int(e["detail"]["n"]))
                         for e in inp.events if e["kind"] == "attachment_released")
    messages = []
    for m in shown:
        v = C.message_view(m, t, inp.raw, authority_name=authority_name, red=red, verify=verify,
                           base=base, files=files, released=released)
        # The first letter to the authority is the report itself.
        messages.append(replace(v, kind="report") if v.kind == "request" else v)
    # What she wrote, without the signature or a quoted mail below it (as a message shows);
    # nothing of it when the report as sent is hidden by a moderator or asked not to be
    # archived (the description is in that letter, so it goes with it).
    sent = next((m for m in messages if m.kind == "report"), None)
    note = sent.placeholder if sent is not None else None
    description = "" if note else (C.fold(red.text(t.body))[0] if (t.body or "").strip()
                                   else sent.text if sent else "")
    photos = tuple(a for m in messages if m.direction == "out" for a in m.attachments
                   if a.path and a.content_type.startswith("image/"))
    r = report
    view = ReportView(
        id=t.id, title=title, category=(r.category if r else None) or "",
        category_name=category_name, state=t.state, authority=t.authority,
        authority_name=authority_name, area=(r.area if r else None) or "", area_name=area_name,
        lat=r.lat if r else None, lon=r.lon if r else None,
        location_source=(r.location_source if r else None) or "",
        location_text=red.text((r.location_text if r else None) or ""),
        reporter=red.text(t.citizen_name), sent_at=_utc(t.sent_at),  # type: ignore[arg-type]
        fixed_at=_utc(r.fixed_at) if r else None, description=description,
        description_note=note, photos=photos, messages=tuple(messages), history=history)
    return view, files


def fingerprint_data(report: Any, category_name: str, area_name: str,
                     history: tuple[HistoryEntry, ...] = ()) -> list[Any]:
    """What of the report row and its rules a report's view is made from (for the cache)."""
    return [asdict(report) if report is not None else None, category_name, area_name,
            [asdict(h) for h in history]]


def view_to_dict(v: ReportView) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(v), default=lambda o: o.isoformat()))


def view_from_dict(d: dict[str, Any]) -> ReportView:
    return ReportView(**{
        **d, "sent_at": datetime.fromisoformat(d["sent_at"]),
        "fixed_at": datetime.fromisoformat(d["fixed_at"]) if d["fixed_at"] else None,
        "photos": tuple(AttachmentView(**a) for a in d["photos"]),
        "messages": C.messages_from_dict(d["messages"]),
        "history": tuple(HistoryEntry(**{**h, "at": datetime.fromisoformat(h["at"])})
                         for h in d.get("history", ()))})


# -- lists ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AreaView:
    id: str
    name: str
    authority: str
    authority_name: str
    reports: tuple[ReportView, ...]    # newest first: located in the area or routed by it

    @property
    def path(self) -> str:
        return f"area/{self.id}/"

    @property
    def open(self) -> int:
        return sum(r.is_open for r in self.reports)

    @property
    def fixed(self) -> int:
        return sum(r.is_fixed for r in self.reports)


@dataclass(frozen=True)
class CategoryView:
    slug: str
    name: str
    description: str
    reports: tuple[ReportView, ...]    # newest first

    @property
    def path(self) -> str:
        return f"category/{self.slug}/"

    @property
    def open(self) -> int:
        return sum(r.is_open for r in self.reports)

    @property
    def fixed(self) -> int:
        return sum(r.is_fixed for r in self.reports)


def _url_safe(s: str) -> bool:
    return bool(s) and all(c.isascii() and (c.isalnum() or c in "-_") for c in s)


class Geography:
    """The site's areas as map outlines, and the maps drawn from them.

    Built once per build from the rules; the templates call its map methods with the
    translated title and description. Outlines already projected for a frame are kept, so a
    thousand reports in one area project its boundary once, not a thousand times.
    """

    def __init__(self, areas: Sequence[Any]):
        self.outlines: list[maps.Outline] = []
        for a in areas:
            g = maps.geometry_of(a)
            if g is not None:
                self.outlines.append(maps.Outline(a.id, a.name, g))
        self.by_id = {o.id: o for o in self.outlines}
        self._tree = shapely.STRtree([o.geometry for o in self.outlines])
        self._neighbours: dict[str, list[maps.Outline]] = {}
        self._layers: dict[Any, Any] = {}     # outlines projected per frame (maps.draw)

    def __bool__(self) -> bool:
        return bool(self.outlines)

    def containing(self, lat: float, lon: float) -> list[maps.Outline]:
        """Every area whose outline contains the point (two tiers: a county and a district)."""
        if not self.outlines:
            return []
        hits = self._tree.query(shapely.Point(lon, lat), predicate="intersects")
        return [self.outlines[i] for i in sorted(hits)]

    def neighbours(self, o: maps.Outline) -> list[maps.Outline]:
        if o.id not in self._neighbours:
            west, south, east, north = o.geometry.bounds
            dx, dy = (east - west) * 0.25, (north - south) * 0.25
            hits = self._tree.query(shapely.box(west - dx, south - dy, east + dx, north + dy))
            self._neighbours[o.id] = [self.outlines[i] for i in sorted(hits)
                                      if self.outlines[i].id != o.id]
        return self._neighbours[o.id]

    def report_map(self, r: ReportView, *, title: str, desc: str, label: str) -> Markup:
        """The report's area outlined, its neighbours lightly, a pin at the point."""
        if not r.has_location:
            return Markup("")
        assert r.lat is not None and r.lon is not None
        focus = [self.by_id[r.area]] if r.area in self.by_id else []
        if not focus:
            focus = self.containing(r.lat, r.lon)[:1]
        others = self.neighbours(focus[0]) if focus else []
        return maps.draw(focus=focus, others=others, pins=[maps.Pin(r.lat, r.lon, "here", label)],
                         title=title, desc=desc, map_id=f"map-{r.id}", layers=self._layers)

    def overview_map(self, reports: Sequence[ReportView], *, root: str, title: str, desc: str,
                     area: str | None = None, map_id: str = "overview") -> Markup:
        """Open and fixed reports as pins (each a link to its page) over one area, or over
        every area when `area` is None."""
        pins = [maps.Pin(r.lat, r.lon, r.status if r.status in ("open", "fixed") else "other",
                         f"{r.title} ({r.state_words})", f"{root}{r.path}")
                for r in reports if r.lat is not None and r.lon is not None]
        if area is not None:
            focus = [self.by_id[area]] if area in self.by_id else []
            others = self.neighbours(focus[0]) if focus else []
            labels = False
        else:
            focus, others, labels = self.outlines, [], len(self.outlines) <= 30
        if not focus and not pins:
            return Markup("")
        return maps.draw(focus=focus, others=others, pins=pins, title=title, desc=desc,
                         map_id=map_id, labels=labels, big_pins=False, layers=self._layers)


@dataclass(frozen=True)
class ReportLists:
    """Every list of reports the archive publishes, from the public report views."""
    reports: tuple[ReportView, ...]            # newest first
    areas: tuple[AreaView, ...]
    categories: tuple[CategoryView, ...]
    geography: Geography = field(repr=False, compare=False, default_factory=lambda: Geography(()))

    @property
    def open(self) -> int:
        return sum(r.is_open for r in self.reports)

    @property
    def fixed(self) -> int:
        return sum(r.is_fixed for r in self.reports)


def report_lists(reports: Sequence[ReportView], *, rules: Any, authorities: dict[str, Any],
                 geography: Geography) -> ReportLists:
    """The lists: all reports; each area's (located in it, or routed by it when the point is
    unknown); each category's. Areas and categories come from the rules, plus any an older
    report still names; an id that would not make a safe URL gets no page."""
    reports = sorted(reports, key=lambda r: (r.sent_at, r.id), reverse=True)
    in_area: dict[str, list[ReportView]] = {}
    for r in reports:
        ids = ([o.id for o in geography.containing(r.lat, r.lon)]  # type: ignore[arg-type]
               if r.has_location else [])
        if r.area and r.area not in ids:
            ids.append(r.area)
        for i in ids:
            in_area.setdefault(i, []).append(r)
    rule_areas = {a.id: a for a in (getattr(rules, "areas", None) or ())}
    areas = []
    for aid in sorted(set(rule_areas) | set(in_area)):
        if not _url_safe(aid):
            continue
        a = rule_areas.get(aid)
        mine = in_area.get(aid, [])
        name = a.name if a else next((r.area_name for r in mine if r.area == aid), aid)
        slug = a.authority if a else ""
        auth = authorities.get(slug)
        areas.append(AreaView(aid, name, slug, auth.name if auth else slug, tuple(mine)))
    rule_cats = dict(getattr(rules, "categories", None) or {})
    by_cat: dict[str, list[ReportView]] = {}
    for r in reports:
        by_cat.setdefault(r.category, []).append(r)
    categories = []
    for slug in sorted(set(rule_cats) | {c for c in by_cat if c}):
        if not _url_safe(slug):
            continue
        c = rule_cats.get(slug)
        mine = by_cat.get(slug, [])
        categories.append(CategoryView(slug, c.name if c else mine[0].category_name,
                                       getattr(c, "description", "") if c else "", tuple(mine)))
    return ReportLists(tuple(reports), tuple(sorted(areas, key=lambda a: a.name.lower())),
                       tuple(sorted(categories, key=lambda c: c.name.lower())), geography)


# -- as data --------------------------------------------------------------------------------------
def report_json(r: ReportView, base_url: str) -> dict[str, Any]:
    from mailflow.archive.render import iso, message_json
    return {
        "id": r.id, "url": base_url + r.path, "title": r.title,
        "category": {"slug": r.category or None, "name": r.category_name,
                     "url": f"{base_url}category/{r.category}/" if r.category else None},
        "state": r.state, "status_words": r.state_words,
        "authority": {"slug": r.authority, "name": r.authority_name,
                      "url": f"{base_url}body/{r.authority}/"},
        "area": {"id": r.area or None, "name": r.area_name,
                 "url": f"{base_url}area/{r.area}/" if r.area else None},
        "location": ({"lat": r.lat, "lon": r.lon, "source": r.location_source or None,
                      "text": r.location_text or None} if r.has_location else None),
        "reporter": r.reporter, "sent": iso(r.sent_at),
        "fixed": iso(r.fixed_at) if r.fixed_at and r.is_fixed else None,
        "days_to_fix": r.days_to_fix, "description": r.description,
        "photos": [base_url + (a.path or "") for a in r.photos],
        "messages": [message_json(m, base_url) for m in r.messages],
        "history": [{"at": iso(h.at), "what": h.what, "by": h.by or None,
                     "name": h.name or None, "was": h.was or None, "words": h.words}
                    for h in r.history],
    }


def summary_json(r: ReportView, base_url: str) -> dict[str, Any]:
    """A report in a list (an authority's twin): enough to find it, not its letters."""
    from mailflow.archive.render import iso
    return {"id": r.id, "title": r.title, "url": base_url + r.path, "category": r.category or None,
            "area": r.area or None, "state": r.state, "sent": iso(r.sent_at),
            "fixed": iso(r.fixed_at) if r.fixed_at and r.is_fixed else None}


def record_json(rec: ReportRecord) -> dict[str, Any]:
    return {"received": rec.received, "fixed": rec.fixed, "open": rec.open,
            "closed_unfixed": rec.other, "median_days_to_fix": rec.median_days,
            "words": rec.words()}
