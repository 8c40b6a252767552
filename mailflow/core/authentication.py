"""Who really sent a message: SPF, DKIM and DMARC results in, one verdict out. Pure: no I/O.

The adapter (`mailflow.mail.authenticate`) asks DNS and dkimpy; this module decides what the
answers mean, writes them down as an RFC 8601 `Authentication-Results` value with the site's
domain as authserv-id, and says whether a reply that claims to come from an authority must be
held for an admin.

Alignment (RFC 7489 §3.1): a DKIM signature (its d=) or the SPF-checked envelope domain is
*aligned* with the From domain when the two are equal (strict) or share an organizational
domain (relaxed, the default). The organizational domain comes from a small public-suffix
heuristic (`organizational_domain`), not from the Public Suffix List: a country-code domain
whose second label is one of the usual registry labels (gov, co, ac, org, ...) keeps three
labels (`camden.gov.uk`), anything else two (`example.org`). It errs on the side of *strict*
for the rare suffix it does not know (a three-label suffix such as `k12.ca.us` makes
relaxed alignment stricter, never looser across two registrants of one public suffix it knows).

The verdict:

- `pass`: an aligned DKIM signature verified, or SPF passed for an aligned envelope domain
  (that is DMARC's pass, whether or not the domain publishes a DMARC record).
- `fail`: nothing aligned passed and the domain's owner says mail like this is not theirs:
  DMARC fails under a published record, or SPF ends in `fail` (`-all`) for an aligned envelope
  domain.
- `temperror`: nothing aligned passed and a DNS failure left a check undecided. Never a pass.
- `permerror`: nothing aligned passed and a record the domain publishes is broken.
- `none`: nothing could be checked (no signature, no SPF policy, no DMARC record).
"""
from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Authentication", "DkimResult", "DmarcRecord", "DmarcLookup", "DmarcResult",
           "SpfResult", "aligned", "client_from_received", "envelope_matches", "evaluate",
           "hold_reason", "organizational_domain", "parse_dmarc", "HOLD_MODES"]

PASS, FAIL, NONE, NEUTRAL, SOFTFAIL = "pass", "fail", "none", "neutral", "softfail"
TEMPERROR, PERMERROR = "temperror", "permerror"
SPF_RESULTS = (NONE, NEUTRAL, PASS, FAIL, SOFTFAIL, TEMPERROR, PERMERROR)
DKIM_RESULTS = (NONE, PASS, FAIL, NEUTRAL, TEMPERROR, PERMERROR)

# [classify] hold_unverified: which authority replies wait for an admin.
#   failed     - the verdict is fail under an enforcing policy, or temperror (the default)
#   unverified - anything that does not pass (also "none": the domain publishes nothing)
#   never      - record the result, hold nothing
HOLD_MODES = ("failed", "unverified", "never")


# -- values -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpfResult:
    result: str                   # one of SPF_RESULTS
    domain: str = ""              # the domain checked: MAIL FROM's, or HELO's for <>
    mailfrom: str = ""            # the identity as checked (postmaster@helo for <>)
    identity: str = "mailfrom"    # mailfrom | helo
    ip: str | None = None         # the client the check was made for
    reason: str = ""


@dataclass(frozen=True)
class DkimResult:
    result: str                   # one of DKIM_RESULTS (not none: a signature exists)
    domain: str = ""              # d=
    selector: str = ""            # s=
    b: str = ""                   # the first characters of b=, to tell signatures apart
    reason: str = ""


@dataclass(frozen=True)
class DmarcRecord:
    domain: str                   # where the record was found (From domain or its org domain)
    p: str                        # none | quarantine | reject
    sp: str | None = None         # for subdomains of `domain`
    adkim: str = "r"              # r | s
    aspf: str = "r"
    pct: int = 100


@dataclass(frozen=True)
class DmarcLookup:
    """What DNS said at _dmarc.<from domain> (and at the org domain when that had nothing)."""
    record: DmarcRecord | None
    error: str | None = None      # temperror | permerror
    reason: str = ""


