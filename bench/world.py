"""Making the worlds the benchmarks run in.

Two ways, as the issue asks. Small worlds whose threads must be real (the pipeline, SMTP and
memory benchmarks reply to them) are made through mailflow's own pipeline: a citizen writes to
`<authority>@`, confirms, and the request goes out. Big worlds (the archive's 10,000 threads,
the reminders' 100,000) are written straight into the store's tables, in batches on the
store's own connection, with the values the pipeline would have written: making them by mail
would take longer than everything they are used to measure.
"""
from __future__ import annotations

import base64
import email
import email.policy
import hashlib
import io
import random
import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from email.message import EmailMessage
from email.utils import format_datetime, formataddr, formatdate, make_msgid
from functools import lru_cache
from typing import Any

from bench.common import DOMAIN, corpus_index

CITIZEN = "jane.citizen@citizen.example"


def compose(frm: str, to: str, subject: str, body: str, *, in_reply_to: str | None = None,
            msgid: str | None = None, attachments: list[tuple[str, str, bytes]] = (),
            headers: dict[str, str] | None = None) -> bytes:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = frm, to, subject
    m["Date"] = formatdate()
    m["Message-ID"] = msgid or make_msgid(domain="sender.example")
    if in_reply_to:
        m["In-Reply-To"] = m["References"] = in_reply_to
    for k, v in (headers or {}).items():
        m[k] = v
    m.set_content(body)
    for filename, ctype, data in attachments:
        maintype, subtype = ctype.split("/")
        m.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return m.as_bytes(policy=email.policy.SMTP)


LOREM = ("Thank you for your request for information, which we have considered under the Act. "
         "We hold some of the information you asked for. Please find our response below, with "
         "the figures for each year in turn and an explanation of how they were compiled. ")


