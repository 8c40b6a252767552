"""Checking who sent a message: DKIM (dkimpy), SPF (RFC 7208 check_host) and DMARC (RFC 7489).

Every DNS question goes through one resolver object with four methods (`txt`, `a`, `aaaa`,
`mx`). Production uses `DnsResolver` (dnspython, with a timeout); tests hand the pipeline a
`StubResolver`, a dict of answers, so no test ever asks real DNS. A resolver answers an empty
list for a name or type that does not exist (NXDOMAIN or no data: a "void" answer) and raises
`DnsTempError` when DNS could not answer; every such failure ends as `temperror`, never a pass.

What is implemented of SPF (RFC 7208): the mechanisms `all`, `include`, `a`, `mx`, `ip4`,
`ip6` and `exists`, the `redirect` modifier (`exp` is read and ignored: mailflow writes no
rejection text), macros (§7, without `%{p}` validation, which always expands to "unknown"),
the limit of 10 DNS-querying terms (§4.6.4; also for each `mx`'s 10 names) and of 2 void
lookups, `permerror` for any syntax error in the record, `temperror` for a DNS failure.
`ptr` (which RFC 7208 asks publishers not to use) counts as a lookup and never matches.

DMARC (RFC 7489): the record at `_dmarc.<From domain>`, else at the organizational domain's
(`mailflow.core.authentication.organizational_domain`, a small public-suffix heuristic, not
the Public Suffix List), `p`/`sp`, `adkim`/`aspf` alignment. `pct` is read and not used for
sampling: a failing message is treated as if pct were 100.

This module decides nothing: `mailflow.core.authentication.evaluate` turns the results into a
verdict.
"""
from __future__ import annotations

import ipaddress
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from mailflow.core import authentication as AU
from mailflow.core.authentication import (Authentication, DkimResult, DmarcLookup, SpfResult,
                                          domain_of, organizational_domain, parse_dmarc)

log = logging.getLogger("mailflow.authenticate")
# dkimpy logs every missing key as an error; what it found is in our results instead.
_dkimpy_log = logging.getLogger("mailflow.authenticate.dkimpy")
_dkimpy_log.setLevel(logging.CRITICAL)

__all__ = ["DnsTempError", "Resolver", "DnsResolver", "StubResolver", "authenticate",
           "check_dkim", "check_spf", "lookup_dmarc", "client_address"]

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Net = ipaddress.IPv4Network | ipaddress.IPv6Network

LOOKUP_LIMIT = 10        # RFC 7208 §4.6.4: DNS-querying terms per check_host, includes counted
VOID_LIMIT = 2           # RFC 7208 §4.6.4: lookups answering NXDOMAIN or no data
MX_LIMIT = 10            # names one `mx` mechanism may look up
HEADER_LIMIT = 1 << 20   # a signed message's header section past this is not verified
# Names that never exist on the public internet (RFC 2606, RFC 6761). Answered as NXDOMAIN
# without a query, so test suites and demos (ask.example, gov.example) never reach the network.
RESERVED_TLDS = frozenset({"example", "invalid", "localhost", "test"})
CACHE_SIZE = 10_000      # DNS answers kept (by name and type)


class DnsTempError(Exception):
    """DNS did not answer (a timeout, SERVFAIL, no reachable server): try again later."""


class Resolver(Protocol):
    def txt(self, name: str) -> list[str]: ...
    def a(self, name: str) -> list[str]: ...
    def aaaa(self, name: str) -> list[str]: ...
    def mx(self, name: str) -> list[tuple[int, str]]: ...


def _name(name: str) -> str:
    return name.strip().lower().rstrip(".")


