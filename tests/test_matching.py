"""The matcher: every reply on its thread when the evidence is strong, never on a wrong one."""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mailflow.core import addresses as A
from mailflow.core.addresses import AddressKind, find_thread_addresses
from mailflow.core.matching import Decision, match, subject_core
from mailflow.core.message import ParsedMessage

D = "ask.example"
REQ, REP = AddressKind.REQUEST, AddressKind.REPLY
AUTHORITY = "foi@gov.example"


@dataclass
class FakeLookup:
    """The store as the matcher sees it, in dicts."""
    tokens: dict[int, tuple[str, str]] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)
    authority: dict[int, str] = field(default_factory=dict)
    senders: dict[str, frozenset[str]] = field(default_factory=dict)
    titles: dict[int, str] = field(default_factory=dict)
    open: set[int] = field(default_factory=set)

    def thread_tokens(self, thread_id: int) -> tuple[str, str] | None:
        return self.tokens.get(thread_id)

    def threads_for_message_ids(self, message_ids: Sequence[str]) -> dict[str, int]:
        return {m: self.sent[m] for m in message_ids if m in self.sent}

    def thread_authority(self, thread_id: int) -> str | None:
        return self.authority.get(thread_id)

    def known_senders(self, authority: str) -> frozenset[str]:
        return self.senders.get(authority, frozenset())

    def open_threads_from_domain(self, domain: str) -> list[int]:
        return sorted(t for t in self.open
                      if any(s.endswith("@" + domain)
                             for s in self.known_senders(self.authority.get(t, ""))))

    def open_thread_titles(self) -> list[tuple[int, str]]:
        return sorted((t, title) for t, title in self.titles.items() if t in self.open)


def msg(*, to: str = "", cc: str = "", frm: str = AUTHORITY, subject: str = "Your request",
        headers: Sequence[tuple[str, str]] = (), in_reply_to: Sequence[str] = (),
        references: Sequence[str] = (), received_for: Sequence[str] = (),
        raw_address_text: str = "", reply_to: Sequence[str] = ()) -> ParsedMessage:
    """A ParsedMessage as the parser makes it: header text in `headers`, parsed lists beside."""
    hs = [("From", frm), ("Subject", subject)]
    if to:
        hs.append(("To", to))
    if cc:
        hs.append(("Cc", cc))
    hs.extend(headers)
    return ParsedMessage(
        message_id="<m1@gov.example>", in_reply_to=tuple(in_reply_to),
        references=tuple(references), subject=subject, from_name="", from_addr=frm.lower(),
        reply_to=tuple(reply_to), to=(), cc=(), date=None, headers=tuple(hs), text="body",
        html=None, attachments=(), defects=(), received_for=tuple(received_for),
        raw_address_text=raw_address_text)


T5 = ("abcdefghjkmn", "pqrstvwxyz01")
T7 = ("0123456789ab", "cdefghjkmnpq")
T9 = ("zyxwvtsrqpnm", "kjhgfedcba98")


def lookup() -> FakeLookup:
    return FakeLookup(
        tokens={5: T5, 7: T7, 9: T9},
        sent={"<foi5.1@ask.example>": 5, "<foi7.1@ask.example>": 7, "<foi9.1@ask.example>": 9},
        authority={5: "camden", 7: "camden", 9: "home-office"},
        senders={"camden": frozenset({AUTHORITY}),
                 "home-office": frozenset({"foi@homeoffice.example"})},
        titles={5: "Parking fines issued in 2023", 7: "Number of street trees felled",
                9: "Immigration detention statistics"},
        open={5, 7, 9})


def req(thread_id: int, token: str, domain: str = D) -> str:
    return f"request-{thread_id}-{token}@{domain}"


def on(d: Decision) -> tuple[tuple[int, AddressKind], ...]:
    assert d.action == "thread", d.reasons
    return d.threads


def queued(d: Decision, reason: str) -> Decision:
    assert d.action == "queue" and not d.threads, d.reasons
    assert d.queue_reason == reason, d.reasons
    return d


# ------------------------------------------------------------------------------ finding

