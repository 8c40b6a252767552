"""An incremental build publishes exactly what a full build of the same store publishes, and
what it keeps without rendering is still checked for private values added since."""
from __future__ import annotations

from pathlib import Path

import pytest

from mailflow.archive import build as build_mod
from mailflow.archive.writer import CACHE_DIR, LeakError
from test_archive_build import (BOB, HOME, TODAY, World, addresses_of, ask, build, ingest, mail,
                                make_world)


@pytest.fixture()
def fresh(tmp_path: Path) -> World:
    w = make_world(tmp_path)
    yield w
    w.mf.close()


def published(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and CACHE_DIR not in p.parts}


def full_elsewhere(w: World, folder: Path) -> dict[str, bytes]:
    build(w.mf, folder, full=True, dns_txt=w.dns, today=TODAY, search=False)
    return published(folder)


def test_an_incremental_build_equals_a_full_build(fresh: World, tmp_path: Path) -> None:
    fresh.build()
    req_b, _ = addresses_of(fresh.mf, fresh.b)
    ingest(fresh.mf, mail(f"Visa FOI <{HOME}>", req_b, "RE: Visa", "Six weeks on average."),
           req_b, HOME)
    r = fresh.build()
    assert r.written and r.unchanged
    assert published(fresh.out) == full_elsewhere(fresh, tmp_path / "full1")
    # A new request too (a new thread, new private values), and a day later (lists move).
    ask(fresh.mf, "camden", "Library opening hours", "When are libraries open?")
    fresh.build()
    fresh.build(today=TODAY.replace(year=TODAY.year + 1))
    assert published(fresh.out) != published(tmp_path / "full1")
    build(fresh.mf, tmp_path / "full2", full=True, dns_txt=fresh.dns,
          today=TODAY.replace(year=TODAY.year + 1), search=False)
    assert published(fresh.out) == published(tmp_path / "full2")


