"""Fault reports by email, end to end: `mailflow ingest` (as an MTA's pipe) and real SMTP.

Every way of giving a location (coordinates in the text, a photo's EXIF GPS, a postcode or a
place from the gazetteer), the clarification loop, categories by address, keyword and asking,
a place outside every area, duplicates nearby, the outgoing report (headers, body, map link, a
photo without its EXIF, DKIM), an authority reply, `fixed`, and the questionnaire after time
travel. The example rules in rules/ describe the fictional two-tier county of Wessex (districts
Northdown and Southdown) and the unitary Port Sheldon.
"""
from __future__ import annotations

import email.policy
import io
import re
import smtplib
from datetime import datetime, timedelta, timezone
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path

import dkim
import pytest
from PIL import Image

from conftest import DOMAIN, JANE, Daemon, Site, addresses, compose, wait_for
from mailflow import config
from mailflow.core.commands import parse_report_command
from mailflow.core.geo import Point, distance_m
from mailflow.errors import ConfigError
from mailflow.site import Site as MfSite
from test_roundtrip import dns_from_record, strip_local_delivery

REPORT = f"report@{DOMAIN}"
BOB = "bob.resident@citizen.example"
JANE_FROM = f"Jane Citizen <{JANE}>"
BOB_FROM = f"Bob Resident <{BOB}>"
WESSEX_ROADS = "highways@wessex.gov.example"
WESSEX_LIGHTS = "streetlighting@wessex.gov.example"
SOUTHDOWN = "environment@southdown.gov.example"
PORT_SHELDON_ROADS = "highways@portsheldon.gov.example"
ASHCOMBE = (51.1652, -1.4497)          # Northdown district, Wessex county
PORT_SHELDON = (50.9412, -1.2987)      # the unitary authority
LONDON = (51.5014, -0.1419)            # outside every area of the example rules
MAP = "https://www.openstreetmap.org/?mlat={lat}&mlon={lon}#map=18/{lat}/{lon}"


# -- helpers --------------------------------------------------------------------------------------
def jpeg_with_gps(lat: float, lon: float) -> bytes:
    """A real JPEG as a phone writes it: camera make and model, and a GPS IFD (0x8825)."""
    img = Image.new("RGB", (64, 48), (120, 90, 60))
    exif = Image.Exif()
    exif[0x010F] = "AcmeCam"
    exif[0x0110] = "PhoneCam 3000"

    def dms(v: float) -> tuple[float, float, float]:
        v = abs(v)
        d, m = int(v), int((abs(v) - int(v)) * 60)
        return float(d), float(m), round(((v - d) * 60 - m) * 60, 2)
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2] = ("N" if lat >= 0 else "S"), dms(lat)
    gps[3], gps[4] = ("E" if lon >= 0 else "W"), dms(lon)
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    return buf.getvalue()


def mail(frm: str, to: str, subject: str, body: str, *, photos: tuple[bytes, ...] = (),
         in_reply_to: str | None = None) -> bytes:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = frm, to, subject
    m["Date"] = formatdate()
    m["Message-ID"] = make_msgid(domain="citizen.example")
    if in_reply_to:
        m["In-Reply-To"] = m["References"] = in_reply_to
    m.set_content(body)
    for i, data in enumerate(photos, 1):
        m.add_attachment(data, maintype="image", subtype="jpeg", filename=f"IMG_{i:04}.jpg")
    return m.as_bytes(policy=email.policy.SMTP)


def ingest(site: Site, raw: bytes, rcpt: str, sender: str = JANE) -> None:
    assert site.ingest(raw, [rcpt], sender=sender) == 0


def new_mail(site: Site) -> dict[str, list[tuple[EmailMessage, bytes]]]:
    """Everything mailflow wrote since the last look, by recipient."""
    out: dict[str, list[tuple[EmailMessage, bytes]]] = {}
    for rcpt, msg, raw in site.new_mail():
        out.setdefault(rcpt, []).append((msg, raw))
    return out


def one(got: dict[str, list[tuple[EmailMessage, bytes]]], rcpt: str) -> tuple[EmailMessage, bytes]:
    assert list(got) == [rcpt], {k: [str(m["Subject"]) for m, _ in v] for k, v in got.items()}
    assert len(got[rcpt]) == 1
    return got[rcpt][0]


def text(msg: EmailMessage) -> str:
    return msg.get_body(("plain",)).get_content().replace("\r\n", "\n")  # type: ignore[union-attr]


def flat(msg: EmailMessage) -> str:
    return " ".join(text(msg).split())


def reply(site: Site, to_msg: EmailMessage, body: str, *, frm: str = JANE_FROM,
          sender: str = JANE, photos: tuple[bytes, ...] = ()) -> str:
    """The citizen answers a message from mailflow, at its Reply-To; returns that address."""
    addr = addresses(to_msg, "Reply-To")[0]
    ingest(site, mail(frm, addr, "Re: " + str(to_msg["Subject"]), body, photos=photos,
                      in_reply_to=str(to_msg["Message-ID"])), addr, sender)
    return addr


def report(site: Site, subject: str, body: str, *, to: str = REPORT, frm: str = JANE_FROM,
           sender: str = JANE, photos: tuple[bytes, ...] = ()) -> None:
    ingest(site, mail(frm, to, subject, body, photos=photos), to, sender)


