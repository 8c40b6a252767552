"""The Redactor skips a value's pattern on texts that cannot hold it (`_pieces`); that must
never change what it redacts. Compared with the same Redactor searching every pattern always,
on texts with the values planted in the ways mail re-encodes them, and with the non-ASCII
letters that re.IGNORECASE matches to ASCII ones (ſ, K)."""
from __future__ import annotations

import random
import re
import unicodedata
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from mailflow.core import redaction as R
from mailflow.core.redaction import _RE_I_FOLDS, RedactionRule, Redactor, private_values


class T:
    def __init__(self, email: str) -> None:
        self.id = 7
        self.citizen_email = email
        self.request_token = "abcdefghjkmn"
        self.reply_token = "pqrstvwxyz01"
        self.confirm_token = None
        self.kind = "foi"


def variants(v: str, rnd: random.Random) -> str:
    v = rnd.choice([v, v.upper(), v.replace("@", " at "), v.replace("@", "&#64;"),
                    v.replace(" ", "&nbsp;"), v.replace("s", "ſ"), v.replace("k", "\u212a"),
                    v.replace("i", "\u0130"), v.replace("i", "\u0131"), v + "é",
                    "\u2019" + v.replace("e", "\u00e9")])
    return v


@settings(max_examples=200, deadline=None)
@given(local=st.text(alphabet="abcksiz.", min_size=1, max_size=8),
       filler=st.lists(st.text(alphabet="abcksi @.&ſ\u212a\u0130\u0131éXYZ-\n", max_size=20),
                       max_size=6),
       seed=st.integers(0, 2**32))
def test_skipping_never_changes_the_result(local: str, filler: list[str], seed: int) -> None:
    rnd = random.Random(seed)
    email = f"{local}@ks.example"
    rules = [RedactionRule("site", "Jake Sims", False, "[name]"),
             RedactionRule("site", r"\b0\d{3} \d{6}\b", True, "[phone]")]
    red = Redactor(rules, thread_id=7, authority="x", private=private_values(T(email), "foi.example"))
    always = Redactor([], thread_id=7, authority="x", private=[])
    always._matchers = [replace(m, pieces=None) for m in red._matchers]
    planted = [email, local, "Jake Sims", "request-7-abcdefghjkmn@foi.example",
               "pqrstvwxyz01", "0207 123456", "jake  sims",
               # other threads' addresses: the patterns of any thread-shaped address
               "reply-12-kkss1234@foi.example", "confirm-abcd5678@foi.example",
               "foi-request-99-zzzzzz+x@foi.example", "request-7-abcdefghjkmn@foi.examplex"]
    parts: list[str] = []
    for f in filler:
        parts += [f, variants(rnd.choice(planted), rnd) if rnd.random() < 0.7 else ""]
    text = " ".join(parts)
    assert red.text(text) == always.text(text)
    assert red.changes(text) == always.changes(text)


def test_the_folds_are_every_letter_ignorecase_takes_for_ascii() -> None:
    """`_lowered` maps these to ASCII; any other non-ASCII character that re.IGNORECASE
    matched to an ASCII one would let the shortcut skip a real match."""
    ascii_class = re.compile("[\x00-\x7f]", re.I)
    found = {}
    for u in range(0x80, 0x110000):
        c = chr(u)
        if not 0xD800 <= u <= 0xDFFF and ascii_class.fullmatch(c):
            found[u] = {a.lower() for a in map(chr, range(128))
                        if re.fullmatch(re.escape(a), c, re.I)}
    assert found == {u: {a} for u, a in _RE_I_FOLDS.items()}


def _literal_source_char_by_char(value: str) -> str:
    """`_literal_source` as it was written first: one character at a time."""
    value = unicodedata.normalize("NFC", value.translate(R._INVISIBLE)).strip()
    out: list[str] = []
    for piece in re.split(r"(\s+)", value):
        if not piece:
            continue
        if piece.isspace():
            out.append(R._SPACE)
            continue
        out.extend(R._PIECES.get(ch) or re.escape(ch) for ch in piece)
    return "".join(out)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab.-+@&\"' \t\n\u00a0\u200b\\[](){}*?é中")),
               max_size=30) | st.text(max_size=20))
def test_literal_source_is_the_character_by_character_one(value: str) -> None:
    assert R._literal_source(value) == _literal_source_char_by_char(value)
