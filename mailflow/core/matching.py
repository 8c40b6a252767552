"""Which thread an incoming message belongs to, and how sure we are. Pure: no I/O, no clock.

The one rule that matters most: never attach a message to the wrong thread. That would publish
one citizen's correspondence on another's page, and no amount of convenience is worth it. So
the matcher gathers every piece of evidence, in order of strength, and only threads a message
when strong evidence agrees; anything doubtful goes to the admin queue with ranked suggestions
for a person to decide.

Evidence, strongest first (every piece found is recorded, in this order):

1. `reply_address`: one of our thread addresses, found tolerantly (see
   `addresses.find_thread_addresses`) in the envelope recipients, then `Delivered-To`,
   `X-Original-To`, `Envelope-To`, then `To`, `Cc`, `Bcc`, then the `for <addr>` clauses of
   `Received` headers (how a BCC'd reply is found), then the raw text of malformed address
   headers. Never `From`, `Reply-To` or `Sender`: anybody can write our address there, and a
   citizen's quoted reply puts it there routinely. The address is *verified* when its token
   equals (constant time, after normalisation) the token stored for the id it names.
2. `in_reply_to` / `references`: a Message-ID that mailflow sent.
3. `subject_tag`: `[FOI #<id>]` (a fault report's `[Report #<id>]`) in the subject, strong only when the From address is already
   known for that thread's authority (the tag alone is public text anybody can copy).
4. Weak evidence, which only ever *suggests* a thread in the queue: the sender's domain has
   exactly one open thread; the subject resembles an open thread's title; a subject tag from
   an unknown sender.

Decision rules (see `match` for the details):

* V, the threads with a verified address (and which side wrote), decides when it is not empty
  and nothing contradicts it; with envelope recipients given only envelope addresses are in V,
  because the envelope recipient decides, as it does for any mail server.
* Contradictions queue the message: a wrong token stated at the MTA level, a Message-ID or a
  strong subject tag of another thread, or both sides of one thread addressed at once.
* Without V: a wrong token queues; one thread named by our Message-IDs (or else by a strong
  tag) threads the message, on the authority side; several queue; weak evidence queues with
  suggestions; otherwise "no_evidence" if anything named us, else "none".
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

from mailflow.core.addresses import AddressKind, Candidate, find_thread_addresses, token_matches
from mailflow.core.message import ParsedMessage

__all__ = ["Lookup", "Evidence", "Suggestion", "Decision", "match", "ENVELOPE", "MTA_SOURCES"]

ENVELOPE = "envelope recipient"
# Where an address is a statement by a mail server about this delivery, not text a person typed.
MTA_SOURCES = frozenset({ENVELOPE, "Delivered-To", "X-Original-To", "Envelope-To"})
_DELIVERED_HEADERS = ("Delivered-To", "X-Original-To", "Envelope-To")

# Work caps, so a crafted message cannot make us query the store without end. Past
# MAX_ADDRESSES the message is queued: skipping an address could skip a contradiction.
MAX_ADDRESSES = 100
MAX_MESSAGE_IDS = 200
MAX_SUGGESTIONS = 10

SIMILARITY_THRESHOLD = 0.6
_SIMILARITY_WEIGHT = 0.8
_SCORE = {"verified": 0.95, "wrong_token": 0.9, "message_id": 0.9, "strong_tag": 0.85,
          "weak_tag": 0.7, "sender_domain": 0.5}

_SIDE = {AddressKind.REQUEST: "authority side", AddressKind.REPLY: "citizen side"}


# ------------------------------------------------------------------------------ public values

class Lookup(Protocol):
    """What the matcher may ask the store. Implemented by the store adapter; a dict-based fake in tests."""

    def thread_tokens(self, thread_id: int) -> tuple[str, str] | None:
        """(request_token, reply_token), or None if there is no such thread."""

    def threads_for_message_ids(self, message_ids: Sequence[str]) -> dict[str, int]:
        """Our sent Message-ID -> thread id, for the ids mailflow sent (others are absent)."""

    def thread_authority(self, thread_id: int) -> str | None:
        """The thread's authority slug, or None if there is no such thread."""

    def known_senders(self, authority: str) -> frozenset[str]:
        """Lower-case addresses known to write for that authority."""

    def open_threads_from_domain(self, domain: str) -> list[int]:
        """Open threads whose authority has a known sender at this domain."""

    def open_thread_titles(self) -> list[tuple[int, str]]:
        """(id, title) of open threads, for subject similarity."""


