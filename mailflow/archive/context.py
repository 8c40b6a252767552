"""The public view of the site: what the archive may show, already redacted, as plain values.

Everything private is decided here, once, before any page is rendered: which threads are
public (sent ones), which messages (the letters to the authority and its answers, never the
citizen's own copies, confirmations or reminders), what a hidden or `X-No-Archive` message
leaves behind (a placeholder, so the thread still reads in order), and the redacted form of
every title, name, subject, body, HTML part and attachment. Templates then only format these
values; they never see a `Thread` row, so they cannot print a citizen's address by mistake.

Attachment bytes are returned beside the view (`ThreadFiles`) rather than kept in it, so the
builder can stage them and let them go: a site's attachments need not fit in memory at once.
"""
from __future__ import annotations

import hashlib
import json
import re
import statistics
import unicodedata
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timezone
from typing import Any

from mailflow.archive.attachments import PublicAttachment, Withheld, publish_attachment
from mailflow.core.deadlines import deadline
from mailflow.core.redaction import Redactor
from mailflow.core.rules import Authority, Law
from mailflow.mail.parse import ParseError, parse_content
from mailflow.mail.sanitise import redact_html
from mailflow.store.repository import StoredMessage, Thread

# Message kinds the public sees: the letters that went to the authority and what came back.
# Not shown: `followup_in` (the citizen's own copy: the outgoing `followup` is the public
# one), `draft`, confirmations, forwards, commands, acknowledgements and reminders.
SHOWN = {("out", "request"), ("out", "followup"),
         ("in", "response"), ("in", "auto_reply"), ("in", "bounce")}
COLLAPSED = {"auto_reply", "bounce"}


def N_(message: str) -> str:
    """Marks English text for the catalogue (`make messages`); templates translate it."""
    return message


KIND_WORDS = {"request": N_("Request"), "followup": N_("Follow-up"), "response": N_("Response"),
              "auto_reply": N_("Automatic reply"), "bounce": N_("Delivery failure report"),
              "report": N_("Report")}   # a fault report's first letter (archive/reports.py)
HIDDEN_NOTE = N_("This message has been hidden by the site's moderators.")
NO_ARCHIVE_NOTE = N_("This message is not published: its sender asked for it not to be "
                     "archived.")

# The lists by state: URL slug → words. "overdue" and "very-overdue" are derived from the
# due dates, as Alaveteli's waiting_response_(very_)overdue are.
LIST_STATES: dict[str, str] = {
    "waiting-response": N_("awaiting a response"),
    "overdue": N_("overdue"),
    "very-overdue": N_("long overdue"),
    "waiting-clarification": N_("waiting for the requester to clarify"),
    "internal-review": N_("under internal review"),
    "successful": N_("successful"),
    "partially-successful": N_("partially successful"),
    "refused": N_("refused"),
    "not-held": N_("information not held"),
    "withdrawn": N_("withdrawn by the requester"),
}
_STATE_SLUGS = {"waiting_response": "waiting-response", "waiting_clarification":
                "waiting-clarification", "internal_review": "internal-review",
                "successful": "successful", "partially_successful": "partially-successful",
                "rejected": "refused", "not_held": "not-held", "user_withdrawn": "withdrawn"}
_NOT_PUBLIC_STATES = ("awaiting_confirmation", "awaiting_address", "awaiting_approval",
                      "not_approved")

Verifier = Callable[[str, bytes], tuple[bool, str | None]]   # (raw sha256, raw) → (ok, d=)


@dataclass(frozen=True)
class AttachmentView:
    n: int
    filename: str
    content_type: str
    size: int
    path: str | None            # under the output folder; None when withheld
    withheld: str | None = None  # the reason, when withheld

    @property
    def href(self) -> str:
        """The link from the thread's own page: "attachments/<sha256 of the content>.<ext>"."""
        return (self.path or "").split("/", 2)[-1]


@dataclass(frozen=True)
class Dkim:
    verified: bool
    domain: str | None     # d= of the signature that verified, or of the first that did not


@dataclass(frozen=True)
class MessageView:
    pk: int
    kind: str
    direction: str
    sender: str
    at: datetime
    subject: str = ""
    text: str = ""                     # what the sender wrote
    folded: str = ""                   # quoted text and signature, shown folded
    html: str | None = None            # sanitised HTML, only when there is no text part
    attachments: tuple[AttachmentView, ...] = ()
    dkim: Dkim | None = None
    placeholder: str | None = None     # hidden / not archived: nothing else is set

    @property
    def kind_words(self) -> str:
        return KIND_WORDS.get(self.kind, self.kind)

    @property
    def collapsed(self) -> bool:
        return self.kind in COLLAPSED


