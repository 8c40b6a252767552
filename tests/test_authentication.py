"""DKIM, SPF and DMARC, each on its own and together, against a stub resolver: no test here
asks real DNS. SPF follows RFC 7208 check_host (mechanisms, include and redirect, the lookup
and void-lookup limits, temperror and permerror); DMARC RFC 7489 policy discovery and
alignment; DKIM is real dkimpy with a key made by the test and published in the stub."""
from __future__ import annotations

import base64
import ipaddress
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailflow.core import authentication as AU
from mailflow.core.authentication import (DkimResult, DmarcLookup, DmarcRecord, SpfResult,
                                          aligned, client_from_received, envelope_matches,
                                          evaluate, hold_reason, organizational_domain,
                                          parse_dmarc)
from mailflow.mail.authenticate import (DnsResolver, StubResolver,
                                        authenticate, check_dkim, check_spf, client_address,
                                        lookup_dmarc, trusted_networks)

GOV = "camden.gov.example"


def spf(records: dict[str, dict], ip: str, sender: str = f"foi@{GOV}",
        fail: tuple[str, ...] = ()) -> SpfResult:
    return check_spf(ip, sender, "mx.sender.example", StubResolver(records, fail=fail))


# -- SPF: each mechanism ----------------------------------------------------------------------
@pytest.mark.parametrize("record, ip, expected", [
    ("v=spf1 ip4:192.0.2.0/24 -all", "192.0.2.77", "pass"),
    ("v=spf1 ip4:192.0.2.0/24 -all", "192.0.3.1", "fail"),
    ("v=spf1 ip4:192.0.2.5 -all", "192.0.2.5", "pass"),
    ("v=spf1 ip6:2001:db8:1::/48 -all", "2001:db8:1::25", "pass"),
    ("v=spf1 ip6:2001:db8:1::/48 -all", "2001:db8:2::25", "fail"),
    ("v=spf1 ip4:192.0.2.0/24 -all", "2001:db8::1", "fail"),          # v6 client, v4 net
    ("v=spf1 ip4:192.0.2.0/24 -all", "::ffff:192.0.2.9", "pass"),     # v4-mapped client
    ("v=spf1 a -all", "198.51.100.10", "pass"),
    ("v=spf1 a:web.camden.gov.example -all", "203.0.113.4", "pass"),
    ("v=spf1 a/24 -all", "198.51.100.99", "pass"),
    ("v=spf1 a -all", "198.51.100.99", "fail"),
    ("v=spf1 a//64 -all", "2001:db8:5::77", "pass"),
    ("v=spf1 mx -all", "198.51.100.25", "pass"),
    ("v=spf1 mx:camden.gov.example/30 -all", "198.51.100.26", "pass"),
    ("v=spf1 mx -all", "198.51.100.30", "fail"),
    ("v=spf1 exists:%{i}.allow.camden.gov.example -all", "192.0.2.1", "pass"),
    ("v=spf1 exists:%{i}.allow.camden.gov.example -all", "192.0.2.2", "fail"),
    ("v=spf1 ~all", "192.0.2.1", "softfail"),
    ("v=spf1 ?all", "192.0.2.1", "neutral"),
    ("v=spf1 +all", "192.0.2.1", "pass"),
    ("v=spf1 ip4:10.0.0.0/8", "192.0.2.1", "neutral"),                 # nothing matched
    ("v=spf1 -ip4:192.0.2.1 +all", "192.0.2.1", "fail"),               # first match wins
    ("v=spf1 ptr -all", "192.0.2.1", "fail"),                          # ptr never matches
])
def test_spf_mechanisms(record: str, ip: str, expected: str) -> None:
    records = {
        GOV: {"TXT": [record], "A": ["198.51.100.10"], "AAAA": ["2001:db8:5::1"],
              "MX": [(10, f"mx1.{GOV}"), (20, f"mx2.{GOV}")]},
        f"web.{GOV}": {"A": ["203.0.113.4"]},
        f"mx1.{GOV}": {"A": ["198.51.100.25"]},
        f"mx2.{GOV}": {"A": ["198.51.100.26"]},
        f"192.0.2.1.allow.{GOV}": {"A": ["127.0.0.2"]},
    }
    r = spf(records, ip)
    assert r.result == expected, r
    assert r.domain == GOV and r.mailfrom == f"foi@{GOV}" and r.ip is not None


