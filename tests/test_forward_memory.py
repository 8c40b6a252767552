"""The forward path's big-message shortcuts give exactly what the stdlib and dkimpy give.

`compose.build` writes a big attachment's base64 straight into the finished message, and
`signing` hashes the body a megabyte at a time and reads the From from the header section
alone (issue #10: a 25 MB attachment cost 8.8x its size in memory). These tests compare
each shortcut with the plain way on the same input, byte for byte; no timing here.
"""
from __future__ import annotations

import base64
import hashlib
import os
import random
from datetime import datetime, timezone

import dkim
import pytest
from dkim.canonicalization import CanonicalizationPolicy

import mailflow.outbound.compose as compose
from mailflow.core.message import Attachment
from mailflow.outbound.signing import _header_section, _headers_and_body_hash


def _build(monkeypatch: pytest.MonkeyPatch, atts: list[Attachment], splice: bool) -> bytes:
    monkeypatch.setattr(compose, "_SPLICE_MIN", 0 if splice else 10**12)
    monkeypatch.setattr(compose, "utcnow", lambda: datetime(2026, 1, 1, tzinfo=timezone.utc))
    random.seed(5)   # the generator's multipart boundary
    out = compose.Outgoing(from_addr="foi@site.example", to_addr="jane@citizen.example",
                           subject="RE: request", text="Dear Jane,\n\nAttached.\n",
                           domain="site.example", message_id="<m@site.example>",
                           attachments=atts)
    return compose.build(out)


@pytest.mark.parametrize("sizes", [[1], [2], [3], [746], [747], [748], [1494], [0, 7, 2241],
                                   [300_000, 5], [1_000_001, 400_000]])
def test_spliced_attachments_are_what_add_attachment_makes(monkeypatch, sizes):
    atts = [Attachment(f"f{i}.pdf", "application/pdf", os.urandom(n))
            for i, n in enumerate(sizes)]
    atts.append(Attachment("original.eml", "message/rfc822", b"Subject: x\r\n\r\nhi\r\n"))
    plain = _build(monkeypatch, atts, splice=False)
    assert _build(monkeypatch, atts, splice=True) == plain


def test_big_attachment_round_trips(monkeypatch):
    from mailflow.mail.parse import parse
    data = os.urandom(600_000)
    raw = _build(monkeypatch, [Attachment("big.pdf", "application/pdf", data)], splice=True)
    pm = parse(raw)
    assert [(a.filename, a.data == data) for a in pm.attachments] == [("big.pdf", True)]


def _plain_body_hash(raw: bytes, c: bytes):
    canon = CanonicalizationPolicy.from_c_value(c)
    headers, body = dkim.rfc822_parse(raw)
    return headers, base64.b64encode(hashlib.sha256(canon.canonicalize_body(body)).digest())


def test_chunked_body_hash_is_dkimpys():
    rnd = random.Random(3)
    alph = [b"a", b" ", b"\t", b"\r\n", b"\r\n", b"\r", b"  \r\n", b"x y", b"\r\n\r\n"]
    for _ in range(4000):
        head = b"From: a@b.example\r\nSubject: x  y\r\n" if rnd.random() < 0.9 else b""
        body = b"".join(rnd.choice(alph) for _ in range(rnd.randint(0, 25)))
        raw = head + b"\r\n" + body if rnd.random() < 0.95 else head + body
        if rnd.random() < 0.05:
            raw = raw.replace(b"\r\n", b"\n", 1)
        for c in (b"relaxed/relaxed", b"simple/simple", b"relaxed/simple", b"simple/relaxed"):
            try:
                want = _plain_body_hash(raw, c)
            except Exception as exc:   # dkimpy raises IndexError for a leading fold
                with pytest.raises(type(exc)):
                    _headers_and_body_hash(raw, CanonicalizationPolicy.from_c_value(c))
                continue
            got = _headers_and_body_hash(raw, CanonicalizationPolicy.from_c_value(c),
                                         chunk=rnd.randint(1, 8))
            assert got == want, (c, raw)


def test_header_section_gives_rfc822_parse_headers():
    rnd = random.Random(4)
    alph = [b"a", b"A: b", b"\r\n", b"\n", b"\r", b" ", b"From x"]
    for _ in range(20000):
        raw = b"".join(rnd.choice(alph) for _ in range(rnd.randint(0, 12)))
        try:
            want = dkim.rfc822_parse(raw)[0]
        except Exception as exc:
            with pytest.raises(type(exc)):
                dkim.rfc822_parse(_header_section(raw))
            continue
        assert dkim.rfc822_parse(_header_section(raw))[0] == want, raw
