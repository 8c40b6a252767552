"""DKIM signing as a receiving server would check it: every signature is verified by dkimpy
against the key published through dns_record(), parsed back the way DNS would hand it over."""
from __future__ import annotations

import base64
import re
import stat
from collections.abc import Callable
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from mailflow.errors import ConfigError
from mailflow.outbound import signing
from mailflow.outbound.signing import Signer, dns_record, generate_key, load_key, verify

SELECTOR = "mailflow"
DOMAIN = "ask.example"


@pytest.fixture(scope="module")
def key_pem(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("dkim") / "keys" / "mailflow.pem"
    generate_key(path)
    return load_key(path)


@pytest.fixture(scope="module")
def other_key_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def txt_from_record(record: str) -> bytes:
    """What a resolver returns for the record: its quoted strings, concatenated."""
    return "".join(re.findall(r'"([^"]*)"', record)).encode("ascii")


def dns_for(*records: str) -> Callable[[bytes], bytes | None]:
    zone = {}
    for record in records:
        name = record.split()[0].encode("ascii")
        zone[name] = txt_from_record(record)
    return zone.get


@pytest.fixture(scope="module")
def dns(key_pem: bytes) -> Callable[[bytes], bytes | None]:
    return dns_for(dns_record(key_pem, SELECTOR, DOMAIN))


@pytest.fixture(scope="module")
def signer(key_pem: bytes) -> Signer:
    return Signer(key_pem, SELECTOR, DOMAIN)


def message(from_: str = "FOI requests <request-7-k3y@ask.example>",
            subject: str = "Freedom of Information request: road repairs",
            body: str = ("Dear council,\r\n\r\nPlease send me the budget.\r\n\r\n"
                         "Yours,\r\nA. Citizen\r\n"),
            extra: str = "") -> bytes:
    return (
        f"From: {from_}\r\n"
        "To: foi@council.example\r\n"
        f"Subject: {subject}\r\n"
        "Date: Mon, 02 Nov 2026 10:00:00 +0000\r\n"
        "Message-ID: <req-7.1@ask.example>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "Auto-Submitted: auto-generated\r\n"
        f"{extra}"
        "\r\n"
        f"{body}"
    ).encode("utf-8")


def dkimpy_verifies(raw: bytes, dns: Callable[[bytes], bytes | None]) -> bool:
    """Straight dkimpy, independent of signing.verify()."""
    return dkim.verify(raw, dnsfunc=lambda name, timeout=5: dns(name))


# --- keys -----------------------------------------------------------------------------------

def test_generate_key_is_private_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "key.pem"
    generate_key(path, bits=1024)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    before = path.read_bytes()
    assert b"PRIVATE KEY" in before
    with pytest.raises(FileExistsError):
        generate_key(path, bits=1024)
    assert path.read_bytes() == before


def test_generate_key_refuses_weak_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate_key(tmp_path / "k.pem", bits=512)
    assert not (tmp_path / "k.pem").exists()


def test_load_key_missing_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.pem"
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_key(path)


@pytest.mark.parametrize("content", [b"", b"hello\n", b"-----BEGIN RSA PRIVATE KEY-----\nAAAA\n"
                                     b"-----END RSA PRIVATE KEY-----\n"])
def test_load_key_rejects_garbage(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.pem"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_key(path)


def test_load_key_rejects_non_rsa_and_encrypted_keys(tmp_path: Path) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    p1 = tmp_path / "ec.pem"
    p1.write_bytes(ec_key.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
    with pytest.raises(ConfigError, match="RSA"):
        load_key(p1)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    p2 = tmp_path / "enc.pem"
    p2.write_bytes(rsa_key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.BestAvailableEncryption(b"pw")))
    with pytest.raises(ConfigError, match="passphrase"):
        load_key(p2)


def test_unreadable_key_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "dir.pem"
    path.mkdir()  # reading a directory fails even as root
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_key(path)


def test_pkcs8_and_crlf_keys_sign_like_pkcs1(tmp_path: Path, other_key_pem: bytes) -> None:
    """dkimpy's own PEM reader needs LF line ends; load_key must smooth that over."""
    path = tmp_path / "crlf.pem"
    path.write_bytes(other_key_pem.replace(b"\n", b"\r\n"))
    pem = load_key(path)
    dns = dns_for(dns_record(pem, "s1", DOMAIN))
    signed = Signer(pem, "s1", DOMAIN).sign(message())
    assert dkimpy_verifies(signed, dns)
    # the record is the same whichever form the private key was given in
    assert dns_record(pem, "s1", DOMAIN) == dns_record(other_key_pem, "s1", DOMAIN)


# --- the DNS record -------------------------------------------------------------------------

def test_dns_record_shape(key_pem: bytes) -> None:
    record = dns_record(key_pem, "MailFlow", "Ask.Example.")
    assert record.startswith('mailflow._domainkey.ask.example. IN TXT ( "v=DKIM1; k=rsa; "')
    assert record.endswith('" )')
    strings = re.findall(r'"([^"]*)"', record)
    assert len(strings) >= 3  # a 2048-bit key needs two strings after the tags
    assert all(len(s) <= 255 for s in strings)
    pub = serialization.load_pem_private_key(key_pem, password=None).public_key()
    der = pub.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    assert "".join(strings) == "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()


def test_dns_record_rejects_bad_names(key_pem: bytes) -> None:
    with pytest.raises(ValueError):
        dns_record(key_pem, "sel ector", DOMAIN)
    with pytest.raises(ValueError):
        dns_record(key_pem, SELECTOR, "ask..example")


# --- signing --------------------------------------------------------------------------------

def test_signature_verifies_and_message_is_unchanged(signer: Signer, dns) -> None:
    raw = message()
    signed = signer.sign(raw)
    assert signed.startswith(b"DKIM-Signature: ")
    assert signed.endswith(raw)
    header = signed[: len(signed) - len(raw)]
    assert header.endswith(b"\r\n") and header.count(b"\n") == header.count(b"\r\n")
    assert dkimpy_verifies(signed, dns)
    assert verify(signed, dns) == (True, DOMAIN)


def test_signature_tags(signer: Signer) -> None:
    signed = signer.sign(message())
    d = dkim.DKIM(signed)
    headers = dict((k.lower(), v) for k, v in d.headers)
    tags = dkim.util.parse_tag_value(headers[b"dkim-signature"])
    assert tags[b"a"] == b"rsa-sha256"
    assert tags[b"c"] == b"relaxed/relaxed"
    assert tags[b"d"] == DOMAIN.encode() and tags[b"s"] == SELECTOR.encode()
    signed_headers = [h.strip() for h in tags[b"h"].split(b":")]
    for h in (b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"in-reply-to",
              b"references", b"reply-to", b"mime-version", b"content-type",
              b"content-transfer-encoding", b"auto-submitted"):
        assert h in signed_headers, h
    assert signed_headers.count(b"from") >= 2
    assert signed_headers.count(b"subject") >= 2


def test_utf8_subject_raw_and_encoded(signer: Signer, dns) -> None:
    raw_utf8 = message(subject="Anfrage über Straßenschäden – Ærø ✓",
                       body="Grüße aus Köln\r\n")
    assert dkimpy_verifies(signer.sign(raw_utf8), dns)
    encoded = message(subject="=?utf-8?q?Anfrage_=C3=BCber_Stra=C3=9Fen?=",
                      from_="=?utf-8?q?J=C3=B6rg?= <reply-7-x@ask.example>")
    assert dkimpy_verifies(signer.sign(encoded), dns)


def test_modified_body_fails(signer: Signer, dns) -> None:
    signed = signer.sign(message())
    tampered = signed.replace(b"the budget", b"the budgeT")
    assert tampered != signed
    assert not dkimpy_verifies(tampered, dns)
    assert verify(tampered, dns) == (False, DOMAIN)


def test_modified_or_added_headers_fail(signer: Signer, dns) -> None:
    signed = signer.sign(message())
    assert not dkimpy_verifies(signed.replace(b"road repairs", b"road repair"), dns)
    # over-signing: a second From or Subject, or a Reply-To that was absent, breaks it
    for added in (b"From: ceo@ask.example\r\n", b"Subject: Pay this invoice\r\n",
                  b"Reply-To: attacker@evil.example\r\n"):
        forged = signed.replace(b"\r\n\r\n", b"\r\n" + added + b"\r\n", 1)
        assert not dkimpy_verifies(forged, dns), added
    # ...but an MTA's Received header on top does not
    assert dkimpy_verifies(b"Received: from x by y; Mon, 2 Nov 2026 10:00:01 +0000\r\n"
                           + signed, dns)


def test_relaxed_survives_line_ending_round_trip(signer: Signer, dns) -> None:
    signed = signer.sign(message(body="Line one  \r\nLine two\t\r\n\r\n\r\n"))
    lf = signed.replace(b"\r\n", b"\n")
    assert dkimpy_verifies(lf, dns)
    back = lf.replace(b"\n", b"\r\n")
    assert back == signed
    assert dkimpy_verifies(back, dns)
    # relaxed/relaxed also forgives refolded headers and trailing whitespace
    refolded = back.replace(b"Subject: Freedom of Information request: road repairs",
                            b"Subject: Freedom of Information\r\n  request:   road repairs")
    refolded = refolded.replace(b"Line one  \r\n", b"Line one\r\n")
    assert refolded != back
    assert dkimpy_verifies(refolded, dns)


def test_subdomain_from_is_signed(signer: Signer, dns) -> None:
    signed = signer.sign(message(from_="x@bounces.ask.example"))
    assert dkimpy_verifies(signed, dns)


@pytest.mark.parametrize("from_", [
    "someone@council.example",
    "FOI <request-7-k3y@evilask.example>",
    '"x@ask.example" <x@notask.example>',
    "a@ask.example, b@elsewhere.example",
    "ask.example",
])
def test_foreign_from_is_refused(signer: Signer, from_: str) -> None:
    with pytest.raises(ValueError):
        signer.sign(message(from_=from_))


def test_two_from_headers_or_none_are_refused(signer: Signer) -> None:
    with pytest.raises(ValueError, match="From"):
        signer.sign(message(extra="From: other@evil.example\r\n"))
    raw = message().replace(b"From: FOI requests <request-7-k3y@ask.example>\r\n", b"")
    with pytest.raises(ValueError, match="From"):
        signer.sign(raw)


def test_bare_lf_is_refused(signer: Signer) -> None:
    with pytest.raises(ValueError, match="CRLF"):
        signer.sign(message().replace(b"\r\n", b"\n"))


def test_signer_rejects_bad_key() -> None:
    with pytest.raises(ValueError):
        Signer(b"not a key", SELECTOR, DOMAIN)


# --- verify ---------------------------------------------------------------------------------

def test_verify_unsigned_and_unknown_key(signer: Signer, other_key_pem: bytes, dns) -> None:
    assert verify(message(), dns) == (False, None)
    signed = signer.sign(message())
    assert verify(signed, lambda name: None) == (False, DOMAIN)
    wrong = dns_for(dns_record(other_key_pem, SELECTOR, DOMAIN))
    assert verify(signed, wrong) == (False, DOMAIN)


def test_verify_asks_for_the_selector_record(signer: Signer, dns) -> None:
    asked: list[bytes] = []

    def spy(name: bytes) -> bytes | None:
        asked.append(name)
        return dns(name)

    assert verify(signer.sign(message()), spy) == (True, DOMAIN)
    assert asked == [b"mailflow._domainkey.ask.example."]


def test_verify_prefers_the_signature_aligned_with_from(signer: Signer, key_pem: bytes,
                                                         other_key_pem: bytes) -> None:
    """A hosted provider's signature on top must not hide the authority's own."""
    ours = signer.sign(message())
    # the provider signs on top of ours (it is not the From domain, so sign by hand)
    top = dkim.sign(ours, b"sel2", b"provider.example", other_key_pem,
                    canonicalize=(b"relaxed", b"relaxed"))
    both = top + ours
    zone = dns_for(dns_record(key_pem, SELECTOR, DOMAIN),
                   dns_record(other_key_pem, "sel2", "provider.example"))
    assert verify(both, zone) == (True, DOMAIN)
    # only the provider's verifies: still verified, and it says by whom
    only_provider = dns_for(dns_record(other_key_pem, "sel2", "provider.example"))
    assert verify(both, only_provider) == (True, "provider.example")


def test_verify_survives_garbage() -> None:
    assert verify(b"", lambda n: None) == (False, None)
    assert verify(b"DKIM-Signature: v=1; nonsense\r\nFrom: a@b.example\r\n\r\nx\r\n",
                  lambda n: None) == (False, None)
    assert signing.MIN_KEY_BITS == 1024


# --- equivalence with dkim.sign -------------------------------------------------------------
# Signer.sign computes the signature with `cryptography` rather than dkimpy's pure-Python RSA;
# everything else is dkimpy's. RSA PKCS#1 v1.5 and Ed25519 are deterministic, so at the same
# t= the header must be byte for byte what dkim.sign makes, and dkimpy must verify it.

CORPUS = Path(__file__).parent / "corpus"
CANONICALIZATIONS = [(b"relaxed", b"relaxed"), (b"simple", b"simple"),
                     (b"relaxed", b"simple"), (b"simple", b"relaxed")]
NOW = 1_790_000_000


def corpus_messages() -> list[bytes]:
    return [p.read_bytes() for p in sorted(CORPUS.rglob("*.eml"))]


def test_signature_is_dkimpys_byte_for_byte_over_the_corpus(other_key_pem: bytes) -> None:
    """Every message of tests/corpus (real mail: odd folding, 8-bit headers, LF and CRLF,
    duplicate headers, existing signatures), each canonicalisation in turn."""
    key = serialization.load_pem_private_key(other_key_pem, password=None)
    include = Signer(other_key_pem, "s1", DOMAIN)._include
    dns = dns_for(dns_record(other_key_pem, "s1", DOMAIN))
    messages = corpus_messages()
    assert len(messages) > 200
    compared = 0
    for i, raw in enumerate(messages):
        canon = CANONICALIZATIONS[i % len(CANONICALIZATIONS)]
        try:
            theirs = dkim.sign(raw, b"s1", DOMAIN.encode(), other_key_pem, canonicalize=canon,
                               include_headers=include, linesep=b"\r\n")
        except dkim.DKIMException as e:
            # what dkimpy cannot sign, neither can we
            with pytest.raises(dkim.DKIMException):
                signing._signature_header(raw, key, b"s1", DOMAIN.encode(), include, canon,
                                          now=NOW)
            continue
        ours = signing._signature_header(raw, key, b"s1", DOMAIN.encode(), include, canon,
                                         now=int(dkim.util.parse_tag_value(
                                             theirs[len(b"DKIM-Signature: "):])[b"t"]))
        assert ours == theirs, (i, canon)
        assert dkimpy_verifies(ours + raw, dns), (i, canon)
        compared += 1
    assert compared > 200


@pytest.mark.parametrize("canon", CANONICALIZATIONS)
def test_signer_canonicalisation_as_configured(other_key_pem: bytes, canon) -> None:
    name = tuple(c.decode() for c in canon)
    s = Signer(other_key_pem, "s1", DOMAIN, canonicalize=name)
    dns = dns_for(dns_record(other_key_pem, "s1", DOMAIN))
    for raw in (message(), message(subject="Ærø  ✓", body="x  \r\n\r\n\r\n"),
                message(extra="References: <a@b.example>\r\n <c@d.example>\r\n")):
        signed = s.sign(raw)
        tags = dkim.util.parse_tag_value(dkim.DKIM(signed).headers[0][1])
        assert tags[b"c"] == b"/".join(canon)
        assert dkimpy_verifies(signed, dns)
        assert verify(signed, dns) == (True, DOMAIN)
    with pytest.raises(ValueError):
        Signer(other_key_pem, "s1", DOMAIN, canonicalize=("loose", "relaxed"))


def test_signer_never_uses_dkimpys_rsa(signer: Signer, dns, monkeypatch: pytest.MonkeyPatch) -> None:
    """The point of the exercise: 0.5 ms with OpenSSL against 13 ms in pure Python."""
    def forbidden(*a, **k):
        raise AssertionError("dkimpy's pure-Python RSA was called")
    monkeypatch.setattr(dkim, "RSASSA_PKCS1_v1_5_sign", forbidden)
    monkeypatch.setattr(dkim, "sign", forbidden)
    monkeypatch.setattr(dkim, "parse_pem_private_key", forbidden)
    signed = signer.sign(message())
    monkeypatch.undo()
    assert dkimpy_verifies(signed, dns)


def test_signature_time_is_now(signer: Signer) -> None:
    import time
    before = int(time.time())
    tags = dkim.util.parse_tag_value(dkim.DKIM(signer.sign(message())).headers[0][1])
    assert before <= int(tags[b"t"]) <= int(time.time())


@pytest.mark.parametrize("canon", CANONICALIZATIONS[:2])
def test_ed25519_signature_is_dkimpys_and_verifies(canon) -> None:
    """RFC 8463 ed25519-sha256, for the day a site publishes an Ed25519 key beside its RSA
    one: the same equivalence as RSA, verified by dkimpy (through PyNaCl)."""
    from cryptography.hazmat.primitives.asymmetric import ed25519
    key = ed25519.Ed25519PrivateKey.generate()
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)
    zone = {b"ed._domainkey.ask.example.":
            b"v=DKIM1; k=ed25519; p=" + base64.b64encode(pub)}
    include = [b"from", b"to", b"subject", b"date", b"message-id", b"from", b"subject"]
    for raw in [message(), message(subject="Grüße", body="a\r\n\r\n")] + corpus_messages()[:20]:
        theirs = dkim.sign(raw, b"ed", DOMAIN.encode(), base64.b64encode(seed),
                           canonicalize=canon, signature_algorithm=b"ed25519-sha256",
                           include_headers=include)
        t = int(dkim.util.parse_tag_value(theirs[len(b"DKIM-Signature: "):])[b"t"])
        ours = signing._signature_header(raw, key, b"ed", DOMAIN.encode(), include, canon,
                                         now=t)
        assert ours == theirs
        assert dkimpy_verifies(ours + raw, zone.get)