@pytest.mark.parametrize("text, thread_id, tolerated", [
    ("request-5-abcdefghjkmn@ask.example", 5, ()),
    ("REQUEST-5-ABCDEFGHJKMN@ASK.EXAMPLE", 5, ("case",)),
    ("request5-abcdefghjkmn@ask.example", 5, ("missing hyphen",)),
    ("request-5abcdefghjkmn@ask.example", 5, ("missing hyphen",)),
    ("request-123abcdefghjkmn@ask.example", 123, ("missing hyphen",)),
    ("request--5--abcdefghjkmn@ask.example", 5, ("doubled hyphen",)),
    ("request_5.abcdefghjkmn@ask.example", 5, ("other separator",)),
    ("request-5-abcdefghjkmn@old-site.example", 5, ("other domain",)),
    ("requests-5-abcdefghjkmn@ask.example", 5, ("other prefix",)),
    ("foi-request-5-abcdefghjkmn@ask.example", 5, ("other prefix",)),
    ("request+5-abcdefghjkmn@ask.example", 5, ("other separator",)),
    ("request-l23-abcdefghjkmn@ask.example", 123, ("confusable characters",)),
    ("request-5-abcdefghjkmn+x@ask.example", 5, ("sub-address",)),
    ("Jo <request-5-abcdefghjkmn@ask.example>", 5, ()),
    ('"request-5-abcdefghjkmn@ask.example" <foi@gov.example>', 5, ("in display name",)),
    ("request-5-abcdefghjkmn@ask.example <foi@gov.example>", 5, ("in display name",)),
])
def test_finds_thread_addresses_however_retyped(text: str, thread_id: int,
                                                 tolerated: tuple[str, ...]) -> None:
    [c] = find_thread_addresses(text, D)
    assert (c.kind, c.thread_id, c.token) == (REQ, thread_id, "abcdefghjkmn")
    assert c.mangling == tolerated
    assert c.exact == (not set(tolerated) - {"case", "in display name"})


def test_confusables_in_the_token_normalise() -> None:
    [c] = find_thread_addresses("reply-5-pqrstvwxyzOI@ask.example", D)
    assert c.kind is REP and c.token == "pqrstvwxyz01" and "confusable characters" in c.mangling


def test_not_candidates() -> None:
    for text in ("request-5-abcdefghjkm@ask.example",      # 11 characters
                 "request-5-abcdefghjkmnp@ask.example",    # 13
                 "request-5-abcdefghjkmu@ask.example",     # u is not in the alphabet
                 "request-0-abcdefghjkmn@ask.example",     # no thread 0
                 "myrequest-5-abcdefghjkmn@ask.example",   # a different word
                 "request-5-abcdefghjkmn", "requests@gov.example", ""):
        assert find_thread_addresses(text, D) == [], text


def test_each_distinct_address_once_in_order() -> None:
    text = (f"{req(7, T7[0])}, {req(5, T5[0])}, REQUEST-7-{T7[0].upper()}@ask.example, "
            f"reply-7-{T7[1]}@ask.example")
    found = [(c.kind, c.thread_id) for c in find_thread_addresses(text, D)]
    assert found == [(REQ, 7), (REQ, 5), (REP, 7)]


def test_huge_text_is_capped() -> None:
    text = "x" * (A.SCAN_LIMIT + 10) + req(5, T5[0])
    assert find_thread_addresses(text, D) == []
    # Adversarial repetition is still found (its speed belongs in a benchmark, not a test).
    assert find_thread_addresses("request-" * 20_000 + req(5, T5[0]), D)[0].thread_id == 5
    assert find_thread_addresses("request-1-" * 15_000 + "x", D) == []


# ------------------------------------------------------------------------------ verified addresses

def test_verified_request_address_threads_on_the_authority_side() -> None:
    d = match(msg(to=f"FOI <{req(5, T5[0])}>"), lookup(), domain=D)
    assert on(d) == ((5, REQ),)
    assert d.evidence[0].method == "reply_address" and d.evidence[0].verified
    assert d.evidence[0].strong and d.evidence[0].source == "To"


def test_verified_reply_address_threads_on_the_citizen_side() -> None:
    d = match(msg(to=f"reply-5-{T5[1]}@ask.example", frm="jane@citizen.example"), lookup(), domain=D)
    assert on(d) == ((5, REP),)