@dataclass(frozen=True)
class DmarcResult:
    result: str                   # pass | fail | none | temperror | permerror
    policy: str | None = None     # the policy that applies to this From domain (p or sp)
    from_domain: str = ""
    reason: str = ""


@dataclass(frozen=True)
class Authentication:
    from_domain: str
    spf: SpfResult
    dkim: tuple[DkimResult, ...]
    dmarc: DmarcResult
    verdict: str                  # pass | fail | temperror | permerror | none
    reason: str
    aligned_dkim: str | None = None   # d= of the aligned signature that passed
    aligned_spf: bool = False         # SPF passed for an aligned envelope domain

    @property
    def passed(self) -> bool:
        return self.verdict == PASS

    def header_value(self, authserv_id: str) -> str:
        """The value of our own `Authentication-Results` header (RFC 8601 §2.2)."""
        parts = [_token(authserv_id) or "localhost"]
        if not self.dkim:
            parts.append("dkim=none")
        for d in self.dkim:
            text = f"dkim={d.result}"
            if d.reason and d.result != PASS:
                text += f" reason={_quoted(d.reason)}"
            if d.domain:
                text += f" header.d={_token(d.domain)}"
            if d.selector:
                text += f" header.s={_token(d.selector)}"
            if d.b:
                text += f" header.b={_token(d.b)}"
            parts.append(text)
        s = self.spf
        text = f"spf={s.result}"
        if s.reason and s.result != PASS:
            text += f" reason={_quoted(s.reason)}"
        if s.ip:
            text += f" ({_comment('client ' + s.ip)})"
        if s.identity == "helo" and s.domain:
            text += f" smtp.helo={_token(s.domain)}"
        elif s.mailfrom:
            text += f" smtp.mailfrom={_value(s.mailfrom)}"
        parts.append(text)
        m = self.dmarc
        text = f"dmarc={m.result}"
        if m.reason and m.result != PASS:
            text += f" reason={_quoted(m.reason)}"
        if m.policy:
            text += f" ({_comment('p=' + m.policy)})"
        if m.from_domain:
            text += f" header.from={_token(m.from_domain)}"
        parts.append(text)
        return "; ".join(parts)


# -- header values are tokens or quoted strings, never a line break -----------------------------
_TOKEN = re.compile(r"[^\x21-\x7e]|[()<>@,;:\\\"/\[\]?=]")
_CTL = re.compile(r"[\x00-\x1f\x7f\u0085\u2028\u2029]")


def _token(value: str) -> str:
    return _TOKEN.sub("", value)[:255]


def _value(value: str) -> str:
    """An address as an RFC 8601 pvalue: kept as it is when it is plain, else quoted."""
    clean = _CTL.sub("", value)[:320]
    return clean if re.fullmatch(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.]*@?[A-Za-z0-9.\-]*", clean) \
        else _quoted(clean)


def _quoted(value: str) -> str:
    clean = _CTL.sub(" ", value)[:200].replace("\\", "\\\\").replace('"', '\\"')
    return f'"{clean}"'


def _comment(value: str) -> str:
    return _CTL.sub(" ", value)[:200].replace("(", "[").replace(")", "]").replace("\\", "/")


# -- domains ------------------------------------------------------------------------------------
# Second-level labels under which country-code registries hand out names (gov.uk, co.jp,
# com.au, gob.es, gouv.fr, ...). A heuristic, not the Public Suffix List: see the module doc.
_REGISTRY_LABELS = frozenset({
    "ac", "co", "com", "edu", "gov", "govt", "gob", "gouv", "go", "gv", "gc", "net", "org",
    "or", "ne", "mil", "nhs", "police", "sch", "ltd", "plc", "nom", "lg", "mod", "nic", "int",
    "judiciary", "parliament", "res", "info", "biz", "med", "kommune", "gen", "ed",
})


