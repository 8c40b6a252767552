"""mailflow's own addresses: how they are made and how they are recognised. Pure: no I/O.

Every thread has two secrets. The authority writes to `request-<id>-<token>@domain`; the
citizen writes to `reply-<id>-<token2>@domain`. A new request is confirmed by a reply to the
single-use `confirm-<token>@domain`. The token is what makes an address unguessable, so the
id alone never lets anyone write to a thread.

Fault reports: a citizen writes to `report@domain` or `report+<category>@domain`; the report
goes to the authority from `report-<id>-<token>@domain`, which is the thread's authority-side
address under another prefix (the same token, the same REQUEST kind), so a council officer
sees at a glance that it is a street report, not an FOI request.

`find_thread_addresses` finds thread addresses in any text however they were retyped (case,
separators, prefix, domain, confusable characters); see the notes above it.

Tokens use Crockford's base-32 alphabet in lower case (no i, l, o, u): when a person retypes
an address and confuses `l`/`1`, `i`/`1` or `o`/`0`, normalising maps the mistake back to the
one spelling it can have, so being tolerant never makes a token match a different secret.
"""
from __future__ import annotations

import hmac
import re
import secrets
from dataclasses import dataclass
from enum import Enum

TOKEN_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
TOKEN_LENGTH = 12  # 60 bits
_CONFUSABLE = str.maketrans({"i": "1", "l": "1", "o": "0"})

# Local parts the site must accept whatever else it does (RFC 5321 §4.5.1, RFC 2142).
ROLE_LOCALS = frozenset({"postmaster", "abuse"})


class AddressKind(str, Enum):
    REQUEST = "request"   # authority-side thread address
    REPLY = "reply"       # citizen-side thread address
    CONFIRM = "confirm"   # single-use confirmation of a new request
    AUTHORITY = "authority"  # <slug>@domain: a citizen starts a request
    BOUNCES = "bounces"   # envelope sender of mail to citizens: their bounces come back here
    ROLE = "role"         # postmaster@, abuse@: always accepted, always read by a human
    REPORT = "report"     # report@ or report+<category>@: a citizen starts a fault report


@dataclass(frozen=True)
class OurAddress:
    """An address at the site's domain that mailflow recognised, and what it names."""
    kind: AddressKind
    address: str
    thread_id: int | None = None
    token: str | None = None
    slug: str | None = None


def new_token(length: int = TOKEN_LENGTH) -> str:
    return "".join(secrets.choice(TOKEN_ALPHABET) for _ in range(length))


def normalise_token(token: str) -> str:
    return token.lower().translate(_CONFUSABLE)


