"""A follow-up goes to the Reply-To of the authority's last response: the pipeline parses only
that response's header section for it (`pipeline._header_section`), which must give the
Reply-To the whole message gives, for every message of the corpus and for odd line ends."""
from __future__ import annotations

from pathlib import Path

import pytest

from mailflow.mail.parse import ParseError, parse
from mailflow.pipeline import _header_section

CORPUS = sorted(Path(__file__).parent.joinpath("corpus").rglob("*.eml"))


def _reply_to(raw: bytes) -> tuple[str, ...] | str:
    try:
        return parse(raw).reply_to
    except ParseError as e:
        return f"ParseError: {e}"


def test_every_corpus_message_gives_the_same_reply_to() -> None:
    assert CORPUS
    for path in CORPUS:
        raw = path.read_bytes()
        assert _reply_to(_header_section(raw)) == _reply_to(raw), path


@pytest.mark.parametrize("raw", [
    b"From: a@b.example\r\nReply-To: x@y.example\r\n\r\nReply-To: evil@z.example\r\n",
    b"From: a@b.example\nReply-To: x@y.example\n\nReply-To: evil@z.example\n",
    b"From: a@b.example\r\nSubject: s\n\r\nReply-To: evil@z.example\r\n\r\nmore\r\n",
    b"From: a@b.example\rReply-To: x@y.example\r\rReply-To: evil@z.example\r",
    b"From: a@b.example\r\nReply-To: x@y.example\r\n",
    b"From: a@b.example\r\nReply-To: x@y.example,\r\n z@y.example\r\n\r\nbody",
])
def test_the_header_section_ends_at_the_first_empty_line(raw: bytes) -> None:
    assert "evil@z.example" not in _reply_to(_header_section(raw))
    assert _reply_to(_header_section(raw)) == _reply_to(raw)
