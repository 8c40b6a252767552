"""mailflow reads SMTP DATA in blocks (`_Hardened._data`), not a line at a time as aiosmtpd's
`SMTP.smtp_DATA` does; this proves the two answer and store the same for every input.

Both run on the same protocol class, fed the same bytes in the same pieces straight into
`data_received` (each piece handled before the next arrives, so every block boundary the
test asks for is one the server sees), with small limits so that long lines, oversize
messages and blocks of a few bytes are all cheap to reach. The transcript compared is every
byte the server wrote and every message the handler was given (content and original
content), through the following commands of a pipelining client and QUIT.
"""
from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailflow.ingress.smtp import BODY_LINE_LIMIT, MailflowSMTP

HEAD = b"EHLO client.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"
"""A transaction up to DATA (each line shorter than the small line limits used here)."""
TAIL = b"\r\n.\r\nNOOP\r\nQUIT\r\n"


class Recorder:
    """A handler that keeps what DATA hands it."""

    def __init__(self) -> None:
        self.stored: list[tuple[Any, Any]] = []

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.stored.append((envelope.content, envelope.original_content))
        return f"250 stored {len(self.stored)}"


class Transport(asyncio.Transport):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.out = bytearray()
        self.closed = False
        self.protocol: Any = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("192.0.2.1", 2525) if name == "peername" else default

    def write(self, data: Any) -> None:
        self.out += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.call_soon(self.protocol.connection_lost, None)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


def _classes(line_length_limit: int) -> tuple[type[SMTP], type[SMTP]]:
    class Blocks(MailflowSMTP):
        pass

    class Lines(MailflowSMTP):
        async def _data(self, arg: str) -> None:
            await SMTP.smtp_DATA(self, arg)  # aiosmtpd's own, a line at a time

    Blocks.line_length_limit = Lines.line_length_limit = line_length_limit
    return Blocks, Lines


async def _session(cls: type[SMTP], pieces: list[bytes], **kw: Any) -> tuple[bytes, list[Any]]:
    loop = asyncio.get_running_loop()
    handler = Recorder()
    proto = cls(handler, hostname="mx.example", ident="test", loop=loop, **kw)
    transport = Transport(loop)
    transport.protocol = proto
    proto.connection_made(transport)
    for piece in pieces:
        for _ in range(8):  # let the server take everything it has before the next piece
            await asyncio.sleep(0)
        if transport.closed:
            break
        proto.data_received(piece)
    for _ in range(2000):
        if transport.closed:
            break
        await asyncio.sleep(0)
    else:
        proto.eof_received()
        transport.out += b"<hung>"
    for _ in range(8):
        await asyncio.sleep(0)
    return bytes(transport.out), handler.stored


def both(stream: bytes, cuts: list[int], *, line_length_limit: int = 24,
         **kw: Any) -> tuple[tuple[bytes, list[Any]], tuple[bytes, list[Any]]]:
    cuts = sorted({c for c in cuts if 0 < c < len(stream)})
    edges = [0, *cuts, len(stream)]
    pieces = [stream[a:b] for a, b in zip(edges, edges[1:])]
    blocks, lines = _classes(line_length_limit)
    return (asyncio.run(_session(blocks, pieces, **kw)),
            asyncio.run(_session(lines, pieces, **kw)))


def assert_same(stream: bytes, cuts: list[int], **kw: Any) -> tuple[bytes, list[Any]]:
    new, old = both(stream, cuts, **kw)
    assert new == old, (stream, cuts, kw)
    assert b"\r\n354 End data" in new[0] and not new[0].endswith(b"<hung>"), new[0]
    return new


PIECES = st.sampled_from([b".", b"..", b"\r", b"\n", b"\r\n", b".\r\n", b"\r\n.", b"\r\n..",
                          b"\r\n.\r\n", b"\n.\n", b"\r.\r", b"x", b"abc", b"\xc3\xa9", b"\xff",
                          b"y" * 10, b"z" * 23, b"w" * 30, b" "])
SIZES = st.sampled_from([None, 0, 30, 60, 200])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.lists(PIECES, max_size=40).map(b"".join), data=st.data(), size=SIZES,
       decode=st.sampled_from([(False, True), (True, True), (True, False)]))
def test_blocks_and_lines_agree(body: bytes, data: st.DataObject, size: int | None,
                                decode: tuple[bool, bool]) -> None:
    stream = HEAD + body + TAIL
    start = len(HEAD)
    cuts = data.draw(st.lists(st.integers(start, len(stream)), max_size=12))
    assert_same(stream, cuts, data_size_limit=size, decode_data=decode[0],
                enable_SMTPUTF8=decode[1])


TRICKY = [
    b"", b".", b"..", b".\r\n", b"..\r\n", b"\r\n", b"\r\n\r\n", b".x\r\n..y\r\n.\r\n",
    b"a\r\n.\r\nb", b"ab\r\nab\r\nab\r\nab", b"x\r\r\n.\r\r\n", b"x\n.\nMAIL FROM:<e@example.org>",
    b"\r\n.\r", b"\r\n.\n", b"w" * 22 + b"\r\n" + b"v" * 23 + b"\r\n" + b"u" * 24,
    b"w" * 25 + b"\r\n..", b"." * 50, b"\r" * 30 + b"\n" * 30, (b"0123456789" * 5 + b"\r\n.") * 3,
]


