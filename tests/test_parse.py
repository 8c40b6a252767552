"""mailflow.mail.parse: the corpus, known fixtures, hostile input, and fuzzing."""
from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailflow.core.message import ParsedMessage
from mailflow.mail.parse import Limits, ParseError, html_to_text, parse

CORPUS = Path(__file__).resolve().parent / "corpus"
CORPUS_FILES = sorted(p for p in CORPUS.rglob("*") if p.is_file() and p.suffix != ".md")
_SURROGATE = re.compile("[\ud800-\udfff]")


def load(rel: str) -> ParsedMessage:
    return parse((CORPUS / rel).read_bytes())


def check_invariants(m: ParsedMessage) -> None:
    """What every consumer of ParsedMessage relies on, whatever the input was."""
    strings = [m.subject, m.from_name, m.from_addr, m.text, m.html or "", m.raw_address_text,
               *m.to, *m.cc, *m.reply_to, *m.in_reply_to, *m.references, *m.defects,
               *m.delivered_to, *m.received_for, *(a.filename for a in m.attachments)]
    strings += [s for pair in m.headers for s in pair]
    for s in strings:
        assert isinstance(s, str)
        assert not _SURROGATE.search(s), s[:80]
    for addr in (*m.to, *m.cc, *m.reply_to, m.from_addr, *m.delivered_to, *m.received_for):
        assert addr == addr.lower()
    if m.message_id is not None:
        assert m.message_id.startswith("<") and m.message_id.endswith(">")
        assert not re.search(r"\s", m.message_id)
    for mid in (*m.in_reply_to, *m.references):
        assert mid.startswith("<") and mid.endswith(">")
    assert m.date is None or (isinstance(m.date, datetime) and m.date.tzinfo is not None)
    assert len(set(m.defects)) == len(m.defects)
    for a in m.attachments:
        assert isinstance(a.data, bytes)
        assert a.filename and "/" not in a.filename and "\\" not in a.filename
        assert "/" in a.content_type


# ----------------------------------------------------------------------------- corpus

def test_corpus_is_present() -> None:
    assert len(CORPUS_FILES) >= 370


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: str(p.relative_to(CORPUS)))
def test_every_corpus_message_parses(path: Path) -> None:
    m = parse(path.read_bytes())
    check_invariants(m)
    assert m.headers


def test_malformed_to_and_cc_fill_raw_address_text() -> None:
    m = load("alaveteli/malformed-to-and-cc.eml")
    assert "To: <bar@example.org" in m.raw_address_text
    assert "Cc: baz@example.org>" in m.raw_address_text
    assert m.to == ("bar@example.org",)
    assert m.cc == ("baz@example.org",)


def test_bcc_contact_reply_keeps_bcc_text_and_received_for() -> None:
    # The fixture reached Alaveteli by Bcc only; its To/Bcc are test placeholders and it has no
    # Received header. What the MTA adds on delivery is the Received "for <...>" clause, which
    # is how such a reply can still be matched.
    raw = (CORPUS / "alaveteli/bcc-contact-reply.eml").read_bytes()
    m = parse(raw)
    assert "Bcc: EMAIL_BCC" in m.raw_address_text
    assert m.to == ()
    delivered = (b"Received: from mx.authority.example (mx.authority.example [192.0.2.1])\n"
                 b"\tby mail.mailflow.invalid (Postfix) with ESMTPS id 4XyZ\n"
                 b"\tfor <Request-42-abc123@mailflow.invalid>; Wed, 24 Oct 2007 12:00:00 +0100\n"
                 b"Delivered-To: request-42-abc123@mailflow.invalid\n")
    m = parse(delivered + raw.replace(b"EMAIL_BCC", b"request-42-abc123@mailflow.invalid"))
    assert m.received_for == ("request-42-abc123@mailflow.invalid",)
    assert m.delivered_to == ("request-42-abc123@mailflow.invalid",)
    assert m.to == ()                       # "FOI Officer <EMAIL_TO>" has no address
    assert m.text.startswith("No way!")


def test_received_for_and_delivered_to_from_real_headers() -> None:
    m = load("php-mime-mail-parser/m0022")
    assert m.received_for == ("asdasd@gmail.com",)
    assert m.delivered_to == ("asdasd@gmail.com",)


