"""The parser's shortcuts (issue #10) give exactly what the stdlib ways they replace give.

parse() reads the structure with compat32 and decodes unstructured headers without the
header registry, finds boundary lines with bytes.find, and re-generates attached messages
with a compat32 whose header folding skips Header objects where they change nothing. Each
is compared here with the stdlib on the same (random) input. No timing here.
"""
from __future__ import annotations

import random
from pathlib import Path

import pytest
from email import policy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mailflow.mail.parse as mp
from mailflow.mail.parse import (_boundary_lines, _GENERATE_POLICY, _next_boundary_line, parse,
                                 parse_content)


@pytest.mark.parametrize("false_candidates", [0, 2, 64])
def test_boundary_search_is_the_patterns(monkeypatch, false_candidates):
    monkeypatch.setattr(mp, "_FALSE_CANDIDATES", false_candidates)
    rnd = random.Random(false_candidates)
    alph = [b"--", b"a", b"ab", b"b", b"\r\n", b"\n", b"\r", b" ", b"\t", b"x", b"-"]
    for _ in range(20000):
        bs = tuple(rnd.choice([b"a", b"ab", b"b", b"a b", b"-a", b"a-"])
                   for _ in range(rnd.randint(1, 3)))
        raw = b"".join(rnd.choice(alph) for _ in range(rnd.randint(0, 30)))
        pos = rnd.randint(0, len(raw))
        d = _boundary_lines(bs).search(raw, pos)
        assert _next_boundary_line(raw, pos, bs) == (None if d is None else d.start()), \
            (bs, raw, pos)


@given(st.text(alphabet=st.sampled_from(["a", " ", "\t", "\r", "\n", "é", "\udc80",
                                           "\u2028", "\x0b", "\xa0"]), max_size=16))
def test_unfold_and_clean_shortcuts_are_the_substitutions(value):
    """_unfold and _clean skip their regex substitution when it cannot change anything."""
    import re
    assert mp._unfold(value) == re.sub(r"[ \t]*(?:\r\n|\r|\n)[ \t]*|\t", " ", value).strip()
    assert mp._clean(value) == re.sub("[\ud800-\udfff]", "\ufffd", value)
    if not re.search("[\ud800-\udfff]", value):
        assert mp._unsurrogate(value) == (value, False)
    else:
        assert "\udc80" not in mp._unsurrogate(value)[0]


def test_fast_folding_is_compat32s():
    rnd = random.Random(2)
    alph = ["a", "b", " ", "  ", "\t", ":", "\n", "\r\n", "\n ", "\r\n\t", "\r\n ", "é", "=?",
            "x" * 20, "y" * 40, ",", ";", "\udce9", "\x0b", "\r", "", "\n\n"]
    for _ in range(30000):
        name = rnd.choice(["Subject", "X", "Received", "A-Very-Long-Header-Name-Here"])
        value = "".join(rnd.choice(alph) for _ in range(rnd.randint(0, 14)))
        try:
            want: object = policy.compat32.fold_binary(name, value)
        except Exception as exc:
            want = type(exc)
        try:
            got: object = _GENERATE_POLICY.fold_binary(name, value)
        except Exception as exc:
            got = type(exc)
        assert got == want, (name, value)


def test_unstructured_headers_read_as_the_registry_reads_them():
    rnd = random.Random(5)
    alph = ["a", " ", "  ", "\t", "=?utf-8?q?caf=C3=A9?=", "=?iso-8859-1?b?Y2Fm6Q==?=", "=?",
            "?=", "é", "\x01", "x=?utf-8?q?a?=", "=?bogus?q?a?=", "=?utf-8?q?a b?=", ",", "<", ">"]
    for _ in range(5000):
        name = rnd.choice(["Subject", "X-Thing", "Received", "Thread-Topic"])
        value = "".join(rnd.choice(alph) for _ in range(rnd.randint(0, 10)))
        raw = f"{name}: {value}\r\nFrom: a@b.example\r\n\r\nbody\r\n".encode("utf-8")
        pm = parse(raw)
        obj = policy.default.header_factory(name, mp._unfold(mp._normalise_ew_charsets(value)))
        want = str(obj)
        if "=?" in want and mp._ENCODED_WORD.search(want):
            want = mp.light_decode(want)
        assert pm.header(name) == mp._clean(want), (name, value)
        assert not obj.defects


def test_unquoted_boundary_with_equals_is_read_whole():
    """`boundary=----=_Next...` unquoted: mail programs read all of it (policy.default
    stopped at the "=" and saw no parts)."""
    raw = (b"From: a@b.example\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/alternative; boundary=----=_NextPart_000\r\n\r\n"
           b"------=_NextPart_000\r\nContent-Type: text/plain\r\n\r\nHello\r\n"
           b"------=_NextPart_000\r\nContent-Type: text/html\r\n\r\n<p>Hello</p>\r\n"
           b"------=_NextPart_000--\r\n")
    pm = parse(raw)
    assert pm.text == "Hello"
    assert pm.html == "<p>Hello</p>"
    assert not [d for d in pm.defects if "Boundary" in d]


def _registry_reading(name: str, value: str) -> tuple[str, tuple[str, ...], list[tuple[str, str]]]:
    obj = policy.default.header_factory(name, value)
    return (str(obj), tuple(type(d).__name__ for d in obj.defects),
            [(a.display_name, a.addr_spec) for a in getattr(obj, "addresses", ())])