def test_spf_none_without_a_record_or_for_a_domain_that_does_not_exist() -> None:
    assert spf({GOV: {"TXT": ["some other text"]}}, "192.0.2.1").result == "none"
    assert spf({}, "192.0.2.1").result == "none"
    assert spf({}, "192.0.2.1", sender="foi@localhost").result == "none"   # not multi-label


def test_spf_without_a_client_address_is_none_not_a_pass() -> None:
    r = check_spf(None, f"foi@{GOV}", None, StubResolver({GOV: {"TXT": ["v=spf1 +all"]}}),
                  "taken in by imap")
    assert r.result == "none" and r.reason == "taken in by imap" and r.domain == GOV


def test_spf_null_sender_checks_the_helo_name() -> None:
    r = check_spf("192.0.2.1", "", "mx.camden.gov.example",
                  StubResolver({"mx.camden.gov.example": {"TXT": ["v=spf1 ip4:192.0.2.1 -all"]}}))
    assert (r.result, r.identity, r.mailfrom) == ("pass", "helo",
                                                  "postmaster@mx.camden.gov.example")


def test_spf_include_and_redirect() -> None:
    records = {
        GOV: {"TXT": ["v=spf1 include:_spf.mailhost.example include:_spf.other.example -all"]},
        "_spf.mailhost.example": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]},
        "_spf.other.example": {"TXT": ["v=spf1 ip4:198.51.100.0/24 ~all"]},
        "lambeth.gov.example": {"TXT": ["v=spf1 redirect=_spf.lambeth.gov.example"]},
        "_spf.lambeth.gov.example": {"TXT": ["v=spf1 ip4:203.0.113.0/24 -all"]},
    }
    assert spf(records, "192.0.2.9").result == "pass"
    assert spf(records, "198.51.100.9").result == "pass"
    # An include's fail or softfail is "no match": the outer record's -all decides.
    assert spf(records, "203.0.113.1").result == "fail"
    assert spf(records, "203.0.113.1", sender="foi@lambeth.gov.example").result == "pass"
    assert spf(records, "192.0.2.9", sender="foi@lambeth.gov.example").result == "fail"


def test_spf_redirect_is_ignored_when_there_is_an_all() -> None:
    records = {GOV: {"TXT": ["v=spf1 ?all redirect=_spf.x.example"]},
               "_spf.x.example": {"TXT": ["v=spf1 -all"]}}
    assert spf(records, "192.0.2.1").result == "neutral"


def test_spf_include_or_redirect_of_a_domain_without_spf_is_permerror() -> None:
    assert spf({GOV: {"TXT": ["v=spf1 include:nothing.example -all"]}},
               "192.0.2.1").result == "permerror"
    assert spf({GOV: {"TXT": ["v=spf1 redirect=nothing.example"]}},
               "192.0.2.1").result == "permerror"


def test_spf_include_permerror_and_temperror_propagate() -> None:
    records = {GOV: {"TXT": ["v=spf1 include:broken.example -all"]},
               "broken.example": {"TXT": ["v=spf1 ip4:999.1.1.1 -all"]}}
    assert spf(records, "192.0.2.1").result == "permerror"
    records["broken.example"] = {"TXT": ["v=spf1 a:down.example -all"]}
    assert spf(records, "192.0.2.1", fail=("down.example",)).result == "temperror"


