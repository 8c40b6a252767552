"""`SiteIndex.update` keeps exactly what a site index made from scratch of the same threads
holds (`build._site_index`): every group, in the same order, the same sums, the newest and
the parts, after threads are added, changed (state, authority, newest message) and removed."""
from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta, timezone

from mailflow.archive.siteindex import SiteIndex


@dataclass(frozen=True)
class T:
    id: int
    sent: date
    list_state: str
    authority: str
    top: tuple[datetime, int] | None
    responses: int
    summary: bool
    pages_key: str | None = None


def index(threads: list[T]) -> SiteIndex:
    return SiteIndex(threads, top=lambda t: t.top, responses=lambda t: t.responses,
                     summary=lambda t: t.summary)


def made(rnd: random.Random, tid: int, summary: bool) -> T:
    day = date(2026, 1, 1) + timedelta(days=rnd.randrange(60))
    top = (None if rnd.random() < 0.2 else
           (datetime(2026, 3, 1, tzinfo=timezone.utc) + timedelta(minutes=rnd.randrange(10**5)),
            tid * 10 + rnd.randrange(10)))
    return T(tid, day, rnd.choice(["waiting-response", "successful", "overdue"]),
             rnd.choice(["camden", "home-office", "wessex"]), top, rnd.randrange(3), summary,
             f"pk{tid}-{rnd.random()}" if summary else None)


def same(a: SiteIndex, threads: list[T]) -> None:
    b = index(threads)
    order = sorted(threads, key=lambda t: (t.sent, t.id), reverse=True)
    assert a.threads() == b.threads() == order
    for state in ("waiting-response", "successful", "overdue", "refused"):
        assert a.state(state) == [t for t in order if t.list_state == state]
    assert a.slugs() == b.slugs()
    assert a.responses == sum(t.responses for t in threads)
    for slug in (None, "camden", "wessex", "nowhere"):
        mine = [t for t in threads if t.top is not None and slug in (None, t.authority)]
        for n in (1, 3, 20, 500):
            assert a.newest(n, slug) == heapq.nlargest(n, mine, key=lambda t: t.top)
    for size in (1, 7, 100):
        assert a.id_parts(size) == b.id_parts(size)
    assert a.record("camden", len) == sum(t.authority == "camden" for t in threads)
    assert {k: v for k, v in a.pages_keys.items()} == {
        t.id: t.pages_key for t in threads if t.summary}


def test_updates_equal_an_index_made_from_scratch() -> None:
    rnd = random.Random(7)
    threads = {i: made(rnd, i, summary=rnd.random() < 0.7) for i in range(1, 120)}
    a = index(list(threads.values()))
    a.id_parts(7)            # parts of a size asked before are kept up to date too
    same(a, list(threads.values()))
    for step in range(60):
        touched = set(rnd.sample(sorted(threads), rnd.randrange(0, 6)))
        if step % 5 == 0:
            touched.add(max(threads) + 1)          # a new thread
        now = []
        for tid in touched:
            if rnd.random() < 0.15 and tid in threads:
                del threads[tid]                   # hidden: no longer public
                continue
            t = made(rnd, tid, summary=rnd.random() < 0.5)
            if tid in threads and rnd.random() < 0.5:   # a new state only
                t = replace(threads[tid], list_state="refused", summary=t.summary,
                            pages_key=t.pages_key)
            threads[tid] = t
            now.append(t)
        # The views the last update added are replaced by what stands for them now.
        for tid in a.view_ids - touched:
            if tid in threads:
                threads[tid] = replace(threads[tid], summary=True, pages_key=f"kept{tid}")
                now.append(threads[tid])
        a.update(touched, now)
        same(a, list(threads.values()))
        assert {t.id for t in a.fresh} == {t.id for t in now if not t.summary}
        if step % 2:     # the builder puts summaries in the views' places (`replace`)
            swapped = {}
            for tid in sorted(a.view_ids)[::2]:
                t = replace(threads[tid], summary=True, pages_key=f"swap{tid}")
                if rnd.random() < 0.2:          # not quite the same: out and in again
                    t = replace(t, list_state="refused", responses=t.responses + 1)
                swapped[tid] = threads[tid] = t
            a.replace(swapped.get)
            same(a, list(threads.values()))
            assert not set(swapped) & a.view_ids


