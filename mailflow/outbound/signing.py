"""DKIM keys, the DNS record that publishes them, signing outgoing mail and verifying replies.

Authorities' mail servers increasingly drop unauthenticated mail, so every message mailflow
sends is signed for the site's domain. The same module verifies incoming signatures so that
the archive can show a reader that an authority's reply really came from the authority.

dkimpy parses, canonicalises and verifies. Everything here that is not a thin call into it
exists to turn dkimpy's loose contract (any bytes in, DKIMException or a bare False out) into
something the rest of mailflow can rely on: keys are checked when loaded, not at the first
send; a message is never signed for a domain it does not claim to come from; and verification
says *which* domain vouched for a message, not just that some signature was good.

Signing is the one place where dkimpy is not used whole: its RSA is pure Python (about 13 ms a
signature for a 2048-bit key, bench/README.md) and it re-parses the PEM key on every call.
`_signature_header` builds the DKIM-Signature exactly as `dkim.sign` does (the same tags in
the same order, dkimpy's own header selection, canonicalisation, b= stripping and folding) and
only computes the signature itself with `cryptography` (OpenSSL: about 0.5 ms). Since RSA
PKCS#1 v1.5 and Ed25519 signatures are deterministic, the result is byte for byte what
`dkim.sign` returns for the same message, key and time, which tests/test_signing.py checks.

Verifying RSA is still pure Python in dkimpy (milliseconds): call `verify` through
`asyncio.to_thread` from the daemon rather than on the event loop.
"""
from __future__ import annotations

import base64
import hashlib
import os
import re
import time
from collections.abc import Callable, Sequence
from functools import lru_cache
from email import policy
from email.headerregistry import Address
from pathlib import Path

import dkim
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
from dkim.dnsplug import get_txt as _dns_get_txt  # the sync resolver, explicitly (see LIBRARIES.md)
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from mailflow.errors import ConfigError

__all__ = ["DEFAULT_SIGNED_HEADERS", "Signer", "dns_record", "generate_key", "load_key", "verify"]

# Below this, verifiers are told to reject the signature (RFC 8301 §3.2), so such a key would
# silently make every message look unsigned.
MIN_KEY_BITS = 1024

# Every header that carries meaning for the recipient or for threading. Signing a header that
# is absent also pins its absence, so nobody en route can add, say, a Reply-To.
DEFAULT_SIGNED_HEADERS: tuple[str, ...] = (
    "from", "sender", "reply-to", "to", "cc", "subject", "date", "message-id",
    "in-reply-to", "references", "mime-version", "content-type",
    "content-transfer-encoding", "auto-submitted", "list-id", "list-unsubscribe",
    "list-unsubscribe-post",
)
# Signed once more than they occur, so that a second copy cannot be added either: a verifier
# that shows the first From while DKIM vouched for the last is the classic DKIM replay trick.
# All of these are single-instance headers (RFC 5322 §3.6), so over-signing costs nothing.
OVERSIGNED_HEADERS: tuple[str, ...] = (
    "from", "sender", "reply-to", "to", "cc", "subject", "date", "message-id",
    "in-reply-to", "references", "mime-version", "content-type",
    "content-transfer-encoding", "auto-submitted",
)

_TXT_CHUNK = 255  # longest character-string in a TXT record (RFC 1035 §3.3)


def generate_key(path: Path, bits: int = 2048) -> None:
    """Write a new RSA private key, readable only by its owner.

    Never overwrites: replacing a key whose public half is already in DNS would make every
    later message fail verification until the record is changed, so that must be deliberate.
    The file is created with O_EXCL and mode 0600 from the start, so the key is never readable
    by others, not even for an instant.
    """
    if bits < MIN_KEY_BITS:
        raise ValueError(f"a DKIM key needs at least {MIN_KEY_BITS} bits, got {bits}")
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path}: a key already exists; remove it first to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    # PKCS#1 ("BEGIN RSA PRIVATE KEY"): what dkimpy's parser was written for and what
    # `openssl genrsa -traditional` and most DKIM guides produce.
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    os.chmod(path, 0o600)  # O_CREAT's mode is filtered by the umask; be explicit