def test_spf_more_than_ten_lookups_is_permerror() -> None:
    records: dict[str, dict] = {GOV: {"TXT": ["v=spf1 include:l1.example -all"]}}
    for n in range(1, 12):
        records[f"l{n}.example"] = {"TXT": [f"v=spf1 include:l{n + 1}.example -all"]}
    records["l12.example"] = {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]}
    r = spf(records, "192.0.2.1")
    assert r.result == "permerror" and "more than 10 DNS lookups" in r.reason
    # Exactly ten is allowed.
    records = {GOV: {"TXT": ["v=spf1 " + " ".join(f"a:h{n}.example" for n in range(9))
                             + " include:last.example -all"]},
               "last.example": {"TXT": ["v=spf1 ip4:192.0.2.1 -all"]},
               **{f"h{n}.example": {"A": ["203.0.113.1"]} for n in range(9)}}
    assert spf(records, "192.0.2.1").result == "pass"


def test_spf_ip_mechanisms_and_all_need_no_lookup() -> None:
    record = "v=spf1 " + " ".join(f"ip4:10.0.{n}.0/24" for n in range(40)) + " ip4:192.0.2.1 -all"
    stub = StubResolver({GOV: {"TXT": [record]}})
    assert check_spf("192.0.2.1", f"foi@{GOV}", None, stub).result == "pass"
    assert stub.queries == [("TXT", GOV)]


def test_spf_more_than_two_void_lookups_is_permerror() -> None:
    record = "v=spf1 a:v1.example a:v2.example a:v3.example ip4:192.0.2.1 -all"
    r = spf({GOV: {"TXT": [record]}}, "192.0.2.1")
    assert r.result == "permerror" and "void" in r.reason
    two = "v=spf1 a:v1.example a:v2.example ip4:192.0.2.1 -all"
    assert spf({GOV: {"TXT": [two]}}, "192.0.2.1").result == "pass"


def test_spf_an_mx_naming_more_than_ten_servers_is_permerror() -> None:
    records = {GOV: {"TXT": ["v=spf1 mx -all"],
                     "MX": [(n, f"mx{n}.{GOV}") for n in range(11)]}}
    assert spf(records, "192.0.2.1").result == "permerror"


def test_spf_dns_failure_is_temperror_never_a_pass() -> None:
    assert spf({GOV: {"TXT": ["v=spf1 +all"]}}, "192.0.2.1", fail=(GOV,)).result == "temperror"
    records = {GOV: {"TXT": ["v=spf1 a:down.example +all"]}}
    assert spf(records, "192.0.2.1", fail=("down.example/A",)).result == "temperror"
    records = {GOV: {"TXT": ["v=spf1 mx -all"], "MX": [(10, "mx.down.example")]}}
    assert spf(records, "192.0.2.1", fail=("mx.down.example",)).result == "temperror"


@pytest.mark.parametrize("record", [
    "v=spf1 ip4:192.0.2.300 -all",         # not an address
    "v=spf1 ip4:192.0.2.0/33 -all",        # prefix too long
    "v=spf1 ip6:192.0.2.1 -all",           # v4 address in ip6
    "v=spf1 foo:bar -all",                 # unknown mechanism
    "v=spf1 include -all",                 # include without a domain
    "v=spf1 all:x",                        # all with an argument
    "v=spf1 a:%{z}.example -all",          # unknown macro letter
    "v=spf1 exists:%{i -all",              # unterminated macro
    "v=spf1 redirect=a.example redirect=b.example",
    "v=spf1 -all ip4:bad",                 # a syntax error after the match still counts
    "v=spf1 ~~all",
])
def test_spf_syntax_errors_are_permerror(record: str) -> None:
    assert spf({GOV: {"TXT": [record]}}, "192.0.2.1").result == "permerror", record


def test_spf_two_records_are_permerror() -> None:
    assert spf({GOV: {"TXT": ["v=spf1 -all", "v=spf1 +all"]}},
               "192.0.2.1").result == "permerror"


