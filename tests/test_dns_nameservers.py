"""`[classify] nameservers`: mailflow asks the DNS resolvers it is told to, over real UDP.

A production site runs a caching resolver beside mailflow (as rspamd asks of its users): the
SPF, DKIM and DMARC questions of every message then cost a round trip on the loopback, not
one to a distant resolver. These tests run a real DNS server on 127.0.0.1 (tests/dns_server.py)
and check that the resolver, the config and the pipeline all use it.
"""
from __future__ import annotations

import email.policy
import time
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path

import pytest

from dns_server import DnsServer
from mailflow.mail.authenticate import DnsResolver, DnsTempError

ORG = "parish-council.org.uk"      # not a reserved name: it is really asked


def test_the_resolver_asks_the_configured_server() -> None:
    zone = {ORG: {"TXT": ["v=spf1 ip4:198.51.100.7 -all", "x" * 300],
                  "A": ["198.51.100.7"], "MX": [(10, f"mx.{ORG}")]},
            f"_dmarc.{ORG}": {"TXT": ["v=DMARC1; p=reject"]}}
    with DnsServer(zone, fail={"broken.org.uk"}) as server:
        r = DnsResolver(timeout=2.0, nameservers=[(server.address, server.port)])
        # 255-byte parts joined; an RRset has no order (this once came back the other way)
        assert sorted(r.txt(ORG)) == sorted(["v=spf1 ip4:198.51.100.7 -all", "x" * 300])
        assert r.a(ORG) == ["198.51.100.7"] and r.aaaa(ORG) == []
        assert r.mx(ORG) == [(10, f"mx.{ORG}")]
        assert r.txt(f"_dmarc.{ORG}") == ["v=DMARC1; p=reject"]
        assert r.txt("nowhere.org.uk") == []                               # NXDOMAIN: void
        with pytest.raises(DnsTempError):
            r.txt("broken.org.uk")                                         # SERVFAIL
        r.txt(ORG)                                                         # from the cache
        assert server.asked[(ORG, "TXT")] == 1
        assert server.asked[("nowhere.org.uk", "TXT")] == 1


def test_answers_are_kept_for_their_ttl_and_failures_not_at_all() -> None:
    """The resolver's own cache in front of dnspython's keeps an answer, an empty answer and
    an NXDOMAIN until they expire, never longer, and never a failure (the next message must
    ask again)."""
    zone = {ORG: {"TXT": ["v=spf1 -all"]}, f"short.{ORG}": {"TXT": ["v=spf1 ?all"]}}
    with DnsServer(zone, fail={"broken.org.uk"}, ttl=300) as server, \
            DnsServer({f"short.{ORG}": {"TXT": ["v=spf1 ?all"]}}, ttl=1) as brief:
        r = DnsResolver(timeout=2.0, nameservers=[(server.address, server.port)])
        for _ in range(3):
            assert r.txt(ORG) == ["v=spf1 -all"]
            assert r.a(ORG) == []                                   # no data: void, kept
            assert r.txt("nowhere.org.uk") == []                    # NXDOMAIN: void, kept
            with pytest.raises(DnsTempError):
                r.txt("broken.org.uk")                              # SERVFAIL: not kept
        assert server.asked[(ORG, "TXT")] == 1
        assert server.asked[(ORG, "A")] == 1
        assert server.asked[("nowhere.org.uk", "TXT")] == 1
        assert server.asked[("broken.org.uk", "TXT")] >= 3
        # each kept by the resolver's own cache, not only by dnspython's behind it
        assert {(ORG, "TXT"), (ORG, "A"), ("nowhere.org.uk", "TXT")} \
            <= set(r._answers)
        assert ("broken.org.uk", "TXT") not in r._answers

        r = DnsResolver(timeout=2.0, nameservers=[(brief.address, brief.port)])
        assert r.txt(f"short.{ORG}") == ["v=spf1 ?all"]
        assert r.txt(f"short.{ORG}") == ["v=spf1 ?all"]
        assert brief.asked[(f"short.{ORG}", "TXT")] == 1
        time.sleep(1.2)                                             # past its TTL of 1 s
        assert r.txt(f"short.{ORG}") == ["v=spf1 ?all"]
        assert brief.asked[(f"short.{ORG}", "TXT")] == 2


