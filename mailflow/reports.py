"""Fault reports by email: the steps that are theirs, in the order the pipeline calls them.

A citizen writes to `report@` (or `report+<category>@`): the subject is the title, the body
the description, the attached photos go with it. mailflow needs two things before a report can
go anywhere: where the problem is and what kind of problem it is. The place comes from
coordinates in the text, else from the GPS position a phone wrote into a photo, else from a
place name or postcode in the site's gazetteer; the category from the address, the subject or
keywords. What is missing or ambiguous is asked for by mail, and the citizen's answer is read
the same way, as often as needed. Then the point is routed (point-in-polygon over the
authorities' areas), nearby open reports of the same category are pointed out (a duplicate
helps nobody), the report is confirmed like a first FOI request, moderated like one, and sent
from `report-<id>-<token>@` to the authority's contact for that category, with the photos
stripped of their hidden data. Replies are matched and forwarded exactly like FOI replies.

State machine of a report thread (`threads.state`), each step from mailflow/reports.py:

    (new) / awaiting_details --place or category missing/ambiguous--> awaiting_details (asked)
    any of those --place outside every area--> not_covered (told politely; a reply with
        another place is read again, anything else is stored and not answered)
    --no single authority handles it there--> awaiting_routing (admin queue "report_routing")
    --nearby open report of the category, or her first confirmation--> awaiting_confirmation
        (mail from confirm-<token>@; her reply sends it on)
    --confirmed, site pre-moderates or holds first-timers--> awaiting_approval (queue "approval")
    --the authority has no address for it--> awaiting_address (queue)
    --sent to the authority--> open --"fixed"--> fixed --"not fixed"--> open
    open / fixed --"withdraw"--> user_withdrawn

There is no statutory clock: `law` is "" and the clock, its reminders and the describe
reminder leave report threads alone. The one reminder is the questionnaire ("has it been
fixed?"), `[reports] questionnaire_after_days` after sending and every
`questionnaire_repeat_days` after that while the report is open.
"""
from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from mailflow.core import addresses as A
from mailflow.core import reminders as R
from mailflow.core.commands import STATE_WORDS, own_text, parse_report_command
from mailflow.core.geo import Point, find_coordinates, map_link
from mailflow.core.message import Attachment
from mailflow.mail.parse import ParseError, parse
from mailflow.outbound.compose import Outgoing, new_message_id
from mailflow.store.repository import Report, Thread, Tx, utcnow
from mailflow.templating import render

if TYPE_CHECKING:
    from mailflow.core.routing import Category, ReportRules
    from mailflow.pipeline import Outcome, Pipeline, Result, StepContext

log = logging.getLogger("mailflow.reports")

# States of a report that has not gone to the authority: mail from the authority side, or a
# follow-up from the citizen, cannot belong to it yet.
NOT_SENT = frozenset({"awaiting_details", "not_covered", "awaiting_routing",
                      "awaiting_confirmation", "awaiting_approval", "awaiting_address",
                      "not_approved"})
# The citizen's reply is read again for a place and a category in these states.
ASKING = frozenset({"awaiting_details", "not_covered"})
# Photos mailflow can re-encode without their metadata. Any other image (HEIC, TIFF, GIF...)
# might carry a position in a form we do not remove, so it is withheld.
PHOTO_TYPES = {"image/jpeg": "JPEG", "image/jpg": "JPEG", "image/pjpeg": "JPEG",
               "image/png": "PNG", "image/webp": "WEBP"}
_PHOTO_EXTENSIONS = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png",
                     ".webp": "image/webp"}
# Incoming messages on a report thread whose attachments are the citizen's photos.
_PHOTO_KINDS = ("draft", "report_details")


@dataclass(frozen=True)
class Location:
    """Where the citizen's mail says the problem is, or why it does not say."""
    point: Point | None
    source: str = ""          # text | exif | gazetteer | reply
    text: str = ""            # what was read: the coordinates as written, the place, the photo
    reason: str = ""
    candidates: tuple[str, ...] = ()   # several far-apart places: what each was


