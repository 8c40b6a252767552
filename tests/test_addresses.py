"""The address scheme: tokens, recognising our addresses, the decision at the door."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mailflow.core import addresses as A
from mailflow.core.addresses import AddressKind
from mailflow.core.door import check_recipient

SLUGS = frozenset({"camden", "home-office"})
D = "ask.example"


def test_tokens_use_the_unambiguous_alphabet() -> None:
    for _ in range(200):
        t = A.new_token()
        assert len(t) == A.TOKEN_LENGTH and set(t) <= set(A.TOKEN_ALPHABET)
        assert not set(t) & set("ilou")


def test_parse_thread_addresses_any_case_and_brackets() -> None:
    a = A.parse_ours("<Request-12-AbCdEf012345@ASK.example>", D, SLUGS)
    assert a is not None and a.kind is AddressKind.REQUEST
    assert a.thread_id == 12 and a.token == "abcdef012345"
    r = A.parse_ours("reply-3-0123456789ab@ask.example", D, SLUGS)
    assert r is not None and r.kind is AddressKind.REPLY and r.thread_id == 3


def test_retyped_confusables_map_back_to_the_token() -> None:
    a = A.parse_ours("request-12-abcdefIO1234@ask.example", D, SLUGS)
    assert a is not None and A.token_matches(a.token, "abcdef101234")


def test_wrong_token_does_not_match() -> None:
    assert not A.token_matches("abcdef012345", "abcdef012346")
    assert not A.token_matches(None, "abcdef012346")


def test_slugs_roles_and_strangers() -> None:
    assert A.parse_ours("camden@ask.example", D, SLUGS).kind is AddressKind.AUTHORITY  # type: ignore[union-attr]
    assert A.parse_ours("Camden+foo@ask.example", D, SLUGS).slug == "camden"  # type: ignore[union-attr]
    assert A.parse_ours("postmaster@ask.example", D, SLUGS).kind is AddressKind.ROLE  # type: ignore[union-attr]
    assert A.parse_ours("nobody@ask.example", D, SLUGS) is None
    assert A.parse_ours("camden@other.example", D, SLUGS) is None
    assert A.parse_ours("request-1-abcdabcdabcd@ask.example.evil", D, SLUGS) is None


def test_door_refuses_unknown_local_with_a_pointer_and_foreign_as_relay() -> None:
    unknown = check_recipient("nobody@ask.example", domain=D, slugs=SLUGS,
                              site_url="https://ask.example/")
    assert not unknown.accept and unknown.reply.startswith("550 5.1.1")
    assert "https://ask.example/body/" in unknown.reply
    relay = check_recipient("victim@gmail.example", domain=D, slugs=SLUGS, site_url="x")
    assert not relay.accept and relay.reply.startswith("550 5.7.1")
    bad = check_recipient("a\r\nb@ask.example", domain=D, slugs=SLUGS, site_url="x")
    assert not bad.accept and bad.reply.startswith("501")
    ok = check_recipient("camden@ask.example", domain=D, slugs=SLUGS, site_url="x")
    assert ok.accept and ok.address is not None


@given(thread_id=st.integers(1, 10**9), token=st.text(A.TOKEN_ALPHABET, min_size=12, max_size=12),
       upper=st.booleans())
def test_made_addresses_parse_back(thread_id: int, token: str, upper: bool) -> None:
    addr = A.thread_address(AddressKind.REQUEST, thread_id, token, D)
    a = A.parse_ours(addr.upper() if upper else addr, D, SLUGS)
    assert a is not None and a.thread_id == thread_id and A.token_matches(a.token, token)


@given(st.text(max_size=80))
def test_arbitrary_text_never_raises(s: str) -> None:
    A.parse_ours(s, D, SLUGS)
    check_recipient(s, domain=D, slugs=SLUGS, site_url="x")


def test_door_accepts_retyped_thread_addresses() -> None:
    d = check_recipient("request12abcdefghjkmn@ask.example", domain=D, slugs=SLUGS, site_url="x")
    assert d.accept and d.address is not None and d.address.thread_id == 12
    assert d.address.kind is AddressKind.REQUEST


# -- fault reports -----------------------------------------------------------------------------
def test_report_addresses_and_their_category_tag() -> None:
    a = A.parse_ours("report@ask.example", D, SLUGS)
    assert a is not None and a.kind is AddressKind.REPORT and a.slug is None
    t = A.parse_ours("Report+Pothole@ASK.example", D, SLUGS)
    assert t is not None and t.kind is AddressKind.REPORT and t.slug == "pothole"
    assert t.address == "report+pothole@ask.example"


def test_a_reports_authority_side_address_is_a_request_address() -> None:
    addr = A.report_address(7, "abcdef012345", D)
    assert addr == "report-7-abcdef012345@ask.example"
    a = A.parse_ours(addr.upper(), D, SLUGS)
    assert a is not None and a.kind is AddressKind.REQUEST and a.thread_id == 7
    assert A.token_matches(a.token, "abcdef012345")
    # found however it is retyped, like request- addresses, and always as the authority side
    for text in (f"Re: <{addr}>", "REPORT-7-ABCDEF012345@ask.example",
                 "report7abcdef012345@ask.example", "report--7--abcdefo12345@old.example",
                 "reports-7-abcdef012345@ask.example"):
        (c,) = A.find_thread_addresses(text, D)
        assert (c.kind, c.thread_id, c.token) == (AddressKind.REQUEST, 7, "abcdef012345"), text
    (c,) = A.find_thread_addresses(f"To: {addr}", D)
    assert c.exact and c.mangling == ()


def test_report_is_not_an_authority_slug() -> None:
    assert not A.valid_slug("report") and not A.valid_slug("report-7")
    assert A.valid_slug("reporting-unit") and A.valid_slug("camden")


def test_the_door_opens_report_only_on_a_site_with_categories() -> None:
    for addr in ("report@ask.example", "report+pothole@ask.example"):
        no = check_recipient(addr, domain=D, slugs=SLUGS, site_url="x")
        assert not no.accept and no.reply.startswith("550 5.1.1") and "fault reports" in no.reply
        yes = check_recipient(addr, domain=D, slugs=SLUGS, site_url="x", reports=True)
        assert yes.accept and yes.address is not None
        assert yes.address.kind is AddressKind.REPORT
    # A report's thread address is a thread address either way: its token decides, later.
    d = check_recipient("report-7-abcdef012345@ask.example", domain=D, slugs=SLUGS, site_url="x")
    assert d.accept and d.address is not None and d.address.kind is AddressKind.REQUEST
