"""mailflow's own addresses: how they are made and how they are recognised. Pure: no I/O.

Every thread has two secrets. The authority writes to `request-<id>-<token>@domain`; the
citizen writes to `reply-<id>-<token2>@domain`. A new request is confirmed by a reply to the
single-use `confirm-<token>@domain`. The token is what makes an address unguessable, so the
id alone never lets anyone write to a thread.

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


def confirm_address(token: str, domain: str) -> str:
    return f"confirm-{token}@{domain}"


def split_address(addr: str) -> tuple[str, str] | None:
    """`Local@Domain` (angle brackets and quotes tolerated) -> (local, domain lower-cased)."""
    addr = addr.strip().strip("<>").strip()
    local, sep, domain = addr.rpartition("@")
    if not sep or not local or not domain:
        return None
    return local.strip('"'), domain.lower().rstrip(".")


_THREAD_RE = re.compile(r"^(request|reply)[-_.]*(\d{1,12})[-_.]+([0-9a-z]{4,40})$", re.I)
_CONFIRM_RE = re.compile(r"^confirm[-_.]*([0-9a-z]{4,40})$", re.I)
_SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def valid_slug(slug: str) -> bool:
    return bool(_SLUG_RE.match(slug)) and not slug.startswith(("request-", "reply-", "confirm-"))


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
        return OurAddress(AddressKind(m.group(1).lower()), canonical,
                          thread_id=int(m.group(2)), token=normalise_token(m.group(3)))
    m = _CONFIRM_RE.match(base)
    if m:
        return OurAddress(AddressKind.CONFIRM, canonical, token=normalise_token(m.group(1)))
    if base in ROLE_LOCALS:
        return OurAddress(AddressKind.ROLE, canonical)
    if base == "bounces":
        return OurAddress(AddressKind.BOUNCES, canonical)
    if base in slugs:
        return OurAddress(AddressKind.AUTHORITY, canonical, slug=base)
    return None


def is_our_domain(addr: str, domain: str) -> bool:
    parts = split_address(addr)
    return parts is not None and parts[1] == domain.lower()