def _normalise_key(key_pem: bytes) -> bytes:
    """Return the key as unencrypted PKCS#1 PEM with LF line ends, or raise ValueError.

    dkimpy's own PEM reader is a regex that needs LF line ends (a key saved with CRLF fails)
    and cannot read encrypted or non-RSA keys; it reports all of that only at the first
    signature. Re-serialising through `cryptography` accepts PKCS#1 and PKCS#8 alike and fails
    here, where the message can name the file.
    """
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ValueError("the key is encrypted with a passphrase; mailflow needs it "
                         "unencrypted (protect it with file permissions instead)") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ValueError(f"not a PEM private key ({e})") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"expected an RSA key, got {type(key).__name__}")
    if key.key_size < MIN_KEY_BITS:
        raise ValueError(f"the RSA key has {key.key_size} bits; verifiers reject fewer "
                         f"than {MIN_KEY_BITS}")
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def load_key(path: Path) -> bytes:
    """Read and check the site's DKIM key, so a bad key stops the daemon at start-up.

    Raises ConfigError naming the file: the admin's next step is always about that file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no DKIM key here (`mailflow init` makes one, "
                          "or point [dkim] key_file at an existing one)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the DKIM key: {e.strerror}") from None
    try:
        return _normalise_key(data)
    except ValueError as e:
        raise ConfigError(f"{path}: not a usable DKIM key: {e}") from None


def _public_key_b64(key_pem: bytes) -> str:
    key = serialization.load_pem_private_key(_normalise_key(key_pem), password=None)
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode("ascii")


def _clean_name(value: str, what: str) -> str:
    name = value.strip().lower().rstrip(".")
    if not name or not re.fullmatch(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?", name) or ".." in name:
        raise ValueError(f"not a usable DKIM {what}: {value!r}")
    return name


def dns_record(key_pem: bytes, selector: str, domain: str) -> str:
    """The TXT record an admin pastes into a BIND-style zone to publish the key.

    The key does not fit one TXT character-string (255 octets), so it is split; DNS hands
    verifiers the strings concatenated, which is why the splits may fall anywhere.
    """
    selector = _clean_name(selector, "selector")
    domain = _clean_name(domain, "domain")
    p = "p=" + _public_key_b64(key_pem)
    chunks = ["v=DKIM1; k=rsa; "] + [p[i:i + _TXT_CHUNK] for i in range(0, len(p), _TXT_CHUNK)]
    quoted = [f'"{c}"' for c in chunks]
    body = "\n    ".join(quoted)
    return f"{selector}._domainkey.{domain}. IN TXT ( {body} )"


_BLANK_LINE = re.compile(rb"\n\r?\n")


def _header_section(raw: bytes) -> bytes:
    """`raw` up to and including its first empty line (as dkim.rfc822_parse splits lines):
    the same headers from rfc822_parse without splitting a large body into lines."""
    if raw.startswith((b"\n", b"\r\n")):
        return b""
    m = _BLANK_LINE.search(raw)
    return raw if m is None else raw[:m.end()]


def _from_domains(raw: bytes) -> list[str]:
    """The domains in the From header that dkimpy itself will sign.

    Parsed from dkimpy's own view of the header section so that a parser differential (two
    From headers, an odd fold) cannot make us check one From while signing another.
    """
    try:
        headers, _ = dkim.rfc822_parse(_header_section(raw))
    except dkim.MessageFormatError as e:
        raise ValueError(f"cannot parse the message's header section: {e}") from None
    froms = [value for name, value in headers if name.strip().lower() == b"from"]
    if len(froms) != 1:
        raise ValueError(f"the message has {len(froms)} From headers; exactly one is required")
    return list(_domains_of_from(froms[0]))


@lru_cache(maxsize=512)
def _domains_of_from(value: bytes) -> tuple[str, ...]:
    """The domains of one From header's value (as dkimpy split it), through the stdlib's
    header registry. Remembered: mailflow's own mail has one From per thread and kind, and
    the registry's parse cost more than the RSA signature."""
    text = value.decode("utf-8", "surrogateescape")
    text = re.sub(r"\r?\n", "", text)  # unfold
    try:
        header = policy.default.header_factory("from", text)
        addresses: Sequence[Address] = getattr(header, "addresses", ())
    except Exception as e:  # the stdlib header parser has raised odd things on odd input
        raise ValueError(f"cannot parse the From header {text.strip()!r}: {e}") from None
    domains = tuple(a.domain.lower().rstrip(".") for a in addresses)
    if not domains or not all(domains):
        raise ValueError(f"the From header has no usable address: {text.strip()!r}")
    return domains