@pytest.mark.parametrize("to", [
    f"request5-{T5[0]}@ask.example", f"request-5{T5[0]}@ask.example",
    f"request--5--{T5[0]}@ask.example", f"REQUEST-5-{T5[0].upper()}@ASK.EXAMPLE",
    f"request-5-{T5[0]}@whatdotheyknow.example", "request-5-abcdefghjkmn@ask.exmaple",
    f'"{req(5, T5[0])}" <{AUTHORITY}>',
])
def test_tolerated_manglings_still_verify(to: str) -> None:
    d = match(msg(to=to), lookup(), domain=D)
    assert on(d) == ((5, REQ),)
    assert "tolerated" in d.evidence[0].detail or to == f'"{req(5, T5[0])}" <{AUTHORITY}>'


def test_confusables_in_id_and_token_verify() -> None:
    lk = lookup()
    lk.tokens[101] = ("a1b0cdefghjk", "mnpqrstvwxyz")
    d = match(msg(to="request-lOI-aLbOcdefghjk@ask.example"), lk, domain=D)
    assert on(d) == ((101, REQ),)
    assert "confusable characters" in d.evidence[0].detail


def test_address_pasted_into_the_display_name_is_found() -> None:
    d = match(msg(to=f'"{req(5, T5[0])}" <{AUTHORITY}>'), lookup(), domain=D)
    assert on(d) == ((5, REQ),)
    assert "in display name" in d.evidence[0].detail


def test_detail_never_shows_the_token() -> None:
    d = match(msg(to=req(5, T5[0]), cc=req(7, "zzzzzzzzzzzz")), lookup(), domain=D)
    for text in (*d.reasons, *(e.detail for e in d.evidence), *(s.reason for s in d.suggestions)):
        assert T5[0][:4] not in text and "zzzz" not in text
    assert any("request-5-abc…" in r for r in d.reasons)


def test_two_verified_request_addresses_land_on_both_threads() -> None:
    d = match(msg(to=f"{req(5, T5[0])}, {req(7, T7[0])}"), lookup(), domain=D)
    assert on(d) == ((5, REQ), (7, REQ))


def test_the_same_address_in_many_places_lands_once() -> None:
    a = req(5, T5[0])
    d = match(msg(to=a, cc=a.upper(), headers=[("Delivered-To", a)], received_for=[a]),
              lookup(), domain=D, envelope_rcpts=[a])
    assert on(d) == ((5, REQ),)
    assert [e.source for e in d.evidence] == ["envelope recipient", "Delivered-To", "To", "Cc",
                                              "Received for"]


def test_bcc_reply_found_only_through_received_for() -> None:
    m = msg(to="someone@gov.example", received_for=[req(5, T5[0])],
            headers=[("Received", f"from x by mx.ask.example for <{req(5, T5[0])}>; date")])
    d = match(m, lookup(), domain=D)
    assert on(d) == ((5, REQ),)
    assert d.evidence[0].source == "Received for"


def test_malformed_to_found_in_raw_address_text() -> None:
    m = msg(raw_address_text=f"To: FOI team <<{req(5, T5[0])}>,,, \"unclosed")
    d = match(m, lookup(), domain=D)
    assert on(d) == ((5, REQ),)
    assert d.evidence[0].source == "raw address text"


def test_from_reply_to_and_sender_are_never_evidence() -> None:
    a = req(5, T5[0])
    m = msg(frm=a, reply_to=[a], headers=[("Reply-To", a), ("Sender", a)], subject="hello")
    d = match(m, lookup(), domain=D)
    assert d.action == "none" and d.evidence == () and not d.names_us


def test_both_sides_of_one_thread_is_a_conflict() -> None:
    d = match(msg(to=req(5, T5[0]), cc=f"reply-5-{T5[1]}@ask.example"), lookup(), domain=D)
    queued(d, "conflict")


# ------------------------------------------------------------------------------ wrong tokens

def test_wrong_token_goes_to_the_queue_never_the_thread() -> None:
    d = match(msg(to=req(5, "abcdefghjkmp")), lookup(), domain=D)
    queued(d, "bad_token")
    assert d.suggestions[0].thread_id == 5 and d.suggestions[0].score == 0.9
    assert "token is wrong" in d.suggestions[0].reason
    assert not d.evidence[0].verified and "wrong" in d.evidence[0].detail