def test_iso_8859_1_subject_and_name_decode() -> None:
    m = load("alaveteli/quoted-subject-iso8859-1.eml")
    assert m.subject == "Câmara Responde:  Banco de ideias"
    assert m.from_name.startswith("Coordenação de Relacionamento")
    m = load("fixmystreet/zurich_attachments.txt")
    assert m.subject.startswith("Züri wie neu")


def test_unknown_charset_labels_in_encoded_words() -> None:
    assert "Invoice 02722027" in load("php-mime-mail-parser/issue149").subject
    assert "\ufffd" not in load("php-mime-mail-parser/issue149").subject
    assert load("php-mime-mail-parser/m0022").subject == "[PRJ-OTH] asdf  árvíztűrő tükörfúrógép"


def test_rfc6532_raw_utf8_headers() -> None:
    m = load("mikel-mail/rfc6532/utf8_headers.eml")
    assert m.subject == "Säying Hello"
    assert m.from_name == "Jöhn Doe"


def test_core_fields_of_a_reply() -> None:
    m = load("mikel-mail/attachment_emails/attachment_with_encoded_name.eml")
    assert m.message_id == "<e85734b90505081209eaaa17b@mail.gmail.com>"
    assert m.in_reply_to == ("<F6E2D0B4-CC35-4A91-BA4C-C7C712B10C13@mac.com>",)
    assert m.references == m.in_reply_to
    assert (m.from_name, m.from_addr) == ("xxxxxxxxx xxxxxxx", "xxxxxxxxx.xxxxxxx@gmail.com")
    assert m.date is not None and m.date.utcoffset() is not None
    assert m.header("subject") == m.subject


@pytest.mark.parametrize("rel, names", [
    ("alaveteli/incoming-request-two-same-name.eml", ["hello-world.txt", "hello-world.txt"]),
    ("mikel-mail/attachment_emails/attachment_nonascii_filename.eml", ["ciële.txt"]),
    ("mikel-mail/attachment_emails/attachment_with_base64_encoded_name.eml", ["This is a test.pdf"]),
    ("mikel-mail/attachment_emails/attachment_with_unquoted_name.eml", ["This is a test.txt"]),
    ("mikel-mail/multi_charset/japanese_attachment_long_name.eml",
     ["かきくけこかきくけこかきくけこかきくけこかきくけこ.txt"]),
    ("php-mime-mail-parser/m0013", ["50032266 CAR 11_MNPA00A01_9PTX_H00 ATT N° 1467829.pdf"]),
    ("php-mime-mail-parser/m0027", ["1234.txt"]),          # "1234/../../1234.txt" in the mail
    ("alaveteli/incoming-request-tnef-only.eml", ["winmail.dat"]),
    ("alaveteli/rfc822-attachment.eml", ["attachment-1.eml"]),
])
def test_attachment_filenames(rel: str, names: list[str]) -> None:
    assert [a.filename for a in load(rel).attachments] == names


def test_attachment_bytes_are_decoded() -> None:
    (pdf,) = load("alaveteli/incoming-request-pdf-attachment.eml").attachments
    assert pdf.content_type == "application/pdf"
    assert pdf.data.startswith(b"%PDF")


def test_delivery_status_part_is_kept_for_the_classifier() -> None:
    m = load("sisimai-set-of-emails/lhost-postfix-01.eml")
    ds = [a for a in m.attachments if a.content_type == "message/delivery-status"]
    assert ds and b"Final-Recipient:" in ds[0].data and b"Status: 5.1.1" in ds[0].data


def test_html_only_message_gets_readable_text() -> None:
    m = load("spamscope-mail-parser/mail_test_13")
    assert m.html is not None and "<html" in m.html.lower()
    assert "New Webinar" in m.text or "Webinar" in m.text
    assert "<" not in m.text[:200] and "{" not in m.text[:200]


def test_html_to_text_drops_script_and_style_and_keeps_paragraphs() -> None:
    text = html_to_text("<html><head><style>p{color:red}</style><title>T</title></head><body>"
                        "<script>alert(1)</script><p>First &amp; one</p><p>Second<br>line</p>"
                        "</body></html>")
    assert text == "First & one\n\nSecond\nline"
    assert html_to_text("<![foo[ broken") is not None


