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
