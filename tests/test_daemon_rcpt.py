"""The daemon's RCPT check remembers a thread policy's "let in" for a few seconds, never a
refusal, and still refuses blocked senders from its copy of the table."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from mailflow import daemon as daemon_mod
from mailflow.core.addresses import AddressKind, OurAddress
from mailflow.core.door import DoorDecision
from mailflow.daemon import LET_IN_SECONDS, Daemon

ADDR = OurAddress(AddressKind.REQUEST, "request-7-abcdefghjkmn@ask.example", 7, "abcdefghjkmn")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def setup(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    clock = Clock()
    monkeypatch.setattr(daemon_mod.time, "monotonic", clock)
    site = SimpleNamespace(store=None, check_recipient=lambda rcpt: DoorDecision(
        True, "250 2.1.5 Ok", ADDR if rcpt.startswith("request-") else None))
    d = Daemon(site)  # type: ignore[arg-type]
    d._blocked_read_at = clock.now  # the copy of the blocked senders is fresh
    answers: list[str | None] = []
    hops: list[tuple[str, OurAddress | None]] = []

    def refusal(mail_from: str, addr: OurAddress | None, refresh: bool) -> str | None:
        hops.append((mail_from, addr))
        return answers[0] if answers else None

    monkeypatch.setattr(d, "_rcpt_refusal", refusal)
    return d, clock, answers, hops


def rcpt(d: Daemon, sender: str, to: str = ADDR.address):  # type: ignore[no-untyped-def]
    return asyncio.run(d.check_rcpt(sender, to))


def test_a_let_in_is_reused_for_a_while_per_address_and_sender(setup) -> None:  # type: ignore[no-untyped-def]
    d, clock, answers, hops = setup
    for _ in range(5):
        assert rcpt(d, "foi@council.example").accept
    assert len(hops) == 1
    assert rcpt(d, "FOI@Council.example ").accept and len(hops) == 1   # the same sender
    assert rcpt(d, "other@council.example").accept and len(hops) == 2  # another one asks
    clock.now += LET_IN_SECONDS + 0.1
    d._blocked_read_at = clock.now
    assert rcpt(d, "foi@council.example").accept and len(hops) == 3    # expired: asks again


def test_a_refusal_is_never_reused(setup) -> None:  # type: ignore[no-untyped-def]
    d, clock, answers, hops = setup
    answers.append("550 5.7.1 This thread is closed")
    for _ in range(3):
        r = rcpt(d, "foi@council.example")
        assert not r.accept and r.reply.startswith("550")
    assert len(hops) == 3
    answers.clear()                  # an admin opened the thread again: effective at once
    assert rcpt(d, "foi@council.example").accept and len(hops) == 4


def test_blocked_senders_are_refused_even_when_let_in_before(setup) -> None:  # type: ignore[no-untyped-def]
    d, clock, answers, hops = setup
    assert rcpt(d, "spam@bad.example").accept
    d._blocked = frozenset({"@bad.example"})
    r = rcpt(d, "spam@bad.example")
    assert not r.accept and r.reply.startswith("550") and len(hops) == 1


def test_the_memory_stays_bounded(setup, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    d, clock, answers, hops = setup
    monkeypatch.setattr(daemon_mod, "LET_IN_MAX", 10)
    for i in range(25):
        assert rcpt(d, f"s{i}@council.example").accept
    assert len(d._let_in) <= 10 and len(hops) == 25