def _labels(domain: str) -> list[str]:
    return [x for x in domain.lower().strip().rstrip(".").split(".") if x]


def organizational_domain(domain: str) -> str:
    """The domain a registrant holds (RFC 7489 §3.2), by the heuristic in the module doc."""
    labels = _labels(domain)
    if len(labels) <= 2:
        return ".".join(labels)
    if len(labels[-1]) == 2 and labels[-2] in _REGISTRY_LABELS:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def aligned(a: str, b: str, mode: str = "r") -> bool:
    """Whether two domains align: equal (strict, "s"), or one organizational domain ("r")."""
    a, b = ".".join(_labels(a)), ".".join(_labels(b))
    if not a or not b:
        return False
    if a == b:
        return True
    return mode != "s" and organizational_domain(a) == organizational_domain(b)


def domain_of(address: str) -> str:
    return ".".join(_labels(address.rpartition("@")[2])) if "@" in address else ""


# -- DMARC records ------------------------------------------------------------------------------
_POLICIES = ("none", "quarantine", "reject")


def parse_dmarc(text: str, domain: str) -> DmarcRecord:
    """Read one `v=DMARC1; p=...` record (RFC 7489 §6.3); ValueError when it is unusable.

    A missing or unknown p= makes the record unusable unless it names a report address
    (rua=), when it counts as p=none (§6.6.3). Unknown tags are ignored; a bad adkim/aspf/pct
    falls back to its default.
    """
    tags: dict[str, str] = {}
    for i, part in enumerate(text.split(";")):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        name, value = name.strip().lower(), value.strip()
        if not sep:
            raise ValueError(f"not a tag=value pair: {part!r}")
        if i == 0 and (name != "v" or value != "DMARC1"):
            raise ValueError("the record does not start with v=DMARC1")
        tags.setdefault(name, value)
    p = tags.get("p", "").lower()
    if p not in _POLICIES:
        if "rua" not in tags:
            raise ValueError(f"no valid p= ({tags.get('p')!r})")
        p = "none"
    sp = tags.get("sp", "").lower() or None
    if sp not in (None, *_POLICIES):
        sp = None
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    try:
        pct = max(0, min(100, int(tags.get("pct", "100"))))
    except ValueError:
        pct = 100
    return DmarcRecord(domain=".".join(_labels(domain)), p=p, sp=sp,
                       adkim=adkim if adkim in ("r", "s") else "r",
                       aspf=aspf if aspf in ("r", "s") else "r", pct=pct)


def is_dmarc_record(text: str) -> bool:
    return re.match(r"\s*v\s*=\s*DMARC1\s*(;|$)", text) is not None