@pytest.mark.parametrize("name", ["From", "To", "Message-ID", "Content-Type"])
def test_plain_structured_headers_read_as_the_registry_reads_them(name):
    rnd = random.Random(name)
    words = ["Jane", "O'Brien", "x", "J.", "a,b", "  ", " ", "=?utf-8?q?a?=", "(c)", "\\"]
    addrs = ["a@b.example", "a.b@c.example", "a..b@c.example", ".a@b.example", "a@b.", "a@[1.2.3.4]",
             "a+b@c-d.example", "a@b@c.example", "@b.example", "a@"]
    hits = 0
    for _ in range(6000):
        if name in ("From", "To"):
            items = []
            for _ in range(rnd.randint(1, 3)):
                addr = rnd.choice(addrs)
                form = rnd.randint(0, 4)
                dn = " ".join(rnd.choice(words) for _ in range(rnd.randint(1, 3)))
                if form == 0:
                    items.append(addr)
                elif form == 1:
                    items.append(f"{dn} <{addr}>")
                elif form == 2:
                    items.append(f'"{dn}" <{addr}>')
                elif form == 3:
                    items.append(f"{dn}<{addr}>")
                else:
                    items.append(f" {addr} ")
            value = rnd.choice([",", ", ", " , "]).join(items)
        elif name == "Message-ID":
            value = rnd.choice(["<", ""]) + rnd.choice(addrs) + rnd.choice([">", "", "> "])
        else:
            value = rnd.choice(["text/plain", "multipart/mixed", "Text/HTML", "text", "a/b/c"])
            for _ in range(rnd.randint(0, 3)):
                attr = rnd.choice(["charset", "Boundary", "name", "name*", "format", "charset"])
                val = rnd.choice(["utf-8", '"utf-8"', '"a b"', "----=_Part", '"x;y"', '""',
                                  "a.b", '"é"', "abc'def", "'x'", '"it\'s"', "a%20",
                                  '"a%20b"', '"a*b"', "a*"])
                value += rnd.choice([";", "; ", ";  ", " ;"]) + f"{attr}={val}"
        fast = mp._plain_structured(name.lower(), value)
        if fast is None:
            continue
        hits += 1
        text, defects, addresses = _registry_reading(name, value)
        assert str(fast) == text, value
        assert defects == (), value
        assert [(a.display_name, a.addr_spec) for a in getattr(fast, "addresses", ())] == \
            addresses, value
    assert hits > 100   # the fast path is exercised


@pytest.mark.parametrize("name", ["Date", "Resent-Date"])
def test_plain_dates_read_as_the_registry_reads_them(name):
    """The date shortcut gives the registry's string and datetime, with no defect, for every
    date the registry reads without one; it leaves the others to the registry."""
    rnd = random.Random(name)
    days = ["Mon, ", "Fri,", "", "Xyz, ", "mon, "]
    months = ["Jan", "Feb", "nov", "Dec", "Foo", "13"]
    zones = ["+0000", "-0000", "+0530", "GMT", "UT", "EST", "PDT", "", "+2400", "Z", "(UTC)",
             "+0100 (CET)", "-07"]
    hits = 0
    for _ in range(6000):
        value = (f"{rnd.choice(days)}{rnd.choice(['1', '31', '0', '32', '07'])} "
                 f"{rnd.choice(months)} {rnd.choice(['2026', '26', '99', '1969', '10000'])} "
                 f"{rnd.choice(['14:03', '14:03:05', '25:00:00', '9:7:6', '14:03:60'])} "
                 f"{rnd.choice(zones)}").strip() + rnd.choice(["", " ", "  x"])
        fast = mp._plain_structured(name.lower(), value)
        obj = policy.default.header_factory(name, value)
        if fast is None:
            continue
        hits += 1
        assert str(fast) == str(obj), value
        assert tuple(obj.defects) == (), value
        assert fast.datetime == obj.datetime and (fast.datetime.tzinfo is None) == (
            obj.datetime.tzinfo is None), value
    assert hits > 500   # the fast path is exercised


# -- parse_content: the archive's parse, the body and the headers it names only ---------------
_CORPUS = Path(__file__).resolve().parent / "corpus"
_CORPUS_FILES = sorted(p for p in _CORPUS.rglob("*") if p.is_file() and p.suffix != ".md")


def _same_content(raw: bytes, names: tuple[str, ...] = ("x-no-archive",)) -> None:
    try:
        want = parse(raw)
    except mp.ParseError:
        with pytest.raises(mp.ParseError):
            parse_content(raw, names)
        return
    got = parse_content(raw, names)
    assert (got.text, got.html, got.attachments) == (want.text, want.html, want.attachments)
    for name in names:
        assert got.header_all(name) == want.header_all(name)
    assert got.headers == tuple((k, v) for k, v in want.headers if k.lower() in names)


def test_parse_content_is_parse_on_the_corpus():
    assert len(_CORPUS_FILES) >= 370
    for path in _CORPUS_FILES:
        raw = path.read_bytes()
        _same_content(raw)
        _same_content(raw, ("subject", "content-type", "x-no-archive"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from([
    b"From: a@b.example\r\n", b"X-No-Archive: yes\r\n", b"x-no-archive:  Yes \r\n",
    b"Subject: =?utf-8?q?caf=C3=A9?=\r\n", b"Subject: caf\xe9\r\n", b"X-No-Archive\x01: yes\r\n",
    b"Content-Type: text/plain; charset=iso-8859-1\r\n", b"Content-Type: text/html\r\n",
    b"Content-Type: multipart/mixed; boundary=XX\r\n", b"\r\n", b"--XX\r\n", b"--XX--\r\n",
    b"Content-Disposition: attachment; filename=\"r\xe9sum\xe9.pdf\"\r\n",
    b"Content-Transfer-Encoding: base64\r\n", b"aGVsbG8=\r\n", b"<p>hi</p>\r\n",
    b"body caf\xe9 text\r\n", b" folded\r\n", b"\n", b"Date: nonsense\r\n"]), max_size=30))
def test_parse_content_is_parse_on_random_messages(pieces):
    _same_content(b"".join(pieces))
