"""Header injection on output: text that citizens and authorities control (subjects, display
names, attachment file names, Message-IDs) never becomes a header of mail mailflow sends.

A line break in such text would let anyone add `Bcc:` (or anything else) to mail signed with
the site's DKIM key. Besides CR and LF, Python's email package breaks lines wherever
str.splitlines() does: VT, FF, FS, GS, RS, NEL (U+0085), U+2028 and U+2029.
"""
from __future__ import annotations

import email
import email.policy
import re

import pytest

from conftest import DOMAIN, JANE, Site, addresses
from mailflow.core.message import Attachment
from mailflow.outbound.compose import Outgoing, build
from test_roundtrip import AUTHORITY, ask

BREAKS = {
    "CRLF": "\r\n", "CR": "\r", "LF": "\n", "LFLF": "\n\n", "NUL": "\x00", "VT": "\x0b",
    "FF": "\x0c", "FS": "\x1c", "GS": "\x1d", "RS": "\x1e", "NEL": "\x85",
    "LS": "\u2028", "PS": "\u2029", "not-utf8": "\udcff", "CRLF-TAB": "\r\n\t",
}
INJECTED = "X-Injected: yes"
EVIL = "Bcc: victim@evil.example"

BASE_HEADERS = {"from", "to", "subject", "date", "message-id", "x-auto-response-suppress",
                "x-mailflow-loop", "content-type", "content-transfer-encoding", "mime-version"}


def header_names(raw: bytes) -> list[set[str]]:
    """The header names of every MIME part of a message, as a mail client would read them."""
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    return [{k.lower() for k in part.keys()} for part in msg.walk()]


def assert_no_injected_header(raw: bytes) -> None:
    for names in header_names(raw):
        assert "x-injected" not in names and "bcc" not in names, names
    # And byte for byte: no line of any header block (the message's, and each part's after
    # its boundary line) starts with the injected names. Body text may quote them: that is
    # text, not a header.
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    blocks = [raw.split(b"\r\n\r\n", 1)[0]]
    for part in msg.walk():
        boundary = part.get_boundary()
        if boundary:
            blocks += re.findall(rb"(?s)\r\n--" + re.escape(boundary.encode()) + rb"\r\n(.*?)\r\n\r\n",
                                 raw)
    assert len(blocks) == len(list(msg.walk()))
    for block in blocks:
        for line in block.split(b"\r\n"):
            assert not re.match(rb"(?i)(x-injected|bcc)\s*:", line), line
    assert not re.search(rb"\r(?!\n)|(?<!\r)\n", raw), "bare CR or LF in outgoing mail"


def _outgoing(**kw: object) -> Outgoing:
    base: dict = dict(from_addr=f"reply-1-abc@{DOMAIN}", to_addr=JANE, subject="Subject",
                      text="Body", domain=DOMAIN)
    base.update(kw)
    return Outgoing(**base)


@pytest.mark.parametrize("brk", list(BREAKS.values()), ids=list(BREAKS))
@pytest.mark.parametrize("field", ["subject", "from_name", "to_name", "in_reply_to",
                                   "references", "filename"])
def test_line_breaks_in_header_text_never_create_a_header(field: str, brk: str) -> None:
    value = f"Road budget{brk}{INJECTED}{brk}{EVIL}"
    if field == "references":
        out = _outgoing(references=["<a@b.example>", value])
    elif field == "filename":
        out = _outgoing(attachments=[Attachment(value + ".pdf", "application/pdf", b"%PDF-1.4")])
    else:
        out = _outgoing(**{field: value}, reply_to=f"reply-1-abc@{DOMAIN}")
    raw = build(out)  # never a ValueError: the text is flattened, not refused
    assert_no_injected_header(raw)
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert {k.lower() for k in msg.keys()} <= BASE_HEADERS | {"in-reply-to", "references",
                                                              "reply-to"}
    if field == "subject":
        # The text is still there, on one line: neutralised, not lost.
        assert INJECTED in str(msg["Subject"]) and "\n" not in str(msg["Subject"])
    if field == "filename":
        (att,) = list(msg.iter_attachments())
        name = att.get_filename()
        assert name and INJECTED in name and not re.search("[\r\n\x85\u2028\u2029]", name)