def test_the_resolvers_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past CACHE_SIZE names the oldest half of the answers goes; what is asked still answers."""
    import mailflow.mail.authenticate as A
    monkeypatch.setattr(A, "CACHE_SIZE", 8)
    with DnsServer({f"n{i}.{ORG}": {"TXT": [f"t{i}"]} for i in range(20)}) as server:
        r = DnsResolver(timeout=2.0, nameservers=[(server.address, server.port)])
        for i in range(20):
            assert r.txt(f"n{i}.{ORG}") == [f"t{i}"]
            assert len(r._answers) <= 8
        assert r.txt(f"n19.{ORG}") == ["t19"]
        assert server.asked[(f"n19.{ORG}", "TXT")] == 1


def _config(tmp_path: Path, line: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text('[site]\ndomain = "ask.example"\nsecret = "0123456789abcdef0123"\n'
                    f"[classify]\n{line}\n")
    return path


@pytest.mark.parametrize("given, parsed", [
    ('["127.0.0.1"]', (("127.0.0.1", 53),)),
    ('["127.0.0.1:5353", "::1"]', (("127.0.0.1", 5353), ("::1", 53))),
    ('["[2001:db8::53]:5300"]', (("2001:db8::53", 5300),)),
    ("[]", ()),
])
def test_nameservers_key(tmp_path: Path, given: str, parsed: tuple) -> None:
    from mailflow import config
    assert config.load(_config(tmp_path, f"nameservers = {given}")).classify.nameservers == parsed


@pytest.mark.parametrize("given", ['["dns.example"]', '["127.0.0.1:0"]', '["127.0.0.1:x"]',
                                   '["[::1"]', "[53]", '"127.0.0.1"'])
def test_a_wrong_nameserver_is_named(tmp_path: Path, given: str) -> None:
    from mailflow import config
    from mailflow.errors import ConfigError
    with pytest.raises(ConfigError, match=r"\[classify\].*nameservers"):
        config.load(_config(tmp_path, f"nameservers = {given}"))


def test_the_pipeline_asks_the_sites_nameservers(site) -> None:  # type: ignore[no-untyped-def]
    """A citizen's letter from a real-looking domain: SPF and DMARC are asked of the site's
    configured resolver, and its answer (an SPF pass for the client's address) is recorded."""
    from mailflow.pipeline import Pipeline
    from mailflow.site import Site as MfSite
    from mailflow.spool import Envelope
    zone = {ORG: {"TXT": ["v=spf1 ip4:198.51.100.7 -all"]}}
    with DnsServer(zone) as server:
        site.set("classify", "nameservers", f'["{server.address}:{server.port}"]')
        mf = MfSite.open(site.config)
        try:
            m = EmailMessage()
            m["From"], m["To"] = f"Jo <jo@{ORG}>", f"camden@{mf.domain}"
            m["Subject"], m["Date"] = "Bins", formatdate()
            m["Message-ID"] = make_msgid(domain=ORG)
            m.set_content("When are the bins collected?")
            env = Envelope(mail_from=f"jo@{ORG}", rcpt_tos=[f"camden@{mf.domain}"], via="smtp",
                           peer="198.51.100.7:40000", helo=f"mail.{ORG}")
            result = Pipeline(mf).process(m.as_bytes(policy=email.policy.SMTP), env)
            (outcome,) = result.outcomes
            assert outcome.thread_id is not None
            with mf.store.read() as tx:
                (received,) = [m.authentication for m in tx.messages(outcome.thread_id)
                               if m.authentication]
                assert "spf=pass" in received
        finally:
            mf.close()
        assert server.asked[(ORG, "TXT")] >= 1
        assert server.asked[(f"_dmarc.{ORG}", "TXT")] >= 1
