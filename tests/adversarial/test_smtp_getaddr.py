"""The ingress's quick parse of MAIL FROM / RCPT TO addresses agrees with aiosmtpd's.

`mailflow.ingress.smtp._simple_getaddr` answers for plain ``<local@domain>`` addresses
without aiosmtpd's full parser (the email package's), and declines everything else, which
the full parser then takes. Whatever it answers must be exactly what aiosmtpd would have
said: the address the RCPT check sees and the spool records, and the parameters left over.
"""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

from aiosmtpd.smtp import SMTP
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mailflow.ingress.smtp import MailflowSMTP, _simple_getaddr


def aiosmtpd_getaddr(arg: str, limit: int = 0) -> tuple[str | None, str | None]:
    return SMTP._getaddr(SimpleNamespace(local_part_limit=limit), arg)  # type: ignore[arg-type]


_LOOP = asyncio.new_event_loop()
_SERVERS = {limit: MailflowSMTP(object(), hostname="mx.example", loop=_LOOP)
            for limit in (0, 64)}
for _limit, _server in _SERVERS.items():
    _server.local_part_limit = _limit


def mailflow_getaddr(arg: str, limit: int = 0) -> tuple[str | None, str | None]:
    """The protocol class's own method (the quick parse, else aiosmtpd's)."""
    return _SERVERS[limit]._getaddr(arg)


TRICKY = [
    "<a@b.example>", "<jane.doe+foi@ask.example> SIZE=5000 BODY=8BITMIME",
    "<a@b.example>SIZE=1", "<a@b.example>\t SIZE=1", "<a@b.example> (comment) SIZE=1",
    "<a@b.example>  ", "<a@b.example>\x1c\x1dX", "<a@b.example>\u2028X", "<a@b.example>\xa0X",
    "<>", "<> SIZE=1", "<@route.example:a@b.example>", '<"a b"@c.example>', "<a..b@c>",
    "<.a@b>", "<a.@b>", "<a@b..c>", "<a@[127.0.0.1]>", "<a@b.example", "<a@b.example>>",
    "<a@b.example> <c@d>", " <a@b.example>", "<a@b_c.example>", "<a(x)@b.example>",
    "<a@b.example.>", "<a@-b.example>", "<jos\u00e9@b.example>", "<a@b\u00e9.example>",
    "<a@b.example>(", "a@b.example", "<a\\b@c>", "<a@b@c>", "<a@>", "<@b>",
    "<" + "x" * 70 + "@b.example>",
]
ALPHABET = "ab.@<> \t()\"\\,:;[]=+-_!~é\x1c\xa0\u2028SIZE1"


def outcome(parse, arg: str, limit: int):  # type: ignore[no-untyped-def]
    """What a parse returns, or the exception it raises (aiosmtpd's raises IndexError on
    some malformed addresses, such as ``1@``; the session then answers 451)."""
    try:
        return parse(arg, limit)
    except Exception as e:  # noqa: BLE001
        return type(e)


def agree(arg: str) -> None:
    for limit in (0, 64):
        want = outcome(aiosmtpd_getaddr, arg, limit)
        fast = _simple_getaddr(arg, limit)
        assert fast is None or fast == want, (arg, limit, fast, want)
        assert outcome(mailflow_getaddr, arg, limit) == want, (arg, limit)


def test_the_quick_parse_agrees_on_tricky_addresses() -> None:
    for arg in TRICKY:
        agree(arg)
    # and it does take the common ones (else it saves nothing)
    assert _simple_getaddr("<jane.doe+foi@ask.example> SIZE=5000") == (
        "jane.doe+foi@ask.example", "SIZE=5000")


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet=ALPHABET, min_size=1, max_size=40))
@example("<a@b> (c) d")
def test_the_quick_parse_agrees_on_anything(arg: str) -> None:
    agree(arg)


@settings(max_examples=1000, deadline=None)
@given(st.from_regex(r"\A<[a-z0-9.+_-]{1,8}@[a-z0-9.-]{1,8}>[ \t(]?[ A-Z=0-9()]{0,12}\Z"))
def test_the_quick_parse_agrees_near_the_common_shape(arg: str) -> None:
    agree(arg)