def test_the_other_sides_token_does_not_verify() -> None:
    queued(match(msg(to=req(5, T5[1])), lookup(), domain=D), "bad_token")


def test_unknown_thread_is_no_evidence_but_names_us() -> None:
    d = match(msg(to=req(55, T5[0])), lookup(), domain=D)
    queued(d, "no_evidence")
    assert d.names_us and "no such thread" in d.evidence[0].detail


def test_wrong_token_delivered_by_a_server_blocks_a_verified_address() -> None:
    m = msg(to=req(5, T5[0]), headers=[("Delivered-To", req(7, "abcdefghjkmp"))])
    queued(match(m, lookup(), domain=D), "bad_token")
    m = msg(to=req(5, T5[0]))
    d = match(m, lookup(), domain=D, envelope_rcpts=[req(5, T5[0]), req(7, "abcdefghjkmp")])
    queued(d, "bad_token")


def test_wrong_token_merely_quoted_beside_a_verified_one_is_recorded() -> None:
    d = match(msg(to=req(5, T5[0]), cc=req(7, "abcdefghjkmp")), lookup(), domain=D)
    assert on(d) == ((5, REQ),)
    assert any(e.thread_id == 7 and not e.verified for e in d.evidence)


# ------------------------------------------------------------------------------ envelope

def test_the_envelope_recipient_decides() -> None:
    m = msg(to=f"{req(5, T5[0])}, {req(7, T7[0])}")
    d = match(m, lookup(), domain=D, envelope_rcpts=[req(7, T7[0])])
    assert on(d) == ((7, REQ),)
    assert {e.thread_id for e in d.evidence if e.verified} == {5, 7}


def test_envelope_without_our_thread_and_a_verified_header_is_a_conflict() -> None:
    d = match(msg(to=req(5, T5[0])), lookup(), domain=D, envelope_rcpts=["camden@ask.example"])
    queued(d, "conflict")
    assert d.suggestions[0].thread_id == 5


# ------------------------------------------------------------------------------ Message-IDs

def test_in_reply_to_our_message_threads_without_an_address() -> None:
    d = match(msg(to=AUTHORITY, in_reply_to=["<foi5.1@ask.example>"]), lookup(), domain=D)
    assert on(d) == ((5, REQ),)
    assert d.evidence[0].method == "in_reply_to" and d.evidence[0].strong


def test_references_alone_thread() -> None:
    m = msg(references=["<other@x.example>", "<foi9.1@ask.example>"])
    assert on(match(m, lookup(), domain=D)) == ((9, REQ),)


def test_message_ids_of_several_threads_are_a_conflict() -> None:
    m = msg(in_reply_to=["<foi5.1@ask.example>"], references=["<foi7.1@ask.example>"])
    d = queued(match(m, lookup(), domain=D), "conflict")
    assert {s.thread_id for s in d.suggestions} >= {5, 7}


def test_in_reply_to_conflicting_with_the_address_is_queued() -> None:
    m = msg(to=req(5, T5[0]), in_reply_to=["<foi7.1@ask.example>"])
    d = queued(match(m, lookup(), domain=D), "conflict")
    assert [s.thread_id for s in d.suggestions][:2] == [5, 7]


def test_in_reply_to_agreeing_with_the_address_threads() -> None:
    m = msg(to=req(5, T5[0]), in_reply_to=["<foi5.1@ask.example>"])
    assert on(match(m, lookup(), domain=D)) == ((5, REQ),)


# ------------------------------------------------------------------------------ subject tag

def test_subject_tag_and_known_sender_threads() -> None:
    m = msg(subject="Re: Freedom of Information request - Parking [ foi # 5 ]")
    d = match(m, lookup(), domain=D)
    assert on(d) == ((5, REQ),)
    assert d.evidence[0].method == "subject_tag" and d.evidence[0].strong


def test_subject_tag_and_unknown_sender_is_a_suggestion() -> None:
    m = msg(frm="someone@elsewhere.example", subject="Re: something [FOI #5]")
    d = queued(match(m, lookup(), domain=D), "weak_evidence")
    assert d.suggestions[0].thread_id == 5 and d.suggestions[0].score == 0.7
    assert d.names_us


