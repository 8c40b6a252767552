"""Views made in worker processes (`archive/pool.py`): the same site, caches and report as
views made in the build's own process; a worker that dies fails the build and publishes
nothing; `[archive] workers` limits them. No timing here (bench/ measures the speed)."""
from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from mailflow import config
from mailflow.archive import build as build_mod
from mailflow.archive import pool
from mailflow.archive.cachedb import INDEX_FILE
from mailflow.archive.writer import CACHE_DIR, LeakError
from mailflow.errors import ConfigError
from test_archive_build import TODAY, World, make_world
from test_archive_incremental import published


@pytest.fixture()
def world(tmp_path: Path) -> World:
    w = make_world(tmp_path)
    yield w
    w.mf.close()


def _in_workers(monkeypatch: pytest.MonkeyPatch, workers: int = 2) -> list[int]:
    """Every build makes its views in `workers` processes, one view per task (so several
    tasks are in flight); returns the list the pool appends its views' count to."""
    used: list[int] = []
    real = pool.in_workers

    def counting(items: Any, *a: Any, **kw: Any) -> Any:
        used.append(len(items))
        return real(items, *a, **kw)

    monkeypatch.setattr(pool, "POOL_MIN", 1)
    monkeypatch.setattr(pool, "BATCH", 1)
    monkeypatch.setattr(pool, "workers_for", lambda settings: workers)
    monkeypatch.setattr(pool, "in_workers", counting)
    return used


def _everything(w: World, out: Path) -> dict[str, Any]:
    """What a full build leaves: the site, the DKIM cache, the cached views, the report's
    withheld attachments."""
    rep = build_mod.build(w.mf, out, full=True, dns_txt=w.dns, today=TODAY, search=False)
    db = sqlite3.connect(out / CACHE_DIR / INDEX_FILE)
    try:
        rows = sorted(db.execute("SELECT key, fp, view, files FROM threads"))
    finally:
        db.close()
    return {"site": published(out),
            "dkim": json.loads((out / CACHE_DIR / "dkim.json").read_text()),
            "cache": rows, "withheld": rep.withheld, "written": rep.written_paths}


