"""mailflow.core.classify: one test per rule, the traps, and accuracy over the corpus."""
from __future__ import annotations

import pytest

from corpus_report import EXPECTED, evaluate
from mailflow.core.classify import classify
from mailflow.core.message import Attachment, Classification, Kind, ParsedMessage

DOMAIN = "mailflow.invalid"


def make(headers: list[tuple[str, str]] | None = None, *, subject: str = "Re: FOI request",
         text: str = "Please find our answer below.", from_addr: str = "foi@council.example",
         message_id: str | None = "<1@council.example>", in_reply_to: tuple[str, ...] = (),
         attachments: tuple[Attachment, ...] = ()) -> ParsedMessage:
    hdrs = [("From", f"FOI Team <{from_addr}>"), ("Subject", subject), *(headers or [])]
    return ParsedMessage(
        message_id=message_id, in_reply_to=in_reply_to, references=in_reply_to, subject=subject,
        from_name="FOI Team", from_addr=from_addr, reply_to=(), to=(f"request-1-abc@{DOMAIN}",),
        cc=(), date=None, headers=tuple(hdrs), text=text, html=None, attachments=attachments,
        defects=())


def run(msg: ParsedMessage, envelope_sender: str | None = "foi@council.example") -> Classification:
    c = classify(msg, envelope_sender, our_domain=DOMAIN)
    assert c.reason  # every decision says why
    return c


def dsn(status: str, action: str = "failed", diag: str = "", rcpt: str = "gone@council.example"
        ) -> ParsedMessage:
    report = (f"Reporting-MTA: dns; mx.council.example\n\nFinal-Recipient: rfc822; {rcpt}\n"
              f"Action: {action}\nStatus: {status}\n"
              + (f"Diagnostic-Code: smtp; {diag}\n" if diag else ""))
    return make([("Content-Type", 'multipart/report; report-type="delivery-status"; boundary=x')],
                subject="Delivery Status Notification", from_addr="mailer-daemon@mx.example",
                text="Delivery report.",
                attachments=(Attachment("attachment-1.txt", "message/delivery-status",
                                        report.encode()),))


# ------------------------------------------------------------------------------- reply

def test_plain_reply() -> None:
    c = run(make())
    assert c.kind is Kind.REPLY and not c.automatic


# -------------------------------------------------------------------------------- loop

def test_loop_header_with_our_domain() -> None:
    c = run(make([("X-Mailflow-Loop", DOMAIN)]))
    assert c.kind is Kind.LOOP and "X-Mailflow-Loop" in c.reason


def test_loop_header_naming_someone_else_is_not_a_loop() -> None:
    assert run(make([("X-Mailflow-Loop", "other.example")])).kind is Kind.REPLY


def test_custom_loop_header_name() -> None:
    c = classify(make([("X-Foi-Loop", DOMAIN)]), "a@b.example", our_domain=DOMAIN,
                 loop_header="X-Foi-Loop")
    assert c.kind is Kind.LOOP


def test_message_id_we_made_is_a_loop() -> None:
    c = run(make(message_id=f"<abc.123@{DOMAIN.upper()}>"))
    assert c.kind is Kind.LOOP and "Message-ID" in c.reason


def test_in_reply_to_naming_us_is_a_reply_not_a_loop() -> None:
    c = run(make(in_reply_to=(f"<abc.123@{DOMAIN}>",)))
    assert c.kind is Kind.REPLY


# ------------------------------------------------------------------------------ bounces

def test_dsn_permanent() -> None:
    c = run(dsn("5.1.1"), envelope_sender="")
    assert c.kind is Kind.BOUNCE and c.permanent is True
    assert c.failed_recipients == ("gone@council.example",)
    assert "delivery-status" in c.reason


def test_dsn_temporary_4xx() -> None:
    c = run(dsn("4.4.7"))
    assert c.kind is Kind.BOUNCE and c.permanent is False


def test_dsn_delayed_action() -> None:
    c = run(dsn("4.0.0", action="delayed"))
    assert c.kind is Kind.BOUNCE and c.permanent is False