def confirm_and_send(site: Site, citizen: str, authority: str, *, frm: str = JANE_FROM
                     ) -> tuple[EmailMessage, bytes]:
    """The citizen confirms (her first report); the report reaches the authority."""
    conf, _ = one(new_mail(site), citizen)
    assert re.fullmatch(rf"confirm-[0-9a-z]{{12}}@{DOMAIN}", addresses(conf, "Reply-To")[0])
    reply(site, conf, "Yes, please send it.", frm=frm, sender=citizen)
    return one(new_mail(site), authority)


def thread_of(msg: EmailMessage) -> int:
    m = re.search(r"\[Report #(\d+)\]", str(msg["Subject"]))
    assert m, msg["Subject"]
    return int(m.group(1))


def report_row(site: Site, thread_id: int):  # type: ignore[no-untyped-def]
    mf = MfSite.open(site.config)
    try:
        with mf.store.read() as tx:
            return tx.thread(thread_id), tx.report(thread_id), tx.reminders(thread_id)
    finally:
        mf.close()


def reply_address(site: Site, thread_id: int) -> str:
    mf = MfSite.open(site.config)
    try:
        with mf.store.read() as tx:
            thread = tx.thread(thread_id)
            assert thread is not None
            return mf.reply_address(thread)
    finally:
        mf.close()


def sent_report(site: Site, subject: str, body: str, authority: str, **kw):  # type: ignore[no-untyped-def]
    report(site, subject, body, **kw)
    return confirm_and_send(site, kw.get("sender", JANE), authority,
                            frm=kw.get("frm", JANE_FROM))


# -- reporting, with each way of giving a location ---------------------------------------------
def test_a_report_with_coordinates_goes_to_the_county_signed_and_private(site: Site) -> None:
    dns = dns_from_record(site)
    report(site, "Deep pothole outside the school",
           f"There is a deep pothole at {ASHCOMBE[0]:.5f}, {ASHCOMBE[1]:.5f} by the gate.\n\n"
           f"-- \nJane, {JANE}\n")
    conf, conf_raw = one(new_mail(site), JANE)
    assert str(conf["Subject"]) == "Please confirm your report: Deep pothole outside the school"
    assert conf["Auto-Submitted"] == "auto-generated"
    body = flat(conf)
    assert "Wessex County Council" in body and "Category: Pothole" in body
    assert "published" in body
    assert dkim.verify(strip_local_delivery(conf_raw), dnsfunc=dns)
    (t,) = site.json("thread", "list")
    assert t["kind"] == "report" and t["state"] == "awaiting_confirmation" and t["law"] == ""
    assert t["due_date"] is None

    reply(site, conf, "Yes")
    sent, raw = one(new_mail(site), WESSEX_ROADS)
    tid = t["id"]
    frm = addresses(sent, "From")[0]
    assert re.fullmatch(rf"report-{tid}-[0-9a-z]{{12}}@{DOMAIN}", frm)
    assert str(sent["From"]) == f"Jane Citizen <{frm}>"
    assert str(sent["To"]) == f"Wessex County Council <{WESSEX_ROADS}>"
    assert str(sent["Subject"]) == f"Problem report - Deep pothole outside the school [Report #{tid}]"
    assert raw.startswith(f"Return-Path: <{frm}>\r\nDelivered-To: {WESSEX_ROADS}\r\n".encode())
    assert dkim.verify(strip_local_delivery(raw), dnsfunc=dns)
    body = text(sent)
    assert "Dear Wessex County Council," in body
    assert "Category: Pothole" in body
    assert "Location: 51.1652, -1.4497" in body
    assert f"Map: {MAP.format(lat='51.1652', lon='-1.4497')}" in body
    assert "Place as given: 51.16520, -1.44970" in body
    assert "deep pothole" in body and frm in body
    assert f"https://{DOMAIN}/report/{tid}/" in body
    assert JANE.encode() not in raw.lower()       # not even from her signature
    thread, row, reminders = report_row(site, tid)
    assert thread.state == "open" and thread.authority == "wessex" and thread.sent_at
    assert thread.due_date is None and thread.clock_start is None
    assert (row.category, row.area, row.location_source) == ("pothole", "wessex", "text")
    assert (round(row.lat, 4), round(row.lon, 4)) == ASHCOMBE
    assert [(r.kind, r.event) for r in reminders] == [("questionnaire", "q:1")]
    assert reminders[0].due_at - thread.sent_at == timedelta(days=28)


def test_only_a_photo_with_gps_locates_it_and_the_exif_is_stripped(site: Site) -> None:
    dns = dns_from_record(site)
    photo = jpeg_with_gps(*PORT_SHELDON)
    sent, raw = sent_report(site, "Pothole", "It is big and getting bigger.",
                            PORT_SHELDON_ROADS, photos=(photo,))
    assert str(sent["To"]) == f"Port Sheldon City Council <{PORT_SHELDON_ROADS}>"
    body = flat(sent)
    assert "Location: 50.9412, -1.2987" in body
    assert "recorded by the camera" in body and "1 photo is attached." in body
    (att,) = [p for p in sent.iter_attachments()]
    assert att.get_content_type() == "image/jpeg" and att.get_filename() == "IMG_0001.jpg"
    data = att.get_content()
    with Image.open(io.BytesIO(data)) as img:
        assert img.size == (64, 48)
        exif = img.getexif()
        assert len(exif) == 0 and not exif.get_ifd(0x8825) and "exif" not in img.info
    assert b"AcmeCam" not in data and b"PhoneCam" not in data and b"Exif" not in data
    assert b"AcmeCam" not in raw and b"PhoneCam" not in raw
    assert dkim.verify(strip_local_delivery(raw), dnsfunc=dns)
    _, row, _ = report_row(site, thread_of(sent))
    assert row.location_source == "exif" and row.area == "port-sheldon"


