"""The site-wide orderings, groups and sums the archive's shared files are made from (the
lists by state, each authority's requests and record, the newest threads for the home page
and the feeds, the parts of the sitemap and of the data dump), kept between the builds of a
process and brought up to date for the threads that changed only.

A build that reads every thread makes a `SiteIndex` of them all; the daemon's next build
(after one message) replaces the few threads it looked at again (`update`), so that the
shared files cost the same on a site of 1,000 threads as on one of 10,000: each list is kept
sorted, a thread goes in or out by bisection, instead of every thread being grouped, sorted
and counted again in Python at every build. Every list holds exactly what the from-scratch
grouping gives, in the same order (`tests/test_archive_changes.py` compares the published
site with a full build's after every kind of change).
"""
from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from typing import Any


def order_key(t: Any) -> tuple[int, int]:
    """Ascending on this is the site's order: newest `sent` first, then the higher id."""
    return (-t.sent.toordinal(), -t.id)


class _Sorted:
    """Items kept in ascending order of a unique key, with their keys alongside."""

    __slots__ = ("keys", "items")

    def __init__(self, pairs: Iterable[tuple[Any, Any]] = ()):
        pairs = sorted(pairs, key=lambda p: p[0])
        self.keys = [k for k, _ in pairs]
        self.items = [t for _, t in pairs]

    def add(self, key: Any, item: Any) -> None:
        i = bisect.bisect_left(self.keys, key)
        if i < len(self.keys) and self.keys[i] == key:
            raise ValueError(f"key {key!r} twice in a site index")
        self.keys.insert(i, key)
        self.items.insert(i, item)

    def remove(self, key: Any) -> None:
        i = bisect.bisect_left(self.keys, key)
        if i == len(self.keys) or self.keys[i] != key:
            raise KeyError(key)
        del self.keys[i]
        del self.items[i]

    def __len__(self) -> int:
        return len(self.items)


