"""An incremental build reads only the threads that changed (by their probe: the thread row, the
ids of its messages, which of them are hidden, its events), and still publishes exactly what a
full build of the same store publishes, after every kind of change: a new message, a hidden
message or thread, a new state, a redaction rule, a template, a damaged or older cache."""
from __future__ import annotations

import gzip
import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import update

from mailflow.archive import build as build_mod
from mailflow.archive import reading
from mailflow.archive.writer import CACHE_DIR, load_manifest, write_private_json
from mailflow.rulesdir import packaged_dir
from mailflow.site import Site as MfSite
from mailflow.store.tables import messages as messages_table
from test_archive_build import (CAMDEN, HOME, TODAY, World, addresses_of, ask, ingest, mail,
                                make_world)
from test_archive_incremental import full_elsewhere, published


@pytest.fixture()
def fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    # One request per part of the data dump and per listing page, so that which ones are
    # written again shows.
    monkeypatch.setattr(build_mod, "DUMP_PART", 1)
    monkeypatch.setattr(build_mod, "PAGE_SIZE", 1)
    w = make_world(tmp_path)
    yield w
    w.mf.close()


def made_views(monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], list[list[int] | None]]:
    """Which threads a build fingerprints, and for which it reads message summaries."""
    fingerprinted: list[int] = []
    summaries: list[list[int] | None] = []
    real_fp = build_mod.ThreadCache.fingerprint
    real_summaries = build_mod.message_summaries_by_thread

    def fp(self, inp, *a, **kw):  # type: ignore[no-untyped-def]
        fingerprinted.append(inp.thread.id)
        return real_fp(self, inp, *a, **kw)

    def summ(tx, ids=None):  # type: ignore[no-untyped-def]
        summaries.append(sorted(ids) if ids is not None else None)
        return real_summaries(tx, ids)

    monkeypatch.setattr(build_mod.ThreadCache, "fingerprint", fp)
    monkeypatch.setattr(build_mod, "message_summaries_by_thread", summ)
    return fingerprinted, summaries


def part(tid: int) -> str:
    return f"data/threads-{tid}.jsonl.gz"