@pytest.mark.parametrize("status, diag", [("5.2.2", ""), ("5.0.0", "552 mailbox full"),
                                          ("5.7.0", "maildir over quota")])
def test_dsn_mailbox_full_is_temporary(status: str, diag: str) -> None:
    c = run(dsn(status, diag=diag))
    assert c.kind is Kind.BOUNCE and c.permanent is False


def test_dsn_reporting_only_success_is_not_a_bounce() -> None:
    c = run(dsn("2.0.0", action="delivered"))
    assert c.kind is Kind.AUTO_REPLY and "delivered" in c.reason


def test_dsn_source_routed_recipient() -> None:
    c = run(dsn("5.1.1", rcpt="@relay.example:Someone@Council.example"))
    assert c.failed_recipients == ("someone@council.example",)


def test_x_failed_recipients() -> None:
    c = run(make([("X-Failed-Recipients", "a@council.example, b@council.example")],
                 subject="Something", text="This is a permanent error."))
    assert c.kind is Kind.BOUNCE and c.permanent is True
    assert c.failed_recipients == ("a@council.example", "b@council.example")


def test_exim_bounce_with_auto_submitted_auto_replied_is_a_bounce() -> None:
    # The trap: Exim marks its bounces "Auto-Submitted: auto-replied".
    msg = make([("Auto-Submitted", "auto-replied"), ("X-Failed-Recipients", "x@council.example")],
               subject="Mail delivery failed: returning message to sender",
               from_addr="Mailer-Daemon@mx.example",
               text="A message that you sent could not be delivered to one or more of its "
                    "recipients. This is a permanent error. The following address(es) failed:\n\n"
                    "  x@council.example\n    Unrouteable address\n")
    c = run(msg, envelope_sender="")
    assert c.kind is Kind.BOUNCE and c.permanent is True
    assert c.failed_recipients == ("x@council.example",)


def test_exchange_ndr_header() -> None:
    c = run(make([("X-MS-Exchange-Message-Is-Ndr", "")], subject="Something"))
    assert c.kind is Kind.BOUNCE and "Is-Ndr" in c.reason


@pytest.mark.parametrize("subject", [
    "Undeliverable: Re: FOI request", "Mail delivery failed: returning message to sender",
    "Delivery Status Notification (Failure)", "Returned mail: see transcript for details",
    "failure notice", "Undelivered Mail Returned to Sender", "Unzustellbar: FOI",
    "Non remis : demande", "Kézbesíthetetlen: kérelem", "Недоставленное сообщение",
])
def test_bounce_subjects(subject: str) -> None:
    c = run(make(subject=subject, from_addr="someone@mx.example", text="x"))
    assert c.kind is Kind.BOUNCE and "subject" in c.reason


def test_reply_about_an_undeliverable_message_is_not_a_bounce() -> None:
    c = run(make(subject="Re: Undeliverable: FOI request", text="We got a bounce, resending."))
    assert c.kind is Kind.REPLY


def test_mailer_daemon_sender() -> None:
    c = run(make(subject="Warning", from_addr="MAILER-DAEMON@mx.example", text="450 try later"))
    assert c.kind is Kind.BOUNCE and c.permanent is False


def test_delay_warning_is_temporary() -> None:
    c = run(make(subject="Warning: message 1GdV3O-0002RD-H2 delayed 72 hours",
                 from_addr="Mailer-Daemon@mx.example",
                 text="This message was created automatically by mail delivery software.\n"
                      "A message that you sent has not yet been delivered. No action is required"))
    assert c.kind is Kind.BOUNCE and c.permanent is False


def test_postmaster_needs_more_evidence() -> None:
    alone = make(subject="Your question", from_addr="postmaster@council.example",
                 text="Thanks, the FOI team will answer.")
    assert run(alone).kind is Kind.REPLY
    bounce = make(subject="Note", from_addr="postmaster@council.example",
                  text="Your message could not be delivered: user unknown")
    c = run(bounce)
    assert c.kind is Kind.BOUNCE and c.permanent is True