@dataclass(frozen=True)
class ThreadView:
    id: int
    slug: str
    title: str
    authority: str
    authority_name: str
    law_id: str
    law_name: str
    state: str                         # as stored
    list_state: str                    # a key of LIST_STATES
    requester: str                     # the citizen's name (public, as on Alaveteli)
    sent: date
    due: date | None
    very_late: date | None
    working: tuple[str, ...]
    clock_start: date | None
    messages: tuple[MessageView, ...]
    first_response: date | None
    answered_in_time: str | None       # "on_time" | "late" | "very_late" | None (no answer)

    @property
    def path(self) -> str:
        return f"request/{self.id}-{self.slug}/"

    @property
    def id_path(self) -> str:
        """The stable part of a feed entry's id (it survives a change of title)."""
        return f"request/{self.id}"

    @property
    def state_words(self) -> str:
        return LIST_STATES.get(self.list_state, self.state.replace("_", " "))

    @property
    def last_activity(self) -> datetime:
        return max((m.at for m in self.messages),
                   default=datetime(self.sent.year, self.sent.month, self.sent.day,
                                    tzinfo=timezone.utc))

    @property
    def days_to_answer(self) -> int | None:
        return (self.first_response - self.sent).days if self.first_response else None


@dataclass(frozen=True)
class Record:
    """An authority's record, the statistics journalists quote."""
    on_time: int = 0
    late: int = 0
    very_late: int = 0
    no_answer: int = 0
    median_days: float | None = None

    @property
    def total(self) -> int:
        return self.on_time + self.late + self.very_late + self.no_answer

    def words(self) -> str:
        """In English, for the JSON twin; the page says it through the templates' gettext."""
        if not self.total:
            return "No requests have been sent to this authority through this site yet."
        parts = [f"Of {_n(self.total, 'request')}, {self.on_time} answered on time, "
                 f"{self.late} late, {self.very_late} very late, and {self.no_answer} "
                 "not answered yet."]
        if self.median_days is not None:
            parts.append(f"The median time to a first response was "
                         f"{_n(self.median_days, 'day')}.")
        return " ".join(parts)


@dataclass(frozen=True)
class AuthorityView:
    slug: str
    name: str
    url: str
    emails: tuple[str, ...]
    law_name: str
    tags: tuple[str, ...]
    threads: tuple[ThreadView, ...]    # newest first
    record: Record
    reports: tuple[Any, ...] = ()      # its public fault reports (reports.ReportView), newest first
    report_record: Any = None          # reports.ReportRecord, when it has any

    @property
    def path(self) -> str:
        return f"body/{self.slug}/"


@dataclass(frozen=True)
class SiteView:
    name: str
    base_url: str
    today: date
    threads: tuple[ThreadView, ...]    # newest first
    authorities: tuple[AuthorityView, ...]
    reports: Any = None                # reports.ReportLists when the site takes fault reports

    def by_state(self, state: str) -> list[ThreadView]:
        return [t for t in self.threads if t.list_state == state]

    def recent(self, n: int = 20) -> list[tuple[ThreadView, MessageView]]:
        pairs = [(t, m) for t in self.threads for m in t.messages if m.placeholder is None]
        return sorted(pairs, key=lambda p: (p[1].at, p[1].pk), reverse=True)[:n]


@dataclass
class ThreadFiles:
    """Files that belong to one thread page: (path under the output folder, bytes)."""
    files: list[tuple[str, bytes]] = field(default_factory=list)


# -- helpers -----------------------------------------------------------------------------------
def _n(value: float, word: str) -> str:
    shown = f"{value:g}"
    return f"{shown} {word}" + ("" if shown == "1" else "s")


def is_public(thread: Thread) -> bool:
    """Only a request that went out is public; a draft awaiting confirmation never is.
    (Fault reports have their own rule and pages: archive/reports.py.)"""
    return (thread.sent_at is not None and thread.state not in _NOT_PUBLIC_STATES
            and not getattr(thread, "hidden", False) and getattr(thread, "kind", "") != "report")