# -- production: dnspython ------------------------------------------------------------------------
class DnsResolver:
    """DNS through dnspython, each query bounded by `timeout` seconds.

    `nameservers`: addresses, or (address, port) pairs (`[classify] nameservers`); none means
    the system's resolvers from /etc/resolv.conf."""

    def __init__(self, timeout: float = 5.0,
                 nameservers: Sequence[str | tuple[str, int]] | None = None):
        import dns.nameserver
        import dns.resolver
        self.timeout = timeout
        if nameservers:
            self._resolver = dns.resolver.Resolver(configure=False)
            self._resolver.nameservers = [
                dns.nameserver.Do53Nameserver(*((n,) if isinstance(n, str) else n))
                for n in nameservers]
        else:
            try:
                self._resolver = dns.resolver.Resolver()
            except dns.resolver.NoResolverConfiguration:
                # No /etc/resolv.conf: every question is then a temperror, never a pass.
                self._resolver = dns.resolver.Resolver(configure=False)
        self._resolver.lifetime = timeout
        self._resolver.timeout = min(timeout, 2.0)
        # Answers (and NXDOMAIN) kept for their TTL, as a caching resolver keeps them: the
        # same few senders' SPF and DMARC records are asked for message after message.
        self._resolver.cache = dns.resolver.LRUCache(CACHE_SIZE)
        # In front of it, the same answers by (name, type) until the same expiry: a hit in
        # dnspython's cache still costs a resolution's set-up, about 50 µs, and a message
        # asks several names (tests/test_dns_nameservers.py; bench/README.md, seventh round).
        self._answers: dict[tuple[str, str], tuple[float, list[Any]]] = {}

    def _query(self, name: str, rdtype: str) -> list[Any]:
        name = _name(name)
        if not name or name.rpartition(".")[2] in RESERVED_TLDS:
            return []
        key = (name, rdtype)
        hit = self._answers.get(key)
        if hit is not None:
            if hit[0] > time.time():
                return hit[1]
            self._answers.pop(key, None)
        records, expires = self._resolve(name, rdtype)
        if expires is not None and expires > time.time():
            if len(self._answers) >= CACHE_SIZE:
                self._forget_expired()
            self._answers[key] = (expires, records)
        return records

    def _forget_expired(self) -> None:
        """Room in the front cache: the expired answers go, or the older half when none has
        expired (a dict keeps the order answers came in). Safe beside another thread asking
        (each step works on a copy of the keys)."""
        now = time.time()
        for key, (expires, _) in list(self._answers.items()):
            if expires <= now:
                self._answers.pop(key, None)
        if len(self._answers) >= CACHE_SIZE:
            for key in list(self._answers)[:CACHE_SIZE // 2]:
                self._answers.pop(key, None)

    def _resolve(self, name: str, rdtype: str) -> tuple[list[Any], float | None]:
        """The records, and until when they may be reused: dnspython's own expiry, the
        answer's smallest TTL (for NXDOMAIN, the negative TTL of RFC 2308, as dnspython's
        cache computes it). None: not to be kept (not a DNS name)."""
        import dns.exception
        import dns.name
        import dns.resolver
        try:
            answer = self._resolver.resolve(name + ".", rdtype, lifetime=self.timeout,
                                            raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN as e:
            return [], _nxdomain_expiry(self._resolver, e)
        except dns.resolver.NoAnswer:
            return [], None
        except (dns.name.LabelTooLong, dns.name.EmptyLabel, dns.name.NameTooLong,
                dns.name.BadEscape) as e:
            log.debug("not a DNS name %r: %s", name, e)
            return [], None
        except dns.exception.DNSException as e:
            raise DnsTempError(f"{rdtype} {name}: {type(e).__name__}") from None
        return list(answer.rrset or []), answer.expiration

    def txt(self, name: str) -> list[str]:
        return [b"".join(r.strings).decode("utf-8", "replace") for r in self._query(name, "TXT")]

    def a(self, name: str) -> list[str]:
        return [r.address for r in self._query(name, "A")]

    def aaaa(self, name: str) -> list[str]:
        return [r.address for r in self._query(name, "AAAA")]

    def mx(self, name: str) -> list[tuple[int, str]]:
        return [(int(r.preference), r.exchange.to_text(omit_final_dot=True))
                for r in self._query(name, "MX")]


def _nxdomain_expiry(resolver: Any, e: Any) -> float | None:
    """When an NXDOMAIN answer expires: the expiry of the answer dnspython's cache has just
    kept for it (computing it again from the response cost as much as the query's own
    parse). None when the cache does not hold it: then it is not kept either."""
    import dns.rdataclass
    import dns.rdatatype
    try:
        (qname,) = e.qnames()
        cached = resolver.cache.get((qname, dns.rdatatype.ANY, dns.rdataclass.IN))
        return cached.expiration if cached is not None else None
    except Exception:  # noqa: BLE001 - several names, another cache: not kept
        return None


# -- tests: a dict of answers -----------------------------------------------------------------------
class StubResolver:
    """DNS answers from a dict, for tests: `{"example.org": {"TXT": [...], "A": [...],
    "AAAA": [...], "MX": [(10, "mx.example.org")]}}`. A name or type not in it is a void
    answer; a name in `fail` (or "name/TYPE") raises DnsTempError, like a DNS server that
    does not answer. `queries` lists every (TYPE, name) asked, in order."""

    def __init__(self, records: dict[str, dict[str, Any]] | None = None, *,
                 fail: Iterable[str] = ()):
        self.records: dict[str, dict[str, list[Any]]] = {}
        for name, types in (records or {}).items():
            for rdtype, values in types.items():
                for v in values if isinstance(values, (list, tuple)) else [values]:
                    self.add(name, rdtype, v)
        self.fail = {f.lower() for f in fail}
        self.queries: list[tuple[str, str]] = []

    def add(self, name: str, rdtype: str, value: Any) -> "StubResolver":
        self.records.setdefault(_name(name), {}).setdefault(rdtype.upper(), []).append(value)
        return self

    def _get(self, name: str, rdtype: str) -> list[Any]:
        name = _name(name)
        self.queries.append((rdtype, name))
        if name in self.fail or f"{name}/{rdtype}".lower() in self.fail:
            raise DnsTempError(f"{rdtype} {name}: SERVFAIL (stub)")
        return list(self.records.get(name, {}).get(rdtype, []))

    def txt(self, name: str) -> list[str]:
        return [str(v) for v in self._get(name, "TXT")]

    def a(self, name: str) -> list[str]:
        return [str(v) for v in self._get(name, "A")]

    def aaaa(self, name: str) -> list[str]:
        return [str(v) for v in self._get(name, "AAAA")]

    def mx(self, name: str) -> list[tuple[int, str]]:
        out = []
        for v in self._get(name, "MX"):
            if isinstance(v, str):
                pref, _, host = v.partition(" ")
                v = (int(pref), host)
            out.append((int(v[0]), _name(str(v[1]))))
        return out


class _Session:
    """One message's DNS: answers remembered for the message, and an overall deadline so a
    hanging DNS cannot hold one message for minutes (past it, every question is temperror)."""

    def __init__(self, resolver: Resolver, budget: float | None):
        self.r = resolver
        self.deadline = None if budget is None else time.monotonic() + budget
        self.cache: dict[tuple[str, str], Any] = {}

    def _ask(self, rdtype: str, name: str, fn: Callable[[str], Any]) -> Any:
        key = (rdtype, _name(name))
        if key in self.cache:
            hit = self.cache[key]
            if isinstance(hit, DnsTempError):
                raise hit
            return hit
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DnsTempError(f"{rdtype} {name}: out of time for this message")
        try:
            value = fn(name)
        except DnsTempError as e:
            self.cache[key] = e
            raise
        self.cache[key] = value
        return value

    def txt(self, name: str) -> list[str]:
        return self._ask("TXT", name, self.r.txt)

    def a(self, name: str) -> list[str]:
        return self._ask("A", name, self.r.a)

    def aaaa(self, name: str) -> list[str]:
        return self._ask("AAAA", name, self.r.aaaa)

    def mx(self, name: str) -> list[tuple[int, str]]:
        return self._ask("MX", name, self.r.mx)


# -- DKIM -------------------------------------------------------------------------------------------
class _DkimTemp(Exception):
    pass


def _sig_tags(value: bytes) -> dict[str, str]:
    """d=, s= and b= of a DKIM-Signature, read loosely (even from a broken signature)."""
    tags = {}
    for part in value.decode("ascii", "replace").split(";"):
        k, sep, v = part.partition("=")
        if sep:
            tags.setdefault(k.strip().lower(), "".join(v.split()))
    return tags


def check_dkim(raw: bytes, dns: Resolver) -> tuple[DkimResult, ...]:
    """Every DKIM signature of the message, each verified on its own (dkimpy)."""
    import dkim

    from mailflow.outbound.signing import MIN_KEY_BITS
    # Only the header section says whether there is a signature: look there first, so an
    # unsigned message (most hostile ones) is never copied and split by dkimpy.
    end = min((i for i in (raw.find(b"\r\n\r\n"), raw.find(b"\n\n")) if i >= 0),
              default=len(raw))
    if not re.search(rb"(?im)^dkim-signature\s*:", raw[:end]):
        return ()
    if end > HEADER_LIMIT:
        return (DkimResult(AU.PERMERROR, reason=f"the header section is over {HEADER_LIMIT} "
                           "bytes: not verified"),)
    try:
        d = dkim.DKIM(raw, minkey=MIN_KEY_BITS, logger=_dkimpy_log)
    except Exception as e:  # noqa: BLE001 - dkimpy raises odd things on odd input
        return (DkimResult(AU.PERMERROR, reason=f"the message cannot be read: {e}"[:200]),)
    sigs = [v for k, v in d.headers if k.lower() == b"dkim-signature"]
    results = []
    for idx, value in enumerate(sigs[:10]):
        tags = _sig_tags(value)
        domain, selector = tags.get("d", "").lower(), tags.get("s", "")
        b = tags.get("b", "")[:8]
        state: dict[str, Any] = {"found": None}

        def dnsfunc(name: bytes, timeout: float = 5, state: dict[str, Any] = state) -> bytes | None:
            try:
                records = dns.txt(name.decode("ascii", "replace"))
            except DnsTempError as e:
                state["temp"] = str(e)
                raise _DkimTemp(str(e)) from None
            text = next((r for r in records if "p=" in r), records[0] if records else None)
            state["found"] = text
            return text.encode("utf-8", "replace") if text is not None else None

        try:
            ok = bool(d.verify(idx=idx, dnsfunc=dnsfunc))
        except _DkimTemp as e:
            results.append(DkimResult(AU.TEMPERROR, domain, selector, b,
                                      f"DNS failed for the key: {e}"[:200]))
            continue
        except dkim.ValidationError as e:
            result = AU.FAIL if "body hash" in str(e) else AU.PERMERROR
            why = "the body was changed after signing" if result == AU.FAIL else str(e)
            results.append(DkimResult(result, domain, selector, b, why[:200]))
            continue
        except Exception as e:  # noqa: BLE001 - a broken signature or key is this signature's
            results.append(DkimResult(AU.PERMERROR, domain, selector, b,
                                      f"{type(e).__name__}: {e}"[:200]))
            continue
        if ok:
            results.append(DkimResult(AU.PASS, domain, selector, b))
        elif state["found"] is None:
            results.append(DkimResult(AU.PERMERROR, domain, selector, b,
                                      f"no key published at {selector}._domainkey.{domain}"))
        else:
            results.append(DkimResult(AU.FAIL, domain, selector, b,
                                      "the signature does not verify"))
    return tuple(results)


# -- SPF (RFC 7208) -------------------------------------------------------------------------------
class _PermError(Exception):
    pass


class _TempError(Exception):
    pass


_MECHANISMS = ("all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists")
_MODIFIER = re.compile(r"^([a-z][a-z0-9_.\-]*)=(.*)$", re.I)
_DIRECTIVE = re.compile(r"^([+\-~?]?)([a-z][a-z0-9_.\-]*)(.*)$", re.I)
_QUALIFIERS = {"+": AU.PASS, "": AU.PASS, "-": AU.FAIL, "~": AU.SOFTFAIL, "?": AU.NEUTRAL}
_SPF_VERSION = re.compile(r"^v=spf1(\s|$)", re.I)


def _valid_domain(domain: str) -> bool:
    labels = domain.split(".")
    return (len(labels) >= 2 and all(0 < len(x) <= 63 for x in labels) and len(domain) <= 253)


class _Spf:
    """One check_host() evaluation with its shared lookup counters (RFC 7208 §4)."""

    def __init__(self, dns: Resolver, ip: IP, sender: str, helo: str):
        self.dns, self.ip, self.sender, self.helo = dns, ip, sender, helo
        self.lookups = 0
        self.voids = 0

    # counters ---------------------------------------------------------------------------------
    def _count(self) -> None:
        self.lookups += 1
        if self.lookups > LOOKUP_LIMIT:
            raise _PermError(f"more than {LOOKUP_LIMIT} DNS lookups")

    def _void(self, answers: list[Any]) -> list[Any]:
        if not answers:
            self.voids += 1
            if self.voids > VOID_LIMIT:
                raise _PermError(f"more than {VOID_LIMIT} void DNS lookups")
        return answers

    def _q(self, fn: Callable[[str], list[Any]], name: str) -> list[Any]:
        try:
            return fn(name)
        except DnsTempError as e:
            raise _TempError(str(e)) from None

    # macros (§7) ------------------------------------------------------------------------------
    def expand(self, spec: str, domain: str) -> str:
        local, _, sdomain = self.sender.rpartition("@")
        if isinstance(self.ip, ipaddress.IPv4Address):
            i, v = str(self.ip), "in-addr"
        else:
            i, v = ".".join(self.ip.exploded.replace(":", "")), "ip6"
        values = {"s": self.sender, "l": local or "postmaster", "o": sdomain, "d": domain,
                  "i": i, "p": "unknown", "v": v, "h": self.helo or "unknown"}
        out, n = [], 0
        while n < len(spec):
            ch = spec[n]
            if ch != "%":
                if not "\x21" <= ch <= "\x7e":
                    raise _PermError(f"bad character in {spec!r}")
                out.append(ch)
                n += 1
                continue
            nxt = spec[n + 1:n + 2]
            if nxt == "%":
                out.append("%")
            elif nxt == "_":
                out.append(" ")
            elif nxt == "-":
                out.append("%20")
            elif nxt == "{":
                end = spec.find("}", n)
                m = re.fullmatch(r"([slodiphv])(\d*)(r?)([.\-+,/_=]*)", spec[n + 2:end],
                                 re.I) if end > 0 else None
                if m is None:
                    raise _PermError(f"bad macro in {spec!r}")
                letter, digits, reverse, delims = m.groups()
                value = values[letter.lower()]
                parts = re.split("[" + re.escape(delims or ".") + "]", value)
                if reverse:
                    parts.reverse()
                if digits:
                    if int(digits) == 0:
                        raise _PermError(f"bad macro in {spec!r}")
                    parts = parts[-int(digits):]
                text = ".".join(parts)
                if letter.isupper():
                    from urllib.parse import quote
                    text = quote(text, safe="")
                out.append(text)
                n = end + 1
                continue
            else:
                raise _PermError(f"bad macro in {spec!r}")
            n += 2
        result = "".join(out).rstrip(".")
        while len(result) > 253 and "." in result:   # §7.3: drop labels from the left
            result = result.partition(".")[2]
        return result

    # parsing ----------------------------------------------------------------------------------
    def parse(self, record: str) -> tuple[list[tuple[str, str, str]], str | None, bool]:
        """The directives (qualifier, mechanism, argument), redirect= and whether `all` is
        there; _PermError for anything RFC 7208 §4.6 calls a syntax error."""
        directives: list[tuple[str, str, str]] = []
        redirect: str | None = None
        seen: set[str] = set()
        has_all = False
        for term in record.split()[1:]:
            mod = _MODIFIER.match(term)
            if mod and ":" not in mod.group(1) and "/" not in mod.group(1):
                name, value = mod.group(1).lower(), mod.group(2)
                if name in ("redirect", "exp"):
                    if name in seen:
                        raise _PermError(f"{name}= given twice")
                    seen.add(name)
                    if not value:
                        raise _PermError(f"{name}= without a domain")
                    self.expand(value, "x.invalid")      # syntax check only
                    if name == "redirect":
                        redirect = value
                continue
            m = _DIRECTIVE.match(term)
            if m is None:
                raise _PermError(f"not a term: {term!r}")
            qualifier, mech, rest = m.group(1), m.group(2).lower(), m.group(3)
            if mech not in _MECHANISMS:
                raise _PermError(f"unknown mechanism {mech!r}")
            if mech == "all":
                if rest:
                    raise _PermError(f"bad term {term!r}")
                has_all = True
            elif mech in ("include", "exists"):
                if not rest.startswith(":") or len(rest) < 2:
                    raise _PermError(f"{mech} needs a domain: {term!r}")
                self.expand(rest[1:], "x.invalid")
            elif mech in ("a", "mx"):
                spec, cidr4, cidr6 = self._dual_cidr(rest, term)
                if spec:
                    self.expand(spec, "x.invalid")
            elif mech == "ptr":
                if rest and (not rest.startswith(":") or len(rest) < 2):
                    raise _PermError(f"bad term {term!r}")
            elif mech in ("ip4", "ip6"):
                self._network(mech, rest, term)
            directives.append((qualifier, mech, rest))
        return directives, redirect, has_all

    @staticmethod
    def _dual_cidr(rest: str, term: str) -> tuple[str, int, int]:
        m = re.fullmatch(r"(?::([^/]+))?(?:/(\d{1,2}))?(?://(\d{1,3}))?", rest)
        if m is None:
            raise _PermError(f"bad term {term!r}")
        spec, c4, c6 = m.group(1) or "", m.group(2), m.group(3)
        cidr4 = int(c4) if c4 is not None else 32
        cidr6 = int(c6) if c6 is not None else 128
        if cidr4 > 32 or cidr6 > 128 or (c4 is not None and c4.startswith("0") and c4 != "0"):
            raise _PermError(f"bad prefix length in {term!r}")
        return spec, cidr4, cidr6

    @staticmethod
    def _network(mech: str, rest: str, term: str) -> Net:
        if not rest.startswith(":") or len(rest) < 2:
            raise _PermError(f"{mech} needs an address: {term!r}")
        text = rest[1:]
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise _PermError(f"bad address in {term!r}") from None
        if (mech == "ip4") != (net.version == 4):
            raise _PermError(f"{mech} with an IPv{net.version} address: {term!r}")
        return net

    # evaluation -------------------------------------------------------------------------------
    def check_host(self, domain: str, depth: int = 0) -> tuple[str, str]:
        domain = _name(domain)
        if not _valid_domain(domain):
            return AU.NONE, f"{domain or '(empty)'} is not a domain SPF can be checked for"
        try:
            records = [r for r in self._q(self.dns.txt, domain) if _SPF_VERSION.match(r)]
        except _TempError as e:
            return AU.TEMPERROR, str(e)
        if not records:
            return AU.NONE, f"{domain} publishes no SPF record"
        if len(records) > 1:
            return AU.PERMERROR, f"{domain} publishes {len(records)} SPF records"
        try:
            return self._evaluate(domain, records[0], depth)
        except _PermError as e:
            return AU.PERMERROR, (str(e) if depth else f"{domain}: {e}")
        except _TempError as e:
            return AU.TEMPERROR, str(e)

    def _evaluate(self, domain: str, record: str, depth: int) -> tuple[str, str]:
        directives, redirect, has_all = self.parse(record)
        for qualifier, mech, rest in directives:
            if self._matches(domain, mech, rest, depth):
                result = _QUALIFIERS[qualifier]
                return result, f"{domain} matched {qualifier}{mech}{rest}"
        if redirect is not None and not has_all:
            self._count()
            target = self.expand(redirect, domain)
            result, why = self.check_host(target, depth + 1)
            if result == AU.NONE:
                return AU.PERMERROR, f"redirect to {target}, which has no SPF record"
            return result, why
        return AU.NEUTRAL, f"{domain}: nothing matched {self.ip}"

    def _addresses(self, name: str) -> list[IP]:
        fn = self.dns.a if isinstance(self.ip, ipaddress.IPv4Address) else self.dns.aaaa
        out = []
        for text in self._q(fn, name):
            try:
                out.append(ipaddress.ip_address(text))
            except ValueError:
                continue
        return out

    def _in(self, addrs: list[IP], cidr4: int, cidr6: int) -> bool:
        for a in addrs:
            if a.version != self.ip.version:
                continue
            prefix = cidr4 if a.version == 4 else cidr6
            if self.ip in ipaddress.ip_network(f"{a}/{prefix}", strict=False):
                return True
        return False

    def _matches(self, domain: str, mech: str, rest: str, depth: int) -> bool:
        if mech == "all":
            return True
        if mech in ("ip4", "ip6"):
            net = self._network(mech, rest, mech + rest)
            return net.version == self.ip.version and self.ip in net
        if mech == "include":
            self._count()
            target = self.expand(rest[1:], domain)
            result, why = self.check_host(target, depth + 1)
            if result == AU.PASS:
                return True
            if result in (AU.FAIL, AU.SOFTFAIL, AU.NEUTRAL):
                return False
            if result == AU.TEMPERROR:
                raise _TempError(why)
            if result == AU.NONE:
                raise _PermError(f"include:{target}, which has no SPF record")
            raise _PermError(why if why.startswith("in ") else f"in include:{target}: {why}")
        if mech in ("a", "mx"):
            spec, cidr4, cidr6 = self._dual_cidr(rest, mech + rest)
            target = self.expand(spec, domain) if spec else domain
            self._count()
            if mech == "a":
                return self._in(self._void(self._addresses(target)), cidr4, cidr6)
            exchanges = self._void(self._q(self.dns.mx, target))
            if len(exchanges) > MX_LIMIT:
                raise _PermError(f"mx:{target} names more than {MX_LIMIT} servers")
            for _, host in sorted(exchanges):
                if self._in(self._addresses(host), cidr4, cidr6):
                    return True
            return False
        if mech == "ptr":
            self._count()
            return False   # not implemented: see the module doc
        if mech == "exists":
            self._count()
            target = self.expand(rest[1:], domain)
            return bool(self._void(self._q(self.dns.a, target)))
        raise _PermError(f"unknown mechanism {mech!r}")


def check_spf(ip: str | None, mail_from: str | None, helo: str | None, dns: Resolver,
              why_no_ip: str = "") -> SpfResult:
    """RFC 7208 check_host() for the MAIL FROM identity, or for HELO when MAIL FROM is <>."""
    mail_from = (mail_from or "").strip().strip("<>").lower()
    helo = (helo or "").strip().strip("[]").lower()
    if "@" in mail_from:
        local, _, domain = mail_from.rpartition("@")
        sender, identity = f"{local or 'postmaster'}@{domain}", "mailfrom"
    elif helo:
        domain, sender, identity = helo, f"postmaster@{helo}", "helo"
    else:
        return SpfResult(AU.NONE, reason="no envelope sender or HELO name to check")
    domain = _name(domain)
    addr = AU.parse_ip(ip)
    if addr is None:
        return SpfResult(AU.NONE, domain, sender, identity,
                         reason=why_no_ip or "the client's address is not known")
    result, why = _Spf(dns, addr, sender, helo).check_host(domain)
    return SpfResult(result, domain, sender, identity, str(addr), why[:300])


# -- DMARC (RFC 7489 §6.6.3) ------------------------------------------------------------------------
def lookup_dmarc(from_domain: str, dns: Resolver) -> DmarcLookup:
    """The DMARC record for a From domain: its own, else its organizational domain's."""
    from_domain = _name(from_domain)
    if not from_domain:
        return DmarcLookup(None, reason="no From domain")
    org = organizational_domain(from_domain)
    for where in dict.fromkeys([from_domain, org]):
        try:
            texts = [t for t in dns.txt(f"_dmarc.{where}") if AU.is_dmarc_record(t)]
        except DnsTempError as e:
            return DmarcLookup(None, AU.TEMPERROR, f"DNS failed for _dmarc.{where}: {e}"[:200])
        if len(texts) > 1:
            return DmarcLookup(None, AU.PERMERROR, f"_dmarc.{where} has {len(texts)} records")
        if texts:
            try:
                return DmarcLookup(parse_dmarc(texts[0], where),
                                   reason=f"record at _dmarc.{where}")
            except ValueError as e:
                return DmarcLookup(None, AU.PERMERROR, f"_dmarc.{where}: {e}"[:200])
    return DmarcLookup(None, reason=f"no DMARC record for {from_domain}")


# -- where the client was ----------------------------------------------------------------------------
def client_address(via: str, peer: str | None, helo: str | None, received: Sequence[str],
                   trusted: Sequence[Net], from_received: bool) -> tuple[str | None, str | None, str]:
    """The address and HELO name SPF is checked for, and how they were found.

    Over SMTP and LMTP, the peer of the connection, unless it is one of the site's own relays
    (`trusted`, loopback by default: a Postfix in front): then the Received headers those
    relays wrote. Over ingest and IMAP there is no peer, so the Received headers are read only
    when the site says its own server wrote the topmost one (`from_received`); otherwise SPF is
    "none".
    """
    if via in ("ingest", "imap"):
        if not from_received:
            return None, None, (f"taken in by {via}: the client's address is not known "
                                "([classify] spf_from_received is off)")
        return AU.client_from_received(received, trusted)
    ip = AU.parse_ip(peer)
    if ip is None:
        if via == "lmtp":   # over a unix socket: the Received headers of our own MTA
            return AU.client_from_received(received, trusted)
        return None, None, f"taken in by {via or 'an unknown way'}: no client address"
    if not AU.in_networks(ip, trusted):
        return str(ip), helo, "the SMTP client"
    return AU.client_from_received(received, trusted)


# -- all of it ------------------------------------------------------------------------------------------
def authenticate(raw: bytes, *, from_addr: str, mail_from: str | None, client_ip: str | None,
                 helo: str | None, resolver: Resolver, why_no_ip: str = "",
                 budget: float | None = None) -> Authentication:
    """DKIM, SPF and DMARC for one message, and the verdict (`core.authentication`).

    `budget` bounds the seconds spent on DNS for the whole message; past it every further
    question is a temperror.
    """
    dns = _Session(resolver, budget)
    dkim_results = check_dkim(raw, dns)
    spf = check_spf(client_ip, mail_from, helo, dns, why_no_ip)
    from_domain = domain_of(from_addr)
    dmarc = lookup_dmarc(from_domain, dns) if from_domain else DmarcLookup(None)
    return AU.evaluate(from_domain, spf, dkim_results, dmarc)


def trusted_networks(values: Iterable[str]) -> list[Net]:
    return [ipaddress.ip_network(v, strict=False) for v in values]