def test_coordinates_in_the_text_win_over_the_photo(site: Site) -> None:
    report(site, "Pothole", f"At {ASHCOMBE[0]}, {ASHCOMBE[1]} (photo taken later at home).",
           photos=(jpeg_with_gps(*PORT_SHELDON),))
    conf, _ = one(new_mail(site), JANE)
    assert "Wessex County Council" in flat(conf)


def test_a_postcode_from_the_gazetteer_routes_fly_tipping_to_the_district(site: Site) -> None:
    sent, _ = sent_report(site, "Fly-tipping on the verge",
                          "Someone dumped a sofa and bags near WX12 3QT, by the bus stop.",
                          SOUTHDOWN)
    assert str(sent["To"]) == f"Southdown District Council <{SOUTHDOWN}>"
    body = text(sent)
    assert "Category: Fly-tipping" in body and "Place as given: WX12 3QT" in body
    _, row, _ = report_row(site, thread_of(sent))
    assert (row.location_source, row.area, row.category) == ("gazetteer", "southdown",
                                                             "fly-tipping")


# -- asking the citizen ----------------------------------------------------------------------------
def test_no_location_is_asked_for_until_given_then_confirmed_and_sent(site: Site) -> None:
    report(site, "Street light out", "The street light by the church has been out for a week.")
    ask, _ = one(new_mail(site), JANE)
    (t,) = site.json("thread", "list")
    assert t["state"] == "awaiting_details"
    reply_addr = addresses(ask, "From")[0]
    assert re.fullmatch(rf"reply-{t['id']}-[0-9a-z]{{12}}@{DOMAIN}", reply_addr)
    assert addresses(ask, "Reply-To") == [reply_addr]
    assert str(ask["Subject"]) == "Where is it? Street light out"
    assert str(ask["In-Reply-To"]).startswith("<") and ask["Auto-Submitted"] == "auto-generated"
    body = flat(ask)
    assert "coordinates" in body and "photo" in body and "postcode" in body
    assert "What kind of problem" not in body   # the category is known: street-light

    # An answer that still names no place we know: asked again, the quote is not read.
    reply(site, ask, "It is by the church, next to the old mill.\n\nOn Monday you wrote:\n"
                     "> its coordinates ... 51.5014, -0.1419\n")
    again, _ = one(new_mail(site), JANE)
    assert str(again["Subject"]) == "Where is it? Street light out"
    assert site.json("thread", "list")[0]["state"] == "awaiting_details"

    reply(site, again, "It's on the High Street in Kingsbury St Mary.")
    sent, _ = confirm_and_send(site, JANE, WESSEX_LIGHTS)
    assert "Category: Street light" in text(sent)
    assert "Place as given: Kingsbury St Mary" in text(sent)
    t = site.json("thread", "show", str(t["id"]))
    assert t["state"] == "open"
    kinds = [m["kind"] for m in t["messages"]]
    assert kinds[:4] == ["draft", "report_question", "report_details", "report_question"]


def test_a_photo_in_the_reply_gives_the_place_and_goes_with_the_report(site: Site) -> None:
    report(site, "Graffiti on the bus shelter", "Someone sprayed it last night.")
    ask, _ = one(new_mail(site), JANE)
    reply(site, ask, "Here is a photo I took there.", photos=(jpeg_with_gps(*ASHCOMBE),))
    sent, _ = confirm_and_send(site, JANE, "streetscene@northdown.gov.example")
    assert "Location: 51.1652, -1.4497" in text(sent)
    (att,) = list(sent.iter_attachments())
    assert b"PhoneCam" not in att.get_content()
    _, row, _ = report_row(site, thread_of(sent))
    assert row.location_source == "exif"


def test_a_photo_that_cannot_be_cleaned_is_withheld(site: Site) -> None:
    broken = b"\xff\xd8\xff\xe1\x00\x10Exif\x00\x00PhoneCam 3000 serial 12345" + b"\x00" * 64
    sent, raw = sent_report(site, "Pothole", f"At {ASHCOMBE[0]}, {ASHCOMBE[1]}.", WESSEX_ROADS,
                            photos=(jpeg_with_gps(*ASHCOMBE), broken))
    assert len(list(sent.iter_attachments())) == 1
    body = flat(sent)
    assert "1 photo is attached." in body and "1 photo was withheld" in body
    assert b"serial 12345" not in raw and b"PhoneCam" not in raw


def test_category_by_the_address_tag(site: Site) -> None:
    report(site, "Broken road by the mill", f"Right here: {ASHCOMBE[0]}, {ASHCOMBE[1]}.",
           to=f"report+pothole@{DOMAIN}")
    conf, _ = one(new_mail(site), JANE)
    assert "Category: Pothole" in flat(conf)


def test_an_ambiguous_category_is_asked_with_the_list(site: Site) -> None:
    report(site, "Problem by the shops",
           f"The street light is out and there is a pothole under it. {PORT_SHELDON[0]}, "
           f"{PORT_SHELDON[1]}")
    ask, _ = one(new_mail(site), JANE)
    assert str(ask["Subject"]) == "What kind of problem is it? Problem by the shops"
    body = text(ask)
    assert "more than one kind of problem:\n  pothole, street-light\n" in body
    for line in ("pothole — Pothole", "street-light — Street light", "fly-tipping — Fly-tipping",
                 "bins — Bins", "graffiti — Graffiti"):
        assert f"  {line}\n" in body
    assert "Where exactly" not in body
    reply(site, ask, "pothole")
    sent, _ = confirm_and_send(site, JANE, PORT_SHELDON_ROADS)
    assert "Category: Pothole" in text(sent)