@dataclass(frozen=True)
class Evidence:
    """One thing that points at a thread, where it was found and whether it can be trusted."""
    method: str        # reply_address | in_reply_to | references | subject_tag | sender_domain | subject_similarity
    source: str        # "envelope recipient", "Delivered-To", "To", "Received for", "Subject", "From", ...
    thread_id: int
    kind: AddressKind | None   # REQUEST/REPLY for reply_address evidence, else None
    verified: bool     # address: token right; Message-ID: always; tag: sender known; weak: never
    strong: bool       # decides a thread on its own
    detail: str        # for people; shows at most the first 3 characters of a token


@dataclass(frozen=True)
class Suggestion:
    thread_id: int
    score: float       # 0..1
    reason: str


@dataclass(frozen=True)
class Decision:
    action: str                                    # "thread" | "queue" | "none"
    threads: tuple[tuple[int, AddressKind], ...]   # "thread": each thread once, with the side that wrote
    reasons: tuple[str, ...]                       # for people, in order
    evidence: tuple[Evidence, ...]
    suggestions: tuple[Suggestion, ...]            # "queue": best first
    queue_reason: str | None = None                # bad_token | conflict | weak_evidence | no_evidence

    @property
    def names_us(self) -> bool:
        """Whether one of our addresses, Message-IDs or thread tags named this message.

        What makes a message ours when no envelope recipient says so (a catch-all mailbox):
        weak evidence alone (a domain, a similar subject) does not.
        """
        return any(e.method in ("reply_address", "in_reply_to", "references", "subject_tag")
                   for e in self.evidence)


# ------------------------------------------------------------------------------ addresses

@dataclass(frozen=True)
class _Found:
    """A reply_address evidence with what the decision needs to know about it."""
    evidence: Evidence
    status: str        # "verified" | "wrong_token" | "no_thread"
    counted: bool      # may put the message in V (see `match`)


def _address_texts(msg: ParsedMessage,
                   envelope_rcpts: Sequence[str]) -> Iterator[tuple[str, str, str]]:
    """(source, group, text) in order of strength. Sources in one group are found once: the
    parsed `delivered_to`/`to`/`cc` fields repeat what the headers said, and are read only in
    case a caller built the message without headers."""
    for rcpt in envelope_rcpts:
        yield ENVELOPE, ENVELOPE, rcpt
    for name in _DELIVERED_HEADERS:
        for text in msg.header_all(name):
            yield name, "delivered", text
    for addr in msg.delivered_to:
        yield "Delivered-To", "delivered", addr
    for name, parsed in (("To", msg.to), ("Cc", msg.cc), ("Bcc", ())):
        for text in msg.header_all(name):
            yield name, name, text
        for addr in parsed:
            yield name, name, addr
    for addr in msg.received_for:
        yield "Received for", "Received for", addr
    if msg.raw_address_text:
        yield "raw address text", "raw address text", msg.raw_address_text


def _shown(c: Candidate) -> str:
    """The address as people may see it: never the whole token."""
    return f"{c.kind.value}-{c.thread_id}-{c.token[:3]}…"


def _address_evidence(c: Candidate, source: str, tokens: tuple[str, str] | None
                      ) -> tuple[Evidence, str]:
    tolerated = f" (tolerated: {', '.join(c.mangling)})" if c.mangling else ""
    if tokens is None:
        status, what = "no_thread", f"no such thread {c.thread_id}"
    else:
        expected = tokens[0] if c.kind is AddressKind.REQUEST else tokens[1]
        if token_matches(c.token, expected):
            status, what = "verified", f"the token is right for thread {c.thread_id}"
        else:
            status, what = "wrong_token", f"thread {c.thread_id} exists but the token is wrong"
    detail = f"{_shown(c)} in {source}: {what}{tolerated}"
    ok = status == "verified"
    return Evidence("reply_address", source, c.thread_id, c.kind, ok, ok, detail), status


