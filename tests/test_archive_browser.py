"""The built archive in a real browser (Debian's chromium through Playwright).

Served over HTTP from 127.0.0.1 as any static host would serve it, with hostile content in
every place mail can put it (title, citizen's name, HTML body, attachment name): no script
runs, the Content Security Policy reports no violation, and search works offline.
Skipped only where the browser is missing and this is not CI (CI installs `chromium`).
"""
from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import DOMAIN
from test_archive_build import World, addresses_of, ask, ingest, mail, make_world

import mailflow.archive.build as build_mod

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - CI installs it
    sync_playwright = None  # type: ignore[assignment]

if (sync_playwright is None or not Path(CHROMIUM).exists()) and not os.environ.get("CI"):
    pytest.skip("needs playwright and /usr/bin/chromium (installed in CI)", allow_module_level=True)

XSS = '"><img src=x onerror=alert(11)><script>alert(12)</script>'
XSS_HTML = ('<p>Figures <svg onload="alert(13)"><script>alert(14)</script></svg>'
            '<iframe src="javascript:alert(15)"></iframe><a href="javascript:alert(16)">x</a>'
            '<img src=x onerror="alert(17)"><math><mi xlink:href="javascript:alert(18)">m</mi></math>'
            '<style>body{background:url(https://tracker.example/x)}</style>'
            '<b style="background:url(https://tracker.example/y)">bold</b></p>'
            '<table><tr><td>1</td></tr></table></p></div>unclosed <i>nesting')


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[World, str]]:
    w = make_world(tmp_path_factory.mktemp("browser"))
    tid = ask(w.mf, "edinburgh", f"Bins {XSS}", f"When are bins collected? {XSS}",
              citizen="dora@citizen.example", name=f"Dora {XSS}")
    req, _ = addresses_of(w.mf, tid)
    ingest(w.mf, mail("Edinburgh FOI <foi@edinburgh.gov.example>", req, f"RE: {XSS}", None,
                      html=XSS_HTML,
                      attachments=[(f"{XSS}.txt", "text/plain", b"collection days"),
                                   ("evil.svg", "image/svg+xml",
                                    b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(19)"/>'),
                                   ("page.html", "text/html",
                                    b"<p>hi</p><script>alert(20)</script>")]),
           req, "foi@edinburgh.gov.example")
    report = w.build(search=build_mod.pagefind_available())
    try:
        with serve(w.out) as base:
            yield w, base
    finally:
        w.mf.close()
    assert report.written > 0


@contextlib.contextmanager
def serve(folder: Path) -> Iterator[str]:
    """The folder over HTTP on 127.0.0.1, as a static host serves it; yields the base URL."""
    handler = functools.partial(_Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def browser():  # type: ignore[no-untyped-def]
    assert sync_playwright is not None, "playwright is not installed"
    assert Path(CHROMIUM).exists() or shutil.which("chromium"), "chromium is not installed"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


class Watched:
    """A page whose console messages, page errors and dialogs (alert) are all recorded."""

    def __init__(self, browser) -> None:  # type: ignore[no-untyped-def]
        self.page = browser.new_page()
        self.console: list[str] = []
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.on("request", lambda r: self.requests.append(r.url))

    def open(self, url: str) -> None:
        response = self.page.goto(url, wait_until="load")
        assert response is not None and response.status == 200, url
        self.page.wait_for_timeout(100)

    def assert_clean(self, base: str) -> None:
        csp = [c for c in self.console if "Content Security Policy" in c or "Refused" in c]
        assert not csp, csp
        assert not [c for c in self.console if c.startswith("error")], self.console
        assert not self.errors and not self.dialogs, (self.errors, self.dialogs)
        foreign = [u for u in self.requests if not u.startswith(base) and not u.startswith("data:")]
        assert not foreign, foreign

    def close(self) -> None:
        self.page.close()


def test_pages_read_well_and_run_nothing(served, browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    w, base = served
    paths = ["", "body/", "body/camden/", "body/edinburgh/", "list/", "list/waiting-response/",
             "search/", w.thread_dir(w.a)]
    bins = [d.name for d in (w.out / "request").iterdir() if "-bins-" in d.name]
    paths.append(f"request/{bins[0]}/")
    for path in paths:
        page = Watched(browser)
        page.open(base + path)
        assert page.page.title().endswith(f"· {DOMAIN}")
        assert page.page.locator("main h1").count() == 1
        page.page.screenshot(path=str(tmp_path / f"{path.strip('/').replace('/', '_') or 'index'}.png"),
                             full_page=True)
        page.assert_clean(base)
        page.close()


def test_thread_page_shows_the_correspondence(served, browser) -> None:  # type: ignore[no-untyped-def]
    w, base = served
    page = Watched(browser)
    page.open(base + w.thread_dir(w.a))
    p = page.page
    assert p.locator("h1").inner_text() == 'Gritting <script>alert("t")</script> & salt'
    assert p.get_by_text("DKIM signature verified: sent through camden.gov.example").is_visible()
    quoted = p.locator("#m5 details.quoted")
    assert not quoted.locator(".text").is_visible()
    quoted.locator("summary").click()
    assert quoted.locator(".text").is_visible()
    link = p.locator("#m5 .attachments a").first
    href = link.get_attribute("href")
    assert href and href.startswith("attachments/")
    r = p.request.get(base + w.thread_dir(w.a) + href)
    assert r.status == 200 and b"High St" in r.body()
    page.assert_clean(base)
    page.close()


def test_hostile_attachments_are_inert_when_opened(served, browser) -> None:  # type: ignore[no-untyped-def]
    w, base = served
    bins = [d.name for d in (w.out / "request").iterdir() if "-bins-" in d.name][0]
    page = Watched(browser)
    page.open(f"{base}request/{bins}/")
    hrefs = [a.get_attribute("href") for a in page.page.locator(".attachments a").all()]
    assert hrefs and not any(h.endswith(".svg") for h in hrefs)
    withheld = page.page.locator(".attachments .withheld").all_inner_texts()
    assert any("SVG" in t for t in withheld), withheld
    for href in hrefs:
        other = Watched(browser)
        other.page.goto(f"{base}request/{bins}/{href}")
        other.page.wait_for_timeout(100)
        assert not other.dialogs and not other.errors
        other.close()
    page.assert_clean(base)
    page.close()


@pytest.mark.skipif(not build_mod.pagefind_available() and not os.environ.get("CI"),
                    reason="pagefind is not installed")
def test_search_works_offline(served, browser) -> None:  # type: ignore[no-untyped-def]
    w, base = served
    page = Watched(browser)
    page.open(base + "search/")
    p = page.page
    p.locator(".pagefind-ui__search-input").fill("gritted")
    result = p.locator(".pagefind-ui__result-link").first
    result.wait_for(timeout=10_000)
    assert "Gritting" in result.inner_text()
    assert result.get_attribute("href") == "/" + w.thread_dir(w.a)
    page.assert_clean(base)
    page.close()


# -- fault reports ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served_reports(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The reports world of test_archive_reports, plus a report with hostile text everywhere."""
    from test_archive_reports import make_world as make_reports_world, report, photo_with_gps
    w = make_reports_world(tmp_path_factory.mktemp("browser-reports"))
    hostile = report(w.mf, "jane.citizen@citizen.example", f"Jane {XSS}", f"Pothole {XSS}",
                     f"A pothole at 51.1804, -1.3021. {XSS}", photos=[photo_with_gps(51.18, -1.30)])
    w.build(search=build_mod.pagefind_available())
    try:
        with serve(w.out) as base:
            yield w, hostile, base
    finally:
        w.mf.close()


def test_report_pages_draw_their_maps_and_load_nothing_else(served_reports, browser,  # type: ignore[no-untyped-def]
                                                           tmp_path: Path) -> None:
    w, hostile, base = served_reports
    for path in (f"report/{w.r1}/", f"report/{hostile}/", "report/", "area/wessex/",
                 "category/pothole/", "body/wessex/", "body/", ""):
        page = Watched(browser)
        page.open(base + path)
        p = page.page
        assert p.locator("main h1").count() == 1
        if path.startswith(("report/", "area/", "category/")):
            svg = p.locator("svg.map")
            assert svg.count() == 1 and svg.is_visible(), path
            box = svg.bounding_box()
            assert box is not None and box["width"] > 200 and box["height"] > 100
            pins = p.locator("svg.map .pin")
            assert pins.count() >= 1, path
            for i in range(pins.count()):   # every pin drawn inside the map
                pb = pins.nth(i).bounding_box()
                assert pb is not None and box["x"] <= pb["x"] + pb["width"] / 2 <= box["x"] + box["width"]
                assert box["y"] <= pb["y"] + pb["height"] / 2 <= box["y"] + box["height"]
        p.screenshot(path=str(tmp_path / f"{path.strip('/').replace('/', '_') or 'index'}.png"),
                     full_page=True)
        page.assert_clean(base)
        page.close()


def test_report_photo_is_shown_inline_from_the_site(served_reports, browser) -> None:  # type: ignore[no-untyped-def]
    w, hostile, base = served_reports
    page = Watched(browser)
    page.open(f"{base}report/{hostile}/")
    p = page.page
    assert p.locator("h1").inner_text() == f"Pothole {XSS}"
    img = p.locator("ul.photos img").first
    assert img.is_visible()
    assert img.evaluate("i => i.complete && i.naturalWidth") > 0
    assert img.get_attribute("src", timeout=1000).startswith("attachments/")
    # The pin links nowhere on the report page; on the area page each pin opens its report.
    page.open(f"{base}area/wessex/")
    link = p.locator(f'svg.map a[href="../../report/{w.r1}/"]')
    assert link.count() == 1
    link.locator("circle").click()
    p.wait_for_url(f"{base}report/{w.r1}/")
    assert p.locator("h1").inner_text() == "Deep pothole outside the bakery"
    page.assert_clean(base)
    page.close()


@pytest.mark.skipif(not build_mod.pagefind_available() and not os.environ.get("CI"),
                    reason="pagefind is not installed")
def test_search_finds_reports(served_reports, browser) -> None:  # type: ignore[no-untyped-def]
    w, _, base = served_reports
    page = Watched(browser)
    page.open(base + "search/")
    p = page.page
    p.locator(".pagefind-ui__search-input").fill("bakery")
    result = p.locator(".pagefind-ui__result-link").first
    result.wait_for(timeout=10_000)
    assert result.inner_text() == "Deep pothole outside the bakery"
    assert result.get_attribute("href") == f"/report/{w.r1}/"
    page.assert_clean(base)
    page.close()


def test_paginated_lists_link_their_pages(served, browser, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """With one request a page, the lists and an authority's requests run over several
    pages: each page is clean, and its page numbers lead to the others and back."""
    w, _ = served
    monkeypatch.setattr(build_mod, "PAGE_SIZE", 1)
    paged = w.out.parent / "paged"
    build_mod.build(w.mf, paged, full=True, dns_txt=w.dns, search=False)
    with serve(paged) as base:
        for first in ("list/waiting-response/", "body/camden/"):
            page = Watched(browser)
            page.open(base + first)
            p = page.page
            assert p.locator("nav.pager [aria-current=page]").inner_text() == "1"
            p.locator("nav.pager a", has_text="2").click()
            p.wait_for_url(base + first + "page/2/")
            assert p.locator("main h1").count() == 1
            assert p.locator("nav.pager [aria-current=page]").inner_text() == "2"
            assert p.locator("ul.threads li").count() == 1
            page.assert_clean(base)
            p.locator("nav.pager a", has_text="1").click()
            p.wait_for_url(base + first)
            page.close()
