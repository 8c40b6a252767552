"""`compose.build` writes outgoing mail without an `EmailMessage` (issue #10): it must give
byte for byte what the stdlib gives (`_build_stdlib`, the way it was built before) for any
text citizens and authorities can put in it: line breaks of every kind, encoded-words,
non-ASCII, long and odd values, quotes in names and file names, any attachment."""
from __future__ import annotations

import random
from datetime import datetime, timezone
from pathlib import Path

import pytest

import mailflow.outbound.compose as compose
from mailflow.core.message import Attachment

PIECES = ["Road", "budget", " ", "  ", "\t", "\r\n", "\n", "\r", "\x0b", "\x0c", "\x1c", "\x85",
          "\u2028", "\u2029", "\x00", "\udcff", "=?utf-8?q?=0D=0ABcc:_x@evil.example?=", "=?",
          "?=", "Bcc: victim@evil.example", "Ünïcødé", "—", "日本語", '"', "\\", "(", ")", "<",
          ">", ",", ";", ":", "@", "[", "]", "x" * 120, "y" * 1200, "Re:", "é" * 300, "'", "%",
          "*", "=", ".", "-", "--===============", "From ", "\u200b", "\U0001f600"]


def _text(rnd: random.Random, n: int) -> str:
    return "".join(rnd.choice(PIECES) for _ in range(rnd.randint(0, n)))


def _case(rnd: random.Random, corpus: list[bytes]) -> compose.Outgoing:
    atts = []
    for _ in range(rnd.choice([0, 0, 1, 2, 3])):
        ctype = rnd.choice(["application/pdf", "text/csv", "image/png", "message/rfc822",
                            "multipart/mixed", "text", "a/b/c", "text/plain",
                            "application/vnd.openxmlformats-officedocument.wordprocessingml.document"])
        data = rnd.choice([b"", b"x", rnd.randbytes(rnd.randint(0, 5000)),
                           rnd.choice(corpus) if corpus else b"%PDF"])
        atts.append(Attachment(_text(rnd, 6), ctype, data))
    return compose.Outgoing(
        from_addr=rnd.choice(["reply-1-abc@site.example", "foi@site.example"]),
        from_name=_text(rnd, 5), to_addr=rnd.choice(["jane@citizen.example", "a.b+c@x.example"]),
        to_name=_text(rnd, 5), subject=_text(rnd, 10), text=_text(rnd, 30),
        domain="site.example", reply_to=rnd.choice([None, "reply-1-abc@site.example"]),
        in_reply_to=rnd.choice([None, "<a@b.example>", _text(rnd, 4)]),
        references=[rnd.choice(["<a@b.example>", _text(rnd, 3), ""]) for _ in range(rnd.randint(0, 25))],
        automatic=rnd.random() < 0.5, attachments=atts,
        message_id=rnd.choice(["<mailflow.fwd1.0123456789abcdef0123@site.example>", ""]) or
        compose.new_message_id("site.example", _text(rnd, 3)))


def _both(out: compose.Outgoing, seed: int) -> tuple[bytes | Exception, bytes | Exception]:
    got: list[bytes | Exception] = []
    for fn in (compose.build, compose._build_stdlib):
        random.seed(seed)   # the multipart boundary is drawn from `random`
        try:
            got.append(fn(out))
        except Exception as e:  # noqa: BLE001 - both must refuse the same things
            got.append(e)
    return got[0], got[1]


def test_build_is_byte_for_byte_the_stdlibs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compose, "utcnow", lambda: datetime(2026, 1, 1, tzinfo=timezone.utc))
    corpus = sorted(Path(__file__).parent.glob("corpus/**/*.eml"))[:20]
    raws = [p.read_bytes() for p in corpus]
    rnd = random.Random(10)
    for i in range(1500):
        out = _case(rnd, raws)
        fast, slow = _both(out, i)
        if isinstance(slow, Exception):
            assert isinstance(fast, Exception) and type(fast) is type(slow), (out, slow, fast)
        else:
            assert fast == slow, out


def test_surrogates_and_unsafe_addresses_are_refused_as_before() -> None:
    with pytest.raises(ValueError):
        compose.build(compose.Outgoing(from_addr="a\r\n@x.example", to_addr="b@x.example",
                                       subject="s", text="t", domain="x.example"))
    out = compose.Outgoing(from_addr="a@x.example", to_addr="b@x.example", subject="s",
                           text="bad \udcff text", domain="x.example")
    fast, slow = _both(out, 1)
    assert type(fast) is type(slow)