# -- the verdict --------------------------------------------------------------------------------
def evaluate(from_domain: str, spf: SpfResult, dkim: Sequence[DkimResult],
             dmarc: DmarcLookup) -> Authentication:
    """Combine the three checks for a message whose From domain is `from_domain`."""
    from_domain = ".".join(_labels(from_domain))
    record = dmarc.record
    adkim = record.adkim if record else "r"
    aspf = record.aspf if record else "r"
    dkim = tuple(dkim)
    if not from_domain:
        return Authentication(from_domain="", spf=spf, dkim=dkim,
                              dmarc=DmarcResult(NONE, reason="no usable From address"),
                              verdict=NONE, reason="the message has no usable From address")
    ok_dkim = next((d.domain for d in dkim if d.result == PASS
                    and aligned(d.domain, from_domain, adkim)), None)
    spf_aligned = bool(spf.domain) and aligned(spf.domain, from_domain, aspf)
    ok_spf = spf.result == PASS and spf_aligned
    policy = None
    if record is not None:
        sub = record.domain != from_domain
        policy = (record.sp or record.p) if sub else record.p
    if ok_dkim or ok_spf:
        how = f"DKIM signature of {ok_dkim}" if ok_dkim else f"SPF for {spf.domain}"
        if record is not None:
            dm = DmarcResult(PASS, policy, from_domain, f"aligned {how} passed")
        elif dmarc.error is not None:
            dm = DmarcResult(dmarc.error, None, from_domain, dmarc.reason)
        else:
            dm = DmarcResult(NONE, None, from_domain, "no DMARC record")
        return Authentication(from_domain, spf, dkim, dm, verdict=PASS,
                              reason=f"{from_domain} is vouched for by the aligned {how}",
                              aligned_dkim=ok_dkim, aligned_spf=ok_spf)
    # Nothing aligned passed: why not, and does the domain's owner say anything about it?
    aligned_dkim = [d for d in dkim if aligned(d.domain, from_domain, adkim)]
    temp = [f"DKIM key of {d.domain}" for d in aligned_dkim if d.result == TEMPERROR]
    if spf_aligned and spf.result == TEMPERROR:
        temp.append(f"SPF of {spf.domain}")
    if dmarc.error == TEMPERROR:
        temp.append(f"DMARC record of {from_domain}")
    if record is not None and temp:
        dm = DmarcResult(TEMPERROR, policy, from_domain, "undecided: " + ", ".join(temp))
    elif record is not None:
        dm = DmarcResult(FAIL, policy, from_domain,
                         "no aligned DKIM signature or SPF pass")
    elif dmarc.error is not None:
        dm = DmarcResult(dmarc.error, None, from_domain, dmarc.reason)
    else:
        dm = DmarcResult(NONE, None, from_domain, "no DMARC record")
    if record is not None and not temp:
        return Authentication(from_domain, spf, dkim, dm, verdict=FAIL,
                              reason=f"DMARC fails for {from_domain} (p={policy}): no aligned "
                                     "DKIM signature verified and SPF did not pass for an "
                                     "aligned envelope domain")
    if spf_aligned and spf.result == FAIL:
        return Authentication(from_domain, spf, dkim, dm, verdict=FAIL,
                              reason=f"SPF of {spf.domain} says {spf.ip or 'this client'} may "
                                     "not send its mail, and no aligned DKIM signature verified")
    if temp:
        return Authentication(from_domain, spf, dkim, dm, verdict=TEMPERROR,
                              reason="a DNS failure left it undecided: " + ", ".join(temp))
    perm = [f"SPF record of {spf.domain}"] if spf_aligned and spf.result == PERMERROR else []
    if dmarc.error == PERMERROR:
        perm.append(f"DMARC record of {from_domain}")
    if perm:
        return Authentication(from_domain, spf, dkim, dm, verdict=PERMERROR,
                              reason="nothing passed and a published record is broken: "
                                     + ", ".join(perm))
    said = []
    if aligned_dkim:
        said.append("its DKIM signature did not verify")
    else:
        said.append("no DKIM signature of its domain")
    said.append(f"SPF {spf.result}" + (f" for {spf.domain}" if spf.domain else ""))
    said.append("no DMARC record")
    return Authentication(from_domain, spf, dkim, dm, verdict=NONE,
                          reason=f"nothing vouches for {from_domain}: " + ", ".join(said))


def hold_reason(auth: Authentication | None, mode: str = "failed") -> str | None:
    """Why a reply claiming to be the authority must wait for an admin, or None to let it in.

    "failed" (the default): when the verdict is fail under a policy that asks receivers to act
    (DMARC p=quarantine or p=reject, or SPF -all for an aligned envelope domain), or temperror.
    A DMARC failure under p=none, the domain's owner says, is not to be acted on. "unverified":
    whenever the verdict is not pass. "never": nothing is held.
    """
    if auth is None or mode == "never" or auth.passed:
        return None
    if mode == "unverified":
        return f"nothing authenticates the sender ({auth.verdict}): {auth.reason}"
    if auth.verdict == TEMPERROR:
        return f"the sender could not be authenticated (temperror): {auth.reason}"
    if auth.verdict == FAIL:
        enforcing = auth.dmarc.result == FAIL and auth.dmarc.policy in ("quarantine", "reject")
        spf_fail = auth.spf.result == FAIL and aligned(auth.spf.domain, auth.from_domain)
        if enforcing or spf_fail:
            return f"the sender failed authentication: {auth.reason}"
    return None