def test_subject_tag_of_another_thread_from_a_known_sender_conflicts_with_the_address() -> None:
    m = msg(to=req(5, T5[0]), subject="Re: [FOI #7]")
    queued(match(m, lookup(), domain=D), "conflict")


def test_subject_tag_for_no_thread_names_nothing() -> None:
    d = match(msg(subject="[FOI #404]"), lookup(), domain=D)
    assert d.action == "none" and any("names no thread" in r for r in d.reasons)


def test_the_subject_tag_word_is_configurable() -> None:
    m = msg(subject="Re: [EIR #5]")
    assert on(match(m, lookup(), domain=D, subject_tag="EIR")) == ((5, REQ),)
    assert match(m, lookup(), domain=D).action == "none"


# ------------------------------------------------------------------------------ weak evidence

def test_single_open_thread_at_the_sender_domain_is_only_a_suggestion() -> None:
    d = queued(match(msg(frm="foi@homeoffice.example", subject="hello"), lookup(), domain=D),
               "weak_evidence")
    assert [(s.thread_id, s.score) for s in d.suggestions] == [(9, 0.5)]
    assert not d.names_us


def test_several_open_threads_at_the_domain_suggest_nothing() -> None:
    d = match(msg(frm="other@gov.example", subject="hello"), lookup(), domain=D)
    assert d.action == "none" and any("2 open threads" in r for r in d.reasons)


def test_similar_subject_is_a_ranked_suggestion() -> None:
    m = msg(frm="x@unknown.example",
            subject="RE: Fwd: Freedom of Information request - Parking fines issued 2023")
    d = queued(match(m, lookup(), domain=D), "weak_evidence")
    assert d.suggestions[0].thread_id == 5 and 0.48 <= d.suggestions[0].score <= 0.8
    assert "similar" in d.suggestions[0].reason


def test_subject_core_strips_what_every_thread_shares() -> None:
    assert subject_core("Re: FW: Freedom of Information request - Trees [FOI #7]") == "trees"


def test_nothing_names_us() -> None:
    d = match(msg(to="someone@gov.example", subject="Lunch?", frm="a@b.example"), lookup(), domain=D)
    assert d.action == "none" and d.queue_reason is None and d.suggestions == ()


def test_weak_evidence_is_not_asked_for_when_strong_evidence_decides() -> None:
    class Strict(FakeLookup):
        def open_thread_titles(self) -> list[tuple[int, str]]:
            raise AssertionError("not needed")
    lk = Strict(**{f: getattr(lookup(), f) for f in ("tokens", "sent", "authority", "senders")})
    assert on(match(msg(to=req(5, T5[0])), lk, domain=D)) == ((5, REQ),)


def test_too_many_addresses_are_queued() -> None:
    lk = lookup()
    to = ", ".join(req(i, "abcdefghjkmn") for i in range(1000, 1200))
    queued(match(msg(to=to), lk, domain=D), "conflict")


# ------------------------------------------------------------------------------ properties

_tokens = st.text(A.TOKEN_ALPHABET, min_size=12, max_size=12)
_CONFUSE = {"1": "lIiL", "0": "oO"}


@st.composite
def _store(draw: st.DrawFn) -> FakeLookup:
    ids = draw(st.lists(st.integers(1, 5000), min_size=2, max_size=40, unique=True))
    return FakeLookup(tokens={i: (draw(_tokens), draw(_tokens)) for i in ids})