def test_views_made_in_workers_are_the_views_made_here(
        world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    here = _everything(world, tmp_path / "here")
    used = _in_workers(monkeypatch)
    there = _everything(world, tmp_path / "there")
    assert used and used[0] >= 2          # the views were made in workers
    assert there == here
    assert here["dkim"] and here["withheld"] and here["cache"]
    # An incremental build after it, in workers again (a new redaction rule: every view is
    # made again), equals a full build.
    rules = world.mf.settings.site.rules / "redactions.toml"
    rules.write_text((rules.read_text() if rules.exists() else "")
                     + '\n[[redaction]]\ntext = "tonnes"\nreplacement = "[amount]"\n')
    build_mod.build(world.mf, tmp_path / "there", dns_txt=world.dns, today=TODAY, search=False)
    assert len(used) == 2
    monkeypatch.setattr(pool, "POOL_MIN", 10**9)
    assert published(tmp_path / "there") == _everything(world, tmp_path / "again")["site"]


def test_a_dead_worker_fails_the_build_and_publishes_nothing(
        world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    build_mod.build(world.mf, out, full=True, dns_txt=world.dns, today=TODAY, search=False)
    before = published(out)
    _in_workers(monkeypatch)
    parent = os.getpid()
    real = build_mod._thread_view

    def dies(*a: Any, **kw: Any) -> Any:
        if os.getpid() != parent:
            os._exit(9)       # as if killed: no exception, no answer
        return real(*a, **kw)

    monkeypatch.setattr(build_mod, "_thread_view", dies)
    with pytest.raises(pool.ViewWorkerError, match="workers = 1"):
        build_mod.build(world.mf, out, full=True, dns_txt=world.dns, today=TODAY, search=False)
    assert published(out) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out.new")) == []


def test_one_worker_makes_the_views_here(
        world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    used = _in_workers(monkeypatch, workers=1)
    build_mod.build(world.mf, tmp_path / "out", full=True, dns_txt=world.dns, today=TODAY,
                    search=False)
    assert used == []


def test_workers_setting(tmp_path: Path) -> None:
    good = '[site]\ndomain = "ask.example"\nsecret = "0123456789abcdef0123"\n'
    p = tmp_path / "config.toml"
    p.write_text(good)
    s = config.load(p)
    assert s.archive is not None and s.archive.workers == 0
    assert pool.workers_for(s) == min(2, os.cpu_count() or 1)
    p.write_text(good + "[archive]\nworkers = 3\n")
    assert pool.workers_for(config.load(p)) == 3
    p.write_text(good + "[archive]\nworkers = -1\n")
    with pytest.raises(ConfigError, match=r"\[archive\] workers"):
        config.load(p)


def test_views_in_workers_on_either_store(site: Any, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """On SQLite and PostgreSQL: the workers never open the database (the build reads for
    them, in its one transaction), and the build's connection still works after them."""
    from mailflow.site import Site as MfSite
    from test_archive_build import CAMDEN, addresses_of, ask, ingest, mail
    mf = MfSite.open(site.dir / "config.toml")
    try:
        for i in range(3):
            tid = ask(mf, "camden", f"Gritting {i}", f"Which roads, part {i}?")
            req, _ = addresses_of(mf, tid)
            ingest(mf, mail(f"John Smith <{CAMDEN}>", req, "RE: Gritting", f"Roads {i}.",
                            attachments=[(f"roads-{i}.csv", "text/csv", b"road\nHigh St\n")]),
                   req, CAMDEN)
        here = build_mod.build(mf, tmp_path / "here", full=True, dns_txt=lambda n: None,
                               today=TODAY, search=False)
        used = _in_workers(monkeypatch)
        there = build_mod.build(mf, tmp_path / "there", full=True, dns_txt=lambda n: None,
                                today=TODAY, search=False)
        assert used == [3]
        assert published(tmp_path / "there") == published(tmp_path / "here")
        assert there.withheld == here.withheld
        with mf.store.read() as tx:      # the build's store is still usable
            assert len(tx.threads()) == 3
    finally:
        mf.close()


def test_views_in_workers_beside_fault_reports(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Reports are made here, requests in workers: the pages the workers render see the
    site as `_write_pages` does (its fault-report links)."""
    import test_archive_reports as TR
    from test_archive_build import ask
    w = TR.make_world(tmp_path / "w")
    try:
        for i in range(2):
            ask(w.mf, "camden", f"Gritting {i}", f"Which roads, part {i}?")

        def full(out: Path) -> dict[str, bytes]:
            build_mod.build(w.mf, out, full=True, dns_txt=lambda n: None, today=TODAY,
                            search=False)
            return published(out)
        here = full(tmp_path / "here")
        used = _in_workers(monkeypatch)
        assert full(tmp_path / "there") == here
        assert used == [2]
        assert any(p.startswith("report/") for p in here)
    finally:
        w.mf.close()


def test_a_second_pool_in_the_process_makes_its_views_in_its_own_thread(
        world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another build while a pool runs (another site's, in a thread of a daemon): its views
    are made in-process instead of failing."""
    here = _everything(world, tmp_path / "here")
    _in_workers(monkeypatch)
    assert pool._BUSY.acquire(blocking=False)
    try:
        assert _everything(world, tmp_path / "busy") == here
    finally:
        pool._BUSY.release()


def test_a_view_from_the_message_summaries_is_the_view_from_whole_messages(
        world: World) -> None:
    """Views are made from `reading.MessageSummary` (what the fingerprint read), not from
    `tx.messages`: every column `thread_view` reads is in the summary, with the same values."""
    from mailflow.archive import context as C
    from mailflow.archive import reading
    from mailflow.core.redaction import load_redactions
    mf = world.mf
    path = mf.settings.site.rules / "redactions.toml"
    rules = load_redactions(path.read_text(), str(path)) if path.exists() else []
    made = 0
    with mf.store.read() as tx:
        summaries = reading.message_summaries_by_thread(tx)
        events = reading.events_by_thread(tx)
        get_raw = reading.raw_reader(tx)
        for t in tx.threads():
            if not C.is_public(t):
                continue

            def view(messages: list[Any]) -> Any:
                inp = C.ThreadInput(t, messages, events.get(t.id, []), get_raw)
                v, files = build_mod._thread_view(mf, inp, rules, lambda sha, raw: (True, "x"),
                                                  TODAY)
                return v, files.files
            assert view(summaries[t.id]) == view(tx.messages(t.id))
            made += 1
    assert made >= 2


@pytest.mark.parametrize("where", ["page", "attachment"])
def test_a_private_value_in_a_file_a_worker_made_fails_the_build(
        world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """A view worker checks (and in a full build writes) its thread's files itself
    (`Writer.ahead`): a private value in one of them fails the build as in the build's own
    process, and nothing is published."""
    out = tmp_path / "out"
    build_mod.build(world.mf, out, full=True, dns_txt=world.dns, today=TODAY, search=False)
    before = published(out)
    used = _in_workers(monkeypatch)
    leak = f"Reply to {world.secrets[0]}".encode()
    if where == "page":
        real_files = build_mod._thread_files
        monkeypatch.setattr(build_mod, "_thread_files", lambda r, sv, t, *a: [
            *real_files(r, sv, t, *a), (f"{t.path}notes.txt", leak)])
    else:
        real_view = build_mod._thread_view

        def leaky(*a: Any, **kw: Any) -> Any:
            view, files = real_view(*a, **kw)
            files.files.append((f"{view.path}attachments/leak.txt", leak))
            return view, files

        monkeypatch.setattr(build_mod, "_thread_view", leaky)
    for full in (True, False):
        with pytest.raises(LeakError):
            build_mod.build(world.mf, out, full=full, dns_txt=world.dns, today=TODAY,
                            search=False)
        assert published(out) == before
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.new")]
        # An incremental build makes views again only when something changed (a rule).
        rules = world.mf.settings.site.rules / "redactions.toml"
        rules.write_text((rules.read_text() if rules.exists() else "")
                         + '\n[[redaction]]\ntext = "tonnes"\nreplacement = "[amount]"\n')
    assert len(used) == 2 and all(n >= 2 for n in used)   # both builds used the workers
