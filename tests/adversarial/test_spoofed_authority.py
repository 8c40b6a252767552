"""Spoofed authorities and backscatter, through the real pipeline with a stub DNS resolver
(`site.dns_resolver`: no test asks real DNS).

A reply that claims to come from the authority and fails DKIM, SPF and DMARC under the
authority's own published policy is stored, hidden and queued ("unauthenticated"): nothing is
forwarded and the thread does not move until an admin approves it with `mailflow queue
approve`, which forwards it and applies its effects once. A genuinely signed reply goes
through. Every message stored records our own Authentication-Results.

Backscatter: the confirmation of a new request goes only to the envelope sender (SRS and BATV
forms compared by domain), and an address that never confirmed a request gets at most one
automatic answer a week (RFC 3834).
"""
from __future__ import annotations

import base64
import email.policy
from collections.abc import Iterator
from datetime import timedelta
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import select, update

from conftest import DOMAIN, JANE, Site
from mailflow.mail.authenticate import StubResolver
from mailflow.pipeline import Pipeline, Result
from mailflow.site import Site as MfSite
from mailflow.spool import Envelope
from mailflow.store import tables as T

GOV = "camden.gov.example"
AUTHORITY = f"foi@{GOV}"
OFFICER = f"j.smith@{GOV}"               # a new address at the authority's domain
GOV_MX = "192.0.2.25"                      # in the authority's SPF record
FORGER = "203.0.113.66"                    # anywhere else
JANE_IP = "198.51.100.7"