def test_ambiguous_from_is_not_trusted() -> None:
    m = load("spamscope-mail-parser/mail_test_19")        # From: alice@example.com <bob@...>
    assert m.from_addr == ""
    assert any(d.startswith("ambiguous From") for d in m.defects)
    m = load("mikel-mail/plain_emails/raw_email_with_at_display_name.eml")
    assert m.from_addr == ""


def test_duplicate_identical_from_headers_are_accepted() -> None:
    m = load("php-mime-mail-parser/m0016")
    assert m.from_addr == "dwsauder@example.com"
    assert any(d.startswith("duplicate From") for d in m.defects)


@pytest.mark.parametrize("value", [
    b"alice@example.org)<bob@example.org>",
    b"alice@example.org<bob@example.org>",
    b"a <b@example.org> <e@example.com>",
    b"alice@example.org, bob@example.org",
])
def test_cve_2023_27043_style_from(value: bytes) -> None:
    m = parse(b"From: " + value + b"\nSubject: x\n\nbody\n")
    assert m.from_addr == ""
    assert any(d.startswith("ambiguous From") for d in m.defects)


def test_leading_blank_lines_do_not_hide_headers() -> None:
    m = load("php-bounce-handler/exchange1.eml")
    assert m.subject == "Delivery Status Notification (Failure)"
    assert "leading blank lines" in m.defects


def test_message_id_normalised() -> None:
    m = parse(b"From: a@b.example\nMessage-ID:  < abc@host.example >\n"
              b"In-Reply-To: <one@x> junk <two@y>\nReferences: <r1@x>\n <r2@y>\n\nhi\n")
    assert m.message_id == "<abc@host.example>"
    assert m.in_reply_to == ("<one@x>", "<two@y>")
    assert m.references == ("<r1@x>", "<r2@y>")


def test_date_without_zone_is_utc() -> None:
    m = parse(b"From: a@b.example\nDate: Tue, 1 Jan 2019 10:00:00 -0000\n\nhi\n")
    assert m.date is not None and m.date.utcoffset().total_seconds() == 0


def test_text_falls_back_through_charsets() -> None:
    body = "Grüße – “quoted”".encode("cp1252")
    m = parse(b"From: a@b.example\nContent-Type: text/plain; charset=us-ascii\n\n" + body)
    assert m.text == "Grüße – “quoted”"
    m = parse(b"From: a@b.example\nContent-Type: text/plain; charset=x-no-such\n\n"
              + "Grüße".encode())
    assert m.text == "Grüße"


def test_parse_error_when_there_are_no_headers() -> None:
    with pytest.raises(ParseError, match="no header"):
        parse(b"")
    with pytest.raises(ParseError):
        parse(b"\x00\x01 just bytes, no header at all")


# --------------------------------------------------------------------------- hostile

def _nested(depth: int, same_boundary: bool) -> bytes:
    def b(i: int) -> bytes:
        return b"B" if same_boundary else b"B%d" % i
    out = [b"From: a@b.example\r\nSubject: deep\r\nContent-Type: multipart/mixed; boundary=\"",
           b(0), b"\"\r\n\r\n--", b(0), b"\r\nContent-Type: text/plain\r\n\r\nfirst text\r\n"]
    for i in range(depth):
        out += [b"--", b(i), b"\r\nContent-Type: multipart/mixed; boundary=\"", b(i + 1),
                b"\"\r\n\r\n"]
    out += [b"--", b(depth), b"\r\nContent-Type: text/plain\r\n\r\ninnermost\r\n"]
    out += [b"--" + b(i) + b"--\r\n" for i in reversed(range(depth + 1))]
    return b"".join(out)


def _assert_capped(m: ParsedMessage, needle: str) -> None:
    check_invariants(m)
    assert any(d.startswith("cap:") and needle in d for d in m.defects), m.defects


def test_2000_deep_nested_multipart() -> None:
    m = parse(_nested(2000, same_boundary=False))
    _assert_capped(m, "nesting deeper than 20")
    assert m.subject == "deep"
    assert m.text == "first text"


def test_200_deep_same_boundary_nesting() -> None:
    m = parse(_nested(200, same_boundary=True))
    _assert_capped(m, "nesting deeper than 20")
    assert m.text.startswith("first text")