def test_nothing_known_asks_for_both_and_one_reply_gives_both(site: Site) -> None:
    report(site, "Problem", "Please fix it.")
    ask, _ = one(new_mail(site), JANE)
    assert str(ask["Subject"]) == "Where is it, and what is it? Problem"
    reply(site, ask, f"graffiti\nat {ASHCOMBE[0]}, {ASHCOMBE[1]}")
    conf, _ = one(new_mail(site), JANE)
    assert "Category: Graffiti" in flat(conf) and "Northdown District Council" in flat(conf)


def test_outside_every_area_gets_a_polite_reply_and_a_second_chance(site: Site) -> None:
    report(site, "Pothole on the Mall", f"Huge pothole at {LONDON[0]}, {LONDON[1]}.")
    no, _ = one(new_mail(site), JANE)
    assert str(no["Subject"]) == "Outside the area we cover: Pothole on the Mall"
    assert "outside the area" in flat(no)
    assert MAP.format(lat="51.5014", lon="-0.1419") in text(no)
    (t,) = site.json("thread", "list")
    assert t["state"] == "not_covered"
    reply(site, no, "Oh well, thanks anyway.")           # nothing to read: no answer
    assert new_mail(site) == {}
    reply(site, no, f"Sorry, wrong place: it is at {ASHCOMBE[0]}, {ASHCOMBE[1]}")
    conf, _ = one(new_mail(site), JANE)
    assert "Wessex County Council" in flat(conf)


# -- duplicates ------------------------------------------------------------------------------------
def test_a_nearby_open_report_of_the_same_kind_is_pointed_out(site: Site) -> None:
    first, _ = sent_report(site, "Pothole on Mill Lane",
                           f"At {ASHCOMBE[0]:.5f}, {ASHCOMBE[1]:.5f}.", WESSEX_ROADS)
    tid = thread_of(first)
    # 25 m away, another citizen; a street light there is not a duplicate of a pothole.
    near = (ASHCOMBE[0] + 0.0002, ASHCOMBE[1] + 0.0002)
    report(site, "Street light out", f"At {near[0]:.5f}, {near[1]:.5f}.", frm=BOB_FROM,
           sender=BOB)
    conf, _ = one(new_mail(site), BOB)
    assert str(conf["Subject"]).startswith("Please confirm your report")
    report(site, "Hole in the road", f"Big pothole at {near[0]:.5f}, {near[1]:.5f}.",
           frm=BOB_FROM, sender=BOB)
    dup, _ = one(new_mail(site), BOB)
    assert str(dup["Subject"]) == ("A similar problem was already reported nearby: "
                                   "Hole in the road")
    body = text(dup)
    metres = round(distance_m(Point(*ASHCOMBE), Point(*near)))
    assert 20 < metres < 30
    assert f'"Pothole on Mill Lane", about {metres} m away' in body
    assert f"https://{DOMAIN}/report/{tid}/" in body
    assert re.fullmatch(rf"confirm-[0-9a-z]{{12}}@{DOMAIN}", addresses(dup, "Reply-To")[0])
    assert site.json("thread", "list")[-1]["state"] == "awaiting_confirmation"
    reply(site, dup, "It is a different hole, please send it.", frm=BOB_FROM, sender=BOB)
    sent, _ = one(new_mail(site), WESSEX_ROADS)
    assert "Hole in the road" in str(sent["Subject"])


def test_a_fixed_report_is_no_longer_a_duplicate(site: Site) -> None:
    first, _ = sent_report(site, "Pothole on Mill Lane", f"At {ASHCOMBE[0]}, {ASHCOMBE[1]}.",
                           WESSEX_ROADS)
    reply_addr = reply_address(site, thread_of(first))
    ingest(site, mail(JANE_FROM, reply_addr, "Re", "fixed"), reply_addr)
    new_mail(site)
    # Jane has confirmed before: her next report goes straight out, and no duplicate is named.
    report(site, "Pothole again", f"At {ASHCOMBE[0]}, {ASHCOMBE[1]}.")
    sent, _ = one(new_mail(site), WESSEX_ROADS)
    assert "Pothole again" in str(sent["Subject"])