@lru_cache(maxsize=4096)
def _short_text_addresses(text: str, domain: str) -> tuple[Candidate, ...]:
    return tuple(find_thread_addresses(text, domain))


def _addresses_in(text: str, domain: str) -> Sequence[Candidate]:
    """`find_thread_addresses`, remembered for short texts: a message names its thread's
    address in the envelope, To and Delivered-To, and the next replies to that thread name
    it again (pure: the same text always gives the same candidates, which are frozen)."""
    if isinstance(text, str) and len(text) <= 1000:
        return _short_text_addresses(text, domain)
    return find_thread_addresses(text, domain)


def _gather_addresses(msg: ParsedMessage, lookup: Lookup, domain: str,
                      envelope_rcpts: Sequence[str]) -> tuple[list[_Found], bool]:
    """Every thread address of ours, checked against the store. True when MAX_ADDRESSES was hit."""
    found: list[_Found] = []
    seen: set[tuple[str, AddressKind, int, str]] = set()
    tokens: dict[int, tuple[str, str] | None] = {}
    for source, group, text in _address_texts(msg, envelope_rcpts):
        for c in _addresses_in(text, domain):
            key = (group, c.kind, c.thread_id, c.token)
            if key in seen:
                continue
            seen.add(key)
            if c.thread_id not in tokens:
                if len(tokens) >= MAX_ADDRESSES:
                    return found, True
                tokens[c.thread_id] = lookup.thread_tokens(c.thread_id)
            evidence, status = _address_evidence(c, source, tokens[c.thread_id])
            counted = source == ENVELOPE or not envelope_rcpts
            found.append(_Found(evidence, status, counted))
    return found, False


# ------------------------------------------------------------------------------ Message-IDs

def _gather_message_ids(msg: ParsedMessage, lookup: Lookup) -> list[Evidence]:
    """Message-IDs that mailflow sent, named in In-Reply-To (first) or References."""
    named: list[tuple[str, str]] = []
    seen: set[str] = set()
    for method, header, ids in (("in_reply_to", "In-Reply-To", msg.in_reply_to),
                                ("references", "References", msg.references)):
        for mid in ids:
            if mid and mid not in seen and len(named) < MAX_MESSAGE_IDS:
                seen.add(mid)
                named.append((method, mid))
    if not named:
        return []
    ours = lookup.threads_for_message_ids([mid for _, mid in named])
    out: list[Evidence] = []
    for method, mid in named:
        thread_id = ours.get(mid)
        if thread_id is None:
            continue
        source = "In-Reply-To" if method == "in_reply_to" else "References"
        out.append(Evidence(method, source, thread_id, None, True, True,
                            f"{source} names {mid}, which mailflow sent on thread {thread_id}"))
    return out


# ------------------------------------------------------------------------------ subject tag

@lru_cache(maxsize=64)   # the site's one or two tags: built once, not per message
def _tag_re(tag: str | tuple[str, ...]) -> re.Pattern[str]:
    tags = (tag,) if isinstance(tag, str) else tag
    alternatives = "|".join(re.escape(t) for t in tags)
    return re.compile(r"\[\s*(" + alternatives + r")\s*#\s*(\d{1,12})\s*\]", re.I)


def _gather_tags(msg: ParsedMessage, lookup: Lookup, tag: str | tuple[str, ...],
                 reasons: list[str]) -> list[Evidence]:
    """`[FOI #n]` (and a fault report's `[Report #n]`) tags; strong only with a sender
    already known for the thread's authority."""
    out: list[Evidence] = []
    sender = msg.from_addr.lower()
    tags = (tag,) if isinstance(tag, str) else tag
    found: dict[int, str] = {}
    for written, n in _tag_re(tag).findall(msg.subject[:2000]):
        canonical = next((t for t in tags if t.lower() == written.lower()), written)
        found.setdefault(int(n), canonical)
    for thread_id, tag_name in found.items():
        shown = f"[{tag_name} #{thread_id}]"
        authority = lookup.thread_authority(thread_id) if thread_id > 0 else None
        if authority is None:
            reasons.append(f"the subject tag {shown} names no thread we have")
            continue
        known = bool(sender) and sender in lookup.known_senders(authority)
        if known:
            detail = (f"the subject tag {shown}, and the sender {sender} is known for "
                      f"{authority}, the authority of thread {thread_id}")
        else:
            detail = (f"the subject tag {shown}, but the sender {sender or '(none)'} is not "
                      f"known for {authority}, the authority of thread {thread_id}")
        out.append(Evidence("subject_tag", "Subject", thread_id, None, known, known, detail))
    return out