class SiteIndex:
    """Every public FOI thread of the site (a `ThreadView`, or a `build.ThreadSummary`
    standing for a thread whose files were kept), grouped and ordered for the shared files.

    `top(t)`: the (time, number) of its newest public message or None; `responses(t)`: its
    answers; `summary(t)`: whether it is a kept summary (its page key is fixed)."""

    def __init__(self, threads: Iterable[Any], *, top: Callable[[Any], Any],
                 responses: Callable[[Any], int], summary: Callable[[Any], bool]):
        self._top, self._responses, self._summary = top, responses, summary
        self.objs: dict[int, Any] = {}
        self.keys: dict[int, tuple[Any, ...]] = {}   # id -> (order key, top, state, slug)
        self.order = _Sorted()
        self.by_state: dict[str, _Sorted] = {}
        self.by_slug: dict[str, _Sorted] = {}
        self.tops = _Sorted()
        self.slug_tops: dict[str, _Sorted] = {}
        self.parts: dict[int, dict[int, _Sorted]] = {}   # part size -> part -> threads by id
        self.responses = 0
        self.pages_keys: dict[int, str | None] = {}
        self.records: dict[str, Any] = {}             # slug -> its record, while it stands
        self.fresh: list[Any] = []                    # the views (not summaries) added last
        self._views: set[int] = set()                 # ids of views (not summaries) held
        threads = list(threads)
        for t in threads:
            self._note(t)
        items = [(self.keys[t.id][0], t) for t in threads]
        self.order = _Sorted(items)
        groups: dict[str, list[tuple[Any, Any]]] = {}
        slugs: dict[str, list[tuple[Any, Any]]] = {}
        tops: dict[str, list[tuple[Any, Any]]] = {}
        all_tops = []
        for key, t in items:
            _, top, state, slug = self.keys[t.id]
            groups.setdefault(state, []).append((key, t))
            slugs.setdefault(slug, []).append((key, t))
            if top is not None:
                all_tops.append((top, t))
                tops.setdefault(slug, []).append((top, t))
        self.by_state = {k: _Sorted(v) for k, v in groups.items()}
        self.by_slug = {k: _Sorted(v) for k, v in slugs.items()}
        self.tops = _Sorted(all_tops)
        self.slug_tops = {k: _Sorted(v) for k, v in tops.items()}
        self.fresh = [t for t in self.order.items if t.id in self._views]

    def _note(self, t: Any) -> None:
        if t.id in self.objs:
            raise ValueError(f"thread {t.id} twice in a site index")
        self.objs[t.id] = t
        self.keys[t.id] = (order_key(t), self._top(t), t.list_state, t.authority)
        self.responses += self._responses(t)
        if self._summary(t):
            self.pages_keys[t.id] = t.pages_key
        else:
            self._views.add(t.id)

    def update(self, touched: Iterable[int], now: Iterable[Any]) -> None:
        """Take out the threads `touched` (looked at again by this build) and the views the
        last build added that `replace` did not (next time they are kept summaries), then
        add `now`: what this build has for them (a view, a kept summary, or nothing for a
        thread no longer public)."""
        for tid in set(touched) | self._views:
            self._take(tid)
        added = []
        for t in now:
            self._put(t)
            if t.id in self._views:
                added.append((self.keys[t.id][0], t))
        self.fresh = [t for _, t in sorted(added, key=lambda p: p[0])]

    def _take(self, tid: int) -> None:
        t = self.objs.pop(tid, None)
        self._views.discard(tid)
        if t is None:
            return
        key, top, state, slug = self.keys.pop(tid)
        self.responses -= self._responses(t)
        self.pages_keys.pop(tid, None)
        self.records.pop(slug, None)
        self.order.remove(key)
        self._drop(self.by_state, state, key)
        self._drop(self.by_slug, slug, key)
        if top is not None:
            self.tops.remove(top)
            self._drop(self.slug_tops, slug, top)
        for size, parts in self.parts.items():
            self._drop(parts, tid // size, tid)

    def _put(self, t: Any) -> None:
        self._note(t)
        key, top, state, slug = self.keys[t.id]
        self.records.pop(slug, None)
        self.order.add(key, t)
        self.by_state.setdefault(state, _Sorted()).add(key, t)
        self.by_slug.setdefault(slug, _Sorted()).add(key, t)
        if top is not None:
            self.tops.add(top, t)
            self.slug_tops.setdefault(slug, _Sorted()).add(top, t)
        for size, parts in self.parts.items():
            parts.setdefault(t.id // size, _Sorted()).add(t.id, t)

    def replace(self, found: Callable[[int], Any]) -> None:
        """Put what stands for each view held now in its place (`found(id)`: the kept
        summary the builder made of it, or None to leave it): after a build that made many
        views (a full build), the next one then replaces the few it looks at, not all."""
        for tid in list(self._views):
            t = found(tid)
            if t is None:
                continue
            old = self.objs[tid]
            keys = (order_key(t), self._top(t), t.list_state, t.authority)
            if keys != self.keys[tid] or self._responses(t) != self._responses(old):
                self._take(tid)     # not the same place: out and in again
                self._put(t)
                continue
            key, top, state, slug = keys
            self.objs[tid] = t
            for group, k in ((self.order, key), (self.by_state[state], key),
                             (self.by_slug[slug], key),
                             *(((self.tops, top), (self.slug_tops[slug], top))
                               if top is not None else ()),
                             *((parts[tid // size], tid) for size, parts in self.parts.items())):
                group.items[bisect.bisect_left(group.keys, k)] = t
            self._views.discard(tid)
            if self._summary(t):
                self.pages_keys[tid] = t.pages_key
            else:
                self._views.add(tid)
        self.fresh = []

    @staticmethod
    def _drop(groups: dict[Any, _Sorted], name: Any, key: Any) -> None:
        group = groups[name]
        group.remove(key)
        if not group:
            del groups[name]

    @property
    def view_ids(self) -> set[int]:
        """The threads held as views (not kept summaries): the next `update` replaces them."""
        return self._views

    # -- what the shared files ask -------------------------------------------------------------
    def threads(self) -> list[Any]:
        """Every thread, newest first (the site's order)."""
        return self.order.items

    def state(self, state: str) -> list[Any]:
        group = self.by_state.get(state)
        return group.items if group is not None else []

    def slugs(self) -> dict[str, list[Any]]:
        """Each authority's threads, in the site's order (only authorities with some)."""
        return {slug: group.items for slug, group in self.by_slug.items()}

    def record(self, slug: str, make: Callable[[list[Any]], Any]) -> Any:
        """The authority's record (`make` of its threads), made again only when one of its
        threads changed."""
        found = self.records.get(slug)
        if found is None:
            group = self.by_slug.get(slug)
            found = self.records[slug] = make(group.items if group is not None else [])
        return found

    def newest(self, n: int, slug: str | None = None) -> list[Any]:
        """The `n` threads with the newest public messages, newest first (as `heapq.nlargest`
        by `top` gives them: the tops are unique)."""
        group = self.tops if slug is None else self.slug_tops.get(slug)
        if group is None or n <= 0:
            return []
        return group.items[:-n - 1:-1]

    def id_parts(self, size: int) -> list[tuple[int, list[Any]]]:
        """The threads in id order, in parts of `size` ids: [(n, threads of ids n*size...)]."""
        parts = self.parts.get(size)
        if parts is None:
            made: dict[int, list[tuple[int, Any]]] = {}
            for t in self.order.items:
                made.setdefault(t.id // size, []).append((t.id, t))
            parts = self.parts[size] = {n: _Sorted(v) for n, v in made.items()}
        return [(n, parts[n].items) for n in sorted(parts)]