# -- replies, fixed, and the questionnaire ------------------------------------------------------------
def test_authority_reply_forwarded_fixed_by_reply_and_the_questionnaire(site: Site) -> None:
    sent, _ = sent_report(site, "Pothole on Mill Lane", f"At {ASHCOMBE[0]}, {ASHCOMBE[1]}.",
                          WESSEX_ROADS)
    tid = thread_of(sent)
    report_addr = addresses(sent, "From")[0]
    thread, _, _ = report_row(site, tid)
    assert thread.sent_at is not None
    sent_at = thread.sent_at

    # The council answers: matched by its address, forwarded from her reply address.
    ingest(site, compose(f"Highways <{WESSEX_ROADS}>", report_addr, "RE: " + str(sent["Subject"]),
                         "Thank you, an inspector will visit this week.",
                         in_reply_to=str(sent["Message-ID"])), report_addr, WESSEX_ROADS)
    fwd, _ = one(new_mail(site), JANE)
    assert "inspector will visit" in text(fwd)
    assert "has replied about your report" in flat(fwd)
    reply_addr = addresses(fwd, "Reply-To")[0]
    assert re.fullmatch(rf"reply-{tid}-[0-9a-z]{{12}}@{DOMAIN}", reply_addr)
    t = site.json("thread", "show", str(tid))
    assert [m["match"]["method"] for m in t["messages"] if m["kind"] == "response"] == \
        ["reply_address"]
    assert t["awaiting_description"] is False          # no FOI "how did it end?"
    assert [r["kind"] for r in t["reminders"]] == ["questionnaire"]

    # An automatic reply from the council is kept, not forwarded.
    ingest(site, compose(f"Highways <{WESSEX_ROADS}>", report_addr, "Automatic reply",
                         "We are closed.", extra={"Auto-Submitted": "auto-replied"}),
           report_addr, "")
    assert new_mail(site) == {}

    # A follow-up from Jane goes to the council, without her address.
    ingest(site, mail(JANE_FROM, reply_addr, "Re: thanks", "It is getting deeper."), reply_addr)
    fu, fu_raw = one(new_mail(site), WESSEX_ROADS)
    assert addresses(fu, "From") == [report_addr] and "getting deeper" in text(fu)
    assert str(fu["Subject"]).endswith(f"[Report #{tid}]") and JANE.encode() not in fu_raw

    # Time travel: nothing before four weeks; then one questionnaire, once.
    def run(at: datetime) -> None:
        r = site.run("reminders", "run", "--now", at.isoformat())
        assert r.returncode == 0, r.stderr.decode()
        site.run("outbox", "flush")

    run(sent_at + timedelta(days=27))
    assert new_mail(site) == {}
    run(sent_at + timedelta(days=28, minutes=1))
    q, _ = one(new_mail(site), JANE)
    assert str(q["Subject"]) == "Has it been fixed? Pothole on Mill Lane"
    assert addresses(q, "From") == [reply_addr] and "not fixed" in text(q)
    run(sent_at + timedelta(days=28, minutes=2))
    run(sent_at + timedelta(days=40))
    assert new_mail(site) == {}                         # exactly once
    run(sent_at + timedelta(days=56, minutes=1))
    q2, _ = one(new_mail(site), JANE)                   # again, four weeks later
    assert str(q2["Subject"]) == "Has it been fixed? Pothole on Mill Lane"

    # "not fixed" keeps it open; "fixed" ends it and the questions.
    reply(site, q2, "Not fixed.")
    ack, _ = one(new_mail(site), JANE)
    assert "open" in str(ack["Subject"])
    assert site.json("thread", "show", str(tid))["state"] == "open"
    reply(site, q2, "Yes, it’s fixed!")
    ack, _ = one(new_mail(site), JANE)
    assert str(ack["Subject"]) == "Your report is now fixed: Pothole on Mill Lane"
    thread, row, reminders = report_row(site, tid)
    assert thread.state == "fixed" and row.fixed_at is not None
    run(sent_at + timedelta(days=90))
    assert new_mail(site) == {}
    assert [(r.event, r.state) for r in reminders] == [("q:1", "sent"), ("q:2", "sent"),
                                                       ("q:3", "pending")]
    _, _, reminders = report_row(site, tid)
    assert reminders[-1].state == "skipped"
    assert "no longer open" in (reminders[-1].note or "")


def test_a_withdrawn_report_is_withdrawn_at_the_council_too(site: Site) -> None:
    """"withdraw" from the reporter: the council is told once, in the report's own thread and
    without her address, and she gets the usual acknowledgement."""
    sent, _ = sent_report(site, "Pothole on Mill Lane", f"At {ASHCOMBE[0]}, {ASHCOMBE[1]}.",
                          WESSEX_ROADS)
    tid = thread_of(sent)
    report_addr = addresses(sent, "From")[0]
    reply_addr = reply_address(site, tid)
    ingest(site, mail(JANE_FROM, reply_addr, "Re", "withdraw"), reply_addr)
    got = new_mail(site)
    assert sorted(got) == sorted([JANE, WESSEX_ROADS])
    letter, raw = got[WESSEX_ROADS][0]
    assert addresses(letter, "From") == [report_addr]
    assert str(letter["Subject"]) == f"Withdrawn: Problem report - Pothole on Mill Lane [Report #{tid}]"
    assert str(sent["Message-ID"]) in str(letter["References"])
    assert "withdrawing my report" in flat(letter) and JANE.encode() not in raw.lower()
    ack, _ = got[JANE][0]
    assert "withdrawn" in str(ack["Subject"])
    assert site.json("thread", "show", str(tid))["state"] == "user_withdrawn"
    ingest(site, mail(JANE_FROM, reply_addr, "Re", "withdraw"), reply_addr)   # said twice
    assert WESSEX_ROADS not in new_mail(site)


def test_reports_do_not_trouble_the_foi_clock(site: Site) -> None:
    sent_report(site, "Pothole", f"At {ASHCOMBE[0]}, {ASHCOMBE[1]}.", WESSEX_ROADS)
    assert site.json("thread", "list", "--overdue") == []
    far = (datetime.now(timezone.utc) + timedelta(days=400)).isoformat()
    r = site.run("reminders", "due", "--now", far, "--json")
    assert r.returncode == 0, r.stderr.decode()
    r = site.run("reminders", "run", "--now", far)
    assert r.returncode == 0, r.stderr.decode()
    # An admin who tries to extend a report's (non-existent) clock is told why, not crashed.
    (t,) = site.json("thread", "list")
    r = site.run("thread", "extend", str(t["id"]))
    assert r.returncode == 1 and b"no statutory clock" in r.stderr
    assert b"Traceback" not in r.stderr