# ------------------------------------------------------------------------------ weak evidence

_REPLY_PREFIX = re.compile(r"^\s*((re|fw|fwd|aw|wg|tr|sv|vs|antw|rif|odp|rv|enc)\s*(\[\d+\])?\s*:\s*)+",
                           re.I)
_FOI_PREFIX = re.compile(r"^\s*(freedom\s+of\s+information\s+request|foi\s+request)\s*[-–:]\s*",
                         re.I)
_ANY_TAG = re.compile(r"\[\s*[a-z]{1,12}\s*#\s*\d{1,12}\s*\]", re.I)


def subject_core(subject: str) -> str:
    """The subject without the parts that every message of every thread shares."""
    s = _ANY_TAG.sub(" ", subject[:500])
    for _ in range(5):
        before = s
        s = _FOI_PREFIX.sub("", _REPLY_PREFIX.sub("", s))
        if s == before:
            break
    return " ".join(s.split()).lower()[:200]


def _similar_titles(subject: str, titles: list[tuple[int, str]]) -> list[tuple[int, float]]:
    core = subject_core(subject)
    if len(core) < 4:
        return []
    sm = difflib.SequenceMatcher(autojunk=False)
    sm.set_seq2(core)        # the fixed side: SequenceMatcher caches facts about seq2
    out: list[tuple[int, float]] = []
    for thread_id, title in titles:
        sm.set_seq1(" ".join(title.split()).lower()[:200])
        if sm.real_quick_ratio() < SIMILARITY_THRESHOLD or sm.quick_ratio() < SIMILARITY_THRESHOLD:
            continue
        ratio = sm.ratio()
        if ratio >= SIMILARITY_THRESHOLD:
            out.append((thread_id, ratio))
    return out


def _gather_weak(msg: ParsedMessage, lookup: Lookup, domain: str,
                 reasons: list[str]) -> list[tuple[Evidence, float]]:
    """Hints for a person, each with its score; never enough to thread a message."""
    out: list[tuple[Evidence, float]] = []
    sender_domain = msg.from_addr.rpartition("@")[2].lower().rstrip(".")
    if "@" in msg.from_addr and sender_domain and sender_domain != domain.lower():
        threads = lookup.open_threads_from_domain(sender_domain)
        if len(threads) == 1:
            detail = f"the sender's domain {sender_domain} has exactly one open thread: {threads[0]}"
            out.append((Evidence("sender_domain", "From", threads[0], None, False, False, detail),
                        _SCORE["sender_domain"]))
        elif threads:
            reasons.append(f"the sender's domain {sender_domain} has {len(threads)} open threads;"
                           " that says nothing about which one")
    for thread_id, ratio in _similar_titles(msg.subject, lookup.open_thread_titles()):
        detail = f"the subject is {ratio:.0%} similar to the title of thread {thread_id}"
        out.append((Evidence("subject_similarity", "Subject", thread_id, None, False, False, detail),
                    ratio * _SIMILARITY_WEIGHT))
    return out


# ------------------------------------------------------------------------------ suggestions

def _rank(hints: list[tuple[int, float, str]]) -> tuple[Suggestion, ...]:
    """One suggestion per thread: its best score, every reason; best first, then lowest id."""
    best: dict[int, tuple[float, list[str]]] = {}
    for thread_id, score, reason in hints:
        old_score, old_reasons = best.get(thread_id, (0.0, []))
        if reason not in old_reasons:
            old_reasons.append(reason)
        best[thread_id] = (max(old_score, min(1.0, max(0.0, score))), old_reasons)
    ranked = sorted(best.items(), key=lambda kv: (-kv[1][0], kv[0]))
    return tuple(Suggestion(t, round(s, 3), "; ".join(r)) for t, (s, r) in ranked[:MAX_SUGGESTIONS])