@pytest.fixture(scope="module")
def key() -> tuple[bytes, str]:
    k = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem = k.private_bytes(serialization.Encoding.PEM,
                          serialization.PrivateFormat.TraditionalOpenSSL,
                          serialization.NoEncryption())
    der = k.public_key().public_bytes(serialization.Encoding.DER,
                                      serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, base64.b64encode(der).decode()


def authority_dns(pub: str, dmarc: str = "v=DMARC1; p=reject") -> StubResolver:
    records = {GOV: {"TXT": [f"v=spf1 ip4:{GOV_MX} -all"]},
               f"s2025._domainkey.{GOV}": {"TXT": [f"v=DKIM1; k=rsa; p={pub}"]}}
    if dmarc:
        records[f"_dmarc.{GOV}"] = {"TXT": [dmarc]}
    return StubResolver(records)


@pytest.fixture()
def mf(site: Site, key: tuple[bytes, str]) -> Iterator[MfSite]:
    site.set("classify", "automatic_answer_days", "7")   # RFC 3834's week
    s = MfSite.open(site.config)
    s.dns_resolver = authority_dns(key[1])   # what every Pipeline(s) of this site asks
    try:
        yield s
    finally:
        s.close()


def letter(frm: str, to: str, subject: str, body: str, *, extra: dict[str, str] | None = None,
           in_reply_to: str | None = None) -> bytes:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = frm, to, subject
    m["Date"] = formatdate()
    m["Message-ID"] = make_msgid(domain="sender.example")
    if in_reply_to:
        m["In-Reply-To"] = m["References"] = in_reply_to
    for k, v in (extra or {}).items():
        m[k] = v
    m.set_content(body)
    return m.as_bytes(policy=email.policy.SMTP)


def sign(raw: bytes, pem: bytes) -> bytes:
    return dkim.sign(raw, b"s2025", GOV.encode(), pem,
                     include_headers=[b"from", b"to", b"subject", b"date", b"message-id"]) + raw


def process(mf: MfSite, raw: bytes, rcpt: str, sender: str, ip: str = JANE_IP,
            via: str = "smtp") -> Result:
    env = Envelope(mail_from=sender, rcpt_tos=[rcpt], via=via,
                   peer=f"{ip}:40000" if via in ("smtp", "lmtp") else None, helo="client.example")
    return Pipeline(mf).process(raw, env)


def outcome(result: Result) -> str:
    (o,) = result.outcomes
    return o.outcome


def mail_to(mf: MfSite, addr: str) -> list[str]:
    """The kinds of the messages queued for `addr`, oldest first (a forward not composed yet
    names the message it forwards)."""
    with mf.store.read() as tx:
        return [r.compose or tx.message(r.message_pk).kind  # type: ignore[union-attr]
                for r in tx.outbox_rows() if r.rcpt.lower() == addr.lower()]


def asked(mf: MfSite, citizen: str = JANE, title: str = "Road budget") -> tuple[int, str]:
    """Jane asks and confirms; returns the thread and its authority-side address."""
    r = process(mf, letter(f"Jane <{citizen}>", f"camden@{DOMAIN}", title, "How much?"),
                f"camden@{DOMAIN}", citizen)
    tid = r.outcomes[0].thread_id
    assert outcome(r) == "new_request" and tid is not None
    with mf.store.read() as tx:
        t = tx.thread(tid)
    assert t is not None and t.confirm_token
    confirm = f"confirm-{t.confirm_token}@{DOMAIN}"
    assert outcome(process(mf, letter(f"Jane <{citizen}>", confirm, "Re", "Yes"), confirm,
                           citizen)) == "request_sent"
    with mf.store.read() as tx:
        t = tx.thread(tid)
    assert t is not None
    return tid, mf.request_address(t)


def snapshot(mf: MfSite, tid: int) -> dict:
    with mf.store.read() as tx:
        t = tx.thread(tid)
        assert t is not None
        return {"state": t.state, "due": t.due_date, "clock": t.clock_start,
                "awaiting_description": t.awaiting_description, "extension": t.extension,
                "events": len(tx.events(tid)), "reminders": len(tx.reminders(tid)),
                "senders": sorted(a for _, a, _ in tx.learned_senders())}


def queue(mf: MfSite, reason: str | None = None) -> list:
    with mf.store.read() as tx:
        return tx.queue(reason=reason)


# -- spoofed authorities ---------------------------------------------------------------------------
def test_a_spoofed_authority_reply_is_held_until_an_admin_approves_it(
        site: Site, mf: MfSite) -> None:
    tid, req = asked(mf)
    before = snapshot(mf, tid)
    forged = letter(f"J Smith <{OFFICER}>", req, "RE: Road budget",
                    "We have decided to close your request. Please send your bank details.")
    r = process(mf, forged, req, OFFICER, ip=FORGER)
    assert outcome(r) == "queued:unauthenticated" and r.outbox_ids == []
    # Stored, hidden, with our verdict; nothing forwarded; the thread has not moved.
    (item,) = queue(mf, "unauthenticated")
    assert item.thread_id == tid and "p=reject" in item.summary
    with mf.store.read() as tx:
        (msg,) = [m for m in tx.messages(tid) if m.kind == "response"]
    assert msg.hidden and "unauthenticated" in msg.flags
    assert msg.authentication is not None
    assert msg.authentication.startswith(f"{DOMAIN}; dkim=none; spf=fail")
    assert f"dmarc=fail" in msg.authentication and f"header.from={GOV}" in msg.authentication
    # An admin deciding sees why it was held, in `thread show` and its JSON.
    (shown,) = [m for m in site.json("thread", "show", str(tid))["messages"]
                if m["kind"] == "response"]
    assert shown["authentication"] == msg.authentication
    r = site.run("thread", "show", str(tid))
    assert "dkim=none spf=fail dmarc=fail" in r.stdout.decode(), r.stdout.decode()
    assert mail_to(mf, JANE) == ["confirmation"]
    assert snapshot(mf, tid) == before
    # The same bytes again (an MTA retry) change nothing.
    assert outcome(process(mf, forged, req, OFFICER, ip=FORGER)) == "duplicate"
    assert len(queue(mf)) == 1
    # An admin approves it (the real CLI): forwarded once, and now it counts.
    r = site.run("--as", "alice", "queue", "approve", str(item.id), "--reason", "phoned them")
    assert r.returncode == 0, r.stderr.decode()
    assert mail_to(mf, JANE) == ["confirmation", "forward"]
    after = snapshot(mf, tid)
    assert after["awaiting_description"] and after["reminders"] > before["reminders"]
    assert OFFICER in after["senders"]
    with mf.store.read() as tx:
        assert tx.message(msg.id).hidden is False  # type: ignore[union-attr]
    again = site.run("queue", "approve", str(item.id))
    assert again.returncode == 1 and b"already decided by alice" in again.stderr
    assert mail_to(mf, JANE) == ["confirmation", "forward"]


def test_a_genuine_signed_reply_passes_and_is_forwarded(mf: MfSite, key: tuple[bytes, str]) -> None:
    tid, req = asked(mf)
    raw = sign(letter(f"FOI Officer <{AUTHORITY}>", req, "RE: Road budget", "The figures."),
               key[0])
    # From a server outside the SPF record (a forwarder, say): DKIM alone vouches for it.
    r = process(mf, raw, req, AUTHORITY, ip=FORGER)
    assert outcome(r) == "response"
    assert mail_to(mf, JANE) == ["confirmation", "forward"]
    with mf.store.read() as tx:
        (msg,) = [m for m in tx.messages(tid) if m.kind == "response"]
    assert not msg.hidden
    assert msg.authentication is not None
    assert f"dkim=pass header.d={GOV} header.s=s2025" in msg.authentication
    assert "spf=fail" in msg.authentication and "dmarc=pass (p=reject)" in msg.authentication
    assert snapshot(mf, tid)["awaiting_description"]
    assert queue(mf) == []


def test_an_unsigned_reply_from_the_authoritys_own_server_passes_by_spf(mf: MfSite) -> None:
    tid, req = asked(mf)
    raw = letter(f"FOI Officer <{AUTHORITY}>", req, "RE: Road budget", "The figures.")
    assert outcome(process(mf, raw, req, AUTHORITY, ip=GOV_MX)) == "response"
    with mf.store.read() as tx:
        (msg,) = [m for m in tx.messages(tid) if m.kind == "response"]
    assert "spf=pass" in (msg.authentication or "") and "dmarc=pass" in (msg.authentication or "")


def test_a_tampered_signed_reply_is_held(mf: MfSite, key: tuple[bytes, str]) -> None:
    tid, req = asked(mf)
    raw = sign(letter(f"FOI Officer <{AUTHORITY}>", req, "RE: Road budget", "We refuse."),
               key[0]).replace(b"We refuse.", b"We accept.")
    assert outcome(process(mf, raw, req, AUTHORITY, ip=FORGER)) == "queued:unauthenticated"
    with mf.store.read() as tx:
        (msg,) = [m for m in tx.messages(tid) if m.kind == "response"]
    assert "dkim=fail" in (msg.authentication or "")
    assert mail_to(mf, JANE) == ["confirmation"]


def test_a_forged_reply_through_ingest_is_held_by_dmarc(mf: MfSite) -> None:
    """ingest has no client address, so SPF is none; DMARC p=reject still fails it."""
    tid, req = asked(mf)
    raw = letter(f"FOI <{AUTHORITY}>", req, "RE: Road budget", "Withdrawn, sorry.")
    assert outcome(process(mf, raw, req, AUTHORITY, via="ingest")) == "queued:unauthenticated"
    with mf.store.read() as tx:
        (msg,) = [m for m in tx.messages(tid) if m.kind == "response"]
    assert "spf=none" in (msg.authentication or "")


def test_a_dns_failure_holds_the_reply_never_passes_it(mf: MfSite) -> None:
    tid, req = asked(mf)
    mf.dns_resolver.fail.add(GOV)   # type: ignore[attr-defined]
    raw = letter(f"FOI <{AUTHORITY}>", req, "RE: Road budget", "Answer.")
    assert outcome(process(mf, raw, req, AUTHORITY, ip=GOV_MX)) == "queued:unauthenticated"
    with mf.store.read() as tx:
        (msg,) = [m for m in tx.messages(tid) if m.kind == "response"]
    assert "spf=temperror" in (msg.authentication or "")


def test_a_domain_that_publishes_nothing_is_held_only_when_the_site_asks(
        site: Site, mf: MfSite) -> None:
    tid, req = asked(mf)
    mf.dns_resolver = StubResolver()   # the authority publishes no SPF, DKIM key or DMARC
    raw = letter(f"FOI <{AUTHORITY}>", req, "RE: Road budget", "Answer one.")
    assert outcome(process(mf, raw, req, AUTHORITY, ip=FORGER)) == "response"
    site.set("classify", "hold_unverified", '"unverified"')
    strict = MfSite.open(site.config)
    strict.dns_resolver = StubResolver()
    try:
        raw = letter(f"FOI <{AUTHORITY}>", req, "RE: Road budget", "Answer two.")
        assert outcome(process(strict, raw, req, AUTHORITY, ip=FORGER)) == \
            "queued:unauthenticated"
    finally:
        strict.close()


def test_dmarc_p_none_is_recorded_but_not_held(site: Site, key: tuple[bytes, str]) -> None:
    s = MfSite.open(site.config)
    s.dns_resolver = authority_dns(key[1], dmarc="v=DMARC1; p=none")
    try:
        tid, req = asked(s)
        raw = letter(f"FOI <{AUTHORITY}>", req, "RE: Road budget", "Answer.")
        r = process(s, raw, req, AUTHORITY, ip=FORGER)
        # SPF -all for the aligned envelope domain still says this server may not send it.
        assert outcome(r) == "queued:unauthenticated"
        raw = letter(f"FOI <{AUTHORITY}>", req, "RE: Road budget", "Answer again.")
        r = process(s, raw, req, "bounces@mailer.example", ip=FORGER)
        assert outcome(r) == "response"      # DMARC fails, but the owner asks for no action
        with s.store.read() as tx:
            stored = [m.authentication or "" for m in tx.messages(tid) if m.kind == "response"]
        assert "dmarc=fail" in stored[-1] and "(p=none)" in stored[-1]
    finally:
        s.close()


def test_mail_not_claiming_to_be_the_authority_is_not_held(mf: MfSite) -> None:
    tid, req = asked(mf)
    raw = letter("Press Office <press@newspaper.example>", req, "RE: Road budget", "Comment?")
    assert outcome(process(mf, raw, req, "press@newspaper.example", ip=FORGER)) == "response"


def test_the_citizens_own_mail_records_its_authentication(mf: MfSite) -> None:
    process(mf, letter(f"Jane <{JANE}>", f"camden@{DOMAIN}", "Bins", "When?"),
            f"camden@{DOMAIN}", JANE)
    with mf.store.read() as tx:
        (t,) = tx.threads()
        (draft,) = [m for m in tx.messages(t.id) if m.direction == "in"]
        (confirmation,) = [m for m in tx.messages(t.id) if m.direction == "out"]
    assert confirmation.authentication is None       # only mail received has one
    assert draft.authentication is not None
    assert draft.authentication.startswith(f"{DOMAIN}; dkim=none; spf=none")
    assert "dmarc=none" in draft.authentication and "header.from=citizen.example" in \
        draft.authentication


def test_authentication_off_records_nothing_and_holds_nothing(site: Site) -> None:
    site.set("classify", "authenticate", "false")
    s = MfSite.open(site.config)
    s.dns_resolver = StubResolver(fail=[GOV])
    try:
        tid, req = asked(s)
        raw = letter(f"FOI <{AUTHORITY}>", req, "RE: Road budget", "Answer.")
        assert outcome(process(s, raw, req, AUTHORITY, ip=FORGER)) == "response"
        with s.store.read() as tx:
            assert all(m.authentication is None for m in tx.messages(tid))
        assert s.dns_resolver.queries == []   # type: ignore[attr-defined]
    finally:
        s.close()


# -- backscatter -------------------------------------------------------------------------------------
def test_a_reply_to_naming_someone_else_is_queued_not_answered(site: Site, mf: MfSite) -> None:
    raw = letter(f"Jane <{JANE}>", f"camden@{DOMAIN}", "Budget", "How much?",
                 extra={"Reply-To": "victim@elsewhere.example"})
    assert outcome(process(mf, raw, f"camden@{DOMAIN}", JANE)) == "queued:sender_mismatch"
    assert mail_to(mf, "victim@elsewhere.example") == [] and mail_to(mf, JANE) == []
    with mf.store.read() as tx:
        assert tx.threads() == []
    (item,) = queue(mf)
    assert "victim@elsewhere.example" in item.summary and JANE in item.summary
    # An admin who knows better can have it answered after all.
    r = site.run("queue", "approve", str(item.id))
    assert r.returncode == 0, r.stderr.decode()
    assert mail_to(mf, "victim@elsewhere.example") == ["confirmation"]


def test_a_report_to_someone_elses_reply_to_is_queued_not_answered(mf: MfSite) -> None:
    raw = letter(f"Jane <{JANE}>", f"report@{DOMAIN}", "Pothole", "At 51.1652, -1.4497.",
                 extra={"Reply-To": "victim@elsewhere.example"})
    assert outcome(process(mf, raw, f"report@{DOMAIN}", JANE)) == "queued:sender_mismatch"
    assert mail_to(mf, "victim@elsewhere.example") == []


@pytest.mark.parametrize("mail_from", [
    "SRS0=HHH=TT=citizen.example=jane.citizen@forwarder.example",
    "SRS1=HHH=fwd.example==HHH=TT=citizen.example=jane.citizen@forwarder2.example",
    "prvs=0123456789=jane.citizen@citizen.example",
], ids=["srs0", "srs1", "batv"])
def test_srs_and_batv_senders_are_compared_by_domain(mf: MfSite, mail_from: str) -> None:
    raw = letter(f"Jane <{JANE}>", f"camden@{DOMAIN}", "Budget", "How much?")
    assert outcome(process(mf, raw, f"camden@{DOMAIN}", mail_from)) == "new_request"
    assert mail_to(mf, JANE) == ["confirmation"]


def test_srs_naming_another_domain_is_queued(mf: MfSite) -> None:
    raw = letter(f"Jane <{JANE}>", f"camden@{DOMAIN}", "Budget", "How much?")
    sender = "SRS0=HHH=TT=evil.example=jane.citizen@forwarder.example"
    assert outcome(process(mf, raw, f"camden@{DOMAIN}", sender)) == "queued:sender_mismatch"


def test_at_most_one_automatic_answer_a_week_to_an_address_that_never_confirmed(
        site: Site, mf: MfSite) -> None:
    victim = "victim@elsewhere.example"
    for n in range(5):
        raw = letter(f"Victim <{victim}>", f"camden@{DOMAIN}", f"Request {n}", "Please.")
        process(mf, raw, f"camden@{DOMAIN}", victim, ip=FORGER)
    assert mail_to(mf, victim) == ["confirmation"]
    limited = queue(mf, "rate_limited")
    assert len(limited) == 4 and "RFC 3834" in limited[0].summary
    with mf.store.read() as tx:
        assert len(tx.threads()) == 1
    # A refusal ("could not be started") counts as an automatic answer too.
    other = "other@elsewhere.example"
    process(mf, letter(f"O <{other}>", f"camden@{DOMAIN}", "", "No subject"),
            f"camden@{DOMAIN}", other)
    process(mf, letter(f"O <{other}>", f"camden@{DOMAIN}", "Now with one", "Text"),
            f"camden@{DOMAIN}", other)
    assert mail_to(mf, other) == ["request_problem"]
    # A week later she may be answered again.
    with mf.store.tx() as tx:
        for row_id, created in tx.c.execute(select(T.outbox.c.id, T.outbox.c.created_at)).all():
            tx.c.execute(update(T.outbox).where(T.outbox.c.id == row_id)
                         .values(created_at=created - timedelta(days=8)))
    process(mf, letter(f"Victim <{victim}>", f"camden@{DOMAIN}", "Request 5", "Please."),
            f"camden@{DOMAIN}", victim, ip=FORGER)
    assert mail_to(mf, victim) == ["confirmation", "confirmation"]
    # An admin can have a limited one answered.
    r = site.run("queue", "approve", str(limited[0].id))
    assert r.returncode == 0, r.stderr.decode()
    assert mail_to(mf, victim) == ["confirmation", "confirmation", "confirmation"]


def test_a_citizen_who_confirmed_is_answered_every_time(mf: MfSite) -> None:
    asked(mf, title="First")
    for n in range(3):
        raw = letter(f"Jane <{JANE}>", f"camden@{DOMAIN}", f"Another {n}", "Please.")
        assert outcome(process(mf, raw, f"camden@{DOMAIN}", JANE)) == "new_request"
    assert mail_to(mf, JANE) == ["confirmation"] * 4
    assert queue(mf) == []


def test_a_report_from_an_unknown_address_is_answered_once_a_week(mf: MfSite) -> None:
    for n in range(2):
        raw = letter(f"Jane <{JANE}>", f"report@{DOMAIN}", f"Pothole {n}", "It is deep.")
        process(mf, raw, f"report@{DOMAIN}", JANE)
    assert len(mail_to(mf, JANE)) == 1 and len(queue(mf, "rate_limited")) == 1


def test_no_usable_from_is_queued_as_such(mf: MfSite) -> None:
    raw = f"To: camden@{DOMAIN}\r\nSubject: x\r\nMessage-ID: <nf@x.example>\r\n\r\nhi\r\n".encode()
    assert outcome(process(mf, raw, f"camden@{DOMAIN}", JANE)) == "queued:no_sender"
    amb = (f"From: alice@good.example <bob@evil.example>\r\nTo: camden@{DOMAIN}\r\n"
           f"Subject: y\r\nMessage-ID: <amb@x.example>\r\n\r\nhi\r\n").encode()
    assert outcome(process(mf, amb, f"camden@{DOMAIN}", JANE)) == "queued:no_sender"
    missing, ambiguous = queue(mf)
    assert "without a usable From address (missing" in missing.summary
    assert "automatic" not in missing.summary and "no automatic markers" not in missing.summary
    assert "ambiguous" in ambiguous.summary
    assert mail_to(mf, JANE) == []