@pytest.mark.parametrize("addr", [f"jane\r\nBcc: x@evil.example@{DOMAIN}",
                                  f"jane@citizen.example\nBcc: x@evil.example",
                                  "jane\u2028x@citizen.example", "jane\x00@citizen.example",
                                  "jane@citizen.example>, <x@evil.example"])
@pytest.mark.parametrize("field", ["to_addr", "from_addr", "reply_to"])
def test_an_address_with_a_line_break_is_refused_not_rewritten(field: str, addr: str) -> None:
    with pytest.raises(ValueError):
        build(_outgoing(**{field: addr}))


# -- end to end: through `mailflow ingest`, to the outbox ---------------------------------------
def _encoded_word(text: str) -> str:
    """An RFC 2047 encoded-word: how a CR LF gets past header parsing into decoded text."""
    return "=?utf-8?q?" + "".join(
        ch if ch.isascii() and ch.isalnum() else "".join(f"={b:02X}" for b in ch.encode())
        for ch in text) + "?="


def test_injected_subject_and_name_of_a_citizen_never_reach_outgoing_headers(site: Site) -> None:
    payload = f"Bins\r\n{INJECTED}\u2028{EVIL}"
    # A quoted name in raw UTF-8 keeps its NEL and U+2028 through parsing (an encoded-word
    # name with CR LF is already cut down by the parser), so compose must deal with them.
    name = f"Jane\u2028{INJECTED}\x85Bcc: victim"
    raw = (f'From: "{name}" <{JANE}>\r\nTo: camden@{DOMAIN}\r\n'
           f"Subject: {_encoded_word(payload)}\r\nMessage-ID: <inj1@citizen.example>\r\n"
           f"\r\nHow often are the bins emptied?\r\n").encode()
    assert site.ingest(raw, [f"camden@{DOMAIN}"], sender=JANE) == 0
    (_, conf, conf_raw), = site.mail_to(JANE)
    assert_no_injected_header(conf_raw)
    assert INJECTED in str(conf["Subject"])  # flattened into the one Subject line
    # She confirms; the request goes to the authority under her (flattened) name and title.
    confirm = addresses(conf, "Reply-To")[0]
    reply = (f'From: "{name}" <{JANE}>\r\nTo: {confirm}\r\nSubject: Re: yes\r\n'
             f"In-Reply-To: {conf['Message-ID']}\r\n\r\nYes\r\n").encode()
    assert site.ingest(reply, [confirm], sender=JANE) == 0
    (_, req, req_raw), = site.mail_to(AUTHORITY)
    assert_no_injected_header(req_raw)
    assert INJECTED in str(req["Subject"]) and "Jane" in str(req["From"])


def test_injected_subject_name_and_file_name_of_an_authority_never_reach_the_citizen(
        site: Site) -> None:
    req = ask(site)
    subject = f"RE: {req['msg']['Subject']}\r\n{INJECTED}\u2029{EVIL}"
    name = f"FOI\u2028{INJECTED}"
    answer = (f"From: {_encoded_word(name)} <{AUTHORITY}>\r\nTo: {req['address']}\r\n"
              f"Subject: {_encoded_word(subject)}\r\n"
              f"Message-ID: <{_encoded_word('x')}\r\n X-Injected: yes@camden.gov.example>\r\n"
              f"In-Reply-To: {req['msg']['Message-ID']}\r\nMIME-Version: 1.0\r\n"
              f"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
              f"Content-Type: text/plain\r\n\r\nSee the attachments.\r\n--b\r\n"
              f"Content-Type: application/pdf\r\n"
              f"Content-Disposition: attachment; filename*=utf-8''a%0D%0A{INJECTED.replace(' ', '%20').replace(':', '%3A')}%0D%0A.pdf\r\n"
              f"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--b\r\n"
              f"Content-Type: application/pdf; name=\"{_encoded_word('b' + chr(0x2028) + EVIL)}.pdf\"\r\n"
              f"Content-Disposition: attachment\r\n"
              f"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--b--\r\n").encode()
    assert site.ingest(answer, [req["address"]], sender=AUTHORITY) == 0
    (_, fwd, fwd_raw), = site.mail_to(JANE)
    assert_no_injected_header(fwd_raw)
    names = [a.get_filename() or "" for a in fwd.iter_attachments()]
    assert len(names) == 2
    assert not any(re.search("[\r\n\x85\u2028\u2029]", n) for n in names), names