# -- where the message came from ------------------------------------------------------------------
_RECEIVED_IP = re.compile(r"\[(?:IPv6:)?([0-9A-Fa-f:.]+)\]")
_RECEIVED_FROM = re.compile(r"^\s*from\s+(\S+)(.*?)(?:\bby\b|;|$)", re.I | re.S)


def parse_ip(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An IP address from "ip", "ip:port", "[v6]:port" or "v6" (the spool's peer), or None."""
    if not text:
        return None
    text = text.strip()
    m = re.fullmatch(r"\[([^\]]+)\](?::\d+)?", text)
    if m:
        text = m.group(1)
    elif text.count(":") == 1:
        text = text.rpartition(":")[0]
    try:
        ip = ipaddress.ip_address(text.removeprefix("IPv6:"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def in_networks(ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
                networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    return any(ip.version == n.version and ip in n for n in networks)


def client_from_received(received: Sequence[str],
                         trusted: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
                         ) -> tuple[str | None, str | None, str]:
    """The client that handed the message to the site's own mail servers: (ip, helo, why).

    `received` are the message's Received headers, topmost first; the topmost was written by a
    server of ours. Each names, in its `from` clause, the address it took the message from: a
    server in `trusted` (one of ours) means the next header down is also ours to believe; the
    first address outside `trusted` is the client. Headers below it were written by the sender
    and are never read.
    """
    for n, value in enumerate(received[:20]):
        m = _RECEIVED_FROM.match(" ".join(value.split()))
        if m is None:
            return None, None, f"Received header {n + 1} has no from clause"
        helo = m.group(1).strip("()[]") or None
        # The sender chose its HELO name, and a HELO can be an address literal: a clause
        # naming two different addresses cannot say which one our server saw, so it is no
        # evidence at all (never guess: a guess could be the sender's choice of a trusted IP).
        ips = {x for x in (parse_ip(i) for i in _RECEIVED_IP.findall(m.group(1) + m.group(2)))
               if x is not None}
        if not ips:
            return None, None, f"Received header {n + 1} names no client address"
        if len(ips) > 1:
            return None, None, f"Received header {n + 1} names several addresses"
        (ip,) = ips
        if in_networks(ip, trusted):
            continue
        return str(ip), helo, f"from Received header {n + 1}"
    return None, None, "no Received header names a client outside the trusted relays"


# -- answering the envelope sender only -----------------------------------------------------------
_SRS0 = re.compile(r"^srs0[=+-][^=]+=[^=]+=([^=]+)=(.+)$", re.I)
_SRS1 = re.compile(r"^srs1[=+-][^=]+=[^=]+==[^=]+=[^=]+=([^=]+)=(.+)$", re.I)
_BATV = re.compile(r"^(?:prvs|msprvs\d*|btv1)=[^=]+=(.+)$", re.I)


def envelope_matches(address: str, mail_from: str | None) -> bool:
    """Whether writing to `address` answers the envelope sender (no backscatter).

    Case-insensitive. An SRS-rewritten sender (a forwarder's `SRS0=hash=tt=domain=local@fwd`)
    or a BATV-tagged one (`prvs=tag=local@domain`) is compared by domain: the domain the tag
    or rewriting names against the address's domain.
    """
    a, m = (address or "").strip().lower(), (mail_from or "").strip().lower()
    if not a or not m or "@" not in a or "@" not in m:
        return False
    if a == m:
        return True
    local, _, domain = m.rpartition("@")
    a_domain = a.rpartition("@")[2]
    srs = _SRS1.match(local) or _SRS0.match(local)
    if srs:
        return srs.group(1) == a_domain
    if local.lower().startswith("srs"):
        return False   # SRS-looking, but not a form we can read: no answer
    if _BATV.match(local):
        return domain == a_domain
    return False