def text_of(size: int, seed: int = 0) -> str:
    """About `size` bytes of letter-like text in lines of ~70 characters."""
    words = (LOREM * (size // len(LOREM) + 2)).split()
    rnd = random.Random(seed)
    lines, line, total = [], [], 0
    for w in words:
        if rnd.random() < 0.05:
            w = str(rnd.randint(10, 99999))
        line.append(w)
        if sum(len(x) + 1 for x in line) > 68:
            s = " ".join(line)
            lines.append(s)
            total += len(s) + 1
            line = []
            if total >= size:
                break
    return "\n".join(lines) + "\n"


# -- threads made through the pipeline ------------------------------------------------------------
@dataclass
class RealThread:
    id: int
    authority: str
    contact: str               # the authority's address: where the request went
    request_address: str       # where the authority answers
    reply_address: str         # where the citizen answers
    request_message_id: str    # the Message-ID mailflow sent the request with


def make_threads(site: Any, n: int, *, slugs: list[str] | None = None) -> list[RealThread]:
    """`n` requests, each written, confirmed and sent through the real pipeline."""
    from mailflow.pipeline import Pipeline
    from mailflow.spool import Envelope
    p = Pipeline(site)
    slugs = slugs or [s for s, a in sorted(site.rules.authorities.items()) if a.contact]
    out = []
    for i in range(n):
        slug = slugs[i % len(slugs)]
        citizen = f"citizen{i}@citizen.example"
        frm = formataddr((f"Citizen {i}", citizen))
        raw = compose(frm, f"{slug}@{DOMAIN}", f"Spending on street lighting, part {i}",
                      "Please send me the amounts spent on street lighting in each of the "
                      "last five years, by ward.\n\nThank you.\n")
        r = p.process(raw, Envelope(mail_from=citizen, rcpt_tos=[f"{slug}@{DOMAIN}"],
                                    via="test"))
        tid = r.outcomes[0].thread_id
        with site.store.read() as tx:
            t = tx.thread(tid)
        confirm = f"confirm-{t.confirm_token}@{DOMAIN}"
        p.process(compose(frm, confirm, "Re: Please confirm", "Yes, send it."),
                  Envelope(mail_from=citizen, rcpt_tos=[confirm], via="test"))
        with site.store.read() as tx:
            t = tx.thread(tid)
            sent = [m for m in tx.messages(tid) if m.direction == "out" and m.kind == "request"]
        assert t.state == "waiting_response" and sent, (t.state, r.outcomes)
        a = site.rules.authorities[slug]
        out.append(RealThread(tid, slug, a.contact, site.request_address(t),
                              site.reply_address(t), sent[0].message_id))
    return out


def authority_reply(t: RealThread, n: int, *, size: int = 3000,
                    attachments: list[tuple[str, str, bytes]] = ()) -> bytes:
    return compose(formataddr(("FOI Officer", t.contact)), t.request_address,
                   f"RE: Freedom of Information request [FOI #{t.id}]",
                   f"Dear Citizen,\n\n{text_of(size, n)}\nYours sincerely,\nFOI Officer\n",
                   in_reply_to=t.request_message_id,
                   msgid=f"<reply-{n}-{t.id}@{t.contact.split('@')[1]}>",
                   attachments=attachments)


# -- the corpus -----------------------------------------------------------------------------------
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_MSGID = re.compile(rb"(?im)^message-id[ \t]*:[^\r\n]*(?:\r?\n[ \t][^\r\n]*)*\r?\n")


def uniquify(raw: bytes, n: int, rcpt: str) -> bytes:
    """The same message as a new delivery: its own Message-ID and a Received line, so the
    store's dedupe (by sha256 and Message-ID) treats each copy as new mail."""
    m = _HEADER_END.search(raw)
    head, rest = (raw[:m.start()], raw[m.start():]) if m else (raw, b"")
    head = _MSGID.sub(b"", head + b"\n", count=1)[:-1] if _MSGID.search(head + b"\n") else head
    nl = b"\r\n" if b"\r\n" in raw[:2000] else b"\n"
    top = (f"Received: from mx.sender.example by {DOMAIN} with ESMTP id b{n:06d}"
           f" for <{rcpt}>; {formatdate()}").encode() + nl
    top += f"Message-ID: <bench-{n}@sender.example>".encode() + nl
    return top + head + rest


MIX = {  # corpus category → what it stands for in the mix
    "authority-reply": "reply", "plain": "reply", "encoding": "reply", "forwarded": "reply",
    "attachment": "attachment", "auto-reply": "auto-reply",
    "bounce-dsn": "bounce", "bounce-nondsn": "bounce",
}


def corpus_messages() -> list[tuple[str, bytes]]:
    """(kind, raw) for the corpus messages the mixed corpus draws from."""
    out = [(MIX[cat], p.read_bytes()) for p, cat in corpus_index() if cat in MIX]
    random.Random(0).shuffle(out)   # the index is grouped by source; mix the kinds
    return out


@lru_cache(maxsize=1)
def sample_pdf() -> bytes:
    """A real PDF attachment from the corpus (an authority's disclosure)."""
    for p, cat in corpus_index():
        if cat == "attachment" or "pdf" in p.name:
            msg = email.message_from_bytes(p.read_bytes(), policy=email.policy.default)
            for part in msg.iter_attachments():
                try:
                    data = part.get_content()
                except Exception:  # noqa: BLE001
                    continue
                if isinstance(data, bytes) and data.startswith(b"%PDF-"):
                    return data
    # A one-page PDF with a line of text, if the corpus has none.
    return (b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj 2 0 obj<</Type/Pages/Kids"
            b"[3 0 R]/Count 1>>endobj 3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 612 792]"
            b"/Contents 4 0 R/Resources<</Font<</F1 5 0 R>>>>>>endobj 4 0 obj<</Length 44>>"
            b"stream\nBT /F1 12 Tf 72 720 Td (Figures 2020-2024) Tj ET\nendstream endobj 5 0 obj"
            b"<</Type/Font/Subtype/Type1/BaseFont/Helvetica>>endobj\ntrailer<</Root 1 0 R>>\n"
            b"%%EOF\n")


@lru_cache(maxsize=1)
def sample_png() -> bytes:
    from PIL import Image
    img = Image.new("RGB", (120, 80), (200, 220, 240))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def sample_csv(n: int) -> bytes:
    rows = ["year,ward,amount"] + [f"{2019 + i % 5},Ward {i % 17},{(i * 7919) % 100000}"
                                   for i in range(60)]
    return ("\n".join(rows) + "\n").encode()


def mixed_corpus(threads: list[RealThread], n: int) -> list[tuple[str, bytes, str, str]]:
    """`n` messages (kind, raw, envelope sender, envelope recipient), every one addressed to a
    real thread's request address: half replies written for the thread (In-Reply-To its
    request; a third of them with a PDF, CSV or image), half real corpus mail (replies,
    auto-replies, bounces, attachments) delivered to the thread's address."""
    corpus = corpus_messages()
    out = []
    atts = [("figures.pdf", "application/pdf", sample_pdf()),
            ("figures.csv", "text/csv", sample_csv(0)),
            ("chart.png", "image/png", sample_png())]
    ci = 0
    for i in range(n):
        t = threads[i % len(threads)]
        if i % 2 == 0:
            att = [atts[(i // 2) % 3]] if i % 3 == 0 else []
            out.append(("attachment" if att else "reply",
                        authority_reply(t, i, size=1500 + (i * 37) % 4000, attachments=att),
                        t.contact, t.request_address))
        else:
            kind, raw = corpus[ci % len(corpus)]
            ci += 1
            sender = "" if kind == "bounce" else t.contact
            out.append((kind, uniquify(raw, i, t.request_address), sender, t.request_address))
    return out


# -- big worlds, written straight into the store ------------------------------------------------------
STATES = (["waiting_response"] * 40 + ["internal_review"] * 5 + ["waiting_clarification"] * 3
          + ["successful"] * 20 + ["partially_successful"] * 12 + ["rejected"] * 10
          + ["not_held"] * 7 + ["user_withdrawn"] * 3)


def _token(rnd: random.Random) -> str:
    return "".join(rnd.choice("abcdefghijkmnpqrstuvwxyz23456789") for _ in range(10))


class Calendar:
    """Due dates the way the clock computes them, cached per (law, start)."""

    def __init__(self, site: Any):
        self.site = site
        self._cache: dict[tuple[str, date], tuple[date, date]] = {}

    def due(self, law_id: str, start: date) -> tuple[date, date]:
        key = (law_id, start)
        if key not in self._cache:
            from mailflow.core.deadlines import deadline
            d = deadline(self.site.rules.laws[law_id], start)
            self._cache[key] = (d.due, d.very_late)
        return self._cache[key]


def _insert(tx: Any, table: Any, rows: list[dict[str, Any]], chunk: int = 2000) -> None:
    from sqlalchemy import insert
    for i in range(0, len(rows), chunk):
        tx.c.execute(insert(table), rows[i:i + chunk])


def _raw_in(n: int, tid: int, contact: str, req: str, subject: str, body: str,
            att: tuple[str, str, str] | None, when: datetime) -> bytes:
    """An authority's reply as it comes off the wire, made by string formatting (fast)."""
    domain = contact.split("@")[1]
    head = (f"Received: from mx.{domain} by {DOMAIN}; {format_datetime(when)}\r\n"
            f"From: FOI Officer <{contact}>\r\nTo: {req}\r\nSubject: {subject}\r\n"
            f"Date: {format_datetime(when)}\r\nMessage-ID: <gen-{n}@{domain}>\r\n"
            "MIME-Version: 1.0\r\n")
    text = body.replace("\n", "\r\n")
    if att is None:
        return (head + "Content-Type: text/plain; charset=utf-8\r\n"
                "Content-Transfer-Encoding: 8bit\r\n\r\n" + text).encode()
    b = f"b{n:x}"
    fname, ctype, b64 = att
    return (head + f'Content-Type: multipart/mixed; boundary="{b}"\r\n\r\n'
            f"--{b}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Transfer-Encoding: 8bit\r\n\r\n{text}\r\n"
            f"--{b}\r\nContent-Type: {ctype}\r\nContent-Transfer-Encoding: base64\r\n"
            f'Content-Disposition: attachment; filename="{fname}"\r\n\r\n{b64}\r\n'
            f"--{b}--\r\n").encode()


def _raw_out(n: int, frm: str, to: str, subject: str, body: str, when: datetime) -> bytes:
    return (f"From: Citizen <{frm}>\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Date: {format_datetime(when)}\r\nMessage-ID: <foi{n}.gen@{DOMAIN}>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n" + body.replace("\n", "\r\n")).encode()


def _b64(data: bytes) -> str:
    s = base64.b64encode(data).decode()
    return "\r\n".join(s[i:i + 76] for i in range(0, len(s), 76))


def bulk_archive_site(site: Any, n_threads: int, msgs_per_thread: int = 5, *,
                      seed: int = 1, today: date | None = None) -> dict[str, int]:
    """`n_threads` sent requests with `msgs_per_thread` messages each (the request, answers
    with attachments, a follow-up, an automatic reply), as the pipeline would have stored
    them, plus the clock event of each. Returns counts."""
    from mailflow.store.tables import messages, raw_messages, thread_events, threads
    rnd = random.Random(seed)
    today = today or datetime.now(timezone.utc).date()
    cal = Calendar(site)
    slugs = [s for s, a in sorted(site.rules.authorities.items()) if a.contact]
    atts = [("figures.pdf", "application/pdf", _b64(sample_pdf())),
            ("figures.csv", "text/csv", _b64(sample_csv(0))),
            ("chart.png", "image/png", _b64(sample_png()))]
    counts = {"threads": 0, "messages": 0, "attachments": 0, "raw_bytes": 0}
    now = datetime.now(timezone.utc)
    with site.store.tx() as tx:
        from sqlalchemy import func, select
        first = (tx.c.execute(select(func.max(threads.c.id))).scalar() or 0) + 1
        first_msg = (tx.c.execute(select(func.max(messages.c.id))).scalar() or 0) + 1
    tid_rows, msg_rows, raw_rows, ev_rows = [], [], [], []
    mpk = first_msg
    for k in range(n_threads):
        tid = first + k
        slug = slugs[k % len(slugs)]
        a = site.rules.authorities[slug]
        law = site.rules.law_for(a).id
        state = STATES[rnd.randrange(len(STATES))]
        sent = now - timedelta(days=rnd.randint(1, 700), minutes=rnd.randint(0, 1440))
        start = sent.date()
        due, very_late = cal.due(law, start)
        req_tok, rep_tok = _token(rnd), _token(rnd)
        req = f"request-{tid}-{req_tok}@{DOMAIN}"
        citizen = f"citizen{tid}@mail{tid % 97}.example"
        title = f"Spending on {rnd.choice(['street lighting', 'potholes', 'libraries', 'parks', 'consultants', 'IT contracts'])} in {2015 + tid % 10}, request {tid}"
        body = text_of(600, tid)
        answered = state not in ("waiting_response", "waiting_clarification")
        tid_rows.append(dict(
            id=tid, kind="foi", state=state, authority=slug, law=law, title=title, body=body,
            citizen_email=citizen, citizen_name=f"Citizen {tid}", request_token=req_tok,
            reply_token=rep_tok, confirm_token=None, created_at=sent - timedelta(hours=1),
            confirmed_at=sent, sent_at=sent, due_date=due, delivery_status="sent",
            delivery_detail=None, allow="anybody", clock_start=start, extension=None,
            very_late_date=very_late, awaiting_description=False, hidden=False))
        ev_rows.append(dict(thread_id=tid, at=sent, actor="citizen", kind="clock", detail={
            "why": "the request was sent", "start": start.isoformat(), "due": due.isoformat(),
            "very_late": very_late.isoformat(), "extension": None}))
        subject = f"Freedom of Information request - {title} [FOI #{tid}]"
        plan = ["request", "response", "followup", "response", "auto_reply"]
        plan = (plan * (msgs_per_thread // len(plan) + 1))[:msgs_per_thread]
        when = sent
        for j, kind in enumerate(plan):
            when = when + timedelta(days=rnd.randint(1, 12))
            if kind in ("response", "auto_reply") and not answered and j > 0 and kind == "response":
                kind = "auto_reply"   # unanswered threads get acknowledgements only
            n = mpk
            if kind in ("request", "followup"):
                text = body if kind == "request" else text_of(400, n)
                raw = _raw_out(n, req, a.contact, subject, text, when)
                direction, frm, name = "out", req, f"Citizen {tid}"
            else:
                att = None
                if kind == "response" and (k + j) % 3 != 2:
                    att = atts[(k + j) % 3]
                    counts["attachments"] += 1
                text = (text_of(1200, n) if kind == "response" else
                        "I am out of the office until Monday. Your message has been received.\n")
                raw = _raw_in(n, tid, a.contact, req, "RE: " + subject, text, att, when)
                direction, frm, name = "in", a.contact, "FOI Officer"
            sha = hashlib.sha256(raw).hexdigest()
            raw_rows.append(dict(sha256=sha, size=len(raw), data=raw, created_at=when))
            msg_rows.append(dict(
                id=n, thread_id=tid, direction=direction, kind=kind,
                message_id=f"<gen-{n}@x>", from_addr=frm, from_name=name,
                to_addrs=[a.contact if direction == "out" else req], subject=subject,
                date=when, text=text, raw_sha256=sha,
                classification=None if direction == "out" else
                ("auto_reply" if kind == "auto_reply" else "reply"),
                classification_reason=None, match_method=None if direction == "out"
                else "envelope", match_detail=None, flags=[], hidden=False, created_at=when))
            counts["messages"] += 1
            counts["raw_bytes"] += len(raw)
            mpk += 1
        counts["threads"] += 1
        if len(msg_rows) >= 5000 or k == n_threads - 1:
            with site.store.tx() as tx:
                _insert(tx, threads, tid_rows)
                _insert(tx, raw_messages, raw_rows, 500)
                _insert(tx, messages, msg_rows)
                _insert(tx, thread_events, ev_rows)
            tid_rows, msg_rows, raw_rows, ev_rows = [], [], [], []
    return counts


def bulk_reminder_site(site: Any, n_threads: int, now: datetime, *, seed: int = 2) -> dict[str, int]:
    """`n_threads` sent requests whose clocks were started a day at a time over the past year,
    each with the reminders the clock plans (`core.reminders.for_deadline`). Reminders due
    before the last sweep (an hour before `now`) were sent then; those due since are pending,
    which is what a sweep at `now` finds. Returns counts."""
    from mailflow.core import reminders as R
    from mailflow.core.deadlines import add_days
    from mailflow.store.tables import reminders, threads
    rnd = random.Random(seed)
    cal = Calendar(site)
    slugs = [s for s, a in sorted(site.rules.authorities.items()) if a.contact]
    add_cache: dict[tuple[str, date, int], date] = {}
    last_sweep = now - timedelta(hours=1)
    counts = {"threads": 0, "reminders": 0, "due": 0, "running": 0}
    t_rows, r_rows = [], []
    for k in range(n_threads):
        tid = k + 1
        slug = slugs[k % len(slugs)]
        a = site.rules.authorities[slug]
        law_obj = site.rules.law_for(a)
        law = law_obj.id
        state = STATES[rnd.randrange(len(STATES))]
        sent = now - timedelta(days=rnd.randint(0, 365), hours=rnd.randint(0, 23))
        start = sent.date()
        due, very_late = cal.due(law, start)
        policy = site.settings.reminders.policy(law)

        def add(d: date, n: int, law_obj: Any = law_obj) -> date:
            key = (law_obj.id, d, n)
            if key not in add_cache:
                add_cache[key] = add_days(law_obj, d, n)[0]
            return add_cache[key]

        t_rows.append(dict(
            id=tid, kind="foi", state=state, authority=slug, law=law,
            title=f"Request {tid}", body="Please send me the figures.",
            citizen_email=f"citizen{tid}@mail.example", citizen_name=f"Citizen {tid}",
            request_token=_token(rnd), reply_token=_token(rnd), confirm_token=None,
            created_at=sent, confirmed_at=sent, sent_at=sent, due_date=due,
            delivery_status="sent", delivery_detail=None, allow="anybody", clock_start=start,
            extension=None, very_late_date=very_late, awaiting_description=False,
            hidden=False))
        counts["running"] += state in R.CLOCK_RUNNING
        for s in R.for_deadline(due, very_late, policy, add):
            at = R.due_at(s.on, policy)
            done = at <= last_sweep
            r_rows.append(dict(thread_id=tid, kind=s.kind, event=s.event, due_at=at,
                               state=("sent" if state in R.CLOCK_RUNNING else "skipped")
                               if done else "pending",
                               created_at=sent, done_at=at if done else None, note=None))
            counts["reminders"] += 1
            counts["due"] += (not done) and at <= now
        counts["threads"] += 1
        if len(t_rows) >= 10000 or k == n_threads - 1:
            with site.store.tx() as tx:
                _insert(tx, threads, t_rows, 5000)
                _insert(tx, reminders, r_rows, 5000)
            t_rows, r_rows = [], []
    return counts