def test_null_sender_alone_is_bounce_ish() -> None:
    c = run(make(), envelope_sender="")
    assert c.kind is Kind.BOUNCE and c.reason == "null envelope sender" and c.permanent is None


def test_null_return_path_stands_in_only_when_envelope_unknown() -> None:
    msg = make([("Return-Path", "<>")])
    assert run(msg, envelope_sender=None).kind is Kind.BOUNCE
    assert run(msg, envelope_sender="foi@council.example").kind is Kind.REPLY


def test_null_sender_with_bounce_body() -> None:
    c = run(make(subject="Notification", text="Delivery to the following recipient failed "
                                              "permanently: 550 5.1.1 no such user"),
            envelope_sender="")
    assert c.kind is Kind.BOUNCE and c.permanent is True and "null envelope sender" in c.reason


def test_bounce_wording_is_found_in_any_case_and_quoted_as_written() -> None:
    """The body's wording and a bounce's permanence are searched in lower-cased text (with
    patterns free of re.I, for speed): capitals still count, and the reason quotes the body
    as it was written."""
    c = run(make(subject="Note", from_addr="postmaster@council.example",
                 text="Your message COULD NOT BE DELIVERED: User Unknown"))
    assert c.kind is Kind.BOUNCE and c.permanent is True
    assert "'COULD NOT BE DELIVERED'" in c.reason
    c = run(make(subject="Undelivered Mail Returned to Sender", from_addr="MAILER-DAEMON@mx.example",
                 text="Delivery Is Delayed. We Will Continue To Retry."))
    assert c.kind is Kind.BOUNCE and c.permanent is False
    # a letter lower() lengthens ("İ" becomes two): the lowered words are quoted instead
    c = run(make(subject="Note", from_addr="postmaster@council.example",
                 text="İİ Your message could not be delivered"))
    assert "'could not be delivered'" in c.reason


def test_lowered_patterns_have_no_capital_letters() -> None:
    """A capital in a pattern searched in lower-cased text could never match."""
    import re

    from mailflow.core.classify import _LOWERED
    for pattern in _LOWERED:
        assert not pattern.flags & re.I
        letters = re.sub(r"\\[A-Za-z]", "", pattern.pattern)   # \s, \b, \d are not letters
        assert letters == letters.lower(), pattern.pattern[:60]


# --------------------------------------------------------------------------- auto-reply

@pytest.mark.parametrize("value", ["auto-replied", "auto-generated", "auto-notified"])
def test_auto_submitted(value: str) -> None:
    c = run(make([("Auto-Submitted", value)]))
    assert c.kind is Kind.AUTO_REPLY and "Auto-Submitted" in c.reason


def test_auto_submitted_no_is_a_reply() -> None:
    assert run(make([("Auto-Submitted", "no")])).kind is Kind.REPLY


@pytest.mark.parametrize("name, value", [("X-Autoreply", "yes"), ("X-Autorespond", "Out"),
                                         ("X-Autogenerated", "Reply"),
                                         ("X-POST-MessageClass", "9; Autoresponder")])
def test_vendor_auto_headers(name: str, value: str) -> None:
    c = run(make([(name, value)]))
    assert c.kind is Kind.AUTO_REPLY and name in c.reason


@pytest.mark.parametrize("value", ["bulk", "junk", "list", "auto_reply", " Bulk "])
def test_precedence(value: str) -> None:
    c = run(make([("Precedence", value)]))
    assert c.kind is Kind.AUTO_REPLY and "Precedence" in c.reason


def test_precedence_first_class_is_a_reply() -> None:
    assert run(make([("Precedence", "first-class")])).kind is Kind.REPLY


@pytest.mark.parametrize("subject", [
    "Out of Office: Re: FOI request", "Automatic reply: Re: FOI request", "Auto-reply: hello",
    "Autoreply: hello", "AutoReply", "Out of Office AutoReply: Was the response any good?",
    "Absence du bureau", "Réponse automatique : demande", "Abwesenheitsnotiz: Anfrage",
    "Automatische Antwort: Anfrage", "Respuesta automática: solicitud", "Fuera de la oficina",
    "Automatikus válasz: kérelem", "Házon kívül: kérelem", "Resposta automática: pedido",
    "Ausente do escritório", "Automatyczna odpowiedź: test", "[Automatyczna odpowiedź] test",
    "AUTO: Jane Roe is out of the office (returning 03/01/2012)",
    "Emma McKinney/MAIL/BIR is out of the office", "Re:   blah blah (Automatic Response)",
])
def test_out_of_office_subjects(subject: str) -> None:
    c = run(make(subject=subject))
    assert c.kind is Kind.AUTO_REPLY and "subject" in c.reason


