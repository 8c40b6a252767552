"""The leak guard finds exactly what a plain substring search finds, whatever the values'
shapes (tokens, addresses, anything else), so its shortcuts never miss a private value."""
from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from mailflow.archive.writer import LeakGuard

ALPHABET = "abcde0123-_.@ XYZ"
value = st.one_of(
    st.text(alphabet="abcde0123", min_size=5, max_size=9),                     # token-shaped
    st.builds(lambda a, b: f"{a}@{b}", st.text(alphabet="abc.", min_size=1, max_size=4),
              st.text(alphabet="ab.", min_size=1, max_size=4)),                # address-shaped
    st.text(alphabet=ALPHABET, min_size=3, max_size=10))                       # anything


def naive(values: list[str], data: bytes) -> bool:
    low = data.lower()
    return any(low.find(v.strip().lower().encode()) >= 0 for v in values
               if len(v.strip().lower().encode()) >= LeakGuard.MIN_LENGTH)


@settings(max_examples=300, deadline=None)
@given(values=st.lists(value, max_size=8), text=st.text(alphabet=ALPHABET + "ABCDE", max_size=60),
       seed=st.integers(0, 2**32))
def test_the_guard_finds_exactly_the_values_a_substring_search_finds(
        values: list[str], text: str, seed: int) -> None:
    rnd = random.Random(seed)
    if values and rnd.random() < 0.5:          # plant one, sometimes in capitals
        v = rnd.choice(values)
        i = rnd.randint(0, len(text))
        text = text[:i] + (v.upper() if rnd.random() < 0.3 else v) + text[i:]
    guard = LeakGuard([(v, f"[{v}]") for v in values])
    assert (guard.find(text.encode()) is not None) == naive(values, text.encode())


def test_the_label_is_the_first_value_in_the_file_and_the_longest_there() -> None:
    guard = LeakGuard([("abcdefghjkmn", "[token]"), ("request-1-abcdefghjkmn", "[address]"),
                       ("jane@citizen.example", "[email]")])
    assert guard.find(b"to request-1-abcdefghjkmn@x from jane@citizen.example") == "[address]"
    assert guard.find(b"jane@citizen.example wrote abcdefghjkmn") == "[email]"
    assert guard.find(b"a long word: abcdefghjkmnpq") == "[token]"
    assert guard.find(b"nothing") is None


@settings(max_examples=100, deadline=None)
@given(values=st.lists(value, max_size=8),
       texts=st.lists(st.text(alphabet=ALPHABET + "ABCDE", max_size=40), min_size=2, max_size=12),
       seed=st.integers(0, 2**32))
def test_one_guard_over_many_files_finds_what_a_substring_search_finds(
        values: list[str], texts: list[str], seed: int) -> None:
    """The guard remembers the runs it found clean: that never hides a value in a later file
    (the same words recur, with and without a value in them)."""
    rnd = random.Random(seed)
    guard = LeakGuard([(v, f"[{v}]") for v in values])
    for text in texts + texts:
        if values and rnd.random() < 0.4:
            v = rnd.choice(values)
            i = rnd.randint(0, len(text))
            text = text[:i] + v + text[i:]
        assert (guard.find(text.encode()) is not None) == naive(values, text.encode())


@settings(max_examples=300, deadline=None)
@given(values=st.lists(value, max_size=8), data=st.binary(max_size=80),
       seed=st.integers(0, 2**32))
def test_the_guard_finds_values_in_any_bytes(values: list[str], data: bytes, seed: int) -> None:
    """Any bytes (an attachment, a page with control characters or 8-bit text): the runs of
    [a-z0-9] are found as a substring search would (`_RUN_BYTES` maps every other byte)."""
    rnd = random.Random(seed)
    if values and rnd.random() < 0.6:
        v = rnd.choice(values).encode()
        i = rnd.randint(0, len(data))
        data = data[:i] + (v.upper() if rnd.random() < 0.3 else v) + data[i:]
    guard = LeakGuard([(v, f"[{v}]") for v in values])
    assert (guard.find(data) is not None) == naive(values, data)