@st.composite
def _mangled(draw: st.DrawFn, kind: AddressKind, thread_id: int, token: str) -> str:
    """The address as a person or a mail client might have retyped and wrapped it."""
    rnd = random.Random(draw(st.integers(0, 2**32)))
    prefix = kind.value if not draw(st.booleans()) else rnd.choice(
        ["requests", "req", "foi-request", "foi_request"] if kind is REQ else ["replies"])

    def confuse(s: str) -> str:
        if not draw(st.booleans()):
            return s
        return "".join(rnd.choice(_CONFUSE[ch]) if ch in _CONFUSE and rnd.random() < 0.5 else ch
                       for ch in s)

    def sep() -> str:
        return draw(st.sampled_from(["-", "", "--", "_", ".", "-_", "+"]))

    local = f"{prefix}{sep()}{confuse(str(thread_id))}{sep()}{confuse(token)}"
    domain = draw(st.sampled_from([D, "ASK.example", "old.ask.example", "ask.exampel", "x.org"]))
    addr = f"{local}@{domain}"
    if draw(st.booleans()):
        addr = "".join(ch.upper() if rnd.random() < 0.5 else ch for ch in addr)
    wrapper = draw(st.sampled_from(["{}", "<{}>", '"{}"', "Name <{}>", '"{}" <foi@gov.example>',
                                    "{} <foi@gov.example>", "a@b.example, {}", "mailto:{}",
                                    '"Jo, FOI" <{}>, x@y.example']))
    return wrapper.format(addr)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), store=_store(), use_reply=st.booleans(),
       header=st.sampled_from(["To", "Cc", "Delivered-To", "raw"]))
def test_mangled_addresses_map_to_their_thread_or_none_never_another(
        data: st.DataObject, store: FakeLookup, use_reply: bool, header: str) -> None:
    thread_id = data.draw(st.sampled_from(sorted(store.tokens)))
    kind = REP if use_reply else REQ
    token = store.tokens[thread_id][1 if use_reply else 0]
    text = data.draw(_mangled(kind, thread_id, token))
    m = msg(raw_address_text=text) if header == "raw" else msg(headers=[(header, text)])
    d = match(m, store, domain=D)
    assert d.action in ("thread", "queue", "none")
    if d.action == "thread":
        assert d.threads == ((thread_id, kind),)
    assert all(s.thread_id == thread_id for s in d.suggestions)
    assert all(e.thread_id == thread_id for e in d.evidence)
    # And these manglings are all ones the matcher promises to tolerate:
    assert d.threads == ((thread_id, kind),), (text, d.reasons)


@settings(max_examples=400, deadline=None)
@given(store=_store(), data=st.data())
def test_a_single_changed_token_character_never_verifies(store: FakeLookup,
                                                         data: st.DataObject) -> None:
    thread_id = data.draw(st.sampled_from(sorted(store.tokens)))
    token = store.tokens[thread_id][0]
    pos = data.draw(st.integers(0, A.TOKEN_LENGTH - 1))
    new = data.draw(st.sampled_from("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    assume(A.normalise_token(new) != token[pos])
    changed = token[:pos] + new + token[pos + 1:]
    assert not A.token_matches(changed, token)
    d = match(msg(to=req(thread_id, changed)), store, domain=D)
    assert d.action != "thread"
    assert not any(e.verified for e in d.evidence)


@settings(max_examples=200, deadline=None)
@given(store=_store(), data=st.data())
def test_another_threads_id_never_verifies(store: FakeLookup, data: st.DataObject) -> None:
    a, b = data.draw(st.lists(st.sampled_from(sorted(store.tokens)), min_size=2, max_size=2,
                              unique=True))
    assume(store.tokens[a][0] != store.tokens[b][0])
    d = match(msg(to=req(b, store.tokens[a][0])), store, domain=D)
    assert d.action == "queue" and d.queue_reason == "bad_token"


_addressy = st.text(alphabet="requstply-_.+@<>\"', 0123456789abcdefghjkmnILOoi\n", max_size=300)


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.text(max_size=400), _addressy))
def test_finding_never_raises(text: str) -> None:
    for c in find_thread_addresses(text, D):
        assert len(c.token) == A.TOKEN_LENGTH and set(c.token) <= set(A.TOKEN_ALPHABET)
        assert c.thread_id >= 1


@settings(max_examples=150, deadline=None)
@given(to=_addressy, subject=st.text(max_size=120), raw=st.text(max_size=120),
       ids=st.lists(st.text(max_size=20), max_size=3))
def test_match_never_raises(to: str, subject: str, raw: str, ids: list[str]) -> None:
    m = replace(msg(to=to, subject=subject, raw_address_text=raw), in_reply_to=tuple(ids))
    d = match(m, lookup(), domain=D, envelope_rcpts=[to[:40]])
    assert d.action in ("thread", "queue", "none")