def shown(t: T) -> tuple[object, ...]:
    """What a listing page shows of a thread (a kept summary shows what its view did)."""
    return (t.id, t.sent, t.list_state, t.authority, t.top, t.responses)


def pages_of(a: SiteIndex, size: int) -> dict[tuple[str, object, int], list[tuple[object, ...]]]:
    """Every page of every list the archive pages (state and authority lists in pages of
    `size`, the id parts of 7 each as one page), as shown."""
    out: dict[tuple[str, object, int], list[tuple[object, ...]]] = {}
    lists = [("state", s, a.state(s)) for s in ("waiting-response", "successful", "overdue",
                                                "refused")]
    lists += [("slug", slug, items) for slug, items in a.slugs().items()]
    for kind, name, items in lists:
        for n in range(max(1, -(-len(items) // size))):
            out[(kind, name, n)] = [shown(t) for t in items[n * size:(n + 1) * size]]
    for n, items in a.id_parts(7):
        out[("part", n, 0)] = [shown(t) for t in items]
    return out


def test_changed_pages_names_every_page_that_changed() -> None:
    """A page `changed_pages` does not name shows what it showed at the last `settle`; a
    reply that moves a thread nowhere names one page of each list it is in."""
    rnd = random.Random(11)
    size = 10
    threads = {i: made(rnd, i, summary=True) for i in range(1, 150)}
    a = index(list(threads.values()))
    a.id_parts(7)
    assert a.changed_pages("state", "overdue", size) == (set(), 0)   # new: all of it
    a.settle()
    before = pages_of(a, size)
    checked_in_place, fresh = 0, True
    for step in range(240):
        touched = set(rnd.sample(sorted(threads), rnd.randrange(1, 4)))
        now = []
        for tid in sorted(touched):
            roll = rnd.random()
            if roll < 0.5:      # a reply: more responses, a new page key, the same places
                t = replace(threads[tid], responses=threads[tid].responses + 1,
                            pages_key=f"pk{tid}-{step}")
                if rnd.random() < 0.5:      # ... and the site's newest message
                    t = replace(t, top=(datetime(2027, 1, 1, tzinfo=timezone.utc)
                                        + timedelta(minutes=step), tid * 10))
            elif roll < 0.6:
                del threads[tid]
                continue
            elif roll < 0.8:
                t = replace(threads[tid], list_state="refused")
            else:
                t = made(rnd, tid, summary=True)
            threads[tid] = t
            now.append(t)
        if step % 7 == 0:
            t = made(rnd, max(threads) + 1, summary=True)
            touched.add(t.id)
            threads[t.id] = t
            now.append(t)
        a.update(touched, now)
        same(a, list(threads.values()))
        after = pages_of(a, size)
        for (kind, name, n), items in after.items():
            pages, start = a.changed_pages(kind, name, 7 if kind == "part" else size)
            if n not in pages and (start is None or n < start):
                assert before.get((kind, name, n)) == items, (step, kind, name, n)
        held = {t[0]: t for page in before.values() for t in page}
        if (fresh and len(touched) == 1 and len(now) == 1
                and held.get(now[0].id, (None,))[:4] == shown(now[0])[:4]):
            t = now[0]      # a reply right after a settle: one page of each of its lists
            for kind, name, page_size in (("state", t.list_state, size),
                                          ("slug", t.authority, size), ("part", t.id // 7, 7)):
                pages, start = a.changed_pages(kind, name, page_size)
                assert start is None and len(pages) == 1, (kind, pages, start)
            checked_in_place += 1
        fresh = False
        if step % 3 == 0:       # the builder wrote the pages: they show what is held now
            a.replace(lambda tid: None)
            before = pages_of(a, size)
            fresh = True
    assert checked_in_place > 5