def test_spf_macros() -> None:
    records = {GOV: {"TXT": ["v=spf1 exists:%{ir}.%{v}._spf.%{d} -all"]},
               f"foi.{GOV}._spf.gov.example": {"A": ["127.0.0.2"]},
               f"1.2.0.192.in-addr._spf.{GOV}": {"A": ["127.0.0.2"]},
               f"1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6._spf.{GOV}":
                   {"A": ["127.0.0.2"]}}
    assert spf(records, "192.0.2.1").result == "pass"
    assert spf(records, "203.0.113.1").result == "fail"
    assert spf(records, "2001:db8::1").result == "pass"
    records[GOV]["TXT"] = ["v=spf1 exists:%{l}.%{o}._spf.%{d2} -all"]
    assert spf(records, "203.0.113.1").result == "pass"
    assert spf(records, "203.0.113.1", sender=f"other@{GOV}").result == "fail"


# -- DMARC ------------------------------------------------------------------------------------
def test_dmarc_record_parsing() -> None:
    r = parse_dmarc("v=DMARC1; p=quarantine; sp=reject; adkim=s; aspf=r; pct=50; "
                    "rua=mailto:d@x.example", GOV)
    assert r == DmarcRecord(GOV, "quarantine", "reject", "s", "r", 50)
    assert parse_dmarc("v=DMARC1; p=bogus; rua=mailto:x@y.example", GOV).p == "none"
    for bad in ("v=DMARC1; p=bogus", "v=DMARC1", "p=reject; v=DMARC1", "v=DMARC1; junk"):
        with pytest.raises(ValueError):
            parse_dmarc(bad, GOV)


def test_dmarc_policy_discovery_at_the_from_domain() -> None:
    stub = StubResolver({f"_dmarc.{GOV}": {"TXT": ["v=spf1 -all", "v=DMARC1; p=reject"]}})
    found = lookup_dmarc(GOV, stub)
    assert found.record is not None and found.record.p == "reject"
    assert found.record.domain == GOV


def test_dmarc_falls_back_to_the_organizational_domain() -> None:
    stub = StubResolver({"_dmarc.camden.gov.uk": {"TXT": ["v=DMARC1; p=none; sp=quarantine"]}})
    found = lookup_dmarc("mail.camden.gov.uk", stub)
    assert found.record is not None and found.record.domain == "camden.gov.uk"
    assert stub.queries == [("TXT", "_dmarc.mail.camden.gov.uk"), ("TXT", "_dmarc.camden.gov.uk")]
    # The subdomain policy applies to the subdomain, the main one to the domain itself.
    auth = evaluate("mail.camden.gov.uk", SpfResult("none"), (), found)
    assert (auth.dmarc.result, auth.dmarc.policy) == ("fail", "quarantine")
    auth = evaluate("camden.gov.uk", SpfResult("none"), (), lookup_dmarc("camden.gov.uk", stub))
    assert auth.dmarc.policy == "none"


def test_dmarc_none_temperror_and_permerror() -> None:
    assert lookup_dmarc(GOV, StubResolver()).record is None
    assert lookup_dmarc(GOV, StubResolver()).error is None
    assert lookup_dmarc(GOV, StubResolver(fail=[f"_dmarc.{GOV}"])).error == "temperror"
    two = StubResolver({f"_dmarc.{GOV}": {"TXT": ["v=DMARC1; p=none", "v=DMARC1; p=reject"]}})
    assert lookup_dmarc(GOV, two).error == "permerror"
    broken = StubResolver({f"_dmarc.{GOV}": {"TXT": ["v=DMARC1; p=maybe"]}})
    assert lookup_dmarc(GOV, broken).error == "permerror"