def test_a_new_message_reads_and_rewrites_only_what_shows_it(
        fresh: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fresh.build()
    fingerprinted, summaries = made_views(monkeypatch)
    req_b, _ = addresses_of(fresh.mf, fresh.b)
    ingest(fresh.mf, mail(f"Visa FOI <{HOME}>", req_b, "RE: Visa", "Six weeks on average."),
           req_b, HOME)
    r = fresh.build()
    assert fingerprinted == [fresh.b] and summaries == [[fresh.b]]   # nothing else was read
    b = fresh.thread_dir(fresh.b)
    written = set(r.written_paths)
    assert {f"{b}index.html", f"{b}index.json", f"{b}feed.atom", part(fresh.b),
            "body/home-office/index.html", "body/home-office/index.json",
            "body/home-office/feed.atom", "index.html", "feed.atom"} <= written
    # Not Camden's files, nor the other requests' own files or parts of the data.
    assert not [p for p in written if p.startswith(("body/camden/", "body/edinburgh/"))]
    for tid in (fresh.a, fresh.c):
        assert not [p for p in written if p.startswith(fresh.thread_dir(tid))]
        assert part(tid) not in written
    line = gzip.decompress((fresh.out / part(fresh.b)).read_bytes()).decode()
    assert "Six weeks on average." in line
    assert r.unchanged > 0 and r.removed == 0
    assert published(fresh.out) == full_elsewhere(fresh, tmp_path / "full")
    # Nothing changed: nothing is read, written or rendered.
    fingerprinted.clear()
    summaries.clear()
    again = fresh.build()
    assert again.written == 0 and fingerprinted == [] and summaries == []


def test_every_kind_of_change_equals_a_full_build(
        fresh: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fresh.build()
    steps = 0

    def same_as_full() -> None:
        nonlocal steps
        steps += 1
        files = published(fresh.out)
        assert files == full_elsewhere(fresh, tmp_path / f"full{steps}")
        # The cache index's manifest is every published file as it is (rows of kept files
        # are not written again: they must still be right).
        manifest = load_manifest(fresh.out)
        assert {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()
                if not rel.startswith("pagefind/")} == manifest

    a, c = fresh.thread_dir(fresh.a), fresh.thread_dir(fresh.c)
    # A moderator hides an answer straight in the database (no audit, no event): the probe
    # sees the hidden ids, so the thread's page and its data line lose it.
    with fresh.mf.store.tx() as tx:
        tx.c.execute(update(messages_table).where(
            messages_table.c.thread_id == fresh.a, messages_table.c.kind == "auto_reply")
            .values(hidden=True))
    r = fresh.build()
    assert f"{a}index.html" in r.written_paths and part(fresh.a) in r.written_paths
    assert "I am away until Monday." not in fresh.read(f"{a}index.html")
    same_as_full()
    # A hidden thread disappears: its files, its part of the data, its lines everywhere.
    with fresh.mf.store.tx() as tx:
        tx.update_thread(fresh.c, hidden=True)
    r = fresh.build()
    assert f"{c}index.html" in r.removed_paths and part(fresh.c) in r.removed_paths
    assert not (fresh.out / c).exists()
    assert c not in fresh.sitemap() and c not in fresh.read("body/camden/index.json")
    parts = json.loads(fresh.read("data/index.json"))["requests"]["parts"]
    assert fresh.c not in [p["first_id"] for p in parts]
    same_as_full()
    # ... and comes back.
    with fresh.mf.store.tx() as tx:
        tx.update_thread(fresh.c, hidden=False)
    r = fresh.build()
    assert f"{c}index.html" in r.written_paths
    same_as_full()
    # A new state moves it between lists.
    with fresh.mf.store.tx() as tx:
        tx.update_thread(fresh.a, state="successful")
    r = fresh.build()
    assert "list/successful/index.html" in r.written_paths
    same_as_full()
    # A day later some requests are overdue: the lists and pages say so.
    later = TODAY.replace(year=TODAY.year + 1)
    r = fresh.build(today=later)
    assert any(p.startswith("list/overdue/") or p.startswith("list/very-overdue/")
               for p in r.written_paths)
    steps += 1
    build_mod.build(fresh.mf, tmp_path / f"full{steps}", full=True, dns_txt=fresh.dns,
                    today=later, search=False)
    assert published(fresh.out) == published(tmp_path / f"full{steps}")
    fresh.build()
    same_as_full()
    # A redaction rule: every view is made again.
    rules = fresh.mf.settings.site.rules / "redactions.toml"
    rules.write_text((rules.read_text() if rules.exists() else "")
                     + '\n[[redaction]]\ntext = "tonnes"\nreplacement = "[amount]"\n')
    r = fresh.build()
    assert "[amount]" in fresh.read(f"{a}index.html") and "tonnes" not in fresh.read(
        f"{a}index.html")
    assert b"tonnes" not in gzip.decompress((fresh.out / part(fresh.a)).read_bytes())
    same_as_full()


def test_a_template_change_renders_every_page_again(fresh: World, tmp_path: Path) -> None:
    fresh.build()
    site_dir = fresh.mf.settings.path.parent
    (site_dir / "templates" / "archive").mkdir(parents=True)
    shipped = (packaged_dir("templates") / "archive" / "thread.html").read_text()
    (site_dir / "templates" / "archive" / "thread.html").write_text(
        shipped.replace("{% block main %}", "{% block main %}<!-- local change -->", 1))
    config = fresh.mf.settings.path
    config.write_text(config.read_text().replace('# templates = "templates"',
                                                 'templates = "templates"'))
    fresh.mf.close()
    fresh.mf = MfSite.open(config)
    r = fresh.build()
    for tid in (fresh.a, fresh.b, fresh.c):
        assert "<!-- local change -->" in fresh.read(f"{fresh.thread_dir(tid)}index.html")
        assert f"{fresh.thread_dir(tid)}index.html" in r.written_paths
    assert published(fresh.out) == full_elsewhere(fresh, tmp_path / "full")


def test_a_new_thread_changes_its_authority_and_a_new_part(
        fresh: World, tmp_path: Path) -> None:
    fresh.build()
    new = ask(fresh.mf, "edinburgh", "Trams", "How many trams run on Sundays?")
    r = fresh.build()
    assert part(new) in r.written_paths
    assert "body/edinburgh/index.html" in r.written_paths
    assert not [p for p in r.written_paths if p.startswith("body/camden/")]
    assert published(fresh.out) == full_elsewhere(fresh, tmp_path / "full")


def test_a_damaged_cache_starts_again(fresh: World, tmp_path: Path) -> None:
    fresh.build()
    (fresh.out / CACHE_DIR / "cache.sqlite").write_bytes(b"not a database" * 100)
    for suffix in ("-wal", "-shm"):
        (fresh.out / CACHE_DIR / f"cache.sqlite{suffix}").unlink(missing_ok=True)
    req_b, _ = addresses_of(fresh.mf, fresh.b)
    ingest(fresh.mf, mail(f"Visa FOI <{HOME}>", req_b, "RE: Visa", "Soon."), req_b, HOME)
    fresh.build()
    assert published(fresh.out) == full_elsewhere(fresh, tmp_path / "full")
    assert fresh.build().written == 0


def test_an_archive_made_before_the_cache_index_is_taken_over(
        fresh: World, tmp_path: Path) -> None:
    """An older archive had `manifest.json` and `threads.json`: the first build takes the
    manifest over, so a file it no longer produces (the old single data file) is removed."""
    fresh.build()
    cache = fresh.out / CACHE_DIR
    files = load_manifest(fresh.out)
    old = fresh.out / "data" / "threads.jsonl.gz"
    old.write_bytes(gzip.compress(b"{}\n"))
    files["data/threads.jsonl.gz"] = "0" * 64
    for name in ("cache.sqlite", "cache.sqlite-wal", "cache.sqlite-shm"):
        (cache / name).unlink(missing_ok=True)
    write_private_json(cache / "manifest.json", {"version": 1, "files": files})
    write_private_json(cache / "threads.json", {"salt": "x", "threads": {}})
    r = fresh.build()
    assert "data/threads.jsonl.gz" in r.removed_paths and not old.exists()
    assert not (cache / "manifest.json").exists() and not (cache / "threads.json").exists()
    assert published(fresh.out) == full_elsewhere(fresh, tmp_path / "full")
    assert fresh.build().written == 0


def test_probes_change_with_what_a_view_is_made_from(fresh: World) -> None:
    def probes() -> dict[int, object]:
        with fresh.mf.store.read() as tx:
            part = reading.thread_probes(tx)
            return {t.id: part(t.id) for t in tx.threads()}

    before = probes()
    req_a, _ = addresses_of(fresh.mf, fresh.a)
    ingest(fresh.mf, mail(f"John Smith <{CAMDEN}>", req_a, "RE: more", "More."), req_a, CAMDEN)
    after = probes()
    assert after[fresh.a] != before[fresh.a]
    assert {k: v for k, v in after.items() if k != fresh.a} == {
        k: v for k, v in before.items() if k != fresh.a}
    with fresh.mf.store.tx() as tx:   # hiding one message and showing another of the thread
        tx.c.execute(update(messages_table).where(messages_table.c.thread_id == fresh.b)
                     .values(hidden=~messages_table.c.hidden))
    assert probes()[fresh.b] != after[fresh.b]


def test_the_cache_index_holds_no_private_value(fresh: World) -> None:
    """The cache folder sits inside the output folder: what it keeps is redacted like the
    pages (the views), or digests."""
    fresh.build()
    db = sqlite3.connect(fresh.out / CACHE_DIR / "cache.sqlite")
    try:
        dump = "\n".join(db.iterdump()).lower()
    finally:
        db.close()
    for secret in fresh.secrets:
        assert secret.lower() not in dump, secret


def test_the_private_value_fingerprints_are_keyed_by_the_site_secret(fresh: World) -> None:
    """`secrets.bin` sits inside the output folder too: a plain hash of a citizen's address
    there could be checked against guessed addresses, so its digests are keyed by the site's
    secret, which stays in config.toml."""
    import hashlib

    from mailflow.archive.build import SECRETS_FILE
    fresh.build()
    data = (fresh.out / CACHE_DIR / SECRETS_FILE).read_bytes()
    assert data and len(data) % 16 == 0
    stored = {data[i:i + 16] for i in range(0, len(data), 16)}
    for secret in fresh.secrets:
        plain = hashlib.sha256(secret.strip().lower().encode()).digest()[:16]
        assert plain not in stored, secret
    # The check still works: a build after nothing changed finds no new private value.
    assert fresh.build().written == 0


def test_a_full_rebuild_removes_the_old_site_and_leftovers_in_the_background(
        fresh: World) -> None:
    from mailflow.archive import writer as writer_mod
    fresh.build()
    stray = fresh.out.parent / f".{fresh.out.name}.old-1-abc"   # a crashed process's leftover
    (stray / "request").mkdir(parents=True)
    (stray / "request" / "x.html").write_text("old")
    fresh.build(full=True)
    writer_mod.wait_for_removals()
    assert [p.name for p in fresh.out.parent.iterdir() if ".old-" in p.name] == []
    assert (fresh.out / "index.html").exists()


def test_the_store_changes_messages_and_events_only_as_the_probe_expects() -> None:
    """A tripwire for `reading.thread_probes`: it sees a thread's messages by their ids and
    its hidden ones, and its events by their ids, because the store only ever inserts them and
    only ever changes a message's `hidden`. A store change that edits or deletes them in any
    other way must teach the probe about it (or the archive would keep a stale page)."""
    import re

    import mailflow.store.repository as repository
    src = Path(repository.__file__).read_text(encoding="utf-8")
    updates = re.findall(r"update\(messages\)[^\n]*", src)
    assert updates and all(".values(hidden=hidden)" in u for u in updates), updates
    for forbidden in ("delete(messages)", "update(thread_events)", "delete(thread_events)"):
        assert forbidden not in src, forbidden


def rows_read(monkeypatch: pytest.MonkeyPatch) -> list[list[int] | None]:
    """For which threads each build reads thread rows (None: all of them)."""
    calls: list[list[int] | None] = []
    real = reading.thread_rows

    def spy(tx, ids=None):  # type: ignore[no-untyped-def]
        calls.append(sorted(ids) if ids is not None else None)
        return real(tx, ids)

    monkeypatch.setattr(reading, "thread_rows", spy)
    return calls


def test_a_process_reads_only_the_threads_changed_since_its_last_build(
        fresh: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon builds after every message: its next build asks the store which threads
    changed (migration 0011) and reads those only, whatever the size of the site."""
    fresh.build()
    calls = rows_read(monkeypatch)
    assert fresh.build().written == 0 and calls == [[]]
    req_b, _ = addresses_of(fresh.mf, fresh.b)
    ingest(fresh.mf, mail(f"Visa FOI <{HOME}>", req_b, "RE: Visa", "In March."), req_b, HOME)
    calls.clear()
    fresh.build()
    assert calls == [[fresh.b]]
    assert published(fresh.out) == full_elsewhere(fresh, tmp_path / "full1")
    # Changes made with no build in between, by every kind of write, all seen at once.
    with fresh.mf.store.tx() as tx:
        tx.c.execute(update(messages_table).where(
            messages_table.c.thread_id == fresh.a, messages_table.c.kind == "auto_reply")
            .values(hidden=True))
        tx.update_thread(fresh.c, state="successful")
    new = ask(fresh.mf, "edinburgh", "Trams", "How many trams run on Sundays?")
    calls.clear()
    fresh.build()
    assert calls and calls[0] is not None and {fresh.a, fresh.c, new} <= set(calls[0])
    assert fresh.b not in calls[0]
    assert published(fresh.out) == full_elsewhere(fresh, tmp_path / "full2")
    assert fresh.build().written == 0


@pytest.mark.parametrize("how", ["another process built", "an older cache", "a new day",
                                 "a failed build"])
def test_what_a_process_knows_is_dropped_when_it_may_be_stale(
        fresh: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """The process's knowledge stands only for the cache index its last build wrote, on the
    same day, after a build that finished: else the build reads every thread, as a new
    process does, and publishes what a full build does."""
    fresh.build()
    today = TODAY
    if how in ("another process built", "an older cache"):
        db = sqlite3.connect(fresh.out / CACHE_DIR / "cache.sqlite")
        with db:
            if how == "an older cache":
                db.execute("DELETE FROM meta WHERE k = 'generation'")
            else:
                db.execute("UPDATE meta SET v = 'another' WHERE k = 'generation'")
        db.close()
    elif how == "a new day":
        today = TODAY.replace(year=TODAY.year + 1)
    else:
        def broken(*a, **kw):  # type: ignore[no-untyped-def]
            raise RuntimeError("disk full")

        with monkeypatch.context() as m:
            m.setattr(build_mod, "_write_pages", broken)
            with pytest.raises(RuntimeError):
                fresh.build()
    calls = rows_read(monkeypatch)
    req_b, _ = addresses_of(fresh.mf, fresh.b)
    ingest(fresh.mf, mail(f"Visa FOI <{HOME}>", req_b, "RE: Visa", "In May."), req_b, HOME)
    fresh.build(today=today)
    assert calls == [None]
    full = tmp_path / "full"
    build_mod.build(fresh.mf, full, full=True, dns_txt=fresh.dns, today=today, search=False)
    assert published(fresh.out) == published(full)


def test_an_authoritys_json_is_what_json_dumps_writes(fresh: World) -> None:
    """Its list of requests is put together from kept entries (`_RequestsJson`): the text
    is exactly json.dumps' of the same data, after a change too."""
    fresh.build()
    req_b, _ = addresses_of(fresh.mf, fresh.b)
    ingest(fresh.mf, mail(f"Visa FOI <{HOME}>", req_b, "RE: Visa", "In June."), req_b, HOME)
    fresh.build()
    for p in sorted((fresh.out / "body").glob("*/index.json")):
        text = p.read_text(encoding="utf-8")
        data = json.loads(text)
        assert text == json.dumps(data, ensure_ascii=False, indent=1) + "\n", p
    assert json.loads(fresh.read("body/home-office/index.json"))["requests"]


def test_a_large_sites_memory_is_kept_out_of_full_collections(
        fresh: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A build that reads every thread of a large site freezes what the process keeps
    (`build._settle`: Python's full collections would walk it every few builds); the builds
    after it still publish what a full build does."""
    import gc
    monkeypatch.setattr(build_mod, "SETTLE_THREADS", 0)
    try:
        fresh.build()
        assert gc.get_freeze_count() > 0
        req_b, _ = addresses_of(fresh.mf, fresh.b)
        ingest(fresh.mf, mail(f"Visa FOI <{HOME}>", req_b, "RE: Visa", "In July."), req_b,
               HOME)
        fresh.build()
        assert published(fresh.out) == full_elsewhere(fresh, tmp_path / "full")
    finally:
        gc.unfreeze()


def test_an_authoritys_json_checks_only_new_entries_and_kept_ones_against_new_values(
        fresh: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request's entry in its authority's JSON that the file on disk already held (same
    page key) is not checked again with the file (`_RequestsJson.write`): it goes to the kept
    content, checked against the private values added since, so a value added after the
    entry was published is still found."""
    from mailflow.archive.writer import LeakError
    fresh.build()
    other = ask(fresh.mf, "home-office", "Passports", "How long do passports take?")
    fresh.build()
    scans: dict[str, bytes] = {}
    real_write = build_mod.Writer.write

    def spy(self, rel, data, **kw):  # type: ignore[no-untyped-def]
        scans[rel] = kw.get("scan") or (data.encode() if isinstance(data, str) else data)
        return real_write(self, rel, data, **kw)

    monkeypatch.setattr(build_mod.Writer, "write", spy)
    req_b, _ = addresses_of(fresh.mf, fresh.b)
    ingest(fresh.mf, mail(f"Visa FOI <{HOME}>", req_b, "RE: Visa", "In August."), req_b, HOME)
    fresh.build()
    scan = scans["body/home-office/index.json"]
    assert b"Visa" in scan and b"Passports" not in scan     # only the changed entry
    assert b"Passports" in (fresh.out / "body/home-office/index.json").read_bytes()
    # A kept entry holding a value that became private since: the build refuses.
    newcomer = "dora.newcomer@citizen.example"
    [pk] = [k for k, e in build_mod._ENTRIES.items() if "Passports" in e]
    monkeypatch.setitem(build_mod._ENTRIES, pk, build_mod._ENTRIES[pk].replace(
        "Passports", newcomer))
    ask(fresh.mf, "camden", "Bins", "When are bins collected?", citizen=newcomer, name="Dora")
    ingest(fresh.mf, mail(f"Visa FOI <{HOME}>", req_b, "RE: Visa", "Or September."), req_b,
           HOME)
    with pytest.raises(LeakError, match="refusing to publish body/home-office/index.json"):
        fresh.build()
    assert other