@dataclass(frozen=True)
class CategoryChoice:
    slug: str | None
    candidates: tuple[str, ...] = ()
    reason: str = ""


@dataclass
class Photos:
    """The photos that go to the authority, and how many could not be made safe to send."""
    attachments: list[Attachment] = field(default_factory=list)
    withheld: int = 0


def is_photo(a: Attachment) -> bool:
    """An image attachment: by its type, or by its name when a mailer sent octet-stream."""
    ctype = a.content_type.lower()
    if ctype.startswith("image/"):
        return True
    name = (a.filename or "").lower()
    return ctype == "application/octet-stream" and name.endswith(tuple(_PHOTO_EXTENSIONS))


def _photo_type(a: Attachment) -> str:
    ctype = a.content_type.lower()
    if ctype == "application/octet-stream":
        name = (a.filename or "").lower()
        ctype = next((t for ext, t in _PHOTO_EXTENSIONS.items() if name.endswith(ext)), ctype)
    return ctype


def gps_of(a: Attachment) -> Point | None:
    """The GPS position a camera wrote into a photo, or None (also for a broken image)."""
    from mailflow.mail.photos import gps_from_image
    try:
        return gps_from_image(a.data)
    except Exception:  # noqa: BLE001 - a broken image gives no position; it never stops a report
        log.info("could not read the GPS position of %r", a.filename, exc_info=True)
        return None


def read_location(rules: "ReportRules", text: str, photos: list[Attachment], *,
                  reply: bool = False) -> Location:
    """Coordinates in the text, else a photo's GPS position, else the gazetteer.

    The order is the issue's: what the citizen typed wins over what her camera recorded (she
    may have taken the photo from across the road, or at home later), and a position over a
    place name (a street is long; a postcode covers many houses).
    """
    if find_coordinates(text):
        guess = rules.locate(text)
        if guess.point is not None:
            return Location(guess.point, "reply" if reply else "text", guess.text, guess.reason)
        return Location(None, reason=guess.reason,
                        candidates=tuple(f.text for f in guess.candidates))
    for photo in photos:
        point = gps_of(photo)
        if point is not None:
            name = photo.filename or "photo"
            return Location(point, "exif", name, f"the GPS position recorded in the photo {name}")
    guess = rules.locate(text)
    if guess.point is not None:
        return Location(guess.point, guess.source or "gazetteer", guess.text, guess.reason)
    return Location(None, reason=guess.reason, candidates=tuple(f.text for f in guess.candidates))


def read_category(rules: "ReportRules", *, tag: str | None, subject: str, body: str,
                  reply: bool = False) -> CategoryChoice:
    """The category: the address's tag, the subject, keywords (core.routing decides); in a
    reply to our question, also the bare slug or name the citizen copied from our list."""
    if reply:
        for line in body.splitlines()[:3]:
            said = line.strip().strip(".!\"'“”‘’ ").lower()
            for slug, category in rules.categories.items():
                if said in (slug, category.name.lower()):
                    return CategoryChoice(slug, (), f"the reply names the category {slug}")
    guess = rules.detect_category(tag=tag, subject=subject, body=body)
    return CategoryChoice(guess.slug, tuple(guess.candidates), guess.reason)


def report_url(site_url: str, thread_id: int) -> str:
    """The report's public page in the archive."""
    return f"{site_url.rstrip('/')}/report/{thread_id}/"


