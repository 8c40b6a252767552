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
    """Items kept in ascending order of a unique key, with their keys alongside, and what
    changed since the last `settle` (the builder's last build): positions whose item was
    replaced in place (`marks`), the first position where one went in or out (`shift`: every
    later item moved), and the length then (`base`; None for a group made since)."""

    __slots__ = ("keys", "items", "marks", "shift", "base")

    def __init__(self, pairs: Iterable[tuple[Any, Any]] = ()):
        pairs = sorted(pairs, key=lambda p: p[0])
        self.keys = [k for k, _ in pairs]
        self.items = [t for _, t in pairs]
        self.marks: set[int] = set()
        self.shift: int | None = None
        self.base: int | None = None

    def add(self, key: Any, item: Any) -> None:
        i = bisect.bisect_left(self.keys, key)
        if i < len(self.keys) and self.keys[i] == key:
            raise ValueError(f"key {key!r} twice in a site index")
        self.keys.insert(i, key)
        self.items.insert(i, item)
        self._shifted(i)

    def remove(self, key: Any) -> None:
        i = bisect.bisect_left(self.keys, key)
        if i == len(self.keys) or self.keys[i] != key:
            raise KeyError(key)
        del self.keys[i]
        del self.items[i]
        self._shifted(i)

    def put_in_place(self, key: Any, item: Any, mark: bool) -> None:
        """`item` in place of the one under `key` (the same place in the order)."""
        i = bisect.bisect_left(self.keys, key)
        if i == len(self.keys) or self.keys[i] != key:
            raise KeyError(key)
        self.items[i] = item
        if mark:
            self.marks.add(i)

    def _shifted(self, i: int) -> None:
        if self.shift is None or i < self.shift:
            self.shift = i

    def settle(self) -> None:
        self.marks.clear()
        self.shift = None
        self.base = len(self.items)

    def changed_pages(self, size: int) -> tuple[set[int], int | None]:
        """The pages of `size` items (0 the first) that may hold other items, or the same
        ones changed, than at the last `settle`: (those pages, and every page from this one
        on). A change in the number of pages changes them all (each shows the count)."""
        if self.base is None:
            return set(), 0
        if _pages(len(self.items), size) != _pages(self.base, size):
            return set(), 0
        return ({m // size for m in self.marks},
                None if self.shift is None else self.shift // size)

    def __len__(self) -> int:
        return len(self.items)


_NOWHERE = object()


def _pages(n: int, size: int) -> int:
    return max(1, -(-n // size))


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
        thread no longer public). A thread still held is moved only in the orders where it
        sorts elsewhere (`_move`): a reply moves it among the newest, not in the lists by
        date, so only the list pages showing it count as changed there."""
        now = list(now)
        by_id = {t.id: t for t in now}
        moved: set[int] = set()
        for tid in set(touched) | self._views:
            t = by_id.get(tid)
            if t is not None and tid in self.objs:
                self._move(tid, t, mark=True)
                moved.add(tid)
            else:
                self._take(tid)
        added = []
        for t in now:
            if t.id not in moved:
                self._put(t)
            if t.id in self._views:
                added.append((self.keys[t.id][0], t))
        self.fresh = [t for _, t in sorted(added, key=lambda p: p[0])]

    def _places(self, tid: int, keys: tuple[Any, ...]) -> dict[tuple[Any, ...], Any]:
        """Where a thread with these sort keys stands: group -> its key there."""
        key, top, state, slug = keys
        out: dict[tuple[Any, ...], Any] = {("order",): key, ("state", state): key,
                                           ("slug", slug): key}
        if top is not None:
            out[("tops",)] = top
            out[("slug_tops", slug)] = top
        for size in self.parts:
            out[("part", size, tid // size)] = tid
        return out

    def _group(self, where: tuple[Any, ...], make: bool) -> tuple[_Sorted | None,
                                                                   dict[Any, _Sorted] | None]:
        """The group named `where` (made, if `make`), and the dict holding it (None for the
        site-wide ones)."""
        if where[0] == "order":
            return self.order, None
        if where[0] == "tops":
            return self.tops, None
        groups = (self.by_state if where[0] == "state" else self.by_slug if where[0] == "slug"
                  else self.slug_tops if where[0] == "slug_tops" else self.parts[where[1]])
        name = where[-1]
        group = groups.get(name)
        if group is None and make:
            group = groups[name] = _Sorted()
        return group, groups

    def _move(self, tid: int, t: Any, mark: bool) -> None:
        """Put `t` in the place of the held thread `tid`: in place in each order where it
        sorts the same, out and in again where it does not. `mark`: its content may differ,
        so the pages showing it change (`changed_pages`); a kept summary standing for the
        view just written does not."""
        old = self.objs[tid]
        keys = (order_key(t), self._top(t), t.list_state, t.authority)
        before, after = self._places(tid, self.keys[tid]), self._places(tid, keys)
        for where, k in before.items():
            if after.get(where, _NOWHERE) == k:
                group, _ = self._group(where, make=False)
                group.put_in_place(k, t, mark)  # type: ignore[union-attr]
            else:
                self._out(where, k)
        for where, k in after.items():
            if before.get(where, _NOWHERE) != k:
                self._in(where, k, t)
        self.objs[tid] = t
        self.responses += self._responses(t) - self._responses(old)
        if mark or keys[3] != self.keys[tid][3]:
            self.records.pop(self.keys[tid][3], None)
            self.records.pop(keys[3], None)
        self.keys[tid] = keys
        self._views.discard(tid)
        self.pages_keys.pop(tid, None)
        if self._summary(t):
            self.pages_keys[tid] = t.pages_key
        else:
            self._views.add(tid)

    def _out(self, where: tuple[Any, ...], key: Any) -> None:
        """Take the item under `key` out of the group `where` (an emptied named group goes)."""
        group, groups = self._group(where, make=False)
        assert group is not None
        group.remove(key)
        if groups is not None and not group:
            del groups[where[-1]]

    def _in(self, where: tuple[Any, ...], key: Any, t: Any) -> None:
        self._group(where, make=True)[0].add(key, t)  # type: ignore[union-attr]

    def _take(self, tid: int) -> None:
        t = self.objs.pop(tid, None)
        self._views.discard(tid)
        if t is None:
            return
        keys = self.keys.pop(tid)
        self.responses -= self._responses(t)
        self.pages_keys.pop(tid, None)
        self.records.pop(keys[3], None)
        for where, k in self._places(tid, keys).items():
            self._out(where, k)

    def _put(self, t: Any) -> None:
        self._note(t)
        keys = self.keys[t.id]
        self.records.pop(keys[3], None)
        for where, k in self._places(t.id, keys).items():
            self._in(where, k, t)

    def replace(self, found: Callable[[int], Any]) -> None:
        """Put what stands for each view held now in its place (`found(id)`: the kept
        summary the builder made of it, or None to leave it): after a build that made many
        views (a full build), the next one then replaces the few it looks at, not all.
        Then `settle`: the pages just written show what the index holds."""
        for tid in list(self._views):
            t = found(tid)
            if t is None:
                continue
            self._move(tid, t, mark=False)
        self.fresh = []
        self.settle()

    def settle(self) -> None:
        """What the builder wrote now shows every list as it stands: no page has changed
        since (`changed_pages`)."""
        for group in self._groups():
            group.settle()

    def _groups(self) -> Iterable[_Sorted]:
        yield self.order
        yield self.tops
        yield from self.by_state.values()
        yield from self.by_slug.values()
        yield from self.slug_tops.values()
        for parts in self.parts.values():
            yield from parts.values()

    def changed_pages(self, kind: str, name: Any, size: int) -> tuple[set[int], int | None]:
        """`_Sorted.changed_pages` of a list: kind "state" (a list state's threads), "slug"
        (an authority's) or "part" (the threads of ids name*size to name*size+size-1, as one
        page). A list that is empty, or was not there at the last `settle`, changed whole."""
        group = (self.by_state.get(name) if kind == "state" else
                 self.by_slug.get(name) if kind == "slug" else
                 self.parts.get(size, {}).get(name))
        if group is None:
            return set(), 0
        return group.changed_pages(size)

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