def reply_and_rebuild(fresh: World, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The authority answers thread b, then an incremental build: the pages it rendered."""
    req_b, _ = addresses_of(fresh.mf, fresh.b)
    ingest(fresh.mf, mail(f"Visa FOI <{HOME}>", req_b, "RE: Visa", "Six weeks."), req_b, HOME)
    rendered: list[str] = []
    real = build_mod.Renderer.page

    def counting(self, template, path, **kw):  # type: ignore[no-untyped-def]
        rendered.append(path)
        return real(self, template, path, **kw)

    monkeypatch.setattr(build_mod.Renderer, "page", counting)
    fresh.build()
    return rendered


def test_unchanged_threads_keep_their_files_without_rendering(
        fresh: World, monkeypatch: pytest.MonkeyPatch) -> None:
    fresh.build()
    rendered = reply_and_rebuild(fresh, monkeypatch)
    threads = [p for p in rendered if p.startswith("request/")]
    assert threads == [f"{fresh.thread_dir(fresh.b)}index.html"]


def test_a_kept_page_is_checked_against_a_new_private_value(
        fresh: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A page published before someone became a citizen of the site holds her address: the
    next build refuses, though that page itself is unchanged and kept (the site-wide files
    that are rendered again would refuse too: here only the kept files' check is looked at)."""
    newcomer = "dora.newcomer@citizen.example"
    req_b, _ = addresses_of(fresh.mf, fresh.b)
    ingest(fresh.mf, mail(f"Visa FOI <{HOME}>", req_b, "RE: Visa",
                          f"Please also ask {newcomer} about it."), req_b, HOME)
    fresh.build()
    page = fresh.out / fresh.thread_dir(fresh.b) / "index.html"
    assert newcomer in page.read_text()
    before = published(fresh.out)
    ask(fresh.mf, "camden", "Bins", "When are bins collected?", citizen=newcomer, name="Dora")
    checked: list[tuple[set[bytes], list[str]]] = []
    real_check_kept = build_mod.Writer.check_kept
    real_write = build_mod.Writer.write

    def spy(self, guard):  # type: ignore[no-untyped-def]
        checked.append((set(guard.labels),
                            list(self.kept) + self.index.rels_of(self.kept_owners)))
        return real_check_kept(self, guard)

    def no_site_wide_check(self, rel, data, **kw):  # type: ignore[no-untyped-def]
        if not rel.startswith("request/"):
            kw["scan"] = b""
        return real_write(self, rel, data, **kw)

    monkeypatch.setattr(build_mod.Writer, "check_kept", spy)
    monkeypatch.setattr(build_mod.Writer, "write", no_site_wide_check)
    # (the authority's page, JSON and feed are kept too now: its requests did not change)
    with pytest.raises(LeakError, match=f"refusing to publish "
                                        f"({fresh.thread_dir(fresh.b)}|body/home-office/)"):
        fresh.build()
    [(values, kept)] = checked
    assert newcomer.encode() in values and BOB.encode() not in values   # only what is new
    assert f"{fresh.thread_dir(fresh.b)}index.html" in kept
    assert published(fresh.out) == before


@pytest.mark.skipif(not build_mod.pagefind_available(), reason="pagefind is not installed")
def test_search_runs_apart_from_the_build(fresh: World) -> None:
    """With search="background" the build returns at once and Pagefind runs in a thread;
    refresh_search indexes only when a build marked pages changed, at most so often."""
    r = fresh.build(search="background")
    assert r.search in ("started", "scheduled")
    build_mod._search_last[fresh.out.resolve()].join(300)
    assert (fresh.out / "pagefind" / "pagefind-ui.js").exists()
    assert build_mod.refresh_search(fresh.out) == "unchanged"
    req_b, _ = addresses_of(fresh.mf, fresh.b)
    ingest(fresh.mf, mail(f"Visa FOI <{HOME}>", req_b, "RE: Visa", "Six weeks."), req_b, HOME)
    assert fresh.build(search=False).search == "not run"
    assert build_mod.refresh_search(fresh.out, min_interval=3600) == "later"
    assert build_mod.refresh_search(fresh.out) == "indexed"
    assert build_mod.refresh_search(fresh.out) == "unchanged"


def test_listing_pages_are_paginated_and_kept_when_unchanged(
        fresh: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build_mod, "PAGE_SIZE", 1)
    fresh.build()
    first = fresh.read("body/camden/index.html")        # Camden has two requests
    second = fresh.read("body/camden/page/2/index.html")
    assert "Its record" in first and "Its record" not in second
    assert '<a href="../../../../body/camden/">1</a>' in second   # links are relative
    assert 'href="../../../../body/camden/feed.atom"' in second
    assert '<strong aria-current="page">2</strong>' in second
    assert '<a href="../../body/camden/page/2/">2</a>' in first
    waiting = sorted(p.relative_to(fresh.out).as_posix()
                     for p in (fresh.out / "list" / "waiting-response").rglob("index.html"))
    assert waiting == ["list/waiting-response/index.html",   # all three threads wait
                       "list/waiting-response/page/2/index.html",
                       "list/waiting-response/page/3/index.html"]
    # One new message: only the pages showing its thread are rendered again, and the result
    # is what a full build makes.
    rendered = reply_and_rebuild(fresh, monkeypatch)
    assert "body/camden/page/2/index.html" not in rendered
    assert not [p for p in rendered if p.startswith("list/") and p != "list/index.html"
                and "waiting-response" not in p]
    assert published(fresh.out) == full_elsewhere(fresh, tmp_path / "full")


@pytest.mark.skipif(not build_mod.pagefind_available(), reason="pagefind is not installed")
def test_cli_search(fresh: World) -> None:
    from click.testing import CliRunner

    from mailflow.cli import cli
    from mailflow.cli_archive import archive
    if "archive" not in cli.commands:
        cli.add_command(archive)
    fresh.build()
    args = ["--config", str(fresh.mf.settings.path), "archive", "search", "--out", str(fresh.out)]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0 and "search: indexed" in r.output, r.output
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0 and "search: unchanged" in r.output, r.output