def test_premoderation_holds_a_report_until_approved(site: Site) -> None:
    site.set("moderation", "new_requests", '"premoderate"')
    report(site, "Pothole", f"At {ASHCOMBE[0]}, {ASHCOMBE[1]}.")
    conf, _ = one(new_mail(site), JANE)
    reply(site, conf, "yes")
    assert new_mail(site) == {}
    (item,) = site.json("queue", "list")
    assert item["reason"] == "approval"
    assert site.json("thread", "list")[0]["state"] == "awaiting_approval"
    r = site.run("queue", "approve", str(item["id"]))
    assert r.returncode == 0, r.stderr.decode()
    site.run("outbox", "flush")
    sent, _ = one(new_mail(site), WESSEX_ROADS)
    assert "[Report #" in str(sent["Subject"])


def test_automatic_mail_to_report_is_never_answered(site: Site) -> None:
    ingest(site, compose(JANE_FROM, REPORT, "Out of office", "Away",
                         extra={"Auto-Submitted": "auto-replied"}), REPORT)
    ingest(site, compose(f"Mailer <mailer-daemon@citizen.example>", REPORT, "Pothole",
                         f"At {ASHCOMBE[0]}, {ASHCOMBE[1]}."), REPORT, "")
    assert new_mail(site) == {}
    assert site.json("thread", "list") == []
    assert {i["reason"] for i in site.json("queue", "list")} == {"automatic"}


def test_a_site_without_categories_refuses_report_at_the_door(site: Site) -> None:
    (site.dir / "rules" / "categories.toml").unlink()
    raw = compose(JANE_FROM, REPORT, "Pothole", "At 51.1652, -1.4497.")
    assert site.ingest(raw, [REPORT], sender=JANE) == 67
    assert new_mail(site) == {}


# -- over SMTP, through the real daemon ------------------------------------------------------------------
def smtp_send(daemon: Daemon, sender: str, rcpt: str, raw: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=20) as s:
        s.sendmail(sender, [rcpt], raw)


def test_the_whole_report_over_smtp(site: Site, daemon: Daemon) -> None:
    dns = dns_from_record(site)
    photo = jpeg_with_gps(*ASHCOMBE)
    smtp_send(daemon, JANE, f"report+pothole@{DOMAIN}",
              mail(JANE_FROM, f"report+pothole@{DOMAIN}", "Crater on the Ashcombe road",
                   "See the photo.", photos=(photo,)))
    conf = wait_for(lambda: site.mail_to(JANE), what="confirmation")[0][1]
    confirm = addresses(conf, "Reply-To")[0]
    smtp_send(daemon, JANE, confirm, mail(JANE_FROM, confirm, "Re: confirm", "Yes"))
    (_, sent, raw), = wait_for(lambda: site.mail_to(WESSEX_ROADS), what="report")
    assert dkim.verify(strip_local_delivery(raw), dnsfunc=dns)
    assert "Location: 51.1652, -1.4497" in text(sent)
    (att,) = list(sent.iter_attachments())
    assert b"PhoneCam" not in att.get_content()
    report_addr = addresses(sent, "From")[0]
    smtp_send(daemon, WESSEX_ROADS, report_addr,
              compose(f"Highways <{WESSEX_ROADS}>", report_addr, "RE: crater",
                      "Repaired this morning."))
    fwd = wait_for(lambda: site.mail_to(JANE), what="forward")[0][1]
    assert "Repaired this morning." in text(fwd)
    reply_addr = addresses(fwd, "Reply-To")[0]
    smtp_send(daemon, JANE, reply_addr, mail(JANE_FROM, reply_addr, "Re: crater", "fixed"))
    wait_for(lambda: site.json("thread", "list")[0]["state"] == "fixed", what="fixed")


def test_report_at_is_refused_over_smtp_without_categories(site: Site) -> None:
    (site.dir / "rules" / "categories.toml").unlink()
    d = Daemon(site)
    try:
        with smtplib.SMTP("127.0.0.1", d.port, timeout=20) as s:
            s.ehlo("citizen.example")
            s.mail(JANE)
            code, msg = s.rcpt(REPORT)
            assert code == 550 and b"fault reports" in msg
    finally:
        d.stop()


# -- small pieces --------------------------------------------------------------------------------
@pytest.mark.parametrize("said, command", [
    ("fixed", "fixed"), ("Fixed.", "fixed"), ("it's fixed", "fixed"),
    ("It has been fixed!", "fixed"), ("has been fixed", "fixed"), ("Yes, it’s fixed", "fixed"),
    ("arreglado", "fixed"), ("Ya está arreglado", "fixed"),
    ("not fixed", "not_fixed"), ("Still broken.", "not_fixed"), ("No, still broken", "not_fixed"),
    ("sigue roto", "not_fixed"), ("withdraw", "withdraw"),
    ("no, fixed", None), ("fixed\nbut the pavement is not", None), ("The lamp is fixed?", None),
])
def test_what_counts_as_fixed(said: str, command: str | None) -> None:
    assert parse_report_command(said) == command


GOOD = '[site]\ndomain = "ask.example"\nsecret = "0123456789abcdef0123"\n'


def test_reports_config_defaults_and_errors(tmp_path: Path) -> None:
    p = tmp_path / "config.toml"
    p.write_text(GOOD)
    s = config.load(p).reports
    assert (s.duplicate_distance_m, s.questionnaire_after_days, s.questionnaire_repeat_days) == \
        (100, 28, 28)
    assert s.map_link == MAP
    for extra, words in [
        ("[reports]\nduplicate_distance = 50\n", ["[reports] duplicate_distance", "unknown key",
                                                  "duplicate_distance_m"]),
        ("[reports]\nquestionnaire_after_days = 0\n", ["questionnaire_after_days", "at least 1"]),
        ("[reports]\nduplicate_distance_m = -5\n", ["duplicate_distance_m", "0 or more"]),
        ('[reports]\nmap_link = "https://maps.example/"\n', ["map_link", "{lat}"]),
        ('[reports]\nquestionnaire_repeat_days = "monthly"\n', ["expected int"]),
    ]:
        p.write_text(GOOD + extra)
        with pytest.raises(ConfigError) as e:
            config.load(p)
        for w in words:
            assert w in str(e.value), (w, str(e.value))
    p.write_text(GOOD + "[reports]\nduplicate_distance_m = 25.5\nquestionnaire_after_days = 14\n")
    s = config.load(p).reports
    assert s.duplicate_distance_m == 25.5 and s.questionnaire_after_days == 14