_SIG_HEADER = b"DKIM-Signature"
_PLACEHOLDER = b"0" * 60
SigningKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


_BODY_CHUNK = 1 << 20
_WSP_EOL = re.compile(rb"[\t ]+\r\n")
_WSP = re.compile(rb"[\t ]+")


def _headers_and_body_hash(raw: bytes, canon: CanonicalizationPolicy,
                           chunk: int = _BODY_CHUNK) -> tuple[list[list[bytes]], bytes]:
    """`dkim.rfc822_parse(raw)`'s headers and the base64 SHA-256 of the canonical body as
    `canon.canonicalize_body` makes it, hashed a megabyte of whole lines at a time: dkimpy
    splits the message into a list of lines and copies the body three times (signing a
    34 MB forward cost 100 MB). Both canonicalisations work line by line except for the
    empty lines at the end, which are held back until a line with content follows them.
    Messages that are not CRLF throughout (dkimpy reads a bare LF as a line end) and
    messages without a header or a body are read the plain way."""
    end = raw.find(b"\r\n\r\n")
    if end < 0 or raw.startswith(b"\r\n") or raw.count(b"\n") != raw.count(b"\r\n"):
        headers, body = dkim.rfc822_parse(raw)
        return headers, base64.b64encode(hashlib.sha256(canon.canonicalize_body(body)).digest())
    headers, _ = dkim.rfc822_parse(raw[:end + 4])
    relaxed = canon.body_algorithm.name == b"relaxed"
    h = hashlib.sha256()
    view = memoryview(raw)
    pos, size = end + 4, len(raw)
    held = 0          # CRLFs at the end of what was read, not hashed yet
    content = False   # whether anything has been hashed
    while pos < size:
        cut = raw.rfind(b"\r\n", pos, pos + chunk)
        if cut < 0:
            cut = raw.find(b"\r\n", pos + chunk)
        stop = size if cut < 0 else cut + 2
        piece = bytes(view[pos:stop])
        pos = stop
        if relaxed and (b"\t" in piece or b"  " in piece or b" \r\n" in piece):
            # (without a tab, two spaces together or a space before a line end, both
            # substitutions change nothing: base64 attachments, most text)
            piece = _WSP.sub(b" ", _WSP_EOL.sub(b"\r\n", piece))
        # The piece's trailing CRLF pairs. Every LF follows a CR (checked above), so the
        # CRs and LFs at its end are pairs, after the last bare CR if there is one.
        tail = piece[len(piece.rstrip(b"\r\n")):]
        if tail.endswith(b"\r"):
            n = 0
        else:
            bare = tail.rfind(b"\r\r")
            n = (len(tail) - (bare + 1 if bare >= 0 else 0)) // 2
        core = piece[:len(piece) - 2 * n]
        if core:
            h.update(b"\r\n" * held)
            h.update(core)
            content = True
            held = n
        else:
            held += n
    if content or not relaxed:
        # strip_trailing_lines leaves one CRLF (adding it if the body did not end with
        # one); an empty body is that CRLF under simple, nothing under relaxed.
        h.update(b"\r\n")
    return headers, base64.b64encode(h.digest())