def test_10000_empty_parts() -> None:
    raw = (b"From: a@b.example\r\nSubject: many\r\nContent-Type: multipart/mixed; boundary=X\r\n"
           b"\r\n--X\r\nContent-Type: text/plain\r\n\r\nfirst text\r\n"
           + b"--X\r\n\r\n" * 10000 + b"--X--\r\n")
    m = parse(raw)
    _assert_capped(m, "more than 500 parts")
    assert m.text.startswith("first text")


def test_deep_message_rfc822_nesting() -> None:
    raw = b"From: a@b.example\r\n" + b"Content-Type: message/rfc822\r\n\r\n" * 3000 + b"x\r\n"
    _assert_capped(parse(raw), "nesting")


def test_raw_8bit_subject() -> None:
    m = parse(b"From: a@b.example\r\nSubject: caf\xe9 \xff\r\n\r\nbody\r\n")
    check_invariants(m)
    assert m.subject.startswith("café")
    assert any(d.startswith("8bit-header: Subject") for d in m.defects)
    m = parse("From: a@b.example\r\nSubject: Grüße\r\n\r\nbody\r\n".encode())  # RFC 6532
    assert m.subject == "Grüße" and not m.defects


def test_100000_addresses_in_to() -> None:
    to = b", ".join(b"user%d <user%d@example.org>" % (i, i) for i in range(100_000))
    m = parse(b"From: a@b.example\r\nTo: " + to + b"\r\nSubject: x\r\n\r\nbody\r\n")
    _assert_capped(m, "To header")
    assert m.to[:2] == ("user0@example.org", "user1@example.org")
    assert m.subject == "x" and m.text == "body"
    assert m.raw_address_text.startswith("To: user0")


def test_huge_header_block_and_many_fields() -> None:
    raw = b"From: a@b.example\r\n" + b"X-Junk: v\r\n" * 300_000 + b"Subject: s\r\n\r\nbody\r\n"
    m = parse(raw)
    _assert_capped(m, "header fields")
    assert m.text == "body"


def test_oversized_content_type_headers() -> None:
    params = b"; ".join(b"p%d=v" % i for i in range(50_000))
    m = parse(b"From: a@b.example\r\nContent-Type: text/plain; " + params + b"\r\n\r\nbody\r\n")
    _assert_capped(m, "Content-Type")
    m = parse(b"From: a@b.example\r\nContent-Type: multipart/mixed; boundary=X\r\n\r\n--X\r\n"
              b"Content-Type: text/plain; " + params + b"\r\n\r\nbody\r\n--X--\r\n")
    _assert_capped(m, "part header")


def test_size_cap() -> None:
    raw = b"From: a@b.example\r\nSubject: big\r\n\r\n" + b"x" * 5000
    m = parse(raw, Limits(max_bytes=1000))
    _assert_capped(m, "over 1000 bytes")
    assert m.subject == "big" and len(m.text) < 1000


# ------------------------------------------------------------------------------ fuzz

_TOKENS = [b"From: a@b.example\r\n", b"To: <x@y>, bad, \"q\" <z@w>\r\n", b"Subject: =?utf-8?q?h=C3=A9?=\r\n",
           b"Content-Type: multipart/mixed; boundary=B\r\n", b"Content-Type: message/rfc822\r\n",
           b"Content-Type: text/plain; charset=iso-2022-jp\r\n", b"Content-Type: text/html\r\n",
           b"Content-Type: message/delivery-status\r\n", b"Content-Disposition: attachment; filename*=utf-8''a%FF\r\n",
           b"Content-Transfer-Encoding: base64\r\n", b"Content-Transfer-Encoding: quoted-printable\r\n",
           b"Content-Transfer-Encoding: x-uuencode\r\n", b"\r\n", b"\n", b"\r", b"--B\r\n", b"--B--\r\n",
           b"begin 644 f\r\n", b"=E9=\r\n", b"\xff\xfe\x00", b"<p>x<script>y", b" folded\r\n",
           b"Date: Mon, 99 Foo 2020 99:99:99 +9999\r\n", b"Message-ID: <a@b\r\n", b"AAAA====\r\n"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_raise_only_parse_error(raw: bytes) -> None:
    try:
        m = parse(raw)
    except ParseError:
        return
    check_invariants(m)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.sampled_from(_TOKENS), st.binary(max_size=40)), max_size=60))
def test_mime_shaped_noise_raises_only_parse_error(chunks: list[bytes]) -> None:
    try:
        m = parse(b"".join(chunks))
    except ParseError:
        return
    check_invariants(m)