def test_a_spanish_site_asks_and_reports_in_spanish(site: Site) -> None:
    site.set("site", "language", '"es"')
    report(site, "Farola apagada", "La farola de la esquina lleva una semana apagada.",
           to=f"report+street-light@{DOMAIN}")
    ask, _ = one(new_mail(site), JANE)
    assert str(ask["Subject"]) == "¿Dónde está? Farola apagada"
    assert "código postal" in flat(ask)
    reply(site, ask, "En WX7 4LP, delante de la panadería.")
    sent, _ = confirm_and_send(site, JANE, WESSEX_LIGHTS)
    tid = thread_of(sent)
    assert str(sent["Subject"]) == f"Aviso de incidencia - Farola apagada [Report #{tid}]"
    assert "Categoría: Street light" in text(sent) and "Lugar indicado: WX7 4LP" in text(sent)
    reply_addr = reply_address(site, tid)
    ingest(site, mail(JANE_FROM, reply_addr, "Re", "Ya está arreglado."), reply_addr)
    ack, _ = one(new_mail(site), JANE)
    assert str(ack["Subject"]) == "Su aviso está ahora arreglado: Farola apagada"


# -- both stores -------------------------------------------------------------------------------
@pytest.fixture(params=["sqlite", "postgresql"])
def mf(request: pytest.FixtureRequest, site: Site):  # type: ignore[no-untyped-def]
    from dataclasses import replace as _replace

    from test_store_backends import _pg_database
    s = MfSite.open(site.config)
    gen = None
    if request.param == "postgresql":
        gen = _pg_database()
        url = next(gen)
        s = MfSite(settings=_replace(s.settings, database=_replace(s.settings.database, url=url)),
                   rules=s.rules)
    try:
        yield s
    finally:
        s.close()
        if gen is not None:
            next(gen, None)


def test_reports_and_duplicates_on_both_stores(mf: MfSite) -> None:
    from mailflow.pipeline import Pipeline
    from mailflow.spool import Envelope

    def process(raw: bytes, rcpt: str, sender: str) -> None:
        Pipeline(mf).process(raw, Envelope(mail_from=sender, rcpt_tos=[rcpt], via="test"))

    for who, frm in ((JANE, JANE_FROM), (BOB, BOB_FROM)):
        process(mail(frm, REPORT, "Pothole", f"At {ASHCOMBE[0]}, {ASHCOMBE[1]}."), REPORT, who)
        with mf.store.read() as tx:
            t = tx.threads()[-1]
        if who == JANE:
            confirm = f"confirm-{t.confirm_token}@{DOMAIN}"
            process(mail(frm, confirm, "Re", "Yes"), confirm, who)
    with mf.store.read() as tx:
        jane, bob = tx.threads()
        assert (jane.state, bob.state) == ("open", "awaiting_confirmation")
        assert [r.thread_id for r in tx.reports(states=["open"], area="wessex")] == [jane.id]
        ((near, metres),) = tx.open_reports_near("pothole", Point(*ASHCOMBE), 100,
                                                 exclude=bob.id)
        assert near.thread_id == jane.id and metres < 1
        dup = [m for m in tx.messages(bob.id) if m.direction == "out"]
        assert [m.kind for m in dup] == ["confirmation"]
        assert f"/report/{jane.id}/" in dup[0].text


def _overlap_at_ashcombe(site: Site) -> str:
    """A district area of Southdown's drawn over Northdown's at Ashcombe (a data mistake);
    returns the areas file as it was."""
    import json
    path = site.dir / "rules" / "areas.geojson"
    before = path.read_text()
    data = json.loads(before)
    lat, lon = ASHCOMBE
    data["features"].append({"type": "Feature", "properties": {
        "id": "overlap", "name": "Overlap", "authority": "southdown", "tiers": ["district"]},
        "geometry": {"type": "Polygon", "coordinates": [[
            [lon - 0.01, lat - 0.01], [lon + 0.01, lat - 0.01], [lon + 0.01, lat + 0.01],
            [lon - 0.01, lat + 0.01], [lon - 0.01, lat - 0.01]]]}})
    path.write_text(json.dumps(data))
    return before


def test_no_single_authority_there_goes_to_a_person(site: Site) -> None:
    """Two district areas of different councils overlap (a data mistake): nobody is guessed."""
    _overlap_at_ashcombe(site)
    lat, lon = ASHCOMBE
    report(site, "Graffiti on the bus shelter", f"At {lat}, {lon}.")
    assert new_mail(site) == {}
    (t,) = site.json("thread", "list")
    assert t["state"] == "awaiting_routing" and t["authority"] == ""
    (item,) = site.json("queue", "list")
    assert item["reason"] == "report_routing" and item["thread_id"] == t["id"]
    # A pothole there is the county's, which nothing overlaps: it goes on.
    report(site, "Pothole", f"At {lat}, {lon}.")
    conf, _ = one(new_mail(site), JANE)
    assert "Wessex County Council" in flat(conf)