def _signature_header(raw: bytes, key: SigningKey, selector: bytes, domain: bytes,
                      include_headers: Sequence[bytes],
                      canonicalize: tuple[bytes, bytes] = (b"relaxed", b"relaxed"),
                      now: float | None = None) -> bytes:
    """The DKIM-Signature header line (CRLF-terminated) for `raw`, as `dkim.sign` makes it.

    RFC 6376 §3.5, §3.7, §5 with dkimpy's helpers for everything but the signature value: an
    RSA key signs rsa-sha256 (PKCS#1 v1.5 over the SHA-256 of the header hash input), an
    Ed25519 key ed25519-sha256 (RFC 8463: Ed25519 over that SHA-256 digest). Raises
    dkim.DKIMException for a message dkimpy cannot parse or a bad canonicalisation name.
    """
    if isinstance(key, rsa.RSAPrivateKey):
        algorithm = b"rsa-sha256"
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        algorithm = b"ed25519-sha256"
    else:
        raise TypeError(f"cannot DKIM-sign with a {type(key).__name__}")
    include = tuple(h.lower() for h in include_headers)
    if b"from" not in include:
        raise dkim.ParameterError("The From header field MUST be signed")
    try:
        canon = CanonicalizationPolicy.from_c_value(b"/".join(canonicalize))
    except InvalidCanonicalizationPolicyError as e:
        raise dkim.ParameterError(f"unknown canonicalization {canonicalize!r}: {e}") from e
    headers, body_hash = _headers_and_body_hash(raw, canon)
    stamp = int(time.time() if now is None else now)
    fields = [
        (b"v", b"1"), (b"a", algorithm), (b"c", canon.to_c_value()), (b"d", domain),
        (b"i", b"@" + domain), (b"q", b"dns/txt"), (b"s", selector),
        (b"t", str(stamp).encode("ascii")), (b"h", b" : ".join(include)), (b"bh", body_hash),
        # dkim.sign's 60-character placeholder: too long to share a line, it makes fold()
        # put b= on a line of its own, so that folding again with the real value moves no
        # other tag. The signature covers this header with b= emptied (RFC 6376 §3.7), and
        # under "simple" header canonicalisation its folding whitespace too.
        (b"b", _PLACEHOLDER),
    ]
    unsigned = dkim.fold(b"; ".join(b"=".join(f) for f in fields), namelen=len(_SIG_HEADER),
                         linesep=b"\r\n")
    unsigned = dkim.RE_BTAG.sub(b"\\1", unsigned)
    h = hashlib.sha256()
    dkim.hash_headers(h, canon, canon.canonicalize_headers(headers), include,
                      (_SIG_HEADER, b" " + unsigned), dict(fields))
    digest = h.digest()
    if isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    else:
        signature = key.sign(digest)
    fields[-1] = (b"b", base64.b64encode(signature))
    value = dkim.fold(b"; ".join(b"=".join(f) for f in fields) + b"\r\n",
                      namelen=len(_SIG_HEADER), linesep=b"\r\n")
    return _SIG_HEADER + b": " + value