def _strong_hints(found: list[_Found], ids: list[Evidence],
                  tags: list[Evidence]) -> list[tuple[int, float, str]]:
    hints: list[tuple[int, float, str]] = []
    for f in found:
        e = f.evidence
        if f.status == "verified":
            hints.append((e.thread_id, _SCORE["verified"], f"verified address in {e.source}"))
        elif f.status == "wrong_token":
            hints.append((e.thread_id, _SCORE["wrong_token"],
                          f"address names thread {e.thread_id} but the token is wrong"))
    for e in ids:
        hints.append((e.thread_id, _SCORE["message_id"], f"{e.source} names our message"))
    for e in tags:
        if e.strong:
            hints.append((e.thread_id, _SCORE["strong_tag"], "subject tag from a known sender"))
        else:
            hints.append((e.thread_id, _SCORE["weak_tag"], "subject tag, but the sender is unknown"))
    return hints


# ------------------------------------------------------------------------------ the decision

def _ids(threads: Sequence[int]) -> str:
    return ", ".join(str(t) for t in threads)


def match(msg: ParsedMessage, lookup: Lookup, *, domain: str, envelope_rcpts: Sequence[str] = (),
          subject_tag: str | tuple[str, ...] = ("FOI", "Report")) -> Decision:
    """Decide the thread(s) of `msg`, or the queue, from every piece of evidence, with reasons.

    With a verified address (the set V of (thread, side) it names):

    * envelope recipients given (SMTP, `ingest --rcpt`): only addresses in the envelope are in
      V. Verified header addresses of other threads are recorded, not acted on: that mail
      arrives for them in its own transaction or copy.
    * a wrong token for an existing thread outside V queues the message ("bad_token") only when
      a mail server said so: the envelope or Delivered-To/X-Original-To/Envelope-To. Then the
      message was really delivered to a mistyped address, and it may be the mistyped one that
      is meant. A wrong-token address merely written in To/Cc/Received/raw text beside a
      verified one is recorded but does not block: people paste old or mangled addresses into
      headers all the time, while the verified address is a secret only the right party has.
    * In-Reply-To/References or a strong subject tag naming a thread outside V queues it
      ("conflict"): the headers point at one thread and the address at another, and only a
      person can tell which is meant. So does addressing both sides of one thread at once
      (a leaked citizen address: which side wrote is unknowable).
    * otherwise the message goes on every thread in V, once each.

    Without V:

    * any wrong token for an existing thread: queue "bad_token", that thread suggested;
    * our Message-IDs naming exactly one thread: on it, authority side (REQUEST). The store
      does not say which of our messages is answered, and mailflow's Message-IDs go mostly
      to authorities (requests, follow-ups); a citizen answering a forward writes to the
      reply address, which is verified above. The pipeline's sender checks still apply.
      Several threads (or a strong tag, or, with an envelope, a verified header address, of
      another thread): queue "conflict";
    * else a strong subject tag for one thread: on it, authority side (its sender is known for
      the authority); tags for several threads: "conflict";
    * with an envelope given, a verified address only in the headers: "conflict" (the envelope
      recipient does not agree);
    * else weak evidence: "weak_evidence" with ranked suggestions; else "no_evidence" when
      anything named us (even an unknown thread), else "none".
    """
    reasons: list[str] = []
    found, too_many = _gather_addresses(msg, lookup, domain, envelope_rcpts)
    ids = _gather_message_ids(msg, lookup)
    tags = _gather_tags(msg, lookup, subject_tag, reasons)
    evidence = [f.evidence for f in found] + ids + tags
    reasons[:0] = [e.detail for e in evidence]
    if not found:
        reasons.append("none of our thread addresses in the envelope or the address headers")
    hints = _strong_hints(found, ids, tags)

    weak_cache: list[list[tuple[Evidence, float]]] = []

    def weak() -> list[tuple[Evidence, float]]:
        """Weak evidence costs two store queries: gathered only for a queued message, once."""
        if not weak_cache:
            weak_cache.append(_gather_weak(msg, lookup, domain, reasons))
            reasons.extend(e.detail for e, _ in weak_cache[0])
        return weak_cache[0]

    def decide(action: str, why: str, threads: Sequence[tuple[int, AddressKind]] = (),
               queue_reason: str | None = None) -> Decision:
        all_evidence = list(evidence)
        suggestions: tuple[Suggestion, ...] = ()
        if action == "queue":
            all_evidence += [e for e, _ in weak()]
            suggestions = _rank(hints + [(e.thread_id, s, e.detail) for e, s in weak()])
        reasons.append(why)
        return Decision(action, tuple(threads), tuple(reasons), tuple(all_evidence), suggestions,
                        queue_reason)

    if too_many:
        return decide("queue", f"more than {MAX_ADDRESSES} of our thread addresses: a person "
                               "must sort this message out", queue_reason="conflict")

    verified = [f for f in found if f.status == "verified"]
    in_v = list(dict.fromkeys((f.evidence.thread_id, f.evidence.kind) for f in verified
                              if f.counted and f.evidence.kind is not None))
    v_threads = list(dict.fromkeys(t for t, _ in in_v))
    id_threads = list(dict.fromkeys(e.thread_id for e in ids))
    tag_threads = list(dict.fromkeys(e.thread_id for e in tags if e.strong))
    wrong = [f for f in found if f.status == "wrong_token"]

    if in_v:
        both = [t for t in v_threads if sum(1 for u, _ in in_v if u == t) > 1]
        if both:
            return decide("queue", f"addressed to both the authority side and the citizen side of "
                                   f"thread {_ids(both)}: which side wrote cannot be told",
                          queue_reason="conflict")
        blocking = [f for f in wrong
                    if f.evidence.source in MTA_SOURCES and f.evidence.thread_id not in v_threads]
        if blocking:
            where = ", ".join(dict.fromkeys(f.evidence.source for f in blocking))
            return decide("queue", f"delivered ({where}) to thread "
                                   f"{_ids(dict.fromkeys(f.evidence.thread_id for f in blocking))} "
                                   f"with a wrong token, as well as to thread {_ids(v_threads)}",
                          queue_reason="bad_token")
        other = [t for t in id_threads if t not in v_threads]
        if other:
            return decide("queue", f"the address names thread {_ids(v_threads)} but "
                                   f"In-Reply-To/References name our mail on thread {_ids(other)}",
                          queue_reason="conflict")
        other = [t for t in tag_threads if t not in v_threads]
        if other:
            return decide("queue", f"the address names thread {_ids(v_threads)} but the subject "
                                   f"tag, from a known sender, names thread {_ids(other)}",
                          queue_reason="conflict")
        sides = "; ".join(f"thread {t} ({_SIDE[k]})" for t, k in in_v)
        basis = "envelope recipient" if envelope_rcpts else "verified address"
        elsewhere = list(dict.fromkeys(f.evidence.thread_id for f in verified
                                       if f.evidence.thread_id not in v_threads))
        if elsewhere:
            reasons.append(f"the headers also name thread {_ids(elsewhere)}; the envelope "
                           "recipient decides, and that copy is delivered on its own")
        return decide("thread", f"on {sides}, by its {basis}", threads=in_v)

    if wrong:
        names = _ids(dict.fromkeys(f.evidence.thread_id for f in wrong))
        return decide("queue", f"an address names thread {names} but the token is wrong: "
                               "never threaded on a wrong token", queue_reason="bad_token")

    header_only = list(dict.fromkeys(f.evidence.thread_id for f in verified))  # envelope given
    pointed = list(dict.fromkeys(id_threads + tag_threads + header_only))
    if id_threads or tag_threads:
        if len(pointed) == 1:
            by = "our Message-ID in In-Reply-To/References" if id_threads else \
                "its subject tag and a sender known for its authority"
            return decide("thread", f"on thread {pointed[0]} (authority side), by {by}",
                          threads=[(pointed[0], AddressKind.REQUEST)])
        return decide("queue", f"the evidence names several threads ({_ids(pointed)})",
                      queue_reason="conflict")
    if header_only:
        return decide("queue", f"the headers name thread {_ids(header_only)} with a right token, "
                               "but the envelope recipient does not", queue_reason="conflict")

    if hints or weak():   # left here: only weak tags among the hints
        return decide("queue", "only weak evidence: a person must choose the thread",
                      queue_reason="weak_evidence")
    if found:
        return decide("queue", "it has our address shape, but no thread it names exists",
                      queue_reason="no_evidence")
    return decide("none", "nothing in this message names us")