def test_a_person_names_the_authority_for_a_report_the_areas_could_not_place(site: Site) -> None:
    """`queue approve N --authority SLUG`: the report goes on as a routed one would (her
    confirmation names that council, then it is sent there), and the event says who chose."""
    _overlap_at_ashcombe(site)
    report(site, "Graffiti on the bus shelter", f"At {ASHCOMBE[0]}, {ASHCOMBE[1]}.")
    (item,) = site.json("queue", "list")
    tid = item["thread_id"]

    r = site.run("queue", "approve", str(item["id"]))         # the rules still cannot say
    err = " ".join(r.stderr.decode().split())
    assert r.returncode == 1 and "still no single authority" in err, err
    assert "--authority" in err and "southdown" in err
    r = site.run("queue", "approve", str(item["id"]), "--authority", "atlantis")
    assert r.returncode == 1 and "unknown authority 'atlantis'" in r.stderr.decode()
    assert site.json("thread", "show", str(tid))["state"] == "awaiting_routing"
    assert new_mail(site) == {}

    r = site.run("--as", "alice", "queue", "approve", str(item["id"]), "--authority", "southdown",
                 "--reason", "the overlap is Southdown's estate")
    assert r.returncode == 0, r.stderr.decode()
    assert "routed to southdown" in r.stdout.decode()
    assert site.json("queue", "list") == []
    sent, _ = confirm_and_send(site, JANE, "graffiti@southdown.gov.example")
    assert thread_of(sent) == tid
    t = site.json("thread", "show", str(tid))
    assert (t["state"], t["authority"]) == ("open", "southdown")
    (routed,) = [e for e in t["events"] if e["kind"] == "report_routed"]
    assert routed["actor"] == "admin:alice"
    assert "southdown chosen by admin:alice" in routed["detail"]["reasons"]


def test_approving_a_routing_item_after_the_areas_are_mended_routes_it_by_the_rules(
        site: Site) -> None:
    before = _overlap_at_ashcombe(site)
    report(site, "Graffiti on the bus shelter", f"At {ASHCOMBE[0]}, {ASHCOMBE[1]}.")
    (item,) = site.json("queue", "list")
    (site.dir / "rules" / "areas.geojson").write_text(before)    # the mistake is mended
    r = site.run("queue", "approve", str(item["id"]))
    assert r.returncode == 0, r.stderr.decode()
    conf, _ = one(new_mail(site), JANE)
    assert "Northdown" in flat(conf)
    r = site.run("queue", "approve", str(item["id"]))            # decided once
    assert r.returncode == 1 and "already decided" in r.stderr.decode()
    r = site.run("queue", "approve", "1", "--authority", "southdown")
    assert r.returncode == 1


def test_an_admin_marks_a_report_fixed_and_open_again(site: Site) -> None:
    """The council says it is mended and the reporter never answers: an admin sets it, with the
    report's own states (an FOI outcome is refused), and "open" brings the questionnaire back."""
    sent, _ = sent_report(site, "Pothole on Mill Lane", f"At {ASHCOMBE[0]}, {ASHCOMBE[1]}.",
                          WESSEX_ROADS)
    tid = thread_of(sent)
    r = site.run("thread", "state", str(tid), "successful")
    assert r.returncode == 1 and "its states are open, fixed, user_withdrawn" in \
        " ".join(r.stderr.decode().split())
    r = site.run("thread", "state", str(tid), "fixed", "--reason", "council's photo")
    assert r.returncode == 0, r.stderr.decode()
    thread, row, reminders = report_row(site, tid)
    assert thread.state == "fixed" and row.fixed_at is not None
    assert site.json("thread", "list", "--state", "fixed")[0]["id"] == tid
    assert [(r.event, r.state) for r in reminders] == [("q:1", "pending")]
    r = site.run("thread", "state", str(tid), "open")
    assert r.returncode == 0, r.stderr.decode()
    thread, row, reminders = report_row(site, tid)
    assert thread.state == "open" and row.fixed_at is None
    assert [r.state for r in reminders if r.state == "pending"] == ["pending"]
    actions = [(a["action"], a["reason"]) for a in site.json("audit", "--thread", str(tid))]
    assert ("thread_state", "council's photo") in actions
    # A request takes only the request states.
    report(site, "Pothole two", f"At {ASHCOMBE[0]}, {ASHCOMBE[1]}.")  # not sent yet
    t2 = site.json("thread", "list")[-1]["id"]
    r = site.run("thread", "state", str(t2), "fixed")
    assert r.returncode == 1 and "has not been sent" in r.stderr.decode()


def test_the_report_tag_and_address_thread_like_the_foi_ones() -> None:
    """`[Report #n]` from a known sender, and `report-<id>-<token>@`, as the matcher sees them."""
    from mailflow.core.addresses import AddressKind
    from mailflow.core.matching import match
    from test_matching import D, T5, lookup, msg
    d = match(msg(subject="RE: Problem report - Pothole [Report #5]"), lookup(), domain=D)
    assert d.action == "thread" and d.threads == ((5, AddressKind.REQUEST),)
    assert "[Report #5]" in d.evidence[0].detail
    d = match(msg(to=f"Roads <report-5-{T5[0]}@{D}>"), lookup(), domain=D)
    assert d.action == "thread" and d.threads == ((5, AddressKind.REQUEST),)
    d = match(msg(to=f"report-5-aaaaaaaaaaaa@{D}"), lookup(), domain=D)
    assert d.action == "queue" and d.queue_reason == "bad_token"
