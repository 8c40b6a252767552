"""The matcher's view of the store: answers its questions inside one transaction.

The matcher (core.matching) is pure and asks through the `Lookup` protocol; this adapter
answers from the database and the authorities in rules/, so the directory of known senders is
the rules' addresses plus those learned from replies.
"""
from __future__ import annotations

from collections.abc import Sequence

from mailflow.core.rules import Rules
from mailflow.store.repository import Tx


class StoreLookup:
    def __init__(self, tx: Tx, rules: Rules):
        self.tx, self.rules = tx, rules
        self._senders: dict[str, frozenset[str]] = {}
        self._by_domain: dict[str, set[str]] | None = None

    def thread_tokens(self, thread_id: int) -> tuple[str, str] | None:
        t = self.tx.thread(thread_id)
        return (t.request_token, t.reply_token) if t is not None else None

    def threads_for_message_ids(self, message_ids: Sequence[str]) -> dict[str, int]:
        return self.tx.threads_for_message_ids(list(message_ids))

    def thread_authority(self, thread_id: int) -> str | None:
        t = self.tx.thread(thread_id)
        return t.authority if t is not None else None

    def known_senders(self, authority: str) -> frozenset[str]:
        if authority not in self._senders:
            a = self.rules.authorities.get(authority)
            found = set(a.emails) if a else set()
            found |= {addr for _, addr, _ in self.tx.learned_senders(authority)}
            self._senders[authority] = frozenset(found)
        return self._senders[authority]

    def _authorities_by_domain(self) -> dict[str, set[str]]:
        # Kept on the instance, not with functools.cache: that would hold every lookup (and
        # its transaction's connection) for the life of the process.
        if self._by_domain is not None:
            return self._by_domain
        by_domain: dict[str, set[str]] = {}
        for a in self.rules.authorities.values():
            for addr in a.emails:
                by_domain.setdefault(addr.rpartition("@")[2], set()).add(a.slug)
        for slug, addr, _ in self.tx.learned_senders():
            by_domain.setdefault(addr.rpartition("@")[2], set()).add(slug)
        self._by_domain = by_domain
        return by_domain

    def open_threads_from_domain(self, domain: str) -> list[int]:
        slugs = self._authorities_by_domain().get(domain.lower())
        if not slugs:
            return []
        return [t.id for t in self.tx.open_threads(slugs)]

    def open_thread_titles(self) -> list[tuple[int, str]]:
        return [(t.id, t.title) for t in self.tx.open_threads()]