@pytest.mark.parametrize("domain, org", [
    ("camden.gov.uk", "camden.gov.uk"), ("mail.camden.gov.uk", "camden.gov.uk"),
    ("a.b.example.org", "example.org"), ("example.org", "example.org"),
    ("x.bund.de", "bund.de"), ("mail.city.gob.es", "city.gob.es"),
    ("Mail.Example.COM.", "example.com"), ("foo.co.jp", "foo.co.jp"),
])
def test_organizational_domain_heuristic(domain: str, org: str) -> None:
    assert organizational_domain(domain) == org


def test_alignment_modes() -> None:
    assert aligned("mail.camden.gov.uk", "camden.gov.uk", "r")
    assert not aligned("mail.camden.gov.uk", "camden.gov.uk", "s")
    assert aligned("camden.gov.uk", "CAMDEN.gov.uk.", "s")
    assert not aligned("lambeth.gov.uk", "camden.gov.uk", "r")   # one public suffix, two owners
    assert not aligned("", "camden.gov.uk")


def _auth(dkim: tuple[DkimResult, ...] = (), spf_result: str = "none", spf_domain: str = GOV,
          record: DmarcRecord | None = None, error: str | None = None,
          from_domain: str = GOV) -> AU.Authentication:
    return evaluate(from_domain, SpfResult(spf_result, spf_domain, f"foi@{spf_domain}",
                                           ip="192.0.2.1"),
                    dkim, DmarcLookup(record, error))


def test_verdicts_and_alignment() -> None:
    reject = DmarcRecord(GOV, "reject")
    # An aligned DKIM pass or an aligned SPF pass: DMARC passes.
    assert _auth((DkimResult("pass", GOV, "s1"),), record=reject).verdict == "pass"
    assert _auth(spf_result="pass", record=reject).dmarc.result == "pass"
    relaxed = _auth((DkimResult("pass", f"mail.{GOV}", "s1"),), record=reject)
    assert relaxed.verdict == "pass"
    strict = _auth((DkimResult("pass", f"mail.{GOV}", "s1"),),
                   record=DmarcRecord(GOV, "reject", adkim="s"))
    assert strict.verdict == "fail"
    spf_strict = _auth(spf_result="pass", spf_domain=f"bounce.{GOV}",
                       record=DmarcRecord(GOV, "reject", aspf="s"))
    assert spf_strict.verdict == "fail"
    # Someone else's valid signature vouches for nothing about this From.
    other = _auth((DkimResult("pass", "mailer.example", "s1"),), record=reject)
    assert other.verdict == "fail" and other.dmarc.result == "fail"
    # Without a DMARC record, an aligned pass still passes; nothing passing is "none".
    assert _auth((DkimResult("pass", GOV, "s1"),)).verdict == "pass"
    assert _auth((DkimResult("pass", GOV, "s1"),)).dmarc.result == "none"
    assert _auth().verdict == "none"
    assert _auth(spf_result="fail").verdict == "fail"
    assert _auth(spf_result="softfail").verdict == "none"
    assert _auth(spf_result="temperror").verdict == "temperror"
    assert _auth(error="temperror").verdict == "temperror"
    assert _auth((DkimResult("temperror", GOV, "s1"),), record=reject).verdict == "temperror"
    assert _auth(spf_result="permerror").verdict == "permerror"


def test_hold_rule() -> None:
    fail_reject = _auth(record=DmarcRecord(GOV, "reject"))
    fail_quarantine = _auth(record=DmarcRecord(GOV, "quarantine"))
    fail_monitor = _auth(record=DmarcRecord(GOV, "none"))
    spf_hard = _auth(spf_result="fail")
    nothing = _auth()
    temp = _auth(error="temperror")
    good = _auth((DkimResult("pass", GOV, "s1"),), record=DmarcRecord(GOV, "reject"))
    assert hold_reason(fail_reject) and hold_reason(fail_quarantine)
    assert hold_reason(spf_hard) and hold_reason(temp)
    assert hold_reason(fail_monitor) is None         # p=none: the owner asks for no action
    assert hold_reason(nothing) is None              # the domain publishes nothing to check
    assert hold_reason(good) is None
    assert hold_reason(nothing, "unverified") and hold_reason(fail_monitor, "unverified")
    assert hold_reason(good, "unverified") is None
    assert hold_reason(fail_reject, "never") is None
    assert hold_reason(None) is None


