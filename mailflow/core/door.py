"""Who may be written to: the decision at RCPT time (and at `ingest`), before any byte is stored.

Refusing at the door is how a mail server avoids backscatter: an unknown address or a relay
attempt gets a 5xx while the sender's server is still connected, so no bounce is ever sent to
a forged address. Pure: the caller supplies the domain, the authority slugs and the site URL.
"""
from __future__ import annotations

from dataclasses import dataclass

from mailflow.core.addresses import (AddressKind, OurAddress, find_thread_addresses, is_our_domain,
                                     parse_ours, split_address)


@dataclass(frozen=True)
class DoorDecision:
    accept: bool
    reply: str                      # the SMTP reply to give
    address: OurAddress | None = None


def check_recipient(rcpt: str, *, domain: str, slugs: frozenset[str], site_url: str,
                    reports: bool = False) -> DoorDecision:
    """Accept or refuse one recipient. `reports`: the site takes fault reports (it has
    categories in its rules), so report@ and report+<category>@ are open; without them they
    are refused like any unknown address, so nobody reports into a void."""
    if any(ch in rcpt for ch in "\r\n\x00") or split_address(rcpt) is None:
        return DoorDecision(False, f"501 5.1.3 Bad recipient address syntax")
    ours = parse_ours(rcpt, domain, slugs)
    if ours is not None and ours.kind is AddressKind.REPORT and not reports:
        return DoorDecision(False, f"550 5.1.1 <{rcpt}>: this site does not take fault reports")
    if ours is not None:
        return DoorDecision(True, "250 2.1.5 Ok", ours)
    if is_our_domain(rcpt, domain):
        # A retyped thread address (missing hyphen, other prefix, confusable characters):
        # accept it; the matcher checks its token and queues it if it names no thread.
        for cand in find_thread_addresses(rcpt, domain):
            return DoorDecision(True, "250 2.1.5 Ok", OurAddress(
                cand.kind, rcpt.strip().strip("<>").lower(), thread_id=cand.thread_id,
                token=cand.token))
        where = site_url.rstrip("/") + "/body/"
        return DoorDecision(False, f"550 5.1.1 <{rcpt}>: no such authority or request here; "
                                   f"the list of authorities is at {where}")
    return DoorDecision(False, f"550 5.7.1 <{rcpt}>: relay access denied")


ALLOW_POLICIES = ("anybody", "authority", "nobody")


def gate(allow: str, *, authority_side: bool, sender: str, known_senders: frozenset[str]) -> str | None:
    """Who may still write to a thread. None: let it in; else the SMTP refusal to give.

    `allow` is the thread's policy: "anybody", "authority" (only the authority's known
    senders, and delivery reports about our own mail, which come from the null sender) or
    "nobody" (closed). The citizen's side is only ever closed, never narrowed: who the
    citizen is, is checked once the message is read.
    """
    if allow == "nobody":
        return "550 5.7.1 This request is closed to new correspondence"
    if allow == "authority" and authority_side:
        if sender == "" or sender.lower() in known_senders:
            return None
        return ("550 5.7.1 This request only accepts mail from the authority's known "
                "addresses")
    return None