def slugify(text: str, limit: int = 60) -> str:
    """ASCII words joined by hyphens, for URLs: 'Gritting in Camden?' → 'gritting-in-camden'."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    words = re.findall(r"[a-z0-9]+", ascii_text.lower())
    slug = ""
    for w in words:
        if len(slug) + len(w) + 1 > limit:
            break
        slug = f"{slug}-{w}" if slug else w
    return slug or "request"


_SAFE_EXT = {"pdf", "txt", "text", "log", "csv", "tsv", "ics", "vcf", "png", "jpg", "jpeg", "gif",
             "webp", "docx", "xlsx", "pptx", "odt", "ods", "odp", "json", "md"}


def safe_filename(name: str, content_type: str) -> str:
    """A file name that is safe on any disk and any web server.

    ASCII only, no path, and an extension a static server maps to an inert type: an HTML,
    SVG or JavaScript attachment served from the archive's own origin would run as part of
    the site, so anything not on the allow-list gets `.txt` (text) or `.bin` (other) added.
    (`publish_attachment` already picks safe names; this holds even if it changes.)
    """
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = unicodedata.normalize("NFKD", base).encode("ascii", "ignore").decode()
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip(".-_")[:80] or "attachment"
    stem, dot, ext = base.rpartition(".")
    ext = ext.lower() if dot else ""
    # HTML only as publish_attachment makes it: sanitised, with a CSP that forbids everything.
    html_ok = ext in ("html", "htm") and content_type.lower().startswith("text/html")
    if ext not in _SAFE_EXT and not html_ok:
        base += ".txt" if content_type.lower().startswith("text/") else ".bin"
    return base


_QUOTE_START = re.compile(
    r"^(>|on\b.{0,300}\bwrote:\s*$|-{2,}\s*original message|-{5,}\s*$|_{5,}\s*$|-- ?$"
    r"|from:\s.*$|sent from my|le .{0,300} a écrit|am .{0,300} schrieb)", re.I)
_WROTE_NEXT = re.compile(r"^on\b.{0,300}$", re.I)


def fold(text: str) -> tuple[str, str]:
    """Split a body into what the sender wrote and what to fold away: the quoted message
    and the signature, from the first line that starts them. Nothing is folded when that
    would leave nothing to show (a reply written below its quote)."""
    lines = text.replace("\r\n", "\n").split("\n")
    for i, line in enumerate(lines):
        s = line.strip()
        starts = bool(_QUOTE_START.match(s))
        if not starts and _WROTE_NEXT.match(s) and i + 1 < len(lines) \
                and lines[i + 1].strip().lower().endswith("wrote:"):
            starts = True          # "On Tue, 1 Mar 2027 at 10:00, Jane Citizen\n<...> wrote:"
        if starts:
            main, rest = "\n".join(lines[:i]).rstrip(), "\n".join(lines[i:]).strip("\n")
            if main.strip():
                return main.strip("\n"), rest
            break
    return text.strip("\n"), ""


# -- building -----------------------------------------------------------------------------------
@dataclass
class ThreadInput:
    """What the store holds about one thread, gathered by the builder in one transaction."""
    thread: Thread
    messages: list[StoredMessage]
    events: list[dict[str, Any]]
    raw: Callable[[str], bytes]


def _sender(m: StoredMessage, t: Thread, authority_name: str, red: Redactor) -> str:
    if m.direction == "out":
        return red.text(t.citizen_name)
    if m.kind == "bounce":
        return "Mail delivery system"
    name = m.from_name.strip()
    if name and "@" not in name:
        return red.text(f"{name} ({authority_name})" if authority_name.lower() not in name.lower()
                        else name)
    return authority_name


def _attachments(pm_attachments: Any, m: StoredMessage, base: str, red: Redactor,
                 files: ThreadFiles,
                 released: frozenset[tuple[int, int]] = frozenset()) -> tuple[AttachmentView, ...]:
    views = []
    used: set[str] = set()
    for n, att in enumerate(pm_attachments, 1):
        result = publish_attachment(att, red)
        if isinstance(result, Withheld) and (m.id, n) in released:
            # An admin reviewed it (`mailflow queue release`): published as it came, with
            # its name still redacted.
            result = PublicAttachment(filename=red.filename(att.filename),
                                      content_type=att.content_type, data=att.data,
                                      size=att.size)
        if isinstance(result, Withheld):
            views.append(AttachmentView(n, result.filename or "attachment", att.content_type,
                                        att.size, None, result.reason))
            continue
        assert isinstance(result, PublicAttachment)
        shown = result.filename or "attachment"   # publish_attachment redacted it
        # Stored by content hash only: nothing a sender wrote becomes part of a path. The
        # name is shown on the page and offered with the link's `download` attribute.
        digest = hashlib.sha256(result.data).hexdigest()[:32]
        ext = _safe_ext(safe_filename(shown, result.content_type))
        path = f"{base}attachments/{digest}{ext}"
        if path not in used:
            used.add(path)
            files.files.append((path, result.data))
        views.append(AttachmentView(n, shown, result.content_type, result.size, path))
    return tuple(views)


_EXT = re.compile(r"\.[a-z0-9]{1,8}$")


def _safe_ext(name: str) -> str:
    """The file's extension, when it is a short plain one (so a web server sends the right
    type); nothing else of the name."""
    m = _EXT.search(name.lower())
    return m.group(0) if m else ""


def message_view(m: StoredMessage, t: Thread, raw_of: Callable[[str], bytes], *,
                 authority_name: str, red: Redactor, verify: Verifier, base: str,
                 files: ThreadFiles,
                 released: frozenset[tuple[int, int]] = frozenset()) -> MessageView:
    at = m.created_at
    sender = _sender(m, t, authority_name, red)
    if m.hidden:
        return MessageView(m.id, m.kind, m.direction, sender, at, placeholder=HIDDEN_NOTE)
    raw = raw_of(m.raw_sha256)
    try:
        pm = parse_content(raw)
    except ParseError:
        pm = None
    if pm is not None and (pm.header("X-No-Archive") or "").strip().lower() == "yes":
        return MessageView(m.id, m.kind, m.direction, sender, at, placeholder=NO_ARCHIVE_NOTE)
    text = m.text if m.direction == "out" else (pm.text if pm is not None else m.text)
    html_part = pm.html if pm is not None else None
    shown_html = None
    if html_part and not (pm is not None and _has_text_part(pm, text)):
        shown_html = redact_html(html_part, red)   # sanitised, redacted, sanitised again
        text = ""
    main, folded = fold(red.text(text))
    dkim = None
    if m.direction == "in" and m.kind == "response":
        ok, domain = verify(m.raw_sha256, raw)
        dkim = Dkim(ok, domain)
    attachments = (_attachments(pm.attachments, m, base, red, files, released)
                   if pm is not None else ())
    return MessageView(m.id, m.kind, m.direction, sender, at, subject=red.text(m.subject),
                       text=main, folded=folded, html=shown_html, attachments=attachments,
                       dkim=dkim)


def _has_text_part(pm: Any, text: str) -> bool:
    """Whether the message has its own text/plain part (the parser derives text from HTML
    when it has none: then the HTML is the real body)."""
    from mailflow.mail.parse import html_to_text
    return bool(text.strip()) and text.strip() != html_to_text(pm.html or "").strip()


def _clock_at(events: list[dict[str, Any]], when: datetime,
              t: Thread) -> tuple[date | None, date | None]:
    """Due and very-late dates as they stood at `when` (a claimed extension or a
    clarification moves them; an answer is judged against the clock it was given)."""
    due, very_late = t.due_date, t.very_late_date
    for e in events:
        if e["kind"] == "clock" and e["at"] is not None and e["at"] <= when:
            d = e.get("detail") or {}
            if d.get("due"):
                due = date.fromisoformat(d["due"])
                very_late = date.fromisoformat(d["very_late"]) if d.get("very_late") else None
    return due, very_late


def list_state(t: Thread, today: date) -> str:
    """Which list a thread is on today (overdue-ness moves with the date, not the thread)."""
    if t.state == "waiting_response" and t.due_date is not None and today > t.due_date:
        if t.very_late_date is not None and today > t.very_late_date:
            return "very-overdue"
        return "overdue"
    return _STATE_SLUGS.get(t.state, t.state.replace("_", "-"))


def _working(t: Thread, law: Law | None) -> tuple[str, ...]:
    if law is None or t.clock_start is None or t.due_date is None:
        return ()
    if t.state == "internal_review" and law.internal_review_days:
        return (f"Internal review asked for on {t.clock_start.isoformat()}: "
                f"{law.internal_review_days} days", )
    ext = law.extension(t.extension) if t.extension else None
    due, lines = _deadline_working(law, t.clock_start, ext.days if ext else 0)
    return lines if due == t.due_date else ()


# The working of a deadline, by (law, start, extra days): threads started on the same day
# under the same law share it, and counting the days (holidays included) twice per thread
# was a twentieth of a full build.
_WORKINGS: dict[tuple[Law, date, int], tuple[date, tuple[str, ...]]] = {}


def _deadline_working(law: Law, start: date, extra_days: int) -> tuple[date, tuple[str, ...]]:
    key = (law, start, extra_days)
    hit = _WORKINGS.get(key)
    if hit is None:
        if len(_WORKINGS) > 20_000:
            _WORKINGS.clear()
        d = deadline(law, start, extra_days=extra_days)
        hit = _WORKINGS[key] = (d.due, tuple(d.working()))
    return hit


def thread_view(inp: ThreadInput, *, authority: Authority | None, law: Law | None,
                red: Redactor, verify: Verifier, today: date) -> tuple[ThreadView, ThreadFiles]:
    t = inp.thread
    assert t.sent_at is not None
    title = red.text(t.title)
    slug = slugify(title)
    base = f"request/{t.id}-{slug}/"
    authority_name = authority.name if authority else t.authority
    files = ThreadFiles()
    shown = [m for m in inp.messages if (m.direction, m.kind) in SHOWN]
    released = frozenset((int(e["detail"]["message_id"]), int(e["detail"]["n"]))
                         for e in inp.events if e["kind"] == "attachment_released")
    messages = tuple(message_view(m, t, inp.raw, authority_name=authority_name, red=red,
                                  verify=verify, base=base, files=files, released=released)
                     for m in shown)
    first = next((m for m in inp.messages if m.direction == "in" and m.kind == "response"), None)
    verdict = None
    if first is not None:
        due, very_late = _clock_at(inp.events, first.created_at, t)
        answered = first.created_at.date()
        verdict = ("on_time" if due is None or answered <= due else
                   "late" if very_late is None or answered <= very_late else "very_late")
    view = ThreadView(
        id=t.id, slug=slug, title=title, authority=t.authority, authority_name=authority_name,
        law_id=t.law, law_name=law.name if law else t.law, state=t.state,
        list_state=list_state(t, today), requester=red.text(t.citizen_name),
        sent=t.sent_at.date(), due=t.due_date, very_late=t.very_late_date,
        working=_working(t, law), clock_start=t.clock_start, messages=messages,
        first_response=first.created_at.date() if first else None, answered_in_time=verdict)
    return view, files


# -- the view as JSON, for the builder's cache of unchanged threads -------------------------------
def _day(v: str | None) -> date | None:
    return date.fromisoformat(v) if v else None


def view_to_dict(v: ThreadView) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(v), default=lambda o: o.isoformat()))


def messages_from_dict(messages: list[dict[str, Any]]) -> tuple[MessageView, ...]:
    return tuple(MessageView(**{
        **m, "at": datetime.fromisoformat(m["at"]),
        "attachments": tuple(AttachmentView(**a) for a in m["attachments"]),
        "dkim": Dkim(**m["dkim"]) if m["dkim"] else None}) for m in messages)


def view_from_dict(d: dict[str, Any]) -> ThreadView:
    messages = messages_from_dict(d["messages"])
    return ThreadView(**{**d, "sent": date.fromisoformat(d["sent"]), "due": _day(d["due"]),
                         "very_late": _day(d["very_late"]), "clock_start": _day(d["clock_start"]),
                         "first_response": _day(d["first_response"]),
                         "working": tuple(d["working"]), "messages": messages})


def record(threads: list[ThreadView]) -> Record:
    counts = {"on_time": 0, "late": 0, "very_late": 0}
    no_answer = 0
    days = []
    for t in threads:
        if t.answered_in_time is None:
            no_answer += 1
        else:
            counts[t.answered_in_time] += 1
            if t.days_to_answer is not None:
                days.append(t.days_to_answer)
    return Record(no_answer=no_answer, median_days=statistics.median(days) if days else None,
                  **counts)


def authority_views(authorities: dict[str, Authority], laws: dict[str, Law],
                    threads: list[ThreadView]) -> tuple[AuthorityView, ...]:
    """Every authority in the rules, and any that only old threads still name."""
    by_slug: dict[str, list[ThreadView]] = {}
    for t in threads:
        by_slug.setdefault(t.authority, []).append(t)
    return grouped_authority_views(authorities, laws, by_slug,
                                   lambda slug: record(by_slug.get(slug, [])))


def grouped_authority_views(authorities: dict[str, Authority], laws: dict[str, Law],
                            by_slug: dict[str, list[Any]],
                            record_of: Callable[[str], Record]) -> tuple[AuthorityView, ...]:
    """`authority_views` of threads already grouped by authority (each group in the site's
    order, only authorities with threads), with each one's record from `record_of`: the
    builder keeps both between builds (`siteindex.SiteIndex`)."""
    views = []
    for slug in sorted(set(authorities) | set(by_slug)):
        a = authorities.get(slug)
        mine = by_slug.get(slug, [])
        if a is None:
            views.append(AuthorityView(slug, mine[0].authority_name, "", (), mine[0].law_name,
                                       (), tuple(mine), record_of(slug)))
            continue
        law = laws.get(a.law)
        views.append(AuthorityView(slug, a.name, a.url, a.emails, law.name if law else a.law,
                                   a.tags, tuple(mine), record_of(slug)))
    return tuple(sorted(views, key=lambda v: v.name.lower()))