@pytest.mark.parametrize("subject", [
    "Re: FOI request - automatic replies sent by the council",
    "RE: Freedom of Information request - out of office hours call-outs",
    "Re: Your request about the autoreply policy",
])
def test_request_titles_mentioning_automatic_replies_stay_replies(subject: str) -> None:
    assert run(make(subject=subject)).kind is Kind.REPLY


def test_x_auto_response_suppress_alone_is_not_enough() -> None:
    # Outlook and Exchange set it on ordinary mail too.
    assert run(make([("X-Auto-Response-Suppress", "All")])).kind is Kind.REPLY


def test_x_auto_response_suppress_with_null_sender() -> None:
    c = run(make([("X-Auto-Response-Suppress", "All")], subject="Hello"), envelope_sender="")
    assert c.kind is Kind.AUTO_REPLY and "X-Auto-Response-Suppress" in c.reason


def test_challenge_response_dressed_as_dsn() -> None:
    msg = dsn("4.7.0", diag="X-Boxbe-Notice; Sender not pre-approved")
    assert run(msg).kind is Kind.AUTO_REPLY
    assert run(make([("X-Bluebottle-Request", "<1234>")])).kind is Kind.AUTO_REPLY


def test_feedback_report_is_automatic_not_a_bounce() -> None:
    c = run(make([("Content-Type", 'multipart/report; report-type=feedback-report; boundary=b')]))
    assert c.kind is Kind.AUTO_REPLY and "feedback-report" in c.reason


# ------------------------------------------------------------------------------- corpus

@pytest.fixture(scope="module")
def corpus_stats():  # type: ignore[no-untyped-def]
    return evaluate()


@pytest.mark.parametrize("category", ["authority-reply", "plain", "forwarded", "attachment",
                                      "encoding", "html-only"])
def test_corpus_human_mail_is_never_automatic(corpus_stats, category: str) -> None:  # type: ignore[no-untyped-def]
    st = corpus_stats[category]
    assert st.total > 0
    wrong = [(r.path, r.result.kind.value, r.result.reason) for r in st.rows
             if r.result is None or r.result.automatic]
    assert wrong == []


def test_corpus_bounces_at_least_98_percent(corpus_stats) -> None:  # type: ignore[no-untyped-def]
    rows = corpus_stats["bounce-dsn"].rows + corpus_stats["bounce-nondsn"].rows
    hits = sum(1 for r in rows if r.result and r.result.kind is Kind.BOUNCE)
    assert len(rows) >= 180
    assert hits / len(rows) >= 0.98, [r.path for r in rows if not r.result
                                      or r.result.kind is not Kind.BOUNCE]
    assert corpus_stats["bounce-dsn"].correct == corpus_stats["bounce-dsn"].total


def test_corpus_auto_replies(corpus_stats) -> None:  # type: ignore[no-untyped-def]
    st = corpus_stats["auto-reply"]
    assert st.correct / st.total >= 0.95, [r.path for r in st.misses]


def test_corpus_exim_auto_replied_bounces_are_bounces(corpus_stats) -> None:  # type: ignore[no-untyped-def]
    traps = [r for cat in ("bounce-dsn", "bounce-nondsn") for r in corpus_stats[cat].rows
             if "Auto-Submitted: auto-replied" in r.note]
    assert len(traps) >= 5
    assert all(r.result and r.result.kind is Kind.BOUNCE for r in traps)


def test_corpus_categories_are_all_known(corpus_stats) -> None:  # type: ignore[no-untyped-def]
    assert set(corpus_stats) <= set(EXPECTED)