def token_matches(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a token from an address with the stored one."""
    if given is None:
        return False
    return hmac.compare_digest(normalise_token(given).encode(), normalise_token(expected).encode())


def thread_address(kind: AddressKind, thread_id: int, token: str, domain: str) -> str:
    if kind not in (AddressKind.REQUEST, AddressKind.REPLY):
        raise ValueError(f"not a thread address kind: {kind}")
    return f"{kind.value}-{thread_id}-{token}@{domain}"


def report_address(thread_id: int, token: str, domain: str) -> str:
    """The authority-side address of a fault report: REQUEST semantics, `report-` prefix."""
    return f"report-{thread_id}-{token}@{domain}"


def confirm_address(token: str, domain: str) -> str:
    return f"confirm-{token}@{domain}"


def split_address(addr: str) -> tuple[str, str] | None:
    """`Local@Domain` (angle brackets and quotes tolerated) -> (local, domain lower-cased)."""
    addr = addr.strip().strip("<>").strip()
    local, sep, domain = addr.rpartition("@")
    if not sep or not local or not domain:
        return None
    return local.strip('"'), domain.lower().rstrip(".")


_THREAD_RE = re.compile(r"^(request|reply|report)[-_.]*(\d{1,12})[-_.]+([0-9a-z]{4,40})$", re.I)
# The prefix of a thread address -> the side it names. "report-" is the authority side of a
# fault report, exactly as "request-" is for an FOI request.
_THREAD_KIND = {"request": AddressKind.REQUEST, "reply": AddressKind.REPLY,
                "report": AddressKind.REQUEST}
# report@ and report+<category>@: the tag is the category slug the citizen chose, if any.
REPORT_LOCAL = "report"
_RESERVED_PREFIXES = ("request-", "reply-", "confirm-", "report-")
_CONFIRM_RE = re.compile(r"^confirm[-_.]*([0-9a-z]{4,40})$", re.I)
_SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def valid_slug(slug: str) -> bool:
    """An authority slug: not one of the local parts mailflow uses itself (report@, request-…)."""
    return (bool(_SLUG_RE.match(slug)) and slug != REPORT_LOCAL
            and not slug.startswith(_RESERVED_PREFIXES))


def parse_ours(addr: str, domain: str, slugs: frozenset[str] | set[str]) -> OurAddress | None:
    """Recognise one of the site's addresses, or return None for anything that is not ours.

    Only the shape is checked here; whether the token is right for the thread it names is the
    matcher's job, since that needs the store.
    """
    parts = split_address(addr)
    if parts is None:
        return None
    local, dom = parts
    if dom != domain.lower():
        return None
    low = local.lower()
    canonical = f"{low}@{dom}"
    # A "+tag" is a sub-address of the same mailbox (RFC 5233), as Postfix and Exim treat it.
    base = low.split("+", 1)[0]
    m = _THREAD_RE.match(base)
    if m:
        return OurAddress(_THREAD_KIND[m.group(1).lower()], canonical,
                          thread_id=int(m.group(2)), token=normalise_token(m.group(3)))
    m = _CONFIRM_RE.match(base)
    if m:
        return OurAddress(AddressKind.CONFIRM, canonical, token=normalise_token(m.group(1)))
    if base in ROLE_LOCALS:
        return OurAddress(AddressKind.ROLE, canonical)
    if base == "bounces":
        return OurAddress(AddressKind.BOUNCES, canonical)
    if base == REPORT_LOCAL:
        tag = low.split("+", 1)[1] if "+" in low else ""
        return OurAddress(AddressKind.REPORT, canonical, slug=tag or None)
    if base in slugs:
        return OurAddress(AddressKind.AUTHORITY, canonical, slug=base)
    return None


def is_our_domain(addr: str, domain: str) -> bool:
    parts = split_address(addr)
    return parts is not None and parts[1] == domain.lower()


# ----------------------------------------------------------------------------- tolerant finding
#
# `parse_ours` answers "is this recipient one of ours?" for an address that reached our domain.
# `find_thread_addresses` answers a looser question for the matcher: "does this text name one of
# our thread addresses, however a person retyped it?". Being generous here is safe because the
# finding only proposes (kind, id, token); the matcher then compares the token exactly (after
# normalisation) with the one stored for that id, and 60 random bits are not guessed by a typo.

# Prefixes a person may write in front of the id. Kept to a small, documented set: the kind only
# chooses which of the thread's two tokens is compared, so a wrong guess costs a queue entry,
# never a wrong thread. Keys are the prefix lower-cased with separators removed.
_PREFIX_KIND = {
    "request": AddressKind.REQUEST, "requests": AddressKind.REQUEST, "req": AddressKind.REQUEST,
    "reqest": AddressKind.REQUEST, "reqeust": AddressKind.REQUEST,
    "foirequest": AddressKind.REQUEST, "foirequests": AddressKind.REQUEST,
    "reply": AddressKind.REPLY, "replies": AddressKind.REPLY,
    "report": AddressKind.REQUEST, "reports": AddressKind.REQUEST,
}
THREAD_PREFIXES = tuple(sorted(_PREFIX_KIND))

SCAN_LIMIT = 200_000  # characters of any one text that are searched

# <prefix><sep><id><sep><token>[+sub]@<domain>. The token is always exactly TOKEN_LENGTH
# characters right before "@" (or "+sub@"), so the id/token split is unambiguous even when the
# separator between them is missing: the id is whatever comes before the last 12. Separators
# may be missing, doubled, or `_`, `.`, `+` instead of `-`. re.ASCII keeps IGNORECASE from
# matching look-alike Unicode letters (the Kelvin sign, dotless i) whose lower case is not ours.
_FIND_RE = re.compile(
    r"(?<![0-9a-z])"
    r"(?P<prefix>foi[-_.]?requests?|requests?|reqeust|reqest|req|replies|reply|reports?)"
    r"(?P<sep1>[-_.+]{0,4})"
    r"(?P<id>[0-9ilo]{1,12})"
    r"(?P<sep2>[-_.+]{0,4})"
    rf"(?P<token>[0-9a-z]{{{TOKEN_LENGTH}}})"
    r"(?P<sub>\+[^\s@<>\"',;()\[\]]{0,64})?"
    r"@(?P<domain>[a-z0-9][a-z0-9.-]{0,253})",
    re.I | re.A)
# After the address: the rest of a display name (quoted or not), then an angle-addr.
_DISPLAY_NAME_TAIL = re.compile(r"[^<>@,\n]*<|[^\"<>\n]*\"\s*<")


@dataclass(frozen=True)
class Candidate:
    """A thread address found in some text, with what had to be tolerated to read it."""
    kind: AddressKind          # REQUEST or REPLY
    thread_id: int
    token: str                 # normalised: lower case, i/l -> 1, o -> 0
    text: str                  # the text as found (contains the full token: never log it)
    exact: bool                # "<request|reply>-<id>-<token>@<our domain>" in any case
    mangling: tuple[str, ...]  # what was tolerated, e.g. ("missing hyphen", "other domain")


def _separator_mangling(sep: str) -> str | None:
    if sep == "":
        return "missing hyphen"
    if sep == "-":
        return None
    if set(sep) == {"-"}:
        return "doubled hyphen"
    return "other separator"


def _in_display_name(text: str, start: int, end: int) -> bool:
    """True when the address is followed by `<addr>`: it was written into a display name."""
    if text[start - 1:start] == "<":
        return False
    return _DISPLAY_NAME_TAIL.match(text, end, min(len(text), end + 300)) is not None


def _candidate(m: re.Match[str], text: str, domain: str) -> Candidate | None:
    raw_prefix, raw_id, raw_token = m.group("prefix"), m.group("id"), m.group("token")
    kind = _PREFIX_KIND.get(re.sub(r"[-_.]", "", raw_prefix.lower()))
    token = normalise_token(raw_token)
    ident = raw_id.lower().translate(_CONFUSABLE)
    if kind is None or len(token) != TOKEN_LENGTH or not set(token) <= set(TOKEN_ALPHABET):
        return None
    thread_id = int(ident)
    if thread_id < 1:
        return None
    found_domain = m.group("domain").lower().rstrip(".-")
    ours = found_domain == domain.lower().rstrip(".")
    confusable = bool(set(raw_id.lower() + raw_token.lower()) & set("ilo"))
    mangling: list[str] = []
    if any(ch.isupper() for ch in m.group(0)):
        mangling.append("case")
    if raw_prefix.lower() not in ("request", "reply", "report"):
        mangling.append("other prefix")
    for sep in (m.group("sep1"), m.group("sep2")):
        label = _separator_mangling(sep)
        if label and label not in mangling:
            mangling.append(label)
    if confusable:
        mangling.append("confusable characters")
    if len(ident) > 1 and ident.startswith("0"):
        mangling.append("leading zero")
    if m.group("sub"):
        mangling.append("sub-address")
    if not ours:
        mangling.append("other domain")
    exact = not (set(mangling) - {"case"})
    if _in_display_name(text, m.start(), m.end()):
        mangling.append("in display name")   # where it was, not how it was spelled
    return Candidate(kind, thread_id, token, m.group(0).rstrip(".-"), exact, tuple(mangling))


def find_thread_addresses(text: str, domain: str) -> list[Candidate]:
    """Every distinct (kind, id, token) thread address in `text`, in order of first occurrence.

    Tolerates any case, quotes, angle brackets and display names, missing or doubled separators
    (and `_`, `.`, `+` for `-`), the prefixes in THREAD_PREFIXES (`foi-request` with any or no
    separator, and `report` for a fault report's authority side), `l`/`i`/`o` typed for `1`/`1`/`0` in the id and the token, a `+sub` address,
    and any domain ("other domain" in `mangling`: an old site domain, a typo). The token must
    still be exactly TOKEN_LENGTH characters of TOKEN_ALPHABET after normalisation. Only the
    first SCAN_LIMIT characters are searched; never raises on any str.
    """
    if not isinstance(text, str) or not text:
        return []
    text = text[:SCAN_LIMIT]
    found: list[Candidate] = []
    seen: set[tuple[AddressKind, int, str]] = set()
    for m in _FIND_RE.finditer(text):
        c = _candidate(m, text, domain)
        if c is None or (c.kind, c.thread_id, c.token) in seen:
            continue
        seen.add((c.kind, c.thread_id, c.token))
        found.append(c)
    return found