class ReportFlow:
    """The fault-report steps of one pipeline: it sends through the pipeline's helpers."""

    def __init__(self, pipeline: "Pipeline"):
        self.p = pipeline
        self.site = pipeline.site
        self.domain = pipeline.domain

    @property
    def rules(self) -> "ReportRules | None":
        return self.site.rules.reports

    # -- a citizen writes to report@ ---------------------------------------------------------
    def new_report(self, c: "StepContext") -> "Outcome":
        p, pm = self.p, c.pm
        assert c.addr is not None
        no = p._no_answer(c)
        if no is not None:
            return p._queue(c, *no)
        rules = self.rules
        if rules is None:   # the door refuses report@ then; a header-only recipient can get here
            return p._queue(c, "no_reports", "a report, but the site has no report categories")
        citizen = pm.reply_to[0] if pm.reply_to else pm.from_addr
        if not citizen or A.is_our_domain(citizen, self.domain):
            return p._queue(c, "no_sender", "new report without a usable sender address")
        # Every way on from here writes to her (a question, "not covered", a confirmation)
        # unless she has confirmed before: only to the envelope sender, and not too often.
        refused = p._refuse_to_answer(c, citizen)
        if refused is not None:
            return refused
        subject = " ".join(pm.subject.split())[:200]
        body = pm.text.strip()
        mine = "\n".join(own_text(body))   # not her signature's postcode, not a quoted mail
        title = subject or (mine.splitlines()[0][:200] if mine else "") \
            or self.site._("Problem report")
        photos = [a for a in pm.attachments if is_photo(a)]
        location = read_location(rules, f"{subject}\n{mine}", photos)
        category = read_category(rules, tag=c.addr.slug, subject=subject, body=mine)
        thread_id = c.tx.create_thread(
            kind="report", state="awaiting_details", authority="", law="", title=title,
            body=body, citizen_email=citizen.lower(),
            citizen_name=pm.from_name or citizen.split("@")[0],
            request_token=A.new_token(), reply_token=A.new_token())
        c.tx.create_report(thread_id, category=category.slug, **self._location_fields(location))
        p._store_in(c, thread_id, "draft", "report_address",
                    {"address": c.step.key, "category_tag": c.addr.slug})
        c.tx.add_event(thread_id, "citizen", "report", {
            "location": location.reason, "location_source": location.source or None,
            "category": category.reason, "photos": len(photos)})
        return self.advance(c, thread_id, location=location, category=category)

    @staticmethod
    def _location_fields(location: Location) -> dict[str, Any]:
        if location.point is None:
            return {}
        return {"lat": location.point.lat, "lon": location.point.lon,
                "location_source": location.source, "location_text": location.text[:1000]}

    # -- what next, once mailflow knows more ---------------------------------------------------
    def advance(self, c: "StepContext", thread_id: int, *, location: Location | None = None,
                category: CategoryChoice | None = None, authority: str | None = None,
                actor: str = "mailflow") -> "Outcome":
        """Move a report on as far as what is known allows: ask, refuse politely, queue for a
        person, point out duplicates, ask to confirm, or send.

        `authority` is a person's answer to the "report_routing" queue item (`queue approve
        N --authority SLUG`): it stands where the areas gave no single authority, and the
        report then goes on exactly as a routed one would."""
        from mailflow.pipeline import Outcome
        tx, rules = c.tx, self.rules
        assert rules is not None
        thread, report = tx.thread(thread_id), tx.report(thread_id)
        assert thread is not None and report is not None
        key = c.step.key
        point = Point(report.lat, report.lon) if report.lat is not None \
            and report.lon is not None else None
        if point is not None:
            # Coverage does not depend on the category: any category's route says it.
            route = rules.route(point, report.category or next(iter(rules.categories)))
            if not route.covered:
                tx.update_thread(thread_id, state="not_covered")
                tx.add_event(thread_id, "mailflow", "report_not_covered",
                             {"reasons": list(route.reasons)})
                self._tell(c, thread, "mail/report_not_covered.txt",
                           self.site._("Outside the area we cover: {title}", title=thread.title),
                           report=report, point=point)
                return Outcome(key, "report:not_covered", thread_id)
        if point is None or report.category is None:
            tx.update_thread(thread_id, state="awaiting_details")
            self._ask(c, thread, report, location, category)
            return Outcome(key, "report:awaiting_details", thread_id,
                           {"missing": [w for w, gone in (("location", point is None),
                                                          ("category", report.category is None))
                                        if gone]})
        route = rules.route(point, report.category)
        chosen, reasons = route.authority, list(route.reasons)
        if authority is not None:
            chosen = authority
            reasons.append(f"{authority} chosen by {actor}")
        if chosen is None:
            tx.update_thread(thread_id, state="awaiting_routing")
            tx.update_report(thread_id, area=route.area.id if route.area else None)
            return self.p._queue(c, "report_routing",
                                 "no single authority handles this report here: "
                                 + "; ".join(route.reasons)[:400], thread_id=thread_id,
                                 reasons=list(route.reasons),
                                 areas=[a.id for a in route.areas])
        area = route.area if authority is None else next(
            (a for a in route.areas if a.authority == chosen), None)
        tx.update_thread(thread_id, authority=chosen)
        tx.update_report(thread_id, area=area.id if area else None)
        tx.add_event(thread_id, actor, "report_routed",
                     {"authority": chosen, "area": area.id if area else None,
                      "reasons": reasons})
        thread = tx.thread(thread_id)
        assert thread is not None
        near = tx.open_reports_near(report.category, point,
                                    self.site.settings.reports.duplicate_distance_m,
                                    exclude=thread_id)
        if near:
            self._ask_to_confirm(c, thread, "mail/report_duplicates.txt",
                                 self.site._("A similar problem was already reported nearby: "
                                             "{title}", title=thread.title),
                                 near=self._near_view(tx, near))
            return Outcome(key, "report:possible_duplicate", thread_id,
                           {"near": [r.thread_id for r, _ in near]})
        if not any(t.confirmed_at is not None for t in tx.threads_of_citizen(thread.citizen_email)
                   if t.id != thread_id):
            self._ask_to_confirm(c, thread, "mail/report_confirm.txt",
                                 self.site._("Please confirm your report: {title}",
                                             title=thread.title))
            return Outcome(key, "report:awaiting_confirmation", thread_id)
        # She has confirmed before: her word is known, so the report goes on at once.
        return self.p._send_request(c, thread)

    def _near_view(self, tx: Tx, near: list[tuple[Report, float]]) -> list[dict[str, Any]]:
        out = []
        for r, metres in near[:10]:
            other = tx.thread(r.thread_id)
            out.append({"id": r.thread_id, "title": other.title if other else "",
                        "metres": int(round(metres)),
                        "url": report_url(self.site.settings.site.url, r.thread_id)})
        return out

    # -- the citizen writes to her reply address -------------------------------------------------
    def citizen_mail(self, c: "StepContext", thread: Thread, flags: list[str]) -> "Outcome":
        """A person's mail from the citizen on a report thread (checked as hers already)."""
        from mailflow.pipeline import Outcome
        p = self.p
        method, detail = c.step.match_method, c.step.match_detail
        if thread.state in ASKING:
            p._store_in(c, thread.id, "report_details", method, detail, flags)
            return self.details_reply(c, thread)
        if thread.state in NOT_SENT:
            return p._queue(c, "not_sent", "mail about a report that has not been sent",
                            thread_id=thread.id)
        command = parse_report_command(c.pm.text)
        if command is not None:
            p._store_in(c, thread.id, "citizen_command", method, detail, flags)
            return self.command(c, thread, command)
        p._store_in(c, thread.id, "followup_in", method, detail, flags)
        p._followup(c, thread)
        return Outcome(c.step.key, "followup", thread.id)

    def details_reply(self, c: "StepContext", thread: Thread) -> "Outcome":
        """Her answer to our question: read it for a place and a category, then move on."""
        from mailflow.pipeline import Outcome
        rules = self.rules
        report = c.tx.report(thread.id)
        if rules is None or report is None:
            return self.p._queue(c, "report_routing", "a report reply, but the site has no "
                                 "report categories any more", thread_id=thread.id)
        mine = "\n".join(own_text(c.pm.text))
        photos = [a for a in c.pm.attachments if is_photo(a)]
        location, category = None, None
        changes: dict[str, Any] = {}
        if report.lat is None or thread.state == "not_covered":
            location = read_location(rules, mine, photos, reply=True)
            changes.update(self._location_fields(location))
        if report.category is None:
            category = read_category(rules, tag=None, subject="", body=mine, reply=True)
            if category.slug is not None:
                changes["category"] = category.slug
        c.tx.add_event(thread.id, "citizen", "report_details", {
            "location": location.reason if location else None,
            "category": category.reason if category else None,
            "changed": sorted(changes)})
        if thread.state == "not_covered" and "lat" not in changes:
            # A "thank you" to our polite refusal: nothing to read, nothing to answer.
            return Outcome(c.step.key, "report:no_new_location", thread.id)
        if changes:
            c.tx.update_report(thread.id, **changes)
        return self.advance(c, thread.id, location=location, category=category)

    def command(self, c: "StepContext", thread: Thread, command: str) -> "Outcome":
        """fixed / not fixed / withdraw, by a one-line reply (or the questionnaire's answer)."""
        from mailflow.pipeline import Outcome
        tx, now = c.tx, utcnow()
        if command == "fixed":
            if thread.state != "fixed":
                tx.update_thread(thread.id, state="fixed")
                tx.update_report(thread.id, fixed_at=now)
        elif command == "not_fixed":
            if thread.state == "fixed":
                tx.update_thread(thread.id, state="open")
                tx.update_report(thread.id, fixed_at=None)
                self.plan_questionnaire(tx, thread.id, now)   # ask again while it is open
        elif command == "withdraw":
            if thread.state == "open":
                # The council may already have sent someone: tell it, as an FOI withdrawal does.
                self._tell_authority_withdrawn(c, thread)
            tx.update_thread(thread.id, state="user_withdrawn")
        tx.add_event(thread.id, "citizen", "state", {"command": command})
        thread = tx.thread(thread.id) or thread
        self._ack(c, thread)
        return Outcome(c.step.key, f"command:{command}", thread.id)

    def _tell_authority_withdrawn(self, c: "StepContext", thread: Thread) -> None:
        """A short letter from the report's address to where the report went, in its thread."""
        report = c.tx.report(thread.id)
        to = self.contact(thread, report)
        authority = self.site.rules.authorities.get(thread.authority)
        if to is None or authority is None:
            return
        req = self.site.request_address(thread)
        refs = [m.message_id for m in c.tx.messages(thread.id)
                if m.message_id and m.kind in ("request", "response", "followup")]
        out = Outgoing(from_addr=req, from_name=thread.citizen_name, to_addr=to,
                       to_name=authority.name, domain=self.domain,
                       subject=self.site._("Withdrawn: ") + self.site.report_subject(thread),
                       text=render(self.site.templates, "mail/report_withdrawal.txt",
                                   **self.context(thread, report)),
                       in_reply_to=refs[-1] if refs else None, references=refs,
                       message_id=new_message_id(self.domain, f"report{thread.id}"))
        self.p._send(c, out, thread_id=thread.id, kind="followup", mail_from=req)

    # -- sending ------------------------------------------------------------------------------
    def contact(self, thread: Thread, report: Report | None) -> str | None:
        authority = self.site.rules.authorities.get(thread.authority)
        if authority is None or report is None or report.category is None:
            return None
        return authority.report_contact(report.category)

    def dispatch(self, tx: Tx, result: "Result", thread_id: int, *, actor: str) -> None:
        """Send a report that is ready (confirmed, approved where the site moderates)."""
        thread, report = tx.thread(thread_id), tx.report(thread_id)
        assert thread is not None and report is not None
        assert report.category is not None and report.lat is not None and report.lon is not None
        authority = self.site.rules.authorities[thread.authority]
        to = self.contact(thread, report)
        assert to is not None
        now = utcnow()
        tx.update_thread(thread_id, state="open", sent_at=now, delivery_status="queued",
                         confirm_token=None)
        thread = tx.thread(thread_id)
        assert thread is not None
        photos = self.photos(tx, thread_id)
        point = Point(report.lat, report.lon)
        req = self.site.request_address(thread)
        text = render(self.site.templates, "mail/report.txt", **self.context(thread, report),
                      photo_count=len(photos.attachments), withheld=photos.withheld,
                      description=self.p._private(thread, thread.body))
        out = Outgoing(from_addr=req, from_name=thread.citizen_name, to_addr=to,
                       to_name=authority.name, domain=self.domain,
                       subject=self.site.report_subject(thread), text=text,
                       attachments=photos.attachments,
                       message_id=new_message_id(self.domain, f"report{thread_id}"))
        self.p._send_with(tx, result, out, thread_id=thread_id, kind="request", mail_from=req)
        tx.add_event(thread_id, actor, "report_sent", {
            "to": to, "authority": authority.slug, "category": report.category,
            "point": str(point), "photos": len(photos.attachments),
            "photos_withheld": photos.withheld})
        self.plan_questionnaire(tx, thread_id, now, first=True)

    def photos(self, tx: Tx, thread_id: int) -> Photos:
        """Every photo the citizen sent on the thread, once each, without its hidden data.

        A photo whose metadata cannot be removed (an unsupported type, a broken file, or a
        position still readable after stripping) is withheld rather than sent.
        """
        from mailflow.mail.photos import strip_metadata
        out, seen = Photos(), set()
        for m in tx.messages(thread_id):
            if m.direction != "in" or m.kind not in _PHOTO_KINDS:
                continue
            try:
                pm = parse(tx.get_raw(m.raw_sha256))
            except ParseError:
                continue
            for a in pm.attachments:
                if not is_photo(a):
                    continue
                digest = hashlib.sha256(a.data).hexdigest()
                if digest in seen:
                    continue
                seen.add(digest)
                ctype = _photo_type(a)
                clean = None
                if ctype in PHOTO_TYPES:
                    try:
                        clean = strip_metadata(a.data, ctype)
                    except Exception:  # noqa: BLE001 - not sent is the safe outcome
                        log.info("could not strip photo %r on thread %s", a.filename, thread_id,
                                 exc_info=True)
                if clean is None or not _metadata_free(clean):
                    out.withheld += 1
                    continue
                out.attachments.append(Attachment(a.filename or f"photo-{len(seen)}.jpg",
                                                  ctype, clean))
        return out

    def plan_questionnaire(self, tx: Tx, thread_id: int, after: datetime, *,
                           first: bool = False) -> bool:
        """Plan the next "has it been fixed?" unless one is already waiting: `[reports]
        questionnaire_after_days` after sending for the first, `questionnaire_repeat_days`
        after `after` for the next. One reminders row per q:<n>, so each is asked once."""
        s = self.site.settings.reports
        asked = [r for r in tx.reminders(thread_id) if r.kind == "questionnaire"]
        if any(r.state == "pending" for r in asked):
            return False
        n = 1 + max((R.questionnaire_number(r.event) or 0 for r in asked), default=0)
        days = s.questionnaire_after_days if first else s.questionnaire_repeat_days
        return tx.add_reminder(thread_id, "questionnaire", R.questionnaire_event(n),
                               after + timedelta(days=days))

    # -- mail to the citizen ---------------------------------------------------------------------
    def context(self, thread: Thread, report: Report | None) -> dict[str, Any]:
        """What every report template may use."""
        s = self.site.settings
        rules = self.rules
        category = rules.categories.get(report.category) if rules and report and \
            report.category else None
        point = Point(report.lat, report.lon) if report and report.lat is not None \
            and report.lon is not None else None
        return {"site_name": s.site.name, "site_url": s.site.url, "title": thread.title,
                "body": thread.body, "citizen_name": thread.citizen_name,
                "thread_id": thread.id,
                "authority": self.site.rules.authorities.get(thread.authority),
                "category": category,
                "point": point, "coordinates": str(point) if point else "",
                "map_link": map_link(point, s.reports.map_link) if point else "",
                "location_source": report.location_source if report else None,
                "location_text": report.location_text if report else None,
                "report_url": report_url(s.site.url, thread.id),
                "request_address": self.site.request_address(thread),
                "state": thread.state}

    def _tell(self, c: "StepContext", thread: Thread, template: str, subject: str, *,
              from_addr: str | None = None, kind: str = "notice", **context: Any) -> None:
        """A notice to the citizen, in reply to her mail, from her reply address (or from
        `from_addr`: the confirm address when her reply is to send the report)."""
        report = context.pop("report", None) or c.tx.report(thread.id)
        sender = from_addr or self.site.reply_address(thread)
        out = Outgoing(
            from_addr=sender, from_name=self.site.settings.site.name, reply_to=sender,
            to_addr=thread.citizen_email, to_name=thread.citizen_name, domain=self.domain,
            subject=subject, automatic=True, in_reply_to=c.pm.message_id,
            references=[c.pm.message_id] if c.pm.message_id else [],
            text=render(self.site.templates, template, **{**self.context(thread, report),
                                                            **context}),
            message_id=new_message_id(self.domain, f"note{thread.id}"))
        self.p._send(c, out, thread_id=thread.id, kind=kind,
                     mail_from=self.site.settings.outbound.bounce_address)

    def _ask(self, c: "StepContext", thread: Thread, report: Report,
             location: Location | None, category: CategoryChoice | None) -> None:
        rules = self.rules
        assert rules is not None
        cats: list[Category] = list(rules.categories.values())
        candidates = [rules.categories[s] for s in (category.candidates if category else ())
                      if s in rules.categories] if report.category is None else []
        self._tell(c, thread, "mail/report_details.txt",
                   self.site._("Where is it, and what is it? {title}", title=thread.title)
                   if report.lat is None and report.category is None else
                   self.site._("Where is it? {title}", title=thread.title)
                   if report.lat is None else
                   self.site._("What kind of problem is it? {title}", title=thread.title),
                   kind="report_question", report=report,
                   missing_location=report.lat is None, missing_category=report.category is None,
                   places=list(location.candidates) if location and report.lat is None else [],
                   candidates=candidates, categories=cats)

    def _ask_to_confirm(self, c: "StepContext", thread: Thread, template: str, subject: str,
                        **context: Any) -> None:
        token = A.new_token()
        c.tx.update_thread(thread.id, state="awaiting_confirmation", confirm_token=token)
        self._tell(c, thread, template, subject, from_addr=A.confirm_address(token, self.domain),
                   kind="confirmation", **context)

    def _ack(self, c: "StepContext", thread: Thread) -> None:
        words = self.site._(STATE_WORDS.get(thread.state, thread.state))
        self._tell(c, thread, "mail/report_state.txt",
                   self.site._("Your report is now {state}: {title}", state=words,
                               title=thread.title),
                   kind="state_changed", state_words=words)

    def questionnaire_mail(self, thread: Thread, report: Report | None, n: int) -> Outgoing:
        """The n-th "has it been fixed?", from the citizen's reply address."""
        reply = self.site.reply_address(thread)
        s = self.site.settings
        return Outgoing(
            from_addr=reply, from_name=s.site.name, reply_to=reply, to_addr=thread.citizen_email,
            to_name=thread.citizen_name, domain=self.domain, automatic=True,
            subject=self.site._("Has it been fixed? {title}", title=thread.title),
            text=render(self.site.templates, "mail/report_questionnaire.txt",
                        **self.context(thread, report), number=n,
                        sent_on=thread.sent_at.date() if thread.sent_at else None,
                        repeat_days=s.reports.questionnaire_repeat_days),
            message_id=new_message_id(self.domain, f"rem{thread.id}"))


def _metadata_free(data: bytes) -> bool:
    """A last look at a stripped photo: no EXIF, XMP or comment left, and it still opens."""
    try:
        from PIL import Image
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if len(img.getexif()):
                return False
            return not any(k in img.info for k in ("exif", "xmp", "XML:com.adobe.xmp",
                                                    "comment"))
    except Exception:  # noqa: BLE001 - what cannot be opened cannot be checked: not sent
        return False


def next_questionnaire_due(previous_due: datetime, now: datetime, days: int) -> datetime:
    """The next questionnaire `days` after the previous one was due; after a long outage,
    `days` from now, so the citizen is not asked twice in a row."""
    due = previous_due + timedelta(days=days)
    return due if due > now else now + timedelta(days=days)