def test_authentication_results_header() -> None:
    a = _auth((DkimResult("pass", GOV, "s1", "abcdEFGH"),
               DkimResult("fail", "other.example", "x", reason='bad "sig"\r\nBcc: x')),
              spf_result="softfail", record=DmarcRecord(GOV, "reject"))
    value = a.header_value("ask.example")
    assert value.startswith("ask.example; dkim=pass header.d=camden.gov.example header.s=s1 "
                            "header.b=abcdEFGH; dkim=fail reason=")
    assert "spf=softfail" in value and f"smtp.mailfrom=foi@{GOV}" in value
    assert f"dmarc=pass (p=reject) header.from={GOV}" in value
    assert "\r" not in value and "\n" not in value
    assert _auth().header_value("ask.example").startswith("ask.example; dkim=none; spf=none")


# -- DKIM, with dkimpy and a key made here ---------------------------------------------------------
@pytest.fixture(scope="module")
def key() -> tuple[bytes, str]:
    k = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem = k.private_bytes(serialization.Encoding.PEM,
                          serialization.PrivateFormat.TraditionalOpenSSL,
                          serialization.NoEncryption())
    der = k.public_key().public_bytes(serialization.Encoding.DER,
                                      serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, base64.b64encode(der).decode()


MESSAGE = (f"From: FOI Officer <foi@{GOV}>\r\nTo: request-1-abc@ask.example\r\n"
           "Subject: Your request\r\nMessage-ID: <r1@camden.gov.example>\r\n\r\n"
           "Please find the figures attached.\r\n").encode()


def signed(pem: bytes, domain: str = GOV, selector: str = "s2025") -> bytes:
    return dkim.sign(MESSAGE, selector.encode(), domain.encode(), pem,
                     include_headers=[b"from", b"to", b"subject", b"message-id"]) + MESSAGE


def published(pub: str, domain: str = GOV, selector: str = "s2025") -> StubResolver:
    return StubResolver({f"{selector}._domainkey.{domain}": {"TXT": [f"v=DKIM1; k=rsa; p={pub}"]}})


def test_dkim_a_good_signature_passes(key: tuple[bytes, str]) -> None:
    pem, pub = key
    (r,) = check_dkim(signed(pem), published(pub))
    assert (r.result, r.domain, r.selector) == ("pass", GOV, "s2025") and len(r.b) == 8


def test_dkim_a_tampered_body_or_header_fails(key: tuple[bytes, str]) -> None:
    pem, pub = key
    raw = signed(pem)
    (body,) = check_dkim(raw.replace(b"the figures", b"no figures"), published(pub))
    assert body.result == "fail" and "body" in body.reason
    (header,) = check_dkim(raw.replace(b"Your request", b"Your refusal"), published(pub))
    assert header.result == "fail"


def test_dkim_missing_key_dns_failure_and_no_signature(key: tuple[bytes, str]) -> None:
    pem, _ = key
    (missing,) = check_dkim(signed(pem), StubResolver())
    assert missing.result == "permerror" and "no key" in missing.reason
    (temp,) = check_dkim(signed(pem), StubResolver(fail=[f"s2025._domainkey.{GOV}"]))
    assert temp.result == "temperror"
    assert check_dkim(MESSAGE, StubResolver()) == ()


def test_dkim_every_signature_is_checked(key: tuple[bytes, str]) -> None:
    pem, pub = key
    inner = signed(pem)
    raw = dkim.sign(inner, b"p1", b"provider.example", pem,
                    include_headers=[b"from", b"subject"]) + inner
    stub = published(pub)
    stub.add("p1._domainkey.provider.example", "TXT", f"v=DKIM1; k=rsa; p={pub}")
    results = check_dkim(raw, stub)
    assert [(r.domain, r.result) for r in results] == [("provider.example", "pass"),
                                                      (GOV, "pass")]


def test_authenticate_whole_message(key: tuple[bytes, str]) -> None:
    pem, pub = key
    stub = published(pub)
    stub.add(GOV, "TXT", "v=spf1 ip4:192.0.2.0/24 -all")
    stub.add(f"_dmarc.{GOV}", "TXT", "v=DMARC1; p=reject")
    good = authenticate(signed(pem), from_addr=f"foi@{GOV}", mail_from=f"foi@{GOV}",
                        client_ip="203.0.113.5", helo="mx.elsewhere.example", resolver=stub)
    assert good.verdict == "pass" and good.aligned_dkim == GOV and good.spf.result == "fail"
    forged = authenticate(MESSAGE, from_addr=f"foi@{GOV}", mail_from=f"foi@{GOV}",
                          client_ip="203.0.113.5", helo="x", resolver=stub)
    assert forged.verdict == "fail" and hold_reason(forged)
    by_spf = authenticate(MESSAGE, from_addr=f"foi@{GOV}", mail_from=f"foi@{GOV}",
                          client_ip="192.0.2.8", helo="x", resolver=stub)
    assert by_spf.verdict == "pass" and by_spf.aligned_spf


def test_the_message_budget_turns_slow_dns_into_temperror() -> None:
    stub = StubResolver({GOV: {"TXT": ["v=spf1 +all"]}})
    a = authenticate(MESSAGE, from_addr=f"foi@{GOV}", mail_from=f"foi@{GOV}",
                     client_ip="192.0.2.1", helo=None, resolver=stub, budget=-1)
    assert a.spf.result == "temperror" and a.verdict == "temperror"


# -- the production resolver never asks DNS about reserved names -------------------------------------
def test_reserved_names_are_answered_without_a_query() -> None:
    r = DnsResolver(timeout=0.5, nameservers=["192.0.2.1"])   # would time out if asked
    assert r.txt("camden.gov.example") == [] and r.a("x.test") == []
    assert r.mx("foo.invalid") == [] and r.aaaa("localhost") == []


# -- where the client was ------------------------------------------------------------------------------
TRUSTED = trusted_networks(["127.0.0.0/8", "::1/128", "10.1.0.0/16"])
RECEIVED = [
    "from mx1.ask.example (mx1.ask.example [10.1.0.5]) by mailflow.ask.example with ESMTP; "
    "Mon, 1 Jan 2025 10:00:00 +0000",
    "from mail.camden.gov.example (mail.camden.gov.example\r\n [192.0.2.44]) by "
    "mx1.ask.example with ESMTPS id X for <request-1-abc@ask.example>; Mon, 1 Jan 2025",
    "from forged (forged [198.51.100.66]) by mail.camden.gov.example; Mon, 1 Jan 2025",
]


def test_client_from_received_stops_at_the_first_untrusted_hop() -> None:
    ip, helo, _ = client_from_received(RECEIVED, TRUSTED)
    assert (ip, helo) == ("192.0.2.44", "mail.camden.gov.example")
    assert client_from_received(RECEIVED[:1], TRUSTED)[0] is None
    assert client_from_received(["by x with local"], TRUSTED)[0] is None
    v6 = ["from x (x [IPv6:2001:db8::25]) by mx"]
    assert client_from_received(v6, TRUSTED)[0] == "2001:db8::25"
    # A HELO is the sender's to choose, an address literal too: a clause naming a trusted
    # address beside the real one is no evidence, never a way past the trusted hop.
    sneaky = ["from [10.1.0.5] (attacker.example [198.51.100.66]) by mx1.ask.example",
              "from mail.camden.gov.example (mail.camden.gov.example [192.0.2.44]) by x"]
    assert client_from_received(sneaky, TRUSTED)[0] is None
    same = ["from [192.0.2.44] (unknown [192.0.2.44]) by mx1.ask.example"]
    assert client_from_received(same, TRUSTED)[0] == "192.0.2.44"


def test_client_address_by_way_of_arrival() -> None:
    smtp = client_address("smtp", "192.0.2.9:51515", "mail.x.example", RECEIVED, TRUSTED, False)
    assert smtp[:2] == ("192.0.2.9", "mail.x.example")
    assert client_address("smtp", "[2001:db8::9]:25", "h", [], TRUSTED, False)[0] == "2001:db8::9"
    relayed = client_address("smtp", "127.0.0.1:40000", "localhost", RECEIVED[1:], TRUSTED, False)
    assert relayed[0] == "192.0.2.44"
    assert client_address("lmtp", None, None, RECEIVED, TRUSTED, False)[0] == "192.0.2.44"
    assert client_address("ingest", None, None, RECEIVED, TRUSTED, False)[0] is None
    assert client_address("imap", "imap.x:993", None, RECEIVED, TRUSTED, True)[0] == "192.0.2.44"
    assert client_address("test", None, None, RECEIVED, TRUSTED, False)[0] is None


# -- answering the envelope sender only --------------------------------------------------------------
@pytest.mark.parametrize("to, mail_from, ok", [
    ("jane@citizen.example", "jane@citizen.example", True),
    ("Jane@Citizen.Example", "jane@CITIZEN.example", True),
    ("victim@elsewhere.example", "jane@citizen.example", False),
    ("jane@citizen.example", "", False),
    ("jane@citizen.example", "SRS0=HhHh=TT=citizen.example=jane@forwarder.example", True),
    ("jane@citizen.example", "SRS0=HhHh=TT=evil.example=jane@forwarder.example", False),
    ("jane@citizen.example", "SRS1=HhHh=fwd1.example==HhHh=TT=citizen.example=jane@fwd2.example",
     True),
    ("jane@citizen.example", "prvs=1234abcd56=jane@citizen.example", True),
    ("jane@citizen.example", "prvs=1234abcd56=other@citizen.example", True),   # domain only
    ("jane@citizen.example", "prvs=1234abcd56=jane@evil.example", False),
    ("jane@citizen.example", "srs0-broken@forwarder.example", False),
])
def test_envelope_matches(to: str, mail_from: str, ok: bool) -> None:
    assert envelope_matches(to, mail_from) is ok


# -- configuration ------------------------------------------------------------------------------------
def test_classify_keys(tmp_path: Path) -> None:
    from mailflow import config
    from mailflow.errors import ConfigError
    base = ('[site]\ndomain = "ask.example"\nsecret = "0123456789abcdef0123"\n')
    path = tmp_path / "config.toml"
    path.write_text(base)
    c = config.load(path).classify
    assert (c.authenticate, c.dns_timeout, c.hold_unverified, c.spf_from_received) == (
        True, 5.0, "failed", False)
    assert [ipaddress.ip_network(n) for n in c.trusted_relays]
    path.write_text(base + '[classify]\nhold_unverified = "unverified"\ndns_timeout = 2\n'
                           'trusted_relays = ["10.0.0.0/8"]\nspf_from_received = true\n')
    c = config.load(path).classify
    assert (c.hold_unverified, c.dns_timeout, c.trusted_relays, c.spf_from_received) == (
        "unverified", 2.0, ("10.0.0.0/8",), True)
    for bad in ('hold_unverified = "sometimes"', 'trusted_relays = ["mx.example"]',
                "dns_timeout = 0"):
        path.write_text(base + f"[classify]\n{bad}\n")
        with pytest.raises(ConfigError, match=r"\[classify\]"):
            config.load(path)