class Signer:
    """Signs outgoing mail for one domain with one key.

    Made once at start-up from `load_key` output; the key is checked here so that a broken
    key fails before the first message is queued, not when the first one is sent.
    """

    def __init__(self, key_pem: bytes, selector: str, domain: str, *,
                 canonicalize: tuple[str, str] = ("relaxed", "relaxed")) -> None:
        key = serialization.load_pem_private_key(_normalise_key(key_pem), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):  # _normalise_key refuses anything else
            raise ValueError(f"expected an RSA key, got {type(key).__name__}")
        self._key: SigningKey = key  # parsed once, not once per message as dkim.sign does
        self.selector = _clean_name(selector, "selector")
        self.domain = _clean_name(domain, "domain")
        self._include = [h.encode("ascii") for h in DEFAULT_SIGNED_HEADERS + OVERSIGNED_HEADERS]
        # relaxed/relaxed (the default) survives what MTAs do in transit: refolding, trailing
        # whitespace, LF/CRLF conversion. "simple" for either half is there for callers
        # that want it (and for the tests that prove both sign as dkimpy does).
        self._canonicalize = (canonicalize[0].encode("ascii"), canonicalize[1].encode("ascii"))
        try:
            CanonicalizationPolicy.from_c_value(b"/".join(self._canonicalize))
        except InvalidCanonicalizationPolicyError:
            raise ValueError(f"not a DKIM canonicalization: {canonicalize!r}") from None

    def sign(self, raw: bytes) -> bytes:
        """Return the message with a DKIM-Signature header on top; the rest is unchanged
        (`signature_header(raw) + raw`)."""
        return self.signature_header(raw) + raw

    def signature_header(self, raw: bytes) -> bytes:
        """The DKIM-Signature header line (CRLF-terminated) to put on top of `raw`: what
        `sign` adds, without copying a big message to add it.

        Refuses (ValueError) a message whose From is outside the signing domain: signing it
        would lend our domain's reputation to an address we do not control, and DMARC would
        not align anyway, so it can only be a bug in the caller. Also refuses bare LF line
        ends: the signature header is CRLF-terminated and transports send bytes as they are,
        so a mixed message would reach the wire differently from how it was signed.
        """
        if raw.count(b"\n") != raw.count(b"\r\n"):
            raise ValueError("the message must use CRLF line endings throughout")
        for d in _from_domains(raw):
            if d != self.domain and not d.endswith("." + self.domain):
                raise ValueError(f"refusing to sign for {self.domain}: the From address is "
                                 f"at {d}")
        try:
            header = _signature_header(raw, self._key, self.selector.encode("ascii"),
                                       self.domain.encode("ascii"), self._include,
                                       self._canonicalize)
        except dkim.DKIMException as e:
            raise ValueError(f"cannot DKIM-sign the message: {e}") from e
        return header


DnsTxt = Callable[[bytes], bytes | None]


def verify(raw: bytes, dns_txt: DnsTxt | None = None) -> tuple[bool, str | None]:
    """Whether the message carries a valid DKIM signature, and for which domain (d=).

    Looks at every signature, not only the first as `dkim.verify` does: mail from hosted
    providers often carries the provider's signature above the sender's own, and the one that
    matters to a reader is the one for the From domain. Preference: a valid signature aligned
    with From, then any valid one; if none is valid, (False, d= of the first) so the archive can
    say which domain's signature failed. Any error (bad signature, missing key, DNS trouble)
    counts as not verified: this only ever informs a reader, it never rejects mail.

    `dns_txt` receives the query name (b"sel._domainkey.example.org.") and returns the joined
    TXT strings, or None. Default: a real DNS lookup through dnspython (blocking).
    """
    if dns_txt is None:
        dnsfunc = _dns_get_txt
    else:
        lookup = dns_txt

        def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
            # dkimpy passes timeout= as a keyword; hide that from callers.
            return lookup(name)

    try:
        d = dkim.DKIM(raw, minkey=MIN_KEY_BITS)
    except dkim.DKIMException:
        return False, None
    count = sum(1 for name, _ in d.headers if name.lower() == b"dkim-signature")
    try:
        from_domains = set(_from_domains(raw))
    except ValueError:
        from_domains = set()
    first: str | None = None
    any_valid: str | None = None
    for idx in range(count):
        d.domain = None
        try:
            ok = bool(d.verify(idx=idx, dnsfunc=dnsfunc))
        except dkim.DKIMException:
            ok = False
        domain = d.domain.decode("ascii", "replace").lower() if d.domain else None
        if first is None:
            first = domain
        if ok and domain is not None:
            if any(f == domain or f.endswith("." + domain) for f in from_domains):
                return True, domain
            any_valid = any_valid or domain
    if any_valid is not None:
        return True, any_valid
    return False, first