@pytest.mark.parametrize("body", TRICKY)
@pytest.mark.parametrize("size", [None, 25, 48])
def test_every_block_boundary(body: bytes, size: int | None) -> None:
    """Byte by byte (a block boundary everywhere), and in two pieces at every split."""
    stream = HEAD + body + TAIL
    assert_same(stream, list(range(len(HEAD), len(stream))), data_size_limit=size)
    for cut in range(len(HEAD), len(stream)):
        assert_same(stream, [cut], data_size_limit=size)


@pytest.mark.parametrize("extra", range(-3, 6))
def test_lines_around_the_real_limits(extra: int) -> None:
    """mailflow's own limits (64 KiB lines, dot included), lines a few bytes either side of
    them, with the size limit falling inside, just before and just after such a line."""
    limit = BODY_LINE_LIMIT + 3
    line = b"." + b"q" * (limit - 3 + extra) + b"\r\n"
    body = b"Subject: x\r\n\r\n" + line + b"short\r\n" + line
    stream = HEAD + body + TAIL
    for size in (None, 14 + len(line) - 1, 14 + len(line), 14 + len(line) + 1, 100, 2 ** 20):
        for cuts in ([], list(range(len(HEAD), len(stream), 4099)),
                     list(range(len(HEAD), len(stream), 65536))):
            assert_same(stream, cuts, line_length_limit=limit, data_size_limit=size)


def test_a_megabyte_with_stuffed_dots_is_stored_unstuffed() -> None:
    lines = [b"Subject: big\r\n", b"\r\n"]
    lines += [(b"." if i % 7 == 0 else b"") + b"%076d\r\n" % i for i in range(14000)]
    body = b"".join(lines)
    stream = HEAD + body.replace(b"\r\n.", b"\r\n..") + b".\r\nNOOP\r\nQUIT\r\n"
    out, stored = assert_same(stream, list(range(len(HEAD), len(stream), 65536)),
                              line_length_limit=BODY_LINE_LIMIT + 3, data_size_limit=2 ** 21)
    assert stored == [(body, body)]
    assert b"250 stored 1\r\n250 OK\r\n221" in out


def test_an_empty_message_and_the_next_command_in_the_same_piece() -> None:
    out, stored = assert_same(HEAD + b".\r\nNOOP\r\nQUIT\r\n", [])
    assert stored == [(b"", b"")]
    assert out.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n250 stored 1\r\n250 OK\r\n"
                        b"221 Bye\r\n")


def test_a_client_gone_mid_data_stores_nothing() -> None:
    async def run(cls: type[SMTP]) -> tuple[bytes, list[Any]]:
        loop = asyncio.get_running_loop()
        handler = Recorder()
        proto = cls(handler, hostname="mx.example", ident="test", loop=loop)
        transport = Transport(loop)
        transport.protocol = proto
        proto.connection_made(transport)
        proto.data_received(HEAD + b"Subject: cut\r\n\r\n" + b"x" * 70000 + b"\r\nhalf")
        for _ in range(20):
            await asyncio.sleep(0)
        proto.eof_received()
        proto.connection_lost(None)
        for _ in range(20):
            await asyncio.sleep(0)
        return bytes(transport.out), handler.stored

    for cls in _classes(BODY_LINE_LIMIT + 3):
        out, stored = asyncio.run(run(cls))
        assert stored == []
        assert out.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n")


@pytest.mark.parametrize("size", [40, 41, 42, 43])
def test_messages_at_the_size_limit(size: int) -> None:
    """A message of exactly data_size_limit bytes is taken, one more byte is not; a long
    line starting where the count reaches the limit is refused as a long line."""
    for body in (b"a" * 18 + b"\r\n" + b"b" * 18 + b"\r\n",        # 40 bytes
                 b"a" * 19 + b"\r\n" + b"b" * 18 + b"\r\n",        # 41
                 b"a" * 18 + b"\r\n" + b"b" * 18 + b"\r\n" + b"c" * 30 + b"\r\n",
                 b"a" * 18 + b"\r\n" + b"b" * 18 + b"\r\n" + b"c" * 23 + b"\r\n",
                 b"a" * 18 + b"\r\n" + b"b" * 18 + b"\r\n" + b"c" * 22 + b"\r\n"):
        stream = HEAD + body + b".\r\nNOOP\r\nQUIT\r\n"
        assert_same(stream, [], data_size_limit=size)
        assert_same(stream, list(range(len(HEAD), len(stream))), data_size_limit=size)


def test_help_lists_and_explains_the_commands_mailflow_overrides() -> None:
    """HELP lists DATA, MAIL and RCPT, as aiosmtpd's does (mailflow's overriding methods once
    dropped aiosmtpd's @syntax text, and with it these three)."""
    stream = b"EHLO client.example\r\nHELP\r\nHELP DATA\r\nHELP MAIL\r\nHELP RCPT\r\nQUIT\r\n"
    blocks, lines = _classes(BODY_LINE_LIMIT + 3)
    out, _ = asyncio.run(_session(blocks, [stream]))
    supported = next(line for line in out.split(b"\r\n") if b"Supported commands" in line)
    assert {b"DATA", b"MAIL", b"RCPT"} <= set(supported.split(b": ", 1)[1].split())
    assert b"250 Syntax: DATA\r\n" in out
    assert b"250 Syntax: MAIL FROM: <address>" in out and b"250 Syntax: RCPT TO: <address>" in out
